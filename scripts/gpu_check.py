"""One-command GPU check of dopd on a machine with a GPU and no network (docs/gpu_check.md).

It installs what dopd needs and the machine lacks from a folder of wheels (`scripts/gpu_wheels.sh` makes it),
builds random-weight models with the real Qwen3 shapes (configs written here, nothing from the hub) and a synthetic
tokenizer with Qwen3's 151,936-entry vocabulary, then measures, each with warm-up and repetitions:

- loss: the chunked DOPD loss against the plain one (full logits) at the shape of `benchmarks/loss_memory.py`
  and at 8,192 completion tokens, fp32 and bf16: time, peak memory, loss and gradient agreement;
- step: a DOPD step against an opd-priv step on the same rollouts (transformers rollouts, bf16 autocast, the
  student's weights in fp32): rollout, scoring and update time, tokens per second, peak memory;
- gpu_tests: `pytest -m gpu tests/test_gpu.py` in a subprocess.

Every part runs on its own (an error is recorded in the JSON and the rest still run); the JSON is rewritten
(atomically) after every part and every measurement, so a kill leaves the latest state. `--budget-s` drops the
largest measurements first when their estimates do not fit the time left. `--tiny` runs the whole check on the
CPU at tiny shapes in well under a minute (the test suite does), so it cannot rot.

    bash scripts/gpu_check.sh --wheels .whl            # on the GPU machine (a 420 s budget; not yet run on a GPU)
    bash scripts/gpu_check.sh --tiny                   # on any machine, CPU, tiny shapes
    python3 scripts/gpu_check.py --list-wheels         # the pinned wheels the GPU machine lacks
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from xml.etree import ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
PARTS = ("install", "environment", "loss", "gpu_tests", "models", "step")

# What the GPU machine lacks (checked there: Python 3.12, torch 2.11, transformers 5.17, no network), pinned.
# omegaconf (dopd.config) needs only PyYAML from 2.4 on; datasets (dopd.data.load_rows, which the trainer calls
# even for a JSONL file) needs dill and multiprocess beside packages that machine has. math-verify and trl are
# imported by no module on the check's path.
WHEELS = {"omegaconf": "2.4.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
# Every import the check makes, import name -> distribution.
NEEDED_MODULES = {
    "torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "numpy": "numpy", "yaml": "pyyaml", "tqdm": "tqdm", "jinja2": "jinja2",
    "omegaconf": "omegaconf", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
    "pyarrow": "pyarrow", "pandas": "pandas", "fsspec": "fsspec", "xxhash": "xxhash",
    "huggingface_hub": "huggingface_hub", "pytest": "pytest",
}  # fmt: skip
REPORTED_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy", "omegaconf",
                     "datasets", "pyarrow", "fsspec", "huggingface_hub", "peft", "pytest", "triton")  # fmt: skip

# Real Qwen3 shapes (the public configs); every one has vocabulary 151,936, RMSNorm eps 1e-6, RoPE θ 1e6.
QWEN3_VOCAB = 151_936
QWEN3_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")  # fmt: skip
QWEN3 = {  # hidden, MLP, layers, attention heads, key-value heads, head size, tied input and output embeddings
    "0.6B": (1024, 3072, 28, 16, 8, 128, True),
    "1.7B": (2048, 6144, 28, 16, 8, 128, True),
    "8B": (4096, 12288, 36, 32, 8, 128, False),
    "tiny-student": (64, 128, 2, 4, 2, 16, True),
    "tiny-teacher": (96, 192, 2, 4, 2, 24, False),
}
PAIRS = {"quick": ("0.6B", "1.7B"), "paper": ("1.7B", "8B"), "tiny": ("tiny-student", "tiny-teacher")}
# GPU memory a pair's step needs, in GiB: two trainers' fp32 students with AdamW state, the self copy, the shared
# bf16 teacher and the activations. The paper pair peaks near 100 GB (an H200 holds it, an 80 GB H100 does not).
PAIR_MEMORY_GIB = {"paper": 110.0, "quick": 40.0}
# With random weights the end-of-sequence token is never sampled, so every completion runs to max_new_tokens.
STEP_NOTE = (
    "random weights never sample end-of-sequence, so every completion has max_new_tokens tokens: the step ratio "
    "measures these shapes; the scoring and update ratios are the informative ones"
)


def choose_pair(requested: str, memory_gib: float | None) -> tuple[str, str]:
    """The step's pair and why: `auto` takes the paper pair where the GPU's memory holds it, else the quick one."""
    if requested != "auto":
        return requested, f"--pair {requested}"
    if memory_gib is not None and memory_gib >= PAIR_MEMORY_GIB["paper"]:
        return "paper", f"auto: {memory_gib:.0f} GiB holds the paper pair (needs about {PAIR_MEMORY_GIB['paper']:.0f})"
    shown = "unknown" if memory_gib is None else f"{memory_gib:.0f} GiB"
    return "quick", f"auto: {shown} is short of the paper pair's {PAIR_MEMORY_GIB['paper']:.0f} GiB"


@dataclass
class Settings:
    """The sizes of one mode: `gpu` (real shapes) or `tiny` (CPU, seconds)."""

    loss_shapes: dict  # name -> tokens, sequences, vocab, student_hidden, teacher_hidden
    loss_repetitions: int
    chunk_size: int | None  # None: the kernel's default
    vocab: int
    prompts: int
    generations: int
    max_new_tokens: int
    micro_batch_size: int
    prompt_words: int
    privileged_words: int
    step_repetitions: int
    test_timeout_s: float
    # Guessed seconds of each measurement (models and trainers included for a step); the JSON records the real
    # time beside each, to correct these after a run.
    estimates: dict = field(default_factory=dict)


_LOSS_BASE = {"tokens": 1024, "sequences": 4, "vocab": QWEN3_VOCAB, "student_hidden": 1024, "teacher_hidden": 2048}
GPU = Settings(
    loss_shapes={"base": _LOSS_BASE, "long": {**_LOSS_BASE, "tokens": 8192, "sequences": 8}},
    loss_repetitions=3, chunk_size=None, vocab=QWEN3_VOCAB, prompts=16, generations=4, max_new_tokens=256,
    micro_batch_size=16, prompt_words=96, privileged_words=64, step_repetitions=3, test_timeout_s=240,
    estimates={"loss/base/fp32": 8, "loss/base/bf16": 8, "loss/long/fp32": 25, "loss/long/bf16": 25,
               "gpu_tests": 90, "step/quick": 120, "step/paper": 200},
)  # fmt: skip
_TINY_BASE = {"tokens": 256, "sequences": 4, "vocab": 8192, "student_hidden": 128, "teacher_hidden": 256}
TINY = Settings(
    loss_shapes={"base": _TINY_BASE, "long": {**_TINY_BASE, "tokens": 512}},
    loss_repetitions=2, chunk_size=64, vocab=512, prompts=4, generations=2, max_new_tokens=8, micro_batch_size=4,
    prompt_words=6, privileged_words=4, step_repetitions=2, test_timeout_s=120,
    estimates={"loss/base/fp32": 2, "loss/base/bf16": 2, "loss/long/fp32": 3, "loss/long/bf16": 3, "gpu_tests": 20,
               "step/tiny": 20},
)  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    """One line: the error's type and its first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


