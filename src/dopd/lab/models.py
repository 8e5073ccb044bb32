"""The lab's teacher/student pair: tiny Qwen3 models pretrained here by SFT, cached, and their properties measured.

The pair must show what DOPD needs (docs/method.md, "Setting"): a teacher clearly better than the student without
privileged input, privileged input that both models read (otherwise the privileged-student pass equals the plain
one), and a student with headroom. Tiny models read privileged input only when reading it pays off during
pretraining (lab notes), so the SFT data mixes the privileged kinds on problems (nested expressions) that the
models cannot solve dependably without them. Student and teacher share tokenizer and data.

The student is an earlier state of the teacher's own pretraining (`LabPairConfig.student_checkpoints`): the latest
checkpoint that still leaves the required gap and reads the privileged input. Such a student has the teacher's
capacity and is on the path the teacher took, so a distillation budget of minutes can close a measurable part of
the gap (a smaller student pretrained to convergence moved by a few points at most: docs/lab_design.md). A pair
with a student of its own (`student_checkpoints=()`, `student` size and `student_steps`) is still supported.

`load_or_build_pair(config)` returns the pair shipped in `dopd/lab/pretrained/<task>` when `config` is the shipped
one, else a cached build (`$DOPD_CACHE` or `~/.cache/dopd/lab`, one directory per config hash), else trains it and
writes it atomically. `dopd lab pretrain` (or `scripts/pretrain_lab.py`) rebuilds and measures a pair.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dopd.lab.config import PretrainConfig
from dopd.lab.pretraining import EVAL_SEED, ModelSize, Recipe, make_model, pretrain
from dopd.lab.properties import (
    choose_student,
    describe_weakness,
    measure_accuracy,
    measure_properties,
    properties_hold,
    properties_record,
)
from dopd.lab.tasks import SPLIT_RULE, Task, check_same_problems, get_task
from dopd.lab.tokenizer import build_tokenizer
from dopd.loading import quiet_transformers

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
COMPLETE_MARKER = "lab_pair.json"


# The fields that decide a pair's student only; the teacher's pretraining depends on the others.
STUDENT_FIELDS = ("student", "student_steps", "student_checkpoints", "student_task")


@dataclass(frozen=True)
class LabPairConfig:
    """Everything that decides the pretrained pair; its hash names the cache directory.

    The student is either an earlier state of the teacher's own pretraining (`student_checkpoints`: the steps
    whose weights are candidates; the build keeps the latest one that meets the properties), or, when that is
    empty, a model of its own (`student` size, `student_steps`)."""

    task: str = "order"
    teacher: ModelSize = ModelSize(layers=3, hidden=64, intermediate=192)
    student: ModelSize = ModelSize(layers=2, hidden=48, intermediate=128)
    teacher_steps: int = 2400
    student_steps: int = 2400
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Fractions of pretraining examples shown with each privileged kind.
    kind_mix: tuple[tuple[str, float], ...] = (("none", 0.4), ("answer", 0.1), ("hints", 0.3), ("solution", 0.2))
    seed: int = 0
    student_checkpoints: tuple[int, ...] = (600, 900, 1200, 1500, 1800)
    # With a task here the student is a model of `student` size pretrained on it on its own (never a state of the
    # teacher): with `student_checkpoints`, on the teacher's recipe and chosen among its own checkpoints by the same
    # rule; without, for `student_steps`. A task with `task`'s prompts and privileged inputs whose worked solutions
    # follow another convention (`add-swapped` for `add`) makes a teacher-student mismatch pair, where part of the
    # teacher's edge is habit, not skill; `task` itself makes its control, and a smaller `student` a capacity pair.
    student_task: str | None = None

    def __post_init__(self):
        bad = [step for step in self.student_checkpoints if not 0 < step < self.teacher_steps]
        if bad:
            raise ValueError(
                f"student_checkpoints {bad} must lie strictly between 0 and teacher_steps ({self.teacher_steps})"
            )
        if self.student_task is not None:
            check_same_problems(self.task, self.student_task)

    def recipe(self, role: str) -> Recipe:
        steps = self.teacher_steps if role == "teacher" else self.student_steps
        return Recipe(steps, self.batch_size, self.lr, self.warmup_steps, self.weight_decay, self.kind_mix)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind_mix"] = [list(item) for item in self.kind_mix]
        d["student_checkpoints"] = list(self.student_checkpoints)
        if d["student_task"] is None:
            del d["student_task"]  # so that the pairs built before the field keep their hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabPairConfig:
        d = dict(d)
        d["teacher"] = ModelSize(**d["teacher"])
        d["student"] = ModelSize(**d["student"])
        d["kind_mix"] = tuple((str(k), float(w)) for k, w in d["kind_mix"])
        d["student_checkpoints"] = tuple(int(step) for step in d.get("student_checkpoints", ()))
        return cls(**d)

    def config_hash(self, leave_out: tuple[str, ...] = ()) -> str:
        """Stable across processes and Python versions: sha256 of the sorted JSON of the fields (less `leave_out`)
        and of the task's parameters (so that changing a task's defaults also rebuilds)."""
        task_params = {k: v for k, v in vars(get_task(self.task)).items() if not k.startswith("_")}
        fields = {**self.to_dict(), "task_params": task_params, "prompt_split": SPLIT_RULE}
        text = json.dumps(
            {k: v for k, v in fields.items() if k not in leave_out}, sort_keys=True, separators=(",", ":"), default=repr
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class LabPair:
    teacher: Any
    student: Any
    tokenizer: Any
    path: Path
    properties: dict[str, Any] = field(default_factory=dict)
    config: LabPairConfig | None = None
    built: bool = False  # True when this call trained the pair, False when it was loaded

    @property
    def weak(self) -> bool:
        """True when the pair was kept although it fails a property (built with allow_weak)."""
        checks = self.properties.get("checks", {})
        return bool(checks) and not properties_hold(checks)


class WeakPairError(ValueError):
    """A pair that fails a required property; the message names the property, the figures and the way on."""


def default_cache_root() -> Path:
    return Path(os.environ.get("DOPD_CACHE") or Path.home() / ".cache" / "dopd").expanduser() / "lab"


def shipped_config(task: str) -> LabPairConfig | None:
    """The config of the pair shipped for `task`, or None when none is shipped."""
    marker = PRETRAINED_DIR / task / COMPLETE_MARKER
    if not marker.exists():
        return None
    return LabPairConfig.from_dict(json.loads(marker.read_text())["config"])


def default_pair_config(task: str) -> LabPairConfig:
    """The pair a run of `task` uses unless told otherwise: the shipped one when a pair ships for the task (so
    `--task arith` loads its own 1,500-step pair), else `LabPairConfig(task=task)` (built and cached)."""
    return shipped_config(task) or LabPairConfig(task=task)


def load_pair(path: str | Path) -> LabPair:
    """A pair saved by `build_pair` (teacher/, student/, tokenizer/ and lab_pair.json)."""
    path = Path(path)
    meta = json.loads((path / COMPLETE_MARKER).read_text())
    with quiet_transformers():
        teacher = AutoModelForCausalLM.from_pretrained(path / "teacher").eval()
        student = AutoModelForCausalLM.from_pretrained(path / "student").eval()
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    return LabPair(
        teacher=teacher,
        student=student,
        tokenizer=tokenizer,
        path=path,
        properties=meta.get("properties", {}),
        config=LabPairConfig.from_dict(meta["config"]),
        built=False,
    )


def shipped_teacher_path(config: LabPairConfig) -> Path | None:
    """The shipped pair whose teacher `config` would pretrain again, or None. Only a pair with a student of its own
    (`student_task`) can take it: its teacher's pretraining depends on the teacher's fields alone, while a student
    chosen among the teacher's checkpoints needs the teacher's run itself."""
    shipped = shipped_config(config.task)
    if shipped is None or config.student_task is None:
        return None
    same_teacher = config.config_hash(STUDENT_FIELDS) == shipped.config_hash(STUDENT_FIELDS)
    return PRETRAINED_DIR / config.task if same_teacher else None


def student_origin(config: LabPairConfig, chosen_step: int | None) -> str:
    """Where a pair's student comes from, in words (the build's log and the lab's printout)."""
    if chosen_step is not None:
        if config.student_task:
            return f"the state of its own pretraining on {config.student_task} after {chosen_step} steps"
        return f"the teacher's pretraining state after {chosen_step} steps"
    return f"a model of its own{f' pretrained on {config.student_task}' if config.student_task else ''}"


