"""Step overhead of DOPD against privileged vanilla OPD (`opd-priv`) on the same rollouts (the issue: the paper's
cost is one extra student forward per step).

Tiny Qwen3 models are built on the spot into a temporary directory with `tests/tiny.py` (a word-level tokenizer
enlarged with filler words, so that the output head and the loss weigh a realistic share): a student (2 layers ×
64 hidden by default) and a teacher (4 layers × 128) whose forward costs about four times the student's; the
measured ratio is reported. Two `Trainer`s are built from configs that differ only in `objective.method` and the
output directory; they load the same student weights.

Each repetition samples the rollouts once, with the DOPD trainer's engine, and hands the same `Rollouts` to both
methods, interleaved (the order alternates between repetitions so that load on the shared machine hits both
alike). For each method it times `score` + `batch_cuts` + `update` (scoring passes, routing thresholds,
student pass with gradient, loss and backward): that is the "update" time. The optimizer is never stepped (weights
stay fixed, so every repetition sees the same model; gradients are reset with `zero_grad(set_to_none=True)`
outside the timed region); clipping and AdamW would cost the same for both methods anyway. A whole step is the
rollout time plus the method's update time.

    python benchmarks/step_overhead.py                  # default: 16 prompts × 4 rollouts, 32 new tokens, 5 reps
    python benchmarks/step_overhead.py --repetitions 9 --threads 2

Prints one JSON line on stdout (medians over the repetitions after one warm-up); progress goes to stderr.
Targets (the issue): step_ratio ≤ 1.15, update_ratio ≤ 1.3 (DOPD / opd-priv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

from dopd.probe import Probe

STEP_RATIO_TARGET = 1.15
UPDATE_RATIO_TARGET = 1.3
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5, help="timed repetitions after one warm-up")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest completion")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="sequences per scoring/update pass")
    parser.add_argument("--top-k", type=int, default=16, help="objective.top_k")
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size (tiny words plus filler words)")
    parser.add_argument("--student", default="2x64", help="student LAYERSxHIDDEN")
    parser.add_argument("--teacher", default="4x128", help="teacher LAYERSxHIDDEN")
    parser.add_argument("--loss-form", choices=("chunked", "plain"), default="chunked", help="train.loss_form")
    parser.add_argument("--chunk-size", type=int, default=None, help="train.chunk_size (default: automatic)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine more "
        "threads spin-wait on each other and the timings explode; 0: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shape(text: str) -> tuple[int, int]:
    layers, hidden = text.lower().split("x")
    return int(layers), int(hidden)


# ---------------------------------------------------------------------------------------------- building


def build_inputs(directory: str, args) -> dict:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import tiny

    base = len(tiny.SPECIAL) + len(tiny.WORDS) + 2
    extra = [f"w{i}" for i in range(max(0, args.vocab - base))]
    tokenizer = tiny.build_tokenizer(extra_words=extra)
    paths = {}
    for name, spec, seed in (("student", args.student, 0), ("teacher", args.teacher, 1)):
        layers, hidden = shape(spec)
        model = tiny.build_model(len(tokenizer), hidden=hidden, layers=layers, seed=seed)
        paths[name] = os.path.join(directory, name)
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        paths[f"{name}_params"] = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    paths["data"] = tiny.write_prompts(os.path.join(directory, "prompts.jsonl"), count=max(64, args.prompts))
    paths["vocab"] = len(tokenizer)
    return paths


def make_trainer(paths: dict, directory: str, method: str, args, accelerator, probe=None):
    from dopd.config import load_config
    from dopd.train import Trainer

    overrides = [
        f"model.student={paths['student']}",
        f"model.teacher={paths['teacher']}",
        f"data.path={paths['data']}",
        f"logging.output_dir={os.path.join(directory, 'run-' + method)}",
        f"objective.method={method}",
        f"objective.top_k={args.top_k}",
        f"train.prompts_per_step={args.prompts}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.seed={args.seed}",
        "train.steps=1000",
        "train.device=cpu",
        f"rollout.num_generations={args.generations}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "logging.progress_bar=false",
        "logging.sample_every=0",
        "checkpoint.save_every=0",
        f"train.loss_form={args.loss_form}",
    ]
    if args.chunk_size is not None:
        overrides.append(f"train.chunk_size={args.chunk_size}")
    return Trainer(load_config(overrides=overrides), accelerator=accelerator, probe=probe)


# ------------------------------------------------------------------------------------------------ timing


class Probes(Probe):
    """Wall-clock totals of the pieces of `score` and `update` through the trainer's timing hook (`dopd.probe`;
    a `perf_counter` call at each end of a piece, the same for both methods)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def run_method(trainer, prompts, rollouts, step: int, probes: Probes) -> dict[str, float]:
    from dopd.train import StepMetrics

    trainer.optimizer.zero_grad(set_to_none=True)
    probes.take()
    cpu_start = time.process_time()
    start = time.perf_counter()
    batches = trainer.score(prompts, rollouts)
    scored = time.perf_counter()
    cuts = trainer.batch_cuts(batches)
    routed = time.perf_counter()
    trainer.update(batches, cuts, step, StepMetrics())
    done = time.perf_counter()
    cpu = time.process_time() - cpu_start
    out = {
        "score": scored - start,
        "thresholds": routed - scored,
        "update_only": done - routed,
        "update": done - start,
        "update_cpu": cpu,
    }
    out.update(probes.take())
    # what `update` spends outside the student pass and the loss: backward through the student, mostly
    out["backward"] = out["update_only"] - out.get("student_pass", 0.0) - out.get("loss", 0.0)
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