# ------------------------------------------------------------------------------------------------ options


class OneLineParser(argparse.ArgumentParser):
    """Errors in one line naming the option (`gpu_check: error: --wheels X: no such folder`), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", help="folder of wheels to install what is missing from, with no network")
    parser.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON (default %(default)s)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole check, installs "
        "included (default %(default)s); the largest measurements are dropped first when short",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: the whole check in seconds")
    parser.add_argument(
        "--pair",
        choices=("auto", "quick", "paper"),
        default="auto",
        help="the step's models: paper (Qwen3-1.7B student, 8B teacher), quick (0.6B, 1.7B) or auto (paper "
        "if the GPU's memory holds it and the budget allows, else quick, also after an out-of-memory; default)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument(
        "--site",
        default=os.path.join(tempfile.gettempdir(), "dopd-gpu-check-site"),
        help="where wheels are installed (pip --target; default %(default)s)",
    )
    parser.add_argument("--work-dir", help="where models and runs are written (default: a temporary folder, removed)")
    parser.add_argument("--list-wheels", action="store_true", help="print the pinned wheels (NAME==VERSION) and exit")
    args = parser.parse_args(argv)
    if args.wheels is not None and not os.path.isdir(args.wheels):
        parser.error(f"--wheels {args.wheels}: no such folder (make it with scripts/gpu_wheels.sh)")
    if args.wheels is not None:
        args.wheels = os.path.abspath(args.wheels)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s:g}: must be > 0 seconds")
    if args.work_dir is not None and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        parser.error(f"--work-dir {args.work_dir}: exists and is not a folder")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: {out_dir} is not a folder")
    return args


# ------------------------------------------------------------------------------------------------ report


class Report:
    """The JSON of the check: a header and one record per part, written atomically (temporary name, rename)."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.data = {**header, "parts": {}}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self) -> None:
        temporary = f"{self.path}.tmp"
        with open(temporary, "w") as handle:
            json.dump(self.data, handle, indent=1, default=str)
        os.replace(temporary, self.path)

    def skip(self, name: str, reason: str) -> dict:
        record = {"status": "skipped", "error": None, "seconds": 0.0, "reason": reason}
        self.data["parts"][name] = record
        self.write()
        log(f"{name}: skipped ({reason})")
        return record

    def run(self, name: str, work, estimate_s: float | None = None) -> dict:
        """`work(record, save)` fills the part's record (saving it as it goes) and returns a status or None (ok);
        an exception becomes the part's error, with what was recorded before it kept. `estimate_s`: the budget's
        guess, kept beside the real time."""
        record = {"status": "running", "error": None, "seconds": 0.0}
        if estimate_s is not None:
            record["estimate_s"] = estimate_s
        self.data["parts"][name] = record
        start = time.perf_counter()
        log(f"{name} ...")

        def save() -> None:
            record["seconds"] = round(time.perf_counter() - start, 2)
            self.write()

        try:
            status = work(record, save) or "ok"
        except Exception as error:  # any failure is the part's result; the next parts still run
            status = "error"
            record["error"] = describe(error)
            record["traceback"] = traceback.format_exc()[-4000:]
        record["status"] = status
        save()
        log(f"{name}: {status} in {record['seconds']:.1f} s" + (f" ({record['error']})" if record["error"] else ""))
        return record


# ------------------------------------------------------------------------------------------------ budget


def plan_budget(estimates: dict[str, float], seconds_left: float) -> tuple[list[str], dict[str, str]]:
    """The measurements that fit in `seconds_left` (in their order) and the dropped ones with a reason: while the
    estimates add up to more than the time left, the largest goes first."""
    kept = dict(estimates)
    dropped = {}
    while kept and sum(kept.values()) > seconds_left:
        largest = max(kept, key=kept.get)
        dropped[largest] = (
            f"budget: {sum(kept.values()):.0f} s estimated for {len(kept)} measurements but "
            f"{max(seconds_left, 0):.0f} s left; this one is the largest ({kept[largest]:.0f} s)"
        )
        del kept[largest]
    return [name for name in estimates if name in kept], dropped


