"""`dopd lab --quick` end to end: the shipped pair, every default method, a well-formed results.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from dopd.lab.runner import DEFAULT_METHODS, LabConfig, _check


def test_lab_config_errors_name_the_option():
    with pytest.raises(ValueError, match="--privilege 'none' is unknown"):
        _check(LabConfig(privilege=["none"]))
    with pytest.raises(ValueError, match="--methods has 'dpod'; known: dopd"):
        _check(LabConfig(methods=["dpod"]))


@pytest.mark.slow
def test_quick_lab_writes_results(tmp_path):
    out = tmp_path / "lab"
    run = subprocess.run(
        [sys.executable, "-m", "dopd", "lab", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gap recovery" in run.stdout and "results:" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "order" and results["seeds"] == [0]
    for role in ("teacher", "student"):
        for kind in ("none", "hints"):
            for key in ("answer_accuracy", "full_match"):
                assert 0.0 <= results[role][kind][key] <= 1.0
    methods = results["kinds"]["hints"]["methods"]
    assert list(methods) == DEFAULT_METHODS
    for name, summary in methods.items():
        assert len(summary["accuracy_per_seed"]) == 1
        assert 0.0 <= summary["accuracy_mean"] <= 1.0 and summary["accuracy_std"] == 0.0
        assert math.isfinite(summary["final_student_entropy"])
        teacher, student = results["teacher"]["none"]["answer_accuracy"], results["student"]["none"]["answer_accuracy"]
        expected = (summary["accuracy_mean"] - student) / (teacher - student)
        assert summary["gap_recovery"] == pytest.approx(expected)
        run_dir = out / "hints" / name / "seed_0"
        assert (run_dir / "config.yaml").exists() and (run_dir / "samples.jsonl").exists()
        lines = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        assert lines[0]["step"] == 0 and "eval/answer_accuracy" in lines[0]
    assert sum(methods["dopd"]["regime_fractions"].values()) == pytest.approx(1.0)
    for plot in ("accuracy.png", "entropy.png", "regimes.png"):
        assert os.path.getsize(out / "hints" / plot) > 1000
    assert "| dopd |" in (out / "results.md").read_text()
