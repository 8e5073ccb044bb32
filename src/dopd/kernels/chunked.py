"""The objective from hidden states and output heads, a bounded number of tokens at a time (design, "kernels/").

At Qwen3 scale (vocabulary 151,936) the full logits of three passes over a thousand completion tokens take
gigabytes. This form never holds more than one chunk of full-vocabulary rows:

1. scores (no gradient): for the privileged student and the teacher, chunk by chunk, the sampled token's
   log-prob, the entropy and the top-K (what routing and the Top-K terms read). The trainer may compute these per
   micro-batch and route the whole batch at once (`TargetScores`, `compute_batch_thresholds`).
2. routing, exactly as the plain form (`objectives.route`).
3. loss and gradients: chunk by chunk, the student's log-probs with gradient, the per-token terms, and the
   gradient with respect to the chunk's logits, folded at once into the gradients of the hidden states and the
   head (`grad_W += G^T h`), so no graph outlives its chunk. A target's full log-probs are recomputed only for the
   tokens whose term needs them (the HT tokens in DOPD: the Top-K terms read the kept top-K).

The result equals `objectives.compute_objective` on the full logits, value and gradient (tested in fp32 within
1e-5 relative for every method).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import losses
from ..objectives import (
    Objective,
    ObjectiveOutput,
    TargetScores,
    check_top_k,
    route,
    summarize,
    weighted_token_loss,
)
from ..routing import Gather, Thresholds

# Elements of one [chunk, V] float32 tensor in the default chunk (16 MiB); about a dozen such tensors are alive.
_DEFAULT_CHUNK_ELEMENTS = 1 << 22


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
    return max(1, _DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _logits(hidden_NH: Tensor, weight_VH: Tensor, bias_V: Tensor | None, temperature: float) -> Tensor:
    logits = hidden_NH @ weight_VH.T if bias_V is None else torch.addmm(bias_V, hidden_NH, weight_VH.T)
    logits = logits.to(losses.accumulation_dtype(logits.dtype))
    return logits / temperature if temperature != 1.0 else logits


@torch.no_grad()
def score_target(
    head: Head,
    completion_ids_BT: Tensor,
    mask_BT: Tensor,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TargetScores:
    """A no-gradient pass's `TargetScores` ([B, T], zeros at padding), computed chunk by chunk."""
    valid = mask_BT.bool()
    hidden = head.hidden.detach()[valid]
    ids = completion_ids_BT[valid]
    chunk = chunk_size or default_chunk_size(head.vocab_size)
    dtype = losses.accumulation_dtype(head.weight.dtype)
    count = hidden.shape[0]
    # Results go straight into preallocated outputs: small tensors kept alive between chunks would pin the heap
    # that the large per-chunk temporaries are freed into, and the process would keep that memory.
    token = torch.zeros(count, dtype=dtype, device=hidden.device)
    ent = torch.zeros_like(token)
    topk_values = torch.zeros(count, top_k or 0, dtype=dtype, device=hidden.device)
    topk_ids = torch.zeros(count, top_k or 0, dtype=torch.long, device=hidden.device)
    for start in range(0, count, chunk):
        rows = slice(start, min(start + chunk, count))
        logprobs = torch.log_softmax(_logits(hidden[rows], head.weight, head.bias, temperature), -1)
        token[rows] = logprobs.gather(-1, ids[rows, None]).squeeze(-1)
        ent[rows] = losses.entropy(logprobs)
        if top_k:
            torch.topk(logprobs, top_k, dim=-1, out=(topk_values[rows], topk_ids[rows]))
        del logprobs

    def scatter(values: Tensor) -> Tensor:
        out = torch.zeros(*valid.shape, *values.shape[1:], dtype=values.dtype, device=values.device)
        out[valid] = values
        return out

    return TargetScores(
        token_logprobs=scatter(token),
        entropy=scatter(ent),
        topk_logprobs=scatter(topk_values) if top_k else None,
        topk_ids=scatter(topk_ids) if top_k else None,
    )


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
        grad_hidden = torch.zeros_like(hidden_NH)
        grad_weight = torch.zeros_like(weight_VH) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias_V) if bias_V is not None and ctx.needs_input_grad[2] else None
        loss = run(hidden_NH.detach(), weight_VH.detach(), None if bias_V is None else bias_V.detach(),
                   grad_hidden, grad_weight, grad_bias)
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
    for name, label, needed in (
        ("self", "privileged student", objective.needs_self),
        ("teacher", "teacher", objective.needs_teacher),
    ):
        if needed and heads[name] is None:
            raise ValueError(f"method {objective.config.method!r} needs the {label}'s hidden states and head")
    _check_heads(student, completion_ids_BT, mask_BT, heads)
    check_top_k(objective, student.vocab_size)
    c = objective.config
    chunk = chunk_size or default_chunk_size(student.vocab_size)
    scores: dict[str, TargetScores] = {}
    for name, head in heads.items():
        if head is not None:
            scores[name] = given[name] or score_target(
                head, completion_ids_BT, mask_BT, objective.top_k_for(name), c.temperature, chunk
            )
    routed = route(
        objective, mask_BT, scores.get("self"), scores.get("teacher"), thresholds, num_sequences, gather, generator
    )
    valid = mask_BT.bool()
    coefficients_JN = routed.coefficients[:, valid]
    flat_scores = {name: s.flat(valid) for name, s in scores.items()}
    # Tokens that need the same targets' full distributions are put next to each other, so the recomputed
    # target logits come in full chunks (a few scattered HT tokens per chunk make slow matmuls); the loss is a
    # sum over tokens, so their order does not change it.
    order = _group_by_full_targets(objective, coefficients_JN, flat_scores)
    coefficients_JN = coefficients_JN[:, order]
    flat_scores = {name: s.rows(order) for name, s in flat_scores.items()}
    ids_N = completion_ids_BT[valid][order]
    target_hidden = {name: h.hidden.detach()[valid][order] for name, h in heads.items() if h is not None}
    num_tokens = ids_N.shape[0]
    dtype = losses.accumulation_dtype(student.weight.dtype)
    plain_N = torch.zeros(num_tokens, dtype=dtype, device=ids_N.device)
    token_lp_N = torch.zeros_like(plain_N)
    entropy_N = torch.zeros_like(plain_N)

    def run(hidden_NH, weight_VH, bias_V, grad_hidden, grad_weight, grad_bias) -> Tensor:
        total = torch.zeros((), dtype=dtype, device=hidden_NH.device)
        for start in range(0, num_tokens, chunk):
            rows = slice(start, min(start + chunk, num_tokens))
            coefficients = coefficients_JN[:, rows]
            full = _full_targets(objective, coefficients, flat_scores, target_hidden, heads, rows, c.temperature)
            h = hidden_NH[rows]
            with torch.enable_grad():
                logits = _logits(h, weight_VH, bias_V, 1.0).requires_grad_()
                logprobs = torch.log_softmax(logits / c.temperature, dim=-1)
                contribution, plain = weighted_token_loss(
                    objective,
                    coefficients,
                    logprobs,
                    ids_N[rows],
                    {name: s.rows(rows) for name, s in flat_scores.items()},
                    lambda name, sub: full[name][0][full[name][1][sub]],
                )
                chunk_loss = contribution.sum()
                if chunk_loss.requires_grad:
                    (grad_logits,) = torch.autograd.grad(chunk_loss, logits)
                    grad_logits = grad_logits.to(weight_VH.dtype)
                    grad_hidden[rows] = grad_logits @ weight_VH
                    if grad_weight is not None:
                        grad_weight.addmm_(grad_logits.T, h)
                    if grad_bias is not None:
                        grad_bias.add_(grad_logits.sum(0))
            total = total + chunk_loss.detach()
            logprobs = logprobs.detach()
            plain_N[rows] = plain
            token_lp_N[rows] = logprobs.gather(-1, ids_N[rows, None]).squeeze(-1)
            entropy_N[rows] = losses.entropy(logprobs)
        return total

    student_hidden_N = student.hidden[valid][order]
    loss = _ChunkedLoss.apply(student_hidden_N, student.weight, student.bias, run)
    inverse = torch.argsort(order)

    def unflatten(values_N: Tensor) -> Tensor:
        return torch.zeros(mask_BT.shape, dtype=values_N.dtype, device=values_N.device).masked_scatter(
            valid, values_N[inverse]
        )

    token_loss_BT = unflatten(plain_N)
    entropies = {"student": unflatten(entropy_N)}
    entropies.update({name: s.entropy for name, s in scores.items()})
    metrics = summarize(
        objective,
        loss,
        token_loss_BT,
        routed,
        mask_BT,
        entropies,
        unflatten(token_lp_N),
        scores["teacher"].token_logprobs if "teacher" in scores else None,
    )
    return ObjectiveOutput(loss, metrics, token_loss_BT, routed.regime, routed.gap, routed.thresholds)


