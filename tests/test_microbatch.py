"""Micro-batches packed by a token budget (`train.max_tokens_per_micro_batch`) give the one-pass loss and
gradients; bf16 autocast (`train.mixed_precision=bf16`) gives a finite loss close to fp32's, computed in fp32."""

from __future__ import annotations

import pytest
import torch
from tiny import make_config

from dopd.scoring import pack_by_tokens, pass_inputs, trainable_pass
from dopd.train import StepMetrics, Trainer


def test_pack_by_tokens():
    lengths = [5, 12, 3, 9, 30, 7, 7]
    batches = pack_by_tokens(lengths, budget=24)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches[0] == [4]  # longer than the budget: alone
    for batch in batches[1:]:
        assert len(batch) * max(lengths[i] for i in batch) <= 24
    assert [len(b) for b in batches] == [1, 2, 3, 1]  # 12+9 | 7,7,5 | 3
    assert pack_by_tokens(lengths, budget=10_000) == [[4, 1, 3, 5, 6, 0, 2]]


def _step_loss_and_grads(trainer, prompts, rollouts):
    trainer.optimizer.zero_grad(set_to_none=True)
    batches = trainer.score(prompts, rollouts)
    metrics = StepMetrics()
    trainer.update(batches, trainer.batch_cuts(batches), 0, metrics)
    grads = torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None])
    return metrics.reduce(trainer.accelerator)["loss"], grads, [len(b.prompt_rows) for b in batches]


@pytest.mark.parametrize("method", ["dopd", "opd"])
def test_token_budget_gives_the_one_pass_loss_and_gradients(pair, tmp_path, method):
    config = make_config(
        pair,
        tmp_path / "run",
        f"objective.method={method}",
        "train.prompts_per_step=6",
        "rollout.num_generations=3",
        "rollout.max_new_tokens=10",
        "rollout.temperature=1.5",
    )
    trainer = Trainer(config)
    prompts = trainer.local_prompts()
    rollouts = trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], 3)
    assert len({len(c) for c in rollouts.completion_ids}) > 1  # lengths differ, so packing has work to do
    trainer.config.train.micro_batch_size = len(rollouts)  # one pass over all 18 sequences
    one_loss, one_grads, sizes = _step_loss_and_grads(trainer, prompts, rollouts)
    assert sizes == [18]
    trainer.config.train.max_tokens_per_micro_batch = 60
    packed_loss, packed_grads, sizes = _step_loss_and_grads(trainer, prompts, rollouts)
    assert len(sizes) > 2 and sum(sizes) == 18
    # Within 1e-6 absolute and 1e-5 relative: only fp32 rounding differs (other padding, other summation order).
    assert abs(packed_loss - one_loss) <= min(1e-6, 1e-5 * abs(one_loss))
    torch.testing.assert_close(packed_grads, one_grads, rtol=1e-5, atol=1e-8)


def test_bf16_autocast_loss_is_fp32_finite_and_close(pair, tmp_path):
    """Accelerate's state is process-wide, so the bf16 trainer gets a fresh one and leaves a fresh one."""
    from accelerate.state import AcceleratorState

    results = {}
    try:
        for precision in ("no", "bf16"):
            AcceleratorState._reset_state(True)
            config = make_config(
                pair,
                tmp_path / precision,
                f"train.mixed_precision={precision}",
                "rollout.temperature=0",
                "train.micro_batch_size=8",
                "train.device=cpu",
            )
            trainer = Trainer(config)
            prompts = trainer.local_prompts()
            rollouts = trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], 2)
            batch = trainer.score(prompts, rollouts)[0]
            inputs = pass_inputs([trainer.prompts.student_ids[p] for p in batch.prompt_rows], batch.completions, 0)
            head = trainable_pass(trainer.student, trainer.inner, inputs, trainer.vocab_size)
            assert head.hidden.dtype == head.weight.dtype == torch.float32  # the objective works in fp32
            assert batch.self_head.hidden.dtype == torch.float32
            loss, _, _ = _step_loss_and_grads(trainer, prompts, rollouts)
            results[precision] = (loss, head.hidden.detach())
    finally:
        AcceleratorState._reset_state(True)
    (fp32_loss, fp32_hidden), (bf16_loss, bf16_hidden) = results["no"], results["bf16"]
    assert not torch.equal(fp32_hidden, bf16_hidden)  # autocast did run in bf16
    assert torch.isfinite(torch.tensor(bf16_loss))
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)
