"""`dopd lab`: method overrides and their errors, the statistics on hand-made runs, a weak pair's stop, the quick
lab end to end, and the same numbers from the same command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from dopd.lab.config import LabConfig
from dopd.lab.methods import method_specs, parse_method, split_methods
from dopd.lab.models import WeakPairError
from dopd.lab.results import choose_rates, paired, standard_error
from dopd.lab.runner import check_lab_config, run_lab

TINY_PAIR = ["teacher={layers: 1, hidden: 16, heads: 2, kv_heads: 1, intermediate: 32}", "teacher_steps=4",
             "student_checkpoints=[2]", "batch_size=4", "warmup_steps=1"]  # fmt: skip


def test_method_overrides_parse():
    spec = parse_method("dopd[self_weights=ema,self_ema_decay=0.9]")
    assert spec.method == "dopd" and dict(spec.overrides) == {"self_weights": "ema", "self_ema_decay": 0.9}
    assert dict(parse_method("dopd[regimes=LH+HT]").overrides) == {"regimes": ["LH", "HT"]}
    assert dict(parse_method("dopd[regimes=HT]").overrides) == {"regimes": ["HT"]}
    assert dict(parse_method("opsd[objective.self_weights=live]").overrides) == {"self_weights": "live"}
    assert parse_method("opd").overrides == () and parse_method("opd").label == "opd"
    assert split_methods("opd,dopd[beta_w=0.2,beta_l=0.5], opsd") == ["opd", "dopd[beta_w=0.2,beta_l=0.5]", "opsd"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("dpod", "--methods has 'dpod'; known: dopd"),
        ("dopd[self_weight=frozen]", "'self_weight=frozen' is not KEY=VALUE with KEY an objective key"),
        ("dopd[self_weights=stale]", "objective.self_weights = 'stale' is unknown"),
        ("dopd[regimes=LH+XX]", "objective.regimes entry = 'XX' is unknown"),
        ("dopd[beta_w=0.3", "overrides go in brackets"),
        ("dopd[method=opd]", "the method is the name before the brackets"),
        ("dopd[top_k=0]", "objective.top_k = 0 must be at least 1"),
    ],
)
def test_bad_override_fails_with_one_line(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as error:
        parse_method(text)
    assert "\n" not in str(error.value) and text in str(error.value)


def test_references_come_first_and_once():
    labels = [s.label for s in method_specs(LabConfig(methods=["dopd", "opd", "dopd[self_weights=live]"]))]
    assert labels == ["sft", "opd", "dopd", "dopd[self_weights=live]"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": [0, 0]}, "--seeds"),
        ({"seeds": [-1]}, "--seeds"),
        ({"steps": -5}, "--steps = -5 must be at least 1"),
        ({"lr_grid": [0.0]}, "--lr-grid"),
        ({"privilege": ["none"]}, "--privilege 'none' is unknown"),
        ({"task": "nosuch"}, "lab task 'nosuch' is unknown"),
        ({"pair": ["teacher_stepz=3"]}, "--pair"),
        ({"workers": 0}, "--workers = 0 must be at least 1"),
        ({"teacher_per_task": True}, "--teacher-per-task needs a mixture task"),
        ({"task": "order+order"}, "two or more different tasks"),
    ],
)
def test_lab_options_are_checked_before_any_work(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_lab_config(LabConfig(out=str(tmp_path / "lab"), **change))
    assert not (tmp_path / "lab").exists()


def test_cli_refuses_bad_lab_options_with_one_line(tmp_path):
    out = tmp_path / "lab"
    for args in (["--seeds", "a,b"], ["--steps", "-5"], ["--methods", "dopd[self_weight=x]"], ["--quick", "--full"]):
        run = subprocess.run(
            [sys.executable, "-m", "dopd", "lab", "--out", str(out), *args], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 2, (args, run.stderr)
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dopd: error:") and "Traceback" not in run.stderr, args
        assert not out.exists()


def _record(label, lr, seed, validation, test):
    return {
        "label": label,
        "lr": lr,
        "seed": seed,
        "validation_accuracy": validation,
        "test": {"answer_accuracy": test},
    }


def test_rates_and_paired_differences_by_hand():
    records = [
        _record("a", 1e-4, 0, 0.50, 0.50),
        _record("a", 1e-4, 1, 0.52, 0.54),
        _record("a", 3e-4, 0, 0.60, 0.61),
        _record("a", 3e-4, 1, 0.58, 0.59),
        _record("b", 1e-4, 0, 0.70, 0.72),
        _record("b", 1e-4, 1, 0.72, 0.70),
        _record("b", 3e-4, 0, 0.40, 0.41),
        _record("b", 3e-4, 1, 0.44, 0.43),
    ]
    common, own, by_rate = choose_rates(records, ["a", "b"], [1e-4, 3e-4])
    assert by_rate[1e-4] == pytest.approx(0.61) and by_rate[3e-4] == pytest.approx(0.505)
    assert common == 1e-4 and own == {"a": 3e-4, "b": 1e-4}
    difference = paired(records, "a", "b", 1e-4)
    assert difference["per_seed"] == pytest.approx([-0.22, -0.16])
    assert difference["mean"] == pytest.approx(-0.19) and difference["se"] == pytest.approx(0.03)
    assert standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3)) and standard_error([5.0]) == 0.0
    tied = [_record("a", lr, 0, 0.5, 0.5) for lr in (3e-4, 1e-4)]
    assert choose_rates(tied, ["a"], [3e-4, 1e-4])[0] == 1e-4  # a tie goes to the smaller rate


def test_a_weak_pair_stops_the_lab_before_any_run(tmp_path):
    config = LabConfig(out=str(tmp_path / "lab"), cache_dir=str(tmp_path / "cache"), pair=TINY_PAIR)
    with pytest.raises(WeakPairError, match="--allow-weak-pair"):
        run_lab(config, log=lambda *_: None)
    assert not (tmp_path / "lab").exists()


QUICK = ["--quick", "--methods", "dopd,opsd[self_weights=live]", "--workers", "2"]


def _lab(out, *args):
    run = subprocess.run(
        [sys.executable, "-m", "dopd", "lab", "--out", str(out), *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout, json.loads((out / "results.json").read_text())


def _without_timing(value):
    """The results with wall times and output paths taken out: what the same command must reproduce."""
    if isinstance(value, dict):
        return {
            k: _without_timing(v)
            for k, v in value.items()
            if k not in ("timing", "seconds", "run_dir", "out", "workers")
        }
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


@pytest.mark.slow
def test_quick_lab_end_to_end_and_the_same_numbers_twice(tmp_path):
    stdout, results = _lab(tmp_path / "first", *QUICK)
    assert "Budget check" in stdout and "results:" in stdout and "wall time" in stdout
    k = results["kinds"]["hints"]
    labels = ["sft", "opd", "dopd", "opsd[self_weights=live]"]
    assert list(k["methods"]) == labels and k["common_lr"] == 3e-4
    assert set(k["references"]) == {"sft", "opd"} and isinstance(k["budget_moves_student"], bool)
    teacher, student = results["teacher"]["none"], results["student"]["none"]
    assert student["n_determined"] + student["n_undetermined"] == 200 and student["n_undetermined"] > 20
    for label in labels:
        m = k["main"][label]
        assert len(m["accuracy_per_seed"]) == 1 and m["accuracy_se"] == 0.0
        expected = (m["accuracy_mean"] - student["answer_accuracy"]) / (
            teacher["answer_accuracy"] - student["answer_accuracy"]
        )
        assert m["gap_recovery"] == pytest.approx(expected)
        assert 0 <= m["determined_mean"] <= 1 and 0 <= m["undetermined_mean"] <= 1
        run = next(r for r in k["runs"] if r["label"] == label)
        assert len(run["curves"]["completion_length"]) == 6 and len(run["curves"]["early_eos"]) == 6
        assert os.path.exists(os.path.join(run["run_dir"], "config.yaml"))
    assert set(k["paired_differences"]["dopd"]) == {"sft", "opd", "opsd[self_weights=live]"}
    assert sum(k["main"]["dopd"]["regime_fractions"].values()) == pytest.approx(1.0)
    assert results["pair"]["weak"] is False and results["pair"]["allowed_weak"] is False
    assert results["pair"]["properties"]["checks"]["a_teacher_gap"]
    for plot in ("curves.png", "parts.png", "regimes.png"):
        assert os.path.getsize(tmp_path / "first" / "hints" / plot) > 1000
    assert "| dopd |" in (tmp_path / "first" / "results.md").read_text()

    _, again = _lab(tmp_path / "second", *QUICK, "--workers", "1")  # one process this time: the same numbers
    assert _without_timing(again) == _without_timing(results)


def test_a_lab_method_can_take_the_tasks_reward(tmp_path):
    from dopd.lab.config import LabConfig
    from dopd.lab.methods import parse_method
    from dopd.lab.runner import Job, run_config

    spec = parse_method("dopd[reward=lab,reward_weight=0.5]")
    job = Job(
        spec, 3e-4, 0, "hints", str(tmp_path / "run"), str(tmp_path / "pair"), "rows.jsonl", 32, LabConfig.quick()
    )
    objective = run_config(job).objective
    assert (objective.method, objective.reward, objective.reward_weight) == ("dopd", "lab:order", 0.5)
    with pytest.raises(ValueError, match="objective.reward = 'labs' is unknown"):
        parse_method("opd[reward=labs]")


def test_a_mixture_with_a_teacher_per_task_names_each_rows_teacher(tmp_path):
    from dopd.lab.config import LabConfig
    from dopd.lab.methods import parse_method
    from dopd.lab.runner import Job, run_config, training_rows
    from dopd.lab.tasks import get_task

    config = LabConfig.quick(task="order+arith", teacher_per_task=True)
    teachers = (("order", str(tmp_path / "order" / "teacher")), ("arith", str(tmp_path / "arith" / "teacher")))
    job = Job(parse_method("dopd"), 3e-4, 0, "hints", str(tmp_path / "run"), str(tmp_path / "order"), "r", 32, config)
    one = run_config(job).model
    assert one.teacher == str(tmp_path / "order" / "teacher") and not one.teachers
    several = run_config(replace(job, teachers=teachers))
    assert several.model.teachers == dict(teachers) and not several.model.teacher
    assert several.data.teacher_column == "task"
    rows = training_rows(get_task(config.task), config, "hints")
    assert {row["task"] for row in rows} == {"order", "arith"}
