"""Named distillation objectives: DOPD, its baselines and its ablations, each a list of weighted terms (spec,
"Routing", "Baselines and ablations").

A method is a list of `Term`s. A term names a target (the privileged `teacher` or the privileged student `self`),
a divergence, a granularity (`sampled` token, `topk`, `full` vocabulary), a weight, and the tokens it applies to
(a DOPD regime, every token, or, for EOPD, the tokens where the teacher's entropy is high). The per-token loss is
the sum of the terms that apply to the token; the loss is that averaged over each sequence's tokens (`1/|y|`)
and then over sequences. Gradient flows through the deployed student's log-probabilities only.

DOPD (default) is four terms, one per regime:

    LH  teacher  reverse KL  Top-K  β_l = 0.6        HT  teacher  JS          full   1
    LL  self     reverse KL  Top-K  β_w = 0.3        HS  self     reverse KL  Top-K  β_l = 0.6

Ablations are config options on top of a method: `regimes` (a subset, Table 6), `divergence` / `granularity`
(one for all terms, Tables 6-8), `target` ("teacher": no self term; "self": no teacher term), `routing=False`
(every token receives every enabled regime's term: our reading of "no routing"), `self_privileged=False` and
`teacher_privileged=False` (no privileged input), `drop_fraction` / `drop_mode` (Figure 4).

This module computes the plain form, from full logits. `kernels/chunked.py` computes the same objective from
hidden states and output heads a chunk of tokens at a time; both share the term code below.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from . import losses, routing
from .routing import HS, HT, LH, LL, REGIMES, Thresholds

METHODS: tuple[str, ...] = ("dopd", "opd", "opd-priv", "opsd", "gkd", "eopd")
GRANULARITIES: tuple[str, ...] = ("sampled", "topk", "full")
TARGETS: tuple[str, ...] = ("teacher", "self")
TEACHER_FULL: tuple[str, ...] = ("full", "topk_bucket")
ALL_TOKENS = -2
HIGH_TEACHER_ENTROPY = -3
_DEFAULT_TEACHER_PRIVILEGED = {"dopd": True, "opd": False, "opd-priv": True, "opsd": None, "gkd": False, "eopd": False}


@dataclass
class ObjectiveConfig:
    """Every option of the objective. Defaults are the paper's (spec.md); each field is one config key."""

    method: str = "dopd"  # dopd | opd | opd-priv | opsd | gkd | eopd
    top_k: int = 128  # K of the Top-K terms
    topk_support: str = "target"  # target | student | union: whose top-K tokens form the support
    topk_tail: str = "renormalize"  # renormalize | bucket: renormalize over the support, or add a tail entry
    beta_w: float = 0.3  # weight of LL (self target, low gap, low confidence)
    beta_l: float = 0.6  # weight of LH and HS
    ht_weight: float = 1.0  # weight of HT (teacher, high gap): the full-vocabulary JS term
    jsd_beta: float = 0.5  # mixing β of the generalized JSD (gkd, opsd, divergence=jsd)
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))  # enabled DOPD regimes (Table 6)
    routing: bool = True  # false: every token gets every enabled regime's term (Table 8, "no routing")
    divergence: str | None = None  # one divergence for every term: reverse_kl | forward_kl | js | jsd
    granularity: str | None = None  # one granularity for every term: sampled | topk | full
    target: str | None = None  # one target for every term: teacher (no self term) | self (no teacher term)
    teacher_privileged: bool | None = None  # teacher reads the privileged context (null: the method's default)
    self_privileged: bool = True  # the self pass reads the privileged context (false: "no privileged input")
    trim: float = 0.05  # fraction of largest values dropped from each threshold mean
    threshold_scope: str = "batch"  # batch (whole rollout batch, all processes) | micro_batch
    normalization: str = "none"  # none | zscore | minmax, of q_S and q_T before the probability threshold
    drop_fraction: float = 0.0  # Figure 4: fraction of tokens dropped from the loss
    drop_mode: str | None = None  # random | lowest_gap | highest_gap
    eopd_entropy_quantile: float = 0.8  # EOPD: forward KL on tokens above this quantile of teacher entropy
    eopd_forward_weight: float = 1.0  # EOPD: weight of the forward KL term
    temperature: float = 1.0  # logits are divided by it in every pass
    teacher_full: str | None = None  # full | topk_bucket: teacher full-vocab terms on its top-K + tail (null: if served)


