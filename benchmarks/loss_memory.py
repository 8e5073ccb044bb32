"""Working memory and time of the DOPD loss, forward and backward, plain form against chunked form (design,
"kernels/").

At Qwen3 scale (vocabulary 151,936, student hidden 1,024 as in Qwen3-0.6B, teacher hidden 2,048 as in
Qwen3-1.7B, 1,024 completion tokens, fp32 on the CPU) the plain form projects the three passes to full logits
and calls `objectives.compute_objective`; the chunked form calls `kernels.chunked.chunked_objective` with the
hidden states and heads. The privileged student shares the student's head, with its own hidden states. Each form
runs in its own process, `--repeats` times, alternating the order (plain, chunked, chunked, plain, ...) so that
load from other jobs on a shared machine hits both alike.

Working memory, the figure the target is judged on: the peak resident memory (`ru_maxrss`) minus the resident
memory once the inputs exist (the heads alone weigh gigabytes whichever form runs); it is what a CPU user sees,
freed-but-kept heap included. `--tensor-memory` adds torch's own count of live tensor bytes (peak minus the bytes
alive before the loss, from the profiler's allocation events) in a second, untimed pass.

    python benchmarks/loss_memory.py            # both forms, 3 repeats, one JSON line (about 12 minutes, 9 GB)
    python benchmarks/loss_memory.py --small    # smoke test, seconds
    python benchmarks/loss_memory.py --form chunked --chunk-size 64   # one form, in this process

Targets (the issue): chunked / plain working memory at most 1/8, time at most 1.2 (medians over the repeats).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

MEMORY_RATIO_TARGET = 1 / 8
TIME_RATIO_TARGET = 1.2
FULL = {"tokens": 1024, "vocab": 151_936, "student_hidden": 1024, "teacher_hidden": 2048}
SMALL = {"tokens": 256, "vocab": 8192, "student_hidden": 128, "teacher_hidden": 256}
MB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--form",
        choices=("plain", "chunked"),
        help="run one form in this process (the parent runs each form in a subprocess with this flag)",
    )
    parser.add_argument("--tokens", type=int, help=f"completion tokens (default {FULL['tokens']})")
    parser.add_argument("--sequences", type=int, default=4, help="sequences the tokens are split into (no padding)")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size (default {FULL['vocab']})")
    parser.add_argument("--student-hidden", type=int, help=f"student hidden size (default {FULL['student_hidden']})")
    parser.add_argument("--teacher-hidden", type=int, help=f"teacher hidden size (default {FULL['teacher_hidden']})")
    parser.add_argument("--chunk-size", type=int, help="tokens per chunk of the chunked form (default: the kernel's)")
    parser.add_argument("--threads", type=int, help="torch threads in both forms (default: torch's default)")
    parser.add_argument("--logit-std", type=float, default=3.0, help="spread of the student's logits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help=f"quick smoke test: {SMALL} unless given")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each form, in alternating order")
    parser.add_argument(
        "--tensor-memory",
        action="store_true",
        help="also count live tensor bytes (torch's profiler), in a second untimed pass of each form",
    )
    args = parser.parse_args(argv)
    defaults = SMALL if args.small else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens % args.sequences:
        parser.error(f"--tokens {args.tokens} must be a multiple of --sequences {args.sequences}")
    return args


# --------------------------------------------------------------------------------------------- the child


def resident_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that the baseline counts only live tensors."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def make_inputs(args, generator):
    """Student, privileged student and teacher hidden states and heads, sampled completion ids and the mask.

    Logits have a spread of about `--logit-std`. The privileged student and the teacher read the same privileged
    signal on top of the student's hidden state, each with its own noise; the teacher's head extends the
    student's with extra dimensions, so its logits are the student-like logits plus an independent part. Every
    tensor is written in place (no lazy or transient full-size tensors), so the peak before the loss is the inputs.
    """
    import torch

    B, T = args.sequences, args.tokens // args.sequences
    V, Hs, Ht = args.vocab, args.student_hidden, args.teacher_hidden
    std = args.logit_std

    def unit(*tensors_and_weights):
        total = sum(w * t for t, w in tensors_and_weights)
        return total / math.sqrt(sum(w * w for _, w in tensors_and_weights))

    student_weight = torch.empty(V, Hs).normal_(0.0, std / math.sqrt(Hs), generator=generator)
    student_hidden = torch.randn(B, T, Hs, generator=generator)
    privileged = torch.randn(B, T, Hs, generator=generator)
    self_hidden = unit((student_hidden, 1.0), (privileged, 0.6), (torch.randn(B, T, Hs, generator=generator), 0.4))
    teacher_view = unit((student_hidden, 1.0), (privileged, 0.6), (torch.randn(B, T, Hs, generator=generator), 0.4))

    # Teacher logits = 0.9 · (student-like logits) + 0.44 · (an independent part) when Ht > Hs.
    shared = min(Hs, Ht)
    teacher_weight = torch.empty(V, Ht)
    teacher_weight[:, :shared].copy_(student_weight[:, :shared]).mul_(math.sqrt(Hs / shared))
    teacher_hidden = torch.empty(B, T, Ht)
    if Ht > Hs:
        teacher_weight[:, Hs:].normal_(0.0, std / math.sqrt(Ht - Hs), generator=generator)
        teacher_hidden[..., :Hs] = 0.9 * teacher_view
        teacher_hidden[..., Hs:] = math.sqrt(1 - 0.9**2) * torch.randn(B, T, Ht - Hs, generator=generator)
    else:
        teacher_hidden.copy_(teacher_view[..., :Ht])

    # On-policy completion: ids sampled from the student, a few rows at a time (no full-logit transient).
    ids = torch.empty(B * T, dtype=torch.long)
    flat = student_hidden.reshape(B * T, Hs)
    rows = 16
    for start in range(0, B * T, rows):
        probs = torch.softmax(flat[start : start + rows] @ student_weight.T, -1)
        ids[start : start + rows] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    completion_ids = ids.reshape(B, T)
    mask = torch.ones(B, T, dtype=torch.long)

    with torch.no_grad():  # spread of each pass's logits, on a few rows
        logit_std = {
            name: float((h.reshape(B * T, -1)[:rows] @ w.T).std())
            for name, h, w in (
                ("student", student_hidden, student_weight),
                ("self", self_hidden, student_weight),
                ("teacher", teacher_hidden, teacher_weight),
            )
        }
    student_hidden.requires_grad_()
    student_weight.requires_grad_()
    return {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "self_hidden": self_hidden,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "completion_ids": completion_ids,
        "mask": mask,
    }, logit_std


def run_form(form: str, objective, inputs: dict, chunk_size: int | None):
    """Forward and backward of one form; returns the objective's output (gradients land in `.grad`)."""
    import torch

    from dopd.kernels import Head, chunked_objective
    from dopd.plain import compute_objective

    x = inputs
    if form == "plain":
        student_logits = x["student_hidden"] @ x["student_weight"].T
        with torch.no_grad():
            self_logits = x["self_hidden"] @ x["student_weight"].T
            teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].T
        out = compute_objective(
            objective,
            student_logits,
            x["completion_ids"],
            x["mask"],
            self_logits_BTV=self_logits,
            teacher_logits_BTV=teacher_logits,
        )
    else:
        out = chunked_objective(
            objective,
            Head(x["student_hidden"], x["student_weight"]),
            x["completion_ids"],
            x["mask"],
            self_head=Head(x["self_hidden"], x["student_weight"]),
            teacher_head=Head(x["teacher_hidden"], x["teacher_weight"]),
            chunk_size=chunk_size,
        )
    out.loss.backward()
    return out


