"""Tests that run only where CUDA is available (`pytest -m gpu`; `scripts/gpu_check.sh` runs them on a GPU
machine, and elsewhere they skip): the chunked loss equals the plain one on CUDA in fp32 and matches it in bf16,
one training step with bf16 autocast, and resume on CUDA."""

from __future__ import annotations

import math
import os

# cuBLAS gives the same bits run after run only with a fixed workspace; it reads this when CUDA starts, so it is
# set before any test touches the GPU (the resume tests compare two runs bit for bit).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest
import torch
from tiny import make_config, train_stopped_at, weights

DEVICE = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it on a GPU)"),
]

# An odd vocabulary larger than the K of the Top-K terms; 3 × 96 positions × V is past what a target's scores
# keep (`_KEEP_ELEMENTS`, dopd/kernels/scores.py), so the loss recomputes the targets' log-probs chunk by chunk.
V, K, CHUNK = 4099, 16, 40
METHODS = ("dopd", "opd", "opd-priv", "opsd", "gkd", "eopd")


def loss_case(dtype: torch.dtype, seed: int = 0) -> dict:
    """Three heads on [3, 96] completion positions (rows of 96, 70 and 33 tokens), logits of spread about 3.

    Every input is a multiple of 1/8 (hidden states) or 1/64 (heads) with few enough bits to be exact in bf16, so
    every product and every sum of a logit is exact in fp32: whatever order a GPU kernel adds them in, for any
    shape, both forms get the same logits, and so the same routing."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, H_T = 3, 96, 64, 96

    def randn(*shape, scale: float, step: float):
        values = (scale * torch.randn(*shape, generator=g) / step).round().clamp(-127, 127) * step
        return values.to(DEVICE, dtype)

    lengths = torch.tensor([96, 70, 33])
    return {
        "hidden": randn(B, T, H, scale=1.0, step=1 / 8),
        "weight": randn(V, H, scale=3 / H**0.5, step=1 / 64),
        "bias": randn(V, scale=0.3, step=1 / 64),
        "self_hidden": randn(B, T, H, scale=1.0, step=1 / 8),
        "teacher_hidden": randn(B, T, H_T, scale=1.0, step=1 / 8),
        "teacher_weight": randn(V, H_T, scale=3 / H_T**0.5, step=1 / 64),
        "teacher_bias": randn(V, scale=0.3, step=1 / 64),
        "ids": torch.randint(0, V, (B, T), generator=g).to(DEVICE),
        "mask": (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE),
    }


def run_loss(form: str, objective, case: dict):
    """The objective's output and the gradients of the student's hidden states, head weight and bias."""
    from dopd.kernels import Head, chunked_objective
    from dopd.plain import compute_objective

    hidden, weight, bias = (case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    teacher = (case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"])
    if form == "plain":
        out = compute_objective(
            objective,
            student_logits_BTV=hidden @ weight.T + bias,
            completion_ids_BT=case["ids"],
            mask_BT=case["mask"],
            self_logits_BTV=case["self_hidden"] @ case["weight"].T + case["bias"],
            teacher_logits_BTV=teacher[0] @ teacher[1].T + teacher[2],
        )
    else:
        out = chunked_objective(
            objective,
            Head(hidden, weight, bias),
            completion_ids_BT=case["ids"],
            mask_BT=case["mask"],
            self_head=Head(case["self_hidden"], case["weight"], case["bias"]),
            teacher_head=Head(*teacher),
            chunk_size=CHUNK,
        )
    out.loss.backward()
    return out, (hidden.grad, weight.grad, bias.grad)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in fp32."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", METHODS)
def test_chunked_equals_plain_on_cuda_fp32(method):
    """Only fp32 rounding may differ (log-softmax by rows, the head's gradient summed chunk by chunk): the loss
    and the token losses within 1e-5 relative, as on the CPU (tests/test_chunked.py), the loss's measured against
    its scale (opd's sampled-token terms, of either sign, cancel to a total 1/100 of their size); the gradients
    within 5e-5 in norm, since the JSD terms of gkd and opsd subtract nearly equal terms (5e-6 seen on the CPU)."""
    from dopd.objectives import build_objective

    objective = build_objective({"method": method, "top_k": K})
    case = loss_case(torch.float32)
    (plain, plain_grads), (chunked, chunked_grads) = (run_loss(f, objective, case) for f in ("plain", "chunked"))
    assert plain.loss.device.type == DEVICE and float(plain.loss.detach()) != 0
    scale = float(plain.token_loss.abs().mean())
    assert float(chunked.loss.detach()) == pytest.approx(float(plain.loss.detach()), rel=1e-5, abs=1e-5 * scale)
    for name, a, b in zip(("hidden", "weight", "bias"), plain_grads, chunked_grads):
        assert rel(b, a) <= 5e-5, name
    torch.testing.assert_close(chunked.token_loss, plain.token_loss, rtol=1e-5, atol=1e-5)
    if plain.regime is not None:
        assert torch.equal(chunked.regime, plain.regime)


def test_chunked_matches_plain_on_cuda_bf16():
    """bf16 heads: both forms round the same exact logits to bf16 (see `loss_case`) and work on them in fp32, so
    the loss and the hidden states' gradient agree to far below bf16's rounding unit (2^-8 ≈ 4e-3), whatever
    kernels the GPU picks for the two forms' matmul shapes. The head's gradient is summed over chunks in the
    head's dtype (a bf16 rounding per chunk, against one matmul in the plain form): within 2e-2 (1e-3 seen on the
    CPU). Against fp32 on the same inputs both are off by 10-40% in the gradients (a token near a routing
    threshold changes regime), but by the same: both route on the same bf16 log-probs, so the chunked form may be
    no further off than the plain one by more than 5e-3."""
    from dopd.objectives import build_objective

    objective = build_objective({"method": "dopd", "top_k": K})
    case = loss_case(torch.bfloat16, seed=1)
    reference, reference_grads = run_loss(
        "plain", objective, {k: v.float() if v.is_floating_point() else v for k, v in case.items()}
    )
    (plain, plain_grads), (chunked, chunked_grads) = (run_loss(f, objective, case) for f in ("plain", "chunked"))
    assert plain_grads[1].dtype == chunked_grads[1].dtype == torch.bfloat16
    losses = {
        name: float(out.loss.detach()) for name, out in (("plain", plain), ("chunked", chunked), ("fp32", reference))
    }
    assert all(map(math.isfinite, losses.values()))
    assert losses["chunked"] == pytest.approx(losses["plain"], rel=1e-3)
    assert abs(losses["chunked"] - losses["fp32"]) <= abs(losses["plain"] - losses["fp32"]) + 1e-3
    bounds = (1e-2, 2e-2, 2e-2)
    for name, a, b, r, bound in zip(("hidden", "weight", "bias"), plain_grads, chunked_grads, reference_grads, bounds):
        assert rel(b, a) <= bound, name
        assert rel(b, r) <= rel(a, r) + 5e-3, name


def _loss_on(trainer, prompts, rollouts) -> float:
    """The step's loss on given rollouts (scoring and update, no optimizer step)."""
    from dopd.train import StepMetrics

    trainer.optimizer.zero_grad(set_to_none=True)
    batches = trainer.score(prompts, rollouts)
    metrics = StepMetrics()
    trainer.update(batches, trainer.batch_cuts(batches), 0, metrics)
    trainer.optimizer.zero_grad(set_to_none=True)
    return metrics.reduce(trainer.accelerator)["loss"]


def test_one_bf16_training_step_on_cuda(pair, tmp_path):
    """`train.mixed_precision=bf16`: on the fp32 trainer's rollouts the loss is within 5% of fp32's (tiny random
    models; bf16 activations), and a whole step gives a finite loss and changes the student, kept in fp32.
    Accelerate's state is process-wide, so each trainer gets a fresh one and a fresh one is left."""
    from accelerate.state import AcceleratorState

    from dopd.train import Trainer

    trainers = {}
    try:
        for precision in ("no", "bf16"):
            AcceleratorState._reset_state(True)
            config = make_config(pair, tmp_path / precision, f"train.mixed_precision={precision}", "train.steps=1")
            trainers[precision] = Trainer(config)
            assert trainers[precision].accelerator.device.type == DEVICE
        fp32, bf16 = trainers["no"], trainers["bf16"]
        prompts = fp32.local_prompts()
        rollouts = fp32.engine.generate([fp32.prompts.student_ids[p] for p in prompts], 2)
        fp32_loss, bf16_loss = _loss_on(fp32, prompts, rollouts), _loss_on(bf16, prompts, rollouts)
        assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)
        before = {name: p.detach().clone() for name, p in bf16.inner.named_parameters()}
        result = bf16.step(0)
    finally:
        AcceleratorState._reset_state(True)
    assert torch.isfinite(torch.tensor(result["loss"])) and result["tokens"] > 0
    assert result["time/rollout"] > 0 and result["time/scoring"] > 0 and result["time/update"] > 0
    after = dict(bf16.inner.named_parameters())
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE for p in after.values())
    assert any(not torch.equal(after[name], before[name]) for name in before), "the step did not change the student"