@dataclass(frozen=True)
class Term:
    target: str  # teacher | self
    divergence: str
    granularity: str
    weight: float
    applies_to: int  # a regime code, ALL_TOKENS or HIGH_TEACHER_ENTROPY
    tail: str | None = None  # a Top-K term's tail (renormalize | bucket); None: objective.topk_tail

    @property
    def label(self) -> str:
        if 0 <= self.applies_to < len(REGIMES):
            return REGIMES[self.applies_to]
        return {ALL_TOKENS: "all", HIGH_TEACHER_ENTROPY: "high_entropy"}[self.applies_to]


def _one_of(value, known, field_name: str) -> None:
    if value not in known:
        raise ValueError(f"{field_name} = {value!r} is unknown; known: {', '.join(map(str, known))}")


class Objective:
    """A validated objective: its terms and what it needs from the scoring passes."""

    def __init__(self, config: ObjectiveConfig):
        self.config = config = replace(config, regimes=list(config.regimes))
        _one_of(config.method, METHODS, "objective.method")
        _one_of(config.topk_support, losses.TOPK_SUPPORTS, "objective.topk_support")
        _one_of(config.topk_tail, losses.TOPK_TAILS, "objective.topk_tail")
        _one_of(config.threshold_scope, ("batch", "micro_batch"), "objective.threshold_scope")
        _one_of(config.normalization, routing.NORMALIZATIONS, "objective.normalization")
        for name in config.regimes:
            _one_of(name, REGIMES, "objective.regimes entry")
        if config.divergence is not None:
            _one_of(config.divergence, losses.DIVERGENCES, "objective.divergence")
        if config.granularity is not None:
            _one_of(config.granularity, GRANULARITIES, "objective.granularity")
        if config.target is not None:
            _one_of(config.target, TARGETS, "objective.target")
        if config.drop_mode is not None:
            _one_of(config.drop_mode, routing.DROP_MODES, "objective.drop_mode")
        if config.teacher_full is not None:
            _one_of(config.teacher_full, TEACHER_FULL, "objective.teacher_full")
        if not 0.0 <= config.drop_fraction < 1.0:
            raise ValueError(f"objective.drop_fraction = {config.drop_fraction} must be in [0, 1)")
        if config.drop_fraction > 0 and config.drop_mode is None:
            raise ValueError("objective.drop_fraction > 0 needs objective.drop_mode (random, lowest_gap, highest_gap)")
        if not 0.0 <= config.trim < 1.0:
            raise ValueError(f"objective.trim = {config.trim} must be in [0, 1): the fraction of largest values dropped")
        for key in ("beta_w", "beta_l", "ht_weight", "eopd_forward_weight"):
            if getattr(config, key) < 0:
                raise ValueError(f"objective.{key} = {getattr(config, key)} must be >= 0 (a negative weight maximizes "
                                 "its divergence)")
        if config.top_k < 1:
            raise ValueError(f"objective.top_k = {config.top_k} must be at least 1")
        if config.temperature <= 0:
            raise ValueError(f"objective.temperature = {config.temperature} must be positive")
        if not 0.0 <= config.jsd_beta <= 1.0:
            raise ValueError(f"objective.jsd_beta = {config.jsd_beta} must be in [0, 1]")
        if not 0.0 < config.eopd_entropy_quantile < 1.0:
            raise ValueError(f"objective.eopd_entropy_quantile = {config.eopd_entropy_quantile} must be in (0, 1)")
        if config.method == "dopd" and config.beta_w >= config.beta_l:
            warnings.warn(
                f"objective.beta_w = {config.beta_w} >= objective.beta_l = {config.beta_l}: the paper requires "
                "beta_w < beta_l (low-confidence self tokens weigh less than the others)",
                stacklevel=2,
            )
        default = _DEFAULT_TEACHER_PRIVILEGED[config.method]
        if config.method in ("opd", "opd-priv") and config.teacher_privileged not in (None, default):
            raise ValueError(
                f"objective.teacher_privileged = {config.teacher_privileged} contradicts method {config.method!r}; "
                "use method 'opd' for a teacher without privileged context and 'opd-priv' for one with it"
            )
        self.teacher_privileged = default if config.teacher_privileged is None else config.teacher_privileged
        self.terms = self._resolve_terms()
        self.needs_teacher = any(term.target == "teacher" for term in self.terms)
        self.uses_routing = any(0 <= term.applies_to < len(REGIMES) for term in self.terms) or (
            config.method == "dopd"
        )
        gap_drop = config.drop_fraction > 0 and config.drop_mode in ("lowest_gap", "highest_gap")
        self.needs_self = any(term.target == "self" for term in self.terms) or self.uses_routing or gap_drop
        if self.uses_routing or gap_drop:
            self.needs_teacher = True
        self.uses_teacher_entropy = any(term.applies_to == HIGH_TEACHER_ENTROPY for term in self.terms)
        if not self.needs_teacher:
            self.teacher_privileged = None

    def _resolve_terms(self) -> list[Term]:
        c = self.config
        if c.method == "dopd":
            by_regime = {
                LH: Term("teacher", "reverse_kl", "topk", c.beta_l, LH),
                LL: Term("self", "reverse_kl", "topk", c.beta_w, LL),
                HT: Term("teacher", "js", "full", c.ht_weight, HT),
                HS: Term("self", "reverse_kl", "topk", c.beta_l, HS),
            }
            terms = [by_regime[REGIMES.index(name)] for name in REGIMES if name in c.regimes]
            if not terms:
                raise ValueError("objective.regimes is empty: enable at least one of LH, LL, HT, HS")
            if not c.routing:
                terms = [replace(term, applies_to=ALL_TOKENS) for term in terms]
        elif c.method in ("opd", "opd-priv"):
            terms = [Term("teacher", "reverse_kl", "sampled", 1.0, ALL_TOKENS)]
        elif c.method == "opsd":
            terms = [Term("self", "jsd", "full", 1.0, ALL_TOKENS)]
        elif c.method == "gkd":
            terms = [Term("teacher", "jsd", "full", 1.0, ALL_TOKENS)]
        else:  # eopd
            terms = [
                Term("teacher", "reverse_kl", "full", 1.0, ALL_TOKENS),
                Term("teacher", "forward_kl", "full", c.eopd_forward_weight, HIGH_TEACHER_ENTROPY),
            ]
        overrides = {
            key: value
            for key, value in (("divergence", c.divergence), ("granularity", c.granularity), ("target", c.target))
            if value is not None
        }
        terms = [replace(term, **overrides) for term in terms]
        if c.teacher_full == "topk_bucket":
            # Only the teacher's top-K is known (a served teacher): its full-vocabulary terms (DOPD's HT JS) run on
            # that support, the rest of the vocabulary lumped into one tail entry on both sides.
            terms = [
                replace(term, granularity="topk", tail="bucket")
                if term.target == "teacher" and term.granularity == "full" else term
                for term in terms
            ]
        return terms

    def top_k_for(self, target: str) -> int | None:
        """K to keep of `target`'s distribution in its scores (None: no Top-K term reads it)."""
        uses = any(t.target == target and t.granularity == "topk" for t in self.terms)
        return self.config.top_k if uses else None

    def __repr__(self) -> str:
        terms = ", ".join(
            f"{t.label}:{t.target}/{t.divergence}/{t.granularity}{'+' + t.tail if t.tail else ''}×{t.weight:g}"
            for t in self.terms
        )
        return f"Objective({self.config.method}: {terms})"


