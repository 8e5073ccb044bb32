"""The trainer end to end on tiny models built by the test: every method, resume, accumulation, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402
from tiny import make_config, train_stopped_at, weights  # noqa: E402

from dopd.config import ConfigError, DataConfig  # noqa: E402
from dopd.data import build_prompt_set, load_rows  # noqa: E402
from dopd.objectives import METHODS  # noqa: E402
from dopd.routing import assign_regimes  # noqa: E402
from dopd.train import Trainer, train  # noqa: E402


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains(pair, tmp_path, method):
    teacher_before = weights(pair["teacher"])
    result = train(make_config(pair, tmp_path / "run", f"objective.method={method}"))
    after, before = weights(result.final_dir), weights(pair["student"])
    assert any(not torch.equal(after[k], before[k]) for k in before), "the student did not change"
    assert all(torch.equal(teacher_before[k], v) for k, v in weights(pair["teacher"]).items())
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2]
    for line in lines:
        assert torch.isfinite(torch.tensor(line["loss"]))
        assert line["tokens"] > 0 and "entropy/student" in line and line["time/step"] > 0
    if method == "dopd":
        fractions = sum(lines[-1][f"frac/{r}"] for r in ("LH", "LL", "HT", "HS"))
        assert fractions == pytest.approx(1.0)
        sample = json.loads(open(tmp_path / "run" / "samples.jsonl").readline())
        assert len(sample["regime"]) == len(sample["tokens"]) == len(sample["q_self"]) == len(sample["gap"])


def test_teacher_untouched_in_memory(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "run"))
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.run()
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_eval_mode_turns_every_module_to_eval_and_restores_each_one():
    from dopd.scoring import eval_mode

    model = tiny.build_model(12)
    model.train()
    model.model.layers[0].eval()  # a part the caller keeps in eval stays in eval
    before = {name: m.training for name, m in model.named_modules()}
    for _ in range(2):  # the second time from the kept module list
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
        assert {name: m.training for name, m in model.named_modules()} == before
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failing pass")
    assert {name: m.training for name, m in model.named_modules()} == before


def _step_routing(trainer):
    prompts = trainer.local_prompts()
    return prompts, trainer.engine.generate([trainer.prompts.student_ids[p] for p in prompts], 2)


def test_privileged_passes_read_the_context(pair, tmp_path):
    config = make_config(pair, tmp_path / "run", "rollout.temperature=0")
    trainer = Trainer(config)
    tok = trainer.tokenizer
    assert "hint" in tok.decode(trainer.prompts.teacher_ids[0]) and "hint" in tok.decode(trainer.prompts.self_ids[0])
    assert "hint" not in tok.decode(trainer.prompts.student_ids[0])
    prompts, rollouts = _step_routing(trainer)

    def regimes():
        batch = trainer.score(prompts, rollouts)[0]
        mask = batch.completions.mask
        return assign_regimes(
            batch.self_scores.token_logprobs,
            batch.teacher_scores.token_logprobs,
            mask,
            trainer.batch_thresholds([batch]),
        ), batch.teacher_scores.token_logprobs

    first, teacher_first = regimes()
    rows = [json.loads(line) for line in open(pair["data"])]
    for row in rows:
        row["privileged_context"] = "hint : add 19 then 19 then 19 ."
    other = DataConfig(path=_write_rows(tmp_path / "other.jsonl", rows))
    trainer.prompts = build_prompt_set(load_rows(other), other, tok, True, True)
    second, teacher_second = regimes()
    assert not torch.allclose(teacher_first, teacher_second)
    assert not torch.equal(first, second)


def test_gradient_accumulation_and_plain_form_match(pair, tmp_path):
    """Micro-batches of 1 or 8 sequences, chunked or plain loss: the same step loss and gradients."""
    results = []
    for number, extra in enumerate(
        (["train.micro_batch_size=8"], ["train.micro_batch_size=1"], ["train.micro_batch_size=3", "train.chunk_size=0"])
    ):
        config = make_config(pair, tmp_path / f"run{number}", "rollout.temperature=0", *extra)
        trainer = Trainer(config)
        prompts, rollouts = _step_routing(trainer)
        batches = trainer.score(prompts, rollouts)
        from dopd.train import StepMetrics

        metrics = StepMetrics()
        trainer.update(batches, trainer.batch_thresholds(batches), 0, metrics)
        grads = torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None])
        results.append((metrics.reduce(trainer.accelerator)["loss"], grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(grads, results[0][1], rtol=1e-4, atol=1e-7)


def test_resume_gives_the_same_weights(pair, tmp_path):
    common = ["train.steps=4", "checkpoint.save_every=2", "optim.schedule=cosine"]
    straight = train(make_config(pair, tmp_path / "straight", *common))

    train_stopped_at(make_config(pair, tmp_path / "resumed", *common), step=2)
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["step_000002"]
    resumed = train(make_config(pair, tmp_path / "resumed", *common, "checkpoint.resume=true"))
    a, b = weights(straight.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_padded_teacher_embeddings_and_chat_prompts(pair, tmp_path):
    chat_data = tiny.write_prompts(str(tmp_path / "chat.jsonl"), count=8, chat=True)
    config = make_config(pair, tmp_path / "run", f"model.teacher={pair['padded_teacher']}", f"data.path={chat_data}")
    trainer = Trainer(config)
    assert trainer.vocab_size == len(trainer.tokenizer)
    assert trainer.teacher.get_output_embeddings().weight.shape[0] == len(trainer.tokenizer) + 8
    result = trainer.run()
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))


def _write_rows(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "'privileged_context' is not a column"),
        ("empty_privileged", "rows have an empty 'privileged_context'"),
        ("template", "lacks {privileged_context}"),
        ("long_prompt", "prompts are longer than data.max_prompt_length = 8 tokens"),
        ("method", "objective.method = 'dopdd' is unknown; known: dopd, opd"),
        ("top_k", "objective.top_k = 1000 is larger than the vocabulary"),
        ("teacher_tokenizer", "has another tokenizer than the student"),
    ],
)
def test_bad_input_stops_before_training(pair, tmp_path, case, message):
    extra = []
    if case == "missing_column":
        extra = [f"data.path={_write_rows(tmp_path / 'd.jsonl', [{'prompt': 'what is 1 ?'}])}"]
    elif case == "empty_privileged":
        rows = [{"prompt": "what is 1 ?", "privileged_context": "hint"}, {"prompt": "1", "privileged_context": " "}]
        extra = [f"data.path={_write_rows(tmp_path / 'd.jsonl', rows)}"]
    elif case == "template":
        with pytest.raises(ConfigError, match="could not be parsed"):
            make_config(pair, tmp_path / "run", "data.teacher_template={prompt} hint")
        extra = ["""data.teacher_template='"{prompt} hint"'"""]
    elif case == "long_prompt":
        extra = ["data.max_prompt_length=8"]
    elif case == "method":
        extra = ["objective.method=dopdd"]
    elif case == "top_k":
        extra = ["objective.top_k=1000"]
    elif case == "teacher_tokenizer":
        other = tmp_path / "other"
        tiny.build_model(len(tiny.build_tokenizer(["extra"])), 16).save_pretrained(other)
        tiny.build_tokenizer(["extra"]).save_pretrained(other)
        extra = [f"model.teacher={other}"]
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}").replace("?", r"\?")):
        Trainer(make_config(pair, tmp_path / "run", *extra))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_refuses_a_directory_with_another_run(pair, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds files"):
        Trainer(make_config(pair, tmp_path / "run"))
    train(make_config(pair, tmp_path / "run", "logging.overwrite=true", "train.steps=1"))
    with pytest.raises(ConfigError, match="train.seed"):
        Trainer(make_config(pair, tmp_path / "run", "checkpoint.resume=true", "train.seed=5"))


def test_cli_help_lists_every_key_and_errors_are_one_line(pair, tmp_path):
    run = subprocess.run([sys.executable, "-m", "dopd", "train", "--help"], capture_output=True, text=True)
    assert run.returncode == 0
    for key in ("objective.beta_w", "rollout.num_generations", "data.teacher_template", "checkpoint.resume"):
        assert key in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "dopd", "train", f"model.student={pair['student']}", "objective.method=nope"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().startswith("dopd: error: objective.method = 'nope' is unknown")
    assert len(run.stderr.strip().splitlines()) == 1


def _default_text(value) -> str | None:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return None if value is None else str(value)


def test_cli_help_defaults_are_the_settings_defaults():
    """Every `default X` in the help of `dopd lab`, `hints` and `eval` is the default of the dataclass field the
    option sets (LabConfig, HintsSpec, EvalSpec), so the help cannot drift from what the command does."""
    import argparse
    import codecs
    import dataclasses
    import re

    from dopd.cli import build_parser
    from dopd.evaluate import EvalSpec
    from dopd.hints import HintsSpec
    from dopd.lab.runner import LabConfig

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command, spec in (("lab", LabConfig), ("hints", HintsSpec), ("eval", EvalSpec)):
        fields = {f.name: f for f in dataclasses.fields(spec)}
        for action in subparsers.choices[command]._actions:
            match = re.search(r"\bdefault ('[^']*'|[^\s):]+)", action.help or "")
            if not match or action.dest not in fields:
                continue
            item = fields[action.dest]
            value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if value is dataclasses.MISSING:  # a required field: the command line fills it (e.g. a timestamped --out)
                continue
            expected = _default_text(value)
            if expected is None:  # the help describes what None means
                continue
            shown = match.group(1).rstrip(",")
            if shown.startswith("'"):
                shown = codecs.decode(shown.strip("'"), "unicode_escape")
            pairs = list(zip(shown.split(","), expected.split(",")))
            try:  # numbers compare by value, item by item (1e-4 is 0.0001)
                same = len(shown.split(",")) == len(expected.split(",")) and all(float(a) == float(b) for a, b in pairs)
            except ValueError:
                same = shown == expected
            assert same, (
                f"dopd {command} {action.option_strings[0]}: help says {shown!r}, {spec.__name__} has {expected!r}"
            )
            checked += 1
    assert checked >= 25


@pytest.mark.slow
def test_two_processes_match_one(pair, tmp_path):
    """`accelerate launch --num_processes 2 --cpu`: the first step's loss equals one process's, within 1e-5, and
    the learning-rate schedule is the same."""
    script = os.path.join(os.path.dirname(__file__), "two_process_step.py")
    losses = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--cpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            script,
            pair["student"],
            pair["teacher"],
            pair["data"],
            str(out),
        ]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses.append((lines[0]["loss"], [line["lr"] for line in lines]))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5, abs=1e-7)
    assert losses[1][1] == pytest.approx(losses[0][1])  # the schedule advances once per step on every process


def test_student_keeps_fp32_weights_and_teacher_takes_model_dtype(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "run", "model.dtype=bfloat16"))
    assert trainer.inner.dtype == torch.float32
    assert trainer.teacher.dtype == torch.bfloat16
    result = trainer.run()
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))


def test_rollouts_ignore_the_checkpoint_generation_defaults(pair, tmp_path):
    trainer = Trainer(make_config(pair, tmp_path / "run", "rollout.temperature=0", "rollout.max_new_tokens=12"))
    prompts = [trainer.prompts.student_ids[i] for i in range(4)]
    clean = trainer.engine.generate(prompts, 1).completion_ids
    defaults = trainer.inner.generation_config
    defaults.repetition_penalty, defaults.no_repeat_ngram_size, defaults.eos_token_id = 50.0, 1, [1, 7]
    assert trainer.engine.generate(prompts, 1).completion_ids == clean
    assert trainer.inner.generation_config is defaults  # restored after the rollout
    assert trainer.engine.eos_ids == {1, 7}  # the model's end-of-sequence ids end completions too
    assert not getattr(trainer.engine.generation_config(trainer.inner), "suppress_tokens", None)


def test_ids_beyond_the_shared_vocabulary_are_never_sampled(pair, tmp_path):
    """A student head larger than the teacher's: rows past the shared size are suppressed in rollouts."""
    trainer = Trainer(
        make_config(
            pair, tmp_path / "run", f"model.student={pair['padded_teacher']}", f"model.teacher={pair['student']}"
        )
    )
    config = trainer.engine.generation_config(trainer.inner)
    assert config.suppress_tokens == list(range(trainer.vocab_size, trainer.vocab_size + 8))


def test_learning_rate_schedule_steps_once_per_step(pair, tmp_path):
    result = train(
        make_config(
            pair, tmp_path / "run", "train.steps=4", "optim.warmup_steps=2", "optim.lr=1.0", "logging.sample_every=0"
        )
    )
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    expected = [0.0, 0.5, 1.0, 0.5]  # linear warm-up over steps 1-2, then cosine over the remaining two
    assert lrs == pytest.approx(expected)
    assert result.steps == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.trim=1.0", "objective.trim = 1.0 must be in"),
        ("objective.beta_l=-0.6", "objective.beta_l = -0.6 must be >= 0"),
        ("rollout.top_k=-3", "rollout.top_k = -3 must be >= 0"),
        ("rollout.backend=sglang", "rollout.backend = 'sglang' is unknown; use hf or vllm"),
        ("train.max_tokens_per_micro_batch=-1", "train.max_tokens_per_micro_batch = -1 must be >= 0"),
        ("checkpoint.save_every=-1", "checkpoint.save_every = -1 must be >= 0"),
        ("train.mixed_precision=fp8", "train.mixed_precision = 'fp8' is unknown"),
    ],
)
def test_settings_that_cannot_work_fail_at_load(pair, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(pair, tmp_path / "run", override)
