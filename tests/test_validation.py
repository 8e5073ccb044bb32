"""Validation inside `dopd train` (the `eval` section): accuracies at step 0, every `eval.every` steps and at the
end against a hand count, `dopd report`'s plot of them, the best model kept by a hand-made accuracy sequence, the
prompts shared between processes, and bad settings stopped before any model loads."""

from __future__ import annotations

import json
import os

import pytest
import tiny

from dopd.checkpoint import latest
from dopd.config import ConfigError
from dopd.run_dir import read_jsonl
from dopd.train import Trainer, train
from dopd.validation import Validation, improves, share


def held_out(tmp_path) -> str:
    # The answering model says 7, 9, 6 and 12; the third reference is wrong (5): 3 of 4 correct before training.
    answers = ["7", "9", "5", "12"]
    return tiny.write_rows(
        tmp_path / "held-out.jsonl", [{"prompt": q, "answer": a} for (q, _), a in zip(tiny.FACTS, answers)]
    )


def validated_config(pair, answering_model, tmp_path, *extra):
    return tiny.make_config(
        {**pair, "student": answering_model},
        tmp_path / "run",
        "train.steps=4",
        "eval.every=2",
        f"eval.path={held_out(tmp_path)}",
        "eval.max_new_tokens=6",
        "eval.checker=exact",
        "optim.lr=1e-4",
        *extra,
    )


def test_validation_accuracy_at_step_0_every_2_steps_and_the_end(pair, answering_model, tmp_path):
    from dopd.report import build_report

    config = validated_config(pair, answering_model, tmp_path)
    train(config)
    lines = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    measured = {line["step"]: line["eval/validation_accuracy"] for line in lines if "eval/validation_accuracy" in line}
    assert sorted(measured) == [0, 2, 4]
    assert measured[0] == 0.75  # hand count: 7, 9 and 12 right, the wrong reference 5 not
    assert all(0 <= value <= 1 for value in measured.values())
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]  # the steps between validations keep their lines
    report = build_report([str(tmp_path / "run")], str(tmp_path / "report"), 2, 0.5, None)
    assert report.plots["eval"] and os.path.getsize(report.plots["eval"]) > 0


def test_validation_samples_and_pass_at_k(pair, answering_model, tmp_path):
    config = validated_config(
        pair,
        answering_model,
        tmp_path,
        "train.steps=2",
        "eval.samples=4",
        "eval.temperature=1.0",
        "eval.before_train=false",
    )
    train(config)
    lines = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    measured = [line for line in lines if "eval/validation_accuracy" in line]
    assert [line["step"] for line in measured] == [2]  # no step 0 without eval.before_train
    line = measured[0]
    assert line["eval/validation_pass@1"] == pytest.approx(line["eval/validation_accuracy"])
    assert line["eval/validation_pass@1"] <= line["eval/validation_pass@2"] <= line["eval/validation_pass@4"]


def test_keep_best_keeps_the_step_of_the_best_accuracy(pair, answering_model, tmp_path, monkeypatch):
    # A hand-made sequence for steps 0, 2, 4, 6: the best is step 2 (0.5); step 6 ties and keeps step 2.
    sequence = iter([0.2, 0.5, 0.4, 0.5])
    monkeypatch.setattr(Validation, "measure", lambda self, trainer: {"eval/validation_accuracy": next(sequence)})
    config = validated_config(
        pair,
        answering_model,
        tmp_path,
        "train.steps=6",
        "checkpoint.keep_best=true",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=5",
    )
    train(config)
    run = tmp_path / "run"
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": 2, "accuracy": 0.5}
    step_2 = tiny.weights(run / "checkpoints" / "step_000002" / "model")
    best = tiny.weights(run / "best")
    assert all((best[name] == step_2[name]).all() for name in step_2)
    final = tiny.weights(run / "final")
    assert any((final[name] != step_2[name]).any() for name in step_2)  # training moved on after the best
    assert os.path.exists(run / "best" / "tokenizer.json") and not os.path.exists(run / "best.tmp")
    lines = read_jsonl(str(run / "metrics.jsonl"))
    assert [line.get("eval/best_step") for line in lines if "eval/validation_accuracy" in line] == [0, 2, 2, 2]
    assert latest(str(run)).endswith("step_000004")


