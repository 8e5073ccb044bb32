"""`dopd lab`: every method distils the same tiny student from the same tiny teacher with the same budget, and the
lab reports which one closes the gap, on which part of the problems (the paper's comparison, in minutes on a CPU).

The lab is an instrument, built from the properties it must have:

- a pair that shows the effect: a teacher well above the student without privileged input, and privileged input
  that both read (checked before anything runs; a pair that fails stops the lab unless `--allow-weak-pair`);
- a budget that moves the student, shown before methods are compared: every run includes two references,
  `sft` (supervised fine-tuning on the plain teacher's samples) and `opd` (vanilla OPD), with the same budget,
  seeds and prompts as the methods; the results say whether they recover the required share of the gap;
- held-out prompts: validation and test prompts are never shown in the pair's pretraining nor in any method's
  training rows (`tasks.prompt_split` holds problems out by prompt, not by seed);
- skill and information reported apart: accuracy on the test prompts whose prompt determines the answer and on
  those where only the privileged input does;
- no learning-rate confound: every method × rate × seed is run; the main table compares all methods at the one
  rate that is best on validation over all methods together, a second table at each method's own best rate;
- statistics: mean ± standard error over seeds, enough test prompts for a standard error of the accuracy of at
  most 1.5 points, DOPD against each other method as a paired difference over the same seeds; the same command
  gives the same numbers.

Runs go to `<out>/<kind>/<label>/lr<rate>/seed_<seed>/` (each a `dopd train` run directory), in parallel worker
processes of one thread each. Results: `results.json`, `results.md` and plots (lab/results.py, lab/plots.py);
the settings: `LabConfig` (lab/config.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..routing import REGIMES
from ..run_dir import read_jsonl, write_text_atomic
from .config import TEST_SEED, TRAIN_SEED, VALIDATION_SEED, LabConfig
from .methods import MethodSpec, method_specs
from .models import default_pair_config, load_or_build_pair, pair_config_with, student_origin
from .properties import describe_weakness, properties_hold
from .results import build_results, write_results
from .tasks import LAB_PRIVILEGED_TEMPLATE, PRIVILEGED_KINDS, Task, get_task, with_undetermined_share


def check_lab_config(config: LabConfig) -> list[MethodSpec]:
    """Every option that can be checked before any work, each failure one line naming the option."""
    lab_task(config)
    for kind in config.privilege:
        if kind not in PRIVILEGED_KINDS or kind == "none":
            raise ValueError(f"--privilege {kind!r} is unknown; use one or more of answer, hints, solution")
    if not config.privilege:
        raise ValueError("--privilege needs at least one kind: hints, solution or answer")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds) or min(config.seeds) < 0:
        raise ValueError(f"--seeds {config.seeds}: give distinct non-negative integers, e.g. 0,1,2")
    if not config.lr_grid or min(config.lr_grid) <= 0 or len(set(config.lr_grid)) != len(config.lr_grid):
        raise ValueError(f"--lr-grid {config.lr_grid}: give distinct positive rates, e.g. 1e-4,3e-4")
    for key in (
        "steps",
        "prompts_per_step",
        "num_generations",
        "n_train",
        "n_validation",
        "n_test",
        "top_k",
        "threads",
        "workers",
        "eval_every",
    ):
        if getattr(config, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} = {getattr(config, key)} must be at least 1")
    if config.attribution_prompts < 0:
        raise ValueError(f"--attribution-prompts = {config.attribution_prompts} must be 0 (off) or more")
    if not 0 <= config.warmup_steps <= config.steps:
        raise ValueError(f"--warmup-steps = {config.warmup_steps} must be between 0 and --steps = {config.steps}")
    if not config.out:
        raise ValueError("--out is required: the lab's output directory")
    if os.path.exists(os.path.join(config.out, "results.json")):
        raise ValueError(f"--out {config.out} already holds a lab's results; choose another directory")
    if config.teacher_per_task and len(task_parts(config)) < 2:
        raise ValueError(
            f"--teacher-per-task needs a mixture task (e.g. --task order+arith); --task {config.task} has one teacher"
        )
    pair_config_with(default_pair_config(pair_task(config)), config.pair)
    return method_specs(config)


def task_parts(config: LabConfig) -> list[str]:
    """The tasks of `--task` as given: one, or a mixture's (`order+arith`, read by `tasks.get_task`)."""
    return config.task.split("+")


