"""The accelerate configurations under configs/accelerate/: each is read by accelerate's own launcher code, turned
into the environment `accelerate launch` would give the processes, and into accelerate's plugin objects; the
trainer's engine checks accept them and refuse settings that cannot work. (No GPU here: nothing is launched.)"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import tiny
import torch

from dopd.config import ConfigError, load_config
from dopd.engines import check_engine, configure_deepspeed, engine_name, teacher_fsdp_plugin

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
    # A teacher of another architecture (Qwen3-MoE, same tokenizer) is wrapped by its own layer class: the shared
    # plugin, set up for the student, names the student's class, which the teacher does not have.
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    teacher = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )
    with pytest.raises(ValueError, match="Could not find the transformer layer class Qwen3DecoderLayer"):
        fsdp2_prepare_auto_wrap_policy(plugin, teacher)
    own = teacher_fsdp_plugin(plugin, teacher)
    assert own is not plugin and plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]  # left as it was
    policy = fsdp2_prepare_auto_wrap_policy(own, teacher)
    wrapped = [type(m) for m in teacher.modules() if policy(m)]
    assert wrapped and set(wrapped) == {Qwen3MoeDecoderLayer}
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
    one_batch = ["train.prompts_per_step=8", "rollout.num_generations=4", "train.micro_batch_size=32"]
    lora = ["train.mixed_precision=bf16", "model.lora.enabled=true", "objective.self_weights=live", *one_batch]
    check_engine(dopd_config(*lora), accelerator)
    # No process holds whole adapters under ZeRO-3 to keep a frozen, EMA or lagged copy of
    with pytest.raises(ConfigError, match="objective.self_weights = frozen under DeepSpeed ZeRO-3 is not supported"):
        check_engine(dopd_config(*[o for o in lora if "self_weights" not in o]), accelerator)
    with pytest.raises(ConfigError, match="ZeRO-3 with a fully trained student is not supported.*FSDP2.*LoRA"):
        check_engine(dopd_config("train.mixed_precision=bf16", *one_batch), accelerator)
    with pytest.raises(ConfigError, match="clips gradients at 1.0 but optim.max_grad_norm = 0.5"):
        check_engine(dopd_config(*lora, "optim.max_grad_norm=0.5"), accelerator)
    # accelerate steps DeepSpeed's engine after every backward: more than one micro-batch a step is refused
    with pytest.raises(ConfigError, match="one micro-batch per process.*set train.micro_batch_size=32"):
        check_engine(dopd_config(*lora, "train.micro_batch_size=8"), accelerator)
    with pytest.raises(ConfigError, match="train.max_tokens_per_micro_batch=0"):
        check_engine(dopd_config(*lora, "train.max_tokens_per_micro_batch=4096"), accelerator)
    accelerator.num_processes = 8  # 8 prompts x 4 over 8 processes: 4 sequences each
    check_engine(dopd_config(*lora[:3], "train.prompts_per_step=8", "train.micro_batch_size=4"), accelerator)
    del accelerator.num_processes
    # What the config leaves at auto and accelerate would take from a DataLoader (prepare fails without one)
    assert plugin.is_auto("train_micro_batch_size_per_gpu")
    configure_deepspeed(dopd_config(*lora), accelerator)
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 32
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0  # the file's value is kept
    plugin.deepspeed_config["gradient_clipping"] = "auto"
    configure_deepspeed(dopd_config(*lora, "optim.max_grad_norm=null"), accelerator)
    assert plugin.deepspeed_config["gradient_clipping"] == 0.0  # accelerate would clip at 1.0
    plugin.deepspeed_config["gradient_accumulation_steps"] = 4
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 4; dopd accumulates micro-batches itself"):
        check_engine(dopd_config(*lora), accelerator)
    plugin.deepspeed_config["gradient_accumulation_steps"], plugin.deepspeed_config["gradient_clipping"] = 1, "auto"
    # accelerate's get_state_dict needs the gathered 16-bit weights: without them the run would fail at its save
    plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    with pytest.raises(ConfigError, match="set zero3_save_16bit_model: true in the accelerate config"):
        check_engine(dopd_config(*lora), accelerator)


def test_shape_reads_see_through_zero3_partitioned_parameters():
    """accelerate's DeepSpeed state makes `from_pretrained` partition a ZeRO-3 model as it loads: every parameter
    is an empty tensor that keeps its shape in `ds_shape`. The vocabulary check and the rollouts' suppressed ids
    read the head's rows from there (an empty head read as 0 rows stopped the run at start)."""
    from dopd.config import RolloutConfig
    from dopd.engines import gathers_across_processes, head_rows
    from dopd.loading import common_vocab_size
    from dopd.rollout.hf import HFRollout

    tokenizer = tiny.build_tokenizer()
    student, teacher = tiny.build_model(len(tokenizer)), tiny.build_model(len(tokenizer), vocab_pad=8, tied=False)
    for model in (student, teacher):
        for number, parameter in enumerate(model.parameters()):
            parameter.ds_shape, parameter.ds_id = parameter.shape, number
            parameter.data = torch.empty(0)
    assert teacher.get_output_embeddings().weight.shape == (0,)
    assert head_rows(student) == len(tokenizer) and head_rows(teacher) == len(tokenizer) + 8
    assert common_vocab_size(student, teacher, tokenizer) == len(tokenizer)
    engine = HFRollout(lambda: teacher, tokenizer, RolloutConfig(), vocab_size=len(tokenizer))
    assert engine.generation_config(teacher).suppress_tokens == list(range(len(tokenizer), len(tokenizer) + 8))
    assert not gathers_across_processes(teacher)  # one process: nothing to keep in step


@pytest.mark.slow
def test_zero3_run_starts_trains_and_saves(pair, tmp_path):
    """The real DeepSpeed ZeRO-3 set-up on the CPU where DeepSpeed is installed (it is not a test dependency: PyPI
    has only its sdist, whose build needs torch): accelerate's launch environment, models loaded partitioned, two
    LoRA steps and the final save."""
    pytest.importorskip("deepspeed")
    import json
    import subprocess

    env = {
        **os.environ,
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
        "DS_ACCELERATOR": "cpu",
    }
    script = os.path.join(os.path.dirname(__file__), "deepspeed_step.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", script]
    command += [pair["student"], pair["teacher"], pair["data"], str(tmp_path / "run")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome == {"engine": "DistributedType.DEEPSPEED", "teacher_partitioned": True}
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()
