"""Where a method's objective puts its weight: per DOPD regime, on the problems whose prompt determines the answer
and on the others, and on the plan tokens against the rest, the share of the tokens, of the loss and of the
squared gradient norm.

The measurement takes one batch of rollouts (the first `n` training prompts, the run's own sampling), scores it as
a training step would (the step's cuts, its mean over sequences) and evaluates the objective in the plain form on
the student's logits made a leaf. Every term of every method reads only its own position's logits, so the
gradient with respect to the logits splits exactly by token: a cell's squared gradient norm is the sum of its
tokens' squared norms, and the cells' shares add up to 1, as the token and loss shares do. (The gradient with
respect to the weights mixes tokens and would not split.) The loss share is the share of the sum of the absolute
per-token contributions, 1/(|y|·sequences) factors included, so that a sampled estimate's negative values count by
size. The global random state is put back afterwards: the run continues as if nothing was measured.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..routing import REGIMES

if TYPE_CHECKING:
    from ..train import Trainer
    from .tasks import Example, Task

MEASURES = ("tokens", "loss", "grad")


def attribute(trainer: Trainer, task: Task, examples: list[Example], n: int) -> dict:
    """The shares of the objective on training rows 0..n-1 (`examples[i]` is row i's problem) with the student's
    weights as they are: {"cells": [...], "by_regime", "by_part", "by_token"} (each a dict of shares per measure),
    and the number of tokens measured."""
    from ..plain import compute_objective
    from ..scoring import frozen_pass
    from ..teachers import cuts_for
    from ..terms import LossScope

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        prompts = list(range(min(n, len(examples))))
        rollouts = trainer.rollouts(prompts, step=0)
        batches = trainer.score(prompts, rollouts)
        cuts = trainer.batch_cuts(batches)  # with several teachers, by teacher: each batch reads its own
        scope = LossScope(num_sequences=sum(len(b.prompt_rows) for b in batches))
        sums: dict[tuple[str, str, str], list[float]] = {}
        total_tokens = 0
        for batch in batches:
            inputs = trainer.pass_inputs(trainer.prompts.student_ids, batch.prompt_rows, batch.completions, False)
            with torch.no_grad():
                head = frozen_pass(trainer.inner, inputs, trainer.vocab_size, trainer.student_head_weights)
            logits = head.logits().detach().float().requires_grad_(True)
            ids, mask = batch.completions.ids.to(logits.device), batch.completions.mask.to(logits.device)
            output = compute_objective(
                trainer.objective,
                logits,
                ids,
                mask,
                scope=replace(scope, cuts=cuts_for(cuts, batch.teacher)),
                self_logits_BTV=None if batch.self_head is None else batch.self_head.logits().float(),
                teacher_logits_BTV=None if batch.teacher_head is None else batch.teacher_head.logits().float(),
            )
            output.loss.backward()
            grad = logits.grad.double().pow(2).sum(-1)  # [B, T]: each token's squared gradient norm
            lengths = mask.sum(-1, keepdim=True).clamp(min=1)
            loss = (output.token_loss.double().abs() / lengths / scope.num_sequences).detach()
            for b, row in enumerate(batch.prompt_rows):
                part = "undetermined" if examples[row].determined is False else "determined"
                length = int(mask[b].sum())
                tokens = trainer.tokenizer.convert_ids_to_tokens(ids[b, :length].tolist())
                plan = task.plan_positions(tokens)
                for t in range(length):
                    regime = "all" if output.regime is None else REGIMES[int(output.regime[b, t])]
                    kind = "other" if plan is None else "plan" if plan[t] else "other"
                    cell = sums.setdefault((regime, part, kind), [0.0, 0.0, 0.0])
                    cell[0] += 1.0
                    cell[1] += float(loss[b, t])
                    cell[2] += float(grad[b, t])
                total_tokens += length
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    return shares(sums, total_tokens)


def shares(sums: dict[tuple[str, str, str], list[float]], total_tokens: int) -> dict:
    """Per cell (regime, part, token kind) and per margin, each measure's share of its total."""
    totals = [sum(values[i] for values in sums.values()) for i in range(len(MEASURES))]

    def share(values: list[float]) -> dict[str, float]:
        return {m: values[i] / totals[i] if totals[i] else 0.0 for i, m in enumerate(MEASURES)}

    def margin(position: int) -> dict[str, dict[str, float]]:
        grouped: dict[str, list[float]] = {}
        for key, values in sums.items():
            group = grouped.setdefault(key[position], [0.0] * len(MEASURES))
            for i, value in enumerate(values):
                group[i] += value
        return {name: share(values) for name, values in sorted(grouped.items())}

    cells = [
        {"regime": regime, "part": part, "token": kind, **share(values)}
        for (regime, part, kind), values in sorted(sums.items())
    ]
    return {
        "tokens": total_tokens,
        "cells": cells,
        "by_regime": margin(0),
        "by_part": margin(1),
        "by_token": margin(2),
    }


def mean_attribution(records: list[dict]) -> dict:
    """The margins' shares averaged over runs (seeds); an empty dict when no run measured them."""
    records = [r for r in records if r]
    if not records:
        return {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for margin in ("by_regime", "by_part", "by_token"):
        names = sorted({name for r in records for name in r[margin]})
        out[margin] = {
            name: {m: sum(r[margin].get(name, {}).get(m, 0.0) for r in records) / len(records) for m in MEASURES}
            for name in names
        }
    return out
