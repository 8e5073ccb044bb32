"""The lab's results from its runs: statistics over seeds, the rate chosen on validation, the tables and
`results.json` / `results.md`.

Rates: the common rate is the one whose validation accuracy, averaged over every method and seed, is highest (the
smaller on a tie); each method's own rate, the highest of its own. Test accuracies are reported as mean ± standard
error over seeds; DOPD against another method as the mean ± standard error of their per-seed differences (the
same seed gives both the same data order and starting sample stream). Accuracy is split into the test prompts
whose prompt determines the answer (skill) and the others (information only the privileged input carries).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

from ..answers import gap_recovery
from ..objectives import DOPD_METHODS
from ..routing import REGIMES
from ..run_dir import write_json_atomic, write_text_atomic
from .attribution import mean_attribution
from .methods import REFERENCES, MethodSpec

if TYPE_CHECKING:
    from .config import LabConfig

# Required shares of the teacher-student gap recovered by the references at the common rate.
MIN_RECOVERY = {"sft": 0.40, "opd": 0.25}


def standard_error(values: list[float]) -> float:
    """The standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


def method_stats(runs: list[dict], teacher: dict, student: dict) -> dict:
    """Statistics of one method at one rate over its seeds."""
    accuracy = [r["test"]["answer_accuracy"] for r in runs]
    mean = _mean(accuracy)
    recovery = gap_recovery(mean, student["answer_accuracy"], teacher["answer_accuracy"])
    stats = {
        "seeds": [r["seed"] for r in runs],
        "accuracy_per_seed": accuracy,
        "accuracy_mean": mean,
        "accuracy_se": standard_error(accuracy),
        "gap_recovery": math.nan if recovery is None else recovery,  # NaN: a pair without a gap (JSON and tables)
        "full_match_mean": _mean([r["test"]["full_match"] for r in runs]),
        "validation_mean": _mean([r["validation_accuracy"] for r in runs]),
        "final_student_entropy": _mean([r["curves"]["student_entropy"][-1][1] for r in runs]),
        "completion_length_first": _mean([r["curves"]["completion_length"][0][1] for r in runs]),
        "completion_length_last": _mean([r["curves"]["completion_length"][-1][1] for r in runs]),
        "collapse_steps": [r["collapse_step"] for r in runs],
    }
    sources = [key for key in runs[0]["test"] if key.startswith("task:")]  # a mixture's tasks
    for part in ("determined", "undetermined", *sources):
        values = [r["test"].get(part) for r in runs]
        if all(v is not None for v in values):
            stats[f"{part}_mean"], stats[f"{part}_se"] = _mean(values), standard_error(values)
            stats[f"{part}_change"] = stats[f"{part}_mean"] - student[part]
    if "regime_fractions" in runs[0]:
        stats["regime_fractions"] = {k: _mean([r["regime_fractions"][k] for r in runs]) for k in REGIMES}
    if any("attribution" in r for r in runs):
        stats["attribution"] = {
            when: mean_attribution([r.get("attribution", {}).get(when, {}) for r in runs]) for when in ("start", "end")
        }
    return stats


def choose_rates(records: list[dict], labels: list[str], grid: list[float]) -> tuple[float, dict[str, float], dict]:
    """The common rate, each method's own rate, and the mean validation accuracy of each rate over all methods."""

    def validation(label: str | None, lr: float) -> float:
        return _mean([r["validation_accuracy"] for r in records if r["lr"] == lr and label in (None, r["label"])])

    by_rate = {lr: validation(None, lr) for lr in grid}
    common = max(sorted(grid), key=lambda lr: by_rate[lr])  # max keeps the first (smallest) of equal rates
    own = {label: max(sorted(grid), key=lambda lr, label=label: validation(label, lr)) for label in labels}
    return common, own, by_rate


def paired(
    records: list[dict],
    first: str,
    second: str,
    lr: float,
    second_lr: float | None = None,
    key: str = "answer_accuracy",
) -> dict:
    """`first` − `second` test accuracy (or the test record's `key`: a part, "determined" or "undetermined") per
    seed, `first` at rate `lr` and `second` at `second_lr` (default the same), over the seeds both ran with a
    value."""
    second_lr = lr if second_lr is None else second_lr

    def values(label: str, rate: float) -> dict[int, float]:
        return {
            r["seed"]: r["test"][key]
            for r in records
            if r["label"] == label and r["lr"] == rate and r["test"].get(key) is not None
        }

    one, two = values(first, lr), values(second, second_lr)
    differences = [one[s] - two[s] for s in sorted(one) if s in two]
    return {"mean": _mean(differences), "se": standard_error(differences), "per_seed": differences}


