"""Reports on finished or running runs: PNG plots of the logged metrics and one self-contained HTML page.

A report reads only what a run directory holds (`config.yaml`, `metrics.jsonl`, `samples.jsonl`), so it works on
a run in progress and on a run killed mid-write: a file cut in the middle of its last line is read up to its last
whole line. The plots follow the quantities of the paper's method (per-regime losses and fractions, the privilege
advantage gap against its batch threshold: the paper's routing rule) and its failure mode (entropy collapse,
the "privilege illusion" of their Figure 3); the token view shows each sampled completion token coloured by the
regime it was routed to, with its gap, q_S, q_T and loss on hover. Several run directories share one page, and a
lab output directory expands to its `<kind>/<method>/seed_<n>` runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .diagnostics import Collapse
from .report_html import NEUTRAL_COLOUR, REGIME_COLOURS, render_html
from .routing import REGIMES
from .run_dir import Run, load_runs

# ------------------------------------------------------------------------------------------------- collapse


def find_collapse(run: Run, fraction: float = 0.5, key: str = "entropy/student") -> Collapse | None:
    """The step the run flagged itself (`collapse/step`), else the first step whose entropy is below `fraction` ×
    the entropy at the first step that logged it."""
    flagged_steps, flagged = run.series("collapse/step")
    if flagged_steps:
        reasons = [
            name
            for name in ("length", "entropy")
            if run.has(f"collapse/{name}") and max(run.series(f"collapse/{name}")[1]) > 0
        ]
        step = int(flagged[0])
        return Collapse(
            run.label,
            step,
            math.nan,
            run.value_at(key, step) or math.nan,
            math.nan,
            fraction,
            " and ".join(f"{r} (run diagnostics)" for r in reasons) or "run diagnostics",
        )
    steps, values = run.series(key)
    points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if len(points) < 2 or points[0][1] <= 0:
        return None
    start = points[0][1]
    threshold = fraction * start
    for step, value in points[1:]:
        if value < threshold:
            return Collapse(run.label, step, start, value, threshold, fraction)
    return None


# ------------------------------------------------------------------------------------------------- plots


def _figure(panels: int, columns: int = 2, height: float = 3.2):
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(5.2 * columns, height * rows), layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]
    return figure, axes


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _save(figure, out: str, name: str) -> str:
    path = os.path.join(out, f"{name}.png")
    figure.savefig(path, dpi=100)
    return path


def _line_plot(
    runs: list[Run],
    out: str,
    name: str,
    title: str,
    panels: list[tuple[str, list[tuple[str, str]]]],
    collapses: dict[str, Collapse] | None = None,
):
    """One figure of panels, each a list of (metric key, line style); one colour per run, a dotted vertical line
    at the step a run collapsed. Panels no run has are left out; no figure when none is left. Returns the PNG
    path or None."""
    panels = [(t, keys) for t, keys in panels if any(run.has(k) for run in runs for k, _ in keys)]
    if not panels:
        return None
    figure, axes = _figure(len(panels))
    for axis, (panel_title, keys) in zip(axes, panels):
        for index, run in enumerate(runs):
            for key, style in keys:
                steps, values = run.series(key)
                if steps:
                    suffix = f" {key.split('/')[-1]}" if len(keys) > 1 else ""
                    axis.plot(steps, values, style, color=_colour(index), label=f"{run.label}{suffix}", markersize=3)
            if collapses and run.label in collapses:
                axis.axvline(collapses[run.label].step, color=_colour(index), linestyle=":", linewidth=1.2)
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    return _save(figure, out, name)


def _entropy_plot(runs, out, collapses: dict[str, Collapse], fraction: float):
    if not any(run.has(f"entropy/{who}") for run in runs for who in ("student", "self", "teacher")):
        return None
    figure, (axis,) = _figure(1, height=4.0)
    for index, run in enumerate(runs):
        colour = _colour(index)
        for who, style in (("student", "-o"), ("self", ":"), ("teacher", "--")):
            steps, values = run.series(f"entropy/{who}")
            if steps:
                axis.plot(steps, values, style, color=colour, label=f"{run.label} {who}", markersize=3)
        steps, values = run.series("entropy/student")
        finite = [v for v in values if math.isfinite(v)]
        if finite and finite[0] > 0:
            axis.axhline(fraction * finite[0], color=colour, linestyle="-.", linewidth=0.8, alpha=0.7)
        collapse = collapses.get(run.label)
        if collapse is not None:
            axis.axvline(collapse.step, color="red", linewidth=1.2, alpha=0.8)
            axis.plot(
                [collapse.step],
                [collapse.value],
                "X",
                color="red",
                markersize=11,
                label=f"{run.label}: collapse at step {collapse.step}",
            )
    axis.set_title(f"entropy (dash-dot: {fraction:g} x the student's first value; red: collapse)", fontsize=10)
    axis.set_xlabel("step")
    axis.set_ylabel("nats / token")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    return _save(figure, out, "entropy")


def _gap_histogram(runs, out):
    """The gap of every saved token at the last sampled step of each run, stacked by regime, with the batch
    threshold Ā of that step (the threshold is over the whole batch, the samples are a part of it)."""
    panels = []
    for run in runs:
        steps = [s for s in run.sample_steps() if any("gap" in r and r.get("step") == s for r in run.samples)]
        if steps:
            panels.append((run, steps[-1]))
    if not panels:
        return None
    figure, axes = _figure(len(panels), columns=3)
    for axis, (run, step) in zip(axes, panels):
        by_regime: dict[str, list[float]] = {r: [] for r in (*REGIMES, None)}
        for record in run.samples:
            if record.get("step") != step:
                continue
            regimes = record.get("regime") or [None] * len(record["gap"])
            for gap, regime in zip(record["gap"], regimes):
                if isinstance(gap, (int, float)) and math.isfinite(gap):
                    by_regime[regime if regime in REGIMES else None].append(gap)
        names = [r for r in by_regime if by_regime[r]]
        axis.hist(
            [by_regime[r] for r in names],
            bins=20,
            stacked=True,
            color=[REGIME_COLOURS.get(r, NEUTRAL_COLOUR) for r in names],
            label=[r or "no regime" for r in names],
        )
        threshold = run.value_at("gap/threshold", step)
        if threshold is not None:
            axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
        axis.set_title(f"{run.label}: gap |log q_T - log q_S|, step {step}", fontsize=9)
        axis.set_xlabel("gap")
        axis.set_ylabel("tokens")
        axis.legend(fontsize=7)
    return _save(figure, out, "gap_histogram")


def _time_plot(runs, out):
    parts = ("rollout", "scoring", "update")
    timed = [run for run in runs if any(run.has(f"time/{p}") for p in parts)]
    if not timed:
        return None
    figure, (bars, lines) = _figure(2, height=max(3.2, 0.35 * len(timed) + 1.5))
    left = [0.0] * len(timed)
    for number, part in enumerate(parts):
        means = []
        for run in timed:
            values = [v for v in run.series(f"time/{part}")[1] if math.isfinite(v)]
            means.append(sum(values) / len(values) if values else 0.0)
        bars.barh(range(len(timed)), means, left=left, color=f"C{number}", label=part)
        left = [a + b for a, b in zip(left, means)]
    bars.set_yticks(range(len(timed)), [run.label for run in timed], fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("mean seconds per step")
    bars.set_title("time split", fontsize=10)
    bars.legend(fontsize=7)
    for index, run in enumerate(runs):
        steps, values = run.series("time/step")
        if steps:
            lines.plot(steps, values, "-o", color=_colour(index), label=run.label, markersize=3)
    lines.set_title("seconds per step", fontsize=10)
    lines.set_xlabel("step")
    lines.grid(alpha=0.3)
    lines.legend(fontsize=7)
    return _save(figure, out, "time")


def write_plots(runs: list[Run], out: str, collapses: dict[str, Collapse], fraction: float = 0.5) -> dict[str, str]:
    """Every plot the runs have data for, as {name: PNG path}."""
    regime_panels = lambda prefix: [(f"{prefix} {r}", [(f"{prefix}/{r}", "-o")]) for r in REGIMES]
    plots = {
        "loss": _line_plot(runs, out, "loss", "loss", [("loss", [("loss", "-o")])], collapses),
        "loss_regimes": _line_plot(runs, out, "loss_regimes", "loss per regime", regime_panels("loss")),
        "regime_fractions": _line_plot(
            runs, out, "regime_fractions", "fraction of tokens per regime", regime_panels("frac")
        ),
        "gap": _line_plot(
            runs,
            out,
            "gap",
            "privilege advantage gap",
            [
                ("gap: mean (solid) and threshold Ā (dashed)", [("gap/mean", "-o"), ("gap/threshold", "--")]),
                ("threshold of q_S + q_T", [("prob_sum/threshold", "-o")]),
            ],
        ),
        "reward": _line_plot(
            runs, out, "reward", "verifiable reward (objective.reward)", [("reward: mean", [("reward/mean", "-o")])]
        ),
        "gap_histogram": _gap_histogram(runs, out),
        "entropy": _entropy_plot(runs, out, collapses, fraction),
        "completion_length": _line_plot(
            runs,
            out,
            "completion_length",
            "completion length (tokens)",
            [
                ("mean", [("completion_length/mean", "-o")]),
                ("min and max", [("completion_length/min", "-o"), ("completion_length/max", "-o")]),
                ("ended before an answer", [("completion/early_eos", "-o")]),
                ("student's probability of end-of-sequence", [("eos_prob/student", "-o")]),
            ],
            collapses,
        ),
        "eval": _line_plot(
            runs,
            out,
            "eval",
            "evaluation",
            [
                ("answer accuracy", [("eval/answer_accuracy", "-o")]),
                ("full match", [("eval/full_match", "-o")]),
                ("validation accuracy", [("eval/validation_accuracy", "-o")]),
                ("validation pass@k", [(f"eval/validation_pass@{k}", "-o") for k in (2, 4, 8, 16)]),
            ],
            collapses,
        ),
        "time": _time_plot(runs, out),
        "optimizer": _line_plot(
            runs,
            out,
            "optimizer",
            "optimizer",
            [
                ("learning rate", [("lr", "-")]),
                ("gradient norm", [("grad_norm", "-o")]),
            ],
        ),
    }
    return {name: path for name, path in plots.items() if path is not None}


@dataclass
class Report:
    html_path: str
    plots: dict[str, str]
    runs: list[Run]
    collapses: dict[str, Collapse]

    @property
    def warnings(self) -> list[str]:
        return [self.collapses[run.label].message() for run in self.runs if run.label in self.collapses]


def build_report(
    paths: list[str], out: str, token_steps: int = 2, collapse_fraction: float = 0.5, max_samples: int | None = None
) -> Report:
    """Read the runs under `paths`, write their plots and `report.html` into `out`."""
    if not 0 < collapse_fraction < 1:
        raise ValueError(f"collapse fraction must lie in (0, 1), got {collapse_fraction}")
    runs = load_runs(paths)
    os.makedirs(out, exist_ok=True)
    collapses = {run.label: c for run in runs if (c := find_collapse(run, collapse_fraction)) is not None}
    plots = write_plots(runs, out, collapses, collapse_fraction)
    page = render_html(runs, plots, collapses, token_steps, max_samples, collapse_fraction)
    html_path = os.path.join(out, "report.html")
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return Report(html_path, plots, runs, collapses)
