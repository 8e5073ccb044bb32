"""The data set side of `dopd hints`: reading the input, building every row's privileged context (by rule, or by
the served model with a `.partial` file to resume from), writing the output and the printed summary. The settings
and their checks are in `spec.py`, the `.partial` file in `partial.py`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from ..chat_client import ChatClient, ServerError
from ..config import ConfigError, DataConfig
from ..loading import datasets_progress
from .client import HintResult, check_reachable, generate_hints
from .partial import PartialLog, run_settings
from .rules import (
    answer_hint,
    box_hint,
    executed_hints,
    image_size,
    solution_hint,
    stepwise_hints,
    summary_hints,
)
from .spec import (
    DEFAULT_PREFIXES,
    HintsSpec,
    HintsSummary,
    check_columns,
    check_local_path,
    check_spec,
    output_kind,
    resolve_server,
)


def _text(value: Any) -> str:
    """A question as text: a string, or the last user turn of chat messages."""
    if isinstance(value, list) and value and all(isinstance(message, dict) for message in value):
        content = ([m for m in value if m.get("role") == "user"] or value)[-1].get("content", "")
        if isinstance(content, list):
            return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return "" if value is None else str(value)


def row_builder(spec: HintsSpec, columns: list[str], client: ChatClient | None = None) -> Callable[[dict], HintResult]:
    """The function from a row to its `HintResult` for `spec.form`."""

    def get(row: dict, column: str) -> str:
        return _text(row.get(column)) if column in columns else ""

    def one(text: str) -> HintResult:
        return HintResult(text, int(bool(text.strip())))

    form = spec.form
    if form == "answer":
        return lambda row: one(answer_hint(get(row, spec.answer_column)))
    if form == "solution":
        return lambda row: one(solution_hint(get(row, spec.solution_column)))
    if form == "stepwise-executed":
        return lambda row: one(executed_hints(get(row, spec.solution_column)))
    if form == "stepwise":
        return lambda row: one(
            stepwise_hints(
                get(row, spec.solution_column), get(row, spec.prompt_column), get(row, spec.answer_column) or None
            )
        )
    if form == "summary":
        return lambda row: one(
            summary_hints(
                get(row, spec.solution_column),
                get(row, spec.prompt_column),
                get(row, spec.answer_column) or None,
                spec.summary_words,
            )
        )
    if form == "boxes":
        return lambda row: one(
            box_hint(
                row.get(spec.boxes_column), row.get(spec.labels_column), _row_size(row, spec, columns), spec.coords
            )
        )
    return lambda row: generate_hints(
        client,
        get(row, spec.prompt_column),
        get(row, spec.solution_column) or None,
        get(row, spec.answer_column),
        spec.max_hints,
        spec.verify,
    )


def _row_size(row: dict, spec: HintsSpec, columns: list[str]) -> tuple[int, int] | None:
    if spec.image_column in columns and row.get(spec.image_column) is not None:
        return image_size(row[spec.image_column])
    if spec.width_column in columns and spec.height_column in columns:
        return int(row[spec.width_column]), int(row[spec.height_column])
    return None


def _with_prefix(result: HintResult, prefix: str) -> str:
    return prefix + result.context if result.context.strip() else ""


# --------------------------------------------------------------------------------------------- the run


def _progress(total: int, initial: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit="row", dynamic_ncols=True)


def _rule_results(dataset, build: Callable[[dict], HintResult], progress) -> dict[int, HintResult]:
    """Every row at once in memory: a bad row stops the run before anything is written."""
    results = {}
    for index, row in enumerate(dataset):
        try:
            results[index] = build(row)
        except ValueError as error:
            raise ConfigError(f"row {index}: {error}") from None
        progress.update(1)
    return results


def _served_results(dataset, build, log: PartialLog, concurrency: int, prefix: str, progress) -> None:
    """Requests for the rows not yet in `log`, `concurrency` at a time, each appended to `log` when it returns.
    At most 2 x concurrency rows are queued. When a row fails for good, no new row starts, the rows in flight
    are finished and saved (they are paid for), then the error is raised."""
    pending = (i for i in range(len(dataset)) if i not in log.done)
    running: dict[Future, int] = {}
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        while True:
            while failure is None and len(running) < 2 * concurrency:
                index = next(pending, None)
                if index is None:
                    break
                running[pool.submit(build, dataset[index])] = index
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index = running.pop(future)
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    error = future.exception()
                    if isinstance(error, ServerError):
                        error = ServerError(f"row {index}: {error}", error.status)
                    failure = failure or error
                    for queued in running:
                        queued.cancel()
                    continue
                log.append(index, future.result(), _with_prefix(future.result(), prefix))
                progress.update(1)
    except BaseException:  # Ctrl-C: keep the rows that have returned, leave the rest for the rerun
        for future, index in running.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                log.append(index, future.result(), _with_prefix(future.result(), prefix))
        raise
    finally:
        pool.shutdown(wait=failure is not None, cancel_futures=True)
    if failure is not None:
        raise failure


def run_hints(spec: HintsSpec) -> HintsSummary:
    """Read, check, build every row's privileged context and write the output (see the module docstring)."""
    with datasets_progress(spec.progress):
        return _run_hints(spec)


