"""Every input that cannot work stops before any work with one line that names the key or option and the fix, and
leaves nothing on disk: `dopd train`, `lab`, `eval`, `hints` and `report`, run in-process through the command line.

Each case runs in an empty working directory; the inputs it needs live elsewhere (the tiny pair, prompt files).
After the command the working directory must be as empty as before, and the inputs unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import tiny

from dopd.cli import main

STEPS = ["train.steps=1", "train.prompts_per_step=2", "rollout.num_generations=2", "rollout.max_new_tokens=4",
         "objective.top_k=8", "logging.progress_bar=false", "checkpoint.save_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pair):
    """Files the bad inputs are made of, outside the directories the commands run in."""
    root = tmp_path_factory.mktemp("inputs")
    rows = [json.loads(line) for line in open(pair["data"])]

    def jsonl(name, records):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    other_vocabulary = tiny.write_pair(str(root / "other"), student_hidden=16, teacher_hidden=16)[1]
    tiny_tokenizer = tiny.build_tokenizer(extra_words=["extra"])  # another vocabulary for the teacher
    tiny_tokenizer.save_pretrained(other_vocabulary)
    other_template = str(root / "other-template")
    shutil.copytree(pair["teacher"], other_template)
    config = json.loads(open(os.path.join(other_template, "tokenizer_config.json")).read())
    config["chat_template"] = "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] }}{% endfor %}"
    open(os.path.join(other_template, "tokenizer_config.json"), "w").write(json.dumps(config))
    for name in ("chat_template.jinja",):
        if os.path.exists(os.path.join(other_template, name)):
            os.remove(os.path.join(other_template, name))
    files = {
        "data": pair["data"],
        "student": pair["student"],
        "teacher": pair["teacher"],
        "other_vocabulary": other_vocabulary,
        "other_template": other_template,
        "bad_yaml": str(root / "bad.yaml"),
        "list_yaml": str(root / "list.yaml"),
        "numbers": jsonl("numbers.jsonl", [{**r, "prompt": 7} for r in rows]),
        "no_user": jsonl("no-user.jsonl", [{**r, "prompt": [{"role": "system", "content": "x"}]} for r in rows]),
        "empty_hints": jsonl("empty.jsonl", [{**r, "privileged_context": ""} for r in rows]),
        "text": str(root / "data.txt"),
        "math": jsonl("math.jsonl", [{"prompt": "1+1?", "answer": "2", "solution": "1+1 = 2. #### 2"}] * 3),
        "existing_out": jsonl("existing.jsonl", [{"x": 1}]),
        "no_runs": str(root / "no-runs"),
        "no_answer": jsonl("no-answer.jsonl", [{"prompt": r["prompt"]} for r in rows]),
    }
    open(files["bad_yaml"], "w").write("model: {student: x\ndata: [unclosed\n")
    open(files["list_yaml"], "w").write("- model\n- data\n")
    open(files["text"], "w").write("not a data set\n")
    os.makedirs(files["no_runs"])
    return files


def eval_args(inputs, *extra):
    return ["eval", "--model", inputs["student"], "--data", inputs["math"], "--out", "r.json", *extra]


def train_args(inputs, *extra):
    return [
        "train",
        f"model.student={inputs['student']}",
        f"model.teacher={inputs['teacher']}",
        f"data.path={inputs['data']}",
        "logging.output_dir=run",
        *STEPS,
        *extra,
    ]


# (command line, the text the one line must hold: the key or option named, and what is wrong)
CASES = {
    # train: the config
    "yaml_malformed": lambda f: (["train", "--config", f["bad_yaml"]], "is not valid YAML at line"),
    "yaml_not_mapping": lambda f: (["train", "--config", f["list_yaml"]], "not a mapping of sections"),
    "config_missing": lambda f: (["train", "--config", "nope.yaml"], "--config nope.yaml does not exist"),
    "unknown_key": lambda f: (train_args(f, "objective.methd=dopd"), "objective.methd"),
    "override_without_value": lambda f: (train_args(f, "train.steps"), "is not of the form key=value"),
    "value_type": lambda f: (train_args(f, "train.steps=many"), "train.steps"),
    "unknown_method": lambda f: (train_args(f, "objective.method=dopdd"), "objective.method = 'dopdd' is unknown"),
    "no_student": lambda f: (
        ["train", f"data.path={f['data']}", "logging.output_dir=run"],
        "model.student is required",
    ),
    "no_data": lambda f: (
        ["train", f"model.student={f['student']}", f"model.teacher={f['teacher']}", "logging.output_dir=run"],
        "data.path is required",
    ),
    "no_output_dir": lambda f: (
        ["train", f"model.student={f['student']}", f"model.teacher={f['teacher']}", f"data.path={f['data']}"],
        "logging.output_dir is required",
    ),
    "negative_lr": lambda f: (train_args(f, "optim.lr=-1"), "optim.lr = -1.0 must be positive"),
    "warmup_too_long": lambda f: (train_args(f, "optim.warmup_steps=5"), "optim.warmup_steps = 5"),
    "resume_and_overwrite": lambda f: (
        train_args(f, "checkpoint.resume=true", "logging.overwrite=true"),
        "checkpoint.resume and logging.overwrite",
    ),
    "bad_regex": lambda f: (train_args(f, "logging.answer_pattern=A:["), "logging.answer_pattern"),
    "self_weights": lambda f: (train_args(f, "objective.self_weights=stale"), "objective.self_weights = 'stale'"),
    "ema_decay": lambda f: (train_args(f, "objective.self_ema_decay=1.5"), "objective.self_ema_decay = 1.5"),
    "template": lambda f: (train_args(f, "data.teacher_template='{prompt}'"), "lacks {privileged_context}"),
    "top_k_over_vocabulary": lambda f: (train_args(f, "objective.top_k=100000"), "objective.top_k = 100000"),
    # train: paths and data
    "student_path": lambda f: (
        train_args(f, "model.student=./nope/student"),
        "model.student = ./nope/student does not exist",
    ),
    "teacher_path": lambda f: (
        train_args(f, "model.teacher=/nope/teacher"),
        "model.teacher = /nope/teacher does not exist",
    ),
    "data_path": lambda f: (train_args(f, "data.path=missing.jsonl"), "data.path = missing.jsonl does not exist"),
    "data_extension": lambda f: (train_args(f, f"data.path={f['text']}"), "has extension '.txt'"),
    "prompt_column": lambda f: (
        train_args(f, "data.prompt_column=question"),
        "data.prompt_column = 'question' is not a column",
    ),
    "empty_privileged": lambda f: (
        train_args(f, f"data.path={f['empty_hints']}"),
        "have an empty 'privileged_context'",
    ),
    "prompt_not_text": lambda f: (
        train_args(f, f"data.path={f['numbers']}"),
        "a int; give a string or a list of chat messages",
    ),
    "chat_without_user": lambda f: (train_args(f, f"data.path={f['no_user']}"), "without a user turn"),
    "long_prompts": lambda f: (train_args(f, "data.max_prompt_length=3"), "data.max_prompt_length = 3"),
    # train: the pair
    "teacher_vocabulary": lambda f: (train_args(f, f"model.teacher={f['other_vocabulary']}"), "has another tokenizer"),
    "teacher_template": lambda f: (
        train_args(f, f"model.teacher={f['other_template']}"),
        "data.teacher_chat_template=true",
    ),
    # lab
    "lab_seeds": lambda f: (["lab", "--out", "lab", "--seeds", "a,b"], "--seeds"),
    "lab_steps": lambda f: (["lab", "--out", "lab", "--steps", "-5"], "--steps = -5 must be at least 1"),
    "lab_steps_type": lambda f: (["lab", "--out", "lab", "--steps", "five"], "argument --steps"),
    "lab_method": lambda f: (["lab", "--out", "lab", "--methods", "dpod"], "--methods has 'dpod'"),
    "lab_override": lambda f: (["lab", "--out", "lab", "--methods", "dopd[self_weight=frozen]"], "self_weight=frozen"),
    "lab_rates": lambda f: (["lab", "--out", "lab", "--lr-grid", "0"], "--lr-grid"),
    "lab_privilege": lambda f: (["lab", "--out", "lab", "--privilege", "none"], "--privilege 'none' is unknown"),
    "lab_task": lambda f: (["lab", "--out", "lab", "--task", "nosuch"], "lab task 'nosuch' is unknown"),
    "lab_pair": lambda f: (["lab", "--out", "lab", "--pair", "teacher_stepz=3"], "--pair"),
    "lab_quick_full": lambda f: (["lab", "--out", "lab", "--quick", "--full"], "--quick and --full"),
    "lab_workers": lambda f: (["lab", "--out", "lab", "--workers", "0"], "--workers = 0 must be at least 1"),
    "lab_pretrain_pair": lambda f: (["lab", "pretrain", "--out", "pair", "--pair", "teacher_stepz=3"], "--pair"),
    "lab_pretrain_after": lambda f: (["lab", "--steps", "3", "pretrain", "--out", "pair"], "--steps: an option of"),
    # eval
    "eval_data": lambda f: (
        ["eval", "--model", f["student"], "--data", "missing.jsonl", "--out", "r.json"],
        "--data missing.jsonl does not exist",
    ),
    "eval_model": lambda f: (
        ["eval", "--model", "./nope", "--data", f["math"], "--out", "r.json", "--checker", "exact"],
        "--model ./nope does not exist",
    ),
    "eval_column": lambda f: (
        eval_args(f, "--answer-column", "solutionz"),
        "--answer-column = 'solutionz' is not a column",
    ),
    "eval_backend": lambda f: (eval_args(f, "--backend", "tgi"), "--backend 'tgi' is unknown"),
    "eval_tensor_parallel_hf": lambda f: (eval_args(f, "--tensor-parallel-size", "2"), "--tensor-parallel-size"),
    "train_eval_no_answers": lambda f: (
        train_args(f, "eval.every=1", f"eval.path={f['no_answer']}"),
        "eval.answer_column = 'answer' is not a column",
    ),
    "train_eval_no_path": lambda f: (train_args(f, "eval.every=2"), "eval.path"),
    "train_keep_best_alone": lambda f: (train_args(f, "checkpoint.keep_best=true"), "checkpoint.keep_best"),
    "eval_samples": lambda f: (eval_args(f, "--samples", "0"), "--samples"),
    "eval_pass_k": lambda f: (eval_args(f, "--pass-k", "a,b"), "--pass-k"),
    "eval_checker": lambda f: (eval_args(f, "--checker", "nosuch"), "--checker"),
    # hints
    "hints_input": lambda f: (
        ["hints", "--input", "missing.jsonl", "--form", "stepwise", "--out", "h.jsonl"],
        "--input missing.jsonl does not exist",
    ),
    "hints_form": lambda f: (["hints", "--input", f["math"], "--form", "nosuch", "--out", "h.jsonl"], "--form"),
    "hints_out_exists": lambda f: (
        ["hints", "--input", f["math"], "--form", "stepwise", "--out", f["existing_out"]],
        "--out",
    ),
    "hints_column": lambda f: (
        ["hints", "--input", f["math"], "--form", "stepwise", "--out", "h.jsonl", "--solution-column", "solutionz"],
        "solutionz",
    ),
    "hints_required": lambda f: (["hints", "--input", f["math"], "--out", "h.jsonl"], "--form"),
    # report
    "report_missing": lambda f: (["report", "no-such-run"], "no-such-run"),
    "report_no_runs": lambda f: (["report", f["no_runs"]], "no run directory"),
}

if importlib.util.find_spec("vllm") is None:  # a machine with vLLM runs the backend instead
    CASES["eval_vllm_missing"] = lambda f: (eval_args(f, "--backend", "vllm"), "--backend vllm needs vLLM")


def _snapshot(path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(root, name), path) for root, dirs, files in os.walk(path) for name in dirs + files
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_stops_with_one_line_and_leaves_nothing(case, inputs, tmp_path, monkeypatch, capsys):
    argv, expected = CASES[case](inputs)
    monkeypatch.chdir(tmp_path)
    paths = [path for path in inputs.values() if os.path.exists(path)]
    before_inputs = {path: os.path.getmtime(path) for path in paths}
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (a value of the wrong type, a missing option)
        code = exit_.code
    error = capsys.readouterr().err.strip().splitlines()
    error = [line for line in error if not line.startswith("dopd: loaded")]
    assert code == 2, (case, error)
    assert len(error) == 1 and "Traceback" not in error[0], (case, error)
    assert error[0].startswith(
        (
            "dopd: error:",
            "dopd train: error:",
            "dopd lab: error:",
            "dopd eval: error:",
            "dopd hints: error:",
            "dopd report: error:",
        )
    ), error[0]
    assert expected in error[0], (case, error[0])
    assert _snapshot(tmp_path) == [], (case, _snapshot(tmp_path))  # nothing written where the command ran
    assert {path: os.path.getmtime(path) for path in paths} == before_inputs  # the inputs untouched


def test_there_are_at_least_forty_cases_over_every_command():
    commands = {
        CASES[case](
            {
                k: "x"
                for k in (
                    "student",
                    "teacher",
                    "data",
                    "math",
                    "existing_out",
                    "no_runs",
                    "other_vocabulary",
                    "other_template",
                    "bad_yaml",
                    "list_yaml",
                    "numbers",
                    "no_user",
                    "empty_hints",
                    "text",
                    "no_answer",
                )
            }
        )[0][0]
        for case in CASES
    }
    assert len(CASES) >= 40 and commands == {"train", "lab", "eval", "hints", "report"}
