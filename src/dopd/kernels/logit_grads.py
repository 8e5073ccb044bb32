"""Full-vocabulary divergences with their gradient with respect to the student's logits in closed form, computed
in place on buffers the caller owns (docs/method.md, "Routing").

Running autograd through a divergence over [rows, V] keeps a dozen [rows, V] intermediates alive (masks, `where`
copies, the mixture, saved tensors of every step), which at V = 151,936 is what the chunked loss's memory and time
went to. The gradients are short in closed form. With `s = softmax(z)` the student, `t` the target, both over
the vocabulary:

    reverse KL   D = Σ s (log s − log t)                  ∂D/∂z = s ⊙ (d − D),            d = log s − log t
    forward KL   D = Σ t (log t − log s)                  ∂D/∂z = s Σt − t
    JSD(β)       D = β KL(t‖m) + (1−β) KL(s‖m),           ∂D/∂z = (1−β) s ⊙ (r − Σ s r),  r = log s − log m
                 m = β t + (1−β) s

(JSD: ∂D/∂s_k = (1−β)(log s_k − log m_k), since the terms from ∂m/∂s add up to (1−β)(1 − m_k/m_k) = 0; then the
softmax Jacobian.) Each gradient is written as `q − scale · s`: `q` into one [R, V] buffer, `scale` one number per
row, so that several terms on the same rows, and the sparse Top-K and sampled-token terms, add up in one buffer.
Besides that buffer a term needs only a few rows of scratch (`row_sums`). `tests/test_logit_grads.py` checks
every form against autograd of `losses.divergence` and by `gradcheck`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..losses import accumulation_dtype

# A mixture below the smallest normal float32 would make log m = -inf and 0·inf = NaN; such entries carry
# (numerically) no mass in s or t, so flooring m changes nothing that is summed.
_TINY = torch.finfo(torch.float32).tiny

Scratch = Sequence[Tensor]  # two buffers of a few rows [K, V] (K ≥ 1)


def row_sums(count: int, scratch: Scratch, fill: Callable[[slice, list[Tensor]], Tensor]) -> Tensor:
    """Σ over the last axis of `fill(rows, buffers)` for `count` rows, a few rows at a time: `fill` writes a
    [k, V] product into the scratch buffers (cut to k rows) and returns it.

    `torch.bmm` would sum a row product without scratch, but it accumulates 151,936 float32 products with a
    relative error of about 3e-4; a product then `sum` (pairwise) stays near 1e-7."""
    out = scratch[0].new_empty(count)
    step = scratch[0].shape[0]
    for start in range(0, count, step):
        rows = slice(start, min(start + step, count))
        out[rows] = fill(rows, [buffer[: rows.stop - start] for buffer in scratch]).sum(-1)
    return out


def rowdot(a_RV: Tensor, b_RV: Tensor, scratch: Scratch) -> Tensor:
    """Σ_v a b per row [R]."""
    return row_sums(a_RV.shape[0], scratch, lambda rows, s: torch.mul(a_RV[rows], b_RV[rows], out=s[0]))


def log_softmax_(logits_RV: Tensor, probs_RV: Tensor) -> None:
    """`logits_RV` becomes log-softmax in place and `probs_RV` its softmax (no other [R, V] memory)."""
    # Shift by the maximum first, then subtract log Σ exp: adding the two first would round at the logits' scale.
    shifted = logits_RV.sub_(logits_RV.amax(-1, keepdim=True))
    total = torch.exp(shifted, out=probs_RV).sum(-1, keepdim=True)
    probs_RV.div_(total)
    shifted.sub_(total.log_())


def log_softmax_rows_(logits_RV: Tensor, scratch: Scratch) -> None:
    """`logits_RV` becomes log-softmax in place, with a few rows of scratch (when the probabilities are not needed)."""
    shifted = logits_RV.sub_(logits_RV.amax(-1, keepdim=True))
    total = row_sums(shifted.shape[0], scratch, lambda rows, s: torch.exp(shifted[rows], out=s[0]))
    shifted.sub_(total.log_().unsqueeze(-1))


def jsd_beta(name: str, beta: float) -> float:
    """The mixing β of a divergence name as `losses.divergence` reads it: reverse KL is β = 1, forward KL β = 0."""
    return {"reverse_kl": 1.0, "forward_kl": 0.0, "js": 0.5}.get(name, beta)


def full_divergence_(
    name: str,
    beta: float,
    coefficient_R: Tensor,
    student_logprobs_RV: Tensor,
    student_probs_RV: Tensor,
    target_logprobs_RV: Tensor,
    q_RV: Tensor,
    scratch: Scratch,
) -> tuple[Tensor, Tensor]:
    """`losses.divergence(name, student, target, beta)` per row, and its gradient with respect to the student's
    logits weighted by `coefficient_R`: returns (values [R], scale [R]) and writes `q_RV`, the gradient of
    Σ coefficient·value being `q − scale ⊙ student_probs`.

    The student's and the target's log-probs and the probs are read only; the scratch rows are overwritten.
    """
    beta = jsd_beta(name, beta)
    coefficient = coefficient_R.to(q_RV.dtype).unsqueeze(-1)
    args = (coefficient, student_logprobs_RV, student_probs_RV, target_logprobs_RV, q_RV, scratch)
    if beta == 1.0:
        return _reverse_kl_(*args)
    if beta == 0.0:
        return _forward_kl_(*args)
    return _jsd_(beta, *args)


def _reverse_kl_(coefficient, student_lp, student_p, target_lp, q, scratch):
    weighted_difference = torch.sub(student_lp, target_lp, out=q).mul_(student_p)  # s (log s − log t)
    values = weighted_difference.sum(-1)
    weighted_difference.mul_(coefficient)
    return values, coefficient.squeeze(-1) * values


def _forward_kl_(coefficient, student_lp, student_p, target_lp, q, scratch):
    values = row_sums(  # Σ t (log t − log s)
        q.shape[0],
        scratch,
        lambda rows, s: torch.exp(target_lp[rows], out=s[0]).mul_(
            torch.sub(target_lp[rows], student_lp[rows], out=s[1])
        ),
    )
    target_p = torch.exp(target_lp, out=q)
    target_mass = target_p.sum(-1)
    target_p.mul_(-coefficient)
    return values, -coefficient.squeeze(-1) * target_mass


def _jsd_(beta, coefficient, student_lp, student_p, target_lp, q, scratch):
    # log m from the probabilities, floored (see _TINY): no [R, V] temporary, unlike logaddexp of shifted inputs.
    log_m = torch.exp(target_lp, out=q).mul_(beta).add_(student_p, alpha=1.0 - beta).clamp_(min=_TINY).log_()
    target_part = row_sums(  # Σ t log t/m
        q.shape[0],
        scratch,
        lambda rows, s: torch.exp(target_lp[rows], out=s[0]).mul_(torch.sub(target_lp[rows], log_m[rows], out=s[1])),
    )
    student_terms = torch.sub(student_lp, log_m, out=q).mul_(student_p)  # s log s/m; log m is not needed after
    student_part = student_terms.sum(-1)
    student_terms.mul_(coefficient * (1.0 - beta))
    values = beta * target_part + (1.0 - beta) * student_part
    return values, coefficient.squeeze(-1) * ((1.0 - beta) * student_part)


def support_divergence(
    name: str, beta: float, coefficient_R: Tensor, student_support_RK: Tensor, target_support_RK: Tensor
) -> tuple[Tensor, Tensor]:
    """A Top-K divergence with both distributions renormalized over a support of K entries (none masked): the
    values [R] and the gradient of Σ coefficient·value with respect to the student's log-probs on the support
    [R, K]. Renormalizing is a log-softmax over the K entries, so the closed forms above apply with the
    student's support log-probs as its logits."""
    dtype = torch.promote_types(accumulation_dtype(student_support_RK.dtype), target_support_RK.dtype)
    # [R, K] is small: fused log-softmax (one op) beats the in-place one meant for [R, V].
    student = torch.log_softmax(student_support_RK.to(dtype), -1)
    target = torch.log_softmax(target_support_RK.to(dtype), -1)
    student_p, grad = student.exp(), torch.empty_like(student)
    scratch = (torch.empty_like(student), torch.empty_like(student))
    values, scale = full_divergence_(name, beta, coefficient_R, student, student_p, target, grad, scratch)
    return values, grad.addcmul_(student_p, scale.unsqueeze(-1), value=-1.0)
