"""The per-token machinery of every objective: which terms apply to each token and with what coefficient
(routing a batch), each term's value, the weighted token loss, and the metrics of one call (docs/method.md,
"Routing").

An objective is a list of `objectives.Term`s: a target (the privileged `teacher` or the privileged student
`self`), a divergence, a granularity (the `sampled` token, `topk`, the `full` vocabulary), a weight, and the tokens
it applies to (a DOPD regime, every token, or, for EOPD, the tokens where the teacher's entropy is high). The
per-token loss is the sum of the terms that apply to the token; the loss averages it over each sequence's tokens
(`1/|y|`) and then over sequences.

Both forms of the objective import this module: the plain form from full logits (`plain.py`) and the chunked
kernel from hidden states and heads (`kernels/chunked.py`). Shape letters: `types.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import losses, routing
from .objectives import ALL_TOKENS, HIGH_TEACHER_ENTROPY, REWARD_TARGET, Objective, Term
from .routing import REGIMES, Gather, Thresholds
from .types import TargetScores


@dataclass(frozen=True)
class Cuts:
    """What the tokens of a scope decide together, computed once over the scope (one loss call, or a whole step
    over every process, so that its micro-batches and processes decide alike) and then read token by token."""

    routing: Thresholds | None = None  # DOPD's thresholds and the gap-drop cut-offs (None: no gap is read)
    teacher_entropy: float | None = None  # EOPD: its high-entropy term applies at or above it (None: no such term)


@dataclass(frozen=True)
class LossScope:
    """What one loss call needs to know beyond its own tokens (the trainer's is the step's: `Trainer.update`)."""

    cuts: Cuts | None = None  # the cuts of a larger scope (the step); None: computed over this call's tokens
    num_sequences: int | None = None  # sequences the loss is averaged over (None: this call's); accumulation
    gather: Gather | None = None  # all-gather over processes, for cuts computed here
    generator: torch.Generator | None = None  # token dropping at random (None: torch's global generator)
    eos_ids: tuple[int, ...] = ()  # end-of-sequence ids: the student's probability of them is a metric


# A call on its own: cuts over its tokens, the mean over its sequences, this process only, no end-of-sequence
# metric. The default scope of both forms.
SINGLE_CALL = LossScope()


# ------------------------------------------------------------------------------------------------- scores


def compute_cuts(
    objective: Objective,
    self_scores: TargetScores | None,
    teacher_scores: TargetScores | None,
    mask: Tensor,
    gather: Gather | None = None,
) -> Cuts:
    """The cuts of one scope from the scores of its tokens (each None where the objective does not read it)."""
    c = objective.config
    needs_gap = objective.uses_routing or (c.drop_fraction > 0 and c.drop_mode in ("lowest_gap", "highest_gap"))
    thresholds = teacher_entropy = None
    if needs_gap:
        assert self_scores is not None and teacher_scores is not None
        thresholds = routing.compute_thresholds(
            self_scores.token_logprobs,
            teacher_scores.token_logprobs,
            mask,
            trim=c.trim,
            normalization=c.normalization,
            gather=gather,
            drop_fraction=c.drop_fraction,
            drop_mode=c.drop_mode,
        )
    if objective.teacher_entropy_quantile is not None:
        assert teacher_scores is not None
        entropy = (gather or (lambda x: x))(teacher_scores.entropy.detach()[mask.bool()].double())
        quantile = objective.teacher_entropy_quantile
        teacher_entropy = float(torch.quantile(entropy, quantile)) if entropy.numel() else 0.0
    return Cuts(thresholds, teacher_entropy)


def step_cuts(objective: Objective, batches: list, gather: Gather | None) -> Cuts:
    """The cuts of a whole step from its scored micro-batches (`types.MicroBatch`): the valid tokens' scores of
    every micro-batch, then of every process through `gather` (none here: this process's share is empty)."""

    def flat(name: str) -> TargetScores | None:
        parts = [getattr(b, f"{name}_scores") for b in batches]
        if not parts:  # no micro-batch here (one teacher's rows on another process): no tokens, for the gather
            needed = objective.needs_self if name == "self" else objective.needs_teacher
            empty = torch.zeros(0)
            return TargetScores(empty, empty) if needed else None
        if parts[0] is None:
            return None
        masks = [b.completions.mask.bool().to(p.token_logprobs.device) for b, p in zip(batches, parts)]
        return TargetScores(
            torch.cat([p.token_logprobs[m] for p, m in zip(parts, masks)]),
            torch.cat([p.entropy[m] for p, m in zip(parts, masks)]),
        )

    self_flat, teacher_flat = flat("self"), flat("teacher")
    reference = self_flat or teacher_flat
    if reference is None:  # a method that reads no scorer (sft) cuts nothing
        return Cuts()
    mask = torch.ones_like(reference.token_logprobs, dtype=torch.bool)
    return compute_cuts(objective, self_flat, teacher_flat, mask, gather)


def with_reward(objective: Objective, scores: dict[str, TargetScores], advantages_B: Tensor | None, mask_BT: Tensor):
    """`scores` with the reward's entry when the objective has a reward term: each token's "log-prob" is its
    sequence's advantage [B] (`rewards.group_advantages`), which the policy-gradient term reads."""
    if not objective.has_reward:
        return scores
    if advantages_B is None or tuple(advantages_B.shape) != (mask_BT.shape[0],):
        got = None if advantages_B is None else tuple(advantages_B.shape)
        raise ValueError(
            f"objective.reward is set: the loss needs one advantage per sequence, shape ({mask_BT.shape[0]},), "
            f"not {got}; pass advantages_B (rewards.group_advantages)"
        )
    advantage = advantages_B.detach().to(device=mask_BT.device, dtype=torch.float64)[:, None].expand(mask_BT.shape)
    return {**scores, REWARD_TARGET: TargetScores(advantage, torch.zeros_like(advantage))}


# ---------------------------------------------------------------------------------------- token weights


@dataclass
class Routed:
    """Per-token routing of one call. Shapes: [B, T]; `coefficients`: [J, B, T] (one row per term)."""

    regime: Tensor | None
    gap: Tensor | None
    keep: Tensor
    coefficients: Tensor
    cuts: Cuts


def route(
    objective: Objective,
    mask_BT: Tensor,
    self_scores: TargetScores | None,
    teacher_scores: TargetScores | None,
    scope: LossScope,
) -> Routed:
    """Each term's coefficient for each token: weight × applies × kept × 1/(|y_b| · num_sequences)."""
    c = objective.config
    valid = mask_BT.bool()
    cuts = (
        scope.cuts
        if scope.cuts is not None
        else compute_cuts(objective, self_scores, teacher_scores, valid, scope.gather)
    )
    regime = gap = None
    if objective.uses_routing:
        regime = routing.assign_regimes(self_scores.token_logprobs, teacher_scores.token_logprobs, valid, cuts.routing)
    if self_scores is not None and teacher_scores is not None:
        gap = routing.privilege_gap(self_scores.token_logprobs, teacher_scores.token_logprobs).masked_fill(~valid, 0)
    keep = routing.drop_mask(
        None if self_scores is None else self_scores.token_logprobs,
        None if teacher_scores is None else teacher_scores.token_logprobs,
        valid,
        c.drop_fraction,
        c.drop_mode,
        cuts.routing,
        scope.generator,
    )
    lengths = valid.sum(-1, keepdim=True).clamp(min=1)
    sequences = scope.num_sequences if scope.num_sequences is not None else mask_BT.shape[0]
    per_token = keep.to(torch.float64) / (lengths.to(torch.float64) * max(sequences, 1))
    rows = []
    for term in objective.terms:
        if term.applies_to == ALL_TOKENS:
            applies = keep
        elif term.applies_to == HIGH_TEACHER_ENTROPY:
            applies = keep & (teacher_scores.entropy.double() >= cuts.teacher_entropy)
        else:
            applies = keep & (regime == REGIMES.index(term.applies_to))
        rows.append(term.weight * per_token * applies)
    return Routed(regime, gap, keep, torch.stack(rows), cuts)


# ------------------------------------------------------------------------------------------- term values

FullTarget = Callable[[str, Tensor], Tensor]


def term_values(
    objective: Objective,
    term: Term,
    student_logprobs_MV: Tensor,
    completion_ids_M: Tensor,
    target: TargetScores,
    full_target: FullTarget,
    rows: Tensor,
) -> Tensor:
    """One term's per-token value on the tokens `rows` [R] of a block of M tokens.

    `student_logprobs_MV` and `completion_ids_M` cover the whole block (rows are picked here, so a Top-K term
    copies [R, K] student entries, not [R, V]); `target` holds the R tokens' scores; `full_target(name, rows)`
    gives the target's full log-probs [R, V] (only called when the term needs them). Returns [R]."""
    if term.granularity == "sampled":
        student_token = student_logprobs_MV[rows, completion_ids_M[rows]]
        return sampled_values(objective, term, student_token, target)
    if term.granularity == "full":
        student = student_logprobs_MV[rows]
        return losses.divergence(term.divergence, student, full_target(term.target, rows), objective.config.jsd_beta)
    ids, support_mask, target_support = topk_inputs(
        objective, target, lambda: full_target(term.target, rows), lambda: student_logprobs_MV[rows]
    )
    return topk_values(objective, term, student_logprobs_MV[rows.unsqueeze(-1), ids], target_support, support_mask)


def sampled_values(objective: Objective, term: Term, student_token_logprobs_R: Tensor, target: TargetScores) -> Tensor:
    """A sampled-token term from the student's log-probs of the R sampled tokens [R]. Returns [R]."""
    if term.divergence == "nll":  # supervised: the tokens were sampled by the teacher, no target is read
        return losses.negative_log_likelihood(student_token_logprobs_R)
    if term.divergence == "policy_gradient":  # the reward: the target's "log-probs" are the sequence's advantage
        return losses.policy_gradient(student_token_logprobs_R, target.token_logprobs)
    return losses.sampled_token_divergence(
        term.divergence, student_token_logprobs_R, target.token_logprobs, objective.config.jsd_beta
    )


def topk_inputs(
    objective: Objective, target: TargetScores, full_target_RV: Callable[[], Tensor], student_RV: Callable[[], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The Top-K support of R tokens: (ids [R, K'], mask [R, K'], the target's log-probs there [R, K']).

    It comes from the target's kept top-K when the support is the target's and the scores hold it; otherwise
    from the full log-probs `full_target_RV()` (and the student's `student_RV()`, read only to pick its top-K)."""
    c = objective.config
    if c.topk_support == "target" and target.topk_logprobs is not None:
        ids = target.topk_ids[..., : c.top_k]
        return ids, torch.ones_like(ids, dtype=torch.bool), target.topk_logprobs[..., : c.top_k]
    full = full_target_RV()
    student_rows = full if c.topk_support == "target" else student_RV()  # read only for its top-K
    ids, support_mask = losses.topk_support(student_rows, full, c.top_k, c.topk_support)
    return ids, support_mask, full.gather(-1, ids)


def topk_values(
    objective: Objective, term: Term, student_support_RK: Tensor, target_support_RK: Tensor, support_mask_RK: Tensor
) -> Tensor:
    """A Top-K term from both distributions' log-probs on the support [R, K'] (renormalized or with a tail
    bucket here). Gradient flows through `student_support_RK` only. Returns [R]."""
    c = objective.config
    student_sub, target_sub, support_mask = losses.restrict_gathered(
        student_support_RK, target_support_RK, support_mask_RK, term.tail or c.topk_tail
    )
    return losses.divergence(term.divergence, student_sub, target_sub, c.jsd_beta, support_mask)


def weighted_token_loss(
    objective: Objective,
    coefficients_JM: Tensor,
    student_logprobs_MV: Tensor,
    completion_ids_M: Tensor,
    targets: dict[str, TargetScores],
    full_target: FullTarget,
) -> tuple[Tensor, Tensor]:
    """Σ_terms coefficient × value per token, each term evaluated on the tokens where its coefficient is not 0.

    Returns (the loss contribution per token [M], with the 1/(|y|·sequences) factors, and the token loss [M]:
    the sum of the applicable terms' weighted values, without those factors, detached, for token-level views).
    """
    dtype = losses.accumulation_dtype(student_logprobs_MV.dtype)
    coefficients_JM = coefficients_JM.to(dtype)
    contribution = torch.zeros(coefficients_JM.shape[-1], dtype=dtype, device=student_logprobs_MV.device)
    token_loss = torch.zeros_like(contribution)
    for term, coefficient in zip(objective.terms, coefficients_JM):
        rows = coefficient.nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        target = targets.get(term.target)  # None for a term that reads no scorer (sft)
        target = None if target is None else target.rows(rows)
        values = term_values(objective, term, student_logprobs_MV, completion_ids_M, target, full_target, rows)
        contribution = contribution.index_add(0, rows, values * coefficient[rows])
        token_loss = token_loss.index_add(0, rows, values.detach() * term.weight)
    return contribution, token_loss


# ------------------------------------------------------------------------------------------------ output


@dataclass
class ObjectiveOutput:
    """The loss (a scalar with gradient), metrics (detached 0-dim tensors) and per-token views [B, T]."""

    loss: Tensor
    metrics: dict[str, Tensor]
    token_loss: Tensor  # Σ of the terms applied to each token, weights included, not length-normalized
    regime: Tensor | None
    gap: Tensor | None
    thresholds: Thresholds | None  # DOPD's routing thresholds (None when the objective reads no gap)


def summarize(
    objective: Objective,
    loss: Tensor,
    token_loss_BT: Tensor,
    routed: Routed,
    mask_BT: Tensor,
    entropies: dict[str, Tensor],
    student_token_logprobs_BT: Tensor,
    teacher_token_logprobs_BT: Tensor | None,
    student_eos_prob_BT: Tensor | None = None,
) -> dict[str, Tensor]:
    """The metrics of one call: loss, per-regime fractions and mean losses, gap statistics, entropies and the
    deployed student's probability of end-of-sequence (a collapse sign: `diagnostics.py`)."""
    valid = mask_BT.bool()
    count = valid.sum().clamp(min=1)

    def mean(values: Tensor, where: Tensor) -> Tensor:
        return (values.double() * where).sum() / where.sum().clamp(min=1)

    metrics = {"loss": loss.detach(), "tokens": valid.sum().double(), "kept_fraction": routed.keep.sum() / count}
    for name, values in entropies.items():
        metrics[f"entropy/{name}"] = mean(values, valid)
    if student_eos_prob_BT is not None:
        metrics["eos_prob/student"] = mean(student_eos_prob_BT, valid)
    if teacher_token_logprobs_BT is not None:
        metrics["sampled_kl/teacher"] = mean(student_token_logprobs_BT - teacher_token_logprobs_BT, valid)
    if routed.gap is not None:
        metrics["gap/mean"] = mean(routed.gap, valid)
    if routed.cuts.routing is not None and routed.regime is not None:
        for key, value in routed.cuts.routing.as_metrics().items():
            metrics[key] = torch.tensor(value, dtype=torch.float64)
    if routed.regime is not None:
        metrics.update({k: v.double() for k, v in routing.regime_fractions(routed.regime).items()})
        for code, name in enumerate(REGIMES):
            metrics[f"loss/{name}"] = mean(token_loss_BT, routed.regime == code)
    return metrics


# The vocabulary sizes in the words of each form: the plain form's logits, the chunked form's heads.
_SIZES = {
    "logits": "the student has {} and the {} has {}",
    "hidden states": "the student's head has {} rows and the {}'s has {}",
}


def check_alignment(student: str, student_BTV: tuple, ids_BT: Tensor, mask_BT: Tensor, others: dict) -> None:
    """Every pass covers the same completion tokens and scores the same vocabulary. Shapes as (B, T, V): `student`
    names what `student_BTV` is the shape of (logits, hidden states); `others` maps a pass's label to its shape."""
    if tuple(ids_BT.shape) != tuple(student_BTV[:2]) or mask_BT.shape != ids_BT.shape:
        raise ValueError(
            f"sequence lengths differ: student {student} {tuple(student_BTV[:2])}, completion ids "
            f"{tuple(ids_BT.shape)}, mask {tuple(mask_BT.shape)}; all must be [B, T] over the same completion tokens"
        )
    for label, shape in others.items():
        if tuple(shape[:2]) != tuple(student_BTV[:2]):
            raise ValueError(
                f"sequence lengths differ: the student has {tuple(student_BTV[:2])} completion positions but the "
                f"{label} has {tuple(shape[:2])}; align the passes by the completion tokens"
            )
        if shape[-1] != student_BTV[-1]:
            raise ValueError(
                f"vocabulary sizes differ: {_SIZES[student].format(student_BTV[-1], label, shape[-1])}; the student "
                "and teacher must share one tokenizer (slice embeddings padded beyond the tokenizer to a common size)"
            )


def eos_probability(student_logprobs_MV: Tensor, eos_ids: tuple[int, ...]) -> Tensor | None:
    """The student's probability of ending the sequence at each token, Σ over the end-of-sequence ids [M]."""
    ids = [i for i in eos_ids if 0 <= i < student_logprobs_MV.shape[-1]]
    if not ids:
        return None
    return student_logprobs_MV.detach()[..., ids].exp().sum(-1)