def warm_up(form: str, objective) -> None:
    """The form once on a tiny problem (loads kernels, starts the thread pool) far below the inputs' size."""
    import torch

    tiny = argparse.Namespace(tokens=64, sequences=2, vocab=1024, student_hidden=32, teacher_hidden=64, logit_std=3.0)
    inputs, _ = make_inputs(tiny, torch.Generator().manual_seed(1))
    run_form(form, objective, inputs, chunk_size=16)


def live_tensor_peak_mb(run) -> float:
    """Peak of live tensor bytes during `run()` above those alive before it, from the profiler's allocation
    events: each op's own net allocation at its start, and the frees that happen outside ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / MB


def gradient_checks(out, inputs) -> dict:
    """The loss and the student's gradients along fixed directions, to compare the two forms."""
    import torch

    with torch.no_grad():
        grad_h, grad_w = inputs["student_hidden"].grad, inputs["student_weight"].grad
        random = torch.randn(grad_h.numel(), generator=torch.Generator().manual_seed(2))
        return {
            "loss": float(out.loss),
            "grad_hidden_norm": float(grad_h.norm()),
            "grad_weight_norm": float(grad_w.norm()),
            "grad_hidden_dot_random": float(torch.dot(grad_h.flatten(), random)),
            "grad_weight_dot_weight": float(torch.dot(grad_w.flatten(), inputs["student_weight"].flatten())),
        }