def _group_by_full_targets(objective: Objective, coefficients_JN: Tensor, flat_scores) -> Tensor:
    """A stable order of the tokens that groups them by which targets' full log-probs they need."""
    key = torch.zeros(coefficients_JN.shape[-1], dtype=torch.long, device=coefficients_JN.device)
    for term, coefficient in zip(objective.terms, coefficients_JN):
        if _needs_full(objective, term, flat_scores[term.target]):
            bit = 2 if term.target == "teacher" else 1
            key = key | ((coefficient != 0).long() * bit)
    return torch.argsort(-key, stable=True)


def _full_targets(objective, coefficients_JC, flat_scores, target_hidden, heads, rows: slice, temperature):
    """Full log-probs of each target for the chunk's tokens whose terms need them, computed once per chunk.

    Returns {target: (logprobs [R, V], position of each chunk row in it [C])}."""
    needed: dict[str, Tensor] = {}
    for term, coefficient in zip(objective.terms, coefficients_JC):
        if _needs_full(objective, term, flat_scores[term.target]):
            rows_needing = coefficient != 0
            needed[term.target] = needed.get(term.target, torch.zeros_like(rows_needing)) | rows_needing
    full = {}
    for name, need in needed.items():
        picked = need.nonzero().squeeze(-1)
        head = heads[name]
        hidden = target_hidden[name][rows][picked]
        with torch.no_grad():
            logprobs = torch.log_softmax(_logits(hidden, head.weight.detach(), _detach(head.bias), temperature), -1)
        position = torch.full_like(need, -1, dtype=torch.long)
        position[picked] = torch.arange(picked.numel(), device=picked.device)
        full[name] = (logprobs, position)
    return full


def _detach(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


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
