"""Regimes of the plan tokens against the other tokens in a lab run's saved DOPD samples.

Plan tokens are the operands a step chooses (the first character of each step and the character after its
operator): on the `order` task they carry the evaluation order that only the privileged input gives. The other
tokens are results, separators and the answer.

    python scripts/lab_token_regimes.py runs/lab/hints/dopd/lr0.0003/seed_*/samples.jsonl
"""

from __future__ import annotations

import collections
import statistics
import sys

from dopd.lab.tasks import OrderTask
from dopd.routing import REGIMES
from dopd.run_dir import read_jsonl


def plan_positions(tokens: list[str]) -> list[bool]:
    """The arithmetic tasks' plan tokens (`ArithmeticTask.plan_positions`: the operands each step chooses)."""
    return OrderTask().plan_positions(tokens)


def main(paths: list[str]) -> None:
    regimes = {"plan": collections.Counter(), "other": collections.Counter()}
    gaps: dict[str, list[float]] = {"plan": [], "other": []}
    samples = 0
    for path in paths:
        for sample in read_jsonl(path):
            samples += 1
            for is_plan, regime, gap in zip(plan_positions(sample["tokens"]), sample["regime"], sample["gap"]):
                if regime is not None:
                    kind = "plan" if is_plan else "other"
                    regimes[kind][regime] += 1
                    gaps[kind].append(gap)
    print(f"{samples} samples")
    for kind in ("plan", "other"):
        total = sum(regimes[kind].values())
        fractions = ", ".join(f"{r} {regimes[kind][r] / total:.2f}" for r in REGIMES)
        print(
            f"{kind:>5} tokens ({total}): {fractions}; gap mean {statistics.fmean(gaps[kind]):.3f}, "
            f"median {statistics.median(gaps[kind]):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
