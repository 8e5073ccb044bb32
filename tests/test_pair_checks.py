"""Teacher fidelity: the same vocabulary, special tokens and chat template as the student, or, with
`data.teacher_chat_template`, the teacher's prompts rendered in its own template with scores that align."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import tiny
import torch

from dopd.config import ConfigError
from dopd.pair_checks import first_difference, render_probe
from dopd.train import Trainer

OTHER_TEMPLATE = (
    "{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}"
)


@pytest.fixture(scope="module")
def other_template_teacher(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    shutil.copytree(pair["teacher"], path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = OTHER_TEMPLATE
    config_path.write_text(json.dumps(config))
    if (path / "chat_template.jinja").exists():
        os.remove(path / "chat_template.jinja")
    return str(path)


def test_first_difference_shows_where_two_texts_part():
    assert first_difference("user: hi assistant:", "[user] hi assistant:").startswith("character 0: ")
    assert "character 7:" in first_difference("user: hi", "user: ho")  # the first differing index


def test_probe_is_rendered_by_the_template():
    tokenizer = tiny.build_tokenizer()
    assert render_probe(tokenizer).startswith("user: You are a careful assistant.")
    assert render_probe(tiny.build_tokenizer(chat_template=False)) is None


def test_another_chat_template_stops_the_run_before_weights_load(pair, other_template_teacher, tmp_path, monkeypatch):
    import dopd.train as train_module

    monkeypatch.setattr(train_module, "load_student", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(
        ConfigError,
        match=r"chat template renders a conversation differently .*character 0: student "
        r"'user: .*teacher '\[system\]",
    ):
        Trainer(tiny.make_config(pair, tmp_path / "run", f"model.teacher={other_template_teacher}"))


def test_other_special_tokens_stop_the_run(pair, tmp_path):
    path = tmp_path / "teacher"
    shutil.copytree(pair["teacher"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = "answer"  # a word of the same vocabulary as end-of-sequence
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="other special tokens than the student: eos_token"):
        Trainer(tiny.make_config(pair, tmp_path / "run", f"model.teacher={path}"))


def test_teacher_chat_template_renders_its_prompts_and_the_scores_align(pair, other_template_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = Trainer(
        tiny.make_config(
            pair,
            tmp_path / "run",
            f"model.teacher={other_template_teacher}",
            "data.teacher_chat_template=true",
            "objective.method=opd-priv",
        )
    )
    teacher_tokenizer = AutoTokenizer.from_pretrained(other_template_teacher)
    row = 0
    prompt = trainer.prompts.prompts[row] + "\n\n" + trainer.prompts.privileged[row]
    expected = teacher_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert trainer.prompts.teacher_ids[row] == teacher_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert trainer.prompts.student_ids[row] != trainer.prompts.teacher_ids[row][: len(trainer.prompts.student_ids[row])]
    rollouts = trainer.engine.generate([trainer.prompts.student_ids[row]], 2)
    scored = trainer.score([row], rollouts)[0].teacher_scores.token_logprobs
    teacher = AutoModelForCausalLM.from_pretrained(other_template_teacher).eval()
    for index, completion in enumerate(rollouts.completion_ids):  # the teacher's own template + the shared tokens
        ids = torch.tensor([trainer.prompts.teacher_ids[row] + completion])
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(ids).logits[0, len(trainer.prompts.teacher_ids[row]) - 1 : -1], -1)
        reference = logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        torch.testing.assert_close(scored[index, : len(completion)], reference, rtol=1e-5, atol=1e-6)
