"""Collapse diagnostics: signs in a run's metrics that the student is degenerating before its accuracy is gone.

A self-distilling student can drift into a degenerate policy that its privileged self then holds it in: stopping
after one step (`9+2=11;<eos>`), or rambling to the token limit. Each step's metrics carry the completion
lengths (mean, min, max), the fraction of completions that end with end-of-sequence before an answer-shaped
ending (`logging.answer_pattern`), the deployed student's probability of end-of-sequence and the entropy of
each pass. `CollapseWatch` compares each step with the mean of the first steps and raises a flag, with one
warning line naming the step, when the mean completion length falls below half of its first-steps value or the
student's entropy below a quarter of it. `dopd report` marks that step on its plots (`Collapse`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("dopd")

LENGTH_KEY, ENTROPY_KEY = "completion_length/mean", "entropy/student"
# (metric, fraction of its first-steps value below which the run is flagged, the flag's metric key)
RULES = ((LENGTH_KEY, 0.5, "collapse/length"), (ENTROPY_KEY, 0.25, "collapse/entropy"))


class NonFiniteError(RuntimeError):
    """A pass's scores, the loss or the gradient norm is NaN or infinite: the run stops before the optimizer step,
    so the last checkpoint stays usable (`checkpoint.resume=true` continues from it)."""

    FIX = (
        "likely cause: half-precision overflow (use model.dtype=bfloat16 and train.mixed_precision=bf16, not "
        "float16/fp16) or broken weights; the last checkpoint is intact (checkpoint.resume=true continues from it)"
    )


_PASS_NAMES = {"student": "the deployed student's pass", "self": "the privileged student's scores",
               "teacher": "the teacher's scores", "loss": "the loss", "gradient norm": "the gradient norm"}  # fmt: skip


def check_finite(name: str, step: int, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise NonFiniteError naming the pass, the step and how many tokens when `values` (at the valid tokens of
    `mask` [B, T]; `values` [B, T] or [B, T, H]) hold NaN or inf. The common case, every value finite (padding
    included: the passes leave it finite), costs one reduction and no copy."""
    if bool(torch.isfinite(values).all()):
        return
    if mask is not None:
        values = values[mask.to(values.device).bool()]
    bad = ~torch.isfinite(values)
    if bad.any():  # padding alone may hold them, and then nothing is wrong
        count = int(bad.flatten(1).any(-1).sum()) if bad.dim() > 1 else int(bad.sum())
        where = f"{count} of {values.shape[0]} completion tokens" if mask is not None else "its value"
        raise NonFiniteError(
            f"step {step + 1}: {_PASS_NAMES.get(name, name)} is not finite ({where}); {NonFiniteError.FIX}"
        )


def early_eos_fraction(texts: list[str], finished: list[bool], pattern: str) -> float:
    """The fraction of completions that ended with end-of-sequence without an answer-shaped ending: `pattern`
    (a regular expression) does not match the end of the stripped text."""
    if not texts:
        return 0.0
    ending = re.compile(pattern)
    early = [done and ending.search(text.strip()) is None for text, done in zip(texts, finished)]
    return sum(early) / len(texts)


@dataclass
class CollapseWatch:
    """Flags the first step whose completion length or student entropy falls below a fraction of the mean of the
    first `baseline_steps` steps. `update(metrics)` adds `collapse/length` and `collapse/entropy` (0 or 1, staying
    1 once raised), `collapse/step` (the first flagged step) and logs one warning per flag."""

    baseline_steps: int = 3
    first_values: dict[str, list[float]] = field(default_factory=dict)  # each metric's first `baseline_steps`
    first_step: dict[str, int] = field(default_factory=dict)

    def baseline(self, key: str) -> float | None:
        values = self.first_values.get(key, [])
        return sum(values) / len(values) if len(values) == self.baseline_steps else None

    def update(self, metrics: dict[str, float]) -> dict[str, float]:
        step = int(metrics["step"])
        flags: dict[str, float] = {}
        for key, fraction, flag in RULES:
            if key not in metrics:
                continue
            first = self.first_values.setdefault(key, [])
            if len(first) < self.baseline_steps:
                first.append(float(metrics[key]))
            reference = self.baseline(key)
            if flag not in self.first_step and reference is not None and metrics[key] < fraction * reference:
                self.first_step[flag] = step
                logger.warning(
                    "collapse at step %d: %s = %.4g is below %g x its first-steps value %.4g",
                    step,
                    key,
                    metrics[key],
                    fraction,
                    reference,
                )
            flags[flag] = 1.0 if flag in self.first_step else 0.0
        if self.first_step:
            flags["collapse/step"] = float(min(self.first_step.values()))
        return flags

    def state_dict(self) -> dict:
        return {"first_values": self.first_values, "first_step": self.first_step}

    def load_state_dict(self, state: dict) -> None:
        self.first_values = {k: list(v) for k, v in state.get("first_values", {}).items()}
        self.first_step = dict(state.get("first_step", {}))


@dataclass
class Collapse:
    """A collapse found in a run's logged metrics (`report.find_collapse`): the run flagged itself (`collapse/step`,
    from `CollapseWatch`), or its student entropy fell below `fraction` of its value at the first logged step."""

    label: str  # the run's label
    step: int  # the step it collapsed at
    start: float  # the student entropy at the first logged step (nan when the run flagged itself)
    value: float  # the student entropy at `step`
    threshold: float  # fraction × start (nan when the run flagged itself)
    fraction: float
    reason: str = "entropy"  # entropy (found by the report), or what the run's own flags named

    def message(self) -> str:
        if self.reason != "entropy":
            return f"warning: {self.label}: the run flagged a collapse ({self.reason}) at step {self.step}"
        return (
            f"warning: {self.label}: student entropy collapsed at step {self.step}: {self.value:.4g} < "
            f"{self.fraction:g} x {self.start:.4g} (its value at the first logged step)"
        )
