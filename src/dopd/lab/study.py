"""`dopd lab --study FACTOR`; over 450 lines: each factor's levels, its labs, its paired table and plot in one.

One factor's grid, and DOPD's paired differences against privileged and vanilla OPD at each of its levels.

A factor is a list of levels. A level names the DOPD variant it measures (`dopd`, `dopd[top_k=4]`), the
privileged kind it reads, and the lab settings it changes (`undetermined_share`, `steps`, `pair`); levels with the same
settings share one lab run, so the study reuses the lab as it is: its pairs, seeds, worker processes, statistics,
budget check and attribution, with each lab's own `results.md` under `<out>/<settings>/`. At every level the
study reports the variant minus `opd-priv` and minus `opd`, paired over the same seeds, overall and on each part
of the test prompts, at the common rate and (with several rates) at each method's own rate; `study.json`,
`study.md` and `study.png` (the differences against the levels) go to `<out>`.

A difference is called resolved when it is at least twice its standard error; the tables say where it is not.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace

from ..run_dir import write_json_atomic, write_text_atomic
from .config import LabConfig

BASELINES = ("opd-priv", "opd")  # what each level's DOPD variant is compared with
PARTS = ("answer_accuracy", "determined", "undetermined")
# The study's rate unless --lr-grid says otherwise: the common rate the default lab picks on the shipped `order`
# pair (docs/lab_design.md). One rate keeps a study of one factor within 20 minutes on a 2-core machine.
STUDY_LR_GRID = [3e-4]


@dataclass(frozen=True)
class Level:
    name: str  # as the tables and the plot show it
    variant: str = "dopd"  # the DOPD variant measured at this level (a --methods entry)
    kind: str = "hints"  # the privileged kind
    # LabConfig fields this level changes. A `pair` value is added to the lab's own `--pair` settings, its
    # placeholders (THE_TASK, OTHER_CONVENTION, SIZE_ROLES below) resolved for the lab's task and pair.
    settings: tuple[tuple[str, object], ...] = ()
    tag: str = ""  # the directory name of the level's lab (default: made from the settings)


# Placeholders in a level's `pair` settings, resolved for the lab's task and pair (`_resolve`): the task itself,
# the task's student task of another convention, and the sizes of the pair's teacher and student (`<teacher>`,
# `<student>`, as the task's pair config and the lab's `--pair` settings leave them).
THE_TASK, OTHER_CONVENTION, SIZE_ROLES = "<task>", "<other convention>", ("teacher", "student")
SAME_TASK, OTHER_TASK = f"student_task={THE_TASK}", f"student_task={OTHER_CONVENTION}"
TEACHER_SIZE, SMALL_SIZE = "student=<teacher>", "student=<student>"  # the pair's student is the smaller model


@dataclass(frozen=True)
class Study:
    name: str
    question: str  # what the factor asks, one line
    levels: tuple[Level, ...]


def _variants(name: str, question: str, variants: list[tuple[str, str]]) -> Study:
    return Study(name, question, tuple(Level(shown, variant) for shown, variant in variants))


STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        _variants(
            "components",
            "which of DOPD's parts costs or pays: JS on HT, the self targets, the routing, analytic terms",
            [
                ("dopd (paper)", "dopd"),
                ("reverse KL on HT", "dopd[divergence=reverse_kl]"),
                ("no self targets", "dopd[target=teacher]"),
                ("no routing", "dopd[routing=false]"),
                ("sampled terms", "dopd[granularity=sampled]"),
            ],
        ),
        _variants(
            "top-k",
            "the Top-K size of the LH, LL and HS terms (the lab's vocabulary has 63 tokens)",
            [
                ("K=2", "dopd[top_k=2]"),
                ("K=4", "dopd[top_k=4]"),
                ("K=16", "dopd[top_k=16]"),
                ("K=63", "dopd[top_k=63]"),
            ],
        ),
        _variants(
            "weights",
            "the regime weights beta_l (LH, HS), beta_w (LL) and the HT weight",
            [
                ("paper 0.6/0.3/1", "dopd"),
                ("halved 0.3/0.15/1", "dopd[beta_l=0.3,beta_w=0.15]"),
                ("equal 1/1/1", "dopd[beta_l=1.0,beta_w=1.0]"),
                ("HT x3 0.6/0.3/3", "dopd[ht_weight=3.0]"),
            ],
        ),
        Study(
            "share",
            "the share of problems whose answer only the privileged input determines (the pair stays the task's)",
            tuple(Level(f"{share:g}", settings=(("undetermined_share", share),)) for share in (0.0, 0.3, 0.6)),
        ),
        Study(
            "privilege",
            "what the privileged input holds: the plan (hints), the worked solution, or the answer alone",
            tuple(Level(kind, kind=kind) for kind in ("hints", "solution", "answer")),
        ),
        Study(
            "teachers",
            "one teacher for every row of a mixture against each task's own (a mixture task: --task order+arith)",
            tuple(
                Level(name, settings=(("teacher_per_task", own),))
                for name, own in (("one teacher", False), ("a teacher per task", True))
            ),
        ),
        Study(
            "mismatch",
            "a student of its own (the teacher's size and recipe, its own seed), pretrained in the teacher's "
            "convention or in another equally valid one (a task with a second convention: --task add)",
            (
                Level("same convention", settings=(("pair", (TEACHER_SIZE, SAME_TASK)),), tag="same-convention"),
                Level("own convention", settings=(("pair", (TEACHER_SIZE, OTHER_TASK)),), tag="own-convention"),
            ),
        ),
        Study(
            "capacity",
            "a student of its own (the teacher's recipe, its own seed) of the teacher's size or smaller",
            (
                Level("teacher's size", settings=(("pair", (TEACHER_SIZE, SAME_TASK)),), tag="teacher-size"),
                Level("smaller (2 x 48)", settings=(("pair", (SMALL_SIZE, SAME_TASK)),), tag="smaller"),
            ),
        ),
        Study(
            "horizon",
            "how long the methods train: 40 against 160 steps at the same rate",
            (Level("40 steps", settings=(("steps", 40),)), Level("160 steps", settings=(("steps", 160),))),
        ),
    )
}


def study_configs(study: Study, config: LabConfig) -> dict[tuple, LabConfig]:
    """One lab config per distinct settings of the levels, each under `<out>/<settings>`, with the baselines, the
    levels' variants and the privileged kinds its levels read. Checked here, before any work."""
    from .runner import check_lab_config

    if not study.levels:
        raise ValueError(f"study {study.name!r} has no levels")
    configs: dict[tuple, LabConfig] = {}
    for settings in dict.fromkeys(level.settings for level in study.levels):
        levels = [level for level in study.levels if level.settings == settings]
        methods = list(dict.fromkeys([*BASELINES, *(level.variant for level in levels)]))
        kinds = list(dict.fromkeys(level.kind for level in levels))
        slug = levels[0].tag or "-".join(
            f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}" for key, value in settings
        )
        lab = replace(config, methods=methods, privilege=kinds, out=os.path.join(config.out, slug or "lab"))
        changes = dict(settings)
        if "pair" in changes:
            changes["pair"] = [*config.pair, *(_resolve(item, config) for item in changes["pair"])]
        lab = replace(lab, **changes)
        check_lab_config(lab)
        configs[settings] = lab
    return configs


