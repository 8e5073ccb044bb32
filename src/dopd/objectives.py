"""The named distillation methods, DOPD, its baselines and its ablations, each as a list of weighted terms
(docs/method.md, "Routing", "Baselines and ablations").

DOPD (the default) is four terms, one per regime:

    LH  teacher  reverse KL  Top-K  β_l = 0.6        HT  teacher  JS          full   1
    LL  self     reverse KL  Top-K  β_w = 0.3        HS  self     reverse KL  Top-K  β_l = 0.6

Ablations are options on top of a method: `regimes` (a subset, Table 6), `divergence` / `granularity` (one for
all terms, Tables 6-8), `target` ("teacher": no self term; "self": no teacher term), `routing=False` (every token
receives every enabled regime's term: our reading of "no routing"), `self_privileged=False` and
`teacher_privileged=False` (no privileged input), `drop_fraction` / `drop_mode` (Figure 4), `self_weights` (which
weights the privileged student scores with). `Objective` checks the options and resolves the terms, and says
what the step needs (a teacher pass, a self pass, who samples).

This module holds definitions only: what a `Term` is and which terms a method has. The machinery that evaluates
them on tokens (`terms.py`, `plain.py`, `kernels/`) imports it, never the other way round.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

from . import losses, routing
from .routing import REGIMES

METHODS: tuple[str, ...] = ("dopd", "dopd-rkl", "opd", "opd-priv", "opsd", "gkd", "eopd", "sft")
# DOPD and its named variants: the routed objective. `dopd` keeps the paper's terms; `dopd-rkl` takes reverse KL in
# place of JS on HT, the reading the lab's findings favour (docs/method.md, "Named variants").
DOPD_METHODS: tuple[str, ...] = ("dopd", "dopd-rkl")
GRANULARITIES: tuple[str, ...] = ("sampled", "topk", "full")
TARGETS: tuple[str, ...] = ("teacher", "self")
TEACHER_FULL: tuple[str, ...] = ("full", "topk_bucket")
_DEFAULT_TEACHER_PRIVILEGED = {
    "dopd": True, "dopd-rkl": True, "opd": False, "opd-priv": True, "opsd": None, "gkd": False, "eopd": False,
    "sft": False,
}  # fmt: skip
# The weights the privileged student scores with (`objective.self_weights`); `self_weights.py` keeps them.
SELF_WEIGHTS: tuple[str, ...] = ("live", "frozen", "ema", "lagged")

# The tokens a term applies to, besides one DOPD regime (its name in `routing.REGIMES`).
ALL_TOKENS = "all"
HIGH_TEACHER_ENTROPY = "high_entropy"  # EOPD: where the teacher's entropy is at or above a quantile of the scope's
AppliesTo = Literal["LH", "LL", "HT", "HS", "all", "high_entropy"]
TARGET_LABELS = {"self": "privileged student", "teacher": "teacher"}  # how messages name a target's pass
# The reward's term reads the "reward" target: each token's score is its sequence's advantage (rewards.py).
REWARD_TARGET = "reward"
# Where DOPD's thresholds are taken: the step's batch (each teacher's tokens apart with model.teachers), each
# micro-batch (each holds one teacher's rows), or the step's batch with every teacher's tokens pooled.
THRESHOLD_SCOPES = ("batch", "micro_batch", "pooled")


@dataclass(frozen=True)
class Term:
    """One weighted divergence between the deployed student and a target, and the tokens it applies to. A token's
    loss is the sum of the terms that apply to it (`terms.route` says which do)."""

    target: str  # teacher | self | reward (the sequence's advantage) | none (reads no scorer: sft)
    divergence: str  # one of losses.DIVERGENCES, nll (sft: the sampled token's NLL), or policy_gradient (reward)
    granularity: str  # sampled (the sampled token) | topk (a Top-K support) | full (the whole vocabulary)
    weight: float
    applies_to: AppliesTo  # a DOPD regime (LH, LL, HT, HS), ALL_TOKENS or HIGH_TEACHER_ENTROPY
    tail: str | None = None  # a Top-K term's tail (renormalize | bucket); None: objective.topk_tail
    entropy_quantile: float | None = None  # HIGH_TEACHER_ENTROPY: the quantile of the scope's teacher entropy

    def __post_init__(self):
        if self.applies_to not in (*REGIMES, ALL_TOKENS, HIGH_TEACHER_ENTROPY):
            raise ValueError(
                f"a term applies to a regime ({', '.join(REGIMES)}), {ALL_TOKENS!r} or {HIGH_TEACHER_ENTROPY!r}, "
                f"not {self.applies_to!r}"
            )
        if (self.applies_to == HIGH_TEACHER_ENTROPY) != (self.entropy_quantile is not None):
            raise ValueError(f"a term has an entropy_quantile exactly when it applies to {HIGH_TEACHER_ENTROPY!r}")


@dataclass
class ObjectiveConfig:
    """Every option of the objective, each field one config key. Defaults are the paper's where it gives one
    (docs/method.md says which, and the reading taken where it does not)."""

    method: str = "dopd"  # dopd | dopd-rkl | opd | opd-priv | opsd | gkd | eopd | sft (docs/method.md, "Baselines")
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
    self_weights: str = "frozen"  # frozen (the student at step 0) | live | ema | lagged: the privileged self's weights
    self_ema_decay: float = 0.99  # self_weights=ema: copy = decay * copy + (1 - decay) * live after each step
    self_sync_every: int = 10  # self_weights=lagged: the copy takes the live weights every N optimizer steps
    trim: float = 0.05  # fraction of largest values dropped from each threshold mean
    threshold_scope: str = "batch"  # batch (whole rollout batch, all processes; per teacher) | micro_batch | pooled
    normalization: str = "none"  # none | zscore | minmax, of q_S and q_T before the probability threshold
    drop_fraction: float = 0.0  # Figure 4: fraction of tokens dropped from the loss
    drop_mode: str | None = None  # random | lowest_gap | highest_gap
    eopd_entropy_quantile: float = 0.8  # EOPD: forward KL on tokens above this quantile of teacher entropy
    eopd_forward_weight: float = 1.0  # EOPD: weight of the forward KL term
    temperature: float = 1.0  # logits are divided by it in every pass
    teacher_full: str | None = None  # full | topk_bucket: teacher's full-vocab terms on its top-K + tail (null: served)
    reward: str | None = None  # a verifier: math | exact | lab:TASK | module:function (null: no reward term)
    reward_weight: float = 1.0  # weight of the reward's policy-gradient term (objective.reward set)


def check_reward_name(name) -> None:
    """`objective.reward` names a verifier: math, exact, lab (the lab task's checker), lab:TASK, module:function."""
    if not isinstance(name, str) or not (
        name in ("math", "exact", "lab") or (name.startswith("lab:") and len(name) > 4) or _is_function_path(name)
    ):
        raise ValueError(
            f"objective.reward = {name!r} is unknown; use math, exact, lab:TASK or module:function "
            "(a function of prompt, completion and row returning a number)"
        )


def _is_function_path(name: str) -> bool:
    module, sep, function = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".") + [function])


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
        _one_of(config.threshold_scope, THRESHOLD_SCOPES, "objective.threshold_scope")
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
            raise ValueError(
                f"objective.trim = {config.trim} must be in [0, 1): the fraction of largest values dropped"
            )
        for key in ("beta_w", "beta_l", "ht_weight", "eopd_forward_weight"):
            if getattr(config, key) < 0:
                raise ValueError(
                    f"objective.{key} = {getattr(config, key)} must be >= 0 (a negative weight maximizes "
                    "its divergence)"
                )
        _one_of(config.self_weights, SELF_WEIGHTS, "objective.self_weights")
        if not 0.0 <= config.self_ema_decay < 1.0:
            raise ValueError(f"objective.self_ema_decay = {config.self_ema_decay} must be in [0, 1)")
        if config.self_sync_every < 1:
            raise ValueError(f"objective.self_sync_every = {config.self_sync_every} must be at least 1")
        if config.top_k < 1:
            raise ValueError(f"objective.top_k = {config.top_k} must be at least 1")
        if config.temperature <= 0:
            raise ValueError(f"objective.temperature = {config.temperature} must be positive")
        if not 0.0 <= config.jsd_beta <= 1.0:
            raise ValueError(f"objective.jsd_beta = {config.jsd_beta} must be in [0, 1]")
        if config.reward is not None:
            check_reward_name(config.reward)
        if config.reward_weight < 0:
            raise ValueError(f"objective.reward_weight = {config.reward_weight} must be >= 0")
        if not 0.0 < config.eopd_entropy_quantile < 1.0:
            raise ValueError(f"objective.eopd_entropy_quantile = {config.eopd_entropy_quantile} must be in (0, 1)")
        if config.method in DOPD_METHODS and config.beta_w >= config.beta_l:
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
        # Who samples the completions: the student (on-policy), or the teacher for supervised fine-tuning on its
        # samples (sequence-level distillation, the off-policy reference).
        self.rollout_model = "teacher" if config.method == "sft" else "student"
        if config.method == "sft":
            fixed = [k for k in ("divergence", "granularity", "target", "teacher_privileged") if getattr(config, k)]
            if fixed:
                raise ValueError(
                    f"objective.{fixed[0]} does not apply to method 'sft' (the negative log-likelihood of the "
                    "teacher's samples without privileged input); unset it"
                )
        self.terms = self._resolve_terms()
        self.needs_teacher = any(term.target == "teacher" for term in self.terms)
        self.uses_routing = any(term.applies_to in REGIMES for term in self.terms) or config.method in DOPD_METHODS
        gap_drop = config.drop_fraction > 0 and config.drop_mode in ("lowest_gap", "highest_gap")
        self.needs_self = any(term.target == "self" for term in self.terms) or self.uses_routing or gap_drop
        if self.uses_routing or gap_drop:
            self.needs_teacher = True
        # EOPD's cut: its high-entropy term applies where the teacher's entropy is at or above this quantile of the
        # scope's (None: no term applies by entropy).
        self.teacher_entropy_quantile = next(
            (term.entropy_quantile for term in self.terms if term.applies_to == HIGH_TEACHER_ENTROPY), None
        )
        if not self.needs_teacher and self.rollout_model != "teacher":
            self.teacher_privileged = None
        self.needs_teacher_model = self.needs_teacher or self.rollout_model == "teacher"
        self.has_reward = config.reward is not None  # the loss reads each sequence's advantage (rewards.py)

    def _resolve_terms(self) -> list[Term]:
        c = self.config
        if c.method in DOPD_METHODS:
            by_regime = {
                "LH": Term("teacher", "reverse_kl", "topk", c.beta_l, "LH"),
                "LL": Term("self", "reverse_kl", "topk", c.beta_w, "LL"),
                "HT": Term("teacher", "js" if c.method == "dopd" else "reverse_kl", "full", c.ht_weight, "HT"),
                "HS": Term("self", "reverse_kl", "topk", c.beta_l, "HS"),
            }
            terms = [by_regime[name] for name in REGIMES if name in c.regimes]
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
        elif c.method == "sft":  # the sampled token's negative log-likelihood: it reads no scorer
            terms = [Term("none", "nll", "sampled", 1.0, ALL_TOKENS)]
        else:  # eopd
            terms = [
                Term("teacher", "reverse_kl", "full", 1.0, ALL_TOKENS),
                Term(
                    "teacher",
                    "forward_kl",
                    "full",
                    c.eopd_forward_weight,
                    HIGH_TEACHER_ENTROPY,
                    entropy_quantile=c.eopd_entropy_quantile,
                ),
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
                if term.target == "teacher" and term.granularity == "full"
                else term
                for term in terms
            ]
        if c.reward is not None:  # after the overrides: they concern the distillation terms only
            terms.append(Term(REWARD_TARGET, "policy_gradient", "sampled", c.reward_weight, ALL_TOKENS))
        return terms

    def top_k_for(self, target: str) -> int | None:
        """K to keep of `target`'s distribution in its scores (None: no Top-K term reads it)."""
        uses = any(t.target == target and t.granularity == "topk" for t in self.terms)
        return self.config.top_k if uses else None

    def check_top_k(self, vocab_size: int) -> None:
        """A Top-K term needs K entries of the vocabulary the heads share: `objective.top_k` at most `vocab_size`."""
        if any(t.granularity == "topk" for t in self.terms) and self.config.top_k > vocab_size:
            raise ValueError(
                f"objective.top_k = {self.config.top_k} is larger than the vocabulary ({vocab_size}); "
                f"set it to at most {vocab_size}"
            )

    def __repr__(self) -> str:
        terms = ", ".join(
            f"{t.applies_to}:{t.target}/{t.divergence}/{t.granularity}{'+' + t.tail if t.tail else ''}×{t.weight:g}"
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