def _pretrain_teacher_and_student(config: LabPairConfig, task: Task, tokenizer, n_eval: int, log) -> dict:
    """The pretrained models, their histories and timings, and (with checkpoints) the candidates' measurements."""
    timings, histories, kept = {}, {}, {}
    student_task = get_task(config.student_task) if config.student_task else task
    shipped = shipped_teacher_path(config)
    start = time.time()
    if shipped is not None:  # the same teacher, pretrained by the same recipe: load it instead
        with quiet_transformers():
            teacher = AutoModelForCausalLM.from_pretrained(shipped / "teacher").eval()
        histories["teacher"] = json.loads((shipped / "history.json").read_text())["teacher"]
        timings["teacher_from"] = f"the shipped {config.task} pair"
        if log:
            log(f"teacher: the shipped {config.task} pair's (the same config and recipe), {shipped}")
    else:
        teacher = make_model(config.teacher, tokenizer, config.seed)
        if log:
            log(
                f"pretraining teacher {config.teacher} ({teacher.num_parameters():,} parameters) for "
                f"{config.teacher_steps} steps"
            )
        keep_at = () if config.student_task else config.student_checkpoints
        histories["teacher"], kept = pretrain(
            teacher, tokenizer, task, config.recipe("teacher"), config.seed + 1000, log, keep_at
        )
    timings["teacher_seconds"] = round(time.time() - start, 1)
    selection = None
    if config.student_checkpoints and config.student_task:  # a student of its own, on the teacher's recipe
        own = make_model(config.student, tokenizer, config.seed + 1)
        if log:
            log(
                f"pretraining a student {config.student} ({own.num_parameters():,} parameters) of its own on "
                f"{config.student_task}, on the teacher's recipe"
            )
        start = time.time()
        histories["student"], kept = pretrain(
            own,
            tokenizer,
            student_task,
            config.recipe("teacher"),
            config.seed + 2000,
            log,
            config.student_checkpoints,
            stop_after=max(config.student_checkpoints),
        )
        timings["student_seconds"] = round(time.time() - start, 1)
    if config.student_checkpoints:
        start = time.time()
        examples = task.examples(n_eval, EVAL_SEED, split="validation")
        teacher_accuracy = measure_accuracy(teacher, tokenizer, task, examples)
        size = config.student if config.student_task else config.teacher
        candidate, measured = make_model(size, tokenizer, config.seed), {}
        for step, state in kept.items():
            candidate.load_state_dict(state)
            measured[step] = measure_accuracy(candidate.eval(), tokenizer, task, examples)
        chosen, checks = choose_student(teacher_accuracy, measured)
        candidate.load_state_dict(kept[chosen])
        student = candidate.eval()
        timings["selection_seconds"] = round(time.time() - start, 1)
        selection = {
            "chosen_step": chosen,
            "candidates": {str(step): checks[step] for step in measured},
            "accuracy": {"teacher": teacher_accuracy, "student": measured[chosen]},
        }
        if log:
            log(f"student: {student_origin(config, chosen)} (candidates {list(kept)})")
    else:
        student = make_model(config.student, tokenizer, config.seed + 1)
        if log:
            log(
                f"pretraining student {config.student} ({student.num_parameters():,} parameters) for "
                f"{config.student_steps} steps" + (f" on {config.student_task}" if config.student_task else "")
            )
        start = time.time()
        histories["student"], _ = pretrain(
            student, tokenizer, student_task, config.recipe("student"), config.seed + 2000, log
        )
        timings["student_seconds"] = round(time.time() - start, 1)
    return {"teacher": teacher, "student": student, "histories": histories, "timings": timings, "selection": selection}