def _resolve(pair_setting: str, config: LabConfig) -> str:
    """`pair_setting` with its placeholders replaced: THE_TASK by the task, `<teacher>` and `<student>` by the sizes
    of the pair's models and OTHER_CONVENTION by the task's student task of another convention; one line when the
    setting needs one and the task has none."""
    from .models import default_pair_config, pair_config_with
    from .tasks import get_task

    task_name = config.task
    pair_setting = pair_setting.replace(THE_TASK, task_name)
    for role in SIZE_ROLES:
        if f"<{role}>" in pair_setting:
            size = asdict(getattr(pair_config_with(default_pair_config(task_name), config.pair), role))
            pair_setting = pair_setting.replace(
                f"<{role}>", "{" + ", ".join(f"{k}: {v}" for k, v in size.items()) + "}"
            )
    if OTHER_CONVENTION not in pair_setting:
        return pair_setting
    other = getattr(get_task(task_name), "other_convention", None)
    if other is None:
        raise ValueError(
            f"--study mismatch needs a task whose worked solutions have a second convention (add); task "
            f"{task_name!r} has none: give --task add, or a Task subclass that sets other_convention"
        )
    return pair_setting.replace(OTHER_CONVENTION, other)


def run_study(study: Study | str, config: LabConfig, log=print) -> dict:
    """Run every lab of the study (each a `dopd lab` run) and write the study's results to `config.out`."""
    if isinstance(study, str):
        if study not in STUDIES:
            raise ValueError(f"--study {study!r} is unknown; choose one of {', '.join(STUDIES)}")
        study = STUDIES[study]
    from .runner import run_lab

    if not config.out:
        raise ValueError("--out is required: the study's output directory")
    if os.path.exists(os.path.join(config.out, "study.json")):
        raise ValueError(f"--out {config.out} already holds a study's results; choose another directory")
    configs = study_configs(study, config)
    started = time.time()
    labs = {}
    for settings, lab in configs.items():
        shown = ", ".join(f"{key}={getattr(lab, key)}" for key, _ in settings) or "the lab's settings"
        log(f"study {study.name}: lab with {shown} -> {lab.out}")
        labs[settings] = run_lab(lab, log=log)
    results = study_results(study, config, labs, round(time.time() - started, 1))
    write_study(config.out, results)
    return results


