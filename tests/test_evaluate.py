"""`dopd eval`: the answer checkers on hand-written completions, pass@k and gap recovery against hand values, and
the command end to end on a tiny Qwen3 model trained here to give known answers (and on the lab's shipped pair)."""

from __future__ import annotations

import itertools
import json
import os
import sys

import pytest
import tiny
import torch

from dopd.cli import main
from dopd.config import ConfigError
from dopd.evaluate import (
    EvalData,
    EvalSampling,
    EvalSpec,
    ExactChecker,
    MathChecker,
    default_ks,
    evaluate,
    final_answer_text,
    gap_recovery,
    make_checker,
    pass_at_k,
    read_result,
    summarize,
)

# ------------------------------------------------------------------------------------------------ metrics


def brute_force_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_by_hand_and_by_enumeration():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - (100 * 99 * 98) / (200 * 199 * 198))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert default_ks(1) == [1] and default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6]


def test_summary_weights_prompts_equally():
    summary = summarize([[True, False, False, False], [True, True, True, True]], [1, 2, 4])
    assert summary["accuracy"] == pytest.approx((0.25 + 1.0) / 2)
    assert summary["pass_at_k"] == pytest.approx({"1": 0.625, "2": 0.75, "4": 1.0})


def test_gap_recovery_reproduces_the_papers_figures():
    assert gap_recovery(51.4, 39.1, 52.8) == pytest.approx(0.898, abs=5e-4)  # DOPD, LLM
    assert gap_recovery(43.9, 39.1, 52.8) == pytest.approx(0.350, abs=5e-4)  # vanilla OPD, LLM
    assert gap_recovery(58.4, 48.3, 62.9) == pytest.approx(0.692, abs=5e-4)  # DOPD, VLM
    assert gap_recovery(0.3, 0.4, 0.4) is None
    assert gap_recovery(0.5, 0.6, 0.4) is None  # a teacher below the student leaves no gap to recover


# ------------------------------------------------------------------------------------------------ checkers


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        ("so the result is \\boxed{1/2}", "0.5", True),
        ("The answer is 0.5", "1/2", True),
        ("We get $\\frac{1}{2}$.", "0.5", True),
        ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", True),
        ("In total \\boxed{1,000} apples.", "1000", True),
        ("x = \\boxed{3}", "x=3", True),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", True),
        ("\\boxed{0.25}", "0.5", False),
        ("<think>maybe it is 0.5</think>The answer is \\boxed{0.25}.", "0.5", False),
        ("I cannot solve this.", "0.5", False),
        ("", "7", False),
    ],
)
def test_math_checker_on_hand_written_completions(completion, answer, correct):
    checker = MathChecker()
    checker.prepare([answer], ["q"], [{}])
    assert checker.score(0, completion) is correct


def test_math_checker_refuses_answers_it_cannot_read():
    checker = MathChecker()
    with pytest.raises(
        ConfigError, match=r"1 of 3 reference answers cannot be read .*row 1: 'hello world'.*--checker exact"
    ):
        checker.prepare(["7", "hello world", "\\frac{1}{2}"], ["a", "b", "c"], [{}, {}, {}])


def test_a_missing_math_verify_is_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'math-verify>=0.7' \(or use --checker exact\)"):
        make_checker("math")


def test_exact_checker_reads_the_final_answer():
    assert final_answer_text("Work...\nThe final answer is: Paris.\nThanks") == "Paris."
    assert final_answer_text("<think>answer: no</think>first\n\\boxed{B} then") == "B"
    assert final_answer_text("line one\n  last line  \n\n") == "  last line"
    checker = ExactChecker()
    checker.prepare(["Paris", "\\boxed{B}", "42"], ["q"] * 3, [{}] * 3)
    assert checker.score(0, "So the answer is  paris.") and not checker.score(0, "the answer is Lyon")
    assert checker.score(1, "I pick \\boxed{ b }") and checker.score(2, "it is\n$42$")
    assert not checker.score(2, "it is\n42 or 43")
    with pytest.raises(ConfigError, match="unknown; use math, exact or lab:TASK"):
        make_checker("fuzzy")
    with pytest.raises(ConfigError, match="lab:nope"):
        make_checker("lab:nope")


