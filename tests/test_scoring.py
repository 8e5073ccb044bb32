"""The scoring passes: a frozen pass in eval mode (every module restored after), the privileged passes reading
the privileged context at the right positions."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from tiny import make_config

from dopd.config import DataConfig
from dopd.data import build_prompt_set, load_rows
from dopd.routing import assign_regimes
from dopd.train import Trainer


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


def test_privileged_passes_read_the_context(pair, tmp_path):
    config = make_config(pair, tmp_path / "run", "rollout.temperature=0")
    trainer = Trainer(config)
    tok = trainer.tokenizer
    assert "hint" in tok.decode(trainer.prompts.teacher_ids[0]) and "hint" in tok.decode(trainer.prompts.self_ids[0])
    assert "hint" not in tok.decode(trainer.prompts.student_ids[0])
    prompts, rollouts = tiny.first_rollouts(trainer)

    def regimes():
        batch = trainer.score(prompts, rollouts)[0]
        mask = batch.completions.mask
        return assign_regimes(
            batch.self_scores.token_logprobs,
            batch.teacher_scores.token_logprobs,
            mask,
            trainer.batch_cuts([batch]).routing,
        ), batch.teacher_scores.token_logprobs

    first, teacher_first = regimes()
    rows = [json.loads(line) for line in open(pair["data"])]
    for row in rows:
        row["privileged_context"] = "hint : add 19 then 19 then 19 ."
    other = DataConfig(path=tiny.write_rows(tmp_path / "other.jsonl", rows))
    trainer.prompts = build_prompt_set(load_rows(other), other, tok, True, True)
    second, teacher_second = regimes()
    assert not torch.allclose(teacher_first, teacher_second)
    assert not torch.equal(first, second)