def child(args) -> dict:
    import torch

    from dopd.kernels import default_chunk_size
    from dopd.objectives import build_objective

    if args.threads:
        torch.set_num_threads(args.threads)
    objective = build_objective("dopd")
    warm_up(args.form, objective)
    release_memory()

    inputs, logit_std = make_inputs(args, torch.Generator().manual_seed(args.seed))
    release_memory()
    baseline = resident_mb()
    peak_before = peak_mb()
    load_before = os.getloadavg()[0]

    start, cpu_start = time.perf_counter(), time.process_time()
    out = run_form(args.form, objective, inputs, args.chunk_size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_mb()
    load_after = os.getloadavg()[0]
    checks = gradient_checks(out, inputs)
    metrics = out.metrics
    result = {
        "form": args.form,
        "working_memory_mb": round(peak - baseline, 1),
        "time_s": round(seconds, 3),
        "cpu_s": round(cpu_seconds, 3),
        "load_1min": [round(load_before, 2), round(load_after, 2)],
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_before_loss_mb": round(peak_before, 1),
        "threads": torch.get_num_threads(),
        "chunk_size": (args.chunk_size or default_chunk_size(args.vocab)) if args.form == "chunked" else None,
        "regime_fractions": {k.split("/")[1]: round(float(v), 4) for k, v in metrics.items() if k.startswith("frac/")},
        "logit_std": {k: round(v, 2) for k, v in logit_std.items()},
        "entropy": {k.split("/")[1]: round(float(v), 3) for k, v in metrics.items() if k.startswith("entropy/")},
        **checks,
    }
    if args.tensor_memory:  # after the timed pass, on the same inputs
        del out
        inputs["student_hidden"].grad = inputs["student_weight"].grad = None
        release_memory()
        result["live_tensor_mb"] = round(
            live_tensor_peak_mb(lambda: run_form(args.form, objective, inputs, args.chunk_size)), 1
        )
    return result


# -------------------------------------------------------------------------------------------- the parent


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def run_child(form: str, passed: list[str], threads: int) -> dict:
    command = [sys.executable, __file__, *passed, "--form", form, "--threads", str(threads)]
    print(f"[loss_memory] {form}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    wall = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(f"[loss_memory] {form}: {result}", file=sys.stderr, flush=True)
    return result


def parent(args, argv: list[str]) -> dict:
    import torch

    threads = args.threads or torch.get_num_threads()  # resolved once so that both children use the same count
    passed = list(argv)
    for flag in ("--threads", "--repeats"):  # the children get the resolved thread count and run once each
        if flag in passed:
            i = passed.index(flag)
            del passed[i : i + 2]
        passed = [a for a in passed if not a.startswith(flag + "=")]
    runs = {"plain": [], "chunked": []}
    for repeat in range(args.repeats):  # one after the other (they would compete), order alternating
        for form in ("plain", "chunked") if repeat % 2 == 0 else ("chunked", "plain"):
            runs[form].append(run_child(form, passed, threads))

    def median(form: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[form])

    time_ratios = [c["time_s"] / p["time_s"] for p, c in zip(runs["plain"], runs["chunked"])]
    memory_ratio = median("chunked", "working_memory_mb") / median("plain", "working_memory_mb")
    time_ratio = statistics.median(time_ratios)
    plain, chunked = runs["plain"][0], runs["chunked"][0]
    result = {
        "config": {
            k: getattr(args, k)
            for k in (
                "tokens",
                "sequences",
                "vocab",
                "student_hidden",
                "teacher_hidden",
                "logit_std",
                "seed",
                "repeats",
            )
        }
        | {"threads": threads},
        "memory_ratio": round(memory_ratio, 4),
        "time_ratio": round(time_ratio, 4),
        "time_ratios": [round(r, 4) for r in time_ratios],
        "cpu_time_ratio": round(median("chunked", "cpu_s") / median("plain", "cpu_s"), 4),
        "plain_memory_mb": median("plain", "working_memory_mb"),
        "chunked_memory_mb": median("chunked", "working_memory_mb"),
        "plain_time_s": median("plain", "time_s"),
        "chunked_time_s": median("chunked", "time_s"),
        "load_1min": {form: [run["load_1min"] for run in runs[form]] for form in runs},
        "loss_rel_diff": rel_diff(plain["loss"], chunked["loss"]),
        "grad_rel_diff": max(
            rel_diff(plain[k], chunked[k])
            for k in ("grad_hidden_norm", "grad_weight_norm", "grad_hidden_dot_random", "grad_weight_dot_weight")
        ),
        "chunk_size": chunked["chunk_size"],
        "targets_met": {
            "memory_ratio": memory_ratio <= MEMORY_RATIO_TARGET,
            "time_ratio": time_ratio <= TIME_RATIO_TARGET,
        },
        "runs": runs,
    }
    if args.tensor_memory:
        plain_live, chunked_live = median("plain", "live_tensor_mb"), median("chunked", "live_tensor_mb")
        result.update(
            plain_live_tensor_mb=plain_live,
            chunked_live_tensor_mb=chunked_live,
            live_tensor_ratio=round(chunked_live / plain_live, 4),
        )
    return result


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = child(args) if args.form else parent(args, argv)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
