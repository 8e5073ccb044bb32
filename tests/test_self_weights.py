"""The privileged self's weights (`objective.self_weights`): live, frozen, EMA and lagged copies, their updates,
their place in checkpoints (resume stays bit-identical) and the LoRA case (adapters only)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_config, train_stopped_at

from dopd.objectives import build_objective
from dopd.self_weights import SelfWeights
from dopd.train import Trainer, train


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # a frozen tensor is not copied
    return model


def test_copy_holds_trainable_tensors_and_swaps_back_after_an_error():
    model = _linear()
    weights = SelfWeights("frozen", model)
    assert weights.names == ["0.weight", "0.bias", "1.weight"]
    assert weights.nbytes() == (12 + 4 + 8) * 4
    x = torch.randn(5, 3)
    before = model(x).detach()
    with torch.no_grad():
        for p in weights.params:
            p.add_(1.0)  # the trained weights move away from the copy
    moved = model(x).detach()
    with weights.swapped_in():
        assert torch.equal(model(x), before)
    assert torch.equal(model(x), moved)
    with pytest.raises(RuntimeError), weights.swapped_in():
        raise RuntimeError("a pass that fails")
    assert torch.equal(model(x), moved)


def test_live_keeps_no_copy():
    weights = SelfWeights("live", _linear())
    assert weights.is_live and weights.nbytes() == 0 and weights.state_dict() == {}
    assert "live" in weights.describe()


def test_ema_after_one_step_is_the_hand_computed_average():
    model = _linear()
    weights = SelfWeights("ema", model, ema_decay=0.75)
    start = [p.detach().clone() for p in weights.params]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.5)
    weights.after_step(1)
    for copy, w0, p in zip(weights.copy, start, weights.params):
        torch.testing.assert_close(copy, 0.75 * w0 + 0.25 * p.detach(), rtol=1e-6, atol=1e-7)


def test_ema_of_half_precision_weights_moves_as_a_float32_average():
    """DeepSpeed ZeRO-1/2 with bf16 trains a bf16 module (float32 masters live in the optimizer): each (1 - decay)
    update is far below bf16's resolution, so an average kept in bf16 never moves. Kept in float32 and cast when
    swapped in, it follows the float32 reference to bf16 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64, bias=False)
    master = layer.weight.detach().clone()
    layer.to(torch.bfloat16)
    weights = SelfWeights("ema", layer, ema_decay=0.99)
    reference, start = master.clone(), layer.weight.detach().float().clone()
    for step in range(1, 301):
        master += 2e-5 * torch.sign(torch.randn_like(master))  # AdamW-sized steps at lr 2e-5
        layer.weight.data.copy_(master)  # the engine casts the masters into the module
        weights.after_step(step)
        reference.lerp_(master, 0.01)
    assert weights.copy[0].dtype == torch.bfloat16  # what is swapped in has the module's dtype
    moved, wanted = (weights.copy[0].float() - start).abs().mean(), (reference - start).abs().mean()
    assert wanted > 1e-4 and moved == pytest.approx(wanted.item(), rel=0.05)
    state = weights.state_dict()  # checkpoints keep the float32 average, so a resumed run continues it exactly
    # It averages the module's bf16 values, the reference the float32 masters: apart by at most bf16's rounding.
    assert state["weight"].dtype == torch.float32
    assert ((state["weight"] - reference).abs() <= reference.abs() * 2**-8 + 1e-7).all()
    assert torch.equal(weights.copy[0], state["weight"].to(torch.bfloat16))


def test_lagged_changes_exactly_at_multiples_of_n():
    model = _linear()
    weights = SelfWeights("lagged", model, sync_every=3)
    changed_at = []
    for step in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        before = [c.clone() for c in weights.copy]
        weights.after_step(step)
        if any(not torch.equal(b, c) for b, c in zip(before, weights.copy)):
            changed_at.append(step)
            assert all(torch.equal(c, p.detach()) for c, p in zip(weights.copy, weights.params))
    assert changed_at == [3, 6]


def test_state_dict_round_trip_and_mismatch():
    model = _linear()
    weights = SelfWeights("ema", model)
    state = {name: tensor + 1 for name, tensor in weights.state_dict().items()}
    weights.load_state_dict(state)
    assert all(torch.equal(c, state[n]) for n, c in zip(weights.names, weights.copy))
    with pytest.raises(ValueError, match="does not match the student's trainable tensors"):
        weights.load_state_dict({"0.weight": state["0.weight"]})


