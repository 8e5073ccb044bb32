"""Loading by path or hub name: a mistyped local path fails at once naming the key, a hub name is probed once
(HF_HUB_OFFLINE honoured, no request), a model directory without tokenizer files reads the other model's, and
models load quietly with one log line each."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import tiny

from dopd.config import ConfigError
from dopd.loading import check_source, load_pretrained, looks_local
from dopd.train import Trainer


@pytest.mark.parametrize(
    "name", ["./student", "../x", "/abs/path", "~/model", "a/b/c", "data.jsonl", "C:\\x", "with space/name"]
)
def test_names_that_can_only_be_local(name):
    assert looks_local(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen3-8B", "gpt2", "org/name.v2"])
def test_hub_names(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local(name)


def test_a_hub_name_whose_first_part_exists_here_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("models/student")


def test_missing_local_path_names_the_key_and_never_asks_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(ConfigError, match=r"model.teacher = /no/such/teacher does not exist .*fix the path"):
        check_source("/no/such/teacher", "model.teacher")
    check_source(str(tmp_path), "model.student")  # an existing path is fine


def test_offline_mode_makes_no_request(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 forbids the hub while the local cache does not hold it"):
        check_source("someone/not-cached-model", "model.student")


def test_unknown_and_unreachable_hub_names(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def not_found(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # the hub's 404, without a real response
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", not_found)
    with pytest.raises(ConfigError, match="neither a local path nor a dataset on the hub"):
        check_source("someone/typo", "data.path", "dataset")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    with pytest.raises(ConfigError, match="the hub cannot be reached \\(ConnectionError\\)"):
        check_source("someone/model", "model.teacher")


def test_a_model_loads_with_one_log_line_and_no_progress_bars(pair, caplog, capsys):
    import torch

    with caplog.at_level(logging.INFO, logger="dopd"):
        load_pretrained(pair["student"], "model.student", torch.float32)
    lines = [r.getMessage() for r in caplog.records if r.name == "dopd"]
    assert len(lines) == 1 and lines[0].startswith("loaded model.student: ") and "parameters" in lines[0]
    assert "Loading weights" not in capsys.readouterr().err


def test_a_teacher_without_tokenizer_files_reads_the_students(pair, tmp_path, caplog):
    bare = tmp_path / "bare-teacher"
    shutil.copytree(pair["teacher"], bare)
    for name in os.listdir(bare):
        if "token" in name or name.endswith(".jinja") or name == "special_tokens_map.json":
            os.remove(bare / name)
    with caplog.at_level(logging.WARNING, logger="dopd"):
        trainer = Trainer(tiny.make_config(pair, tmp_path / "run", f"model.teacher={bare}"))
    assert any("has no tokenizer files: it reads the student's tokenizer" in r.getMessage() for r in caplog.records)
    assert trainer.vocab_size == len(trainer.tokenizer)


def test_a_student_without_tokenizer_files_reads_the_teachers(pair, tmp_path, caplog):
    bare = tmp_path / "bare-student"
    shutil.copytree(pair["student"], bare)
    for name in os.listdir(bare):
        if "token" in name or name.endswith(".jinja"):
            os.remove(bare / name)
    with caplog.at_level(logging.WARNING, logger="dopd"):
        trainer = Trainer(tiny.make_config(pair, tmp_path / "run", f"model.student={bare}"))
    assert any("both models read the teacher's tokenizer" in r.getMessage() for r in caplog.records)
    assert len(trainer.tokenizer) == len(tiny.build_tokenizer())
