"""The objective from hidden states and output heads, a bounded number of tokens at a time (design, "kernels/").

At Qwen3 scale (vocabulary 151,936) the full logits of three passes over a thousand completion tokens take
gigabytes. This form holds at most one pool of full-vocabulary rows, allocated once per call and reused by every
chunk (`Workspace`; two [chunk, V] arrays' worth):

1. scores (no gradient): for the privileged student and the teacher, chunk by chunk, the sampled token's
   log-prob, the entropy and the top-K (what routing and the Top-K terms read); tiny passes keep their full
   log-probs instead. The trainer may compute these per micro-batch and route the whole batch at once
   (`TargetScores`, `compute_batch_thresholds`).
2. routing, exactly as the plain form (`objectives.route`).
3. loss and gradients: chunk by chunk, the student's log-probs, the per-token terms and the gradient with respect
   to the chunk's logits, folded at once into the gradients of the hidden states and the head (`grad_W += G^T h`).
   The gradient is assembled without autograd over [chunk, V]: a sampled-token or Top-K term reads a few entries
   of the student's log-probs, so its gradient is taken on those [R, K] entries only (closed form, or autograd)
   and the softmax's chain rule puts it back (`∂/∂z = scatter(g) − (Σ g) s`); a full-vocabulary term has its
   gradient in closed form (`logit_grads.py`). The tokens whose terms read a target's full log-probs (the HT
   tokens in DOPD: the Top-K terms read the kept top-K) come first, in chunks of half the size, and only their
   target rows are recomputed.

The result equals `objectives.compute_objective` on the full logits, value and gradient (tested in fp32 within
1e-5 relative for every method and option).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import losses
from ..objectives import (
    Objective,
    ObjectiveOutput,
    TargetScores,
    check_top_k,
    route,
    sampled_values,
    summarize,
    topk_inputs,
    topk_values,
)
from ..routing import Gather, Thresholds
from .logit_grads import full_divergence_, log_softmax_, log_softmax_rows_, rowdot, support_divergence

# Tokens per chunk by default: a chunk's two [chunk, V] float32 arrays take 200 MiB (172 tokens at V = 151,936).
# Chunks whose terms read a target's full distribution need four or five arrays and get half or 2/5 the tokens.
_DEFAULT_POOL_ELEMENTS = 50 << 20
# Rows of scratch for row sums: two buffers of 4 MiB each.
_SCRATCH_ELEMENTS = 1 << 20
# A pass's scores keep its full log-probs up to this many elements (2 MiB: 1,024 positions at V = 512).
_KEEP_ELEMENTS = 1 << 19


@dataclass
class Head:
    """One pass's final hidden states and output head. Shapes: `hidden` [B, T, H] (position t scores completion
    token t), `weight` [V, H], `bias` [V] or None."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


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
    return TargetScores(token.view(valid_BT.shape), ent.view(valid_BT.shape),
                        full_logprobs=logprobs.view(*valid_BT.shape, -1))  # fmt: skip


def _needs_full(objective: Objective, term, target: TargetScores) -> bool:
    if term.granularity == "full":
        return True
    if term.granularity == "topk":
        return objective.config.topk_support != "target" or target.topk_logprobs is None
    return False


