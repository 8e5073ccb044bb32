"""`dopd bench`: lm-evaluation-harness on a tiny custom task (four JSONL rows in the harness's own task format)
against the tiny answering model, checked against a hand count; the gap-recovery table by hand; and every bad
input stopped before any model loads. Nothing is downloaded: the task reads a local file."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import tiny

from dopd.bench import BENCHMARKS, ELSEWHERE, PAPER_LLM_SUITE, BenchSpec, markdown, recovery_table, resolve_tasks
from dopd.cli import main
from dopd.config import ConfigError

TASK = """\
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<eos>"]
  do_sample: false
  max_gen_toks: 6
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def task_dir(tmp_path):
    """The custom task: the four FACTS, with a wrong reference (5) for the third (the model says 6)."""
    directory = tmp_path / "tasks"
    directory.mkdir()
    rows = [{"question": q, "answer": a} for (q, _), a in zip(tiny.FACTS, ["7", "9", "5", "12"])]
    data = tiny.write_rows(directory / "tiny_sums.jsonl", rows)
    (directory / "tiny_sums.yaml").write_text(TASK.format(data=data))
    return str(directory)


def report_file(path, model, scores) -> str:
    results = {
        name: {"task": name, "metric": "exact_match,none", "score": s, "stderr": None} for name, s in scores.items()
    }
    path.write_text(json.dumps({"model": model, "results": results}))
    return str(path)


def test_the_harness_scores_a_tiny_task_by_hand_count(answering_model, task_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    teacher = report_file(tmp_path / "teacher.json", "teacher", {"tiny_sums": 1.0})
    student = report_file(tmp_path / "student.json", "student", {"tiny_sums": 0.5})
    out = tmp_path / "bench" / "model.json"
    argv = ["bench", "--model", answering_model, "--tasks", "tiny_sums", "--include-path", task_dir, "--device", "cpu"]
    argv += ["--out", str(out), "--teacher-result", teacher, "--student-result", student]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    # Hand count: the model answers 7, 9, 6, 12; the references are 7, 9, 5, 12: 3 of 4.
    row = report["results"]["tiny_sums"]
    assert (row["task"], row["metric"], row["score"]) == ("tiny_sums", "exact_match,last_number", 0.75)
    assert report["average"] == 0.75 and report["harness"]["name"] == "lm-evaluation-harness"
    assert report["gap_recovery"] == {"tiny_sums": pytest.approx(0.5), "average": pytest.approx(0.5)}  # .25 / .5
    table = (tmp_path / "bench" / "model.md").read_text()
    assert "| tiny_sums | tiny_sums | exact_match,last_number | 75.0 |" in table
    assert "| tiny_sums | 100.0 | 50.0 | 75.0 | 50.0% |" in table and table.strip() in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "bench")) == ["model.json", "model.md"]  # no temporary left


def test_gap_recovery_table_by_hand():
    results = {"math500": {"score": 0.6}, "aime25": {"score": 0.2}, "ceval": {"score": 0.5}}
    compare = {
        "teacher": {"scores": {"math500": 0.8, "aime25": 0.3, "ceval": 0.5}},
        "student": {"scores": {"math500": 0.4, "aime25": 0.1, "ceval": 0.5}},
    }
    table = recovery_table(results, compare)
    assert table["math500"] == pytest.approx(0.5) and table["aime25"] == pytest.approx(0.5)
    assert table["ceval"] is None  # no gap to recover
    assert table["average"] == pytest.approx((1.3 / 3 - 1.0 / 3) / (1.6 / 3 - 1.0 / 3))  # 0.3 / 0.6 of the means
    report = {"results": {k: {"task": k, "metric": "m", **v} for k, v in results.items()}, "average": 1.3 / 3}
    lines = markdown({**report, "gap_recovery": table, "compare": compare}).splitlines()
    assert "| math500 | 80.0 | 40.0 | 60.0 | 50.0% |" in lines and "| ceval | 50.0 | 50.0 | 50.0 | — |" in lines
    assert lines[-1] == "| average | 53.3 | 33.3 | 43.3 | 50.0% |"


def test_the_papers_suite_is_named_with_harness_tasks_or_where_to_run_it():
    assert set(PAPER_LLM_SUITE) <= set(BENCHMARKS) | set(ELSEWHERE) and len(PAPER_LLM_SUITE) == 8
    assert [BENCHMARKS[n].task for n in ("ceval", "math500", "aime25")] == ["ceval-valid", "minerva_math500", "aime25"]
    assert resolve_tasks(BenchSpec(model="m", benchmarks=["MATH500"], tasks=["x"])) == {
        "math500": ("minerva_math500", "math_verify,none"),
        "x": ("x", None),
    }
    with pytest.raises(ConfigError, match="zebralogicbench"):
        resolve_tasks(BenchSpec(model="m", benchmarks=["zebralogic"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--benchmarks", "mmlu"], "--benchmarks mmlu is unknown; use aime25, ceval, chartqa, math500, mmmu"),
        (["--benchmarks", "bfclv3"], "--benchmarks bfclv3: lm-evaluation-harness has no such task; BFCLv3: evalscope"),
        ([], "needs --benchmarks"),
        (["--tasks", "t", "--out", "r.txt"], "--out r.txt must be a file name ending in .json"),
        (["--tasks", "t", "--teacher-result", "nope.json"], "--teacher-result nope.json does not exist"),
        (["--tasks", "t", "--include-path", "nowhere"], "--include-path nowhere is not a folder"),
    ],
)
def test_bad_input_stops_before_the_model_loads(answering_model, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--model", answering_model, *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dopd: error: ") and message in error and len(error.splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_without_a_tokenizer_and_a_missing_harness(answering_model, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(answering_model, name), bare / name)
    assert main(["bench", "--model", str(bare), "--tasks", "t", "--out", str(tmp_path / "r.json")]) == 2
    assert f"--model {bare} holds no tokenizer" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["bench", "--model", answering_model, "--tasks", "t", "--out", str(tmp_path / "r.json")]) == 2
    assert 'needs lm-evaluation-harness, which is not installed: pip install -e ".[bench]"' in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bare"]


def test_an_unknown_harness_task_stops_before_the_model_loads(task_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "r.json"
    # A checkpoint that could not load (a tokenizer file and nothing else): the task check comes first.
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    assert (
        main(["bench", "--model", str(model), "--tasks", "no_such_task", "--include-path", task_dir, "--out", str(out)])
        == 2
    )
    assert "--tasks no_such_task: lm-evaluation-harness has no task of that name" in capsys.readouterr().err
    assert not out.exists()