class Budget:
    """The check's time: what is left of `--budget-s` since the start, and which measurements still fit."""

    def __init__(self, seconds: float, estimates: dict[str, float], start: float, fallbacks: dict | None = None):
        self.seconds, self.estimates, self.start = seconds, dict(estimates), start
        self.fallbacks = dict(fallbacks or {})  # a measurement -> a smaller variant that may run instead
        self.pending: list[str] = []
        self.dropped: dict[str, str] = {}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def plan(self, names: list[str]) -> None:
        """Set the measurements still to run and drop, largest first, those that do not fit the time left; a
        dropped one with a fallback (a smaller variant) is replaced by it if that fits."""
        self.pending = [name for name in names if name not in self.dropped]
        kept, dropped = plan_budget({n: self.estimates[n] for n in self.pending}, self.left())
        for name, reason in dropped.items():
            fallback = self.fallbacks.get(name)
            room = self.left() - sum(self.estimates[n] for n in kept)
            if fallback and fallback not in self.dropped and self.estimates[fallback] <= room:
                kept.append(fallback)
                reason += f"; {fallback} runs instead"
            self.dropped[name] = reason
        self.pending = kept

    def allows(self, name: str) -> bool:
        """Re-plan what is pending with the time left now; whether `name` still runs."""
        self.plan(self.pending)
        return name in self.pending

    def done(self, name: str) -> None:
        if name in self.pending:
            self.pending.remove(name)


# ----------------------------------------------------------------------------------------------- install


def missing_distributions(needed: dict[str, str]) -> list[str]:
    """The distributions of the needed modules that cannot be imported, sorted."""
    return sorted({dist for module, dist in needed.items() if importlib.util.find_spec(module) is None})


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheels(distributions: list[str], folder: str) -> tuple[dict[str, list[str]], list[str]]:
    """The wheel files of each distribution in `folder`, and the distributions it has none of."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    found = {d: [f for f in files if _normalized(f.split("-")[0]) == _normalized(d)] for d in distributions}
    return {d: f for d, f in found.items() if f}, [d for d, f in found.items() if not f]


def missing_report(brought: list[str], lacking: list[str], unbrought: list[str], folder: str | None) -> str | None:
    """One line on what cannot be installed (`brought`: missing ones the check has wheels for, `lacking`: those
    the folder has none of, `unbrought`: missing ones it has no wheels for), or None when all can be."""
    problems = []
    if unbrought:
        problems.append(
            f"{', '.join(unbrought)} missing and not among the wheels this check brings "
            f"({', '.join(WHEELS)}); this machine is not the one the check was made for"
        )
    if folder is None and brought:
        problems.append(f"missing: {', '.join(brought)}; pass --wheels DIR (a folder made by scripts/gpu_wheels.sh)")
    if lacking:
        problems.append(f"the wheel folder {folder} lacks {', '.join(lacking)}; make it with scripts/gpu_wheels.sh")
    return "; ".join(problems) or None


def importable(path: str) -> None:
    """Put `path` first on the import path, here and in subprocesses (the gpu tests)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    parts = [path] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    importlib.invalidate_caches()


def install_part(record: dict, wheels: str | None, site: str, needed: dict[str, str] = NEEDED_MODULES) -> str:
    """Install the missing distributions from the wheel folder with pip (no index, no dependencies, --target)."""
    missing = missing_distributions(needed)
    brought = [d for d in missing if d in WHEELS]
    found, lacking = find_wheels(brought, wheels) if wheels else ({}, [])
    record.update(missing=missing, wheels=wheels, site=site, installed=[], wheel_files=found)
    record["error"] = missing_report(brought, lacking, [d for d in missing if d not in WHEELS], wheels)
    failures = [f"{d}: {failure}" for d in found if (failure := pip_install(d, wheels, site))]
    if failures:
        record["error"] = "; ".join(filter(None, [record["error"], *failures]))
    if found:
        importable(site)  # only when installing: a site left by an earlier run must not shadow this machine's
        record["installed"] = [d for d in found if importlib.util.find_spec(_module_of(d, needed)) is not None]
    record["still_missing"] = missing_distributions(needed)
    return "error" if record["error"] or record["still_missing"] else "ok"


def pip_install(distribution: str, wheels: str, site: str) -> str | None:
    """`pip install --target site` of one distribution from the wheel folder, with no index and no dependencies
    (one call each, so that a wheel that does not fit leaves the others installed); None or what went wrong."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        site,
        "--find-links",
        wheels,
        distribution,
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    if "from versions: none" in done.stderr:
        return f"no wheel in {wheels} fits this Python ({sys.version_info.major}.{sys.version_info.minor})"
    return "pip install failed: " + " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])


def _module_of(distribution: str, needed: dict[str, str]) -> str:
    return next(module for module, dist in needed.items() if dist == distribution)


# ------------------------------------------------------------------------------------------- environment


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def environment_part(record: dict, device: str) -> str:
    import platform

    import torch

    record.update(
        python=sys.version.split()[0],
        executable=sys.executable,
        platform=platform.platform(),
        cpu_count=os.cpu_count(),
        device=device,
        cuda_available=torch.cuda.is_available(),
        torch_cuda=torch.version.cuda,
        torch_threads=torch.get_num_threads(),
        packages={name: _version(name) for name in REPORTED_PACKAGES},
    )
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record.update(
            gpu_name=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            gpu_count=torch.cuda.device_count(),
        )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10
        )
        record["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        record["git_commit"] = None
    import dopd

    record["dopd"] = os.path.dirname(dopd.__file__)
    return "ok"


# -------------------------------------------------------------------------------------- device utilities


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def peak_memory(device: str, into: dict, key: str):
    """On CUDA, the peak of allocated bytes above those allocated at the start, in MiB, into `into[key]` (the
    largest over the calls); nothing on the CPU (see `live_tensor_peak_mb`)."""
    import torch

    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    into[key] = round(max(into.get(key, 0.0), peak), 1)


def rel_diff(actual, expected) -> float:
    """|a − e| / |e| for numbers; ‖a − e‖ / ‖e‖ for tensors (in fp32)."""
    if isinstance(actual, float):
        return abs(actual - expected) / max(abs(expected), 1e-30)
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# -------------------------------------------------------------------------------------------------- loss


def import_loss_memory():
    benchmarks = os.path.join(REPO, "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import loss_memory

    return loss_memory


def loss_inputs(shape: dict, device: str, dtype):
    """`benchmarks/loss_memory.py`'s inputs at `shape`, made on `device` and cast to `dtype` (a leaf each)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        inputs, _ = import_loss_memory().make_inputs(argparse.Namespace(**shape, logit_std=3.0), generator)
    return {key: cast(value, dtype, key in ("student_hidden", "student_weight")) for key, value in inputs.items()}