class _ChunkedLoss(torch.autograd.Function):
    """Loss value in forward, with the gradients of the student's hidden states, head weight and bias computed
    chunk by chunk there and handed out in backward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, run):
        wanted = run.grad_enabled
        grad_hidden = torch.zeros_like(hidden_NH) if wanted and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_VH) if wanted and ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias_V) if wanted and bias_V is not None and ctx.needs_input_grad[2] else None
        loss = run(hidden_NH.detach(), weight_VH.detach(), None if bias_V is None else bias_V.detach(),
                   grad_hidden, grad_weight, grad_bias)  # fmt: skip
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads, ctx.grads = ctx.grads, None
        # Scale in place and hand the buffers over: a copy of the head's gradient would double its memory.
        if not torch.all(grad_output == 1):
            for grad in grads:
                if grad is not None:
                    grad.mul_(grad_output.to(grad.dtype))
        return grads[0], grads[1], grads[2], None


def chunked_objective(
    objective: Objective,
    student: Head,
    completion_ids_BT: Tensor,
    mask_BT: Tensor,
    self_head: Head | None = None,
    teacher_head: Head | None = None,
    self_scores: TargetScores | None = None,
    teacher_scores: TargetScores | None = None,
    thresholds: Thresholds | None = None,
    num_sequences: int | None = None,
    gather: Gather | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> ObjectiveOutput:
    """The objective from heads; same arguments and result as `objectives.compute_objective` with logits.

    `self_head` / `teacher_head` hold the no-gradient passes' hidden states and heads (hidden sizes may differ
    from the student's). Their `TargetScores` may be given (the trainer computes them once per micro-batch to
    route the whole batch); the heads are still needed for terms that read a full target distribution.
    """
    heads = {"self": self_head, "teacher": teacher_head}
    given = {"self": self_scores, "teacher": teacher_scores}
    labels = {"self": "privileged student", "teacher": "teacher"}
    for name, needed in (("self", objective.needs_self), ("teacher", objective.needs_teacher)):
        if needed and heads[name] is None and given[name] is None:
            raise ValueError(f"method {objective.config.method!r} needs the {labels[name]}'s hidden states and head")
    _check_heads(student, completion_ids_BT, mask_BT, heads)
    check_top_k(objective, student.vocab_size)
    c = objective.config
    valid = mask_BT.bool()
    workspace = _workspace_for(int(valid.sum()), chunk_size or default_chunk_size(student.vocab_size), student)
    scores: dict[str, TargetScores] = {}
    for name, head in heads.items():
        if given[name] is not None:
            scores[name] = given[name]
        elif head is not None:
            scores[name] = score_target(
                head, completion_ids_BT, mask_BT, objective.top_k_for(name), c.temperature, None, workspace
            )
    for name, score in scores.items():  # scores without a head (a served teacher) hold only the top-K
        if heads[name] is None and score.full_logprobs is None:
            _check_scores_only(objective, name, labels[name], score)
    routed = route(
        objective, mask_BT, scores.get("self"), scores.get("teacher"), thresholds, num_sequences, gather, generator
    )
    # The tokens whose terms read a target's full distribution come first, grouped by target, so that the
    # recomputed target logits come in full blocks (a few scattered HT tokens per chunk make slow matmuls); the
    # loss is a sum over tokens, so their order does not change it. `index_N`: each ordered token's place in B·T.
    index_N = valid.flatten().nonzero().squeeze(-1)
    order, full_count = _group_by_full_targets(objective, routed.coefficients.flatten(1)[:, index_N], scores)
    index_N = index_N[order]
    run = _LossRun(
        objective,
        routed.coefficients.flatten(1)[:, index_N],
        {name: _token_scores(s, index_N) for name, s in scores.items()},
        completion_ids_BT.flatten()[index_N],
        index_N,
        {name: (h, s.full_logprobs) for (name, h), s in zip(heads.items(), map(scores.get, heads)) if h is not None},
        full_count,
        workspace,
    )
    loss = _ChunkedLoss.apply(student.hidden.flatten(0, 1)[index_N], student.weight, student.bias, run)

    def unflatten(values_N: Tensor) -> Tensor:
        flat = torch.zeros(mask_BT.numel(), dtype=values_N.dtype, device=values_N.device)
        return flat.index_copy_(0, index_N, values_N).view(mask_BT.shape)

    token_loss_BT = unflatten(run.plain_N)
    entropies = {"student": unflatten(run.entropy_N)}
    entropies.update({name: s.entropy for name, s in scores.items()})
    metrics = summarize(
        objective,
        loss,
        token_loss_BT,
        routed,
        mask_BT,
        entropies,
        unflatten(run.token_logprobs_N),
        scores["teacher"].token_logprobs if "teacher" in scores else None,
    )
    return ObjectiveOutput(loss, metrics, token_loss_BT, routed.regime, routed.gap, routed.thresholds)


class _LossRun:
    """The loss over N ordered tokens, chunk by chunk: its value, the per-token views and, into the given
    buffers, the gradients of the student's hidden states, head weight and bias.

    A chunk holds the student's log-probs and probs; the probs become the gradient with respect to the logits,
    `G = q − scale ⊙ s` plus the sparse entries of the Top-K and sampled-token terms; then `grad_h = G W` and
    `grad_W += Gᵀ h` (divided by the temperature, which divided the logits). The first `full_count` tokens also
    need a target's log-probs and the closed forms' `q` (and a second `q` when two full-vocabulary terms meet on
    one token), so their chunks are cut into four or five arrays instead of two."""

    def __init__(self, objective, coefficients_JN, scores, ids_N, index_N, targets, full_count, workspace):
        self.objective, self.scores, self.ids_N, self.index_N = objective, scores, ids_N, index_N
        self.targets = targets  # name: (Head, the full log-probs its scores kept [B, T, V] or None)
        self.full_count, self.workspace = full_count, workspace
        self.temperature = objective.config.temperature
        self._group_terms(objective, coefficients_JN)
        self.full = [_needs_full(objective, term, scores[term.target]) for term in self.terms]
        full_vocabulary = sum(term.granularity == "full" for term in self.terms)
        self.full_arrays = 4 if full_vocabulary <= 1 else 5
        self.grad_enabled = torch.is_grad_enabled()
        dtype = workspace.pool.dtype
        self.plain_N = torch.zeros(ids_N.shape[0], dtype=dtype, device=ids_N.device)
        self.token_logprobs_N = torch.zeros_like(self.plain_N)
        self.entropy_N = torch.zeros_like(self.plain_N)

    def _group_terms(self, objective, coefficients_JN) -> None:
        """Terms with the same target, divergence and granularity (DOPD's LL and HS) are evaluated as one, with
        the sum of their coefficients (the value is linear in it); `weights_GN` keeps each token's Σ weight of
        the terms that apply to it, for the per-token view."""
        groups: dict[tuple, list[int]] = {}
        for j, term in enumerate(objective.terms):
            groups.setdefault((term.target, term.divergence, term.granularity, term.tail), []).append(j)
        applies_JN = (coefficients_JN != 0).to(coefficients_JN.dtype)
        self.terms = [objective.terms[members[0]] for members in groups.values()]
        self.coefficients_GN = torch.stack([coefficients_JN[members].sum(0) for members in groups.values()])
        self.weights_GN = torch.stack([
            sum(objective.terms[j].weight * applies_JN[j] for j in members) for members in groups.values()
        ])  # fmt: skip

    def chunks(self, count: int):
        """The chunks: the tokens that need full targets, then the others, each in the chunk size it allows."""
        for first, last, arrays in ((0, self.full_count, self.full_arrays), (self.full_count, count, 2)):
            step = self.workspace.rows_for(arrays)
            for start in range(first, last, step):
                yield slice(start, min(start + step, last)), arrays

    def __call__(self, hidden_NH, weight_VH, bias_V, grad_hidden, grad_weight, grad_bias) -> Tensor:
        total = torch.zeros((), dtype=self.plain_N.dtype, device=hidden_NH.device)
        scale = 1.0 / self.temperature
        for rows, arrays in self.chunks(hidden_NH.shape[0]):
            loss, grad_logits = self.chunk(rows, arrays, hidden_NH[rows], weight_VH, bias_V)
            total = total + loss
            if grad_logits is None:
                continue
            grad_logits = grad_logits.to(weight_VH.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight_VH).mul_(scale)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden_NH[rows], alpha=scale)
            if grad_bias is not None:
                grad_bias.add_(grad_logits.sum(0).to(grad_bias.dtype), alpha=scale)
        return total

    def chunk(self, rows: slice, arrays: int, hidden_CH: Tensor, weight_VH: Tensor, bias_V: Tensor | None):
        """The chunk's loss and its gradient with respect to the chunk's logits [C, V] (None when no term
        applies to any of its tokens); fills the per-token views."""
        n = rows.stop - rows.start
        logprobs, probs, *full_arrays = self.workspace.arrays(arrays, n)
        _logits_into(logprobs, hidden_CH, weight_VH, bias_V, self.temperature)
        log_softmax_(logprobs, probs)
        ids = self.ids_N[rows]
        self.token_logprobs_N[rows] = logprobs.gather(-1, ids[:, None]).squeeze(-1)
        self.entropy_N[rows] = -rowdot(probs, logprobs, self.workspace.scratch)
        coefficients_GC = self.coefficients_GN[:, rows].to(probs.dtype)
        weights_GC = self.weights_GN[:, rows].to(probs.dtype)
        state = _ChunkState(self.plain_N[rows], torch.zeros(n, dtype=probs.dtype, device=probs.device))
        if not bool((coefficients_GC != 0).any()):
            return state.loss, None
        scores = {name: s.rows(rows) for name, s in self.scores.items()}
        for term, full, coefficient, weight in zip(self.terms, self.full, coefficients_GC, weights_GC):
            if not full:
                self._sparse_term(term, coefficient, weight, logprobs, ids, scores[term.target], state)
        q = None
        if full_arrays:
            q = self._full_terms(rows, coefficients_GC, weights_GC, logprobs, probs, scores, full_arrays, state)
        probs.mul_(-state.scale_C[:, None])
        if q is not None:
            probs.add_(q)
        for token_rows, entry_ids, grad in state.sparse:
            probs.index_put_((token_rows, entry_ids), grad, accumulate=True)
        return state.loss, probs

    def _sparse_term(self, term, coefficient_R, weight_R, logprobs_RV, ids_R, target, state, offset=0, full_RV=None):
        """A sampled-token or Top-K term on R rows, from the student's log-probs at the entries it reads only.
        `offset` is the first row's place in the chunk; `full_RV`, the target's full log-probs if needed."""
        applies = coefficient_R.nonzero().squeeze(-1)
        if applies.numel() == 0:
            return
        c = self.objective.config
        coefficient = coefficient_R[applies]
        if term.granularity == "sampled":
            entry_ids = ids_R[applies, None]
            target = target.rows(applies)
            values, grad = _by_autograd(
                lambda s: sampled_values(self.objective, term, s.squeeze(-1), target),
                logprobs_RV[applies[:, None], entry_ids],
                coefficient,
            )
        else:
            # The support of the run of rows from the first to the last the term applies to (views, no [R, V]
            # copy; the tokens are grouped by term), then of those rows.
            run = slice(int(applies[0]), int(applies[-1]) + 1)
            support = topk_inputs(self.objective, target.rows(run), lambda: full_RV[run], lambda: logprobs_RV[run])
            if applies.numel() == run.stop - run.start:  # the term applies to every row of its run
                entry_ids, support_mask, target_support = support
            else:
                entry_ids, support_mask, target_support = (tensor[applies - run.start] for tensor in support)
            student = logprobs_RV[applies[:, None], entry_ids]
            if (term.tail or c.topk_tail) == "renormalize" and c.topk_support != "union":  # the closed form
                values, grad = support_divergence(term.divergence, c.jsd_beta, coefficient, student, target_support)
            else:
                values, grad = _by_autograd(
                    lambda s: topk_values(self.objective, term, s, target_support, support_mask), student, coefficient
                )
        index = applies + offset
        state.add(index, values, coefficient, weight_R[applies])
        state.scale_C.index_add_(0, index, grad.sum(-1))
        state.sparse.append((index[:, None], entry_ids, grad))

    def _full_terms(self, rows, coefficients_GC, weights_GC, logprobs_CV, probs_CV, scores, arrays, state):
        """The terms that read a target's full log-probs, target by target on the rows that need it (a
        contiguous run, the tokens being grouped). Returns the closed forms' Σ q [C, V], or None if none ran."""
        target_lp_buffer, q_sum, *extra = arrays
        q_written = False
        for name in ("teacher", "self"):
            terms = [
                (term, coefficient, weight)
                for term, full, coefficient, weight in zip(self.terms, self.full, coefficients_GC, weights_GC)
                if full and term.target == name
            ]
            span = _nonzero_span([coefficient for _, coefficient, _ in terms])
            if span is None:
                continue
            part = slice(*span)
            target_lp = self._target_logprobs(name, rows.start + part.start, target_lp_buffer[: span[1] - span[0]])
            for term, coefficient, weight in terms:
                coefficient, weight = coefficient[part], weight[part]
                if not bool((coefficient != 0).any()):
                    continue
                if term.granularity != "full":  # a Top-K term whose support needs the full distribution
                    self._sparse_term(term, coefficient, weight, logprobs_CV[part], self.ids_N[rows][part],
                                      scores[name].rows(part), state, part.start, target_lp)  # fmt: skip
                    continue
                if not q_written:
                    q_sum.zero_()
                    q_written = True
                # The term's own run of rows: the target's span also holds the tokens of its Top-K terms (DOPD's LH
                # beside HT), where this term's coefficient is 0 and its full-vocabulary work would be wasted.
                first, last = _nonzero_span([coefficient])
                own = slice(part.start + first, part.start + last)
                coefficient, weight = coefficient[first:last], weight[first:last]
                q = extra[0][own] if extra else q_sum[own]  # one full-vocabulary term: q lands in q_sum at once
                values, scale = full_divergence_(
                    term.divergence, self.objective.config.jsd_beta, coefficient, logprobs_CV[own], probs_CV[own],
                    target_lp[first:last], q, self.workspace.scratch,
                )  # fmt: skip
                if extra:
                    q_sum[own].add_(q)
                applies = coefficient.nonzero().squeeze(-1)
                state.add(applies + own.start, values[applies], coefficient[applies], weight[applies])
                state.scale_C[own] += scale
        return q_sum if q_written else None

    def _target_logprobs(self, name: str, start: int, buffer_RV: Tensor) -> Tensor:
        """The target's full log-probs of the ordered tokens from `start` on, into the buffer: copied from the
        ones its scores kept, or recomputed from its head."""
        head, kept = self.targets[name]
        index = self.index_N[start : start + buffer_RV.shape[0]]
        if kept is not None:
            return torch.index_select(kept.flatten(0, 1), 0, index, out=buffer_RV)
        hidden = head.hidden.detach().flatten(0, 1)[index]
        _logits_into(buffer_RV, hidden, head.weight.detach(), _detach(head.bias), self.temperature)
        log_softmax_rows_(buffer_RV, self.workspace.scratch)
        return buffer_RV


