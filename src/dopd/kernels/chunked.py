"""The objective from hidden states and output heads, a bounded number of tokens at a time (docs/scale.md,
"Memory: the chunked loss").

At Qwen3 scale (vocabulary 151,936) the full logits of three passes over a thousand completion tokens take
gigabytes. This form holds at most one pool of full-vocabulary rows, allocated once per call and reused by every
chunk (`Workspace`; two [chunk, V] arrays' worth):

1. scores (no gradient): for the privileged student and the teacher, chunk by chunk, the sampled token's
   log-prob, the entropy and the top-K (what routing and the Top-K terms read); tiny passes keep their full
   log-probs instead. The trainer may compute these per micro-batch and route the whole batch at once
   (`TargetScores`, `terms.compute_cuts`). `kernels/scores.py`.
2. routing, exactly as the plain form (`terms.route`).
3. loss and gradients: chunk by chunk, the student's log-probs, the per-token terms and the gradient with respect
   to the chunk's logits, folded at once into the gradients of the hidden states and the head (`grad_W += G^T h`).
   The gradient is assembled without autograd over [chunk, V]: a sampled-token or Top-K term reads a few entries
   of the student's log-probs, so its gradient is taken on those [R, K] entries only (closed form, or autograd)
   and the softmax's chain rule puts it back (`∂/∂z = scatter(g) − (Σ g) s`); a full-vocabulary term has its
   gradient in closed form (`logit_grads.py`). The tokens whose terms read a target's full log-probs (the HT
   tokens in DOPD: the Top-K terms read the kept top-K) come first, in chunks of half the size, and only their
   target rows are recomputed. `kernels/loss_run.py`.

The result equals `plain.compute_objective` on the full logits, value and gradient (tested in fp32 within
1e-5 relative for every method and option).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..objectives import TARGET_LABELS, Objective
from ..terms import SINGLE_CALL, LossScope, ObjectiveOutput, check_alignment, route, summarize, with_reward
from ..types import Head, TargetScores
from .loss_run import _LossRun, _needs_full
from .scores import _workspace_for, default_chunk_size, score_target


class _ChunkedLoss(torch.autograd.Function):
    """Loss value in forward, with the gradients of the student's hidden states, head weight and bias computed
    chunk by chunk there and handed out in backward."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, run):
        wanted = run.grad_enabled
        grad_hidden = torch.zeros_like(hidden_NH) if wanted and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_VH) if wanted and ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias_V) if wanted and bias_V is not None and ctx.needs_input_grad[2] else None
        loss = run(
            hidden_NH.detach(),
            weight_VH.detach(),
            None if bias_V is None else bias_V.detach(),
            grad_hidden,
            grad_weight,
            grad_bias,
        )
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
    *,
    self_head: Head | None = None,
    teacher_head: Head | None = None,
    self_scores: TargetScores | None = None,
    teacher_scores: TargetScores | None = None,
    advantages_B: Tensor | None = None,
    scope: LossScope = SINGLE_CALL,
    chunk_size: int | None = None,
) -> ObjectiveOutput:
    """The objective from heads; the same result as `plain.compute_objective` with logits (`scope` likewise).

    `self_head` / `teacher_head` hold the no-gradient passes' hidden states and heads (hidden sizes may differ
    from the student's). Their `TargetScores` may be given (the trainer computes them once per micro-batch to
    route the whole batch); the heads are still needed for terms that read a full target distribution.
    `advantages_B` [B]: each sequence's reward advantage, needed when `objective.reward` is set.
    """
    heads = {"self": self_head, "teacher": teacher_head}
    given = {"self": self_scores, "teacher": teacher_scores}
    for name, needed in (("self", objective.needs_self), ("teacher", objective.needs_teacher)):
        if needed and heads[name] is None and given[name] is None:
            raise ValueError(
                f"method {objective.config.method!r} needs the {TARGET_LABELS[name]}'s hidden states and head"
            )
    _check_heads(student, completion_ids_BT, mask_BT, heads)
    objective.check_top_k(student.vocab_size)
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
            _check_scores_only(objective, name, TARGET_LABELS[name], score)
    entropies = {name: s.entropy for name, s in scores.items()}
    scores = with_reward(objective, scores, advantages_B, mask_BT)
    routed = route(objective, mask_BT, scores.get("self"), scores.get("teacher"), scope)
    # The tokens whose terms read a target's full distribution come first, grouped by target, so that the
    # recomputed target logits come in full blocks (a few scattered HT tokens per chunk make slow matmuls); the
    # loss is a sum over tokens, so their order does not change it. `index_N`: each ordered token's place in B·T.
    index_N = valid.flatten().nonzero().squeeze(-1)
    order, full_count = _group_by_full_targets(objective, routed.coefficients.flatten(1)[:, index_N], scores)
    index_N = index_N[order]
    run = _LossRun(
        objective,
        coefficients_JN=routed.coefficients.flatten(1)[:, index_N],
        scores={name: _token_scores(s, index_N) for name, s in scores.items()},
        ids_N=completion_ids_BT.flatten()[index_N],
        index_N=index_N,
        full_targets={name: (head, scores[name].full_logprobs) for name, head in heads.items() if head is not None},
        full_count=full_count,
        workspace=workspace,
        eos_ids=scope.eos_ids,
    )
    loss = _ChunkedLoss.apply(student.hidden.flatten(0, 1)[index_N], student.weight, student.bias, run)

    def unflatten(values_N: Tensor) -> Tensor:
        flat = torch.zeros(mask_BT.numel(), dtype=values_N.dtype, device=values_N.device)
        return flat.index_copy_(0, index_N, values_N).view(mask_BT.shape)

    token_loss_BT = unflatten(run.token_loss_N)
    entropies = {"student": unflatten(run.entropy_N), **entropies}
    metrics = summarize(
        objective,
        loss,
        token_loss_BT,
        routed,
        mask_BT,
        entropies,
        unflatten(run.token_logprobs_N),
        scores["teacher"].token_logprobs if "teacher" in scores else None,
        None if run.eos_prob_N is None else unflatten(run.eos_prob_N),
    )
    return ObjectiveOutput(loss, metrics, token_loss_BT, routed.regime, routed.gap, routed.cuts.routing)


