"""Lab models: evaluation, the pretraining cache, and the shipped pair with its measured properties."""

import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3ForCausalLM

from dopd.lab import models, pretraining
from dopd.lab.evaluation import evaluate, render_lab_prompt
from dopd.lab.models import (
    PRETRAINED_DIR,
    LabPairConfig,
    ModelSize,
    WeakPairError,
    build_pair,
    default_pair_config,
    load_or_build_pair,
    pair_config_with,
    shipped_config,
)
from dopd.lab.pretraining import make_model, sft_batch
from dopd.lab.properties import check_properties, choose_student, describe_weakness
from dopd.lab.tasks import PRIVILEGED_KINDS, Example, get_task
from dopd.lab.tokenizer import build_tokenizer

TINY = LabPairConfig(
    teacher=ModelSize(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32),
    student=ModelSize(layers=1, hidden=8, heads=2, kv_heads=1, intermediate=16),
    teacher_steps=3,
    student_steps=2,
    batch_size=4,
    warmup_steps=1,
    student_checkpoints=(),  # a student of its own
)
# The student as an earlier state of the teacher's pretraining: too little training for any property to hold.
TINY_CHECKPOINTS = dataclasses.replace(TINY, teacher_steps=4, student_checkpoints=(1, 3))


class AnswerBook(torch.nn.Module):
    """A stand-in model that answers each rendered prompt from a dict, to check evaluate() end to end."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers, self.seen = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            assert mask == sorted(mask)  # left padding: zeros first
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m])
            self.seen.append(prompt)
            new = self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"]
            new = (new + [self.tokenizer.eos_token_id])[:max_new_tokens]
            new += [self.tokenizer.pad_token_id] * (max_new_tokens - len(new))
            rows.append(ids + new)
        return torch.tensor(rows)


def test_evaluate_on_a_hand_made_case():
    tok = build_tokenizer()
    task = get_task("arith")
    examples = task.examples(4, seed=0)
    replies = [
        examples[0].completion,  # right
        examples[1].completion.replace("A:", "A:9"),  # wrong answer
        "1+1=2;A:" + examples[2].answer,  # right answer after wrong steps
        examples[3].completion,  # right
    ]
    answers = {render_lab_prompt(tok, ex, "hints"): reply for ex, reply in zip(examples, replies)}
    model = AnswerBook(tok, answers)
    result = evaluate(model, tok, task, examples, kind="hints", batch_size=3)
    assert result["n"] == 4
    assert result["answer_accuracy"] == pytest.approx(3 / 4)
    assert result["full_match"] == pytest.approx(2 / 4)
    assert sorted(model.seen) == sorted(answers)  # prompts rendered with the privileged template
    assert all("\nH:" in p and p.endswith("|") for p in model.seen)


def test_evaluate_a_real_untrained_model():
    tok = build_tokenizer()
    model = make_model(TINY.student, tok, seed=0)
    result = evaluate(model, tok, "lookup", get_task("lookup").examples(5, seed=0), max_new_tokens=6)
    assert result["n"] == 5 and result["answer_accuracy"] == 0.0 and result["full_match"] == 0.0
    assert all(len(s["completion"]) <= 6 for s in result["samples"])


def test_sft_batch_puts_the_loss_on_the_completion_only():
    tok = build_tokenizer()
    ex = Example("Q:1+2=", "3", "1+2=3;A:3", {"answer": "3", "hints": "1+2", "solution": "1+2=3;A:3"})
    batch = sft_batch(tok, [ex, ex], ["none", "solution"])
    prompt_len = [len("Q:1+2=|"), len("Q:1+2=\nH:1+2=3;A:3|")]
    for row, plen in enumerate(prompt_len):
        labels = batch["labels"][row]
        assert (labels[:plen] == -100).all()
        target = labels[plen : plen + len(ex.completion) + 1].tolist()
        assert tok.decode(target[:-1]) == ex.completion and target[-1] == tok.eos_token_id
        assert (labels[plen + len(ex.completion) + 1 :] == -100).all()
    assert batch["attention_mask"][0].sum() == prompt_len[0] + len(ex.completion) + 1


def test_config_hash_is_stable_and_sensitive():
    assert LabPairConfig().config_hash() == LabPairConfig().config_hash()
    assert LabPairConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    assert dataclasses.replace(TINY, seed=1).config_hash() != TINY.config_hash()
    assert dataclasses.replace(TINY, kind_mix=(("none", 1.0),)).config_hash() != TINY.config_hash()


def test_cache_builds_once_and_rebuilds_on_a_changed_config(tmp_path, monkeypatch):
    first = load_or_build_pair(TINY, cache_dir=tmp_path, log=None)
    assert first.built and first.path == tmp_path / TINY.config_hash()
    assert isinstance(AutoModelForCausalLM.from_pretrained(first.path / "teacher"), Qwen3ForCausalLM)
    assert first.teacher.num_parameters() > first.student.num_parameters()
    assert first.teacher.config.vocab_size == first.student.config.vocab_size == len(first.tokenizer)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached pair should have been loaded, not trained")

    monkeypatch.setattr(models, "pretrain", no_training)
    monkeypatch.setattr(pretraining, "pretrain", no_training)
    second = load_or_build_pair(TINY, cache_dir=tmp_path, log=None)
    assert not second.built and second.path == first.path and second.config == TINY
    for a, b in zip(first.student.parameters(), second.student.parameters()):
        assert torch.equal(a, b)
    monkeypatch.undo()

    changed = dataclasses.replace(TINY, student_steps=3)
    third = load_or_build_pair(changed, cache_dir=tmp_path, log=None)
    assert third.built and third.path != first.path and third.path.name == changed.config_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, third.path.name])  # no leftovers


def test_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DOPD_CACHE", str(tmp_path))
    pair = load_or_build_pair(TINY, log=None)
    assert pair.path == tmp_path / "lab" / TINY.config_hash()


def table(teacher, student):
    return {
        role: {kind: {"answer_accuracy": v[i], "full_match": v[i]} for i, kind in enumerate(PRIVILEGED_KINDS)}
        for role, v in (("teacher", teacher), ("student", student))
    }


def test_check_properties_can_fail():
    good = check_properties(table([0.6, 0.9, 0.8, 0.95], [0.2, 0.8, 0.5, 0.9]))
    assert good["a_teacher_gap"] and good["b_privilege_helps"]
    small_gap = check_properties(table([0.4, 0.9, 0.8, 0.95], [0.2, 0.8, 0.5, 0.9]))
    assert not small_gap["a_teacher_gap"]
    student_ignores_hints = check_properties(table([0.6, 0.9, 0.8, 0.95], [0.2, 0.8, 0.22, 0.9]))
    assert not student_ignores_hints["b_privilege_helps"]


def test_choose_student_keeps_the_latest_checkpoint_that_meets_the_properties():
    teacher = table([0.8, 0.8, 1.0, 1.0], [0, 0, 0, 0])["teacher"]
    student = {  # none, answer, hints, solution
        300: [0.10, 0.10, 0.15, 0.15],  # gap holds, hints not read
        600: [0.30, 0.30, 0.60, 0.55],  # both hold
        900: [0.50, 0.50, 0.80, 0.75],  # both hold: the latest
        1200: [0.70, 0.70, 0.95, 0.90],  # too close to the teacher
    }
    candidates = {step: table(v, v)["teacher"] for step, v in student.items()}
    chosen, checks = choose_student(teacher, candidates)
    assert chosen == 900 and checks[1200]["a_teacher_gap"] is False and checks[300]["b_privilege_helps"] is False
    del candidates[600], candidates[900]
    chosen, _ = choose_student(teacher, candidates)  # none meets both: the nearest (hints +5 against gap +10 short)
    assert chosen == 300


def test_a_weak_pair_stops_with_the_failed_property(tmp_path):
    pair = load_or_build_pair(TINY_CHECKPOINTS, cache_dir=tmp_path, log=None)  # built, kept, marked weak
    assert pair.built and pair.weak and pair.properties["student_selection"]["chosen_step"] in (1, 3)
    with pytest.raises(WeakPairError) as error:
        load_or_build_pair(TINY_CHECKPOINTS, cache_dir=tmp_path, log=None, allow_weak=False)
    message = str(error.value)
    assert "\n" not in message and "--allow-weak-pair" in message
    assert "(a) teacher - student gap" in message or "(b) privileged input raises" in message
    assert message == describe_weakness(pair.properties, TINY_CHECKPOINTS.task)


def test_pair_settings_from_the_command_line():
    config = pair_config_with(TINY, ["teacher_steps=10", "student_checkpoints=[4, 8]", "teacher={layers: 2}"])
    assert config.teacher_steps == 10 and config.student_checkpoints == (4, 8) and config.teacher.layers == 2
    with pytest.raises(ValueError, match="KEY one of"):
        pair_config_with(TINY, ["teacher_stepz=10"])
    with pytest.raises(ValueError, match="strictly between 0 and teacher_steps"):
        pair_config_with(TINY, ["student_checkpoints=[5]"])


def test_a_student_of_its_own_on_another_convention(tmp_path):
    """`student_task`: the student is pretrained on its own (`student` size, the teacher's recipe, stopped at the
    last checkpoint) on a task of another convention, and chosen among its own checkpoints."""
    config = pair_config_with(TINY_CHECKPOINTS, ["task=add", "student_task=add-swapped"])
    assert config.student_task == "add-swapped" and "student_task" in config.to_dict()
    assert "student_task" not in TINY.to_dict()  # absent when unset: the hashes of earlier pairs stay
    pair = load_or_build_pair(config, cache_dir=tmp_path, log=None)
    history = json.loads((pair.path / "history.json").read_text())
    assert history["student"][-1]["step"] == 3 and history["teacher"][-1]["step"] == 4  # stopped at checkpoint 3
    assert pair.properties["student_selection"]["chosen_step"] in (1, 3)
    assert pair.student.num_parameters() < pair.teacher.num_parameters()  # of `student` size
    assert load_or_build_pair(config, cache_dir=tmp_path, log=None).config.student_task == "add-swapped"
    with pytest.raises(ValueError, match="does not pose task order's problems"):
        pair_config_with(TINY_CHECKPOINTS, ["student_task=add"])


def test_a_student_of_its_own_takes_the_shipped_teacher(tmp_path, monkeypatch):
    """With the shipped pair's teacher config, a pair whose student is of its own loads that teacher instead of
    pretraining it again (byte-identical by construction); only the student is pretrained."""
    shipped_dir = tmp_path / "pretrained"
    shipped = dataclasses.replace(TINY_CHECKPOINTS, task="add")
    build_pair(shipped, shipped_dir / "add", log=None)
    monkeypatch.setattr(models, "PRETRAINED_DIR", shipped_dir)
    trained = []
    real_pretrain = models.pretrain

    def recording(model, tokenizer, task, *args, **kwargs):
        trained.append(task.name)
        return real_pretrain(model, tokenizer, task, *args, **kwargs)

    monkeypatch.setattr(models, "pretrain", recording)
    own = pair_config_with(shipped, ["student_task=add-swapped"])
    assert models.shipped_teacher_path(own) == shipped_dir / "add"
    assert models.shipped_teacher_path(dataclasses.replace(own, seed=1)) is None  # another teacher
    assert models.shipped_teacher_path(shipped) is None  # a checkpoint student needs the teacher's own run
    pair = build_pair(own, tmp_path / "own", log=None)
    assert trained == ["add-swapped"]
    loaded = AutoModelForCausalLM.from_pretrained(shipped_dir / "add" / "teacher")
    for a, b in zip(pair.teacher.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert json.loads((pair.path / models.COMPLETE_MARKER).read_text())["timings"]["teacher_from"] == (
        "the shipped add pair"
    )


def test_pretrain_command_builds_a_pair_that_records_the_command(tmp_path):
    """`dopd lab pretrain` through its alias scripts/pretrain_lab.py: the pair it writes says how it was made."""
    out = tmp_path / "pair"
    settings = ["teacher={layers: 1, hidden: 16, heads: 2, kv_heads: 1, intermediate: 32}", "teacher_steps=4",
                "student_checkpoints=[2]", "batch_size=4", "warmup_steps=1"]  # fmt: skip
    arguments = ["--out", str(out), *[f"--pair={item}" for item in settings], "--n-eval", "20", "--threads", "1"]
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "pretrain_lab.py")
    run = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout
    meta = json.loads((out / models.COMPLETE_MARKER).read_text())
    assert meta["command"] == "dopd lab pretrain " + shlex.join(arguments)
    assert meta["config"]["teacher_steps"] == 4 and meta["config"]["student_checkpoints"] == [2]


DEFAULT_TASK = LabPairConfig().task
SHIPPED = shipped_config(DEFAULT_TASK)


def shipped_accuracy(pair):
    return {
        r: {k: v["answer_accuracy"] for k, v in pair.properties["accuracy"][r].items()} for r in ("teacher", "student")
    }


@pytest.mark.skipif(SHIPPED is None, reason="no shipped pair for the default task")
def test_shipped_pair_loads_and_has_the_properties():
    assert SHIPPED == LabPairConfig()  # the default config is the shipped one: no user retrains
    pair = load_or_build_pair(LabPairConfig(), cache_dir="/nonexistent", log=None)
    assert not pair.built and pair.path == PRETRAINED_DIR / DEFAULT_TASK
    assert isinstance(pair.teacher, Qwen3ForCausalLM) and isinstance(pair.student, Qwen3ForCausalLM)
    chosen = pair.properties["student_selection"]["chosen_step"]
    assert chosen in LabPairConfig().student_checkpoints  # an earlier state of the teacher's pretraining
    assert pair.teacher.num_parameters() == pair.student.num_parameters()
    for role in ("teacher", "student"):
        assert (pair.path / role / "model.safetensors").stat().st_size < 1_000_000
        assert AutoTokenizer.from_pretrained(pair.path / role).chat_template == pair.tokenizer.chat_template
    assert pair.properties["n_eval"] >= 300
    acc = shipped_accuracy(pair)
    assert acc["teacher"]["none"] - acc["student"]["none"] >= 0.25  # (a)
    assert pair.properties["checks"]["a_teacher_gap"]
    for role in ("teacher", "student"):  # (b): both read the step-wise hints and the worked solution
        for kind in ("hints", "solution"):
            assert acc[role][kind] - acc[role]["none"] >= 0.10, (role, kind)


@pytest.mark.skipif(SHIPPED is None, reason="no shipped pair for the default task")
def test_shipped_pair_meets_the_privilege_bar():
    pair = load_or_build_pair(LabPairConfig(), log=None)
    assert pair.properties["checks"]["a_teacher_gap"] and pair.properties["checks"]["b_privilege_helps"]


@pytest.mark.parametrize("task", ["arith", "order", "add"])
def test_every_shipped_pair_loads_from_its_own_config(task):
    config = shipped_config(task)
    assert config is not None and config.task == task
    assert default_pair_config(task) == config  # what `dopd lab --task X` and the rebuild command start from
    pair = load_or_build_pair(config, cache_dir="/nonexistent", log=None)
    assert not pair.built and pair.path == PRETRAINED_DIR / task


@pytest.mark.skipif(SHIPPED is None, reason="no shipped pair for the default task")
def test_shipped_pair_reproduces_its_stored_accuracy():
    pair = load_or_build_pair(LabPairConfig(), log=None)
    task = get_task(DEFAULT_TASK)
    examples = task.examples(pair.properties["n_eval"], pair.properties["eval_seed"], pair.properties["eval_split"])
    stored = shipped_accuracy(pair)
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        for kind in ("none", "hints"):
            result = evaluate(model, pair.tokenizer, task, examples, kind=kind, batch_size=150)
            assert abs(result["answer_accuracy"] - stored[role][kind]) <= 0.01, (role, kind)
