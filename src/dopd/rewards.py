"""A verifiable reward beside the distillation signal (docs/method.md, "A verifiable reward").

`objective.reward` names a verifier: `math` (equivalence by math-verify), `exact` (the normalized final answer),
`lab:TASK` (a lab task's checker) — each against the row's reference answer, giving 1.0 or 0.0 — or a user
function `module:function` called as `function(prompt, completion, row)` that returns a number. Each completion's
reward becomes a sequence advantage normalized over the rollouts of its prompt (`group_advantages`), and the
objective's policy-gradient term (`losses.policy_gradient`) reads it on every token of the sequence.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError
from .diagnostics import NonFiniteError

ADVANTAGE_EPS = 1e-6  # added to a group's standard deviation before dividing by it


def group_advantages(rewards: Tensor, groups: list[int]) -> Tensor:
    """Each reward centred and scaled within its group (the completions of one prompt):
    `A_i = (r_i − mean_g) / (std_g + 1e-6)`, std without Bessel's correction; a group whose rewards are all equal
    (or of one completion) gives 0. Shapes: [N] -> [N] float64."""
    rewards = rewards.to(torch.float64)
    advantages = torch.zeros_like(rewards)
    index = torch.as_tensor(groups)
    for group in index.unique():
        members = (index == group).nonzero().squeeze(-1)
        values = rewards[members]
        spread = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
        advantages[members] = (values - values.mean()) / (spread + ADVANTAGE_EPS)
    return advantages


def _import_function(name: str) -> Callable:
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"objective.reward = {name!r}: module {module_name!r} cannot be imported ({error}); put it on PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"objective.reward = {name!r}: {module_name} has no function {function_name!r}; "
            "name a function of (prompt, completion, row) that returns a number"
        )
    return function


class Verifier:
    """The reward of one completion of a row of the prompt set: `reward(index, completion)`."""

    def __init__(self, name: str, prompt_set, task: str | None = None):
        from .answers import make_checker

        self.name = f"lab:{task}" if name == "lab" and task else name
        self.prompts, self.answers = prompt_set.prompts, prompt_set.answers
        self.rows = getattr(prompt_set, "rows", None)
        self.function = self.checker = None
        if self.name == "lab":
            raise ConfigError("objective.reward = 'lab' names a lab task's checker: use lab:TASK (e.g. lab:order)")
        if self.name in ("math", "exact") or self.name.startswith("lab:"):
            missing = [i for i, a in enumerate(self.answers) if a is None or str(a).strip() == ""]
            if missing:
                raise ConfigError(
                    f"objective.reward = {self.name!r} checks each completion against the row's answer, but "
                    f"{len(missing)} of {len(self.answers)} rows have none (row {missing[0]}); set data.answer_column "
                    "to a column holding every row's answer, or use a module:function reward"
                )
            self.checker = make_checker(self.name)
            self.checker.prepare(self.answers, self.prompts, [self.row(i) for i in range(len(self.answers))])
        else:
            self.function = _import_function(self.name)

    def row(self, index: int) -> dict[str, Any]:
        """The dataset row of prompt `index` (its prompt, privileged context and answer when the rows are not
        kept)."""
        if self.rows is not None:
            return dict(self.rows[index])
        return {"prompt": self.prompts[index], "answer": self.answers[index]}

    def reward(self, index: int, completion: str) -> float:
        if self.checker is not None:
            return float(self.checker.score(index, completion))
        value = self.function(self.prompts[index], completion, self.row(index))
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(
                f"objective.reward = {self.name!r} returned {type(value).__name__} {value!r:.60} for row {index}; "
                "the function must return a number (int or float)"
            )
        return float(value)


def completion_rewards(verifier: Verifier, prompts: list[int], rollouts, tokenizer, step: int) -> Tensor:
    """The reward of every completion of a step [N] (float64); a non-finite one stops the run
    (`diagnostics.NonFiniteError`), as a non-finite score does."""
    values = []
    for i, ids in enumerate(rollouts.completion_ids):
        row = prompts[rollouts.prompt_index[i]]
        value = verifier.reward(row, tokenizer.decode(ids, skip_special_tokens=True))
        if not math.isfinite(value):
            raise NonFiniteError(
                f"step {step + 1}: objective.reward = {verifier.name!r} gave {value} for a completion of row {row}; "
                "a reward must be a finite number: fix the verifier"
            )
        values.append(value)
    return torch.tensor(values, dtype=torch.float64)


def step_rewards(verifier: Verifier | None, prompts: list[int], rollouts, tokenizer, step: int, accelerator):
    """A step's rewards and advantages [N] (None, None without a verifier) and their metrics (the mean reward
    over all processes and the share of completions with a positive one)."""
    if verifier is None:
        return None, None, {}
    from .metrics import reduce_number

    rewards = completion_rewards(verifier, prompts, rollouts, tokenizer, step)
    metrics = {
        "reward/mean": reduce_number(accelerator, float(rewards.mean()), "mean"),
        "reward/positive": reduce_number(accelerator, float((rewards > 0).double().mean()), "mean"),
    }
    return rewards, group_advantages(rewards, rollouts.prompt_index), metrics