def cast(tensor, dtype, leaf: bool):
    out = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
    return out.requires_grad_() if leaf else out


def run_form(form: str, objective, x: dict, chunk_size: int | None):
    """Forward and backward of the plain or chunked form: `benchmarks/loss_memory.py`'s, on whatever device the
    inputs are; gradients land in the student leaves' `.grad`."""
    return import_loss_memory().run_form(form, objective, x, chunk_size)


@dataclass
class Outcome:
    loss: float
    grad_hidden: object
    grad_weight: object
    fractions: dict


def measure_form(form: str, objective, x: dict, chunk_size, device: str, repetitions: int) -> tuple[dict, Outcome]:
    """One warm-up, then `repetitions` timed runs; the figures and the last run's loss and gradients."""
    figures: dict = {}
    times = []
    for repetition in range(repetitions + 1):
        x["student_hidden"].grad = x["student_weight"].grad = None
        # The warm-up's peak is left out: it holds one-time allocations (cuBLAS workspaces).
        with peak_memory(device, figures if repetition else {}, "peak_mib"):
            synchronize(device)
            start = time.perf_counter()
            out = run_form(form, objective, x, chunk_size)
            synchronize(device)
            seconds = time.perf_counter() - start
        if repetition:
            times.append(seconds)
    fractions = {k.split("/")[1]: round(float(v), 4) for k, v in out.metrics.items() if k.startswith("frac/")}
    outcome = Outcome(float(out.loss.detach()), x["student_hidden"].grad, x["student_weight"].grad, fractions)
    del out
    if device != "cuda":  # torch's count of live tensor bytes, in one more (untimed) pass
        x["student_hidden"].grad = x["student_weight"].grad = None
        figures["peak_mib"] = round(
            import_loss_memory().live_tensor_peak_mb(lambda: run_form(form, objective, x, chunk_size)), 1
        )
        x["student_hidden"].grad, x["student_weight"].grad = outcome.grad_hidden, outcome.grad_weight
    figures.update(time_s=round(statistics.median(times), 4), times_s=[round(t, 4) for t in times])
    return figures, outcome


def agreement(actual: Outcome, expected: Outcome) -> dict:
    return {
        "loss_rel_diff": rel_diff(actual.loss, expected.loss),
        "grad_hidden_rel_diff": rel_diff(actual.grad_hidden, expected.grad_hidden),
        "grad_weight_rel_diff": rel_diff(actual.grad_weight, expected.grad_weight),
    }


def measure_loss(shape: dict, dtype_name: str, settings: Settings, device: str) -> dict:
    """Plain against chunked at one shape and dtype; in bf16 both are also compared with the fp32 plain form on
    the same (bf16-rounded) inputs."""
    import torch

    from dopd.kernels import default_chunk_size
    from dopd.objectives import build_objective

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    objective = build_objective("dopd")
    x = loss_inputs(shape, device, dtype)
    result = {
        **shape,
        "dtype": dtype_name,
        "repetitions": settings.loss_repetitions,
        "chunk_size": settings.chunk_size or default_chunk_size(shape["vocab"]),
    }
    outcomes, errors = {}, []
    for form in ("plain", "chunked"):
        try:
            result[form], outcomes[form] = measure_form(
                form, objective, x, settings.chunk_size, device, settings.loss_repetitions
            )
        except Exception as error:  # e.g. CUDA out of memory for the plain form: a figure too
            result[form] = {"error": describe(error)}
            errors.append(f"{form}: {describe(error)}")
        if form not in outcomes:  # freed once the exception (and the tensors its frames hold) is gone
            free_memory(device)
    if len(outcomes) == 2:
        plain, chunked = outcomes["plain"], outcomes["chunked"]
        result.update(
            agreement(chunked, plain),
            loss={"plain": plain.loss, "chunked": chunked.loss},
            regime_fractions=chunked.fractions,
        )
        result["time_ratio"] = round(result["chunked"]["time_s"] / result["plain"]["time_s"], 4)
        if result["plain"].get("peak_mib"):
            result["memory_ratio"] = round(result["chunked"]["peak_mib"] / result["plain"]["peak_mib"], 4)
    if dtype_name != "fp32" and outcomes:
        result["versus_fp32"] = fp32_reference(objective, x, outcomes, device)
    result["status"] = "error" if errors else "ok"
    result["error"] = "; ".join(errors) or None
    return result


