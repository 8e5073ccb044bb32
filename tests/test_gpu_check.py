"""`scripts/gpu_check.sh`, the one-command GPU check, at tiny scale on the CPU (so that it cannot rot before a GPU
machine runs it), and its budget, wheel and report logic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import gpu_check  # scripts/gpu_check.py (pytest puts scripts/ on the path: pyproject's pythonpath)
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """`bash scripts/gpu_check.sh --tiny` once: its JSON, its stdout and its wall time."""
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    start = time.perf_counter()
    run = subprocess.run(
        ["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--tiny", "--out", str(out)],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text()), run.stdout, seconds


def test_tiny_check_writes_every_part_ok(tiny_check):
    report, stdout, seconds = tiny_check
    assert seconds < 90  # about 25 s on a 2-core machine
    assert list(report["parts"]) == list(gpu_check.PARTS)
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    assert report["mode"] == "tiny" and report["budget"]["dropped"] == {}
    assert report["parts"]["install"]["still_missing"] == []
    assert report["parts"]["environment"]["device"] == "cpu"
    assert "part         status" in stdout and "dopd" in stdout and "opd-priv" in stdout


def test_tiny_check_loss_agreement_and_memory(tiny_check):
    measurements = tiny_check[0]["parts"]["loss"]["measurements"]
    assert list(measurements) == ["base/fp32", "base/bf16", "long/fp32", "long/bf16"]
    for key, m in measurements.items():
        assert m["status"] == "ok", key
        assert m["chunk_size"] == 64 and m["tokens"] >= 256
        for form in ("plain", "chunked"):
            assert m[form]["time_s"] > 0 and len(m[form]["times_s"]) == 2 and m[form]["peak_mib"] > 0
        assert m["memory_ratio"] < 0.5, key  # no full-vocabulary logits of all tokens at once
        assert sum(m["regime_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
        if key.endswith("fp32"):
            assert m["loss_rel_diff"] < 1e-5 and m["grad_hidden_rel_diff"] < 1e-5 and m["grad_weight_rel_diff"] < 1e-5
        else:  # bf16 (tests/test_gpu.py says why these bounds)
            assert m["loss_rel_diff"] < 1e-3 and m["grad_hidden_rel_diff"] < 1e-2 and m["grad_weight_rel_diff"] < 2e-2
            versus = m["versus_fp32"]
            for grad in ("grad_hidden_rel_diff", "grad_weight_rel_diff"):
                assert versus["chunked"][grad] <= versus["plain"][grad] + 5e-3
            assert versus["chunked"]["loss_rel_diff"] < 1e-2


def test_tiny_check_step_times_both_methods_on_the_same_rollouts(tiny_check):
    step = tiny_check[0]["parts"]["step"]
    summary = step["summary"]
    for method in ("dopd", "opd-priv"):
        figures = summary[method]
        for key in ("rollout_s", "scoring_s", "update_s", "step_s", "tokens_per_second", "tokens"):
            assert figures[key] > 0, (method, key)
        assert figures["step_s"] == pytest.approx(
            figures["rollout_s"] + figures["scoring_s"] + figures["update_s"], rel=1e-2
        )
        assert len(figures["losses"]) == 2 and all(math.isfinite(loss) for loss in figures["losses"])
    assert summary["dopd"]["rollout_s"] == summary["opd-priv"]["rollout_s"]  # one rollout per repetition
    assert summary["dopd"]["tokens"] == summary["opd-priv"]["tokens"]
    assert {"step_s_ratio", "scoring_s_ratio", "update_s_ratio"} <= set(summary["ratios"])
    assert step["note"] == gpu_check.STEP_NOTE and "the scoring and update ratios" in tiny_check[1]
    assert [r["warm_up"] for r in step["repetitions"]] == [True, False, False]
    models = tiny_check[0]["parts"]["models"]
    assert models["vocab"] == 512 and models["student"]["parameters"] < models["teacher"]["parameters"]


def test_tiny_check_runs_the_gpu_tests(tiny_check):
    """Without CUDA the gpu tests are collected and skip themselves; with it they must all pass."""
    tests = tiny_check[0]["parts"]["gpu_tests"]
    assert tests["tests"] >= 8 and tests["failed"] == tests["errors"] == 0
    import torch

    if torch.cuda.is_available():
        assert tests["passed"] == tests["tests"]
    else:
        assert tests["skipped"] == tests["tests"] and "no CUDA" in tests["note"]


def test_budget_drops_the_largest_measurements_first():
    estimates = {"loss/a": 10, "tests": 50, "loss/b": 30, "step": 200}
    kept, dropped = gpu_check.plan_budget(estimates, seconds_left=95)
    assert kept == ["loss/a", "tests", "loss/b"] and list(dropped) == ["step"]
    kept, dropped = gpu_check.plan_budget(estimates, seconds_left=45)
    assert kept == ["loss/a", "loss/b"] and list(dropped) == ["step", "tests"]
    assert "largest (50 s)" in dropped["tests"]
    assert gpu_check.plan_budget(estimates, seconds_left=1000) == (list(estimates), {})
    assert gpu_check.plan_budget(estimates, seconds_left=-5)[0] == []


def test_budget_falls_back_to_the_quick_pair_and_replans_with_the_time_left():
    estimates = {"loss": 10, "step/paper": 100, "step/quick": 30}
    budget = gpu_check.Budget(60, estimates, time.perf_counter(), {"step/paper": "step/quick"})
    budget.plan(["loss", "step/paper"])
    assert budget.pending == ["loss", "step/quick"] and "step/quick runs instead" in budget.dropped["step/paper"]
    budget.start -= 55  # 5 s left: nothing fits any more
    assert not budget.allows("loss") and budget.pending == []
    assert set(budget.dropped) == {"step/paper", "loss", "step/quick"}


@pytest.mark.parametrize(
    "requested, memory_gib, pair",
    [("auto", 139.8, "paper"), ("auto", 79.2, "quick"), ("auto", None, "quick"), ("paper", 79.2, "paper")],
)
def test_the_step_pair_is_chosen_by_the_gpus_memory(requested, memory_gib, pair):
    """The paper pair's step peaks near 100 GB: an H200 (139.8 GiB) holds it, an 80 GB H100 (79.2 GiB) does not."""
    chosen, why = gpu_check.choose_pair(requested, memory_gib)
    assert chosen == pair and (why.startswith("auto:") or why == f"--pair {requested}")