def kind_results(config: LabConfig, specs: list[MethodSpec], records: list[dict], teacher: dict, student: dict) -> dict:
    labels = [spec.label for spec in specs]
    common, own, by_rate = choose_rates(records, labels, config.lr_grid)
    by_lr = {
        label: {
            f"{lr:g}": method_stats([r for r in records if r["label"] == label and r["lr"] == lr], teacher, student)
            for lr in config.lr_grid
        }
        for label in labels
    }
    main = {label: by_lr[label][f"{common:g}"] for label in labels}
    references = {
        name: {
            "gap_recovery": main[name]["gap_recovery"],
            "required": MIN_RECOVERY[name],
            "meets": bool(main[name]["gap_recovery"] >= MIN_RECOVERY[name]),
        }
        for name in REFERENCES
    }
    dopd_labels = [spec.label for spec in specs if spec.method in DOPD_METHODS]
    differences = {
        first: {second: paired(records, first, second, common) for second in labels if second != first}
        for first in dopd_labels
    }
    return {
        "common_lr": common,
        "validation_by_lr": {f"{lr:g}": value for lr, value in by_rate.items()},
        "own_lr": own,
        "methods": {spec.label: {"method": spec.method, "overrides": dict(spec.overrides)} for spec in specs},
        "main": main,
        "own_best": {label: by_lr[label][f"{own[label]:g}"] for label in labels},
        "grid": by_lr,
        "references": references,
        "budget_moves_student": all(ref["meets"] for ref in references.values()),
        "paired_differences": differences,
        "runs": sorted(records, key=lambda r: (labels.index(r["label"]), r["lr"], r["seed"])),
    }


def build_results(config: LabConfig, specs, pair, baseline: dict, records_by_kind: dict, timing: dict) -> dict:
    teacher, student = baseline["teacher"]["none"], baseline["student"]["none"]
    return {
        "task": config.task,
        "seeds": config.seeds,
        "config": asdict(config),
        "pair": {
            "path": str(pair.path),
            "properties": pair.properties,
            "weak": pair.weak,
            "allowed_weak": config.allow_weak_pair,
        },
        "teacher": baseline["teacher"],
        "student": baseline["student"],
        # --teacher-per-task: each source task's teacher, on the same test prompts
        "teachers": {role.split(":", 1)[1]: v for role, v in baseline.items() if role.startswith("teacher:")},
        "test_prompts": config.n_test,
        "binomial_se_bound": math.sqrt(0.25 / config.n_test),
        "kinds": {
            kind: kind_results(config, specs, records, teacher, student) for kind, records in records_by_kind.items()
        },
        "timing": timing,
    }


# -------------------------------------------------------------------------------------------------- tables


def _pm(mean: float, se: float) -> str:
    return f"{mean:.3f} ± {se:.3f}"


def _change(stats: dict, part: str) -> str:
    if f"{part}_mean" not in stats:
        return "—"
    return f"{stats[f'{part}_mean']:.3f} ({100 * stats[f'{part}_change']:+.1f})"


