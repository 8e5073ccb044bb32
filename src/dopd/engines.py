"""What the distributed engines (DDP, FSDP2, DeepSpeed ZeRO-3; chosen by `accelerate launch --config_file`) need
from the trainer: launch settings that cannot work are refused before any model loads, the frozen teacher is
sharded (or offloaded) the way each engine allows, and output heads are read in full.

The loss reads each pass's output head outside the model's forward (the chunked loss never builds full logits).
Under FSDP2 the head's unit is not resharded after the forward (accelerate puts it in its own unit), so the head
is whole when the loss reads it and its gradient is reduced with the rest in backward. DeepSpeed ZeRO-3 frees
every parameter after its module's forward, so there a head is read through `GatheredParameters`: fine for a
frozen head (the teacher's; the student's under LoRA), not for a trained one, which is refused.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from .config import Config, ConfigError
from .self_weights import fsdp2_units


def engine_name(accelerator) -> str:
    """ddp (one process included), fsdp2, fsdp1, deepspeed."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp"


def zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def check_engine(config: Config, accelerator) -> None:
    """Refuse launch settings the trainer cannot run, each with one line naming the setting and the fix."""
    engine = engine_name(accelerator)
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no" and launched != config.train.mixed_precision:
        raise ConfigError(
            f"the accelerate config asks for mixed_precision {launched} but train.mixed_precision = "
            f"{config.train.mixed_precision}; set train.mixed_precision={launched} (dopd passes it to accelerate)"
        )
    if engine == "fsdp1":
        raise ConfigError(
            "FSDP version 1 is not supported (its flat parameters hide the output head the loss reads); set "
            "fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp2.yaml)"
        )
    vllm, processes = config.rollout.vllm, getattr(accelerator, "num_processes", 1)
    if config.rollout.backend == "vllm" and vllm.mode == "colocate" and processes % vllm.tensor_parallel_size:
        raise ConfigError(
            f"rollout.vllm.tensor_parallel_size = {vllm.tensor_parallel_size} must divide the number of processes "
            f"({processes}): each group of that many processes shares one colocated vLLM engine"
        )
    if engine in ("fsdp2", "deepspeed") and config.checkpoint.resume:
        raise ConfigError(
            f"checkpoint.resume under {engine} is not supported yet: the optimizer state is sharded and checkpoints "
            "keep the main process's share only; resume with DDP, or start a new run from checkpoints/step_N/model"
        )
    if engine == "deepspeed":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        steps = ds.get("gradient_accumulation_steps", 1)
        if steps not in (1, "auto"):
            raise ConfigError(
                f"the DeepSpeed config sets gradient_accumulation_steps = {steps}; dopd accumulates micro-batches "
                "itself (train.micro_batch_size), so set it to 1 or auto"
            )
        clipping = ds.get("gradient_clipping", "auto")
        if clipping != "auto" and clipping != (config.optim.max_grad_norm or 0.0):
            raise ConfigError(
                f"the DeepSpeed config clips gradients at {clipping} but optim.max_grad_norm = "
                f"{config.optim.max_grad_norm}; DeepSpeed does the clipping, so make them equal"
            )
        t = config.train
        per_process = t.prompts_per_step // max(processes, 1) * config.rollout.num_generations
        if t.max_tokens_per_micro_batch or t.micro_batch_size < per_process:
            raise ConfigError(
                "under DeepSpeed each step must be one micro-batch per process: accelerate steps DeepSpeed's engine "
                "after every backward, so accumulating micro-batches would take an optimizer step per micro-batch; "
                f"set train.micro_batch_size={per_process} (this process's sequences) and "
                "train.max_tokens_per_micro_batch=0, or use FSDP2 (configs/accelerate/fsdp2.yaml)"
            )
        lora = config.model.lora
        if zero_stage(accelerator) == 3 and not lora.enabled:
            raise ConfigError(
                "DeepSpeed ZeRO-3 with a fully trained student is not supported: the loss reads the student's output "
                "head outside the forward, where ZeRO-3 has freed it; use FSDP2 (configs/accelerate/fsdp2.yaml) or "
                "LoRA (model.lora.enabled=true, whose head is frozen)"
            )
        plugin = accelerator.state.deepspeed_plugin
        gathers = ds.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", "auto")
        if zero_stage(accelerator) == 3 and not (plugin.zero3_save_16bit_model if gathers == "auto" else gathers):
            raise ConfigError(
                "DeepSpeed ZeRO-3 can save the model (checkpoints, the final model) only with its weights gathered: "
                "set zero3_save_16bit_model: true in the accelerate config (stage3_gather_16bit_weights_on_model_save: "
                "true in a DeepSpeed JSON), as configs/accelerate/deepspeed_zero3.yaml does"
            )
        if zero_stage(accelerator) == 3 and config.objective.self_weights != "live":
            raise ConfigError(
                f"objective.self_weights = {config.objective.self_weights} under DeepSpeed ZeRO-3 is not supported: "
                "ZeRO-3 partitions the adapters across processes, so no process holds a whole copy to score with; set "
                "objective.self_weights=live, or use FSDP2 (configs/accelerate/fsdp2.yaml)"
            )