@contextmanager
def quiet():
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.getLogger("transformers").level
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("transformers").setLevel(previous)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = ("dopd", "opd-priv")
    with tempfile.TemporaryDirectory(prefix="dopd-step-overhead-") as directory, quiet():
        paths = build_inputs(directory, args)
        accelerator = Accelerator(cpu=True)
        probes = Probes()
        trainers = {m: make_trainer(paths, directory, m, args, accelerator, probes) for m in methods}
        dopd = trainers["dopd"]
        log(
            f"vocab {paths['vocab']}, student {args.student}, teacher {args.teacher}, {args.prompts} prompts × "
            f"{args.generations} rollouts, {args.max_new_tokens} new tokens, threads {torch.get_num_threads()}"
        )

        records = {m: [] for m in methods}
        rollout_times, rollout_cpus, token_counts = [], [], []
        for repetition in range(args.repetitions + 1):
            warm_up = repetition == 0
            prompts = dopd.local_prompts()
            cpu_start, start = time.process_time(), time.perf_counter()
            rollouts = dopd.engine.generate(
                [dopd.prompts.student_ids[p] for p in prompts], dopd.config.rollout.num_generations
            )
            rollout_s, rollout_cpu = time.perf_counter() - start, time.process_time() - cpu_start
            order = methods if repetition % 2 == 0 else methods[::-1]
            timed = {m: run_method(trainers[m], prompts, rollouts, repetition, probes) for m in order}
            tokens = sum(len(c) for c in rollouts.completion_ids)
            log(
                f"{'warm-up' if warm_up else f'rep {repetition}'}: rollout {rollout_s:.3f}s, {tokens} tokens, "
                + ", ".join(f"{m} update {timed[m]['update']:.3f}s (cpu {timed[m]['update_cpu']:.3f}s)" for m in order)
            )
            if warm_up:
                continue
            rollout_times.append(rollout_s)
            rollout_cpus.append(rollout_cpu)
            token_counts.append(tokens)
            for m in methods:
                records[m].append(timed[m])

    def median(method: str, key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in records[method])

    rollout_s = statistics.median(rollout_times)
    update = {m: median(m, "update") for m in methods}
    step_ratios = [
        (rollout_times[i] + records["dopd"][i]["update"]) / (rollout_times[i] + records["opd-priv"][i]["update"])
        for i in range(args.repetitions)
    ]
    update_ratios = [records["dopd"][i]["update"] / records["opd-priv"][i]["update"] for i in range(args.repetitions)]
    forward_ratios = [r["teacher_pass"] / r["self_pass"] for r in records["dopd"]]
    keys = (
        "self_pass",
        "self_score_target",
        "teacher_pass",
        "teacher_score_target",
        "thresholds",
        "student_pass",
        "loss",
        "backward",
    )
    result = {
        "step_ratio": round((rollout_s + update["dopd"]) / (rollout_s + update["opd-priv"]), 4),
        "update_ratio": round(update["dopd"] / update["opd-priv"], 4),
        "step_ratio_per_rep_median": round(statistics.median(step_ratios), 4),
        "update_ratio_per_rep_median": round(statistics.median(update_ratios), 4),
        "cpu_step_ratio": round(
            (statistics.median(rollout_cpus) + median("dopd", "update_cpu"))
            / (statistics.median(rollout_cpus) + median("opd-priv", "update_cpu")),
            4,
        ),
        "cpu_update_ratio": round(median("dopd", "update_cpu") / median("opd-priv", "update_cpu"), 4),
        "dopd_update_s": round(update["dopd"], 4),
        "opd_priv_update_s": round(update["opd-priv"], 4),
        "rollout_s": round(rollout_s, 4),
        "dopd_step_s": round(rollout_s + update["dopd"], 4),
        "opd_priv_step_s": round(rollout_s + update["opd-priv"], 4),
        "teacher_student_forward_ratio": round(statistics.median(forward_ratios), 3),
        "teacher_student_param_ratio": round(paths["teacher_params"] / paths["student_params"], 2),
        "breakdown_s": {
            m: {k: round(median(m, k), 4) for k in keys if any(k in r for r in records[m])} for m in methods
        },
        "repetitions": args.repetitions,
        "completion_tokens": int(statistics.median(token_counts)),
        "sequences": args.prompts * args.generations,
        "max_new_tokens": args.max_new_tokens,
        "micro_batch_size": args.micro_batch_size,
        "top_k": args.top_k,
        "vocab": paths["vocab"],
        "student": args.student,
        "teacher": args.teacher,
        "loss_form": args.loss_form,
        "chunk_size": args.chunk_size,
        "threads": torch.get_num_threads(),
        "optimizer_step": False,
        "targets": {"step_ratio": STEP_RATIO_TARGET, "update_ratio": UPDATE_RATIO_TARGET},
    }
    result["targets_met"] = result["step_ratio"] <= STEP_RATIO_TARGET and result["update_ratio"] <= UPDATE_RATIO_TARGET
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