def build_pair(
    config: LabPairConfig, out_dir: str | Path, n_eval: int = 0, log: Any = print, command: str | None = None
) -> LabPair:
    """Pretrain the pair and save it to `out_dir`; with n_eval > 0 also measure the properties (a student chosen
    among the teacher's checkpoints is always measured, on at least 300 prompts).

    Writes into a temporary sibling directory and renames it at the end, so a directory holding the marker
    file is always complete. A pair that fails a property is written too (so that `--allow-weak-pair` need not
    train it again); `load_or_build_pair` decides whether it may be used.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    task = get_task(config.task)
    tokenizer = build_tokenizer()
    if config.student_checkpoints:
        n_eval = max(n_eval, 300)
    built = _pretrain_teacher_and_student(config, task, tokenizer, n_eval, log)
    timings = built["timings"]
    pair = LabPair(built["teacher"], built["student"], tokenizer, out_dir, config=config, built=True)
    selection = built["selection"]
    if selection:  # the choice measured teacher and student on the held-out prompts already
        pair.properties = properties_record(task.name, n_eval, EVAL_SEED, selection.pop("accuracy"))
        pair.properties["student_selection"] = selection
    elif n_eval:
        start = time.time()
        pair.properties = measure_properties(pair, task, n_eval)
        timings["measure_seconds"] = round(time.time() - start, 1)
    if pair.properties and log:
        log(json.dumps(pair.properties["checks"], indent=1))
    meta = {
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "properties": pair.properties,
        "timings": timings,
        "torch_threads": torch.get_num_threads(),
        "losses": {role: h[-1]["loss"] for role, h in built["histories"].items() if h},
        "command": command,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for role in ("teacher", "student"):
            with quiet_transformers():  # no "Writing model shards" bars
                getattr(pair, role).save_pretrained(tmp / role)
            tokenizer.save_pretrained(tmp / role)  # so AutoTokenizer works on a model path too
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "history.json").write_text(json.dumps(built["histories"]))
        (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pair


def load_or_build_pair(
    config: LabPairConfig | None = None,
    cache_dir: str | Path | None = None,
    n_eval: int = 0,
    log: Any = print,
    allow_weak: bool = True,
) -> LabPair:
    """The shipped pair if `config` is the shipped one, else the cached build, else a new build (then cached).
    With `allow_weak=False` a pair that fails a required property raises `WeakPairError` (one line)."""
    config = config or LabPairConfig()
    shipped = shipped_config(config.task)
    if shipped is not None and shipped.config_hash() == config.config_hash():
        pair = load_pair(PRETRAINED_DIR / config.task)
    else:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        path = root / config.config_hash()
        if (path / COMPLETE_MARKER).exists():
            pair = load_pair(path)
        else:
            if log:
                log(f"no pretrained lab pair for this config: building it into {path}")
            pair = build_pair(config, path, n_eval=n_eval, log=log)
    if not allow_weak and pair.weak:
        raise WeakPairError(describe_weakness(pair.properties, config.task))
    return pair


def pair_config_with(base: LabPairConfig, settings: list[str]) -> LabPairConfig:
    """`base` with `KEY=VALUE` settings (values in YAML: `teacher_steps=2000`, `student_checkpoints=[900,1200]`,
    `teacher={layers: 2, hidden: 64}`); an unknown key or a value of the wrong shape raises one clear ValueError."""
    import yaml

    values = {**{f.name: None for f in fields(LabPairConfig)}, **base.to_dict()}  # the fields to_dict leaves out
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or key not in values:
            known = ", ".join(values)
            raise ValueError(f"--pair {item!r}: expected KEY=VALUE with KEY one of {known}")
        value = yaml.safe_load(text)
        values[key] = {**values[key], **value} if isinstance(values[key], dict) and isinstance(value, dict) else value
    try:
        return LabPairConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--pair {' '.join(settings)}: {error}") from None


def pretrain_target(config: PretrainConfig) -> tuple[LabPairConfig, Path]:
    """The pair `dopd lab pretrain` builds (the task's defaults, or its shipped config, with the `--pair` changes)
    and where it goes; a bad setting raises one clear ValueError before any work."""
    get_task(config.task)
    if config.threads < 1:
        raise ValueError(f"--threads = {config.threads} must be at least 1")
    if config.n_eval < 0:
        raise ValueError(f"--n-eval = {config.n_eval} must be at least 0")
    base = default_pair_config(config.task) if config.like_shipped else LabPairConfig(task=config.task)
    pair_config = pair_config_with(base, config.pair)
    return pair_config, Path(config.out) if config.out else default_cache_root() / pair_config.config_hash()
