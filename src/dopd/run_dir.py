"""The run directory: what `dopd train` writes there and what `dopd report` and the lab read back.

One run writes one directory (`logging.output_dir`): `config.yaml` (the resolved config), `metrics.jsonl` (one
line per step), `samples.jsonl` (completions with every token's routing), `checkpoints/step_N/` and `final/`
(`checkpoint.py`). Before a run starts, `check_run_dir` decides whether the directory may be used: empty, or
`logging.overwrite`, or `checkpoint.resume` of the same run; an interrupted run of the same config is named as
such, with the key that continues it. Readers accept a directory that is being written or was killed mid-line.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

from .config import Config, ConfigError, to_dict

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl")
SKIPPED_DIRS = {"checkpoints", "final", "best", "search"}  # never runs to report (a lab's search runs stay out)
# Keys that may differ between a run and its continuation.
RESUMABLE = {"checkpoint.resume", "logging.overwrite", "logging.progress_bar", "logging.report_to", "train.steps"}


# ------------------------------------------------------------------------------------------------- checks


def differing_keys(run_dir: str, config: Config) -> list[str] | None:
    """The keys whose saved value differs from `config`'s (beyond the resumable ones); None without config.yaml."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        saved = yaml.safe_load(handle) or {}
    return [
        f"{section}.{key}"
        for section, values in to_dict(config).items()
        for key, value in values.items()
        if f"{section}.{key}" not in RESUMABLE and saved.get(section, {}).get(key) != json.loads(json.dumps(value))
    ]


def check_run_dir(config: Config) -> bool:
    """Refuse a directory that holds another run, or a run that should be continued or replaced on purpose, with
    one line naming the key that does it. Returns True when the directory holds an interrupted run of this config
    that never reached a checkpoint: it may simply start again (the caller empties it). Reads only."""
    from . import checkpoint

    run_dir = config.logging.output_dir
    if not (os.path.isdir(run_dir) and os.listdir(run_dir)):
        return False
    if config.checkpoint.resume:
        differing = differing_keys(run_dir, config)
        if differing is None:
            raise ConfigError(
                f"checkpoint.resume is true but {run_dir} holds no config.yaml: it is not a dopd run directory"
            )
        if differing:
            raise ConfigError(
                f"checkpoint.resume: the run in {run_dir} was started with other settings for {', '.join(differing)}; "
                "resume with the same config or start a new output_dir"
            )
        return False
    if config.logging.overwrite:
        return False
    differing = differing_keys(run_dir, config)
    finished = os.path.isdir(os.path.join(run_dir, "final"))
    if differing == [] and not finished:
        last = checkpoint.latest(run_dir)
        if last is None:
            return True
        raise ConfigError(
            f"logging.output_dir = {run_dir} holds an interrupted run of this config (last checkpoint: "
            f"{os.path.basename(last)}); add checkpoint.resume=true to continue it, or logging.overwrite=true to start "
            "again"
        )
    what = "a finished run of this config" if differing == [] else "another run" if differing else "files"
    raise ConfigError(
        f"logging.output_dir = {run_dir} already holds {what}; set logging.overwrite=true to replace it, or choose "
        "another directory"
    )


def init_run_dir(config: Config, restart: bool = False) -> None:
    """Create the run directory (emptied with `logging.overwrite`, or when `restart`ing an interrupted run that
    never reached a checkpoint); main process only, after `check_run_dir`."""
    run_dir = config.logging.output_dir
    if (config.logging.overwrite or restart) and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


# ------------------------------------------------------------------------------------------------ writing