# ---------------------------------------------------------------------------------- the command end to end

FACTS = tiny.FACTS  # the answering_model fixture (conftest.py) answers these


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def math_rows():
    # The model answers 7, 9, 6, 12. References in equivalent forms for the first, second and fourth, and a
    # wrong reference (5) for the third: 3 of 4 correct.
    answers = ["7.0", "\\frac{18}{2}", "5", "$12$"]
    return [{"prompt": q, "answer": a} for (q, _), a in zip(FACTS, answers)]


def test_eval_scores_a_tiny_model_with_known_answers(answering_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows())
    out = tmp_path / "reports" / "student.json"
    argv = [
        "eval",
        "--model",
        answering_model,
        "--data",
        data,
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["accuracy"] == 0.75 and report["pass_at_k"] == {"1": 0.75}
    assert [row["correct"] for row in report["rows"]] == [[True], [True], [False], [True]]
    assert [row["completions"] for row in report["rows"]] == [
        ["answer : 7"],
        ["answer : 9"],
        ["answer : 6"],
        ["answer : 12"],
    ]
    assert report["checker"] == "math" and report["data"]["rows"] == 4 and report["completions_at_token_limit"] == 0
    table = (tmp_path / "reports" / "student.md").read_text()
    assert "| 0.750 | 0.750 | — |" in table and table.strip() in printed
    assert f"report: {out} and {tmp_path / 'reports' / 'student.md'}" in printed
    assert sorted(os.listdir(tmp_path / "reports")) == ["student.json", "student.md"]  # no temporary left


def test_sampling_several_answers_and_the_gap_recovery(answering_model, tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows())
    base = tmp_path / "base.json"
    short = EvalSampling(max_new_tokens=6)
    evaluate(EvalSpec(model=answering_model, data=EvalData(path=data), out=str(base), sampling=short, progress=False))
    spec = EvalSpec(
        model=answering_model,
        data=EvalData(path=data),
        out=str(tmp_path / "sampled.json"),
        sampling=EvalSampling(num_generations=4, temperature=3.0, max_new_tokens=6),
        pass_k=[1, 2, 4],
        progress=False,
        teacher_result="0.95",
        student_result=str(base),
    )
    report = evaluate(spec)
    correct = [row["correct"] for row in report["rows"]]
    assert report["pass_at_k"]["4"] > report["pass_at_k"]["1"]  # at this temperature the samples differ
    assert all(len(row) == 4 and len(r["completions"]) == 4 for row, r in zip(correct, report["rows"]))
    assert report["accuracy"] == pytest.approx(sum(map(sum, correct)) / 16)
    for k in (1, 2, 4):
        expected = sum(pass_at_k(4, sum(row), k) for row in correct) / 4
        assert report["pass_at_k"][str(k)] == pytest.approx(expected)
    # The stored verdicts are the checker's verdicts on the stored completions.
    checker = MathChecker()
    checker.prepare([row["answer"] for row in math_rows()], [], [])
    assert correct == [[checker.score(i, text) for text in row["completions"]] for i, row in enumerate(report["rows"])]
    assert report["compare"]["student"]["accuracy"] == 0.75
    assert report["gap_recovery"] == pytest.approx((report["accuracy"] - 0.75) / (0.95 - 0.75))
    table = (tmp_path / "sampled.md").read_text().splitlines()
    assert table[0] == "| model | prompts | samples | accuracy | pass@1 | pass@2 | pass@4 | gap recovery |"
    assert table[2] == "| teacher (given) | — | — | 0.950 | — | — | — | 100.0% |"
    assert table[3] == f"| student before ({answering_model}) | 4 | 1 | 0.750 | 0.750 | — | — | 0.0% |"
    assert table[4].startswith(f"| **{answering_model}** | 4 | 4 | {report['accuracy']:.3f} | ")
    assert table[4].endswith(f" | {100 * report['gap_recovery']:.1f}% |")
    seeded = evaluate(EvalSpec(**{**spec.__dict__, "out": str(tmp_path / "again.json")}))
    assert [r["completions"] for r in seeded["rows"]] == [r["completions"] for r in report["rows"]]  # seeded


def test_lab_checker_agrees_with_the_labs_own_evaluation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dopd.lab.evaluation import evaluate as lab_evaluate
    from dopd.lab.models import PRETRAINED_DIR
    from dopd.lab.tasks import get_task

    student = str(PRETRAINED_DIR / "arith" / "student")
    task = get_task("arith")
    examples = task.examples(24, seed=777)
    data = write_jsonl(
        tmp_path / "arith.jsonl",
        [{"prompt": ex.prompt, "answer": ex.answer, "completion": ex.completion} for ex in examples],
    )
    report = evaluate(
        EvalSpec(
            model=student,
            data=EvalData(path=data),
            out=str(tmp_path / "lab.json"),
            checker="lab:arith",
            sampling=EvalSampling(max_new_tokens=48, batch_size=24),
            progress=False,
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    expected = lab_evaluate(model, tokenizer, task, examples, batch_size=24, max_new_tokens=48)
    assert report["checker"] == "lab:arith"
    assert report["accuracy"] == pytest.approx(expected["answer_accuracy"])
    assert 0 < report["accuracy"] < 1  # the shipped student gets some right and some wrong


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--answer-column", "solution"], "--answer-column = 'solution' is not a column"),
        (["--prompt-column", "question"], "--prompt-column = 'question' is not a column"),
        (["--samples", "4"], "--samples 4 with --temperature 0 gives 4 identical greedy answers"),
        (["--samples", "2", "--temperature", "1", "--pass-k", "1,4"], "--pass-k 4 must be between 1 and --samples = 2"),
        (["--teacher-result", "52.8"], "must be an accuracy in [0, 1] (0.528, not 52.8)"),
        (["--checker", "lab:nope"], "--checker lab:nope"),
        (["--out", "report.txt"], "must end in .json"),
        (["--data", "missing.parquet"], "--data missing.parquet does not exist"),
        (["--privileged"], "--privileged-column = 'privileged_context' is not a column"),
        (["--privileged", "--template", "{prompt} only"], "--template = '{prompt} only' lacks {privileged_context}"),
    ],
)
def test_bad_input_stops_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "math.jsonl", math_rows())
    # The model path does not exist: every one of these errors must come before loading it.
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", data, "--out", "r.json", "--no-progress"] + extra
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dopd: error: ") and message in error and len(error.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["math.jsonl"]


