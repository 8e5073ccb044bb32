"""Checkpoints of a run: the student in `save_pretrained` form (loadable by transformers and vLLM) with its
tokenizer, plus the optimizer, the schedule, every process's random state and the data position. With LoRA the
student is its adapter (PEFT's form), and `model.lora.save_merged` adds `merged/`, the base with the adapter merged.

A checkpoint is written under a temporary name and renamed when complete, so a run killed while saving leaves
the previous checkpoint intact and never a half-written one; `resume` continues from the newest complete one and
gives the same weights as a run that never stopped.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import Config, ConfigError

_STEP_DIR = re.compile(r"^step_(\d+)$")
SELF_WEIGHTS = "self_weights.safetensors"  # the privileged self's copy (objective.self_weights other than live)


@dataclass
class CheckpointState:
    """What a checkpoint saves and restores: the student as the engine wraps it and its tokenizer (or processor),
    the optimizer, the schedule, the data order, the privileged self's copy and the collapse watch."""

    config: Config
    accelerator: Any
    student: torch.nn.Module
    processing: Any  # the tokenizer, or an image-text model's processor, saved beside the model
    optimizer: Any
    scheduler: Any
    order: Any  # data.PromptOrder
    self_weights: Any  # self_weights.SelfWeights | None
    collapse: Any  # diagnostics.CollapseWatch

    @property
    def run_dir(self) -> str:
        return self.config.logging.output_dir

    @property
    def inner(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.student)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m)
    return os.path.join(root, f"step_{steps[-1]:06d}") if steps else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: CheckpointState, step: int) -> str:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`."""
    accelerator = state.accelerator
    root = checkpoint_root(state.run_dir)
    final = os.path.join(root, f"step_{step:06d}")
    staging = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    model_state = accelerator.get_state_dict(state.student)
    torch.save(_rng_state(), os.path.join(staging, f"rng_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        save_model(state, model_state, os.path.join(staging, "model"))
        torch.save(
            {
                "step": step,
                "data_position": state.order.position,
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "collapse_watch": state.collapse.state_dict(),
            },
            os.path.join(staging, "trainer_state.pt"),
        )
        if state.self_weights is not None and not state.self_weights.is_live:
            from safetensors.torch import save_file

            save_file(state.self_weights.state_dict(), os.path.join(staging, SELF_WEIGHTS))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(staging, final)
        kept = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
        for old in kept[: -state.config.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model(state: CheckpointState, model_state: dict, directory: str) -> None:
    """The student (or its LoRA adapter) and the tokenizer in `directory`; with `model.lora.save_merged`, the
    merged model in `directory/merged`. Main process only."""
    from .loading import quiet_transformers

    with quiet_transformers():  # no "Writing model shards" bars
        state.inner.save_pretrained(directory, state_dict=model_state)
    processing = state.processing
    processing.save_pretrained(directory)
    lora = state.config.model.lora
    if lora.enabled and lora.save_merged:
        from .lora import save_merged

        merged = os.path.join(directory, "merged")
        model = state.config.model
        save_merged(
            model.student,
            directory,
            merged,
            torch.float32,
            model.trust_remote_code,
            hasattr(processing, "image_processor"),
        )
        processing.save_pretrained(merged)


def load_state(directory: str, state: CheckpointState) -> int:
    """Restore optimizer, schedule, data position and random state from a checkpoint; returns its step."""
    saved = torch.load(os.path.join(directory, "trainer_state.pt"), map_location="cpu", weights_only=False)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.order.position = saved["data_position"]
    state.collapse.load_state_dict(saved.get("collapse_watch", {}))
    if state.self_weights is not None and not state.self_weights.is_live:
        from safetensors.torch import load_file

        path = os.path.join(directory, SELF_WEIGHTS)
        if not os.path.exists(path):
            raise ConfigError(
                f"checkpoint.resume: {directory} holds no {SELF_WEIGHTS} (the privileged self's copy for "
                f"objective.self_weights={state.config.objective.self_weights}); it was written by another run"
            )
        try:
            state.self_weights.load_state_dict(load_file(path))
        except ValueError as error:
            raise ConfigError(f"checkpoint.resume: {directory}: {error}") from None
    rng_path = os.path.join(directory, f"rng_state_{state.accelerator.process_index}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return int(saved["step"])


def save_best(state: CheckpointState, best: dict) -> str:
    """The model of the best validation accuracy (`checkpoint.keep_best`) under `best/`, with `best.json` (its
    step and accuracy), written atomically over the previous best. Every process calls it."""
    import json

    accelerator = state.accelerator
    directory = os.path.join(state.run_dir, "best")
    model_state = accelerator.get_state_dict(state.student)
    if accelerator.is_main_process:
        staging = directory + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_model(state, model_state, staging)
        with open(os.path.join(staging, "best.json"), "w", encoding="utf-8") as handle:
            json.dump(best, handle)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    accelerator.wait_for_everyone()
    return directory


def save_final(state: CheckpointState) -> str:
    """The trained student and its tokenizer in `save_pretrained` form under `final/`, written atomically."""
    accelerator = state.accelerator
    final = os.path.join(state.run_dir, "final")
    model_state = accelerator.get_state_dict(state.student)
    if accelerator.is_main_process:
        staging = final + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_model(state, model_state, staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final
