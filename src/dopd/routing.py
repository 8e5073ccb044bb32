"""DOPD's token router: the privilege advantage gap, trimmed batch thresholds and four regimes (docs/method.md,
"Routing").

For each completion token `y_n`, from the sampled token's log-probabilities under the privileged student
(`log q_S`) and the privileged teacher (`log q_T`):

- gap `A = |log q_T − log q_S|`;
- thresholds `Ā` and `q̄_S + q̄_T`: means over the valid tokens of the scope after dropping the top `trim`
  fraction (5%) of each quantity separately;
- regimes: LH (`A < Ā`, `q_S+q_T ≥` threshold), LL (`A < Ā`, below it), HT (`A ≥ Ā`, `q_T ≥ q_S`),
  HS (`A ≥ Ā`, `q_T < q_S`). Every valid token is in exactly one; padding gets `INVALID`.

Thresholds are computed once per scope (by default the whole rollout batch of an optimizer step, over all
processes) so that micro-batches and processes route alike: pass a `gather` function that concatenates a 1-D
tensor over processes (e.g. `accelerator.gather` on padded values, see `make_gather`). Means are taken in
float64 so that a batch of identical gaps routes every token alike (all to `A ≥ Ā`). An empty scope gives
thresholds of zero: nothing is routed because nothing is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

REGIMES: tuple[str, ...] = ("LH", "LL", "HT", "HS")
LH, LL, HT, HS = range(4)
INVALID = -1
NORMALIZATIONS: tuple[str, ...] = ("none", "zscore", "minmax")
DROP_MODES: tuple[str, ...] = ("random", "lowest_gap", "highest_gap")

Gather = Callable[[Tensor], Tensor]
Normalization = Literal["none", "zscore", "minmax"]


@dataclass(frozen=True)
class Thresholds:
    """Batch statistics that route a token. `q_*_shift/scale` normalize `q` as `(q − shift) / scale`."""

    gap: float
    prob_sum: float
    q_self_shift: float = 0.0
    q_self_scale: float = 1.0
    q_teacher_shift: float = 0.0
    q_teacher_scale: float = 1.0
    num_tokens: int = 0
    gap_drop_low: float = float("-inf")
    gap_drop_high: float = float("inf")

    def as_metrics(self) -> dict[str, float]:
        return {"gap/threshold": self.gap, "prob_sum/threshold": self.prob_sum}


def privilege_gap(self_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """`A = |log q_T − log q_S|` per token. Shapes: [B, T] (or any) -> same."""
    return (teacher_logprobs.double() - self_logprobs.double()).abs()


def trimmed_mean(values: Tensor, trim: float) -> float:
    """Mean of a 1-D tensor after dropping its largest `floor(trim · n)` values (at least one value is kept)."""
    n = values.numel()
    if n == 0:
        return 0.0
    keep = max(1, n - int(trim * n))
    kept = values.double().sort().values[:keep]
    # Clamp to the kept range: rounding can put the mean of n equal values one ulp above them, which would route
    # a batch of identical gaps to `A < Ā` instead of `A ≥ Ā`.
    return float(kept.mean().clamp(min=kept[0], max=kept[-1]))


def _normalizer(values: Tensor, normalization: str) -> tuple[float, float]:
    if normalization == "none" or values.numel() == 0:
        return 0.0, 1.0
    values = values.double()
    if normalization == "zscore":
        std = float(values.std(unbiased=False))
        return float(values.mean()), std if std > 0 else 1.0
    if normalization == "minmax":
        low, high = float(values.min()), float(values.max())
        return low, (high - low) if high > low else 1.0
    raise ValueError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")


def _identity(values: Tensor) -> Tensor:
    return values


def compute_thresholds(
    self_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    trim: float = 0.05,
    normalization: str = "none",
    gather: Gather | None = None,
    drop_fraction: float = 0.0,
    drop_mode: str | None = None,
) -> Thresholds:
    """Thresholds over the valid tokens of the scope (this call's tokens, gathered over processes).

    Shapes: `self_logprobs`, `teacher_logprobs`, `mask`: [B, T] (or any shape, or already flat). `gather`
    concatenates a 1-D tensor over processes; every process then computes the same thresholds.
    `drop_fraction` with `drop_mode` "lowest_gap"/"highest_gap" also records the gap cut-offs of that fraction.
    """
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"routing trim = {trim} must be in [0, 1)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}")
    gather = gather or _identity
    valid = mask.bool()
    log_q_self = gather(self_logprobs.detach()[valid].double())
    log_q_teacher = gather(teacher_logprobs.detach()[valid].double())
    gap = (log_q_teacher - log_q_self).abs()
    q_self, q_teacher = log_q_self.exp(), log_q_teacher.exp()
    self_shift, self_scale = _normalizer(q_self, normalization)
    teacher_shift, teacher_scale = _normalizer(q_teacher, normalization)
    prob_sum = trimmed_mean((q_self - self_shift) / self_scale, trim) + trimmed_mean(
        (q_teacher - teacher_shift) / teacher_scale, trim
    )
    low, high = float("-inf"), float("inf")
    if drop_fraction > 0.0 and drop_mode in ("lowest_gap", "highest_gap") and gap.numel() > 0:
        count = int(round(drop_fraction * gap.numel()))
        ordered = gap.sort().values
        if count > 0 and drop_mode == "lowest_gap":
            low = float(ordered[count - 1])
        elif count > 0:
            high = float(ordered[-count])
    return Thresholds(
        gap=trimmed_mean(gap, trim),
        prob_sum=prob_sum,
        q_self_shift=self_shift,
        q_self_scale=self_scale,
        q_teacher_shift=teacher_shift,
        q_teacher_scale=teacher_scale,
        num_tokens=int(gap.numel()),
        gap_drop_low=low,
        gap_drop_high=high,
    )


def assign_regimes(self_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, thresholds: Thresholds) -> Tensor:
    """Regime code per token (`LH`, `LL`, `HT`, `HS`; `INVALID` where `mask` is False). Shapes: [B, T] -> [B, T]."""
    log_q_self, log_q_teacher = self_logprobs.detach().double(), teacher_logprobs.detach().double()
    gap = (log_q_teacher - log_q_self).abs()
    q_self = (log_q_self.exp() - thresholds.q_self_shift) / thresholds.q_self_scale
    q_teacher = (log_q_teacher.exp() - thresholds.q_teacher_shift) / thresholds.q_teacher_scale
    low_gap = gap < thresholds.gap
    regime = torch.where(
        low_gap,
        torch.where(q_self + q_teacher >= thresholds.prob_sum, LH, LL),
        torch.where(log_q_teacher >= log_q_self, HT, HS),
    )
    return regime.masked_fill(~mask.bool(), INVALID)


def drop_mask(
    self_logprobs: Tensor | None,
    teacher_logprobs: Tensor | None,
    mask: Tensor,
    fraction: float,
    mode: str | None,
    thresholds: Thresholds | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Tokens kept by the Figure 4 ablation (drop `fraction` of tokens at random, or by lowest/highest gap).

    Gap modes use the cut-offs in `thresholds` (computed over the whole scope by `compute_thresholds`); ties at
    the cut-off are dropped. Shapes: [B, T] -> [B, T] bool.
    """
    keep = mask.bool()
    if fraction <= 0.0 or mode is None:
        return keep
    if mode == "random":
        draws = torch.rand(keep.shape, generator=generator, device="cpu").to(keep.device)
        return keep & (draws >= fraction)
    if mode not in DROP_MODES:
        raise ValueError(f"unknown drop mode {mode!r}; known: {', '.join(DROP_MODES)}")
    if self_logprobs is None or teacher_logprobs is None or thresholds is None:
        raise ValueError(f"drop mode {mode!r} needs both privileged passes and thresholds")
    gap = privilege_gap(self_logprobs, teacher_logprobs)
    if mode == "lowest_gap":
        return keep & (gap > thresholds.gap_drop_low)
    return keep & (gap < thresholds.gap_drop_high)


def regime_fractions(regime: Tensor) -> dict[str, Tensor]:
    """Fraction of valid tokens in each regime, as `frac/LH` ... (zeros when no token is valid)."""
    valid = (regime != INVALID).sum().clamp(min=1)
    return {f"frac/{name}": (regime == code).sum() / valid for code, name in enumerate(REGIMES)}


def make_gather(accelerator) -> Gather:
    """A `gather` for `compute_thresholds` that concatenates 1-D tensors of different lengths over processes."""

    def gather(values: Tensor) -> Tensor:
        if accelerator is None or accelerator.num_processes == 1:
            return values
        length = torch.tensor([values.numel()], device=accelerator.device)
        lengths = accelerator.gather(length)
        padded = accelerator.pad_across_processes(values.to(accelerator.device), dim=0)
        gathered = accelerator.gather(padded).view(accelerator.num_processes, -1)
        return torch.cat([row[: int(n)] for row, n in zip(gathered, lengths)]).to(values.device)

    return gather