def test_unreadable_answers_and_other_reports_are_refused(answering_model, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", math_rows() + [{"prompt": "what is ?", "answer": "a lot of apples"}])
    with pytest.raises(ConfigError, match=r"1 of 5 reference answers cannot be read .*row 4: 'a lot of apples'"):
        evaluate(
            EvalSpec(
                model=str(tmp_path / "no-model"), data=EvalData(path=bad), out=str(tmp_path / "r.json"), progress=False
            )
        )
    assert main(["eval", "--model", answering_model, "--data", bad, "--out", str(tmp_path / "r.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("dopd: error: 1 of 5 reference answers") and len(error.splitlines()) == 1
    data = EvalData(path=write_jsonl(tmp_path / "math.jsonl", math_rows()))
    other = write_jsonl(tmp_path / "other.jsonl", math_rows()[:3])
    evaluate(
        EvalSpec(
            model=answering_model,
            data=EvalData(path=other),
            out=str(tmp_path / "other.json"),
            sampling=EvalSampling(max_new_tokens=6),
            progress=False,
        )
    )
    with pytest.raises(ConfigError, match="was measured on other prompts or answers"):
        evaluate(
            EvalSpec(
                model=answering_model,
                data=data,
                out=str(tmp_path / "r.json"),
                progress=False,
                teacher_result=str(tmp_path / "other.json"),
            )
        )
    with pytest.raises(ConfigError, match="neither an accuracy in \\[0, 1\\] nor an existing"):
        read_result(str(tmp_path / "missing.json"), "--teacher-result")
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(ConfigError, match="--model .*no-model does not exist"):
        evaluate(
            EvalSpec(
                model=str(tmp_path / "no-model"),
                data=data,
                out=str(tmp_path / "r.json"),
                progress=False,
                tokenizer=answering_model,
            )
        )
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="the model .* could not be loaded"):
        evaluate(
            EvalSpec(
                model=str(broken), data=data, out=str(tmp_path / "r.json"), progress=False, tokenizer=answering_model
            )
        )
    assert not (tmp_path / "r.json").exists()


def test_progress_counts_generated_tokens_not_the_prompt():
    from dopd.evaluate import _TokenProgress

    class Bar:
        n = 0

        def update(self, count):
            self.n += count

    bar = Bar()
    progress = _TokenProgress(bar)
    progress.put(torch.zeros(4, 9, dtype=torch.long))  # the prompt of a batch of 4
    for _ in range(3):
        progress.put(torch.zeros(4, dtype=torch.long))  # one token per row and step
    progress.end()
    progress.put(torch.zeros(2, 5, dtype=torch.long))  # the next batch's prompt
    progress.put(torch.zeros(2, dtype=torch.long))
    assert bar.n == 4 * 3 + 2


def test_the_vllm_backend_over_a_fake_engine(answering_model, tmp_path, monkeypatch):
    """`--backend vllm` through `rollout/vllm_llm.py` over the tests' fake `vllm.LLM`: its engine settings, one
    seeded request per sample, and the same report as the hf backend (hand count below)."""
    import importlib.machinery
    import types

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = tiny.FakeLLM, lambda **kwargs: dict(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    tiny.FakeLLM.instances = []
    # FakeLLM answers request i with "2 3 <eos>" (i even) or "4 5 6 7" (i odd, at the token limit).
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": q, "answer": a} for (q, _), a in zip(FACTS[:2], ["2 3", "4 5 6 7"])]
    )
    out = tmp_path / "vllm.json"
    argv = ["eval", "--model", answering_model, "--data", data, "--out", str(out), "--backend", "vllm"]
    argv += ["--tensor-parallel-size", "2", "--samples", "2", "--temperature", "0.6", "--top-k", "5"]
    assert main([*argv, "--checker", "exact", "--max-new-tokens", "4", "--no-progress"]) == 0
    report = json.loads(out.read_text())
    # the exact checker reads the whole line: prompt 0's first sample and prompt 1's second match their references
    assert [row["completions"] for row in report["rows"]] == [["2 3", "4 5 6 7"], ["2 3", "4 5 6 7"]]
    assert [row["correct"] for row in report["rows"]] == [[True, False], [False, True]]
    assert report["accuracy"] == 0.5 and report["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert report["completions_at_token_limit"] == 2 and report["sampling"]["backend"] == "vllm"
    llm = tiny.FakeLLM.instances[-1]
    assert llm.kwargs["model"] == answering_model and llm.kwargs["tensor_parallel_size"] == 2
    ((requests, params),) = llm.calls
    assert len(requests) == 4 and requests[0] == requests[1] != requests[2]
    assert {(p["n"], p["temperature"], p["top_k"], p["max_tokens"]) for p in params} == {(1, 0.6, 5, 4)}
    assert len({p["seed"] for p in params}) == 4 and params[0]["stop_token_ids"] == [1]
