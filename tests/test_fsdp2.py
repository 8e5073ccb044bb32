"""FSDP2 as accelerate prepares it, on two CPU processes (gloo): the privileged self's weight swap, transformers'
`generate` on a sharded student, TRL's weight sync to vLLM, and training steps that equal plain data parallelism
(tests/fsdp2_worker.py)."""

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")


def run_worker(mode: str, out, *args: str, timeout: int = 300) -> list[dict]:
    """Both processes' results; a process that hangs in a gather (the failure `synced_gpus` prevents) times out."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER]
    run = subprocess.run([*command, mode, str(out), *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(result["processes"] == 2 for result in results)
    return results


def test_self_weights_swap_under_fsdp2_scores_live_and_copy_apart(tmp_path):
    """The final norm and the head (and the tied embeddings) sit in the root unit, which accelerate's preparation
    leaves gathered after a forward: the student's pass must read the live weights and the self's pass the copy,
    whatever ran before (a rollout forward or not) and on the second micro-batch after a backward."""
    for result in run_worker("swap", tmp_path):
        cases = {key: value for key, value in result.items() if key != "processes"}
        assert len(cases) == 4  # tied and untied heads, with and without a forward before scoring
        for case, differences in cases.items():
            assert differences == {"student_1": 0.0, "self_1": 0.0, "student_2": 0.0, "self_2": 0.0}, case


def test_generate_on_a_sharded_student_keeps_processes_in_step(tmp_path):
    """Process 0's greedy completion ends at its second token, process 1's runs to max_new_tokens: each must get
    exactly its unsharded greedy completion, and neither may wait for the other's gathers."""
    first, second = run_worker("generate", tmp_path, timeout=180)
    assert first["synced"] and second["synced"]
    assert first["completion"] == first["greedy"][:2] and first["finished"]
    assert second["completion"] == second["greedy"] and not second["finished"]


def test_vllm_weight_sync_from_a_sharded_student_sends_the_live_weights(tmp_path):
    """TRL gathers every FSDP2 parameter for vLLM (merging LoRA adapters first): vLLM must receive the checkpoint's
    names with the live weights, not the privileged self's copy, also when a forward left the root unit gathered."""
    for result in run_worker("vllm-sync", tmp_path):
        cases = {key: value for key, value in result.items() if key != "processes"}
        assert len(cases) == 4  # tied and untied, fully trained and LoRA
        for case, outcome in cases.items():
            assert outcome == {"names_match": True, "max_difference": 0.0}, case


@pytest.mark.slow
@pytest.mark.parametrize("self_weights", ["frozen", "ema"])
def test_fsdp2_training_equals_data_parallel(pair, tmp_path, self_weights):
    """Three DOPD steps (two micro-batches each) under FSDP2 give the losses of plain data parallelism on the same
    two processes, and the final checkpoint is written whole."""
    losses = {}
    for mode in ("train", "train-ddp"):
        run_dir = tmp_path / mode
        models = (pair["student"], pair["teacher"], pair["data"])
        run_worker(mode, tmp_path / f"{mode}-out", *models, str(run_dir), f"objective.self_weights={self_weights}")
        losses[mode] = [json.loads(line)["loss"] for line in open(run_dir / "metrics.jsonl")]
        assert (run_dir / "final" / "config.json").exists()
    assert len(losses["train"]) == 3
    assert losses["train"] == pytest.approx(losses["train-ddp"], rel=1e-6, abs=1e-9)