def pair_task(config: LabConfig) -> str:
    """The task whose pair gives the student and the teacher: `--task`, or a mixture's first task."""
    return task_parts(config)[0]


def lab_task(config: LabConfig) -> Task:
    """The task the methods train and are tested on: `--task`, with `--undetermined-share` when it is set."""
    return with_undetermined_share(get_task(config.task), config.undetermined_share)


# -------------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Job:
    """One training run of the grid, with what a worker process needs to do it alone."""

    spec: MethodSpec
    lr: float
    seed: int
    kind: str
    run_dir: str
    pair_path: str
    data_path: str
    max_new_tokens: int
    config: LabConfig
    teachers: tuple[tuple[str, str], ...] = ()  # --teacher-per-task: each source task's name and teacher path


def run_config(job: Job):
    """The `dopd train` config of one run: the lab's budget and schedule, the method with its overrides."""
    from ..config import load_config

    c, pair = job.config, Path(job.pair_path)
    task = lab_task(c)
    overrides = dict(job.spec.overrides)
    if overrides.get("reward") == "lab":  # dopd[reward=lab]: the lab task's own checker
        overrides["reward"] = f"lab:{c.task}"
    return load_config(
        model={
            "student": str(pair / "student"),
            **({"teachers": dict(job.teachers)} if job.teachers else {"teacher": str(pair / "teacher")}),
        },
        data={
            "path": job.data_path,
            **({"teacher_column": "task"} if job.teachers else {}),  # a mixture's rows name their source task
            "teacher_template": LAB_PRIVILEGED_TEMPLATE,
            "self_template": LAB_PRIVILEGED_TEMPLATE,
            "max_prompt_length": 512,
        },
        rollout={"num_generations": c.num_generations, "max_new_tokens": job.max_new_tokens, "temperature": 1.0},
        objective={"method": job.spec.method, "top_k": c.top_k, **overrides},
        optim={"lr": job.lr, "schedule": "cosine", "warmup_steps": c.warmup_steps},
        train={
            "steps": c.steps,
            "prompts_per_step": c.prompts_per_step,
            "seed": job.seed,
            "device": "cpu",
            "micro_batch_size": c.prompts_per_step * c.num_generations,
        },
        logging={
            "output_dir": job.run_dir,
            "overwrite": True,
            "progress_bar": False,
            "sample_every": max(1, c.steps // 4),
            "num_samples": 4,
            "answer_pattern": task.answer_pattern,
        },
        checkpoint={"save_every": 0},
    )


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("dopd").setLevel(logging.ERROR)  # the lab prints one line per run instead


def held_out_sets(task, config: LabConfig) -> tuple[list, list]:
    """The validation and test examples, drawn from their own prompt splits (`tasks.prompt_split`)."""
    return (
        task.examples(config.n_validation, VALIDATION_SEED, "validation"),
        task.examples(config.n_test, TEST_SEED, "test"),
    )


def training_rows(task, config: LabConfig, kind: str) -> list[dict[str, str]]:
    """The methods' training rows (prompts with `kind`'s privileged context), from the training split."""
    return task.rows(config.n_train, TRAIN_SEED, kind, split="train")


def run_job(job: Job) -> dict:
    """Train one run and evaluate it: validation accuracy along the way, validation and test at the end."""
    from ..train import Trainer
    from .attribution import attribute
    from .evaluation import evaluate

    started = time.time()
    c = job.config
    task = lab_task(c)
    validation, test = held_out_sets(task, c)
    final: dict = {}
    attribution: dict = {}
    examples = task.examples(c.n_train, TRAIN_SEED, "train") if c.attribution_prompts else []

    def measure(step: int, trainer) -> dict[str, float]:
        if c.attribution_prompts and step in (0, c.steps):
            attribution["start" if step == 0 else "end"] = attribute(trainer, task, examples, c.attribution_prompts)
        if step == 0:
            return {}  # the student before training is measured once, by the lab
        out = {
            "eval/validation_accuracy": evaluate(trainer.inner, trainer.tokenizer, task, validation)["answer_accuracy"]
        }
        if step == c.steps:
            result = evaluate(trainer.inner, trainer.tokenizer, task, test)
            final.update(
                answer_accuracy=result["answer_accuracy"], full_match=result["full_match"], **result.get("parts", {})
            )
            out["eval/test_accuracy"] = result["answer_accuracy"]
        return out

    trainer = Trainer(run_config(job))
    trainer.run(evaluate=measure, evaluate_every=c.eval_every)
    lines = read_jsonl(os.path.join(job.run_dir, "metrics.jsonl"))
    record = summarize_run(job, lines, final, time.time() - started)
    if attribution:
        record["attribution"] = attribution
    return record


def summarize_run(job: Job, lines: list[dict], test: dict, seconds: float) -> dict:
    """The record of one run: its final accuracies and the curves the plots and tables read (the first and last
    completion length and the final entropy are read off the curves)."""

    def curve(key: str) -> list[list[float]]:
        return [[line["step"], line[key]] for line in lines if key in line and line.get("step", 0) > 0]

    last = lines[-1]
    record = {
        "label": job.spec.label,
        "method": job.spec.method,
        "lr": job.lr,
        "seed": job.seed,
        "validation_accuracy": last["eval/validation_accuracy"],
        "test": test,
        "curves": {
            "validation_accuracy": curve("eval/validation_accuracy"),
            "completion_length": curve("completion_length/mean"),
            "student_entropy": curve("entropy/student"),
            "early_eos": curve("completion/early_eos"),
        },
        "collapse_step": last.get("collapse/step"),
        "run_dir": job.run_dir,
        "seconds": round(seconds, 1),
    }
    if "frac/LH" in last:
        record["curves"]["regimes"] = {r: curve(f"frac/{r}") for r in REGIMES}
        record["regime_fractions"] = {r: last[f"frac/{r}"] for r in REGIMES}
    return record


def _run_all(jobs: list[Job], workers: int, threads: int, log) -> list[dict]:
    """Every job, in `workers` processes (one thread each), in the order given to start; results in job order."""

    def done(record: dict) -> None:
        test = record["test"]["answer_accuracy"]
        collapse = f", collapse at step {record['collapse_step']:.0f}" if record["collapse_step"] else ""
        log(
            f"  {record['label']} lr {record['lr']:g} seed {record['seed']}: test accuracy {test:.3f} "
            f"({record['seconds']:.0f} s{collapse})"
        )

    if workers == 1 or len(jobs) == 1:
        _init_worker(threads)
        records = []
        for job in jobs:
            records.append(run_job(job))
            done(records[-1])
        return records
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(threads,))
    try:
        pending = [pool.apply_async(run_job, (job,)) for job in jobs]
        records = []
        for result in pending:
            records.append(result.get())
            done(records[-1])
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return records


