"""Divergences between a student and a target distribution, as pure tensor functions (docs/method.md, "Routing").

Every function takes log-probabilities over a last axis (the vocabulary, or a Top-K support) and returns one
value per token, i.e. the input shape without its last axis. Work is done in at least float32 whatever the input
dtype (float64 stays float64, for gradient checks). Entries that are `-inf` are zero-probability entries: they
contribute nothing to a sum over the entries where the first argument of a KL has mass, and never produce NaN.
Nothing here masks padding tokens or averages: that is `objectives.py`'s job, so that the per-token values can be
routed, weighted and averaged per sequence.

Conventions (`s` = the deployed student, the only distribution that carries gradient; `t` = the target):
- `reverse_kl(s, t) = KL(s‖t) = Σ s (log s − log t)`, `forward_kl(s, t) = KL(t‖s)`.
- `generalized_jsd(s, t, beta) = β KL(t‖m) + (1−β) KL(s‖m)` with `m = β t + (1−β) s`; `beta = 0.5` is the
  Jensen-Shannon divergence `js`; the end points follow GKD: `beta = 0` is forward KL, `beta = 1` reverse KL.
- Top-K: the divergence on a support of K tokens (the target's top-K by default), both distributions
  renormalized over it, or kept as they are with one extra "tail" entry holding the mass outside the support.
- Sampled token: a single-sample estimate on the sampled token `y ~ s` (see `sampled_token_divergence`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Divergence = Literal["reverse_kl", "forward_kl", "js", "jsd"]
DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js", "jsd")
TopKSupport = Literal["target", "student", "union"]
TOPK_SUPPORTS: tuple[str, ...] = ("target", "student", "union")
TopKTail = Literal["renormalize", "bucket"]
TOPK_TAILS: tuple[str, ...] = ("renormalize", "bucket")

# Smallest tail mass kept by the tail bucket: a support that covers the whole distribution leaves a tail of
# (numerically) zero, whose log would be -inf with an infinite gradient for the student.
_TAIL_FLOOR = 1e-30


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(*tensors: Tensor) -> list[Tensor]:
    dtype = accumulation_dtype(tensors[0].dtype)
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, accumulation_dtype(tensor.dtype))
    return [tensor.to(dtype) for tensor in tensors]


def _check_pair(student_logprobs: Tensor, target_logprobs: Tensor) -> None:
    if student_logprobs.shape != target_logprobs.shape:
        raise ValueError(
            f"student log-probs have shape {tuple(student_logprobs.shape)} but target log-probs have shape "
            f"{tuple(target_logprobs.shape)}; both must be [..., V] over the same vocabulary"
        )


def kl_divergence(p_logprobs: Tensor, q_logprobs: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """`KL(p‖q) = Σ p (log p − log q)` over the last axis; entries where `p = 0` or `support_mask` is False add 0.

    Shapes: `p_logprobs`, `q_logprobs`: [..., V]; `support_mask`: [..., V] bool or None. Returns [...].
    """
    p_logprobs, q_logprobs = _upcast(p_logprobs, q_logprobs)
    keep = torch.isfinite(p_logprobs)
    if support_mask is not None:
        keep = keep & support_mask
    # Replace dropped entries before any arithmetic: a NaN in the unselected branch of `where` poisons gradients.
    p_safe = torch.where(keep, p_logprobs, torch.zeros_like(p_logprobs))
    q_safe = torch.where(keep, q_logprobs, torch.zeros_like(q_logprobs))
    terms = torch.exp(p_safe) * (p_safe - q_safe)
    return torch.where(keep, terms, torch.zeros_like(terms)).sum(-1)


def reverse_kl(student_logprobs: Tensor, target_logprobs: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """`KL(s‖t)`, mode-seeking. Shapes: [..., V] -> [...]."""
    _check_pair(student_logprobs, target_logprobs)
    return kl_divergence(student_logprobs, target_logprobs, support_mask)


def forward_kl(student_logprobs: Tensor, target_logprobs: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """`KL(t‖s)`, mass-covering. Shapes: [..., V] -> [...]."""
    _check_pair(student_logprobs, target_logprobs)
    return kl_divergence(target_logprobs, student_logprobs, support_mask)


def generalized_jsd(
    student_logprobs: Tensor, target_logprobs: Tensor, beta: float = 0.5, support_mask: Tensor | None = None
) -> Tensor:
    """Generalized Jensen-Shannon divergence with mixture `m = β t + (1−β) s` (GKD's convention).

    `β KL(t‖m) + (1−β) KL(s‖m)`, bounded by the entropy of the Bernoulli(β), so `≤ log 2` at β = 0.5.
    Shapes: [..., V] -> [...].
    """
    _check_pair(student_logprobs, target_logprobs)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logprobs, target_logprobs, support_mask)
    if beta == 1.0:
        return reverse_kl(student_logprobs, target_logprobs, support_mask)
    student_logprobs, target_logprobs = _upcast(student_logprobs, target_logprobs)
    # Where both are -inf the mixture is -inf, but logaddexp's gradient there is NaN (0/NaN), which a later
    # renormalization (Top-K union) spreads to every entry: compute it on finite stand-ins and put -inf back.
    empty = ~(torch.isfinite(student_logprobs) | torch.isfinite(target_logprobs))
    mixture = torch.logaddexp(
        target_logprobs.masked_fill(empty, 0.0) + math.log(beta),
        student_logprobs.masked_fill(empty, 0.0) + math.log1p(-beta),
    ).masked_fill(empty, float("-inf"))
    return beta * kl_divergence(target_logprobs, mixture, support_mask) + (1.0 - beta) * kl_divergence(
        student_logprobs, mixture, support_mask
    )


def js(student_logprobs: Tensor, target_logprobs: Tensor, support_mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence (½/½ mixture), symmetric and `≤ log 2`. Shapes: [..., V] -> [...]."""
    return generalized_jsd(student_logprobs, target_logprobs, 0.5, support_mask)


def divergence(
    name: str,
    student_logprobs: Tensor,
    target_logprobs: Tensor,
    beta: float = 0.5,
    support_mask: Tensor | None = None,
) -> Tensor:
    """The divergence called `name` (one of `DIVERGENCES`); `beta` is used by `jsd` only."""
    if name == "reverse_kl":
        return reverse_kl(student_logprobs, target_logprobs, support_mask)
    if name == "forward_kl":
        return forward_kl(student_logprobs, target_logprobs, support_mask)
    if name == "js":
        return js(student_logprobs, target_logprobs, support_mask)
    if name == "jsd":
        return generalized_jsd(student_logprobs, target_logprobs, beta, support_mask)
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")


# ---------------------------------------------------------------------------------------------------- Top-K


def topk_support(
    student_logprobs: Tensor,
    target_logprobs: Tensor | None,
    k: int,
    support: str = "target",
    target_topk_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token ids of the Top-K support and a mask of which of them count (the union has duplicates masked).

    Shapes: log-probs [..., V]; returns `ids` [..., K] (target/student) or [..., 2K] (union) and `mask` of the
    same shape. `target_topk_ids` [..., K] may be given instead of `target_logprobs` (the chunked path keeps the
    target's top-K ids and not its full distribution).
    """
    vocab_size = student_logprobs.shape[-1]
    if k < 1 or k > vocab_size:
        raise ValueError(f"top_k = {k} must be between 1 and the vocabulary size {vocab_size}")
    if support not in TOPK_SUPPORTS:
        raise ValueError(f"unknown Top-K support {support!r}; known: {', '.join(TOPK_SUPPORTS)}")

    def target_ids() -> Tensor:
        if target_topk_ids is not None:
            return target_topk_ids[..., :k]
        assert target_logprobs is not None
        return target_logprobs.topk(k, dim=-1).indices

    if support == "target":
        ids = target_ids()
        return ids, torch.ones_like(ids, dtype=torch.bool)
    student_ids = student_logprobs.detach().topk(k, dim=-1).indices
    if support == "student":
        return student_ids, torch.ones_like(student_ids, dtype=torch.bool)
    teacher_ids = target_ids()
    duplicate = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1)
    ids = torch.cat([teacher_ids, student_ids], dim=-1)
    mask = torch.cat([torch.ones_like(teacher_ids, dtype=torch.bool), ~duplicate], dim=-1)
    return ids, mask


def _log_tail(support_logprobs: Tensor, mask: Tensor) -> Tensor:
    """`log(1 − Σ_support p)` with the mass floored at `_TAIL_FLOOR` (so a full support gives a finite value)."""
    covered = torch.logsumexp(support_logprobs.masked_fill(~mask, float("-inf")), dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(covered)).clamp(min=_TAIL_FLOOR))


def restrict_to_support(
    student_logprobs: Tensor,
    target_support_logprobs: Tensor,
    ids: Tensor,
    mask: Tensor,
    tail: str = "renormalize",
) -> tuple[Tensor, Tensor, Tensor]:
    """Student and target log-probs on a support, renormalized or with a tail bucket appended.

    `student_logprobs` [..., V] is gathered at `ids` [..., K]; `target_support_logprobs` [..., K] are the target's
    log-probs at the same ids. Returns (student [..., K'], target [..., K'], mask [..., K']) with K' = K for
    "renormalize" and K + 1 for "bucket".
    """
    return restrict_gathered(student_logprobs.gather(-1, ids), target_support_logprobs, mask, tail)


def restrict_gathered(
    student_support_logprobs: Tensor, target_support_logprobs: Tensor, mask: Tensor, tail: str = "renormalize"
) -> tuple[Tensor, Tensor, Tensor]:
    """`restrict_to_support` from both distributions' log-probs already gathered on the support [..., K]."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"unknown Top-K tail {tail!r}; known: {', '.join(TOPK_TAILS)}")
    student_sub, target_sub = _upcast(student_support_logprobs, target_support_logprobs)
    if tail == "renormalize":
        student_sub = student_sub.masked_fill(~mask, float("-inf"))
        target_sub = target_sub.masked_fill(~mask, float("-inf"))
        return (
            student_sub - torch.logsumexp(student_sub, dim=-1, keepdim=True),
            target_sub - torch.logsumexp(target_sub, dim=-1, keepdim=True),
            mask,
        )
    student_tail = _log_tail(student_sub, mask).unsqueeze(-1)
    target_tail = _log_tail(target_sub, mask).unsqueeze(-1)
    student_sub = torch.cat([student_sub.masked_fill(~mask, float("-inf")), student_tail], dim=-1)
    target_sub = torch.cat([target_sub.masked_fill(~mask, float("-inf")), target_tail], dim=-1)
    return student_sub, target_sub, torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)


def topk_divergence(
    name: str,
    student_logprobs: Tensor,
    target_logprobs: Tensor,
    k: int,
    support: str = "target",
    tail: str = "renormalize",
    beta: float = 0.5,
) -> Tensor:
    """Divergence `name` on a Top-K support of the full distributions. Shapes: [..., V] -> [...].

    With `k = V`, `support="target"` and `tail="renormalize"` this equals the full-vocabulary divergence.
    """
    _check_pair(student_logprobs, target_logprobs)
    ids, mask = topk_support(student_logprobs, target_logprobs, k, support)
    student_sub, target_sub, mask = restrict_to_support(
        student_logprobs, target_logprobs.gather(-1, ids), ids, mask, tail
    )
    return divergence(name, student_sub, target_sub, beta, mask)


# ------------------------------------------------------------------------------------------- sampled token


def sampled_integrand(name: str, student_logprob: Tensor, target_logprob: Tensor, beta: float = 0.5) -> Tensor:
    """`g(y)` with `D(s, t) = E_{y~s}[g(y)]` for each divergence, from the two log-probs of the sampled token.

    reverse KL: `log s − log t`; forward KL: `(t/s) log(t/s)`; generalized JSD(β):
    `β (t/s) log(t/m) + (1−β) log(s/m)`, `m = β t + (1−β) s`. Shapes: [...] -> [...].
    """
    student_logprob, target_logprob = _upcast(student_logprob, target_logprob)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return student_logprob - target_logprob
    ratio_log = target_logprob - student_logprob
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return torch.exp(ratio_log) * ratio_log
    if name not in ("js", "jsd"):
        raise ValueError(f"unknown divergence {name!r}; known: {', '.join(DIVERGENCES)}")
    b = 0.5 if name == "js" else beta
    mixture = torch.logaddexp(target_logprob + math.log(b), student_logprob + math.log1p(-b))
    return b * torch.exp(ratio_log) * (target_logprob - mixture) + (1.0 - b) * (student_logprob - mixture)


def sampled_token_divergence(name: str, student_logprob: Tensor, target_logprob: Tensor, beta: float = 0.5) -> Tensor:
    """Single-sample surrogate on the sampled token `y ~ s`: its value is `g(y)`, an unbiased estimate of the
    divergence, and its gradient is the estimator of `∇ E_s[g]`.

    The score-function part `g(y) ∇log s(y)` comes from `sg(g)·exp(log s − sg(log s))`. For reverse KL this is
    the whole estimator (the pathwise part `∇log s(y)` has zero mean and is left out), which makes
    `name="reverse_kl"` exactly vanilla OPD's per-token advantage `sg(log t − log s)` (Thinking Machines form).
    For the other divergences the pathwise part `∇g` does not vanish and is kept, as `g − sg(g)`.
    Gradient flows through `student_logprob` only. Shapes: [...] -> [...].
    """
    student_logprob, target_logprob = _upcast(student_logprob, target_logprob.detach())
    integrand = sampled_integrand(name, student_logprob, target_logprob, beta)
    ratio = torch.exp(student_logprob - student_logprob.detach())
    surrogate = integrand.detach() * ratio
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return surrogate
    return surrogate + integrand - integrand.detach()


def policy_gradient(student_logprob: Tensor, advantage: Tensor) -> Tensor:
    """The reward's term on the sampled token: `−sg(A)·exp(log s − sg(log s))`, whose value is `−A` and whose
    gradient is `−A ∇log s(y)` (REINFORCE with the advantage `A`). Beside OPD's sampled reverse KL, whose gradient
    is `(log s − log t) ∇log s`, the sum is OPD with `A` added to its per-token advantage `log t − log s`.
    Gradient flows through `student_logprob` only. Shapes: [...] -> [...]."""
    (student_logprob,) = _upcast(student_logprob)  # the advantage takes the student's precision
    advantage = advantage.detach().to(student_logprob.dtype)
    return -advantage * torch.exp(student_logprob - student_logprob.detach())


def negative_log_likelihood(student_logprob: Tensor) -> Tensor:
    """`−log s(y)` of tokens sampled from another model (supervised fine-tuning on its samples). Shapes: [...]."""
    (student_logprob,) = _upcast(student_logprob)
    return -student_logprob


def entropy(logprobs: Tensor) -> Tensor:
    """Shannon entropy `−Σ p log p` over the last axis, in nats. Shapes: [..., V] -> [...]."""
    (logprobs,) = _upcast(logprobs)
    # -inf entries become the most negative finite number: exp gives 0 and 0 × finite = 0, with no NaN and
    # fewer temporaries than masking (this runs on every scored token).
    safe = logprobs.clamp(min=torch.finfo(logprobs.dtype).min)
    return -(torch.exp(safe) * safe).sum(-1)