@pytest.fixture(scope="module")
def resume_runs(pair, tmp_path_factory):
    """Final weights of a 4-step run and of the same run stopped at step 2 and resumed from its checkpoint, on
    CUDA with deterministic algorithms (warn only where one has none) and eager attention (the fused kernels'
    backward may add in any order)."""
    from accelerate.state import AcceleratorState

    from dopd.train import train

    directory = tmp_path_factory.mktemp("resume")
    common = ["train.steps=4", "checkpoint.save_every=2", "optim.schedule=cosine", "model.attn_implementation=eager"]
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        AcceleratorState._reset_state(True)
        torch.cuda.reset_peak_memory_stats()
        straight = train(make_config(pair, directory / "straight", *common))
        train_stopped_at(make_config(pair, directory / "resumed", *common), step=2)
        resumed = train(make_config(pair, directory / "resumed", *common, "checkpoint.resume=true"))
        assert torch.cuda.max_memory_allocated() > 0  # the runs were on the GPU
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        AcceleratorState._reset_state(True)
    return weights(straight.final_dir), weights(resumed.final_dir), weights(pair["student"])


def test_resume_on_cuda_continues_the_run(resume_runs):
    """A resume that lost any state (optimizer moments, schedule, data order, random streams) would be off by
    about the learning rate (1e-2); only rounding-level differences are allowed here."""
    straight, resumed, initial = resume_runs
    assert any(not torch.equal(straight[k], initial[k]) for k in initial), "training did not change the student"
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_on_cuda_gives_the_same_weights(resume_runs):
    """Bit for bit, as on the CPU (tests/test_train.py). If only this test fails, some kernel on the path is not
    deterministic on this GPU (the test above shows the resume itself is right)."""
    straight, resumed, _ = resume_runs
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}: max |Δ| " + str(
        float((straight[different[0]] - resumed[different[0]]).abs().max())
    )
