"""Prompt data sets for on-policy distillation: loading, checking, rendering the three prompts, tokenizing
(docs/method.md, "Privileged input"; docs/training.md, "Data").

A row has a prompt (a string or chat messages), a privileged context and optionally an answer. Each row becomes
three token sequences: the deployed student's prompt, the privileged student's and the teacher's (with or without
the privileged context as the method asks). Problems are found before any model loads: missing or empty columns,
prompts over the length limit (with how many and the longest), a data set that cannot be read.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, DataConfig
from .prompts import render_prompt

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# How messages name the settings of the data set: `dopd train`'s config keys. `dopd eval` and `dopd hints` read
# data sets through the same functions and pass the names of their own options.
CONFIG_KEYS = {
    "path": "data.path",
    "split": "data.split",
    "prompt_column": "data.prompt_column",
    "privileged_column": "data.privileged_column",
}


def load_rows(config: DataConfig, keys: Mapping[str, str] = CONFIG_KEYS):
    """The data set as a `datasets.Dataset`: a local file, a `save_to_disk` directory or a hub name (read without
    `datasets`' progress bars). `keys`: the names errors give the settings (`CONFIG_KEYS`)."""
    from .loading import datasets_progress

    with datasets_progress(False):
        return _load_rows(config, keys)


def _load_rows(config: DataConfig, keys: Mapping[str, str]):
    import datasets

    path, path_key = config.path, keys["path"]
    try:
        if os.path.isfile(path):
            extension = os.path.splitext(path)[1].lower()
            if extension not in _FILE_BUILDERS:
                raise ConfigError(
                    f"{path_key} = {path} has extension {extension!r}; use .jsonl, .json, .parquet or .csv"
                )
            dataset = datasets.load_dataset(_FILE_BUILDERS[extension], data_files=path, split="train")
        elif os.path.isdir(path) and (
            os.path.exists(os.path.join(path, "dataset_info.json"))
            or os.path.exists(os.path.join(path, "dataset_dict.json"))
        ):
            dataset = datasets.load_from_disk(path)
            if isinstance(dataset, datasets.DatasetDict):
                if config.split not in dataset:
                    raise ConfigError(
                        f"{keys['split']} = {config.split!r} is not in {path}; it has {', '.join(dataset.keys())}"
                    )
                dataset = dataset[config.split]
        else:
            dataset = datasets.load_dataset(path, config.name, split=config.split)
    except ConfigError:
        raise
    except FileNotFoundError as error:
        raise ConfigError(f"{path_key} = {path} could not be found ({error})") from None
    except Exception as error:  # datasets raises many types for an unreadable or unreachable source
        raise ConfigError(f"{path_key} = {path} could not be read: {type(error).__name__}: {error}") from None
    if config.max_samples is not None:
        dataset = dataset.select(range(min(config.max_samples, len(dataset))))
    return dataset


def check_columns(dataset, config: DataConfig, needs_privileged: bool, keys: Mapping[str, str] = CONFIG_KEYS) -> None:
    """Stop with one message when a needed column is missing, holds empty values or values that cannot be
    rendered. `keys`: the names errors give the settings (`CONFIG_KEYS`)."""
    if len(dataset) == 0:
        raise ConfigError(f"{keys['path']} = {config.path} has no rows")
    needed = [("prompt_column", _prompt_problem)]
    if needs_privileged:
        needed.append(("privileged_column", _text_problem))
    for field_name, check in needed:
        column, key = getattr(config, field_name), keys[field_name]
        values = require_column(dataset, column, key, config.path)
        bad = [(i, problem) for i, value in enumerate(values) if (problem := check(value))]
        if bad:
            raise ConfigError(
                f"{len(bad)} of {len(values)} rows have a {column!r} ({key}) that cannot be rendered, the first at row "
                f"{bad[0][0]}: {bad[0][1]}"
            )


def require_column(dataset, column: str, key: str, source: str, fix: str = "") -> list:
    """The values of `column`, once it is known to exist and to have no empty row; otherwise one line naming `key`,
    the setting that picks the column (`fix`: more help for a missing column)."""
    if column not in dataset.column_names:
        raise ConfigError(
            f"{key} = {column!r} is not a column of {source}; its columns are {', '.join(dataset.column_names)} "
            f"(rename the column or set {key}){fix}"
        )
    values = dataset[column]
    empty = [i for i, value in enumerate(values) if _is_empty(value)]
    if empty:
        raise ConfigError(
            f"{len(empty)} of {len(values)} rows have an empty {column!r} ({key}), the first at row {empty[0]}; "
            "fill or drop them"
        )
    return values


def _text_problem(value: Any) -> str | None:
    return None if isinstance(value, str) else f"a {type(value).__name__}, not a string"


def _prompt_problem(value: Any) -> str | None:
    """What keeps a prompt from being rendered: it must be a string or a list of chat messages with a user turn."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return f"a {type(value).__name__}; give a string or a list of chat messages ({{role, content}})"
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message):
            return f"the message {str(message)[:60]!r} is not a {{role, content}} mapping"
    if not any(message["role"] == "user" for message in value):
        roles = ", ".join(str(m["role"]) for m in value)
        return f"chat messages without a user turn (roles: {roles}); the privileged context goes into the user turn"
    return None


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0
    return False


@dataclass
class PromptSet:
    """Tokenized prompts of the three passes, one entry per row kept."""

    student_ids: list[list[int]]
    self_ids: list[list[int]]
    teacher_ids: list[list[int]]
    prompts: list[Any]
    privileged: list[str | None]
    answers: list[str | None]
    images: Any = None  # multimodal.ImageRows of the rows kept (data.image_column), else None
    rows: Any = None  # the dataset's rows kept (a reward function reads its row), else None
    teachers: list[str] | None = None  # each row's teacher (model.teachers, data.teacher_column), else None

    def __len__(self) -> int:
        return len(self.student_ids)


def build_prompt_set(
    dataset,
    config: DataConfig,
    tokenizer,
    teacher_privileged: bool | None,
    self_privileged: bool,
    processor=None,
    teacher_tokenizer=None,
    row_teachers: tuple[list[str], dict[str, tuple[str, Any]]] | None = None,
) -> PromptSet:
    """Render and tokenize every row; prompts over `max_prompt_length` stop the run (or are dropped). With
    `data.image_column`, `processor` renders each prompt with an image part and expands its placeholder tokens.
    `teacher_tokenizer`: renders and tokenizes the teacher's prompts with its own chat template
    (`data.teacher_chat_template`; the vocabulary is the student's). `row_teachers`: with several teachers, each
    row's teacher name and each teacher's (privileged template, prompt tokenizer or None): a row's teacher prompt
    is rendered as its own teacher's."""
    prompts = list(dataset[config.prompt_column])
    images = None
    if config.image_column:
        from .multimodal import ImageRows, encode_with_image, with_image

        images = ImageRows.from_dataset(dataset, config)
        prompts = [with_image(p) for p in prompts]
    has_privileged = config.privileged_column in dataset.column_names
    privileged = list(dataset[config.privileged_column]) if has_privileged else [None] * len(prompts)
    answers = (
        list(dataset[config.answer_column]) if config.answer_column in dataset.column_names else [None] * len(prompts)
    )

    renderer = processor if images is not None else tokenizer  # a processor renders image parts

    def render(context: list[str | None] | None, template: str, by=renderer) -> list[str]:
        return [
            render_prompt(by, p, None if context is None else c, template, config.use_chat_template)
            for p, c in zip(prompts, context or [None] * len(prompts))
        ]

    teacher_renderer = teacher_tokenizer if teacher_tokenizer is not None and images is None else renderer
    teacher_context = privileged if teacher_privileged else None
    texts = [
        render(None, config.self_template),
        render(privileged if self_privileged else None, config.self_template),
        render(teacher_context, config.teacher_template, teacher_renderer) if row_teachers is None else None,
    ]
    groups = {None: (list(range(len(prompts))), teacher_renderer)}
    if row_teachers is not None:  # each row rendered as its own teacher's prompt, each teacher's rows at once
        names, own = row_teachers
        groups = {name: ([i for i, n in enumerate(names) if n == name], None) for name in own}
        texts[2] = [""] * len(prompts)
        for name, (template, own_tokenizer) in own.items():
            by = own_tokenizer if own_tokenizer is not None and images is None else renderer
            rows = groups[name][0]
            for i in rows:
                ctx = None if teacher_context is None else teacher_context[i]
                texts[2][i] = render_prompt(by, prompts[i], ctx, template, config.use_chat_template)
            groups[name] = (rows, by)
    if images is None:
        student_ids, self_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:2])
        teacher_ids = [None] * len(prompts)
        for rows, by in groups.values():
            encoded = by([texts[2][i] for i in rows], add_special_tokens=False)["input_ids"] if rows else []
            for i, ids in zip(rows, encoded):
                teacher_ids[i] = ids
    else:  # the same image in all three passes: the same number of placeholder tokens
        rows = [
            encode_with_image(processor, list(three), images.checked(i, config.box_column))
            for i, three in enumerate(zip(*texts))
        ]
        student_ids, self_ids, teacher_ids = ([r[k] for r in rows] for k in range(3))
    lengths = [max(len(a), len(b), len(c)) for a, b, c in zip(student_ids, self_ids, teacher_ids)]
    too_long = [i for i, n in enumerate(lengths) if n > config.max_prompt_length]
    if too_long and not config.drop_long_prompts:
        longest = max(lengths)
        raise ConfigError(
            f"{len(too_long)} of {len(lengths)} prompts are longer than data.max_prompt_length = "
            f"{config.max_prompt_length} tokens (privileged prompts included; the longest has {longest}, row "
            f"{lengths.index(longest)}); raise data.max_prompt_length or set data.drop_long_prompts=true"
        )
    keep = [i for i, n in enumerate(lengths) if n <= config.max_prompt_length]
    if not keep:
        raise ConfigError(f"every prompt is longer than data.max_prompt_length = {config.max_prompt_length}")
    return PromptSet(
        student_ids=[student_ids[i] for i in keep],
        self_ids=[self_ids[i] for i in keep],
        teacher_ids=[teacher_ids[i] for i in keep],
        prompts=[prompts[i] for i in keep],
        privileged=[privileged[i] for i in keep],
        answers=[answers[i] for i in keep],
        images=None if images is None else images.subset(keep),
        rows=dataset.select(keep) if hasattr(dataset, "select") else None,
        teachers=None if row_teachers is None else [row_teachers[0][i] for i in keep],
    )


