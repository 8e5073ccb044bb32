"""The run directory: which directories a run may use (another run, a finished run, an interrupted one with or
without a checkpoint), and its files read back whole lines only."""

from __future__ import annotations

import os

import pytest
import tiny

from dopd.config import ConfigError
from dopd.run_dir import append_jsonl, check_run_dir, differing_keys, read_jsonl, truncate_after
from dopd.train import Trainer, train


def test_an_interrupted_run_with_a_checkpoint_says_how_to_continue(pair, tmp_path):
    common = ["train.steps=3", "checkpoint.save_every=1"]
    tiny.train_stopped_at(tiny.make_config(pair, tmp_path / "run", *common), step=2)
    with pytest.raises(
        ConfigError,
        match=r"holds an interrupted run of this config \(last checkpoint: step_000002\); "
        r"add checkpoint.resume=true to continue it, or logging.overwrite=true",
    ):
        Trainer(tiny.make_config(pair, tmp_path / "run", *common))
    train(tiny.make_config(pair, tmp_path / "run", *common, "checkpoint.resume=true"))  # and that continues it


def test_an_interrupted_run_without_a_checkpoint_simply_starts_again(pair, tmp_path):
    tiny.train_stopped_at(tiny.make_config(pair, tmp_path / "run", "train.steps=3"), step=1)
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml", "metrics.jsonl", "samples.jsonl"]
    result = train(tiny.make_config(pair, tmp_path / "run", "train.steps=3"))
    steps = [line["step"] for line in read_jsonl(os.path.join(result.run_dir, "metrics.jsonl"))]
    assert steps == [1, 2, 3]  # the first attempt's lines are gone


def test_another_or_a_finished_run_is_refused(pair, tmp_path):
    train(tiny.make_config(pair, tmp_path / "run"))
    with pytest.raises(ConfigError, match="already holds a finished run of this config; set logging.overwrite=true"):
        check_run_dir(tiny.make_config(pair, tmp_path / "run"))
    with pytest.raises(ConfigError, match="already holds another run"):
        check_run_dir(tiny.make_config(pair, tmp_path / "run", "optim.lr=0.5"))
    assert differing_keys(str(tmp_path / "run"), tiny.make_config(pair, tmp_path / "run", "optim.lr=0.5")) == [
        "optim.lr"
    ]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        check_run_dir(tiny.make_config(pair, tmp_path / "other"))
    assert check_run_dir(tiny.make_config(pair, tmp_path / "empty")) is False


def test_lines_are_read_whole_and_truncated_by_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(str(path), [{"step": s, "loss": 0.1 * s} for s in (1, 2, 3)])
    with open(path, "a") as handle:
        handle.write('{"step": 4, "lo')  # a line cut by a kill
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2, 3]
    truncate_after(str(tmp_path), 2)
    assert [r["step"] for r in read_jsonl(str(path))] == [1, 2] and path.read_text().endswith("\n")
    assert read_jsonl(str(tmp_path / "absent.jsonl")) == []
