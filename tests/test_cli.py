"""The `dopd` command line: help that lists every key, defaults in the help that are the settings' own, errors on one
line (every bad input of every command: tests/test_bad_inputs.py)."""

from __future__ import annotations

import codecs
import dataclasses
import os
import re
import subprocess
import sys


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


def _help_entries(*command: str) -> dict[str, str]:
    """{option: its help, on one line} of `dopd COMMAND --help`."""
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "dopd", *command, "--help"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    entries, current = {}, None
    for line in run.stdout.splitlines():
        match = re.match(r"^  (--[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line[match.end() :]
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {option: " ".join(text.split()) for option, text in entries.items()}


def _shown_default_is(shown: str, value) -> bool:
    """Whether the help's `default X` is `value`: numbers by value (1e-4 is 0.0001), lists item by item."""
    if shown.startswith("'"):
        shown = codecs.decode(shown.strip("'"), "unicode_escape")
    expected = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    pairs = list(zip(shown.split(","), expected.split(",")))
    try:
        return len(shown.split(",")) == len(expected.split(",")) and all(float(a) == float(b) for a, b in pairs)
    except ValueError:
        return shown == expected


def test_lab_hints_and_eval_help_list_every_setting_with_its_default():
    """`dopd lab`, `lab pretrain`, `hints` and `eval` have one option per field of their settings (LabConfig,
    PretrainConfig, HintsSpec, EvalSpec with the data and sampling fields of EVAL_OPTIONS) and no other (but
    `--quick` and `--full`), each help showing the field's own default, so the help cannot drift from what the
    command does."""
    from dopd.evaluate import EVAL_OPTIONS, EvalData, EvalSampling, EvalSpec
    from dopd.hints import HintsSpec
    from dopd.lab.config import LabConfig, PretrainConfig

    def settings(cls, skip=()):
        for item in dataclasses.fields(cls):
            if item.name not in skip:
                default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
                yield item.name, default

    nested = {"data": EvalData(), "sampling": EvalSampling()}
    eval_settings = [*settings(EvalSpec, skip=nested)]
    eval_settings += [
        (EVAL_OPTIONS[path], getattr(nested[path.split(".")[0]], path.split(".")[1])) for path in EVAL_OPTIONS
    ]
    checked = 0
    for command, fields, extra in (
        (["lab"], settings(LabConfig), {"--quick", "--full", "--study"}),
        (["lab", "pretrain"], settings(PretrainConfig), set()),
        (["hints"], settings(HintsSpec), set()),
        (["eval"], eval_settings, set()),
    ):
        entries, options = _help_entries(*command), set()
        for name, default in fields:
            option = (
                name if name.startswith("--") else "--" + ("no-" if default is True else "") + name.replace("_", "-")
            )
            options.add(option)
            assert option in entries, f"dopd {' '.join(command)} --help lacks {option}"
            if default in (None, dataclasses.MISSING, "", [], {}) or isinstance(default, bool):
                continue  # no default to show: the help says what leaving it out means
            match = re.search(r"\(default ('[^']*'|[^\s)]+)\)", entries[option])
            assert match and _shown_default_is(match.group(1), default), (
                f"dopd {' '.join(command)} {option}: help {entries[option]!r}, default {default!r}"
            )
            checked += 1
        assert set(entries) == options | extra, set(entries) ^ (options | extra)
    assert checked >= 50
