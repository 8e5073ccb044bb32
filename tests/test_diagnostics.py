"""Collapse diagnostics and non-finite values: the flag fires on a collapsing metrics stream and not on a stable
one; early end-of-sequence is counted against the answer pattern; a NaN teacher, a NaN student or a NaN loss stops
the run with one line, and the run directory is one a rerun accepts."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from dopd.cli import main
from dopd.diagnostics import CollapseWatch, NonFiniteError, check_finite, early_eos_fraction
from dopd.train import Trainer, train


def stream(lengths, entropies):
    return [
        {"step": i + 1, "completion_length/mean": n, "entropy/student": e}
        for i, (n, e) in enumerate(zip(lengths, entropies))
    ]


def test_collapse_flag_fires_on_a_collapsing_stream(caplog):
    watch = CollapseWatch(baseline_steps=3)
    lengths = [33, 32, 34, 30, 25, 18, 15, 9, 7]  # first-steps mean 33: below 16.5 at step 7
    flags = [watch.update(line) for line in stream(lengths, [0.5] * len(lengths))]
    assert [f["collapse/length"] for f in flags] == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert flags[-1]["collapse/step"] == 7 and flags[-1]["collapse/entropy"] == 0
    assert "collapse at step 7: completion_length/mean" in caplog.text
    entropy_watch = CollapseWatch(baseline_steps=3)
    flags = [entropy_watch.update(line) for line in stream([30] * 6, [0.4, 0.4, 0.4, 0.2, 0.11, 0.09])]
    assert [f["collapse/entropy"] for f in flags] == [0, 0, 0, 0, 0, 1]  # below 0.1 = a quarter of 0.4


def test_collapse_flag_stays_down_on_a_stable_stream():
    watch = CollapseWatch(baseline_steps=3)
    flags = [watch.update(line) for line in stream([33, 31, 35, 30, 28, 34, 32], [0.5, 0.45, 0.4, 0.3, 0.35, 0.3, 0.2])]
    assert all(f["collapse/length"] == 0 and f["collapse/entropy"] == 0 and "collapse/step" not in f for f in flags)


def test_collapse_watch_resumes_from_its_state():
    watch = CollapseWatch(baseline_steps=2)
    for line in stream([30, 30, 20], [1, 1, 1]):
        watch.update(line)
    again = CollapseWatch(baseline_steps=2)
    again.load_state_dict(json.loads(json.dumps(watch.state_dict())))
    assert again.update(stream([30, 30, 20, 10], [1] * 4)[-1])["collapse/length"] == 1  # 10 < 15, the same baseline


def test_early_end_of_sequence_against_the_answer_pattern():
    texts = ["1+2=3;A:3", "1+2=3;", "1+2=3;A:", "1+2=3;A:3 "]
    finished = [True, True, True, False]
    assert early_eos_fraction(texts, finished, r"A:[^;\s|]+$") == pytest.approx(
        2 / 4
    )  # the unfinished one is not early


def test_check_finite_names_the_pass_the_step_and_the_count():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    values = torch.tensor([[0.1, float("nan"), float("nan")], [float("inf"), 0.0, 0.0]])
    with pytest.raises(
        NonFiniteError,
        match=r"step 4: the teacher's scores is not finite \(2 of 3 completion tokens\)"
        r".*use model.dtype=bfloat16",
    ):
        check_finite("teacher", 3, values, mask)
    check_finite("teacher", 3, values[:, :1], mask[:, :1] * 0 + torch.tensor([[1], [0]]))  # padding may hold anything
    with pytest.raises(NonFiniteError, match="the loss is not finite"):
        check_finite("loss", 0, torch.tensor(float("nan")))


def _poisoned(source: str, target, value=float("nan")) -> str:
    shutil.copytree(source, target)
    weights = load_file(os.path.join(target, "model.safetensors"))
    name = next(k for k in weights if "layers.0.mlp.up_proj" in k)
    weights[name][0, 0] = value
    save_file(weights, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return str(target)


def test_a_nan_teacher_stops_the_run_naming_the_teacher(pair, tmp_path, capsys):
    teacher = _poisoned(pair["teacher"], tmp_path / "nan-teacher")
    args = [
        f"model.student={pair['student']}",
        f"model.teacher={teacher}",
        f"data.path={pair['data']}",
        f"logging.output_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.prompts_per_step=4",
        "rollout.num_generations=2",
        "rollout.max_new_tokens=6",
        "objective.top_k=8",
        "logging.progress_bar=false",
    ]
    assert main(["train", *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dopd: error: step 1: the teacher's scores is not finite (") and "bfloat16" in error
    # The directory holds a run that never reached a checkpoint: once the teacher is mended, the same command starts
    # again there.
    shutil.copy(os.path.join(pair["teacher"], "model.safetensors"), os.path.join(teacher, "model.safetensors"))
    assert main(["train", *args]) == 0


def test_a_nan_student_stops_in_sampling_and_the_directory_stays_usable(pair, tmp_path):
    student = _poisoned(pair["student"], tmp_path / "nan-student", float("inf"))
    config = tiny.make_config(pair, tmp_path / "run", f"model.student={student}")
    with pytest.raises(NonFiniteError, match="step 1: .*(sampling from the student failed|not finite)"):
        train(config)
    shutil.copy(os.path.join(pair["student"], "model.safetensors"), os.path.join(student, "model.safetensors"))
    train(config)  # the same command, the student mended: the directory is accepted


def test_a_nan_loss_keeps_the_last_checkpoint_and_resume_continues(pair, tmp_path, monkeypatch):
    common = ["train.steps=3", "checkpoint.save_every=1"]
    original = Trainer.objective_output

    def nan_at_step_three(self, student, ids, mask, batch, scope):
        output = original(self, student, ids, mask, batch, scope)
        if self.scheduler.last_epoch == 2:  # the third step
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(Trainer, "objective_output", nan_at_step_three)
    with pytest.raises(NonFiniteError, match="step 3: the loss is not finite"):
        train(tiny.make_config(pair, tmp_path / "run", *common))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_000001", "step_000002"]
    result = train(tiny.make_config(pair, tmp_path / "run", *common, "checkpoint.resume=true"))
    assert [json.loads(line)["step"] for line in open(os.path.join(result.run_dir, "metrics.jsonl"))] == [1, 2, 3]
