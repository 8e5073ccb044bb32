"""The metrics of one training step: token-weighted means over micro-batches and processes, and per-process
numbers reduced over processes."""

from __future__ import annotations

import math

import numpy as np
import torch

from .diagnostics import early_eos_fraction


class StepMetrics:
    """Token-weighted means over micro-batches and processes; `loss` is summed (each micro-batch's loss is
    already a share of the step's mean)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor], group: str | None = None) -> None:
        """One loss call's metrics; with a `group` (`teacher/NAME`), also under `group/key` (metrics by teacher)."""
        tokens = float(metrics["tokens"])
        for key, value in metrics.items():
            for name in (key,) if group is None else (key, f"{group}/{key}"):
                self._add(name, key, float(value), metrics, tokens)

    def _add(self, name: str, key: str, value: float, metrics: dict[str, torch.Tensor], tokens: float) -> None:
        if key in ("loss", "tokens"):
            weight = 1.0
        elif key.startswith("loss/"):
            weight = float(metrics[f"frac/{key[5:]}"]) * tokens
        else:
            weight = tokens
        if weight > 0 and math.isfinite(value):
            self.sums[name] = self.sums.get(name, 0.0) + value * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def reduce(self, accelerator) -> dict[str, float]:
        keys = sorted(self.sums)
        if accelerator.num_processes > 1:
            keys = sorted(set().union(*accelerator.gather_for_metrics([keys], use_gather_object=True)))
            packed = torch.tensor(
                [[self.sums.get(k, 0.0), self.weights.get(k, 0.0)] for k in keys],
                dtype=torch.float64,
                device=accelerator.device,
            )
            packed = accelerator.reduce(packed, reduction="sum").cpu()
            sums = {k: float(packed[i, 0]) for i, k in enumerate(keys)}
            weights = {k: float(packed[i, 1]) for i, k in enumerate(keys)}
            # Data-parallel gradients are averaged over processes, so the step's loss is the mean of theirs.
            for key in keys:
                if _base(key) == "loss":
                    sums[key] = sums[key] / accelerator.num_processes
        else:
            sums, weights = self.sums, self.weights
        out = {}
        for key in keys:
            if _base(key) in ("loss", "tokens"):
                out[key] = sums[key]
            elif weights[key] > 0:
                out[key] = sums[key] / weights[key]
        return out


def _base(key: str) -> str:
    """A metric's key without its group: `teacher/NAME/loss` -> `loss`."""
    return key.split("/", 2)[2] if key.startswith("teacher/") and key.count("/") >= 2 else key


def reduce_number(accelerator, value: float, reduction: str) -> float:
    """A per-process number reduced over processes (`mean`, `max` or `min`)."""
    if accelerator.num_processes == 1:
        return value
    gathered = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return float({"max": gathered.max, "min": gathered.min, "mean": gathered.mean}[reduction]())


def completion_metrics(accelerator, rollouts, tokenizer, answer_pattern: str | None) -> dict[str, float]:
    """Lengths, finished and early-ended shares of a step's completions (`types.Rollouts`), over all processes."""
    lengths = [len(c) for c in rollouts.completion_ids]
    result = {
        "completion_length/mean": reduce_number(accelerator, float(np.mean(lengths)), "mean"),
        "completion_length/max": reduce_number(accelerator, float(np.max(lengths)), "max"),
        "completion_length/min": reduce_number(accelerator, float(np.min(lengths)), "min"),
        "completion/finished": reduce_number(accelerator, float(np.mean(rollouts.finished)), "mean"),
    }
    if answer_pattern:
        texts = tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        early = early_eos_fraction(texts, rollouts.finished, answer_pattern)
        result["completion/early_eos"] = reduce_number(accelerator, early, "mean")
    return result