def _nonzero_span(coefficients: list[Tensor]) -> tuple[int, int] | None:
    """First and last + 1 of the rows where any of the coefficients [R] is not 0 (None: no such row)."""
    if not coefficients:
        return None
    needs = coefficients[0] != 0
    for coefficient in coefficients[1:]:
        needs = needs | (coefficient != 0)
    where = needs.nonzero().squeeze(-1)
    return None if where.numel() == 0 else (int(where[0]), int(where[-1]) + 1)


def _by_autograd(values_of, student_RK: Tensor, coefficient_R: Tensor) -> tuple[Tensor, Tensor]:
    """(values [R], gradient of Σ coefficient·value with respect to the student's entries [R, K]) by autograd on
    those entries only; `student_RK` is a copy (advanced indexing), so it can become a leaf."""
    with torch.enable_grad():
        student = student_RK.requires_grad_()
        values = values_of(student)
        (grad,) = torch.autograd.grad((values * coefficient_R).sum(), student, allow_unused=True)
    if grad is None:  # no entry the term reads carries mass (e.g. all masked)
        grad = torch.zeros_like(student)
    return values.detach(), grad


@dataclass
class _ChunkState:
    """What the terms of one chunk add up: the loss, the token views, and the logit gradient's parts: a per-row
    scale of `s` and sparse entries (rows [R, 1], ids [R, K], values [R, K])."""

    plain_C: Tensor  # a view into the run's per-token values
    scale_C: Tensor
    sparse: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    loss: Tensor | None = None

    def __post_init__(self):
        self.loss = self.scale_C.new_zeros(())

    def add(self, index_R: Tensor, values_R: Tensor, coefficient_R: Tensor, weight_R: Tensor) -> None:
        """Values of a term group on some of the chunk's tokens, with their coefficients and Σ weights."""
        self.loss = self.loss + (values_R * coefficient_R).sum()
        self.plain_C.index_add_(0, index_R, values_R * weight_R)


