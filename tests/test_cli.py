"""The `dopd` command line: help that lists every key, defaults in the help that are the settings' own, errors on one
line (every bad input of every command: tests/test_bad_inputs.py)."""

from __future__ import annotations

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
