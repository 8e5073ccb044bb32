"""Accuracy of a lab model by greedy generation: final-answer accuracy and full-completion match.

Both are reported because with the `answer` kind a model can copy the final answer after wrong steps
(lab notes): final-answer accuracy alone would overstate it. Prompts are rendered exactly as in pretraining
and training (`dopd.prompts.render_prompt`, privileged context inserted with `LAB_PRIVILEGED_TEMPLATE`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dopd.lab.tasks import LAB_PRIVILEGED_TEMPLATE, Example, Task, get_task, privileged_context
from dopd.prompts import render_prompt


def render_lab_prompt(tokenizer: Any, example: Example, kind: str = "none") -> str:
    """The text a lab model reads before its completion, without (kind "none") or with privileged input."""
    return render_prompt(tokenizer, example.prompt, privileged_context(example, kind), template=LAB_PRIVILEGED_TEMPLATE)


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 128,
    max_new_tokens: int = 64,
    sample: bool = False,
) -> list[str]:
    """Completions (special tokens removed) of already rendered prompts, left-padded in batches: greedy, or with
    `sample` drawn at temperature 1 from the whole distribution (seed torch's generator first)."""
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs tokenizer.padding_side == 'left'")
    was_training = model.training
    model.eval()
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False
        )
        output = model.generate(
            **batch,
            **({"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {"do_sample": False}),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    model.train(was_training)
    return completions


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task | str,
    examples: Sequence[Example],
    kind: str = "none",
    batch_size: int = 128,
    max_new_tokens: int | None = None,
    n_samples: int = 3,
) -> dict[str, Any]:
    """{"answer_accuracy", "full_match" (fractions), "n", "samples" (the first few prompt/completion pairs), and
    "parts": answer accuracy on the examples whose prompt determines the answer and on the others, with their
    counts, when the examples carry the `determined` flag, and on each source task of a mixture (`task:NAME`)}."""
    task = get_task(task)
    if not examples:
        raise ValueError("evaluate() needs at least one example")
    if max_new_tokens is None:
        # Room for the longest reference plus eos and a little more, so that a rambling model is caught.
        max_new_tokens = (
            max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples) + 8
        )
    prompts = [render_lab_prompt(tokenizer, ex, kind) for ex in examples]
    completions = generate_completions(model, tokenizer, prompts, batch_size, max_new_tokens)
    results = [task.check(ex, text) for ex, text in zip(examples, completions)]
    n = len(results)
    report = {
        "answer_accuracy": sum(r.answer_correct for r in results) / n,
        "full_match": sum(r.full_match for r in results) / n,
        "n": n,
        "kind": kind,
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts[:n_samples], completions[:n_samples])],
    }
    if any(ex.determined is not None for ex in examples):
        report["parts"] = accuracy_by_part(examples, [r.answer_correct for r in results])
    if any(ex.source is not None for ex in examples):  # a mixture: accuracy on each source task too
        for source in dict.fromkeys(ex.source for ex in examples):
            mine = [r.answer_correct for ex, r in zip(examples, results) if ex.source == source]
            report.setdefault("parts", {})[f"task:{source}"] = sum(mine) / len(mine)
    return report


def accuracy_by_part(examples: Sequence[Example], correct: Sequence[bool]) -> dict[str, float | int | None]:
    """Answer accuracy on the examples whose prompt determines the answer and on the others (None where a part
    is empty), with the count of each part. Examples without the flag count as determined."""
    parts: dict[str, list[bool]] = {"determined": [], "undetermined": []}
    for example, ok in zip(examples, correct):
        parts["undetermined" if example.determined is False else "determined"].append(bool(ok))
    out: dict[str, float | int | None] = {}
    for name, values in parts.items():
        out[name] = sum(values) / len(values) if values else None
        out[f"n_{name}"] = len(values)
    return out