def _token_scores(scores: TargetScores, index_N: Tensor) -> TargetScores:
    """The scores of the ordered tokens, [B, T, ...] -> [N, ...], without the kept full log-probs: the loss
    reads those by `index_N`, for the rows that need them only."""

    def pick(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.flatten(0, 1)[index_N]

    return TargetScores(pick(scores.token_logprobs), pick(scores.entropy), pick(scores.topk_logprobs),
                        pick(scores.topk_ids))  # fmt: skip


def _group_by_full_targets(objective: Objective, coefficients_JN: Tensor, scores) -> tuple[Tensor, int]:
    """A stable order of the tokens that puts first those that need a target's full log-probs, grouped by
    which targets they need and then by which terms (so that each term's rows make one run, and a Top-K term
    takes its support on a slice), and how many they are."""
    terms = objective.terms
    key = torch.zeros(coefficients_JN.shape[-1], dtype=torch.long, device=coefficients_JN.device)
    for j, (term, coefficient) in enumerate(zip(terms, coefficients_JN)):
        if _needs_full(objective, term, scores[term.target]):
            target_bit = 2 if term.target == "teacher" else 1
            key = key | ((coefficient != 0).long() * ((target_bit << len(terms)) | (1 << (len(terms) - 1 - j))))
    return torch.argsort(-key, stable=True), int((key > 0).sum())


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


def _check_scores_only(objective: Objective, name: str, label: str, scores: TargetScores) -> None:
    """Scores without a head (a served teacher) hold the sampled token's log-probs and a top-K: every term that
    reads them must be a sampled-token term or a Top-K term on the target's own top-K."""
    for term in objective.terms:
        if term.target != name or term.granularity == "sampled":
            continue
        if term.granularity == "full":
            raise ValueError(
                f"the {label}'s full distribution is needed by the {term.label} term ({term.divergence}, full "
                f"vocabulary), but only its top-K log-probs were given; set objective.teacher_full=topk_bucket"
            )
        if objective.config.topk_support != "target":
            raise ValueError(
                f"objective.topk_support = {objective.config.topk_support!r} needs the {label}'s log-probs on the "
                f"student's top-K tokens, but only its own top-K was given; use objective.topk_support=target"
            )
        if scores.topk_logprobs is None or scores.topk_logprobs.shape[-1] < objective.config.top_k:
            have = 0 if scores.topk_logprobs is None else scores.topk_logprobs.shape[-1]
            raise ValueError(
                f"the {label}'s scores hold its top-{have} but objective.top_k = {objective.config.top_k}; "
                "request at least that many log-probs or lower objective.top_k"
            )


def _check_heads(student: Head, completion_ids_BT: Tensor, mask_BT: Tensor, heads: dict[str, Head | None]) -> None:
    if completion_ids_BT.shape != student.hidden.shape[:2] or mask_BT.shape != completion_ids_BT.shape:
        raise ValueError(
            f"sequence lengths differ: student hidden states {tuple(student.hidden.shape[:2])}, completion ids "
            f"{tuple(completion_ids_BT.shape)}, mask {tuple(mask_BT.shape)}; all must be [B, T] over the same "
            "completion tokens"
        )
    if student.hidden.shape[-1] != student.weight.shape[1]:
        raise ValueError(
            f"the student's hidden size {student.hidden.shape[-1]} does not match its head {tuple(student.weight.shape)}"
        )
    labels = {"self": "privileged student", "teacher": "teacher"}
    for name, head in heads.items():
        if head is None:
            continue
        if head.hidden.shape[:2] != student.hidden.shape[:2]:
            raise ValueError(
                f"sequence lengths differ: the student has {tuple(student.hidden.shape[:2])} completion positions "
                f"but the {labels[name]} has {tuple(head.hidden.shape[:2])}; align the passes by the completion tokens"
            )
        if head.vocab_size != student.vocab_size:
            raise ValueError(
                f"vocabulary sizes differ: the student's head has {student.vocab_size} rows and the {labels[name]}'s "
                f"has {head.vocab_size}; the student and teacher must share one tokenizer (slice embeddings padded "
                "beyond the tokenizer to a common size)"
            )
        if head.hidden.shape[-1] != head.weight.shape[1]:
            raise ValueError(
                f"the {labels[name]}'s hidden size {head.hidden.shape[-1]} does not match its head "
                f"{tuple(head.weight.shape)}"
            )