def _run_hints(spec: HintsSpec) -> HintsSummary:
    from ..data import CONFIG_KEYS, load_rows

    start = time.time()
    if spec.form == "generated":
        resolve_server(spec)
    check_spec(spec)
    check_local_path(spec.input, "--input")
    source = DataConfig(path=spec.input, name=spec.name, split=spec.split, max_samples=spec.max_rows)
    dataset = load_rows(source, {**CONFIG_KEYS, "path": "--input", "split": "--split"})
    check_columns(dataset, spec)
    check_writable(dataset, spec)
    prefix = DEFAULT_PREFIXES[spec.form] if spec.prefix is None else spec.prefix
    notes = _notes(spec, dataset.column_names)
    client = None
    if spec.form == "generated":
        client = ChatClient(
            spec.base_url,
            spec.model,
            spec.api_key,
            spec.timeout,
            spec.retries,
            spec.retry_wait,
            spec.temperature,
            spec.max_tokens,
        )
        check_reachable(client)
    build = row_builder(spec, dataset.column_names, client)
    records, resumed = _build_all(spec, dataset, build, prefix)
    contexts = [records[i]["context"] for i in range(len(dataset))]
    dropped = [i for i, text in enumerate(contexts) if not text.strip()] if spec.on_empty == "drop" else []
    replaced = spec.output_column in dataset.column_names
    if replaced:
        dataset = dataset.remove_columns(spec.output_column)
    dataset = dataset.add_column(spec.output_column, contexts)
    if dropped:
        keep = sorted(set(range(len(dataset))) - set(dropped))
        dataset = dataset.select(keep)
    write_dataset(dataset, spec.out)
    if spec.form == "generated" and os.path.exists(spec.out + ".partial"):
        os.remove(spec.out + ".partial")
    return _summary(spec, records, resumed, dropped, len(dataset), notes, client, replaced, time.time() - start)


def _build_all(spec: HintsSpec, dataset, build, prefix: str) -> tuple[dict[int, dict], int]:
    """{index: record} for every row, and how many rows a previous run had already finished."""
    if spec.form != "generated":
        with _progress(len(dataset), 0, spec.progress, f"hints ({spec.form})") as progress:
            results = _rule_results(dataset, build, progress)
        return {
            i: {"context": _with_prefix(r, prefix), "kept": r.kept, "rejected": r.rejected} for i, r in results.items()
        }, 0
    log = PartialLog(spec.out + ".partial", run_settings(spec, dataset))
    log.open()
    resumed = len(log.done)
    try:
        with _progress(len(dataset), resumed, spec.progress, "hints (generated)") as progress:
            _served_results(dataset, build, log, spec.concurrency, prefix, progress)
    except ServerError as error:
        raise ConfigError(
            f"{error}. {len(log.done)} of {len(dataset)} rows are done and saved in {log.path}; run "
            "the same command again to continue"
        ) from None
    finally:
        log.close()
    return log.done, resumed


