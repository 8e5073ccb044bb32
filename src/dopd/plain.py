"""The plain form of the objective: from the full logits of the three passes on the same completion tokens.

It holds [B, T, V] logits of every pass at once, which at Qwen3 scale takes gigabytes: training uses the chunked
kernel (`kernels/chunked.py`), which gives the same loss and gradients from hidden states and heads. This form is
the reference the kernel is tested against, and `train.loss_form=plain` trains with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import losses
from .objectives import TARGET_LABELS, Objective
from .terms import (
    SINGLE_CALL,
    LossScope,
    ObjectiveOutput,
    check_alignment,
    eos_probability,
    route,
    summarize,
    weighted_token_loss,
    with_reward,
)
from .types import TargetScores


def compute_objective(
    objective: Objective,
    student_logits_BTV: Tensor,
    completion_ids_BT: Tensor,
    mask_BT: Tensor,
    *,
    self_logits_BTV: Tensor | None = None,
    teacher_logits_BTV: Tensor | None = None,
    advantages_B: Tensor | None = None,
    scope: LossScope = SINGLE_CALL,
) -> ObjectiveOutput:
    """The plain form: the objective from full logits of the three passes on the same completion tokens.

    Shapes: logits [B, T, V] (position t scores completion token t), `completion_ids_BT` [B, T] int,
    `mask_BT` [B, T] (1 for completion tokens, 0 for padding). `scope` (`terms.LossScope`; default: this call on its
    own): the cuts (routing thresholds, EOPD's entropy cut) when the trainer routes a larger scope than this call
    (otherwise they are computed here, over processes with its `gather`), the number of sequences the loss is
    averaged over (default B; the trainer passes the step's count so that gradient accumulation gives the mean over
    the whole batch), the token-dropping generator and the end-of-sequence ids. `advantages_B` [B]: each
    sequence's reward advantage, needed when `objective.reward` is set (`rewards.group_advantages`).
    """
    others = {"self": self_logits_BTV, "teacher": teacher_logits_BTV}
    for name, needed in (("self", objective.needs_self), ("teacher", objective.needs_teacher)):
        if needed and others[name] is None:
            raise ValueError(f"method {objective.config.method!r} needs the {TARGET_LABELS[name]}'s logits")
    shapes = {TARGET_LABELS[name]: tuple(logits.shape) for name, logits in others.items() if logits is not None}
    check_alignment("logits", tuple(student_logits_BTV.shape), completion_ids_BT, mask_BT, shapes)
    objective.check_top_k(student_logits_BTV.shape[-1])
    temperature = objective.config.temperature
    dtype = losses.accumulation_dtype(student_logits_BTV.dtype)
    student_lp = torch.log_softmax(student_logits_BTV.to(dtype) / temperature, dim=-1)
    full = {}
    scores: dict[str, TargetScores] = {}
    for name, logits in (("self", self_logits_BTV), ("teacher", teacher_logits_BTV)):
        if logits is not None:
            full[name] = torch.log_softmax(logits.detach().to(dtype) / temperature, dim=-1)
            scores[name] = TargetScores.from_logprobs(full[name], completion_ids_BT, objective.top_k_for(name))
    entropies = {name: s.entropy for name, s in scores.items()}
    scores = with_reward(objective, scores, advantages_B, mask_BT)
    routed = route(objective, mask_BT, scores.get("self"), scores.get("teacher"), scope)
    valid = mask_BT.bool()
    flat_full = {name: lp[valid] for name, lp in full.items()}
    contribution, token_loss = weighted_token_loss(
        objective,
        routed.coefficients[:, valid],
        student_lp[valid],
        completion_ids_BT[valid],
        {name: s.flat(valid) for name, s in scores.items()},
        lambda name, rows: flat_full[name][rows],
    )
    # The empty slice adds exactly 0 but keeps the loss on the student's graph when no term applies to any token
    # (all padding, all dropped, no token in an enabled regime): backward gives zero gradients, not an error.
    loss = contribution.sum() + student_lp[..., :0].sum()
    token_loss_BT = torch.zeros(mask_BT.shape, dtype=token_loss.dtype, device=token_loss.device)
    token_loss_BT = token_loss_BT.masked_scatter(valid, token_loss)
    student_token_lp = student_lp.detach().gather(-1, completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    entropies = {"student": losses.entropy(student_lp.detach()), **entropies}
    metrics = summarize(
        objective,
        loss,
        token_loss_BT,
        routed,
        mask_BT,
        entropies,
        student_token_lp,
        scores["teacher"].token_logprobs if "teacher" in scores else None,
        eos_probability(student_lp, scope.eos_ids),
    )
    return ObjectiveOutput(loss, metrics, token_loss_BT, routed.regime, routed.gap, routed.cuts.routing)