class PromptOrder:
    """Which prompts each step reads: a seeded permutation per epoch and a global position (saved with
    checkpoints, so a resumed run reads what the uninterrupted one would have)."""

    def __init__(self, size: int, seed: int, shuffle: bool, position: int = 0):
        self.size, self.seed, self.shuffle, self.position = size, seed, shuffle, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            epoch, offset = divmod(self.position, self.size)
            order = self._order(epoch)
            step = min(count - len(picked), self.size - offset)
            picked.extend(order[offset : offset + step])
            self.position += step
        return picked


def load_prompt_set(config, objective, tokenizer, processor=None, teacher_tokenizer=None) -> PromptSet:
    """The run's prompts, each tokenized for the passes the objective runs (its privileged prompts only when a
    pass reads the privileged context), after checking the columns they need. `teacher_tokenizer`: see
    `build_prompt_set`."""
    dataset = load_rows(config.data)
    needs_privileged = bool(objective.teacher_privileged) or (objective.needs_self and config.objective.self_privileged)
    check_columns(dataset, config.data, needs_privileged)
    row_teachers = None
    if config.model.teachers:  # several teachers: the column naming each row's, checked before any model loads
        from .config import teacher_views
        from .teachers import check_row_teachers

        column = config.data.teacher_column
        fix = "; it names each row's teacher, one of model.teachers"
        names = require_column(dataset, column, "data.teacher_column", config.data.path, fix)
        check_row_teachers(names, config.model.teachers, column)
        views = teacher_views(config)
        own = {name: (views[name].data.teacher_template, (teacher_tokenizer or {}).get(name)) for name in views}
        row_teachers, teacher_tokenizer = (list(names), own), None
    return build_prompt_set(
        dataset,
        config.data,
        tokenizer,
        objective.teacher_privileged,
        config.objective.self_privileged,
        processor,
        teacher_tokenizer,
        row_teachers,
    )
