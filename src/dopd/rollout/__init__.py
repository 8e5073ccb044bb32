"""Rollouts: the student samples completions of prompts it sees without privileged context (docs/method.md,
"Setting": step 1).

A backend implements one narrow interface, `RolloutEngine.generate(prompt_ids, num_generations, images)`, and returns
completion token ids without padding (ending with the end-of-sequence token when the model produced one). The
trainer never needs to know which engine sampled: transformers `generate` (`hf.py`, the default) or vLLM
(`vllm.py`, imported only when `rollout.backend=vllm`).
"""

from __future__ import annotations

from typing import Protocol

from ..types import Rollouts


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], num_generations: int, images: list | None = None) -> Rollouts:
        """`num_generations` completions of each prompt, grouped by prompt (prompt 0's first). `images`: one image
        per prompt for an image-text student (None for text)."""
        ...

    def sync_weights(self) -> None:
        """Make the engine sample from the student's current weights (a no-op when it shares them)."""
        ...


def trim_completion(token_ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Cut a generated row after its first end-of-sequence token (kept: the student chose it, so it is scored).

    Engines pad only after a finished row, so a row without an end-of-sequence token has no padding to drop."""
    for position, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[: position + 1], True
    return token_ids, False


def end_of_sequence_ids(tokenizer, model) -> set[int]:
    """The tokenizer's and the model's end-of-sequence ids: Qwen3 ends turns with <|im_end|> and texts with
    <|endoftext|>, and either one ends a completion, whichever engine samples it."""
    generation_config = getattr(model, "generation_config", None)
    return _as_set(tokenizer.eos_token_id) | _as_set(getattr(generation_config, "eos_token_id", None))


def _as_set(ids) -> set[int]:
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple, set)) else {int(ids)}


def make_engine(config, objective, accelerator, student_model, teacher, tokenizer, vocab_size: int, processor=None):
    """The rollout engine of a run: vLLM (`rollout.backend=vllm`, imported only then) or transformers generate on
    the live student module (`student_model()`), or on the teacher for a method whose teacher samples (sft)."""
    if config.rollout.backend == "vllm":
        from .vllm import VLLMRollout

        return VLLMRollout.create(student_model(), accelerator, tokenizer, config, vocab_size)
    from .hf import HFRollout

    sampler = (lambda: teacher) if objective.rollout_model == "teacher" else student_model
    return HFRollout(sampler, tokenizer, config.rollout, vocab_size, processor)