def test_best_rule_and_process_shares():
    assert improves(0.1, None) and improves(0.5, 0.4) and not improves(0.4, 0.4) and not improves(0.3, 0.4)
    assert share(5, 0, 2) == [0, 2, 4] and share(5, 1, 2) == [1, 3, 1]  # padded to the same length
    assert share(4, 0, 1) == [0, 1, 2, 3]
    shares = [share(7, rank, 3) for rank in range(3)]
    assert {len(s) for s in shares} == {3}
    own = [s[: len(range(rank, 7, 3))] for rank, s in enumerate(shares)]
    assert sorted(i for s in own for i in s) == list(range(7))  # every prompt once


@pytest.mark.parametrize(
    "extra, message",
    [
        (["eval.every=2"], "eval.every is set but eval.path is not"),
        (["checkpoint.keep_best=true"], "checkpoint.keep_best needs validation"),
        (["eval.every=-1"], "eval.every = -1 must be >= 0"),
        (["eval.every=1", "eval.path=x.jsonl", "eval.samples=2"], "eval.samples = 2 with eval.temperature = 0"),
        (["eval.every=1", "eval.path=x.jsonl", "eval.checker=fuzzy"], "eval.checker = 'fuzzy' is unknown"),
    ],
)
def test_bad_eval_settings(pair, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        tiny.make_config(pair, tmp_path / "run", *extra)


def test_a_held_out_set_without_answers_stops_before_any_model_loads(pair, tmp_path, monkeypatch):
    import dopd.train

    rows = tiny.write_rows(tmp_path / "no-answers.jsonl", [{"prompt": q} for q, _ in tiny.FACTS])
    config = tiny.make_config(pair, tmp_path / "run", "eval.every=1", f"eval.path={rows}")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dopd.train, "load_student", no_loading)
    with pytest.raises(ConfigError, match="eval.answer_column = 'answer' is not a column of"):
        Trainer(config)
    assert not os.path.exists(tmp_path / "run")


def test_with_vllm_rollouts_the_run_engine_samples_with_the_validation_settings(pair, tmp_path, monkeypatch):
    fake = tiny.install_fake_vllm(monkeypatch)
    # FakeLLM answers request i of a call with "2 3 <eos>" (i even) or "4 5 6 7" (i odd); the exact checker reads
    # the whole line: 3 of these 4 references match.
    rows = tiny.write_rows(
        tmp_path / "held.jsonl",
        [{"prompt": q, "answer": a} for (q, _), a in zip(tiny.FACTS, ["2 3", "4 5 6 7", "4 5 6 7", "4 5 6 7"])],
    )
    config = tiny.make_config(
        pair,
        tmp_path / "run",
        "rollout.backend=vllm",
        "train.steps=1",
        "eval.every=1",
        f"eval.path={rows}",
        "eval.checker=exact",
        "eval.max_new_tokens=5",
    )
    train(config)
    lines = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [(line["step"], line["eval/validation_accuracy"]) for line in lines] == [(0, 0.75), (1, 0.75)]
    calls = fake.instances[-1].calls
    settings = [(len(prompts), params["temperature"], params["max_tokens"]) for prompts, params in calls]
    # validation (4 prompts, greedy, 5 tokens), the training step (4 x 2 at the run's temperature), validation again
    assert settings == [(4, 0.0, 5), (8, 1.0, 6), (4, 0.0, 5)]


@pytest.mark.slow
def test_two_processes_share_the_prompts_and_agree(pair, answering_model, tmp_path):
    """Two gloo processes take 3 and 2 of 5 held-out prompts (the second padded to 3); the gathered accuracy is
    the hand count, and the same as one process's."""
    import subprocess
    import sys

    # The four FACTS (one wrong reference, 5) and the first again: 4 of 5 right.
    answers = ["7", "9", "5", "12", "7"]
    questions = [q for q, _ in tiny.FACTS] + [tiny.FACTS[0][0]]
    rows = tiny.write_rows(tmp_path / "held.jsonl", [{"prompt": q, "answer": a} for q, a in zip(questions, answers)])
    script = os.path.join(os.path.dirname(__file__), "two_process_validation.py")
    measured = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += [script, answering_model, pair["teacher"], pair["data"], rows, str(out)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count(f"processes: {processes}") == processes
        lines = read_jsonl(str(out / "metrics.jsonl"))
        measured.append([(line["step"], line["eval/validation_accuracy"]) for line in lines])
    assert measured[0][0] == (0, 0.8) and measured[1] == measured[0]
