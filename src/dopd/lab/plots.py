"""The lab's plots, at the common rate: per method the mean over seeds with a band (lowest to highest seed),
validation accuracy with the teacher's and the student's as reference lines, completion length and the
student's entropy against step; the change on each part of the test prompts; DOPD's regime fractions."""

from __future__ import annotations

import os

from ..routing import REGIMES


def _mean_band(curves: list[list[list[float]]]):
    """Steps, mean, low and high over seeds of curves given as [[step, value], ...] (steps every seed has)."""
    common = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves))) if curves else []
    rows = [[dict(map(tuple, curve))[step] for curve in curves] for step in common]
    return common, [sum(r) / len(r) for r in rows], [min(r) for r in rows], [max(r) for r in rows]


def write_plots(kind_dir: str, results: dict, kind: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = results["kinds"][kind]
    lr = k["common_lr"]
    labels = list(k["methods"])
    runs = [r for r in k["runs"] if r["lr"] == lr]
    teacher, student = results["teacher"], results["student"]
    paths = {}

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("validation_accuracy", "validation accuracy (no privileged input)"),
        ("completion_length", "mean completion length (tokens)"),
        ("student_entropy", "student entropy (nats/token)"),
    )
    for axis, (key, title) in zip(axes, panels):
        for number, label in enumerate(labels):
            curves = [r["curves"][key] for r in runs if r["label"] == label and r["curves"][key]]
            if key == "validation_accuracy":  # every run starts from the same student
                curves = [[[0, student["validation"]], *curve] for curve in curves]
            steps, mean, low, high = _mean_band(curves)
            if steps:
                axis.plot(steps, mean, color=f"C{number}", label=label)
                axis.fill_between(steps, low, high, color=f"C{number}", alpha=0.2)
        if key == "validation_accuracy":
            axis.axhline(teacher["validation"], color="black", linestyle="--", linewidth=1, label="teacher")
            axis.axhline(student["validation"], color="gray", linestyle=":", linewidth=1, label="student before")
        axis.set_xlabel("step")
        axis.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{results['task']}, privileged kind {kind}, lr {lr:g}: mean over seeds, band = lowest to highest")
    figure.tight_layout()
    paths["curves"] = os.path.join(kind_dir, "curves.png")
    figure.savefig(paths["curves"], dpi=100)
    plt.close(figure)

    if "determined_change" in next(iter(k["main"].values())):
        figure, axis = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
        width = 0.38
        for offset, (part, color) in enumerate((("determined", "C0"), ("undetermined", "C3"))):
            if f"{part}_change" not in next(iter(k["main"].values())):
                continue  # a part without test prompts (an undetermined share of 0)
            values = [100 * k["main"][label][f"{part}_change"] for label in labels]
            errors = [100 * k["main"][label][f"{part}_se"] for label in labels]
            positions = [i + (offset - 0.5) * width for i in range(len(labels))]
            axis.bar(
                positions,
                values,
                width,
                yerr=errors,
                color=color,
                label=f"prompt {part} the answer"
                if part == "determined"
                else "only the privileged input determines it",
            )
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        axis.set_ylabel("test accuracy change (points)")
        axis.set_title(f"what each method moved, lr {lr:g} (mean ± SE over seeds)", fontsize=10)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths["parts"] = os.path.join(kind_dir, "parts.png")
        figure.savefig(paths["parts"], dpi=100)
        plt.close(figure)

    routed = [label for label in labels if any("regimes" in r["curves"] for r in runs if r["label"] == label)]
    if routed:
        figure, axes = plt.subplots(1, len(routed), figsize=(5 * len(routed), 3.8), squeeze=False)
        for axis, label in zip(axes[0], routed):
            for number, regime in enumerate(REGIMES):
                curves = [r["curves"]["regimes"][regime] for r in runs if r["label"] == label]
                steps, mean, low, high = _mean_band(curves)
                axis.plot(steps, mean, color=f"C{number}", label=regime)
                axis.fill_between(steps, low, high, color=f"C{number}", alpha=0.2)
            axis.set_title(f"{label}: regime fractions", fontsize=10)
            axis.set_xlabel("step")
            axis.legend(fontsize=8)
        figure.tight_layout()
        paths["regimes"] = os.path.join(kind_dir, "regimes.png")
        figure.savefig(paths["regimes"], dpi=100)
        plt.close(figure)
    return paths