def check_writable(dataset, spec: HintsSpec) -> None:
    """Image columns cannot go to JSON lines; the output's directory must exist or be creatable."""
    kind = output_kind(spec.out)
    features = getattr(dataset, "features", {}) or {}
    images = [name for name, feature in features.items() if type(feature).__name__ == "Image"]
    if kind == "jsonl" and images:
        raise ConfigError(
            f"--out {spec.out}: the data set has image columns ({', '.join(images)}), which JSON lines "
            "cannot hold; write .parquet or a directory (save_to_disk) instead"
        )
    parent = os.path.dirname(os.path.abspath(spec.out.rstrip("/")))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {spec.out}: cannot create its directory ({error})") from None


def write_dataset(dataset, out: str) -> None:
    """Write to a temporary name beside `out`, then rename: `out` is either absent or complete."""
    kind = output_kind(out)
    out = out.rstrip("/")
    temporary = f"{out}.tmp-{os.getpid()}"
    try:
        if kind == "jsonl":
            with open(temporary, "w", encoding="utf-8") as handle:
                for row in dataset:
                    handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        elif kind == "parquet":
            dataset.to_parquet(temporary)
        else:
            dataset.save_to_disk(temporary)
        if kind == "disk" and os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(temporary, out)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.remove(temporary)


def _notes(spec: HintsSpec, columns: list[str]) -> list[str]:
    notes = []
    if spec.form in ("stepwise", "summary"):
        if spec.prompt_column not in columns:
            notes.append(
                f"no {spec.prompt_column!r} column: numbers the question states could not be told apart "
                "from computed ones (set --prompt-column)"
            )
        if spec.answer_column not in columns:
            notes.append(
                f"no {spec.answer_column!r} column: the answer was taken from each solution's #### line or "
                "\\boxed{} (set --answer-column)"
            )
    if spec.form == "generated" and spec.solution_column not in columns:
        notes.append(f"no {spec.solution_column!r} column: the model wrote hints from the question and answer alone")
    return notes


def _summary(spec, records, resumed, dropped, written, notes, client, replaced, seconds) -> HintsSummary:
    rejections: dict[str, int] = {}
    examples = []
    for index in sorted(records):
        for hint, reason in records[index]["rejected"]:
            kind = reason.split(":")[0]
            rejections[kind] = rejections.get(kind, 0) + 1
            if len(examples) < 3:
                examples.append((index, hint, reason))
    return HintsSummary(
        form=spec.form,
        out=spec.out,
        rows_read=len(records),
        rows_resumed=resumed,
        rows_written=written,
        rows_dropped=dropped,
        hints_kept=sum(r["kept"] for r in records.values()),
        rejections=rejections,
        examples_rejected=examples,
        notes=notes,
        stats=dict(client.stats) if client else {},
        replaced_column=replaced,
        seconds=seconds,
    )


def describe(summary: HintsSummary, output_column: str) -> list[str]:
    """The lines `dopd hints` prints."""
    kind = "served model" if summary.form == "generated" else "rule-based"
    rejected = sum(summary.rejections.values())
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.rejections.items(), key=lambda kv: -kv[1]))
    lines = [
        f"form:      {summary.form} ({kind})",
        f"rows:      {summary.rows_read} read, {summary.rows_resumed} already done by an earlier run, "
        f"{summary.rows_written} written, {len(summary.rows_dropped)} dropped for an empty privileged context"
        + (
            f" (rows {', '.join(map(str, summary.rows_dropped[:10]))}"
            f"{', ...' if len(summary.rows_dropped) > 10 else ''})"
            if summary.rows_dropped
            else ""
        ),
        f"hints:     {summary.hints_kept} kept, {rejected} rejected" + (f" ({reasons})" if rejected else ""),
    ]
    for index, hint, reason in summary.examples_rejected:
        lines.append(f"           row {index}: {hint[:70]!r}: {reason}")
    if summary.stats:
        s = summary.stats
        lines.append(
            f"requests:  {s['requests']} ({s['retries']} retries), tokens {s['prompt_tokens']} prompt / "
            f"{s['completion_tokens']} completion"
        )
    lines.append(f"output:    {summary.out} (column {output_column}{', replaced' if summary.replaced_column else ''})")
    lines += [f"note:      {note}" for note in summary.notes]
    lines.append(f"wall time: {summary.seconds:.1f} s")
    return lines