def build_objective(config: ObjectiveConfig | dict | str) -> Objective:
    """An `Objective` from a config, a dict of its fields, or a method name."""
    if isinstance(config, str):
        config = ObjectiveConfig(method=config)
    elif isinstance(config, dict):
        unknown = set(config) - set(ObjectiveConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown objective option(s) {sorted(unknown)}; known: {sorted(ObjectiveConfig.__dataclass_fields__)}"
            )
        config = ObjectiveConfig(**config)
    return Objective(config)


# ------------------------------------------------------------------------------------------------- scores


@dataclass
class TargetScores:
    """What the objective keeps of one no-gradient pass (self or teacher) on the completion tokens.

    Shapes: `token_logprobs`, `entropy`: [B, T]; `topk_logprobs`, `topk_ids`: [B, T, K] or None;
    `full_logprobs`: [B, T, V] or None (the chunked form keeps them when they are small, so that its loss need
    not recompute the target's logits; read only, and only at valid tokens).
    """

    token_logprobs: Tensor
    entropy: Tensor
    topk_logprobs: Tensor | None = None
    topk_ids: Tensor | None = None
    full_logprobs: Tensor | None = None

    @staticmethod
    def from_logprobs(logprobs_BTV: Tensor, completion_ids_BT: Tensor, top_k: int | None) -> "TargetScores":
        logprobs_BTV = logprobs_BTV.detach()
        token = logprobs_BTV.gather(-1, completion_ids_BT.unsqueeze(-1)).squeeze(-1)
        topk = logprobs_BTV.topk(top_k, dim=-1) if top_k else None
        return TargetScores(
            token_logprobs=token,
            entropy=losses.entropy(logprobs_BTV),
            topk_logprobs=topk.values if topk is not None else None,
            topk_ids=topk.indices if topk is not None else None,
        )

    def flat(self, valid_BT: Tensor) -> "TargetScores":
        """The valid tokens only, flattened: [B, T, ...] -> [N, ...]."""
        return self.rows(valid_BT)

    def rows(self, index: Tensor | slice) -> "TargetScores":
        """The scores of some tokens: any index of the leading axes (a mask, indices, a slice)."""
        fields = (self.token_logprobs, self.entropy, self.topk_logprobs, self.topk_ids, self.full_logprobs)
        return TargetScores(*(None if tensor is None else tensor[index] for tensor in fields))


