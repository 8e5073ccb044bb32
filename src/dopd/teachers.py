"""Several teachers, each for its own rows (`model.teachers`, `data.teacher_column`; docs/training.md, "Several
teachers"; docs/method.md, "Several teachers").

A run's teachers are views of its config: a teacher's view is the run's config with `model.teacher`,
`model.teacher_server` and the teacher's templates set to its own, so that every check and loader of the single
teacher (sources, fidelity, the served teacher's checks and client, loading, placement) runs unchanged, once per
teacher. One `model.teacher` is the one view of the config itself, named `SINGLE` (None).

A step's micro-batches each hold one teacher's rows (`split_by_teacher`), so a micro-batch is scored by the one
teacher its rows need, its loss reads that teacher's head, and DOPD's thresholds can be taken per teacher
(`objective.threshold_scope`: `batch`, per teacher over the step; `pooled`, every teacher's tokens together).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import SINGLE_TEACHER, Config, ConfigError, teacher_views
from .terms import Cuts, step_cuts

SINGLE = SINGLE_TEACHER  # the name of the one teacher of `model.teacher`


def check_row_teachers(names: list, teachers: dict, column: str) -> None:
    """Every row names a teacher of `model.teachers` (one line naming the first row that does not)."""
    known = ", ".join(map(str, teachers))
    for row, name in enumerate(names):
        if name not in teachers:
            raise ConfigError(
                f"row {row} names the teacher {name!r} in data.teacher_column = {column!r}, which is not in "
                f"model.teachers ({known}); fix the row or add the teacher to model.teachers"
            )


def split_by_teacher(
    names: list | None, prompts: list[int], rollouts, make: Callable[[list[int]], list[list[int]]]
) -> list[tuple[list[int], str | None]]:
    """The micro-batches of a step, each with its teacher: `make(indices)` cuts the rollouts `indices` into
    micro-batches (`scoring.micro_batches`); with several teachers it is called once per teacher, on that teacher's
    rollouts in order, teachers in the order of `model.teachers`. `names`: each data set row's teacher (None: one
    teacher)."""
    if names is None:
        return [(sequences, SINGLE) for sequences in make(list(range(len(rollouts))))]
    by_teacher: dict[str, list[int]] = {}
    for i, prompt in enumerate(rollouts.prompt_index):
        by_teacher.setdefault(names[prompts[prompt]], []).append(i)
    return [(sequences, name) for name, indices in by_teacher.items() for sequences in make(indices)]


def cuts_for(cuts, teacher: str | None):
    """The cuts one micro-batch reads: its teacher's, when `cuts` is by teacher (`Trainer.batch_cuts`)."""
    return cuts[teacher] if isinstance(cuts, dict) else cuts


def step_cuts_by_teacher(objective, batches: list, gather, names: list[str | None]) -> dict[str | None, Cuts]:
    """The step's cuts for each teacher's micro-batches (`terms.step_cuts`): over that teacher's tokens alone
    (`objective.threshold_scope=batch`: a gap distribution belongs to its teacher), or over every teacher's
    tokens pooled (`pooled`; the same with one teacher). Every process computes every teacher's, in the same order,
    so that the gathers match even where a process holds none of a teacher's rows."""
    if len(names) == 1 or objective.config.threshold_scope == "pooled":
        cuts = step_cuts(objective, batches, gather)
        return dict.fromkeys(names, cuts)
    return {name: step_cuts(objective, [b for b in batches if b.teacher == name], gather) for name in names}


def generate_by_teacher(engines: dict, names: list[str], prompts: list[int], ids: list, count: int, images=None):
    """Completions sampled by each row's own teacher (a method whose teacher samples, `sft`): each teacher's engine
    (`engines[name]`) on its rows' prompts, merged into one `types.Rollouts` over `ids` (`prompts[i]`: row of
    `ids[i]`), teachers in the order of `model.teachers`."""
    from .types import Rollouts

    positions: dict[str, list[int]] = {name: [] for name in engines}
    for position, row in enumerate(prompts):
        positions[names[row]].append(position)
    merged = Rollouts([], [], [])
    for name, own in positions.items():
        if not own:
            continue
        part = engines[name].generate(
            [ids[p] for p in own], count, None if images is None else [images[p] for p in own]
        )
        merged.prompt_index += [own[i] for i in part.prompt_index]
        merged.completion_ids += part.completion_ids
        merged.finished += part.finished
    return merged


@dataclass
class Teacher:
    """One teacher of a run: its view of the config, the tokenizer its prompts are rendered with (None: the
    student's), and, once loaded, its frozen module and whole head (ZeRO-3) or its served client."""

    name: str | None
    config: Config
    tokenizer: Any = None
    module: Any = None
    head_weights: Any = None
    served: Any = None


class TeacherSet:
    """The teachers of a run by name, built step by step in `Trainer.__init__` with the single teacher's
    functions."""

    def __init__(self, config: Config):
        self.teachers = {name: Teacher(name, view) for name, view in teacher_views(config).items()}
        self.several = bool(config.model.teachers)

    def __getitem__(self, name: str | None) -> Teacher:
        return self.teachers[name]

    def __iter__(self):
        return iter(self.teachers.values())

    @property
    def names(self) -> list[str | None]:
        return list(self.teachers)

    def check_fidelity(self, check, tokenizer) -> dict[str | None, Any]:
        """Each teacher's vocabulary, special tokens and template against the student's
        (`pair_checks.check_teacher_fidelity`); returns each one's prompt tokenizer (None: the student's)."""
        for teacher in self:
            teacher.tokenizer = check(teacher.config, tokenizer)
        return {teacher.name: teacher.tokenizer for teacher in self}

    def load(self, load: Callable[[str, Config], Any], needed: bool) -> list:
        """Each local teacher's frozen module (`load(path, view)`), a path named by several teachers loaded once;
        served teachers load nothing. Returns the modules loaded."""
        loaded: dict[str, Any] = {}
        for teacher in self:
            if needed and not teacher.config.model.teacher_server.url:
                path = teacher.config.model.teacher
                if path not in loaded:
                    loaded[path] = load(path, teacher.config)
                teacher.module = loaded[path]
        return list(loaded.values())

    def prepare(self, prepare: Callable[[Any], Any], head: Callable[[Any], Any]) -> None:
        """Each loaded module placed for the engine once (`engines.prepare_teacher`) and its whole head kept where
        the engine shards it (`engines.frozen_head`)."""
        placed: dict[int, tuple[Any, Any]] = {}
        for teacher in self:
            if teacher.module is None:
                continue
            key = id(teacher.module)
            if key not in placed:
                module = prepare(teacher.module)
                placed[key] = (module, head(module))
            teacher.module, teacher.head_weights = placed[key]

    def connect(self, connect: Callable[[Config], Any]) -> None:
        """Each served teacher's client (`served_teacher.connect` on its view)."""
        for teacher in self:
            teacher.served = connect(teacher.config)