def method_table(rows: dict[str, dict], lr_of) -> list[str]:
    lines = [
        "| method | lr | test accuracy (mean ± SE) | gap recovery | determined (change) | undetermined (change) "
        "| full match | student entropy | length first → last | collapse |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in rows.items():
        collapsed = [int(s) for s in m["collapse_steps"] if s]
        lines.append(
            f"| {label} | {lr_of(label):g} | {_pm(m['accuracy_mean'], m['accuracy_se'])} | "
            f"{100 * m['gap_recovery']:.1f}% | {_change(m, 'determined')} | {_change(m, 'undetermined')} | "
            f"{m['full_match_mean']:.3f} | {m['final_student_entropy']:.3f} | "
            f"{m['completion_length_first']:.1f} → {m['completion_length_last']:.1f} | "
            f"{'steps ' + ', '.join(map(str, collapsed)) if collapsed else 'no'} |"
        )
    return lines


def kind_markdown(results: dict, kind: str) -> str:
    k = results["kinds"][kind]
    teacher, student = results["teacher"]["none"], results["student"]["none"]
    n = len(results["seeds"])
    split = ""
    if student.get("undetermined") is not None:
        split = (
            f" Determined by the prompt: {student['n_determined']} test prompts (teacher "
            f"{teacher['determined']:.3f}, student {student['determined']:.3f}); not determined: "
            f"{student['n_undetermined']} (teacher {teacher['undetermined']:.3f}, student "
            f"{student['undetermined']:.3f})."
        )
    refs = "; ".join(
        f"{name} recovers {100 * ref['gap_recovery']:.1f}% of the gap (required {100 * ref['required']:.0f}%: "
        f"{'met' if ref['meets'] else 'NOT met'})"
        for name, ref in k["references"].items()
    )
    lines = [
        f"Task `{results['task']}`, privileged kind `{kind}`, {n} seeds, {results['test_prompts']} test prompts "
        f"without privileged input (a binomial standard error of at most {100 * results['binomial_se_bound']:.2f} "
        f"points). Teacher {teacher['answer_accuracy']:.3f}, student before distillation "
        f"{student['answer_accuracy']:.3f}.{split}",
        "",
        f"Budget check at the common rate: {refs}. "
        + (
            "The budget moves the student."
            if k["budget_moves_student"]
            else "**The budget does not move the student as required: read the comparison below as no evidence.**"
        ),
    ]
    if results["pair"]["weak"]:
        lines += ["", "**The pair fails a required property and was allowed with --allow-weak-pair.**"]
    lines += ["", f"### Every method at the common rate {k['common_lr']:g} (best on validation over all methods)", ""]
    lines += method_table(k["main"], lambda label: k["common_lr"])
    sources = [key for key in student if key.startswith("task:")]
    if sources:  # a mixture: each task's accuracy (the change from the student), and each row's teacher
        own = results.get("teachers", {})
        scored = (
            "each row scored by its own task's teacher ("
            + ", ".join(f"{name} {t['none'][f'task:{name}']:.3f}" for name, t in own.items())
            + " on its own task)"
            if own
            else "every row scored by the first task's teacher"
        )
        lines += ["", f"### Each task of the mixture at the common rate ({scored})", ""]
        lines += ["| method | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
        lines += [f"| {label} | " + " | ".join(_change(m, p) for p in sources) + " |" for label, m in k["main"].items()]
    lines += ["", "### Each method at its own best rate (validation)", ""]
    lines += method_table(k["own_best"], lambda label: k["own_lr"][label])
    for first, others in k["paired_differences"].items():
        lines += [
            "",
            f"### {first} minus each other method, same seeds, at the common rate",
            "",
            "| other | difference (mean ± SE) | per seed |",
            "|---|---|---|",
        ]
        for second, d in others.items():
            lines.append(
                f"| {second} | {100 * d['mean']:+.1f} ± {100 * d['se']:.1f} points | "
                f"{', '.join(f'{100 * x:+.1f}' for x in d['per_seed'])} |"
            )
    rates = list(next(iter(k["grid"].values())))
    lines += [
        "",
        "### The whole grid: test accuracy (mean ± SE), validation in parentheses",
        "",
        "| method | " + " | ".join(f"lr {r}" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for label, row in k["grid"].items():
        cells = [
            f"{_pm(row[r]['accuracy_mean'], row[r]['accuracy_se'])} ({row[r]['validation_mean']:.3f})" for r in rates
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| mean validation over methods | " + " | ".join(f"{k['validation_by_lr'][r]:.3f}" for r in rates) + " |"
    )
    routed = {label: m["regime_fractions"] for label, m in k["main"].items() if "regime_fractions" in m}
    if routed:
        lines.append("")
        for label, fractions in routed.items():
            shown = ", ".join(f"{r} {v:.2f}" for r, v in fractions.items())
            lines.append(f"{label} regime fractions at the last step: {shown}.")
    attributed = {
        label: m["attribution"]["end"] for label, m in k["main"].items() if m.get("attribution", {}).get("end")
    }
    if attributed:
        lines += [
            "",
            "Attribution at the last step (lab/attribution.py), shares of tokens / loss / squared gradient:",
            "",
        ]
        lines += [f"- {label}: {describe_attribution(a)}" for label, a in attributed.items()]
    return "\n".join(lines)


def describe_attribution(margins: dict) -> str:
    """One line of an attribution's margins: per regime, the undetermined problems, the plan tokens."""

    def cell(shares: dict) -> str:
        return f"{100 * shares['tokens']:.0f}/{100 * shares['loss']:.0f}/{100 * shares['grad']:.0f}%"

    parts = [f"{name} {cell(shares)}" for name, shares in margins["by_regime"].items() if name != "all"]
    for margin, name, shown in (
        ("by_part", "undetermined", "undetermined problems"),
        ("by_token", "plan", "plan tokens"),
    ):
        if name in margins[margin]:
            parts.append(f"{shown} {cell(margins[margin][name])}")
    return ", ".join(parts)


def write_results(out: str, results: dict) -> None:
    """`results.json` and `results.md` (each under a temporary name, then renamed), and the plots."""
    from .plots import write_plots

    for kind in results["kinds"]:
        write_plots(os.path.join(out, kind), results, kind)
    write_json_atomic(os.path.join(out, "results.json"), results)
    text = "\n\n".join(f"## {kind}\n\n{kind_markdown(results, kind)}" for kind in results["kinds"])
    markdown = f"# dopd lab: {results['task']}\n\n{text}\n\nWall time: {results['timing']['total']} s.\n"
    write_text_atomic(os.path.join(out, "results.md"), markdown)
