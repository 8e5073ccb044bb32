"""The vLLM rollout backend on a CPU: a fake engine with fixed token ids, TRL's `VLLMGeneration` over a fake
`vllm.LLM` (the settings it is started with, the names and values of the weights it receives), the trainer with
that fake engine, and the one-line error when vLLM is missing."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import tiny
import torch
from safetensors.torch import load_file
from tiny import make_config
from transformers import AutoModelForCausalLM

from dopd.config import ConfigError, load_config
from dopd.rollout.vllm import VLLMRollout, engine_settings


def vllm_config(*extra):
    return load_config(
        overrides=[
            "model.student=s",
            "model.teacher=t",
            "data.path=d",
            "logging.output_dir=o",
            "rollout.backend=vllm",
            *extra,
        ]
    )


class FixedEngine:
    """`VLLMGeneration`'s interface with fixed completions."""

    def __init__(self, completions):
        self.completions, self.calls, self.syncs = completions, [], 0

    def generate(self, prompts, images, num_generations):
        self.calls.append((prompts, images, num_generations))
        out = [self.completions[i % len(self.completions)] for i in range(len(prompts))]
        return prompts, out, None, None

    def sync_weights(self):
        self.syncs += 1


def test_rollouts_from_fixed_token_ids():
    eos = {1, 9}
    engine = FixedEngine([[4, 5, 1, 0, 0], [6, 7, 8], [9], [3, 9, 2, 1]])
    rollout = VLLMRollout(engine, eos)
    result = rollout.generate([[10, 11], [12]], num_generations=2)
    assert engine.syncs == 1  # the first rollout syncs: vLLM starts from the checkpoint on disk
    assert engine.calls == [([[10, 11], [10, 11], [12], [12]], None, 2)]  # each prompt num_generations times
    assert result.prompt_index == [0, 0, 1, 1]
    assert result.completion_ids == [[4, 5, 1], [6, 7, 8], [9], [3, 9]]  # cut after the first end-of-sequence
    assert result.finished == [True, False, True, True]
    rollout.generate([[10]], 1)
    assert engine.syncs == 1  # later rollouts sample from what the trainer synced after its optimizer step
    rollout.sync_weights()
    assert engine.syncs == 2


def test_engine_settings_follow_the_rollout_config():
    config = vllm_config(
        "rollout.temperature=0.7",
        "rollout.top_p=0.9",
        "rollout.top_k=20",
        "rollout.max_new_tokens=64",
        "data.max_prompt_length=100",
        "rollout.vllm.gpu_memory_utilization=0.4",
    )
    settings = engine_settings(config, {1, 7}, vocab_size=50, head_rows=50)
    assert settings["mode"] == "colocate" and settings["enable_sleep_mode"] is True
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.7, 0.9, 20)
    assert settings["max_completion_length"] == 64 and settings["max_model_length"] == 164
    assert settings["gpu_memory_utilization"] == 0.4
    assert settings["generation_kwargs"] == {"stop_token_ids": [1, 7]}
    padded = engine_settings(config, {1}, vocab_size=50, head_rows=56)
    assert padded["generation_kwargs"]["allowed_token_ids"] == list(range(50))  # the teacher scores only these
    server = engine_settings(vllm_config("rollout.vllm.mode=server", "rollout.vllm.max_model_len=4096"), {1}, 50, 50)
    assert server["enable_sleep_mode"] is False and server["max_model_length"] == 4096


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.vllm.mode=remote", "rollout.vllm.mode = 'remote' is unknown; use colocate or server"),
        ("rollout.vllm.gpu_memory_utilization=1.5", "rollout.vllm.gpu_memory_utilization = 1.5 must be in"),
        ("rollout.vllm.tensor_parallel_size=0", "rollout.vllm.tensor_parallel_size = 0 must be positive"),
        ("rollout.vllm.server_port=70000", "rollout.vllm.server_port = 70000 is not a port number"),
        ("rollout.vllm.max_model_len=300", "rollout.vllm.max_model_len = 300 is shorter than"),
    ],
)
def test_bad_vllm_settings_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        vllm_config(override)


def _sync_through_trl(monkeypatch, model, config, tokenizer):
    from accelerate import Accelerator

    fake = tiny.install_fake_vllm(monkeypatch)
    rollout = VLLMRollout.create(model, Accelerator(cpu=True), tokenizer, config, len(tokenizer))
    rollout.sync_weights()
    return rollout, fake.instances[-1]