def study_results(study: Study, config: LabConfig, labs: dict[tuple, dict], seconds: float) -> dict:
    """The study's levels: each variant against each baseline, overall and by part, at the common and own rates."""
    from .results import paired

    levels = []
    for level in study.levels:
        lab = labs[level.settings]
        k = lab["kinds"][level.kind]
        records, common, own = k["runs"], k["common_lr"], k["own_lr"]
        differences = {}
        for baseline in BASELINES:
            differences[baseline] = {
                "common": {part: paired(records, level.variant, baseline, common, key=part) for part in PARTS},
                "own": {
                    part: paired(records, level.variant, baseline, own[level.variant], own[baseline], key=part)
                    for part in PARTS
                },
            }
        main = k["main"]
        levels.append(
            {
                "level": level.name,
                "variant": level.variant,
                "kind": level.kind,
                "settings": dict(level.settings),
                "lab": lab["config"]["out"],
                "common_lr": common,
                "own_lr": {label: own[label] for label in (level.variant, *BASELINES)},
                "budget_moves_student": k["budget_moves_student"],
                "teacher": lab["teacher"]["none"]["answer_accuracy"],
                "student": lab["student"]["none"]["answer_accuracy"],
                "n_undetermined": lab["student"]["none"].get("n_undetermined"),
                "accuracy": {
                    label: {
                        "mean": main[label]["accuracy_mean"],
                        "se": main[label]["accuracy_se"],
                        "per_seed": dict(zip(main[label]["seeds"], main[label]["accuracy_per_seed"])),
                        "determined_change": main[label].get("determined_change"),
                        "undetermined_change": main[label].get("undetermined_change"),
                    }
                    for label in (level.variant, *BASELINES, "sft")
                },
                "differences": differences,
                "attribution": {
                    label: main[label].get("attribution", {}).get("end", {}) for label in (level.variant, BASELINES[0])
                },
            }
        )
    return {
        "study": study.name,
        "question": study.question,
        "task": config.task,
        "seeds": config.seeds,
        "steps": config.steps,
        "lr_grid": config.lr_grid,
        "levels": levels,
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------------- output


def _difference(d: dict) -> str:
    """`+1.2 ± 0.4` in points, marked `*` when the mean is less than twice its standard error."""
    if math.isnan(d["mean"]):
        return "—"
    resolved = len(d["per_seed"]) > 1 and abs(d["mean"]) >= 2 * d["se"]
    return f"{100 * d['mean']:+.1f} ± {100 * d['se']:.1f}{'' if resolved else ' *'}"


def _accuracy(a: dict) -> str:
    return f"{a['mean']:.3f} ± {a['se']:.3f}"


def study_markdown(results: dict) -> str:
    seeds = len(results["seeds"])
    lines = [
        f"# dopd lab study: {results['study']}",
        "",
        f"{results['question'][0].upper()}{results['question'][1:]}. Task `{results['task']}`, {seeds} seeds, "
        f"{results['steps']} steps, rates {', '.join(f'{lr:g}' for lr in results['lr_grid'])}. Differences are the "
        "level's DOPD variant minus the baseline in points of test accuracy, paired over the same seeds (mean ± "
        "standard error); `*` marks a difference smaller than twice its standard error.",
        "",
        "## At the common rate",
        "",
        "| level | variant | accuracy | − opd-priv | − opd | − opd-priv, determined | − opd-priv, undetermined "
        "| − opd, determined | − opd, undetermined | budget moves the student |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        d = level["differences"]
        cells = [
            _difference(d[baseline]["common"][part])
            for baseline, part in (
                ("opd-priv", "answer_accuracy"),
                ("opd", "answer_accuracy"),
                ("opd-priv", "determined"),
                ("opd-priv", "undetermined"),
                ("opd", "determined"),
                ("opd", "undetermined"),
            )
        ]
        lines.append(
            f"| {level['level']} | `{level['variant']}` | {_accuracy(level['accuracy'][level['variant']])} | "
            + " | ".join(cells)
            + f" | {'yes' if level['budget_moves_student'] else 'NO'} |"
        )
    lines += [
        "",
        "## Accuracy of every method at each level (common rate; change on the determined / undetermined parts)",
        "",
        "| level | common rate | teacher | student | sft | opd | opd-priv | variant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        acc = level["accuracy"]

        def shown(label: str, acc=acc) -> str:
            a = acc[label]
            parts = [a.get(f"{p}_change") for p in ("determined", "undetermined")]
            changes = " / ".join("—" if v is None else f"{100 * v:+.1f}" for v in parts)
            return f"{_accuracy(a)} ({changes})"

        lines.append(
            f"| {level['level']} | {level['common_lr']:g} | {level['teacher']:.3f} | {level['student']:.3f} | "
            f"{shown('sft')} | {shown('opd')} | {shown('opd-priv')} | {shown(level['variant'])} |"
        )
    if len(results["lr_grid"]) > 1:
        lines += [
            "",
            "## At each method's own rate (best on validation)",
            "",
            "| level | variant | rates (variant, opd-priv, opd) | − opd-priv | − opd |",
            "|---|---|---|---|---|",
        ]
        for level in results["levels"]:
            d, own = level["differences"], level["own_lr"]
            rates = ", ".join(f"{own[label]:g}" for label in (level["variant"], *BASELINES))
            lines.append(
                f"| {level['level']} | `{level['variant']}` | {rates} | "
                f"{_difference(d['opd-priv']['own']['answer_accuracy'])} | "
                f"{_difference(d['opd']['own']['answer_accuracy'])} |"
            )
    lines += _across_levels(results)
    attributed = [level for level in results["levels"] if any(level["attribution"].values())]
    if attributed:
        from .results import describe_attribution

        lines += [
            "",
            "## Attribution at the last step",
            "",
            "Shares of the tokens / the loss / the squared gradient norm on the student's logits, over the first "
            "training prompts' rollouts, mean over seeds (lab/attribution.py).",
            "",
        ]
        for level in attributed:
            for label, margins in level["attribution"].items():
                if margins:
                    lines.append(f"- {level['level']}, `{label}`: {describe_attribution(margins)}")
    lines += ["", f"Wall time: {results['seconds']} s. Each level's lab: its `results.md` under the study's directory."]
    return "\n".join(lines) + "\n"


def across_levels(results: dict) -> dict[str, list[dict | None]]:
    """Each method at each level minus itself at the first level, paired over the seeds both ran (points as
    fractions, like `results.paired`): what the factor does to each method. Only where the levels are different
    lab runs or privileged kinds (a study of variants compares them within one lab)."""
    from .results import standard_error

    levels = results["levels"]
    first = levels[0]
    if all((level["lab"], level["kind"]) == (first["lab"], first["kind"]) for level in levels):
        return {}
    out: dict[str, list[dict | None]] = {}
    for label in ("sft", *BASELINES, first["variant"]):
        row: list[dict | None] = []
        for level in levels[1:]:
            now, then = level["accuracy"][label].get("per_seed"), first["accuracy"][label].get("per_seed")
            seeds = [seed for seed in (now or {}) if seed in (then or {})]
            values = [now[seed] - then[seed] for seed in seeds]
            row.append(
                {"mean": sum(values) / len(values), "se": standard_error(values), "per_seed": values}
                if values
                else None
            )
        out[label] = row
    return out


def _across_levels(results: dict) -> list[str]:
    across = across_levels(results)
    if not across:
        return []
    levels = results["levels"]
    lines = [
        "",
        f"## Each method at each level minus itself at level {levels[0]['level']} (paired over seeds, points)",
        "",
        "| method | " + " | ".join(level["level"] for level in levels[1:]) + " |",
        "|---|" + "---|" * (len(levels) - 1),
    ]
    for label, row in across.items():
        lines.append(f"| {label} | " + " | ".join("—" if d is None else _difference(d) for d in row) + " |")
    return lines


def write_plot(path: str, results: dict) -> None:
    """The variant minus each baseline against the levels, overall and on each part, with ±1 standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [level["level"] for level in results["levels"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=False)
    titles = {"answer_accuracy": "all test prompts", "determined": "determined", "undetermined": "undetermined"}
    for axis, part in zip(axes, PARTS):
        for offset, baseline in zip((-0.08, 0.08), BASELINES):
            ds = [level["differences"][baseline]["common"][part] for level in results["levels"]]
            xs = [i + offset for i in range(len(names))]
            means = [100 * d["mean"] for d in ds]
            errors = [100 * d["se"] for d in ds]
            axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=f"DOPD variant − {baseline}")
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axis.set_title(titles[part])
        axis.set_ylabel("difference (points of test accuracy)")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"dopd lab study: {results['study']} ({results['task']}, {len(results['seeds'])} seeds)")
    figure.tight_layout()
    temporary = path + ".tmp.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)


def write_study(out: str, results: dict) -> None:
    """`study.png`, `study.json` and `study.md` (each written under a temporary name, then renamed)."""
    os.makedirs(out, exist_ok=True)
    write_plot(os.path.join(out, "study.png"), results)
    write_json_atomic(os.path.join(out, "study.json"), results)
    write_text_atomic(os.path.join(out, "study.md"), study_markdown(results))


def summary_line(results: dict) -> str:
    """One line per level for the terminal: the variant minus opd-priv and minus opd at the common rate."""
    rows = []
    for level in results["levels"]:
        d = level["differences"]
        rows.append(
            f"  {level['level']:<22} {level['variant']:<32} − opd-priv "
            f"{_difference(d['opd-priv']['common']['answer_accuracy']):<14} − opd "
            f"{_difference(d['opd']['common']['answer_accuracy'])}"
        )
    return "\n".join(rows)
