"""LoRA adapters on the student through PEFT (`model.lora.enabled`).

Only the adapters train; the base weights stay frozen. The privileged student pass (docs/method.md, "Setting":
step 2) runs the same PEFT model with the adapters of `objective.self_weights` (a copy of the adapters only for
frozen, EMA or lagged weights; the base is shared). Checkpoints hold the adapter in PEFT's `save_pretrained` form
(loadable with `PeftModel.from_pretrained` or by transformers with PEFT installed); `model.lora.save_merged` also
writes the base with the adapter merged, a plain checkpoint for vLLM or evaluation. PEFT is imported only when LoRA
is on.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .config import ConfigError, LoraConfig

INSTALL = 'pip install "dopd[lora]"'


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"model.lora.enabled needs peft, which is not installed: {INSTALL}")


def add_adapters(model, lora: LoraConfig, exclude_modules: str | None = None):
    """`model` wrapped by PEFT with fresh adapters (the adapter's B starts at zero: the first step's student is
    the base model). `exclude_modules`: a regular expression of module names left without adapters (an image-text
    student's vision tower)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    settings = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        exclude_modules=exclude_modules,
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, settings)
    except ValueError as error:  # PEFT's message when no module matches
        first = str(error).splitlines()[0]
        raise ConfigError(
            f"model.lora.target_modules = {list(lora.target_modules)} does not fit the student: {first}"
        ) from None
    if hasattr(wrapped.get_output_embeddings(), "lora_A"):  # a pattern that also matched the head under another name
        raise ConfigError(
            f"model.lora.target_modules = {list(lora.target_modules)} puts an adapter on the output head, which the "
            "loss reads outside the forward (the adapter would never train); name the modules to exclude it"
        )
    return wrapped


def load_adapters(model, directory: str):
    """`model` with the trainable adapter saved in `directory` (resuming a LoRA run)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, directory, is_trainable=True)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def save_merged(
    base_path: str, adapter_dir: str, out_dir: str, dtype, trust_remote_code: bool, image_text: bool = False
) -> None:
    """Load the base on the CPU, merge the adapter saved in `adapter_dir`, write a plain checkpoint to `out_dir`.

    A fresh copy rather than merging the training model in place: the training model may be sharded, and an
    in-place merge followed by an unmerge would round the base weights of a half-precision student."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_class = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # building a model may draw random numbers: leave the run's stream
        base = model_class.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir)
