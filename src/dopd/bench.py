"""`dopd bench`: a checkpoint on standard benchmarks through lm-evaluation-harness (docs/evaluation.md), one JSON
report and one markdown table per checkpoint, and with the teacher's and the base student's reports the paper's
gap-recovery table, `(method - student) / (teacher - student)` per benchmark and on average.

The harness is an optional extra (`pip install -e ".[bench]"`, pinned) imported only when a run starts. It was
chosen over evalscope by measurement (docs/evaluation.md): it adds about 215 MB and leaves the project's packages as
they are, where evalscope adds about 335 MB and holds `datasets` at or below 4.8.4 (through modelscope), which
replaced the project's datasets 5.2 with 4.1.1, below the 4.7 TRL needs. `BENCHMARKS` names the
paper's benchmarks the harness has, with their task and metric; `ELSEWHERE` those it lacks, with what to run
instead. Everything is checked before a model loads: names, the harness, the checkpoint's tokenizer, task names,
the reports to compare with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .answers import gap_recovery
from .config import ConfigError
from .run_dir import write_json_atomic, write_text_atomic

HARNESS = "lm_eval"
HARNESS_VERSION = "0.4.13"  # the `bench` extra's pin (pyproject.toml)
INSTALL = 'pip install -e ".[bench]"'


@dataclass(frozen=True)
class Benchmark:
    title: str  # the paper's name
    task: str  # lm-evaluation-harness task (or group)
    metric: str  # the harness's result key, `metric,filter`


# The paper's benchmarks that lm-evaluation-harness 0.4.13 has (Table 1, LLM; then image-text ones for the VLM).
BENCHMARKS = {
    "ceval": Benchmark("C-Eval", "ceval-valid", "acc,none"),
    "math500": Benchmark("MATH500", "minerva_math500", "math_verify,none"),
    "aime25": Benchmark("AIME25", "aime25", "exact_match,none"),
    "mmmu": Benchmark("MMMU (VLM)", "mmmu_val", "acc,none"),
    "chartqa": Benchmark("ChartQA (VLM)", "chartqa", "relaxed_accuracy,none"),
}
# The paper's LLM benchmarks the harness lacks, with what runs them (docs/evaluation.md has the commands).
ELSEWHERE = {
    "livebench": "LiveBench: its own repository (github.com/LiveBench/LiveBench); no harness here has it",
    "zebralogic": "ZebraLogic: evalscope task zebralogicbench, in an environment of its own",
    "autologi": "AutoLogi: its authors' release; no harness here has it",
    "bfclv3": "BFCLv3: evalscope task bfcl_v3 or the official gorilla bfcl-eval, in an environment of its own",
    "livecodebench": "LiveCodeBench v5: evalscope task live_code_bench (release v5) or its own repository",
}
PAPER_LLM_SUITE = ["ceval", "livebench", "math500", "aime25", "zebralogic", "autologi", "bfclv3", "livecodebench"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class BenchSpec:
    """Every setting of `dopd bench` (one option each: the comments are their help)."""

    model: str  # checkpoint: a save_pretrained directory (e.g. RUN/final) or a hub name
    benchmarks: list[str] = field(default_factory=list)  # the paper's benchmarks by name, e.g. ceval,math500,aime25
    tasks: list[str] = field(default_factory=list)  # harness task names run as given, e.g. a task of --include-path
    include_path: str | None = None  # a folder of custom task YAML files in the harness's format
    out: str = ""  # report .json; the table goes beside it as .md (default: runs/bench-TIME.json)
    tokenizer: str | None = None  # tokenizer path or hub name (default: the checkpoint's)
    backend: str = "hf"  # hf (transformers; a CPU runs it) | vllm (a GPU, dopd[vllm])
    tensor_parallel_size: int = 1  # --backend vllm: GPUs the model is split over
    batch_size: int = 8  # prompts per batch (hf)
    limit: int | None = None  # only the first N rows of each task (a quick look; not comparable with the paper)
    num_fewshot: int | None = None  # few-shot examples (default: each task's own)
    max_new_tokens: int | None = None  # longest generation of every task (default: each task's own)
    chat_template: bool = True  # render prompts with the tokenizer's chat template; --no-chat-template turns it off
    #: JSON merged into the harness's model arguments, e.g. '{"enable_thinking": false}' for Qwen3's non-thinking mode
    model_args: dict = field(default_factory=dict)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str | None = None  # e.g. cpu, cuda:0 (hf; default: the harness's choice)
    seed: int = 0  # the harness's random seeds
    trust_remote_code: bool = False  # passed to from_pretrained
    teacher_result: str | None = None  # the teacher's `dopd bench` report .json (adds the gap-recovery table)
    student_result: str | None = None  # the base student's `dopd bench` report .json


def require_harness() -> None:
    if importlib.util.find_spec(HARNESS) is None:
        raise ConfigError(f"dopd bench needs lm-evaluation-harness, which is not installed: {INSTALL}")


def resolve_tasks(spec: BenchSpec) -> dict[str, tuple[str, str | None]]:
    """{row name: (harness task, metric key or None for the task's first)} of the run; a name the harness lacks or
    does not know is one line."""
    if not spec.benchmarks and not spec.tasks:
        raise ConfigError("dopd bench needs --benchmarks (e.g. math500,aime25) or --tasks (harness task names)")
    rows: dict[str, tuple[str, str | None]] = {}
    for name in spec.benchmarks:
        key = name.lower()
        if key in ELSEWHERE:
            raise ConfigError(f"--benchmarks {name}: lm-evaluation-harness has no such task; {ELSEWHERE[key]}")
        if key not in BENCHMARKS:
            known = ", ".join(sorted(BENCHMARKS))
            raise ConfigError(f"--benchmarks {name} is unknown; use {known}, or --tasks with a harness task name")
        rows[key] = (BENCHMARKS[key].task, BENCHMARKS[key].metric)
    for task in spec.tasks:
        rows[task] = (task, None)
    return rows


def check_spec(spec: BenchSpec) -> dict[str, tuple[str, str | None]]:
    """The settings, before the harness or any model loads; returns the run's tasks."""
    rows = resolve_tasks(spec)
    if spec.backend not in ("hf", "vllm"):
        raise ConfigError(f"--backend {spec.backend!r} is unknown; use hf or vllm")
    for option, value in (("--batch-size", spec.batch_size), ("--tensor-parallel-size", spec.tensor_parallel_size)):
        if value <= 0:
            raise ConfigError(f"{option} = {value} must be positive")
    for option, value in (("--limit", spec.limit), ("--max-new-tokens", spec.max_new_tokens)):
        if value is not None and value <= 0:
            raise ConfigError(f"{option} = {value} must be positive")
    if spec.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {spec.dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    if not spec.out.endswith(".json") or os.path.isdir(spec.out):
        raise ConfigError(f"--out {spec.out} must be a file name ending in .json (the table goes beside it as .md)")
    if spec.include_path is not None and not os.path.isdir(spec.include_path):
        raise ConfigError(f"--include-path {spec.include_path} is not a folder of task YAML files")
    check_checkpoint(spec)
    return rows


def check_checkpoint(spec: BenchSpec) -> None:
    """A local checkpoint must exist and hold a tokenizer (or --tokenizer must name one); a hub name is the
    harness's to resolve."""
    from .loading import check_source

    check_source(spec.model, "--model")
    if spec.tokenizer:
        check_source(spec.tokenizer, "--tokenizer")
    elif os.path.isdir(spec.model) and not any(os.path.exists(os.path.join(spec.model, f)) for f in TOKENIZER_FILES):
        raise ConfigError(
            f"--model {spec.model} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save it beside the model "
            "(tokenizer.save_pretrained) or give --tokenizer"
        )


def read_report(path: str, option: str) -> dict:
    """An earlier `dopd bench` report to compare with."""
    if not os.path.isfile(path):
        raise ConfigError(f"{option} {path} does not exist; give an earlier `dopd bench` report (.json)")
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
        scores = {name: float(row["score"]) for name, row in report["results"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{option} {path} is not a `dopd bench` report ({type(error).__name__}: {error})") from None
    return {"model": report.get("model"), "source": path, "scores": scores}


def model_arguments(spec: BenchSpec) -> dict[str, Any]:
    """The harness's model arguments for the backend."""
    arguments: dict[str, Any] = {"pretrained": spec.model, "dtype": spec.dtype}
    if spec.tokenizer:
        arguments["tokenizer"] = spec.tokenizer
    if spec.trust_remote_code:
        arguments["trust_remote_code"] = True
    if spec.backend == "vllm":
        arguments.update(tensor_parallel_size=spec.tensor_parallel_size, seed=spec.seed)
    elif spec.device:
        arguments["device"] = spec.device
    return {**arguments, **spec.model_args}


def pick_metric(values: dict[str, Any], metric: str | None, task: str) -> tuple[str, float, float | None]:
    """(metric key, score, standard error) of one task's results: the named metric, or the first one reported."""
    keys = [k for k, v in values.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    key = metric if metric is not None else (keys[0] if keys else None)
    if key is None or key not in values:
        raise RuntimeError(f"the harness reported no {metric or 'metric'} for task {task}: {sorted(values)}")
    name, _, kind = key.partition(",")
    stderr = values.get(f"{name}_stderr,{kind}")
    return key, float(values[key]), float(stderr) if isinstance(stderr, (int, float)) else None


def run_harness(spec: BenchSpec, rows: dict[str, tuple[str, str | None]]) -> tuple[dict, str]:
    """The harness on the checkpoint: raw results per task and the harness's version. Unknown task names stop
    before the model loads."""
    from importlib.metadata import version

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=spec.include_path) if spec.include_path else TaskManager()
    known = set(manager.all_tasks)
    for task, _ in rows.values():
        if task not in known:
            hint = " (a custom task: add --include-path with its YAML)" if spec.include_path is None else ""
            raise ConfigError(f"--tasks {task}: lm-evaluation-harness has no task of that name{hint}")
    output = simple_evaluate(
        model=spec.backend,
        model_args=model_arguments(spec),
        tasks=sorted({task for task, _ in rows.values()}),
        num_fewshot=spec.num_fewshot,
        batch_size=spec.batch_size,
        limit=spec.limit,
        apply_chat_template=spec.chat_template,
        gen_kwargs={"max_gen_toks": spec.max_new_tokens} if spec.max_new_tokens else None,
        task_manager=manager,
        log_samples=False,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )
    return output["results"], version(HARNESS)


def build_report(spec: BenchSpec, rows, raw: dict, harness_version: str, seconds: float) -> dict:
    """The report: one score per row, their mean, and with both reports to compare the gap recovery per row."""
    results = {}
    for name, (task, metric) in rows.items():
        key, score, stderr = pick_metric(raw[task], metric, task)
        results[name] = {"task": task, "metric": key, "score": score, "stderr": stderr}
    compare = {}
    for role, path in (("teacher", spec.teacher_result), ("student", spec.student_result)):
        if path:
            compare[role] = read_report(path, f"--{role}-result")
    report = {
        "model": spec.model,
        "harness": {"name": "lm-evaluation-harness", "version": harness_version},
        "backend": spec.backend,
        "limit": spec.limit,
        "results": results,
        "average": sum(r["score"] for r in results.values()) / len(results),
        "compare": compare,
        "gap_recovery": recovery_table(results, compare) if len(compare) == 2 else None,
        "wall_seconds": round(seconds, 2),
    }
    return report


def recovery_table(results: dict, compare: dict) -> dict:
    """{benchmark: recovery or None, "average": the recovery of the mean scores} over the benchmarks all three
    reports hold (`answers.gap_recovery`: None where the teacher is not above the student)."""
    teacher, student = compare["teacher"]["scores"], compare["student"]["scores"]
    shared = [name for name in results if name in teacher and name in student]
    table = {name: gap_recovery(results[name]["score"], student[name], teacher[name]) for name in shared}
    if shared:
        mean = lambda scores: sum(scores[name] for name in shared) / len(shared)
        table["average"] = gap_recovery(mean({n: results[n]["score"] for n in shared}), mean(student), mean(teacher))
    return table


def markdown(report: dict) -> str:
    """The checkpoint's table, and the gap-recovery table when the teacher's and student's reports were given."""
    lines = ["| benchmark | task | metric | score |", "|---|---|---|---|"]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row['task']} | {row['metric']} | {100 * row['score']:.1f} |")
    lines.append(f"| average | | | {100 * report['average']:.1f} |")
    table = report.get("gap_recovery")
    if table:
        teacher, student = report["compare"]["teacher"]["scores"], report["compare"]["student"]["scores"]
        lines += ["", "| benchmark | teacher | student | this model | gap recovery |", "|---|---|---|---|---|"]
        for name, recovery in table.items():
            if name == "average":
                continue
            gap = "—" if recovery is None else f"{100 * recovery:.1f}%"
            score = report["results"][name]["score"]
            lines.append(
                f"| {name} | {100 * teacher[name]:.1f} | {100 * student[name]:.1f} | {100 * score:.1f} | {gap} |"
            )
        if "average" in table:
            shared = [name for name in table if name != "average"]
            mean = lambda scores: 100 * sum(scores[n] for n in shared) / len(shared)
            ours = mean({n: report["results"][n]["score"] for n in shared})
            gap = "—" if table["average"] is None else f"{100 * table['average']:.1f}%"
            lines.append(f"| average | {mean(teacher):.1f} | {mean(student):.1f} | {ours:.1f} | {gap} |")
    return "\n".join(lines)


def bench(spec: BenchSpec) -> dict:
    """Check everything, run the harness, write the report and its table (atomically); return the report."""
    start = time.time()
    rows = check_spec(spec)
    for role, path in (("teacher", spec.teacher_result), ("student", spec.student_result)):
        if path:
            read_report(path, f"--{role}-result")  # before any model loads
    require_harness()
    raw, harness_version = run_harness(spec, rows)
    report = build_report(spec, rows, raw, harness_version, time.time() - start)
    os.makedirs(os.path.dirname(os.path.abspath(spec.out)), exist_ok=True)
    write_json_atomic(spec.out, report)
    write_text_atomic(spec.out[: -len(".json")] + ".md", markdown(report) + "\n")
    return report
