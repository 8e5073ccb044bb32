"""Measuring a model before and after distillation (docs/hints-and-eval.md): sample answers on a data set,
check them, and report mean accuracy, pass@k and the gap recovery `(method - student) / (teacher - student)`.

`dopd eval` samples `samples` completions per prompt with the trainer's own rollout engine (`rollout/hf.py`),
checks each against the reference answer (`math`: equivalence by math-verify, so `\\boxed{1/2}` matches `0.5`;
`exact`: normalized string match of the final answer; `lab:TASK`: the lab task's checker), and writes a JSON
report (atomically) and a markdown table. Given the teacher's and the base student's results (numbers or earlier
reports on the same prompts), it adds the gap recovery the paper reports. Everything that can be checked before a
model loads is: columns, answers the checker cannot read, the results to compare with.

Over 400 lines on purpose: one command's flow (options, data, checks, sampling, the report and its table) reads
from top to bottom here; the checkers and pass@k are in `answers.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .answers import (  # noqa: F401  (the checkers and metrics are part of `dopd eval`'s API)
    CHECKERS,
    ExactChecker,
    LabChecker,
    MathChecker,
    default_ks,
    final_answer_text,
    gap_recovery,
    make_checker,
    normalize_exact,
    pass_at_k,
    strip_thinking,
    summarize,
)
from .config import ConfigError, DataConfig, RolloutConfig
from .prompts import DEFAULT_PRIVILEGED_TEMPLATE
from .run_dir import write_json_atomic, write_text_atomic

# ------------------------------------------------------------------------------------------------ results


def read_result(value: str, option: str) -> dict[str, Any]:
    """A result to compare with: an accuracy in [0, 1], or the JSON report of an earlier `dopd eval`."""
    try:
        accuracy = float(value)
    except ValueError:
        accuracy = None
    if accuracy is not None:
        if not 0 <= accuracy <= 1:
            raise ConfigError(f"{option} = {value} must be an accuracy in [0, 1] (0.528, not 52.8) or a report file")
        return {"accuracy": accuracy, "source": "given"}
    if not os.path.isfile(value):
        raise ConfigError(f"{option} = {value} is neither an accuracy in [0, 1] nor an existing `dopd eval` report")
    try:
        with open(value, encoding="utf-8") as handle:
            report = json.load(handle)
        accuracy = float(report["accuracy"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{option} = {value} is not a `dopd eval` report ({type(error).__name__}: {error})") from None
    data, sampling = report.get("data") or {}, report.get("sampling") or {}
    return {
        "accuracy": accuracy,
        "source": value,
        "model": report.get("model"),
        "fingerprint": data.get("fingerprint"),
        "checker": report.get("checker"),
        "pass_at_k": report.get("pass_at_k"),
        "rows": data.get("rows"),
        "samples": sampling.get("samples"),
    }


def check_comparable(result: dict, option: str, fingerprint: str, checker: str) -> None:
    """A report to compare with must come from the same prompts and answers and the same checker."""
    if result["source"] == "given":
        return
    if result.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{option} = {result['source']} was measured on other prompts or answers; evaluate that "
            "model on the same data (same --data, --max-rows, columns), or give its accuracy as a number"
        )
    if result.get("checker") != checker:
        raise ConfigError(
            f"{option} = {result['source']} used --checker {result.get('checker')}, this run {checker}; "
            "use the same checker"
        )


def data_fingerprint(prompts: list[Any], answers: list[Any]) -> str:
    payload = json.dumps([[p, a] for p, a in zip(prompts, answers)], default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def results_table(report: dict) -> str:
    """A markdown table: the teacher and base student when given, then the evaluated model."""
    ks = list(report["pass_at_k"])
    header = "| model | prompts | samples | accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | gap recovery |"
    lines = [header, "|" + "---|" * (5 + len(ks))]

    def row(label, result, recovery):
        pass_k = result.get("pass_at_k") or {}
        cells = [f"{pass_k[k]:.3f}" if k in pass_k else "—" for k in ks]
        gap = "—" if recovery is None else f"{100 * recovery:.1f}%"
        prompts, samples = result.get("rows") or "—", result.get("samples") or "—"
        lines.append(
            f"| {label} | {prompts} | {samples} | {result['accuracy']:.3f} | " + " | ".join(cells) + f" | {gap} |"
        )

    compare = report.get("compare") or {}
    both = "teacher" in compare and "student" in compare
    for role, label, recovery in (("teacher", "teacher", 1.0), ("student", "student before", 0.0)):
        if role in compare:
            result = compare[role]
            row(f"{label} ({result.get('model') or result['source']})", result, recovery if both else None)
    this = {
        "accuracy": report["accuracy"],
        "pass_at_k": report["pass_at_k"],
        "rows": report["data"]["rows"],
        "samples": report["sampling"]["samples"],
    }
    row(f"**{report['model']}**", this, report.get("gap_recovery"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class EvalData(DataConfig):
    """The data set `dopd eval` reads: the trainer's data settings (`data.load_rows` reads them as they are), the
    test split by default."""

    split: str = "test"  # split of a hub data set or a saved DatasetDict


@dataclass
class EvalSampling(RolloutConfig):
    """How `dopd eval` samples: the trainer's rollout settings (`rollout/hf.py` reads them as they are), greedy and
    one completion per prompt by default."""

    num_generations: int = 1  # completions per prompt
    max_new_tokens: int = 1024  # longest completion
    temperature: float = 0.0  # sampling temperature; 0 means greedy
    batch_size: int = 16  # prompts per generate call (hf)
    backend: str = "hf"  # hf (transformers generate; the default, and the one a CPU runs) | vllm (a GPU, dopd[vllm])


@dataclass
class EvalSpec:
    """Every setting of `dopd eval` (one option each: the comments are their help)."""

    model: str  # model path or hub name
    data: EvalData  # the data set and its columns (options below: EVAL_OPTIONS)
    out: str = ""  # report .json; the table goes beside it as .md (default: runs/eval-TIME.json)
    sampling: EvalSampling = field(default_factory=EvalSampling)
    checker: str = "math"  # math | exact | lab:TASK (e.g. lab:arith)
    pass_k: list[int] | None = None  # k values, comma-separated (default: 1, powers of 2, --samples)
    seed: int = 0  # sampling seed
    privileged: bool = False  # insert the privileged context into the prompt (to measure a model reading it)
    template: str = DEFAULT_PRIVILEGED_TEMPLATE  # how --privileged inserts it
    #: JSON for the chat template, e.g. '{"enable_thinking": false}'
    chat_template_kwargs: dict = field(default_factory=dict)
    tokenizer: str | None = None  # tokenizer path or hub name (default: the model's)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    tensor_parallel_size: int = 1  # --backend vllm: GPUs the model is split over
    gpu_memory_utilization: float = 0.9  # --backend vllm: share of each GPU vLLM may take
    max_model_len: int | None = None  # --backend vllm: longest prompt + completion (null: the model's own)
    device: str | None = None  # e.g. cpu, cuda:0 (default: cuda if available)
    trust_remote_code: bool = False  # passed to from_pretrained
    teacher_result: str | None = None  # the teacher's accuracy in [0, 1] or its report .json
    student_result: str | None = None  # the base student's accuracy in [0, 1] or its report .json
    progress: bool = True  # a progress bar; --no-progress turns it off


# The data and sampling settings `dopd eval` takes, with their options (the other DataConfig and RolloutConfig
# settings keep their defaults); every error about one names its option.
EVAL_OPTIONS = {
    "data.path": "--data",
    "data.name": "--name",
    "data.split": "--split",
    "data.max_samples": "--max-rows",
    "data.prompt_column": "--prompt-column",
    "data.answer_column": "--answer-column",
    "data.privileged_column": "--privileged-column",
    "sampling.num_generations": "--samples",
    "sampling.temperature": "--temperature",
    "sampling.top_p": "--top-p",
    "sampling.top_k": "--top-k",
    "sampling.max_new_tokens": "--max-new-tokens",
    "sampling.batch_size": "--batch-size",
    "sampling.backend": "--backend",
}
# The options errors about the data set name (`data.load_rows`, `data.check_columns`).
EVAL_KEYS = {path.removeprefix("data."): option for path, option in EVAL_OPTIONS.items() if path.startswith("data.")}


def check_spec(spec: EvalSpec) -> None:
    """The settings alone, before the data set is read."""
    from .prompts import check_template

    sampling, samples = spec.sampling, spec.sampling.num_generations
    for option, value in (
        ("--samples", samples),
        ("--max-new-tokens", sampling.max_new_tokens),
        ("--batch-size", sampling.batch_size),
    ):
        if value <= 0:
            raise ConfigError(f"{option} = {value} must be positive")
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
        raise ConfigError("--temperature must be >= 0, --top-p in (0, 1] and --top-k >= 0")
    if sampling.temperature == 0 and samples > 1:
        raise ConfigError(
            f"--samples {samples} with --temperature 0 gives {samples} identical greedy "
            "answers; set --temperature (e.g. 0.6) or --samples 1"
        )
    for k in spec.pass_k or []:
        if not 1 <= k <= samples:
            raise ConfigError(f"--pass-k {k} must be between 1 and --samples = {samples}")
    if spec.data.max_samples is not None and spec.data.max_samples <= 0:
        raise ConfigError(f"--max-rows = {spec.data.max_samples} must be positive")
    if sampling.backend not in ("hf", "vllm"):
        raise ConfigError(f"--backend {sampling.backend!r} is unknown; use hf (transformers) or vllm")
    if spec.tensor_parallel_size <= 0 or not 0 < spec.gpu_memory_utilization <= 1:
        raise ConfigError("--tensor-parallel-size must be positive and --gpu-memory-utilization in (0, 1]")
    if sampling.backend == "hf" and spec.tensor_parallel_size != 1:
        raise ConfigError("--tensor-parallel-size applies to --backend vllm; add --backend vllm or leave it at 1")
    if sampling.backend == "vllm":
        from .rollout.vllm_llm import require_vllm_llm

        require_vllm_llm()
    if spec.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {spec.dtype!r} is unknown; use auto, float32, bfloat16 or float16")
    if not spec.out:
        raise ConfigError("--out is required: the report's .json path")
    if not spec.out.endswith(".json"):
        raise ConfigError(f"--out {spec.out} must end in .json (the table goes beside it as .md)")
    if os.path.isdir(spec.out):
        raise ConfigError(f"--out {spec.out} is a directory; give a file name ending in .json")
    if spec.privileged:
        try:
            check_template(spec.template, "--template")
        except ValueError as error:
            raise ConfigError(str(error)) from None


def load_eval_rows(spec: EvalSpec) -> tuple[list, list, list[str | None], list[dict]]:
    """(prompts, answers, privileged contexts or Nones, rows) of the data set, columns checked."""
    from .data import check_columns, load_rows, require_column
    from .loading import check_source

    data = spec.data
    check_source(data.path, "--data", "dataset")
    dataset = load_rows(data, EVAL_KEYS)
    check_columns(dataset, data, spec.privileged, EVAL_KEYS)
    answers = list(require_column(dataset, data.answer_column, "--answer-column", data.path))
    privileged = list(dataset[data.privileged_column]) if spec.privileged else [None] * len(answers)
    # Only the text columns a checker may read (the lab's reference completion), never an image column.
    extra = {column: list(dataset[column]) for column in ("completion",) if column in dataset.column_names}
    rows = [{column: values[i] for column, values in extra.items()} for i in range(len(answers))]
    return list(dataset[data.prompt_column]), answers, privileged, rows


def _load_tokenizer(spec: EvalSpec):
    from .loading import load_tokenizer

    name = spec.tokenizer or spec.model
    return load_tokenizer(name, "--tokenizer" if spec.tokenizer else "--model", bool(spec.trust_remote_code))


def _load_model(spec: EvalSpec):
    import torch

    from .loading import DTYPES, load_pretrained

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES.get(spec.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return load_pretrained(spec.model, "--model", dtype, bool(spec.trust_remote_code)).to(device).eval()


def sample_completions(
    engine, tokenizer, prompt_ids: list[list[int]], sampling: RolloutConfig, seed: int, progress: bool = False
) -> tuple[list[list[str]], int]:
    """`sampling.num_generations` completions per prompt from a rollout engine (`rollout/hf.py`, `rollout/vllm.py`
    or `rollout/vllm_llm.py`), decoded without special tokens, and how many hit the token limit. `dopd eval` and
    the trainer's validation (`validation.py`) both sample here."""
    import torch
    from tqdm.auto import tqdm

    size = sampling.batch_size if sampling.backend == "hf" else max(len(prompt_ids), 1)  # vLLM batches itself
    torch.manual_seed(seed)
    completions: list[list[str]] = [[] for _ in prompt_ids]
    unfinished = 0
    batches = -(-len(prompt_ids) // size)
    # Progress in generated tokens with their rate, the batch of prompts in the postfix: a batch of a large model
    # takes minutes on a CPU, and a bar counting prompts would sit at 0 meanwhile.
    with tqdm(disable=not progress, desc="eval", unit="tok", dynamic_ncols=True) as bar:
        streamer = {"streamer": _TokenProgress(bar)} if sampling.backend == "hf" else {}
        for number, start in enumerate(range(0, len(prompt_ids), size), 1):
            bar.set_postfix_str(f"batch {number}/{batches}, prompts {start}/{len(prompt_ids)}")
            batch = prompt_ids[start : start + size]
            rollouts = engine.generate(batch, sampling.num_generations, **streamer)
            for index, ids, done in zip(rollouts.prompt_index, rollouts.completion_ids, rollouts.finished):
                completions[start + index].append(tokenizer.decode(ids, skip_special_tokens=True))
                unfinished += not done
                if not streamer:
                    bar.update(len(ids))
        bar.set_postfix_str(f"batch {batches}/{batches}, prompts {len(prompt_ids)}/{len(prompt_ids)}")
    return completions, unfinished


def make_eval_engine(spec: EvalSpec, tokenizer):
    """The engine `dopd eval` samples with: transformers generate on the loaded model (`--backend hf`), or a vLLM
    engine over the checkpoint on disk (`--backend vllm`, `rollout/vllm_llm.py`)."""
    if spec.sampling.backend == "vllm":
        from .rollout.vllm_llm import VLLMEngine

        return VLLMEngine.create(spec, tokenizer)
    from .rollout.hf import HFRollout

    model = _load_model(spec)
    return HFRollout(lambda: model, tokenizer, spec.sampling)


class _TokenProgress:
    """A transformers streamer that counts the tokens each decoding step adds (one per sampled row); the first
    call of a `generate` hands it the prompt, which is not counted."""

    def __init__(self, bar):
        self.bar, self.prompt_seen = bar, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.bar.update(int(value.numel()))

    def end(self) -> None:
        self.prompt_seen = False


def evaluate(spec: EvalSpec) -> dict[str, Any]:
    """Check everything, sample, score; write the report and the table; return the report. (Loading the data and
    the model prints no bars of datasets' or transformers': `loading.py`.)"""
    from . import __version__
    from .prompts import render_prompt

    start = time.time()
    check_spec(spec)
    prompts, answers, privileged, rows = load_eval_rows(spec)
    checker = make_checker(spec.checker)
    checker.prepare(answers, prompts, rows)
    fingerprint = data_fingerprint(prompts, answers)
    compare = {}
    for role, value in (("teacher", spec.teacher_result), ("student", spec.student_result)):
        if value is not None:
            compare[role] = read_result(value, f"--{role}-result")
            check_comparable(compare[role], f"--{role}-result", fingerprint, checker.name)
    from .loading import check_source

    check_source(spec.model, "--model")  # after the data's checks: each of those stops before any model loads
    if spec.tokenizer:
        check_source(spec.tokenizer, "--tokenizer")
    tokenizer = _load_tokenizer(spec)
    try:
        texts = [
            render_prompt(tokenizer, p, c, spec.template, spec.data.use_chat_template, spec.chat_template_kwargs)
            for p, c in zip(prompts, privileged)
        ]
    except ValueError as error:
        raise ConfigError(str(error)) from None
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    engine = make_eval_engine(spec, tokenizer)
    completions, unfinished = sample_completions(engine, tokenizer, prompt_ids, spec.sampling, spec.seed, spec.progress)
    correct = [[checker.score(i, text) for text in row] for i, row in enumerate(completions)]
    data, sampling = spec.data, spec.sampling
    ks = sorted(set(spec.pass_k)) if spec.pass_k else default_ks(sampling.num_generations)
    report = {
        "model": spec.model,
        "data": {
            "path": data.path,
            "split": data.split,
            "name": data.name,
            "rows": len(prompts),
            "prompt_column": data.prompt_column,
            "answer_column": data.answer_column,
            "privileged": spec.privileged,
            "fingerprint": fingerprint,
        },
        "checker": checker.name,
        "sampling": {
            "samples": sampling.num_generations,
            "backend": sampling.backend,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "max_new_tokens": sampling.max_new_tokens,
            "seed": spec.seed,
        },
        **summarize(correct, ks),
        "completions_at_token_limit": unfinished,
        "compare": compare,
        "gap_recovery": None,
        "rows": [
            {"index": i, "answer": answers[i], "correct": correct[i], "completions": completions[i]}
            for i in range(len(prompts))
        ],
        "wall_seconds": round(time.time() - start, 2),
        "dopd_version": __version__,
    }
    if "teacher" in compare and "student" in compare:
        report["gap_recovery"] = gap_recovery(
            report["accuracy"], compare["student"]["accuracy"], compare["teacher"]["accuracy"]
        )
    os.makedirs(os.path.dirname(os.path.abspath(spec.out)), exist_ok=True)
    write_json_atomic(spec.out, report)
    write_text_atomic(table_path(spec.out), results_table(report) + "\n")
    return report


def table_path(out: str) -> str:
    return out[: -len(".json")] + ".md"


__all__ = [
    "CHECKERS",
    "EVAL_OPTIONS",
    "EvalData",
    "EvalSampling",
    "EvalSpec",
    "ExactChecker",
    "LabChecker",
    "MathChecker",
    "data_fingerprint",
    "default_ks",
    "evaluate",
    "final_answer_text",
    "gap_recovery",
    "make_checker",
    "normalize_exact",
    "pass_at_k",
    "read_result",
    "results_table",
    "summarize",
    "write_json_atomic",
]