def test_a_copy_of_other_shapes_is_refused():
    weights = SelfWeights("frozen", _linear())
    halves = {name: tensor[: tensor.shape[0] // 2] for name, tensor in weights.state_dict().items()}
    with pytest.raises(ValueError, match=r"0.weight has shape \(2, 3\), this run's \(4, 3\).*other sharding"):
        weights.load_state_dict(halves)


def test_sharded_parameters_are_copied_and_swapped_as_local_shards(tmp_path):
    """An FSDP2 parameter is a DTensor: the copy holds its local shard and the swap writes into that shard (one
    process, a one-device mesh)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _linear()
        mesh = init_device_mesh("cpu", (1,))
        model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.data, mesh, [Shard(0)]))
        weights = SelfWeights("ema", model, ema_decay=0.75)
        start = [c.clone() for c in weights.copy]
        assert not any(hasattr(c, "to_local") for c in weights.copy)
        with torch.no_grad():
            for p in weights.params:
                (p.to_local() if hasattr(p, "to_local") else p).add_(1.0)
        live = [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in weights.params]
        with weights.swapped_in():
            assert torch.equal(model[0].weight.to_local(), weights.copy[0])
        assert torch.equal(model[0].weight.to_local(), live[0])
        weights.after_step(1)
        for copy, first, now in zip(weights.copy, start, live):
            assert torch.allclose(copy, 0.75 * first + 0.25 * now)
    finally:
        dist.destroy_process_group()


def test_unknown_mode():  # checked once, with the objective's options, before any model loads
    with pytest.raises(ValueError, match="objective.self_weights = 'stale' is unknown; known: live, frozen, ema"):
        build_objective({"self_weights": "stale"})


# ----------------------------------------------------------------------------------------------- the trainer


def _self_scores(trainer, prompts, rollouts):
    return torch.cat([batch.self_scores.token_logprobs for batch in trainer.score(prompts, rollouts)])


def _scores_before_and_after(trainer):
    """The privileged self's scores of one set of completions before `trainer.run()` and after, and a function
    that scores them again."""
    prompts = trainer.local_prompts()
    rollouts = trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], 2)
    at_start = _self_scores(trainer, prompts, rollouts)
    trainer.run()
    return at_start, lambda: _self_scores(trainer, prompts, rollouts)


def test_frozen_scores_equal_at_step_0_and_step_k(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "frozen", "objective.self_weights=frozen", "train.steps=3"))
    at_start, scores = _scores_before_and_after(trainer)
    assert torch.equal(scores(), at_start)
    # The live weights did move, so a live self pass on the same completions now scores otherwise.
    trainer.self_weights.mode = "live"
    assert not torch.allclose(scores(), at_start)


def test_live_self_pass_reads_the_training_weights(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "live", "train.steps=2", "objective.self_weights=live"))
    at_start, scores = _scores_before_and_after(trainer)
    assert not torch.allclose(scores(), at_start)


@pytest.mark.parametrize("setting", ["frozen", "ema", "lagged"])
def test_resume_is_bit_identical(pair, tmp_path, setting):
    common = [
        "train.steps=4",
        "checkpoint.save_every=2",
        f"objective.self_weights={setting}",
        "objective.self_ema_decay=0.5",
        "objective.self_sync_every=3",
        "objective.method=opsd",
    ]
    straight = train(make_config(pair, tmp_path / "straight", *common))
    train_stopped_at(make_config(pair, tmp_path / "resumed", *common), step=2)
    saved = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000002" / "self_weights.safetensors"))
    assert saved  # the copy is in the checkpoint
    resumed = train(make_config(pair, tmp_path / "resumed", *common, "checkpoint.resume=true"))
    a = load_file(os.path.join(straight.final_dir, "model.safetensors"))
    b = load_file(os.path.join(resumed.final_dir, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_copy_holds_only_adapter_tensors(pair, tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "objective.self_weights=ema"]
    trainer = Trainer(make_config(pair, tmp_path / "lora", *lora, "train.steps=2"))
    names = list(trainer.self_weights.state_dict())
    assert names and all("lora_" in name for name in names)
    adapters = sum(p.numel() * p.element_size() for n, p in trainer.inner.named_parameters() if "lora_" in n)
    assert trainer.self_weights.nbytes() == adapters
    trainer.run()
    b_names = [n for n in names if "lora_B" in n]
    # B starts at zero; after two steps with decay 0.99 the EMA copy has moved off zero, but by less than the live B.
    live = dict(trainer.inner.named_parameters())
    for name in b_names:
        copy = trainer.self_weights.state_dict()[name]
        assert 0 < copy.abs().max() < live[name].detach().abs().max()