def fp32_reference(objective, x: dict, outcomes: dict[str, Outcome], device: str) -> dict:
    """Each form's disagreement with the fp32 plain form on the inputs upcast (which form rounds more)."""
    import torch

    for outcome in outcomes.values():  # off the device meanwhile, for room
        outcome.grad_hidden, outcome.grad_weight = outcome.grad_hidden.cpu(), outcome.grad_weight.cpu()
    upcast = {key: cast(value, torch.float32, key in ("student_hidden", "student_weight")) for key, value in x.items()}
    failure = None
    try:
        out = run_form("plain", objective, upcast, None)
    except Exception as error:  # the reference is extra: its failure is recorded, not raised
        failure = describe(error)
    if failure is not None:  # freed once the exception (and the tensors its frames hold) is gone
        del upcast
        free_memory(device)
        return {"error": failure}
    reference = Outcome(
        float(out.loss.detach()), upcast["student_hidden"].grad.cpu(), upcast["student_weight"].grad.cpu(), {}
    )
    del out, upcast
    free_memory(device)
    return {form: agreement(outcome, reference) for form, outcome in outcomes.items()}


def loss_part(record: dict, save, settings: Settings, device: str, budget: Budget) -> str:
    status = "ok"
    record["measurements"] = {}
    for name, shape in settings.loss_shapes.items():
        for dtype_name in ("fp32", "bf16"):
            key = f"loss/{name}/{dtype_name}"
            if not budget.allows(key):
                record["measurements"][f"{name}/{dtype_name}"] = {"status": "skipped", "reason": budget.dropped[key]}
                continue
            start = time.perf_counter()
            try:
                result = measure_loss(shape, dtype_name, settings, device)
            except Exception as error:  # one measurement's failure leaves the others to run
                result = {"status": "error", "error": describe(error), "traceback": traceback.format_exc()[-3000:]}
            result.update(seconds=round(time.perf_counter() - start, 2), estimate_s=budget.estimates[key])
            budget.done(key)
            free_memory(device)
            record["measurements"][f"{name}/{dtype_name}"] = result
            if result["status"] == "error":
                status = "error"
                record["error"] = "; ".join(filter(None, [record["error"], f"{name}/{dtype_name}: {result['error']}"]))
            log(f"loss {name}/{dtype_name}: {result['status']} in {result['seconds']:.1f} s")
            save()
    return status


# --------------------------------------------------------------------------------------------- gpu tests


def gpu_tests_part(record: dict, settings: Settings, budget: Budget) -> str:
    """`pytest -m gpu tests/test_gpu.py` in a subprocess; counts from its JUnit XML, the tail of its output."""
    timeout = max(10.0, min(settings.test_timeout_s, budget.left()))
    with tempfile.TemporaryDirectory(prefix="dopd-gpu-tests-") as directory:
        junit = os.path.join(directory, "junit.xml")
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            os.path.join("tests", "test_gpu.py"),
        ]
        record.update(command=" ".join(command[1:]), timeout_s=round(timeout))
        try:
            done = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            record["output_tail"] = _text(expired.stdout)[-3000:]
            record["error"] = f"pytest did not finish in {timeout:.0f} s"
            return "error"
        record.update(returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-3000:])
        record.update(junit_counts(junit))
    if done.returncode != 0:
        record["error"] = (
            f"pytest exited {done.returncode}: {record.get('failed', '?')} failed, {record.get('errors', '?')} errors"
        )
        return "error"
    import torch

    if not torch.cuda.is_available():
        record["note"] = "no CUDA here: the gpu tests skip themselves (this run checks that they are collected)"
    return "ok"


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def junit_counts(path: str) -> dict:
    """tests, passed, failed, errors, skipped from pytest's JUnit XML (missing: no counts)."""
    if not os.path.exists(path):
        return {}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = counts.pop("failures")
    return {**counts, "failed": failed, "passed": counts["tests"] - failed - counts["errors"] - counts["skipped"]}


