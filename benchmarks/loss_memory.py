"""Working memory and time of the DOPD loss, forward and backward, plain form against chunked form (design,
"kernels/").

At Qwen3 scale (vocabulary 151,936, student hidden 1,024 as in Qwen3-0.6B, teacher hidden 2,048 as in
Qwen3-1.7B, 1,024 completion tokens, fp32 on the CPU) the plain form projects the three passes to full logits
and calls `objectives.compute_objective`; the chunked form calls `kernels.chunked.chunked_objective` with the
hidden states and heads. The privileged student shares the student's head, with its own hidden states. Each form
runs in its own process; the figure is the loss's working memory, the peak resident memory (`ru_maxrss`) minus
the resident memory once the inputs exist (the heads alone weigh gigabytes whichever form runs).

    python benchmarks/loss_memory.py            # both forms, one JSON line (about two minutes, 7 GB)
    python benchmarks/loss_memory.py --small    # smoke test, seconds
    python benchmarks/loss_memory.py --form chunked --chunk-size 64   # one form, in this process

Targets (the issue): chunked / plain working memory at most 1/8, time at most 1.2.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import resource
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
    parser.add_argument("--form", choices=("plain", "chunked"), help="run one form in this process (the parent "
                        "runs each form in a subprocess with this flag)")
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

    from dopd.kernels.chunked import Head, chunked_objective
    from dopd.objectives import compute_objective

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

    tiny = argparse.Namespace(tokens=64, sequences=2, vocab=1024, student_hidden=32, teacher_hidden=64,
                              logit_std=3.0)
    inputs, _ = make_inputs(tiny, torch.Generator().manual_seed(1))
    run_form(form, objective, inputs, chunk_size=16)


def child(args) -> dict:
    import torch

    from dopd.kernels.chunked import default_chunk_size
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

    start = time.perf_counter()
    out = run_form(args.form, objective, inputs, args.chunk_size)
    seconds = time.perf_counter() - start
    peak = peak_mb()

    # Checks, after the measurement: the loss and the gradients along fixed directions.
    with torch.no_grad():
        grad_h, grad_w = inputs["student_hidden"].grad, inputs["student_weight"].grad
        checks = {
            "loss": float(out.loss),
            "grad_hidden_norm": float(grad_h.norm()),
            "grad_weight_norm": float(grad_w.norm()),
            "grad_hidden_dot_random": float(
                torch.dot(grad_h.flatten(), torch.randn(grad_h.numel(), generator=torch.Generator().manual_seed(2)))
            ),
            "grad_weight_dot_weight": float(torch.dot(grad_w.flatten(), inputs["student_weight"].flatten())),
        }
    metrics = out.metrics
    return {
        "form": args.form,
        "working_memory_mb": round(peak - baseline, 1),
        "time_s": round(seconds, 3),
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


# -------------------------------------------------------------------------------------------- the parent


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def parent(args, argv: list[str]) -> dict:
    import torch

    threads = args.threads or torch.get_num_threads()  # resolved once so that both children use the same count
    passed = list(argv)
    if "--threads" in passed:  # the children get the resolved count below
        i = passed.index("--threads")
        del passed[i : i + 2]
    passed = [a for a in passed if not a.startswith("--threads=")]
    results = {}
    for form in ("plain", "chunked"):  # one after the other: they would compete for cores and memory
        command = [sys.executable, __file__, *passed, "--form", form, "--threads", str(threads)]
        print(f"[loss_memory] {form}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        wall = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        results[form] = json.loads(done.stdout.strip().splitlines()[-1])
        results[form]["wall_s"] = round(time.perf_counter() - wall, 1)
        print(f"[loss_memory] {form}: {results[form]}", file=sys.stderr, flush=True)
    plain, chunked = results["plain"], results["chunked"]
    memory_ratio = chunked["working_memory_mb"] / plain["working_memory_mb"]
    time_ratio = chunked["time_s"] / plain["time_s"]
    return {
        "config": {k: getattr(args, k) for k in ("tokens", "sequences", "vocab", "student_hidden", "teacher_hidden",
                                                  "logit_std", "seed")} | {"threads": threads},
        "plain": plain,
        "chunked": chunked,
        "memory_ratio": round(memory_ratio, 4),
        "time_ratio": round(time_ratio, 4),
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
    }


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = child(args) if args.form else parent(args, argv)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