# --------------------------------------------------------------------------------------------------- lab


def run_lab(config: LabConfig, log=print) -> dict:
    """Run the comparison; returns the results dict also written to `results.json`."""
    import torch

    from .evaluation import evaluate

    specs = check_lab_config(config)
    torch.set_num_threads(config.threads)
    started = time.time()
    task = lab_task(config)
    pair_config = pair_config_with(default_pair_config(pair_task(config)), config.pair)
    pair = load_or_build_pair(pair_config, cache_dir=config.cache_dir, log=log, allow_weak=config.allow_weak_pair)
    teachers, roles = {}, [("teacher", pair.teacher), ("student", pair.student)]
    if config.teacher_per_task:  # each source task's own pair (the shipped one, or built and cached)
        for part in task_parts(config):
            name = get_task(part).name  # the rows' `task` column
            own = pair
            if part != pair_task(config):
                own = load_or_build_pair(default_pair_config(part), cache_dir=config.cache_dir, log=log)
                roles.append((f"teacher:{name}", own.teacher))
            teachers[name] = str(Path(own.path) / "teacher")
    os.makedirs(config.out, exist_ok=True)
    validation, test = held_out_sets(task, config)
    baseline = {}
    for role, model in roles:
        baseline[role] = {"validation": evaluate(model, pair.tokenizer, task, validation)["answer_accuracy"]}
        for kind in ["none", *config.privilege]:
            result = evaluate(model, pair.tokenizer, task, test, kind=kind)
            baseline[role][kind] = {
                "answer_accuracy": result["answer_accuracy"],
                "full_match": result["full_match"],
                **result.get("parts", {}),
            }
    if config.teacher_per_task:  # the first task's teacher is the pair's, measured above
        first = {role: baseline[role] for role in ("teacher", "student")}
        baseline = {**first, f"teacher:{get_task(pair_task(config)).name}": baseline["teacher"], **baseline}
    log(describe_baseline(baseline, config, pair))
    longest = max(len(pair.tokenizer(e.completion)["input_ids"]) for e in task.examples(200, TRAIN_SEED, "train"))
    records_by_kind, timing = {}, {}
    for kind in config.privilege:
        kind_dir = os.path.join(config.out, kind)
        os.makedirs(kind_dir, exist_ok=True)
        data_path = os.path.join(kind_dir, "train.jsonl")
        rows = training_rows(task, config, kind)
        write_text_atomic(data_path, "".join(json.dumps(row) + "\n" for row in rows))
        jobs = [
            Job(
                spec,
                lr,
                seed,
                kind,
                os.path.join(kind_dir, _safe(spec.label), f"lr{lr:g}", f"seed_{seed}"),
                str(pair.path),
                data_path,
                longest + 4,
                config,
                tuple(teachers.items()),
            )
            for spec in specs
            for lr in config.lr_grid
            for seed in config.seeds
        ]
        log(
            f"[{kind}] {len(jobs)} runs ({len(specs)} methods x {len(config.lr_grid)} rates x "
            f"{len(config.seeds)} seeds) in {config.workers} processes"
        )
        kind_started = time.time()
        records = _run_all(jobs, config.workers, config.threads, log)
        timing[kind] = round(time.time() - kind_started, 1)
        records_by_kind[kind] = records
    timing["total"] = round(time.time() - started, 1)
    summary = build_results(config, specs, pair, baseline, records_by_kind, timing)
    write_results(config.out, summary)
    return summary