def parameter_shape(tensor: torch.Tensor) -> torch.Size:
    """A parameter's shape as the model defines it. A parameter that DeepSpeed ZeRO-3 partitioned when the model
    was loaded (accelerate turns `from_pretrained` into a partitioned load as soon as its DeepSpeed state exists)
    holds an empty tensor and keeps its shape in `ds_shape`."""
    return getattr(tensor, "ds_shape", None) or tensor.shape


def head_rows(model: torch.nn.Module) -> int:
    """The number of rows (vocabulary entries) of a model's output head, partitioned or not."""
    return int(parameter_shape(model.get_output_embeddings().weight)[0])


def gathers_across_processes(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` gathers weights from the other processes (FSDP2 units, ZeRO-3 partitions).
    Then every process must run the same number of forwards: a process whose samples end early keeps stepping
    (transformers' `synced_gpus`), or the others wait in their gather forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return bool(fsdp2_units(model)) or any(hasattr(p, "ds_id") for p in model.parameters())


def configure_deepspeed(config: Config, accelerator) -> None:
    """Fill what a DeepSpeed config leaves at `auto` and accelerate would take from a DataLoader (the trainer
    passes none, and `prepare` then fails) or fill with its own default: the micro-batch (the process's sequences
    of a step, one micro-batch) and the clipping (`optim.max_grad_norm`; accelerate would clip at 1.0)."""
    if engine_name(accelerator) != "deepspeed":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = config.train.micro_batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = config.optim.max_grad_norm or 0.0  # 0: DeepSpeed does not clip


def teacher_fsdp_plugin(plugin, teacher: torch.nn.Module):
    """The FSDP2 plugin to shard the teacher with: the student's, except that a layer-class wrap policy takes the
    teacher's own layer classes (`_no_split_modules`). The shared plugin holds the student's classes after the
    student is prepared, and a teacher of another architecture (a Qwen3-MoE teacher of a dense student) has none
    of them. Size-based or no wrap policy: the plugin as it is."""
    import copy
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if (policy.func if isinstance(policy, functools.partial) else policy) is not transformer_auto_wrap_policy:
        return plugin
    own = copy.copy(plugin)
    own.auto_wrap_policy = transformer_auto_wrap_policy
    own.transformer_cls_names_to_wrap = list(getattr(teacher, "_no_split_modules", None) or [])
    return own


def prepare_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """The frozen teacher placed for the engine: sharded by FSDP2 like the student (with its CPU offload when
    the config asks for it), initialized by DeepSpeed for inference (sharded under ZeRO-3, replicated below it),
    else replicated on each device."""
    teacher.eval().requires_grad_(False)
    engine = engine_name(accelerator)
    if engine == "fsdp2":
        from accelerate.utils import fsdp2_prepare_model

        state, plugin = accelerator.state, accelerator.state.fsdp_plugin
        state.fsdp_plugin = teacher_fsdp_plugin(plugin, teacher)
        try:
            return fsdp2_prepare_model(accelerator, teacher)
        finally:
            state.fsdp_plugin = plugin
    if engine == "deepspeed":
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    return teacher.to(accelerator.device)


def unwrap_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DeepSpeed inference engine (the module itself otherwise)."""
    return getattr(model, "module", model)


def gathered(module: torch.nn.Module, accelerator):
    """A context in which `module`'s parameters are whole: ZeRO-3 gathers them (read-only); others need nothing."""
    if engine_name(accelerator) == "deepspeed" and zero_stage(accelerator) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def frozen_head(model: torch.nn.Module, vocab_size: int, accelerator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A whole copy of a frozen model's output head (weight [V, H], bias), for engines that shard it (ZeRO-3);
    None elsewhere, where the head is read from the model after each pass."""
    if not (engine_name(accelerator) == "deepspeed" and zero_stage(accelerator) == 3):
        return None
    head = unwrap_frozen(model).get_output_embeddings()
    with gathered(head, accelerator):
        bias = getattr(head, "bias", None)
        return head.weight[:vocab_size].detach().clone(), None if bias is None else bias[:vocab_size].detach().clone()
