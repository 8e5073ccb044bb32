"""Pretraining of the lab's tiny models: a Qwen3 of a given size, trained from scratch by supervised fine-tuning on
a task's worked completions, some of them with privileged input in the prompt.

Tiny models read privileged input only when reading it pays off during pretraining, so each example is shown
with a privileged kind drawn from `kind_mix` (none, answer, hints, solution). The loss falls on the completion
and the end-of-sequence token only. Only training-split prompts are shown (`tasks.prompt_split`). `pretrain` can
keep copies of the weights at given steps: the lab's student is such an earlier state of its teacher's own
pretraining (`LabPairConfig.student_checkpoints`).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dopd.lab.evaluation import render_lab_prompt
from dopd.lab.tasks import Example, Task, prompt_split

EVAL_SEED = 12345  # the property checks draw their (validation-split) prompts with this seed


@dataclass(frozen=True)
class ModelSize:
    layers: int
    hidden: int
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128


@dataclass(frozen=True)
class Recipe:
    """The optimizer and data of one pretraining run."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    kind_mix: tuple[tuple[str, float], ...]


def make_model(size: ModelSize, tokenizer: Any, seed: int) -> Qwen3ForCausalLM:
    if size.hidden % size.heads or size.heads % size.kv_heads:
        raise ValueError(f"model size {size}: hidden must divide by heads and heads by kv_heads")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def sft_batch(tokenizer: Any, examples: list, kinds: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; the loss falls on completion tokens and eos only."""
    rows = []
    for example, kind in zip(examples, kinds):
        prompt_ids = tokenizer(render_lab_prompt(tokenizer, example, kind), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids, completion_ids))
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _lr_factor(recipe: Recipe):
    """Linear warm-up, then cosine decay to 5% of the peak rate."""

    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def training_examples(task: Task, rng: random.Random, n: int) -> list[Example]:
    """The next `n` examples of the pretraining stream: draws from `rng`, keeping training-split prompts only (the
    lab's validation and test prompts are never shown)."""
    examples: list[Example] = []
    while len(examples) < n:
        example = task.sample(rng)
        if prompt_split(example.prompt) == "train":
            examples.append(example)
    return examples


def pretrain(
    model: Any,
    tokenizer: Any,
    task: Task,
    recipe: Recipe,
    seed: int,
    log: Any = None,
    keep_at: Sequence[int] = (),
    stop_after: int | None = None,
) -> tuple[list[dict[str, float]], dict[int, dict[str, torch.Tensor]]]:
    """Plain SFT with AdamW. Returns the logged losses and, for each step in `keep_at`, a copy of the weights after
    that many optimizer steps. `stop_after` ends the run after that many steps of the recipe's schedule (its
    learning rates stay those of the whole recipe)."""
    rng = random.Random(seed)
    kinds, weights = zip(*recipe.kind_mix)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(recipe))
    model.train()
    history, kept, running, start = [], {}, 0.0, time.time()
    last = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    for step in range(last):
        examples = training_examples(task, rng, recipe.batch_size)
        batch = sft_batch(tokenizer, examples, rng.choices(kinds, weights, k=len(examples)))
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step + 1 in keep_at:
            kept[step + 1] = copy.deepcopy(model.state_dict())
        if (step + 1) % 100 == 0 or step + 1 == last:
            n = (step % 100) + 1
            history.append({"step": step + 1, "loss": running / n, "seconds": round(time.time() - start, 1)})
            running = 0.0
            if log:
                log(f"  step {step + 1}/{recipe.steps} loss {history[-1]['loss']:.4f} ({history[-1]['seconds']} s)")
    model.eval()
    return history, kept