def test_a_paper_step_out_of_memory_runs_again_with_the_quick_pair(tmp_path, monkeypatch):
    import argparse

    pairs = []

    def models_part(record, save, pair, settings, device, work_dir):
        pairs.append(pair)
        record["pair"] = pair

    def step_part(record, save, models, settings, device, work_dir, budget):
        if models["pair"] == "paper":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        record["summary"] = {"ratios": {}}

    monkeypatch.setattr(gpu_check, "models_part", models_part)
    monkeypatch.setattr(gpu_check, "step_part", step_part)
    monkeypatch.setattr(gpu_check, "free_memory", lambda device: None)
    report = gpu_check.Report(str(tmp_path / "report.json"), {"mode": "gpu"})
    budget = gpu_check.Budget(1000, gpu_check.GPU.estimates, time.perf_counter(), {"step/paper": "step/quick"})
    budget.plan(["step/paper"])
    args = argparse.Namespace(pair="auto", work_dir=str(tmp_path / "work"))
    gpu_check.run_models_and_step(args, report, gpu_check.GPU, "cuda", budget)
    assert pairs == ["paper", "quick"] and report.data["parts"]["step"]["status"] == "ok"
    assert report.data["pair_choice"]["pair"] == "quick" and "out of memory" in report.data["pair_choice"]["why"]
    pairs.clear()
    budget = gpu_check.Budget(1000, gpu_check.GPU.estimates, time.perf_counter(), {"step/paper": "step/quick"})
    budget.plan(["step/paper"])
    gpu_check.run_models_and_step(
        argparse.Namespace(pair="paper", work_dir=None), report, gpu_check.GPU, "cuda", budget
    )
    assert pairs == ["paper"] and report.data["parts"]["step"]["status"] == "error"  # asked for: no fallback