# ------------------------------------------------------------------------------------------------ models


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<unk>"]  # pad 0, end of sequence 1
WORDS = ["user", "assistant", ":", "?", ".", ",", "hint", "answer"] + [str(i) for i in range(10)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant :' }}{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries: special tokens, a few words, then fillers
    `t<i>` (the prompts are made of them), and a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    named = SPECIAL_TOKENS + WORDS
    vocab = {token: i for i, token in enumerate(named)}
    vocab.update({f"t{i}": len(named) + i for i in range(vocab_size - len(named))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def qwen3_config(name: str, vocab_size: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        **dict(zip(QWEN3_FIELDS, QWEN3[name])),
    )


def build_model(name: str, vocab_size: int, device: str, path: str, tokenizer) -> dict:
    """A random-weight Qwen3 of shape `name`, made on `device` in bf16 (no full-size CPU copy on a GPU machine),
    saved with its tokenizer to `path`; its build and save times, parameters and size on disk."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(name, vocab_size), dtype=torch.bfloat16)
    synchronize(device)
    built = time.perf_counter()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    saved = time.perf_counter()
    figures = {
        "shape": name,
        "path": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(next(model.parameters()).device),
        "dtype": "bfloat16",
        "build_s": round(built - start, 2),
        "save_s": round(saved - built, 2),
        "disk_gib": round(sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**30, 3),
    }
    del model
    free_memory(device)
    return figures


def write_prompts(path: str, settings: Settings, count: int = 64) -> str:
    """A JSONL file of prompts and privileged contexts made of filler words (every one a single token)."""
    rng = random.Random(0)
    fillers = settings.vocab - len(SPECIAL_TOKENS) - len(WORDS)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(fillers)}" for _ in range(n))

    with open(path, "w") as handle:
        for _ in range(count):
            row = {
                "prompt": words(settings.prompt_words) + " ?",
                "privileged_context": "hint : " + words(settings.privileged_words),
                "answer": "1",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def models_part(record: dict, save, pair: str, settings: Settings, device: str, work_dir: str) -> str:
    start = time.perf_counter()
    tokenizer = build_tokenizer(settings.vocab)
    record.update(pair=pair, vocab=len(tokenizer), tokenizer_s=round(time.perf_counter() - start, 2))
    for role, name in zip(("student", "teacher"), PAIRS[pair]):
        record[role] = build_model(name, settings.vocab, device, os.path.join(work_dir, role), tokenizer)
        log(
            f"models: {role} {name}: {record[role]['parameters'] / 1e6:,.1f} M parameters, "
            f"built in {record[role]['build_s']} s, saved in {record[role]['save_s']} s"
        )
        save()
    record["data"] = write_prompts(os.path.join(work_dir, "prompts.jsonl"), settings)
    return "ok"


# -------------------------------------------------------------------------------------------------- step


class SharedRollouts:
    """The rollout engine of both trainers: within a repetition the first trainer to step samples (with the
    DOPD trainer's engine, from the DOPD student) and the other steps on the same rollouts. On CUDA the peak
    memory statistics restart after sampling, so a step's peak is that of its scoring and update."""

    def __init__(self, engine, device: str):
        self.engine, self.device = engine, device
        self.rollouts, self.prompt_ids, self.seconds, self.figures = None, None, 0.0, {}

    def new_repetition(self) -> None:
        self.rollouts, self.figures = None, {}

    def generate(self, prompt_ids, num_generations, images=None):
        if self.rollouts is None:
            with peak_memory(self.device, self.figures, "rollout_peak_mib"):
                synchronize(self.device)
                start = time.perf_counter()
                self.rollouts = self.engine.generate(prompt_ids, num_generations)
                synchronize(self.device)
                self.seconds = time.perf_counter() - start
            self.prompt_ids = prompt_ids
            if self.device == "cuda":
                import torch

                torch.cuda.reset_peak_memory_stats()
        elif prompt_ids != self.prompt_ids:
            raise RuntimeError("the two trainers read different prompts; a step comparison needs the same rollouts")
        return self.rollouts

    def sync_weights(self) -> None:
        self.engine.sync_weights()


def one_teacher_load(timings: dict):
    """The trainers share the frozen teacher through the trainer's hook (`dopd.probe`): it is loaded once (timed)
    and the same module goes to the second trainer (it is never written to); students load each time."""
    from dopd.probe import Probe

    class SharedTeacher(Probe):
        def __init__(self):
            self.teachers: dict = {}

        def load_teacher(self, path, config):
            key = (path, config.model.dtype)
            if key not in self.teachers:
                start = time.perf_counter()
                self.teachers[key] = super().load_teacher(path, config)
                timings["teacher_load_s"] = round(time.perf_counter() - start, 2)
            return self.teachers[key]

    return SharedTeacher()


def make_trainer(models: dict, method: str, settings: Settings, work_dir: str, accelerator, probe=None):
    from dopd.config import load_config
    from dopd.train import Trainer

    overrides = [
        f"model.student={models['student']['path']}",
        f"model.teacher={models['teacher']['path']}",
        "model.dtype=bfloat16",
        f"data.path={models['data']}",
        f"objective.method={method}",
        f"logging.output_dir={os.path.join(work_dir, 'run-' + method)}",
        "logging.overwrite=true",
        f"train.prompts_per_step={settings.prompts}",
        f"train.micro_batch_size={settings.micro_batch_size}",
        "train.steps=1000",
        "train.mixed_precision=bf16",
        f"rollout.num_generations={settings.generations}",
        f"rollout.max_new_tokens={settings.max_new_tokens}",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "checkpoint.save_every=0",
    ]
    return Trainer(load_config(overrides=overrides), accelerator=accelerator, probe=probe)


def build_trainers(record: dict, models: dict, settings: Settings, device: str, work_dir: str) -> dict:
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16")
    trainers, record["trainer_build_s"] = {}, {}
    probe = one_teacher_load(record)
    for method in ("dopd", "opd-priv"):
        start = time.perf_counter()
        trainers[method] = make_trainer(models, method, settings, work_dir, accelerator, probe)
        record["trainer_build_s"][method] = round(time.perf_counter() - start, 2)
    shared = SharedRollouts(trainers["dopd"].engine, device)
    for trainer in trainers.values():
        trainer.engine = shared
    if device == "cuda":
        record["allocated_after_build_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return trainers


def step_repetition(trainers: dict, repetition: int, device: str) -> dict:
    """Both methods' `Trainer.step` on the same rollouts, in alternating order; each one's times and peak."""
    shared = next(iter(trainers.values())).engine
    shared.new_repetition()
    order = list(trainers) if repetition % 2 == 0 else list(trainers)[::-1]
    out = {}
    for method in order:
        figures: dict = {}
        with peak_memory(device, figures, "step_peak_mib"):
            result = trainers[method].step(repetition)
        scoring, update = result["time/scoring"], result["time/update"]
        out[method] = {
            "scoring_s": scoring,
            "update_s": update,
            "tokens": result["tokens"],
            "loss": result["loss"],
            **figures,
        }
    for figures in out.values():  # the rollout, sampled once, counts in both steps
        step_s = shared.seconds + figures["scoring_s"] + figures["update_s"]
        figures.update(
            rollout_s=shared.seconds, step_s=step_s, tokens_per_second=figures["tokens"] / step_s, **shared.figures
        )
    return out


def summarize_steps(records: list[dict]) -> dict:
    """Medians over the timed repetitions per method, and DOPD / opd-priv ratios."""
    summary = {}
    for method in records[0]:
        rows = [r[method] for r in records]
        summary[method] = {
            key: round(statistics.median(row[key] for row in rows), 4) for key in rows[0] if key != "loss"
        }
        summary[method]["losses"] = [row["loss"] for row in rows]
    dopd, priv = summary["dopd"], summary["opd-priv"]
    summary["ratios"] = {
        f"{key}_ratio": round(dopd[key] / priv[key], 4)
        for key in ("step_s", "scoring_s", "update_s", "step_peak_mib")
        if priv.get(key)
    }
    return summary


def step_part(record: dict, save, models: dict, settings: Settings, device: str, work_dir: str, budget) -> str:
    trainers = build_trainers(record, models, settings, device, work_dir)
    config = trainers["dopd"].config  # the defaults this run measured, which may change between versions
    record["settings"] = {
        "objective.self_weights": config.objective.self_weights,
        "objective.top_k": config.objective.top_k,
        "train.chunk_size": config.train.chunk_size,
        "optim.max_grad_norm": config.optim.max_grad_norm,
    }
    record.update(
        note=STEP_NOTE,
        pair=models["pair"],
        prompts=settings.prompts,
        generations=settings.generations,
        max_new_tokens=settings.max_new_tokens,
        micro_batch_size=settings.micro_batch_size,
        mixed_precision="bf16",
        student_weights="float32",
        teacher_dtype="bfloat16",
        teacher_shared_between_trainers=True,
        repetitions=[],
    )
    save()
    timed, last = [], 0.0
    for repetition in range(settings.step_repetitions + 1):
        if repetition > 1 and budget.left() < 1.2 * last:
            record["stopped_early"] = f"budget: {budget.left():.0f} s left, a repetition takes {last:.0f} s"
            break
        start = time.perf_counter()
        figures = step_repetition(trainers, repetition, device)
        last = time.perf_counter() - start
        record["repetitions"].append({"warm_up": repetition == 0, "seconds": round(last, 2), **figures})
        if repetition:
            timed.append(figures)
        log(
            f"step repetition {repetition}: "
            + ", ".join(
                f"{m} {f['step_s']:.2f} s (rollout {f['rollout_s']:.2f}, scoring {f['scoring_s']:.2f}, update "
                f"{f['update_s']:.2f})"
                for m, f in figures.items()
            )
        )
        save()
    if not timed:
        record["error"] = "no timed repetition fitted in the budget (only the warm-up ran)"
        return "error"
    record["summary"] = summarize_steps(timed)
    del trainers
    free_memory(device)
    return "ok"


# ------------------------------------------------------------------------------------------------- table


def print_table(report: dict) -> None:
    parts = report["parts"]
    print(
        f"dopd gpu check ({report['mode']}), {report.get('elapsed_s', 0):.0f} s of {report['budget_s']:.0f} s "
        f"budget -> {report['out']}"
    )
    print(f"{'part':<12} {'status':<8} {'seconds':>8}  summary")
    for name in PARTS:
        part = parts.get(name, {"status": "absent", "seconds": 0.0})
        print(f"{name:<12} {part['status']:<8} {part['seconds']:>8.1f}  {part_summary(name, part)}"[:160])
    measurements = parts.get("loss", {}).get("measurements", {})
    if measurements:
        print(
            f"{'loss':<11} {'tokens':>6} {'plain s':>9} {'chunked s':>9} {'plain MiB':>10} {'chunk MiB':>10} "
            f"{'loss rel':>9} {'grad rel':>9}"
        )
        for key, m in measurements.items():
            if m.get("status") == "skipped" or "plain" not in m:
                print(f"{key:<11} {m.get('status')}: {m.get('reason') or m.get('error')}"[:160])
                continue
            cells = [_cell(m, form, field_) for field_ in ("time_s", "peak_mib") for form in ("plain", "chunked")]
            grad = max(m.get("grad_hidden_rel_diff", float("nan")), m.get("grad_weight_rel_diff", float("nan")))
            print(
                f"{key:<11} {m['tokens']:>6} {cells[0]:>9} {cells[1]:>9} {cells[2]:>10} {cells[3]:>10} "
                f"{m.get('loss_rel_diff', float('nan')):>9.1e} {grad:>9.1e}"
            )
    summary = parts.get("step", {}).get("summary")
    if summary:
        print(
            f"{'step':<11} {'rollout s':>9} {'scoring s':>9} {'update s':>9} {'step s':>8} {'tokens/s':>9} "
            f"{'peak MiB':>9}"
        )
        for method in ("dopd", "opd-priv"):
            s = summary[method]
            peak = f"{s['step_peak_mib']:.0f}" if "step_peak_mib" in s else "-"  # CUDA only
            print(
                f"{method:<11} {s['rollout_s']:>9.3f} {s['scoring_s']:>9.3f} {s['update_s']:>9.3f} "
                f"{s['step_s']:>8.3f} {s['tokens_per_second']:>9.0f} {peak:>9}"
            )
        print(f"note: {parts['step'].get('note', STEP_NOTE)}")
    if report.get("pair_choice"):
        print(f"step pair: {report['pair_choice']['pair']} ({report['pair_choice']['why']})"[:200])


def _cell(measurement: dict, form: str, key: str) -> str:
    value = measurement.get(form, {}).get(key)
    return "error" if value is None else f"{value:.4g}"


def part_summary(name: str, part: dict) -> str:
    if part["status"] in ("skipped", "absent"):
        return part.get("reason", "")
    if part.get("error"):
        return part["error"]
    if name == "install":
        return f"installed {', '.join(part['installed'])}" if part.get("installed") else "nothing missing"
    if name == "environment":
        where = f"{part['gpu_name']} ({part['gpu_memory_gib']} GiB)" if part.get("gpu_name") else "CPU"
        return f"{where}, torch {part['packages']['torch']}, transformers {part['packages']['transformers']}"
    if name == "gpu_tests":
        return f"{part.get('passed', 0)} passed, {part.get('failed', 0)} failed, {part.get('skipped', 0)} skipped"
    if name == "models":
        return f"{part['student']['shape']} student, {part['teacher']['shape']} teacher, vocabulary {part['vocab']}"
    if name == "step" and part.get("summary"):
        ratios = {key: part["summary"]["ratios"].get(f"{key}_ratio", float("nan")) for key in ("scoring_s", "update_s")}
        return (
            f"DOPD / opd-priv: scoring {ratios['scoring_s']:.3f}, update {ratios['update_s']:.3f} "
            f"(step {part['summary']['ratios'].get('step_s_ratio', float('nan')):.3f}: shapes only, see the note)"
        )
    if name == "loss":
        return f"{len(part.get('measurements', {}))} measurements"
    return ""


# -------------------------------------------------------------------------------------------------- main


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "accelerate", "dopd"):
        logging.getLogger(name).setLevel(logging.ERROR)


def offline_environment() -> None:
    """Nothing may reach for the network (the GPU machine has none: a hub look-up would wait for its timeout)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # bars would bury the log
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measurement_names(settings: Settings, pair: str, skip_tests: bool) -> tuple[list[str], dict[str, str]]:
    """The budgeted measurements in running order, and the fallback of the step (paper -> quick under auto)."""
    names = [f"loss/{shape}/{dtype}" for shape in settings.loss_shapes for dtype in ("fp32", "bf16")]
    names += [] if skip_tests else ["gpu_tests"]
    names.append(f"step/{pair}")
    return names, {"step/paper": "step/quick"} if pair == "paper" else {}


def run_check(args, report: Report, start: float) -> None:
    settings = TINY if args.tiny else GPU
    importable(SRC)  # dopd from this checkout, installed or not
    report.run("install", lambda record, save: install_part(record, args.wheels, args.site))
    import torch

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: threads only contend on a small shared machine
    report.run("environment", lambda record, save: environment_part(record, device))
    if device == "cuda" and not torch.cuda.is_available():
        for name in PARTS[2:]:
            report.skip(name, "CUDA is not available (use --tiny for the CPU check)")
        raise SystemExit("gpu_check: error: CUDA is not available; run with --tiny for the CPU check")
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    pair, why = ("tiny", "--tiny") if args.tiny else choose_pair(args.pair, memory)
    report.data["pair_choice"] = {"pair": pair, "why": why}
    log(f"step pair: {pair} ({why})")
    names, fallbacks = measurement_names(settings, pair, args.skip_tests)
    budget = Budget(args.budget_s, settings.estimates, start, fallbacks)
    budget.plan(names)
    report.data["budget"] = {
        "estimates_s": settings.estimates,
        "planned": list(budget.pending),
        "dropped": budget.dropped,
    }
    report.run("loss", lambda record, save: loss_part(record, save, settings, device, budget))
    if args.skip_tests:
        report.skip("gpu_tests", "--skip-tests")
    elif budget.allows("gpu_tests"):
        work = lambda record, save: gpu_tests_part(record, settings, budget)
        report.run("gpu_tests", work, budget.estimates["gpu_tests"])
        budget.done("gpu_tests")
    else:
        report.skip("gpu_tests", budget.dropped["gpu_tests"])
    run_models_and_step(args, report, settings, device, budget)


def out_of_memory(part: dict) -> bool:
    """Whether a part failed for want of GPU memory (torch's OutOfMemoryError, CUDA's own message)."""
    error = part.get("error") or ""
    return part.get("status") == "error" and ("OutOfMemoryError" in error or "out of memory" in error.lower())


def run_models_and_step(args, report: Report, settings: Settings, device: str, budget: Budget) -> None:
    budget.plan(budget.pending)  # with the time left now; a dropped paper step may give way to the quick one
    step = next((name for name in budget.pending if name.startswith("step/")), None)
    if step is None:
        reason = next((r for n, r in budget.dropped.items() if n.startswith("step/")), "budget")
        report.skip("models", f"the step does not run ({reason})")
        report.skip("step", reason)
        return
    pair = step.split("/")[1]
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="dopd-gpu-check-")
    os.makedirs(work_dir, exist_ok=True)
    try:
        models = report.run("models", lambda r, save: models_part(r, save, pair, settings, device, work_dir))
        if models["status"] != "ok":
            report.skip("step", "the models part failed")
            return
        work = lambda r, save: step_part(r, save, models, settings, device, work_dir, budget)
        part = report.run("step", work, budget.estimates[step])  # the models' time counts in the step's estimate
        budget.done(step)
        fits = budget.left() >= budget.estimates.get("step/quick", float("inf"))
        if out_of_memory(part) and pair == "paper" and args.pair == "auto" and fits:
            paper_error = part["error"]
            log("the paper pair ran out of memory; the step runs again with the quick pair")
            free_memory(device)
            models = report.run("models", lambda r, save: models_part(r, save, "quick", settings, device, work_dir))
            if models["status"] == "ok":
                part = report.run("step", work, budget.estimates["step/quick"])
            else:
                report.skip("step", "the models part failed")
            report.data["pair_choice"] = {
                "pair": "quick",
                "why": f"auto: the paper pair ran out of memory ({paper_error})",
            }
            report.write()
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_wheels:
        print("\n".join(f"{name}=={version}" for name, version in WHEELS.items()))
        return 0
    start = time.perf_counter()
    report = Report(
        args.out,
        {
            "check": "dopd gpu_check",
            "mode": "tiny" if args.tiny else "gpu",
            "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget_s": args.budget_s,
            "out": args.out,
        },
    )
    offline_environment()
    quiet_libraries()
    try:
        run_check(args, report, start)
    finally:
        report.data.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), elapsed_s=round(time.perf_counter() - start, 1)
        )
        report.write()
        print_table(report.data)
    failed = [name for name, part in report.data["parts"].items() if part["status"] == "error"]
    if failed:
        log(f"parts with errors: {', '.join(failed)} (see {args.out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
