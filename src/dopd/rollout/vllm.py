"""Rollouts with vLLM (`rollout.backend=vllm`, spec step 1), through TRL's `VLLMGeneration`.

Two modes. `colocate`: a vLLM engine inside every training process, on its GPU, asleep (weights and KV cache
freed) between rollouts when `rollout.vllm.enable_sleep_mode` is on. `server`: one `vllm serve` process on GPUs of
its own; process 0 sends every prompt and streams the weights over NCCL. After each optimizer step `sync_weights`
hands vLLM the student's current weights: `VLLMGeneration.sync_weights` gathers sharded parameters (FSDP2,
ZeRO-3), merges LoRA adapters for the copy and renames parameters to the checkpoint names vLLM loads (PEFT's
`base_model.model.` prefix and `.base_layer` dropped, adapter tensors skipped). `tests/test_rollout.py` runs that
code against a fake vLLM and checks the names and values it receives against a Qwen3 checkpoint's state dict.

The engine is a seam: anything with `VLLMGeneration`'s `generate(prompts, images, num_generations)` and
`sync_weights()` will do, so the tests run this module with a fake engine on a CPU. vLLM itself is imported only
when this backend is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from ..config import Config, ConfigError
from ..engines import head_rows
from ..self_weights import fsdp2_units
from . import Rollouts, end_of_sequence_ids, trim_completion

INSTALL = 'pip install "dopd[vllm]"'


class GenerationEngine(Protocol):
    """What this backend needs from `trl.generation.vllm_generation.VLLMGeneration`."""

    def generate(self, prompts: list[list[int]], images, num_generations: int) -> tuple: ...

    def sync_weights(self) -> None: ...


def require_vllm(device=None) -> None:
    """Stop with one line when the backend's packages or a GPU are missing (checked before any model loads)."""
    missing = [name for name in ("vllm", "trl") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"rollout.backend = vllm needs {' and '.join(missing)}, which is not installed: {INSTALL} "
            "(on a machine with a GPU), or use rollout.backend=hf"
        )
    if device is not None and getattr(device, "type", str(device)) == "cpu":
        raise ConfigError("rollout.backend = vllm needs a GPU and this process runs on the CPU; use rollout.backend=hf")


def engine_settings(config: Config, eos_ids: set[int], vocab_size: int, head_rows: int) -> dict:
    """`VLLMGeneration`'s keyword arguments from the run's config: sampling from the rollout settings alone (as the
    hf backend does), ending at the same end-of-sequence ids, never sampling ids the teacher cannot score."""
    r, v = config.rollout, config.rollout.vllm
    extra: dict = {"stop_token_ids": sorted(eos_ids)}
    if head_rows > vocab_size:
        extra["allowed_token_ids"] = list(range(vocab_size))
    return dict(
        mode=v.mode,
        server_base_url=v.server_base_url,
        server_host=v.server_host,
        server_port=v.server_port,
        server_timeout=v.server_timeout,
        group_port=v.group_port,
        tensor_parallel_size=v.tensor_parallel_size,
        gpu_memory_utilization=v.gpu_memory_utilization,
        max_model_length=v.max_model_len or config.data.max_prompt_length + r.max_new_tokens,
        enable_sleep_mode=v.enable_sleep_mode and v.mode == "colocate",
        trust_remote_code=config.model.trust_remote_code,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_completion_length=r.max_new_tokens,
        logprobs=None,  # the scoring passes compute every log-prob the objective needs
        generation_kwargs=extra,
    )


class VLLMRollout:
    """The rollout interface (`generate`, `sync_weights`) over a `VLLMGeneration`-like engine."""

    def __init__(self, engine: GenerationEngine, eos_ids: set[int], units: list | None = None):
        self.engine = engine
        self.eos_ids = eos_ids
        self.units = units or []  # the student's FSDP2 units
        # vLLM starts from the checkpoint on disk; a resumed or LoRA student differs from it, so the first rollout
        # syncs.
        self.synced = False

    @classmethod
    def create(cls, model, accelerator, tokenizer, config: Config, vocab_size: int) -> VLLMRollout:
        """Start (colocate) or connect to (server) vLLM for `model`, the unwrapped student (a PEFT model with
        LoRA). Every process must call it: engine start-up and weight gathering are collective."""
        require_vllm(accelerator.device)
        from trl.generation.vllm_generation import VLLMGeneration

        eos_ids = end_of_sequence_ids(tokenizer, model)
        rows = head_rows(model)
        settings = engine_settings(config, eos_ids, vocab_size, rows)
        return cls(VLLMGeneration(model, accelerator, tokenizer, **settings), eos_ids, fsdp2_units(model))

    @contextmanager
    def sampling(self, settings) -> Iterator[VLLMRollout]:
        """This engine sampling with other decoding settings meanwhile (`settings`: a `RolloutConfig`; the
        trainer's validation): TRL's engine reads them at every `generate` call."""
        values = {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
            "max_completion_length": settings.max_new_tokens,
        }
        saved = {name: getattr(self.engine, name) for name in values}
        for name, value in values.items():
            setattr(self.engine, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self.engine, name, value)

    def sync_weights(self) -> None:
        # TRL gathers each FSDP2 parameter with `full_tensor()`, which only a sharded one has: a unit left gathered
        # by a forward since the last backward (accelerate's root unit is not resharded after forward) holds plain
        # tensors there, so every unit is resharded first.
        for unit in self.units:
            unit.reshard()
        self.engine.sync_weights()
        self.synced = True

    def generate(self, prompt_ids: list[list[int]], num_generations: int, images: list | None = None) -> Rollouts:
        if images is not None:  # the config check refuses an image-text run with this backend before it starts
            raise ValueError("rollout.backend = vllm does not carry images yet; use rollout.backend=hf")
        if not self.synced:
            self.sync_weights()
        # VLLMGeneration takes each prompt repeated num_generations times in a row (server mode samples
        # `n = num_generations` of every distinct prompt) and returns completions in the same order.
        repeated = [list(ids) for ids in prompt_ids for _ in range(num_generations)]
        _, completion_ids, _, _ = self.engine.generate(repeated, None, num_generations)
        if len(completion_ids) != len(repeated):
            raise RuntimeError(f"vLLM returned {len(completion_ids)} completions for {len(repeated)} requests")
        index, completions, finished = [], [], []
        for row, generated in enumerate(completion_ids):
            ids, done = trim_completion(list(generated), self.eos_ids)
            index.append(row // num_generations)
            completions.append(ids)
            finished.append(done)
        return Rollouts(index, completions, finished)