def _token_scores(scores: TargetScores, index_N: Tensor) -> TargetScores:
    """The scores of the ordered tokens, [B, T, ...] -> [N, ...], without the kept full log-probs: the loss
    reads those by `index_N`, for the rows that need them only."""

    def pick(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.flatten(0, 1)[index_N]

    return TargetScores(
        pick(scores.token_logprobs), pick(scores.entropy), pick(scores.topk_logprobs), pick(scores.topk_ids)
    )


def _group_by_full_targets(objective: Objective, coefficients_JN: Tensor, scores) -> tuple[Tensor, int]:
    """A stable order of the tokens that puts first those that need a target's full log-probs, grouped by
    which targets they need and then by which terms (so that each term's rows make one run, and a Top-K term
    takes its support on a slice), and how many they are."""
    # Each token's key is a bit set, and the tokens are sorted by it, largest first. With J terms, bit J + 1 is
    # set when a term reading the teacher's full log-probs applies, bit J for the privileged self's, and bit
    # J - 1 - j for term j itself (when it reads a full target), so the first term weighs most after the targets.
    # DOPD in training (J = 4: LH, LL, HT, HS, each reading a full target: scores keep no top-K) on four tokens:
    #
    #   token  regime  target   key bits                  key
    #   0      LL      self     self (16) + LL (4)         20
    #   1      HT      teacher  teacher (32) + HT (2)      34
    #   2      LH      teacher  teacher (32) + LH (8)      40
    #   3      HS      self     self (16) + HS (1)         17
    #
    # The order is 2, 1, 0, 3: the teacher's tokens (LH, then HT), then the self's (LL, then HS); each term's rows
    # make one run, and full_count = 4. A token that reads no full target has key 0 and keeps its place at the
    # end (the sort is stable); a token with several terms (routing=false) sorts by all of its bits.
    terms = objective.terms
    key = torch.zeros(coefficients_JN.shape[-1], dtype=torch.long, device=coefficients_JN.device)
    for j, (term, coefficient) in enumerate(zip(terms, coefficients_JN)):
        if _needs_full(objective, term, scores.get(term.target)):
            target_bit = 2 if term.target == "teacher" else 1
            key = key | ((coefficient != 0).long() * ((target_bit << len(terms)) | (1 << (len(terms) - 1 - j))))
    return torch.argsort(-key, stable=True), int((key > 0).sum())


def _check_scores_only(objective: Objective, name: str, label: str, scores: TargetScores) -> None:
    """Scores without a head (a served teacher) hold the sampled token's log-probs and a top-K: every term that
    reads them must be a sampled-token term or a Top-K term on the target's own top-K."""
    for term in objective.terms:
        if term.target != name or term.granularity == "sampled":
            continue
        if term.granularity == "full":
            raise ValueError(
                f"the {label}'s full distribution is needed by the {term.applies_to} term ({term.divergence}, full "
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
    """The passes aligned (`terms.check_alignment`), and each head fitting its hidden states."""
    shapes = {TARGET_LABELS[name]: (*h.hidden.shape[:2], h.vocab_size) for name, h in heads.items() if h is not None}
    check_alignment(
        "hidden states", (*student.hidden.shape[:2], student.vocab_size), completion_ids_BT, mask_BT, shapes
    )
    for label, head in [("student", student)] + [(TARGET_LABELS[n], h) for n, h in heads.items() if h is not None]:
        if head.hidden.shape[-1] != head.weight.shape[1]:
            raise ValueError(
                f"the {label}'s hidden size {head.hidden.shape[-1]} does not match its head {tuple(head.weight.shape)}"
            )
