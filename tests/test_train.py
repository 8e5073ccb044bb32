"""The trainer end to end on tiny models built by the test: every method, resume, accumulation, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch
from tiny import make_config, weights

from dopd.config import ConfigError
from dopd.objectives import METHODS
from dopd.train import Trainer, train


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


def test_gradient_accumulation_and_plain_form_match(pair, tmp_path):
    """Micro-batches of 1 or 8 sequences, chunked or plain loss: the same step loss and gradients."""
    results = []
    for number, extra in enumerate(
        (
            ["train.micro_batch_size=8"],
            ["train.micro_batch_size=1"],
            ["train.micro_batch_size=3", "train.loss_form=plain"],
        )
    ):
        config = make_config(pair, tmp_path / f"run{number}", "rollout.temperature=0", *extra)
        trainer = Trainer(config)
        prompts, rollouts = tiny.first_rollouts(trainer)
        batches = trainer.score(prompts, rollouts)
        from dopd.train import StepMetrics

        metrics = StepMetrics()
        trainer.update(batches, trainer.batch_cuts(batches), 0, metrics)
        grads = torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None])
        results.append((metrics.reduce(trainer.accelerator)["loss"], grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(grads, results[0][1], rtol=1e-4, atol=1e-7)


def test_padded_teacher_embeddings_and_chat_prompts(pair, tmp_path):
    chat_data = tiny.write_prompts(str(tmp_path / "chat.jsonl"), count=8, chat=True)
    config = make_config(pair, tmp_path / "run", f"model.teacher={pair['padded_teacher']}", f"data.path={chat_data}")
    trainer = Trainer(config)
    assert trainer.vocab_size == len(trainer.tokenizer)
    assert trainer.teacher.get_output_embeddings().weight.shape[0] == len(trainer.tokenizer) + 8
    result = trainer.run()
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "'privileged_context' is not a column"),
        ("empty_privileged", "rows have an empty 'privileged_context'"),
        ("template", "lacks {privileged_context}"),
        ("long_prompt", "prompts are longer than data.max_prompt_length = 8 tokens"),
        ("method", "objective.method = 'dopdd' is unknown; known: dopd, dopd-rkl, opd"),
        ("top_k", "objective.top_k = 1000 is larger than the vocabulary"),
        ("teacher_tokenizer", "has another tokenizer than the student"),
    ],
)
def test_bad_input_stops_before_training(pair, tmp_path, case, message):
    extra = []
    if case == "missing_column":
        extra = [f"data.path={tiny.write_rows(tmp_path / 'd.jsonl', [{'prompt': 'what is 1 ?'}])}"]
    elif case == "empty_privileged":
        rows = [{"prompt": "what is 1 ?", "privileged_context": "hint"}, {"prompt": "1", "privileged_context": " "}]
        extra = [f"data.path={tiny.write_rows(tmp_path / 'd.jsonl', rows)}"]
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


@pytest.mark.slow
def test_two_processes_match_one(pair, tmp_path):
    """Two gloo processes (torch.distributed.run; `accelerate launch --cpu` starts only one): the first step's loss
    equals one process's, within 1e-5, and the learning-rate schedule is the same."""
    script = os.path.join(os.path.dirname(__file__), "two_process_step.py")
    losses = []
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += [script, pair["student"], pair["teacher"], pair["data"], str(out)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count(f"processes: {processes}") == processes
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