def write_text_atomic(path: str, text: str) -> None:
    """Write to a temporary name beside `path`, then rename over it: a reader, or a run killed meanwhile, sees the
    old file or the new one, never half of one."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json_atomic(path: str, payload: dict) -> None:
    """`payload` as indented JSON, written as `write_text_atomic` does."""
    write_text_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False))


def write_config(run_dir: str, text: str) -> None:
    """`config.yaml`, written whole."""
    write_text_atomic(os.path.join(run_dir, "config.yaml"), text)


def append_jsonl(path: str, records: list[dict]) -> None:
    """Whole lines only: a record is one `json.dumps` line, appended with its newline."""
    if records:
        with open(path, "a") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))


def sample_records(step: int, batch, output, prompts, tokenizer, count: int) -> list[dict]:
    """The first `count` completions of a scored micro-batch (`types.MicroBatch`) with each token's regime, gap,
    q_S, q_T and loss (`terms.ObjectiveOutput`): the lines of `samples.jsonl` that `dopd report` draws."""
    from .routing import REGIMES

    records = []
    for row, prompt in enumerate(batch.prompt_rows[:count]):
        n = int(batch.completions.mask[row].sum())
        ids = batch.completions.ids[row, :n].tolist()
        record = {
            "step": step,
            "prompt": prompts.prompts[prompt],
            "privileged_context": prompts.privileged[prompt],
            "answer": prompts.answers[prompt],
            "completion": tokenizer.decode(ids),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "token_ids": ids,
            "loss": output.token_loss[row, :n].tolist(),
        }
        if batch.teacher is not None:  # model.teachers: the teacher of this row
            record["teacher"] = batch.teacher
        if batch.rewards is not None:
            record["reward"], record["advantage"] = float(batch.rewards[row]), float(batch.advantages[row])
        if output.regime is not None:
            record["regime"] = [REGIMES[r] if r >= 0 else None for r in output.regime[row, :n].tolist()]
        if output.gap is not None:
            record["gap"] = output.gap[row, :n].tolist()
        for name, key in (("self_scores", "q_self"), ("teacher_scores", "q_teacher")):
            scores = getattr(batch, name)
            if scores is not None:
                record[key] = scores.token_logprobs[row, :n].exp().tolist()
        records.append(record)
    return records


def truncate_after(run_dir: str, step: int) -> None:
    """Drop metric and sample lines past `step` (written by an interrupted run after its last checkpoint)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.exists(path):
            continue
        kept = [record for record in read_jsonl(path) if record.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))


# ------------------------------------------------------------------------------------------------ reading


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, up to its last whole line; [] when the file does not exist (yet).

    A line the writer did not finish (no newline, or not parseable) is dropped, not an error."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8", errors="replace")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the writer was stopped inside this line
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_config(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        import yaml

        with open(path) as handle:
            loaded = yaml.safe_load(handle)
        return loaded if isinstance(loaded, dict) else {}
    except Exception:  # a config being written is no reason to fail the report
        return {}


@dataclass
class Run:
    """One run directory as read now."""

    label: str
    path: str
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str | None:
        return (self.config.get("objective") or {}).get("method")

    @property
    def planned_steps(self) -> int | None:
        return (self.config.get("train") or {}).get("steps")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, one value per step (the last logged, as after a resume)."""
        by_step = {}
        for line in self.metrics:
            value = line.get(key)
            if "step" in line and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step[int(line["step"])] = float(value)
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    def value_at(self, key: str, step: int) -> float | None:
        steps, values = self.series(key)
        return values[steps.index(step)] if step in steps else None

    def sample_steps(self) -> list[int]:
        return sorted({int(s["step"]) for s in self.samples if "step" in s})


def load_run(path: str, label: str | None = None) -> Run:
    return Run(
        label=label or os.path.basename(os.path.normpath(path)),
        path=path,
        config=_read_config(os.path.join(path, "config.yaml")),
        metrics=read_jsonl(os.path.join(path, "metrics.jsonl")),
        samples=read_jsonl(os.path.join(path, "samples.jsonl")),
    )


def is_run_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in RUN_FILES)


def find_runs(path: str) -> list[tuple[str, str]]:
    """(label, directory) of the runs under `path`: the directory itself if it is a run, else every run below it
    (a lab output: `<kind>/<method>/seed_<n>`, labelled so), leaving out checkpoints, final models and searches."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a directory: {path}")
    if is_run_dir(path):
        return [(os.path.basename(os.path.normpath(path)), path)]
    found = []
    for root, dirs, _ in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        if root != path and is_run_dir(root):
            found.append((os.path.relpath(root, path).replace(os.sep, "/"), root))
            dirs[:] = []
    if not found:
        raise FileNotFoundError(f"no run directory (config.yaml, metrics.jsonl or samples.jsonl) in or under {path}")
    return found


def load_runs(paths: list[str]) -> list[Run]:
    """Every run of every path; labels that collide get the name of the path they came from in front."""
    entries = [(arg, label, directory) for arg in paths for label, directory in find_runs(arg)]
    labels = [label for _, label, _ in entries]
    runs = []
    for arg, label, directory in entries:
        if labels.count(label) > 1:
            label = f"{os.path.normpath(arg)}/{label}" if directory != arg else os.path.normpath(arg)
        runs.append(load_run(directory, label))
    return runs
