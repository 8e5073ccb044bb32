"""Checkpoints: a run killed and resumed ends with the same weights as one that never stopped (the privileged self's
copy: tests/test_self_weights.py; LoRA adapters: tests/test_lora.py)."""

from __future__ import annotations

import json
import os

import torch
from tiny import make_config, train_stopped_at, weights

from dopd.train import train


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