def describe_baseline(baseline: dict, config: LabConfig, pair) -> str:
    lines = [
        f"lab pair {pair.path} (student: {_student_origin(pair)}); test prompts ({config.n_test}), answer accuracy:"
    ]
    for role, values in baseline.items():  # teacher, student, and with --teacher-per-task each task's teacher
        cells = [f"{kind} {values[kind]['answer_accuracy']:.3f}" for kind in ["none", *config.privilege]]
        parts = values["none"]
        split = ""
        if parts.get("undetermined") is not None:
            split = f"  (without: determined {parts['determined']:.3f}, undetermined {parts['undetermined']:.3f}"
            split += "".join(f", {key} {value:.3f}" for key, value in parts.items() if key.startswith("task:")) + ")"
        lines.append(f"  {role:<8} " + ", ".join(cells) + split)
    holds = properties_hold(pair.properties.get("checks", {}))
    lines.append(
        f"  pair properties (pretraining check, {pair.properties.get('n_eval', '?')} prompts): "
        f"{'hold' if holds else 'FAIL: ' + describe_weakness(pair.properties, pair_task(config))}"
    )
    return "\n".join(lines)


def _student_origin(pair) -> str:
    selection = pair.properties.get("student_selection")
    return student_origin(pair.config, selection["chosen_step"] if selection else None)


def _safe(label: str) -> str:
    """A directory name for a method label (`dopd[self_weights=frozen]` -> `dopd_self_weights-frozen`)."""
    out = label.replace("[", "_").replace("]", "").replace("=", "-").replace(",", "_").replace("+", "-")
    return "".join(ch for ch in out if ch.isalnum() or ch in "._-")
