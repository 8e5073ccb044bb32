"""The settings of `dopd hints` and their checks: the forms, their default prefixes, the options, the columns each
form reads, and the source and output paths, each failure one line naming the option."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from ..chat_client import ChatClient, normalize_base_url
from ..config import ConfigError
from .rules import COORDINATE_SYSTEMS, RULE_FORMS

FORMS = RULE_FORMS + ("generated",)
# A label before the hints, so that a model reading "{prompt}\n\n{privileged_context}" can tell them apart
# from the problem. `--prefix ''` leaves the bare text.
DEFAULT_PREFIXES = {
    "answer": "Reference answer: ",
    "solution": "Reference solution:\n",
    "stepwise": "Hints (the plan of a solution; [r1], [r2], ... stand for values you compute):\n",
    "stepwise-executed": "Hints (the steps of a solution):\n",
    "summary": "Outline of a solution: ",
    "generated": "Hints:\n",
    "boxes": "Relevant objects in the image (bounding boxes x1, y1, x2, y2):\n",
}

# ------------------------------------------------------------------------------------------ data set pipeline


@dataclass
class HintsSpec:
    """Every setting of `dopd hints` (one option each: the comments are their help)."""

    input: str  # JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name
    out: str  # output: .jsonl, .parquet, or a directory (save_to_disk)
    form: str  # answer | solution | stepwise | stepwise-executed | summary | boxes | generated
    split: str = "train"  # split of a hub data set or a saved DatasetDict
    name: str | None = None  # hub data set configuration name
    max_rows: int | None = None  # use only the first N rows
    prompt_column: str = "prompt"  # the question or prompt column, as train and eval read it
    solution_column: str = "solution"  # the reference solution column
    answer_column: str = "answer"  # the final answer column
    output_column: str = "privileged_context"  # the column written
    prefix: str | None = None  # text before the hints (default: a short label per form, DEFAULT_PREFIXES; '' for none)
    on_empty: str = "drop"  # drop | keep: rows whose privileged context comes out empty
    overwrite: bool = False  # replace an existing --out
    summary_words: int = 10  # summary: words kept per step
    base_url: str | None = None  # e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)
    model: str | None = None  # served model name (default: $OPENAI_MODEL)
    api_key: str | None = None  # bearer key (default: $OPENAI_API_KEY; vllm serve needs none)
    concurrency: int = 8  # requests in flight
    # The served model's settings take the client's own defaults, so that the two cannot drift apart.
    retries: int = ChatClient.retries  # retries of a failed request
    retry_wait: float = ChatClient.retry_wait  # first backoff in seconds, doubled each retry
    timeout: float = ChatClient.timeout  # seconds per request
    temperature: float = ChatClient.temperature  # sampling temperature
    max_tokens: int = ChatClient.max_tokens  # longest reply in tokens
    max_hints: int = 8  # hints asked for per row
    verify: bool = True  # a second request checks the hints (the answer rule applies either way); --no-verify skips it
    boxes_column: str = "boxes"  # [x1, y1, x2, y2] in pixels, or a list of them
    labels_column: str = "labels"  # a label or a list of labels, one per box
    image_column: str = "image"  # images, for their size
    width_column: str = "width"  # image width in pixels, when there is no image column
    height_column: str = "height"  # image height in pixels
    coords: str = "pixel"  # pixel (Qwen2.5-VL) | norm1000 (Qwen3-VL) | norm1
    progress: bool = True  # a progress bar; --no-progress turns it off


@dataclass
class HintsSummary:
    form: str
    out: str
    rows_read: int
    rows_resumed: int
    rows_written: int
    rows_dropped: list[int]
    hints_kept: int
    rejections: dict[str, int]
    examples_rejected: list[tuple[int, str, str]]
    notes: list[str]
    stats: dict
    replaced_column: bool
    seconds: float


def resolve_server(spec: HintsSpec) -> None:
    """Fill the server settings of the generated form from the environment: `DOPD_HINTS_BASE_URL` or
    `OPENAI_BASE_URL`, `DOPD_HINTS_MODEL` or `OPENAI_MODEL`, `OPENAI_API_KEY`."""
    env = os.environ
    spec.base_url = spec.base_url or env.get("DOPD_HINTS_BASE_URL") or env.get("OPENAI_BASE_URL")
    spec.model = spec.model or env.get("DOPD_HINTS_MODEL") or env.get("OPENAI_MODEL")
    spec.api_key = spec.api_key or env.get("OPENAI_API_KEY")


def check_spec(spec: HintsSpec) -> None:
    """The settings alone (before the data set is read): one message naming the option and the fix."""
    if spec.form not in FORMS:
        raise ConfigError(f"--form {spec.form!r} is unknown; choose one of {', '.join(FORMS)}")
    if spec.on_empty not in ("drop", "keep"):
        raise ConfigError(f"--on-empty {spec.on_empty!r} is unknown; use drop or keep")
    if spec.coords not in COORDINATE_SYSTEMS:
        raise ConfigError(f"--coords {spec.coords!r} is unknown; use {', '.join(COORDINATE_SYSTEMS)}")
    for option, value in (
        ("--summary-words", spec.summary_words),
        ("--concurrency", spec.concurrency),
        ("--max-tokens", spec.max_tokens),
        ("--max-hints", spec.max_hints),
        ("--timeout", spec.timeout),
    ):
        if value <= 0:
            raise ConfigError(f"{option} = {value} must be positive")
    if spec.retries < 0 or spec.retry_wait < 0 or spec.temperature < 0:
        raise ConfigError("--retries, --retry-wait and --temperature must be >= 0")
    if spec.max_rows is not None and spec.max_rows <= 0:
        raise ConfigError(f"--max-rows = {spec.max_rows} must be positive")
    output_kind(spec.out)
    if os.path.exists(spec.out) and not spec.overwrite:
        raise ConfigError(f"--out {spec.out} already exists; choose another path or pass --overwrite")
    if spec.form == "generated":
        if not spec.base_url:
            raise ConfigError(
                "--form generated needs the server: --base-url (or OPENAI_BASE_URL), e.g. "
                "http://localhost:8000/v1 for `vllm serve`"
            )
        if not spec.model:
            raise ConfigError("--form generated needs --model (or OPENAI_MODEL): the served model's name")
        if urllib.parse.urlparse(normalize_base_url(spec.base_url)).scheme not in ("http", "https"):
            raise ConfigError(f"--base-url {spec.base_url} must start with http:// or https://")


def check_local_path(path: str, option: str) -> None:
    """A data source that looks local must exist, and a hub name must be reachable: otherwise `datasets` would take
    a mistyped path for a hub name and spend half a minute retrying the network before failing (loading.py)."""
    from ..loading import check_source

    check_source(path, option, "dataset")


def output_kind(out: str) -> str:
    """jsonl | parquet | disk (a `save_to_disk` directory: a path without an extension)."""
    extension = os.path.splitext(out.rstrip("/"))[1].lower()
    if extension in (".jsonl", ".json"):
        return "jsonl"
    if extension == ".parquet":
        return "parquet"
    if extension == "" or os.path.isdir(out):
        return "disk"
    raise ConfigError(f"--out {out} has extension {extension!r}; use .jsonl, .json, .parquet or a directory path")


def _needed_columns(spec: HintsSpec, columns: list[str], first_row: dict) -> list[tuple[str, str]]:
    """(option, column) pairs that must exist and be non-empty for the form."""
    need = {
        "answer": [("--answer-column", spec.answer_column)],
        "solution": [("--solution-column", spec.solution_column)],
        "stepwise": [("--solution-column", spec.solution_column)],
        "stepwise-executed": [("--solution-column", spec.solution_column)],
        "summary": [("--solution-column", spec.solution_column)],
        "generated": [("--prompt-column", spec.prompt_column), ("--answer-column", spec.answer_column)],
        "boxes": [("--boxes-column", spec.boxes_column)],
    }[spec.form]
    if spec.form == "boxes":
        boxes = first_row.get(spec.boxes_column)
        dicts = isinstance(boxes, dict) or (isinstance(boxes, list) and boxes and isinstance(boxes[0], dict))
        if not dicts:
            need.append(("--labels-column", spec.labels_column))
        if spec.coords != "pixel" and spec.image_column not in columns:
            need += [("--width-column", spec.width_column), ("--height-column", spec.height_column)]
    return need


def check_columns(dataset, spec: HintsSpec) -> None:
    """Every column the form needs exists and no row leaves it empty."""
    from ..data import require_column

    if len(dataset) == 0:
        raise ConfigError(f"--input {spec.input} has no rows")
    for option, column in _needed_columns(spec, dataset.column_names, dataset[0]):
        size_help = (
            " (normalized --coords need the image size: an --image-column, or --width-column and --height-column)"
            if option in ("--width-column", "--height-column")
            else ""
        )
        require_column(dataset, column, option, spec.input, size_help)
