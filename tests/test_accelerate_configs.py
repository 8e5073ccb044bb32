"""The accelerate configurations under configs/accelerate/: each is read by accelerate's own launcher code, turned
into the environment `accelerate launch` would give the processes, and into accelerate's plugin objects; the
trainer's engine checks accept them and refuse settings that cannot work. (No GPU here: nothing is launched.)"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

from dopd.config import ConfigError, load_config  # noqa: E402
from dopd.engines import check_engine, engine_name  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "accelerate")


def launch_env(name: str) -> tuple[object, dict]:
    """(accelerate's ClusterConfig, the environment variables `accelerate launch --config_file` sets)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = os.path.join(CONFIGS, f"{name}.yaml")
    cluster = load_config_from_file(path)
    args = launch_command_parser().parse_args(["--config_file", path, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before building the DeepSpeed environment
        args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return cluster, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def fake_accelerator(kind: str, fsdp=None, deepspeed=None):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    return SimpleNamespace(
        distributed_type=DistributedType[kind], is_fsdp2=fsdp is not None and fsdp.fsdp_version == 2, state=state
    )


def dopd_config(*extra):
    return load_config(overrides=["model.student=s", "model.teacher=t", "data.path=d", "logging.output_dir=o", *extra])


def test_ddp_config(monkeypatch):
    cluster, env = launch_env("ddp")
    assert cluster.distributed_type.value == "MULTI_GPU" and cluster.num_processes == 8
    assert cluster.mixed_precision == "bf16" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    accelerator = fake_accelerator("MULTI_GPU")
    check_engine(dopd_config("train.mixed_precision=bf16"), accelerator)
    accelerator.num_processes = 8
    vllm = ["train.mixed_precision=bf16", "rollout.backend=vllm"]
    check_engine(dopd_config(*vllm, "rollout.vllm.tensor_parallel_size=2"), accelerator)
    with pytest.raises(ConfigError, match="tensor_parallel_size = 3 must divide the number of processes"):
        check_engine(dopd_config(*vllm, "rollout.vllm.tensor_parallel_size=3"), accelerator)
    with pytest.raises(ConfigError, match="mixed_precision bf16 but train.mixed_precision = no; set train.mixed"):
        check_engine(dopd_config(), fake_accelerator("MULTI_GPU"))


def test_fsdp2_config_wraps_qwen3_decoder_layers(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    cluster, env = launch_env("fsdp2")
    assert cluster.distributed_type.value == "FSDP" and cluster.mixed_precision == "bf16"
    fsdp = cluster.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen3DecoderLayer"
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # true asks for the current GPU, which this machine lacks
    plugin = FullyShardedDataParallelPlugin()  # reads the launch environment, as each process does
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints: the whole model on the main process
    model = tiny.build_model(40)
    plugin.set_auto_wrap_policy(model)  # raises if the class is not in the model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Qwen3DecoderLayer}
    accelerator = fake_accelerator("FSDP", fsdp=plugin)
    assert engine_name(accelerator) == "fsdp2"
    check_engine(dopd_config("train.mixed_precision=bf16"), accelerator)
    check_engine(dopd_config("train.mixed_precision=bf16", "model.lora.enabled=true"), accelerator)
    with pytest.raises(ConfigError, match="checkpoint.resume under fsdp2 is not supported yet"):
        check_engine(dopd_config("train.mixed_precision=bf16", "checkpoint.resume=true"), accelerator)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1 is not supported.*set fsdp_version: 2"):
        fsdp1 = fake_accelerator("FSDP", fsdp=FullyShardedDataParallelPlugin())
        check_engine(dopd_config("train.mixed_precision=bf16"), fsdp1)


def test_deepspeed_zero3_config(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    cluster, env = launch_env("deepspeed_zero3")
    assert cluster.distributed_type.value == "DEEPSPEED" and cluster.mixed_precision == "bf16"
    assert cluster.deepspeed_config["zero_stage"] == 3
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # reads the launch environment, as each process does (DeepSpeed itself not needed)
    assert plugin.zero_stage == 3 and plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    accelerator = fake_accelerator("DEEPSPEED", deepspeed=plugin)
    lora = ["train.mixed_precision=bf16", "model.lora.enabled=true"]
    check_engine(dopd_config(*lora), accelerator)
    with pytest.raises(ConfigError, match="ZeRO-3 with a fully trained student is not supported.*FSDP2.*LoRA"):
        check_engine(dopd_config("train.mixed_precision=bf16"), accelerator)
    with pytest.raises(ConfigError, match="ZeRO-3 with a fully trained student"):  # an adapted head trains too
        check_engine(dopd_config(*lora, "model.lora.target_modules=[q_proj,lm_head]"), accelerator)
    with pytest.raises(ConfigError, match="clips gradients at 1.0 but optim.max_grad_norm = 0.5"):
        check_engine(dopd_config(*lora, "optim.max_grad_norm=0.5"), accelerator)
    plugin.deepspeed_config["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4; dopd accumulates micro-batches itself"):
        check_engine(dopd_config(*lora), accelerator)
