"""The scores of a no-gradient pass, computed chunk by chunk from its hidden states and head, and the memory the
chunked objective works in (docs/scale.md, "Memory: the chunked loss").

`score_target` turns a pass's `Head` into the `TargetScores` that routing and the Top-K terms read: the sampled
token's log-prob, the entropy and the top-K, without holding more than one pool of full-vocabulary rows. Tiny
passes keep their full log-probs instead, so that the loss need not recompute them. `Workspace` is that pool,
allocated once per call and reused by every chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import losses
from ..types import Head, TargetScores
from .logit_grads import log_softmax_

# Tokens per chunk by default: a chunk's two [chunk, V] float32 arrays take 200 MiB (172 tokens at V = 151,936).
# Chunks whose terms read a target's full distribution need four or five arrays and get half or 2/5 the tokens.
_DEFAULT_POOL_ELEMENTS = 50 << 20
# Rows of scratch for row sums: two buffers of 4 MiB each.
_SCRATCH_ELEMENTS = 1 << 20
# A pass's scores keep its full log-probs up to this many elements (2 MiB: 1,024 positions at V = 512).
_KEEP_ELEMENTS = 1 << 19


def default_chunk_size(vocab_size: int) -> int:
    return max(1, _DEFAULT_POOL_ELEMENTS // (2 * vocab_size))


class Workspace:
    """The [rows, V] memory of one call, allocated once and reused by every chunk: a pool of rows cut into as
    many arrays as a chunk needs, and two buffers of a few rows for row sums.

    Allocating per chunk would free and reallocate tens of megabytes again and again: glibc keeps blocks below
    its mmap threshold (up to 32 MiB) on its heap, and the process's memory grows well past what is alive."""

    def __init__(self, pool_rows: int, vocab_size: int, dtype: torch.dtype, device):
        self.pool = torch.empty(max(pool_rows, 5), vocab_size, dtype=dtype, device=device)
        rows = max(1, min(pool_rows // 2, _SCRATCH_ELEMENTS // vocab_size))
        self.scratch = [self.pool.new_empty(rows, vocab_size) for _ in range(2)]

    def rows_for(self, arrays: int) -> int:
        """Tokens per chunk when a chunk needs `arrays` [rows, V] arrays."""
        return self.pool.shape[0] // arrays

    def arrays(self, count: int, rows: int) -> list[Tensor]:
        step = self.rows_for(count)
        return [self.pool[i * step : i * step + rows] for i in range(count)]


def _workspace_for(count: int, chunk: int, head: Head) -> Workspace:
    """The workspace of a call on `count` tokens: two arrays of `chunk` rows, or, when that is more than the
    tokens need, room for all of them in one chunk of any kind (up to five arrays)."""
    dtype = losses.accumulation_dtype(head.weight.dtype)
    return Workspace(min(2 * chunk, 5 * count), head.vocab_size, dtype, head.weight.device)


def _logits_into(out_RV: Tensor, hidden_RH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, temperature: float):
    """`out_RV = (hidden @ weight.T + bias) / temperature`, written into the buffer."""
    if hidden_RH.dtype == weight_VH.dtype == out_RV.dtype and (bias_V is None or bias_V.dtype == out_RV.dtype):
        if bias_V is None:
            torch.matmul(hidden_RH, weight_VH.T, out=out_RV)
        else:
            torch.addmm(bias_V, hidden_RH, weight_VH.T, out=out_RV)
    else:  # a half-precision head: its matmul in its own dtype, then upcast into the buffer
        logits = hidden_RH @ weight_VH.T
        out_RV.copy_(logits if bias_V is None else logits + bias_V)
    if temperature != 1.0:
        out_RV.div_(temperature)


@torch.no_grad()
def score_target(
    head: Head,
    completion_ids_BT: Tensor,
    mask_BT: Tensor,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    workspace: Workspace | None = None,
) -> TargetScores:
    """A no-gradient pass's `TargetScores` ([B, T], zeros at padding), computed chunk by chunk.

    When the log-probs of all positions take at most `_KEEP_ELEMENTS` (tiny vocabularies), they are kept in the
    scores instead of the top-K: the loss reads them instead of recomputing the target's logits, and takes the
    top-K of just the tokens whose Top-K term needs it."""
    valid = mask_BT.bool()
    if valid.numel() * head.vocab_size <= _KEEP_ELEMENTS:
        return _score_kept(head, completion_ids_BT, valid, temperature)
    hidden = head.hidden.detach()[valid]
    ids = completion_ids_BT[valid]
    count, vocab_size = hidden.shape[0], head.vocab_size
    dtype = losses.accumulation_dtype(head.weight.dtype)
    workspace = workspace or _workspace_for(count, chunk_size or default_chunk_size(vocab_size), head)
    chunk = workspace.rows_for(2)
    token = torch.zeros(count, dtype=dtype, device=hidden.device)
    ent = torch.zeros_like(token)
    topk_values_ = torch.zeros(count, top_k or 0, dtype=dtype, device=hidden.device)
    topk_ids = torch.zeros(count, top_k or 0, dtype=torch.long, device=hidden.device)
    for start in range(0, count, chunk):
        rows = slice(start, min(start + chunk, count))
        logprobs, probs = workspace.arrays(2, rows.stop - start)
        _logits_into(logprobs, hidden[rows], head.weight.detach(), _detach(head.bias), temperature)
        log_softmax_(logprobs, probs)
        token[rows] = logprobs.gather(-1, ids[rows, None]).squeeze(-1)
        ent[rows] = -probs.mul_(logprobs).sum(-1)  # the probs are not needed after this
        if top_k:
            torch.topk(logprobs, top_k, dim=-1, out=(topk_values_[rows], topk_ids[rows]))
    positions = valid.flatten().nonzero().squeeze(-1)

    def scatter(values: Tensor) -> Tensor:
        out = values.new_zeros(valid.numel(), *values.shape[1:]).index_copy_(0, positions, values)
        return out.view(*valid.shape, *values.shape[1:])

    return TargetScores(
        token_logprobs=scatter(token),
        entropy=scatter(ent),
        topk_logprobs=scatter(topk_values_) if top_k else None,
        topk_ids=scatter(topk_ids) if top_k else None,
    )


def _score_kept(head: Head, completion_ids_BT: Tensor, valid_BT: Tensor, temperature: float) -> TargetScores:
    """All positions at once, padding included, into the full log-probs that are kept: at these sizes the few
    padding rows cost less than gathering the valid ones and scattering them back. Padding positions get zeros
    in the [B, T] fields; their full log-probs are whatever the pass gives there (read only at valid tokens)."""
    hidden = head.hidden.detach().flatten(0, 1)
    dtype = losses.accumulation_dtype(head.weight.dtype)
    logprobs = torch.empty(hidden.shape[0], head.vocab_size, dtype=dtype, device=hidden.device)
    probs = torch.empty_like(logprobs)
    _logits_into(logprobs, hidden, head.weight.detach(), _detach(head.bias), temperature)
    log_softmax_(logprobs, probs)
    padding = ~valid_BT.flatten()
    token = logprobs.gather(-1, completion_ids_BT.flatten()[:, None]).squeeze(-1).masked_fill_(padding, 0.0)
    ent = probs.mul_(logprobs).sum(-1).neg_().masked_fill_(padding, 0.0)
    return TargetScores(
        token.view(valid_BT.shape), ent.view(valid_BT.shape), full_logprobs=logprobs.view(*valid_BT.shape, -1)
    )


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()