def compute_batch_thresholds(
    objective: Objective,
    self_scores: TargetScores | None,
    teacher_scores: TargetScores | None,
    mask: Tensor,
    gather: routing.Gather | None = None,
) -> Thresholds | None:
    """Routing thresholds of one scope from the scores of its tokens (None when the method does not route)."""
    c = objective.config
    needs_gap = objective.uses_routing or (c.drop_fraction > 0 and c.drop_mode in ("lowest_gap", "highest_gap"))
    thresholds = None
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
    if objective.uses_teacher_entropy:
        assert teacher_scores is not None
        ent = (gather or (lambda x: x))(teacher_scores.entropy.detach()[mask.bool()].double())
        cut = float(torch.quantile(ent, c.eopd_entropy_quantile)) if ent.numel() else 0.0
        thresholds = replace(thresholds or Thresholds(gap=0.0, prob_sum=0.0), teacher_entropy=cut)
    return thresholds


# ---------------------------------------------------------------------------------------- token weights


@dataclass
class Routed:
    """Per-token routing of one call. Shapes: [B, T]; `coefficients`: [J, B, T] (one row per term)."""

    regime: Tensor | None
    gap: Tensor | None
    keep: Tensor
    coefficients: Tensor
    thresholds: Thresholds | None


def route(
    objective: Objective,
    mask_BT: Tensor,
    self_scores: TargetScores | None,
    teacher_scores: TargetScores | None,
    thresholds: Thresholds | None,
    num_sequences: int | None,
    gather: routing.Gather | None,
    generator: torch.Generator | None,
) -> Routed:
    """Each term's coefficient for each token: weight × applies × kept × 1/(|y_b| · num_sequences)."""
    c = objective.config
    valid = mask_BT.bool()
    if thresholds is None:
        thresholds = compute_batch_thresholds(objective, self_scores, teacher_scores, valid, gather)
    regime = gap = None
    if objective.uses_routing:
        regime = routing.assign_regimes(self_scores.token_logprobs, teacher_scores.token_logprobs, valid, thresholds)
    if self_scores is not None and teacher_scores is not None:
        gap = routing.privilege_gap(self_scores.token_logprobs, teacher_scores.token_logprobs).masked_fill(~valid, 0)
    keep = routing.drop_mask(
        None if self_scores is None else self_scores.token_logprobs,
        None if teacher_scores is None else teacher_scores.token_logprobs,
        valid,
        c.drop_fraction,
        c.drop_mode,
        thresholds,
        generator,
    )
    lengths = valid.sum(-1, keepdim=True).clamp(min=1)
    sequences = num_sequences if num_sequences is not None else mask_BT.shape[0]
    per_token = keep.to(torch.float64) / (lengths.to(torch.float64) * max(sequences, 1))
    rows = []
    for term in objective.terms:
        if term.applies_to == ALL_TOKENS:
            applies = keep
        elif term.applies_to == HIGH_TEACHER_ENTROPY:
            applies = keep & (teacher_scores.entropy.double() >= thresholds.teacher_entropy)
        else:
            applies = keep & (regime == term.applies_to)
        rows.append(term.weight * per_token * applies)
    return Routed(regime, gap, keep, torch.stack(rows), thresholds)


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

    Returns (the loss contribution per token [M], with the 1/(|y|·sequences) factors, and the sum of the
    applicable terms' weighted values per token [M], without them, detached, for token-level views).
    """
    dtype = losses.accumulation_dtype(student_logprobs_MV.dtype)
    coefficients_JM = coefficients_JM.to(dtype)
    total = torch.zeros(coefficients_JM.shape[-1], dtype=dtype, device=student_logprobs_MV.device)
    plain = torch.zeros_like(total)
    for term, coefficient in zip(objective.terms, coefficients_JM):
        rows = coefficient.nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        values = term_values(
            objective, term, student_logprobs_MV, completion_ids_M, targets[term.target].rows(rows), full_target, rows
        )
        total = total.index_add(0, rows, values * coefficient[rows])
        plain = plain.index_add(0, rows, values.detach() * term.weight)
    return total, plain


# ------------------------------------------------------------------------------------------------ output


@dataclass
class ObjectiveOutput:
    """The loss (a scalar with gradient), metrics (detached 0-dim tensors) and per-token views [B, T]."""

    loss: Tensor
    metrics: dict[str, Tensor]
    token_loss: Tensor  # Σ of the terms applied to each token, weights included, not length-normalized
    regime: Tensor | None
    gap: Tensor | None
    thresholds: Thresholds | None


def summarize(
    objective: Objective,
    loss: Tensor,
    token_loss_BT: Tensor,
    routed: Routed,
    mask_BT: Tensor,
    entropies: dict[str, Tensor],
    student_token_logprobs_BT: Tensor,
    teacher_token_logprobs_BT: Tensor | None,
) -> dict[str, Tensor]:
    """The metrics of one call: loss, per-regime fractions and mean losses, gap statistics, entropies."""
    valid = mask_BT.bool()
    count = valid.sum().clamp(min=1)

    def mean(values: Tensor, where: Tensor) -> Tensor:
        return (values.double() * where).sum() / where.sum().clamp(min=1)

    metrics = {"loss": loss.detach(), "tokens": valid.sum().double(), "kept_fraction": routed.keep.sum() / count}
    for name, values in entropies.items():
        metrics[f"entropy/{name}"] = mean(values, valid)
    if teacher_token_logprobs_BT is not None:
        metrics["sampled_kl/teacher"] = mean(student_token_logprobs_BT - teacher_token_logprobs_BT, valid)
    if routed.gap is not None:
        metrics["gap/mean"] = mean(routed.gap, valid)
    if routed.thresholds is not None and routed.regime is not None:
        for key, value in routed.thresholds.as_metrics().items():
            metrics[key] = torch.tensor(value, dtype=torch.float64)
    if routed.regime is not None:
        metrics.update({k: v.double() for k, v in routing.regime_fractions(routed.regime).items()})
        for code, name in enumerate(REGIMES):
            metrics[f"loss/{name}"] = mean(token_loss_BT, routed.regime == code)
    return metrics


def _check_inputs(student_BTV: Tensor, completion_ids_BT: Tensor, mask_BT: Tensor, others: dict[str, Tensor]) -> None:
    if completion_ids_BT.shape != student_BTV.shape[:2] or mask_BT.shape != completion_ids_BT.shape:
        raise ValueError(
            f"sequence lengths differ: student logits {tuple(student_BTV.shape[:2])}, completion ids "
            f"{tuple(completion_ids_BT.shape)}, mask {tuple(mask_BT.shape)}; all must be [B, T] over the same "
            "completion tokens"
        )
    for name, tensor in others.items():
        if tensor.shape[:2] != student_BTV.shape[:2]:
            raise ValueError(
                f"sequence lengths differ: the student has {tuple(student_BTV.shape[:2])} completion positions "
                f"but the {name} has {tuple(tensor.shape[:2])}; align the passes by the completion tokens"
            )
        if tensor.shape[-1] != student_BTV.shape[-1]:
            raise ValueError(
                f"vocabulary sizes differ: the student has {student_BTV.shape[-1]} and the {name} has "
                f"{tensor.shape[-1]}; the student and teacher must share one tokenizer (slice embeddings padded "
                "beyond the tokenizer to a common size)"
            )


def check_top_k(objective: Objective, vocab_size: int) -> None:
    if any(t.granularity == "topk" for t in objective.terms) and objective.config.top_k > vocab_size:
        raise ValueError(
            f"objective.top_k = {objective.config.top_k} is larger than the vocabulary ({vocab_size}); "
            f"set it to at most {vocab_size}"
        )


def compute_objective(
    objective: Objective,
    student_logits_BTV: Tensor,
    completion_ids_BT: Tensor,
    mask_BT: Tensor,
    self_logits_BTV: Tensor | None = None,
    teacher_logits_BTV: Tensor | None = None,
    thresholds: Thresholds | None = None,
    num_sequences: int | None = None,
    gather: routing.Gather | None = None,
    generator: torch.Generator | None = None,
) -> ObjectiveOutput:
    """The plain form: the objective from full logits of the three passes on the same completion tokens.

    Shapes: logits [B, T, V] (position t scores completion token t), `completion_ids_BT` [B, T] int,
    `mask_BT` [B, T] (1 for completion tokens, 0 for padding). `thresholds` comes from the trainer when the scope
    is larger than this call; otherwise it is computed here (over processes with `gather`). `num_sequences`
    is the number of sequences the loss is averaged over (default B; the trainer passes the step's count so that
    gradient accumulation gives the mean over the whole batch).
    """
    others = {"privileged student": self_logits_BTV, "teacher": teacher_logits_BTV}
    for name, needed in (("privileged student", objective.needs_self), ("teacher", objective.needs_teacher)):
        if needed and others[name] is None:
            raise ValueError(f"method {objective.config.method!r} needs the {name}'s logits")
    _check_inputs(student_logits_BTV, completion_ids_BT, mask_BT, {k: v for k, v in others.items() if v is not None})
    check_top_k(objective, student_logits_BTV.shape[-1])
    temperature = objective.config.temperature
    dtype = losses.accumulation_dtype(student_logits_BTV.dtype)
    student_lp = torch.log_softmax(student_logits_BTV.to(dtype) / temperature, dim=-1)
    full = {}
    scores: dict[str, TargetScores] = {}
    for name, logits in (("self", self_logits_BTV), ("teacher", teacher_logits_BTV)):
        if logits is not None:
            full[name] = torch.log_softmax(logits.detach().to(dtype) / temperature, dim=-1)
            scores[name] = TargetScores.from_logprobs(full[name], completion_ids_BT, objective.top_k_for(name))
    routed = route(
        objective, mask_BT, scores.get("self"), scores.get("teacher"), thresholds, num_sequences, gather, generator
    )
    valid = mask_BT.bool()
    flat_full = {name: lp[valid] for name, lp in full.items()}
    token_loss, plain = weighted_token_loss(
        objective,
        routed.coefficients[:, valid],
        student_lp[valid],
        completion_ids_BT[valid],
        {name: s.flat(valid) for name, s in scores.items()},
        lambda name, rows: flat_full[name][rows],
    )
    # The empty slice adds exactly 0 but keeps the loss on the student's graph when no term applies to any token
    # (all padding, all dropped, no token in an enabled regime): backward gives zero gradients, not an error.
    loss = token_loss.sum() + student_lp[..., :0].sum()
    token_loss_BT = torch.zeros(mask_BT.shape, dtype=plain.dtype, device=plain.device).masked_scatter(valid, plain)
    student_token_lp = student_lp.detach().gather(-1, completion_ids_BT.unsqueeze(-1)).squeeze(-1)
    entropies = {"student": losses.entropy(student_lp.detach())}
    entropies.update({name: s.entropy for name, s in scores.items()})
    metrics = summarize(
        objective,
        loss,
        token_loss_BT,
        routed,
        mask_BT,
        entropies,
        student_token_lp,
        scores["teacher"].token_logprobs if "teacher" in scores else None,
    )
    return ObjectiveOutput(loss, metrics, token_loss_BT, routed.regime, routed.gap, routed.thresholds)
