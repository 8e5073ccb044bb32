"""`dopd lab`: every method distils the same tiny student from the same tiny teacher, with the same budget, and
the lab reports which one closes the gap (the paper's comparison, in minutes on a CPU).

For each privileged kind: a learning-rate search with the same grid and step budget for every method (picked
on a validation set), then every method × seed at its picked rate, the held-out accuracy without privileged
input evaluated along the way. Every run is a `dopd train` run directory under the lab's output directory.
Results: `results.json`, `results.md` and plots (accuracy, student entropy and DOPD's regime fractions against
step). Nothing here favours a method: budgets, rollouts per step, evaluation and selection are the same for all.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

from ..config import load_config
from ..train import Trainer
from .evaluation import evaluate
from .models import LabPairConfig, default_pair_config, load_or_build_pair
from .tasks import LAB_PRIVILEGED_TEMPLATE, PRIVILEGED_KINDS, get_task

DEFAULT_METHODS = ["opd", "opd-priv", "opsd", "dopd"]
TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 101, 202, 303


@dataclass
class LabConfig:
    task: str = "order"
    privilege: list[str] = field(default_factory=lambda: ["hints"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 60
    prompts_per_step: int = 16
    num_generations: int = 4
    # A fresh AdamW moves every weight by about lr per step: 1e-4 already matches the end of the pair's pretraining
    # schedule, so the grid reaches a decade lower. The same grid and search steps for every method.
    lr_grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4])
    search_steps: int = 30
    eval_every: int = 20
    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 300
    top_k: int = 16
    out: str = ""
    cache_dir: str | None = None
    threads: int = 1  # torch threads: tiny models gain nothing from more, and contended threads thrash
    pair: dict = field(default_factory=dict)  # LabPairConfig fields to change (another pair: built and cached)

    @staticmethod
    def quick(**overrides) -> "LabConfig":
        """The same pipeline at the size of a first look (and CI): one seed, one rate, fewer steps."""
        values = dict(seeds=[0], steps=12, lr_grid=[3e-5], search_steps=0, eval_every=6, n_train=400, n_test=100,
                      n_validation=50, prompts_per_step=8)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return LabConfig(**values)


def _check(config: LabConfig) -> None:
    from ..objectives import METHODS

    get_task(config.task)
    for kind in config.privilege:
        if kind not in PRIVILEGED_KINDS or kind == "none":
            raise ValueError(f"--privilege {kind!r} is unknown; use one or more of answer, hints, solution")
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"--methods has {method!r}; known: {', '.join(METHODS)}")
    if not config.seeds or not config.lr_grid:
        raise ValueError("--seeds and --lr-grid need at least one value each")


def _run_config(config: LabConfig, pair_path, data_path: str, out: str, method: str, lr: float, seed: int,
                steps: int, max_new_tokens: int):
    return load_config(
        model={"student": str(pair_path / "student"), "teacher": str(pair_path / "teacher")},
        data={"path": data_path, "teacher_template": LAB_PRIVILEGED_TEMPLATE, "self_template": LAB_PRIVILEGED_TEMPLATE,
              "max_prompt_length": 512},
        rollout={"num_generations": config.num_generations, "max_new_tokens": max_new_tokens, "temperature": 1.0},
        objective={"method": method, "top_k": config.top_k},
        optim={"lr": lr, "schedule": "constant", "warmup_steps": 0},
        train={"steps": steps, "prompts_per_step": config.prompts_per_step, "seed": seed, "device": "cpu",
               "micro_batch_size": config.prompts_per_step * config.num_generations},
        logging={"output_dir": out, "overwrite": True, "progress_bar": False, "sample_every": max(1, steps // 3),
                 "num_samples": 4},
        checkpoint={"save_every": 0},
    )


def _accuracy(trainer, task, examples) -> dict[str, float]:
    result = evaluate(trainer.inner, trainer.tokenizer, task, examples, kind="none")
    return {"eval/answer_accuracy": result["answer_accuracy"], "eval/full_match": result["full_match"]}


def _train_one(config, pair, data_path, out, method, lr, seed, steps, max_new_tokens, task, examples, every):
    run = _run_config(config, pair.path, data_path, out, method, lr, seed, steps, max_new_tokens)
    trainer = Trainer(run)
    trainer.run(evaluate=lambda step, t: _accuracy(t, task, examples), evaluate_every=every)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return lines


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _baselines(pair, task, examples, kinds) -> dict:
    accuracy = {}
    for role, model in (("teacher", pair.teacher), ("student", pair.student)):
        accuracy[role] = {}
        for kind in ["none", *kinds]:
            result = evaluate(model, pair.tokenizer, task, examples, kind=kind)
            accuracy[role][kind] = {"answer_accuracy": result["answer_accuracy"], "full_match": result["full_match"]}
    return accuracy


def run_lab(config: LabConfig, log=print) -> dict:
    """Run the comparison; returns the results dict also written to `results.json`."""
    _check(config)
    import torch

    torch.set_num_threads(config.threads)
    started = time.time()
    os.makedirs(config.out, exist_ok=True)
    task = get_task(config.task)
    pair_config = LabPairConfig.from_dict({**default_pair_config(config.task).to_dict(), **config.pair})
    pair = load_or_build_pair(pair_config, cache_dir=config.cache_dir, log=log)
    validation = task.examples(config.n_validation, VALIDATION_SEED)
    test = task.examples(config.n_test, TEST_SEED)
    baseline = _baselines(pair, task, test, config.privilege)
    teacher_acc = baseline["teacher"]["none"]["answer_accuracy"]
    student_acc = baseline["student"]["none"]["answer_accuracy"]
    log(_describe_pair(baseline, config.privilege))
    longest = max(len(pair.tokenizer(e.completion)["input_ids"]) for e in task.examples(200, TRAIN_SEED))
    max_new_tokens = longest + 4
    results = {
        "task": config.task,
        "seeds": config.seeds,
        "config": asdict(config),
        "pair": {"path": str(pair.path), "properties": pair.properties},
        "teacher": baseline["teacher"],
        "student": baseline["student"],
        "kinds": {},
    }
    for kind in config.privilege:
        kind_dir = os.path.join(config.out, kind)
        os.makedirs(kind_dir, exist_ok=True)
        data_path = os.path.join(kind_dir, "train.jsonl")
        with open(data_path, "w") as handle:
            for row in task.rows(config.n_train, TRAIN_SEED, kind):
                handle.write(json.dumps(row) + "\n")
        chosen, search = {}, {}
        for method in config.methods:
            scores = {}
            if len(config.lr_grid) > 1 and config.search_steps > 0:
                for lr in config.lr_grid:
                    out = os.path.join(kind_dir, "search", f"{method}_lr{lr:g}")
                    lines = _train_one(config, pair, data_path, out, method, lr, 1000, config.search_steps,
                                       max_new_tokens, task, validation, 0)
                    scores[lr] = lines[-1]["eval/answer_accuracy"]
                    log(f"[{kind}] search {method} lr={lr:g}: validation accuracy {scores[lr]:.3f}")
                best = max(scores.values())
                chosen[method] = min(lr for lr, s in scores.items() if s == best)
            else:
                chosen[method] = config.lr_grid[0]
            search[method] = {"scores": {f"{lr:g}": s for lr, s in scores.items()}, "chosen_lr": chosen[method]}
        methods = {}
        for method in config.methods:
            per_seed, curves = [], []
            for seed in config.seeds:
                out = os.path.join(kind_dir, method, f"seed_{seed}")
                lines = _train_one(config, pair, data_path, out, method, chosen[method], seed, config.steps,
                                   max_new_tokens, task, test, config.eval_every)
                curves.append(lines)
                per_seed.append(lines[-1])
                log(f"[{kind}] {method} seed {seed}: held-out accuracy {lines[-1]['eval/answer_accuracy']:.3f}")
            methods[method] = _summarize_method(method, per_seed, curves, teacher_acc, student_acc, chosen[method])
        results["kinds"][kind] = {"methods": methods, "search": search}
        _plot(kind_dir, config, kind)
    results["wall_seconds"] = round(time.time() - started, 1)
    _write(config.out, results)
    return results


def _summarize_method(method, per_seed, curves, teacher_acc, student_acc, lr) -> dict:
    accuracy = [line["eval/answer_accuracy"] for line in per_seed]
    full = [line["eval/full_match"] for line in per_seed]
    mean, std = _mean_std(accuracy)
    gap = teacher_acc - student_acc
    summary = {
        "lr": lr,
        "accuracy_per_seed": accuracy,
        "accuracy_mean": mean,
        "accuracy_std": std,
        "full_match_per_seed": full,
        "full_match_mean": _mean_std(full)[0],
        "gap_recovery": (mean - student_acc) / gap if gap > 0 else math.nan,
        "final_student_entropy": statistics.fmean(line.get("entropy/student", math.nan) for line in per_seed),
    }
    if method == "dopd":
        summary["regime_fractions"] = {
            r: statistics.fmean(line.get(f"frac/{r}", math.nan) for line in per_seed) for r in ("LH", "LL", "HT", "HS")
        }
    return summary


def _describe_pair(baseline: dict, kinds: list[str]) -> str:
    lines = ["pretrained pair, held-out answer accuracy (full-completion match):"]
    for role in ("teacher", "student"):
        cells = [f"{k}: {v['answer_accuracy']:.3f} ({v['full_match']:.3f})" for k, v in baseline[role].items()]
        lines.append(f"  {role:<8} " + "  ".join(cells))
    teacher, student = baseline["teacher"], baseline["student"]
    gap = teacher["none"]["answer_accuracy"] - student["none"]["answer_accuracy"]
    lines.append(f"  teacher - student without privileged input: {100 * gap:+.1f} points (required: >= +25)")
    for kind in kinds:
        gains = [baseline[r][kind]["answer_accuracy"] - baseline[r]["none"]["answer_accuracy"] for r in baseline]
        lines.append(f"  {kind} raises teacher by {100 * gains[0]:+.1f} and student by {100 * gains[1]:+.1f} points")
    return "\n".join(lines)


def results_table(results: dict, kind: str) -> str:
    teacher = results["teacher"]["none"]["answer_accuracy"]
    student = results["student"]["none"]["answer_accuracy"]
    rows = [
        f"Task `{results['task']}`, privileged kind `{kind}`, seeds {results['seeds']}; held-out accuracy without "
        f"privileged input. Teacher {teacher:.3f}, student before distillation {student:.3f}.",
        "",
        "| method | lr | answer accuracy (mean ± std) | full match | gap recovery | final student entropy |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in results["kinds"][kind]["methods"].items():
        rows.append(
            f"| {method} | {m['lr']:g} | {m['accuracy_mean']:.3f} ± {m['accuracy_std']:.3f} | "
            f"{m['full_match_mean']:.3f} | {100 * m['gap_recovery']:.1f}% | {m['final_student_entropy']:.3f} |"
        )
    dopd = results["kinds"][kind]["methods"].get("dopd")
    if dopd:
        fractions = ", ".join(f"{r} {v:.2f}" for r, v in dopd["regime_fractions"].items())
        rows += ["", f"DOPD regime fractions at the last step: {fractions}."]
    return "\n".join(rows)


def _write(out: str, results: dict) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as handle:
        json.dump(results, handle, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    text = "\n\n".join(f"## {kind}\n\n{results_table(results, kind)}" for kind in results["kinds"])
    with open(os.path.join(out, "results.md.tmp"), "w") as handle:
        handle.write(f"# dopd lab: {results['task']}\n\n{text}\n\nWall time: {results['wall_seconds']} s.\n")
    os.replace(os.path.join(out, "results.md.tmp"), os.path.join(out, "results.md"))


def _plot(kind_dir: str, config: LabConfig, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curves(method: str, key: str):
        out = []
        for seed in config.seeds:
            path = os.path.join(kind_dir, method, f"seed_{seed}", "metrics.jsonl")
            lines = [json.loads(line) for line in open(path)]
            out.append([(line["step"], line[key]) for line in lines if key in line])
        return out

    for key, name, ylabel in (("eval/answer_accuracy", "accuracy.png", "held-out accuracy (no privileged input)"),
                              ("entropy/student", "entropy.png", "student entropy (nats/token)")):
        figure, axis = plt.subplots(figsize=(6, 4))
        for method in config.methods:
            for number, points in enumerate(curves(method, key)):
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, values, color=f"C{config.methods.index(method)}", alpha=0.8,
                              label=method if number == 0 else None)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{config.task}, privileged kind {kind}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(kind_dir, name), dpi=110)
        plt.close(figure)
    if "dopd" in config.methods:
        figure, axis = plt.subplots(figsize=(6, 4))
        for number, regime in enumerate(("LH", "LL", "HT", "HS")):
            for seed_number, points in enumerate(curves("dopd", f"frac/{regime}")):
                if points:
                    steps, values = zip(*points)
                    axis.plot(steps, values, color=f"C{number}", alpha=0.8, label=regime if seed_number == 0 else None)
        axis.set_xlabel("step")
        axis.set_ylabel("fraction of tokens")
        axis.set_title(f"DOPD regimes, privileged kind {kind}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(os.path.join(kind_dir, "regimes.png"), dpi=110)
        plt.close(figure)
