"""LoRA students (`model.lora.enabled`): only adapter weights train, the privileged pass runs the adapter,
checkpoints hold the adapter (and a merged model when asked), resume gives the same adapter, bad settings fail."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")
from tiny import make_config, train_stopped_at

from dopd.config import ConfigError
from dopd.train import Trainer, train

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]


def test_lora_trains_only_adapter_weights(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "run", *LORA, "train.steps=3"))
    before = {k: v.clone() for k, v in trainer.inner.state_dict().items()}
    trainable = {n for n, p in trainer.inner.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.run()
    after = trainer.inner.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {k for k in before if "lora_B" in k} <= changed  # B starts at zero and every adapted module moved


def test_privileged_pass_runs_the_adapter(pair, tmp_path):
    trainer = Trainer(
        make_config(
            pair, tmp_path / "run", *LORA, "rollout.temperature=0", "train.steps=2", "objective.self_weights=live"
        )
    )
    trainer.run()  # a trained adapter, so that adapters on and off differ
    prompts = trainer.local_prompts()
    rollouts = trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], 2)
    with_adapter = trainer.score(prompts, rollouts)[0].self_scores.token_logprobs
    with trainer.inner.disable_adapter():
        base = trainer.score(prompts, rollouts)[0].self_scores.token_logprobs
    assert not torch.allclose(with_adapter, base)


def test_lora_checkpoints_resume_and_merge(pair, tmp_path):
    common = [*LORA, "train.steps=4", "checkpoint.save_every=2", "model.lora.save_merged=true"]
    straight = train(make_config(pair, tmp_path / "straight", *common))
    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= set(os.listdir(straight.final_dir))

    train_stopped_at(make_config(pair, tmp_path / "resumed", *common), step=2)
    saved = tmp_path / "resumed" / "checkpoints" / "step_000002" / "model"
    assert (saved / "adapter_model.safetensors").exists() and (saved / "merged" / "model.safetensors").exists()
    resumed = train(make_config(pair, tmp_path / "resumed", *common, "checkpoint.resume=true"))
    a = load_file(os.path.join(straight.final_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(resumed.final_dir, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The merged model is a plain checkpoint that computes what the base with the adapter computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(straight.final_dir, "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(pair["student"])
    adapted = PeftModel.from_pretrained(base, straight.final_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(pair["student"]).eval()
        assert not torch.allclose(merged(ids).logits, base(ids).logits)


def test_bad_lora_settings_fail(pair, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="model.lora.r = 0 must be positive"):
        make_config(pair, tmp_path / "run", "model.lora.enabled=true", "model.lora.r=0")
    with pytest.raises(ConfigError, match=r"model.lora.target_modules = \['attn_qkv'\] does not fit the student"):
        Trainer(make_config(pair, tmp_path / "run", "model.lora.enabled=true", "model.lora.target_modules=[attn_qkv]"))
    # The loss reads the output head outside the forward: an adapter there would never train.
    with pytest.raises(ConfigError, match="target_modules has lm_head.*would never train"):
        make_config(pair, tmp_path / "run", "model.lora.enabled=true", "model.lora.target_modules=[q_proj,lm_head]")
    from transformers import AutoModelForCausalLM

    from dopd.config import LoraConfig
    from dopd.lora import add_adapters

    student = AutoModelForCausalLM.from_pretrained(pair["student"])
    with pytest.raises(ConfigError, match="puts an adapter on the output head"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the tied head it adapts, before the refusal
        add_adapters(student, LoraConfig(enabled=True, target_modules=["q_proj", "lm_head"]))  # past the config's check
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r'model.lora.enabled needs peft, .*: pip install "dopd\[lora\]"'):
        Trainer(make_config(pair, tmp_path / "run2", "model.lora.enabled=true", "model.student=/nonexistent"))