@pytest.mark.parametrize("tied", [True, False])
def test_trl_engine_gets_the_checkpoint_names_and_settings(monkeypatch, tmp_path, tied):
    """Through TRL's real `VLLMGeneration` over a fake `vllm.LLM`: the engine is started with our settings, and a
    sync hands it every tensor of the saved checkpoint (the names vLLM's Qwen3 loader reads) with its value."""
    tokenizer = tiny.build_tokenizer()
    tiny.build_model(len(tokenizer), tied=tied).save_pretrained(tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # loaded by path, as the trainer does
    checkpoint = load_file(tmp_path / "student" / "model.safetensors")
    config = vllm_config("rollout.temperature=0.5", "rollout.max_new_tokens=7", "rollout.vllm.enable_sleep_mode=false")
    rollout, llm = _sync_through_trl(monkeypatch, model, config, tokenizer)
    assert llm.kwargs["model"] == str(tmp_path / "student")
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["max_model_len"] == 1024 + 7
    assert set(llm.loaded) == set(checkpoint)
    assert ("lm_head.weight" in llm.loaded) == (not tied)
    for name, value in checkpoint.items():
        torch.testing.assert_close(llm.loaded[name], value, rtol=0, atol=0)
    result = rollout.generate([[3, 4], [5]], 2)
    ((prompts, sampling),) = llm.calls
    assert [p["prompt_token_ids"] for p in prompts] == [[3, 4], [3, 4], [5], [5]]
    assert sampling["temperature"] == 0.5 and sampling["max_tokens"] == 7 and sampling["n"] == 1
    assert sampling["stop_token_ids"] == [1] and sampling["logprobs"] is None
    assert result.completion_ids == [[5, 6, 1], [7, 8, 9, 10], [5, 6, 1], [7, 8, 9, 10]]
    assert result.finished == [True, False, True, False]


def test_trl_engine_gets_merged_lora_weights_under_base_names(monkeypatch, tmp_path):
    """A PEFT student: vLLM receives the base checkpoint's names (no `base_model.model.`, no `.base_layer`, no
    adapter tensors) holding the merged weights, and the training model is left unmerged."""
    pytest.importorskip("peft")
    from dopd.config import LoraConfig
    from dopd.lora import add_adapters

    tokenizer = tiny.build_tokenizer()
    tiny.build_model(len(tokenizer)).save_pretrained(tmp_path / "student")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    names = set(load_file(tmp_path / "student" / "model.safetensors"))
    model = add_adapters(base, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter: the merged weights differ from the base's
    assert any(".base_layer" in n for n, _ in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, llm = _sync_through_trl(monkeypatch, model, vllm_config(), tokenizer)
    assert set(llm.loaded) == names
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(llm.loaded[name], expected[name], rtol=1e-6, atol=1e-6)
    changed = {n for n in names if not torch.equal(llm.loaded[n], before[_peft_name(n, before)])}
    assert changed == {n for n in names if any(f"{t}.weight" in n for t in ("q_proj", "v_proj", "down_proj"))}
    after = dict(model.named_parameters())
    for name in before:  # unmerged again after the sync (W + BA - BA: equal up to fp32 rounding)
        torch.testing.assert_close(after[name], before[name])


def _peft_name(name: str, peft_names) -> str:
    """The PEFT model's name of a base checkpoint tensor."""
    module, _, leaf = name.rpartition(".")
    for candidate in (f"base_model.model.{module}.base_layer.{leaf}", f"base_model.model.{name}"):
        if candidate in peft_names:
            return candidate
    raise KeyError(name)


def test_trainer_with_the_vllm_backend_syncs_after_every_step(pair, tmp_path, monkeypatch):
    fake = tiny.install_fake_vllm(monkeypatch)
    config = make_config(pair, tmp_path / "run", "rollout.backend=vllm", "train.steps=2")
    from dopd.train import Trainer

    trainer = Trainer(config)
    result = trainer.run()
    llm = fake.instances[-1]
    assert llm.syncs == 3  # before the first rollout, then after each optimizer step
    final = load_file(os.path.join(result.final_dir, "model.safetensors"))
    for name, value in final.items():
        torch.testing.assert_close(llm.loaded[name], value, rtol=0, atol=0)  # vLLM holds the trained weights
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]
    # FakeLLM's completions: [5, 6, 1] ends with <eos> (id 1), [7, 8, 9, 10] hits no end.
    assert lines[0]["completion/finished"] == pytest.approx(0.5)
    assert lines[0]["completion_length/max"] == 4


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_one_line_before_any_model_loads(tmp_path):
    data = tiny.write_prompts(str(tmp_path / "p.jsonl"), count=4)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dopd",
            "train",
            "model.student=/nonexistent/student",
            "model.teacher=/nonexistent/t",
            f"data.path={data}",
            f"logging.output_dir={tmp_path / 'run'}",
            "rollout.backend=vllm",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "rollout.backend = vllm needs vllm" in lines[0] and 'pip install "dopd[vllm]"' in lines[0]