def test_gpu_wheels_help_prints_usage_and_writes_nothing(tmp_path):
    script = os.path.join(REPO, "scripts", "gpu_wheels.sh")
    for arguments, code in ((["--help"], 0), (["-h"], 0), (["--out", "x"], 2), (["a", "b"], 2)):
        run = subprocess.run(["bash", script, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert run.returncode == code and "usage: bash scripts/gpu_wheels.sh [DIR]" in run.stdout + run.stderr
    assert not os.listdir(tmp_path) and not os.path.exists(os.path.join(REPO, "--help"))


def test_missing_wheels_are_named(tmp_path):
    (tmp_path / "omegaconf-2.4.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "dill-0.4.1-py3-none-any.whl").write_bytes(b"")
    found, lacking = gpu_check.find_wheels(["omegaconf", "datasets", "Dill"], str(tmp_path))
    assert found == {"omegaconf": ["omegaconf-2.4.0-py3-none-any.whl"], "Dill": ["dill-0.4.1-py3-none-any.whl"]}
    assert lacking == ["datasets"]
    # A machine without `datasets` (an import name that does not exist stands for it) and a folder without its wheel.
    record = {"error": None}
    status = gpu_check.install_part(record, str(tmp_path), str(tmp_path / "site"), {"dopd_absent_mod": "datasets"})
    assert status == "error" and record["missing"] == ["datasets"] and record["installed"] == []
    assert record["error"] == f"the wheel folder {tmp_path} lacks datasets; make it with scripts/gpu_wheels.sh"
    record = {"error": None}
    assert gpu_check.install_part(record, None, str(tmp_path / "site"), {"dopd_absent_mod": "datasets"}) == "error"
    assert "missing: datasets; pass --wheels DIR" in record["error"]
    record = {"error": None}
    gpu_check.install_part(record, str(tmp_path), str(tmp_path / "site"), {"dopd_absent_mod": "torch"})
    assert record["error"].startswith("torch missing and not among the wheels this check brings")
    record = {"error": None}
    assert gpu_check.install_part(record, str(tmp_path), str(tmp_path / "site"), {"json": "json"}) == "ok"
    assert record["missing"] == [] and record["error"] is None


def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path):
    path = tmp_path / "report.json"
    report = gpu_check.Report(str(path), {"mode": "tiny"})

    def failing(record, save):
        record["measured"] = 1.5
        save()
        raise RuntimeError("CUDA out of memory\nmore detail")

    report.run("loss", failing)
    assert json.loads(path.read_text())["parts"]["loss"]["status"] == "error"
    report.run("step", lambda record, save: None)
    parts = json.loads(path.read_text())["parts"]
    assert parts["loss"]["error"] == "RuntimeError: CUDA out of memory" and parts["loss"]["measured"] == 1.5
    assert parts["step"]["status"] == "ok" and not os.path.exists(f"{path}.tmp")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--wheels", "/no/such/wheels"], "gpu_check: error: --wheels /no/such/wheels: no such folder"),
        (["--budget-s", "0"], "gpu_check: error: --budget-s 0: must be > 0 seconds"),
        (["--pair", "huge"], "gpu_check: error: argument --pair: invalid choice: 'huge'"),
    ],
)
def test_bad_options_fail_in_one_line(arguments, message):
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), *arguments],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(message) and len(run.stderr.strip().splitlines()) == 1


def test_list_wheels_prints_the_pins_gpu_wheels_sh_downloads():
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "gpu_check.py"), "--list-wheels"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    assert run.stdout.split() == [f"{name}=={version}" for name, version in gpu_check.WHEELS.items()]
    assert set(gpu_check.WHEELS) <= set(gpu_check.NEEDED_MODULES.values())
    with open(os.path.join(REPO, "scripts", "gpu_wheels.sh")) as script:
        assert "--list-wheels" in script.read()
