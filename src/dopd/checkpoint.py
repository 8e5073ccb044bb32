"""Checkpoints of a run: the student in `save_pretrained` form (loadable by transformers and vLLM) with its
tokenizer, plus the optimizer, the schedule, every process's random state and the data position. With LoRA the
student is its adapter (PEFT's form), and `model.lora.save_merged` adds `merged/`, the base with the adapter merged.

A checkpoint is written under a temporary name and renamed when complete, so a run killed while saving leaves
the previous checkpoint intact and never a half-written one; `resume` continues from the newest complete one and
gives the same weights as a run that never stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from .config import Config, ConfigError, to_dict

_STEP_DIR = re.compile(r"^step_(\d+)$")
# Keys that may differ between a run and its resumption.
_RESUMABLE = {"checkpoint.resume", "logging.overwrite", "logging.progress_bar", "logging.report_to", "train.steps"}


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return None
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m)
    return os.path.join(root, f"step_{steps[-1]:06d}") if steps else None


def check_same_run(run_dir: str, config: Config) -> None:
    """Refuse to resume a run directory whose saved config differs from this one (beyond resumable keys)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise ConfigError(
            f"checkpoint.resume is true but {run_dir} holds no config.yaml: it is not a dopd run directory"
        )
    with open(path) as handle:
        saved = yaml.safe_load(handle)
    current = to_dict(config)
    differing = [
        f"{section}.{key}"
        for section, values in current.items()
        for key, value in values.items()
        if f"{section}.{key}" not in _RESUMABLE and saved.get(section, {}).get(key) != _plain(value)
    ]
    if differing:
        raise ConfigError(
            f"checkpoint.resume: the run in {run_dir} was started with other settings for {', '.join(differing)}; "
            "resume with the same config or start a new output_dir"
        )


def _plain(value):
    return json.loads(json.dumps(value))


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


def save(trainer, step: int) -> str:
    """Write checkpoint `step` atomically and keep only the newest `keep_last`."""
    accelerator = trainer.accelerator
    root = checkpoint_root(trainer.run_dir)
    final = os.path.join(root, f"step_{step:06d}")
    staging = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    model_state = accelerator.get_state_dict(trainer.student)
    torch.save(_rng_state(), os.path.join(staging, f"rng_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        save_model(trainer, model_state, os.path.join(staging, "model"))
        torch.save(
            {
                "step": step,
                "data_position": trainer.order.position,
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
            },
            os.path.join(staging, "trainer_state.pt"),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(staging, final)
        kept = sorted(d for d in os.listdir(root) if _STEP_DIR.match(d))
        for old in kept[: -trainer.config.checkpoint.keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_model(trainer, model_state: dict, directory: str) -> None:
    """The student (or its LoRA adapter) and the tokenizer in `directory`; with `model.lora.save_merged`, the
    merged model in `directory/merged`. Main process only."""
    trainer.inner.save_pretrained(directory, state_dict=model_state)
    processing = trainer.processor or trainer.tokenizer  # an image-text student's processor holds its tokenizer
    processing.save_pretrained(directory)
    lora = trainer.config.model.lora
    if lora.enabled and lora.save_merged:
        from .lora import save_merged

        merged = os.path.join(directory, "merged")
        model = trainer.config.model
        save_merged(model.student, directory, merged, torch.float32, model.trust_remote_code,
                    trainer.processor is not None)
        processing.save_pretrained(merged)


def load_state(directory: str, trainer) -> int:
    """Restore optimizer, schedule, data position and random state from a checkpoint; returns its step."""
    state = torch.load(os.path.join(directory, "trainer_state.pt"), map_location="cpu", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.order.position = state["data_position"]
    rng_path = os.path.join(directory, f"rng_state_{trainer.accelerator.process_index}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False))
    return int(state["step"])


def truncate_metrics(run_dir: str, step: int) -> None:
    """Drop metric lines past `step` (written by the interrupted run after its last checkpoint)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        kept = []
        with open(path) as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the interruption
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as handle:
            handle.writelines(kept)
        os.replace(path + ".tmp", path)


def save_final(trainer) -> str:
    """The trained student and its tokenizer in `save_pretrained` form under `final/`, written atomically."""
    accelerator = trainer.accelerator
    final = os.path.join(trainer.run_dir, "final")
    model_state = accelerator.get_state_dict(trainer.student)
    if accelerator.is_main_process:
        staging = final + ".tmp"
        shutil.rmtree(staging, ignore_errors=True)
        save_model(trainer, model_state, staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final
