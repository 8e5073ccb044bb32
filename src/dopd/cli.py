"""The `dopd` command (train, lab, lab pretrain, report, hints, eval, bench): thin wrappers that parse arguments,
call one function and say where results went. The options of `lab`, `hints`, `eval` and `bench` are made from
their settings' dataclasses (`options.SettingsOptions`), as `train --help` lists the keys of its config's: a
setting, its default and its help are written once, beside each other."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, keys_help
from .diagnostics import NonFiniteError
from .options import SettingsOptions


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    if args.dry_run:  # the settings checked (every check that needs no model or data), nothing loaded
        from .config import teacher_views
        from .objectives import build_objective

        print(f"config ok: {build_objective(config.objective)!r}")
        for name, view in teacher_views(config).items():
            server = view.model.teacher_server.url
            where = f" (served by {server})" if server else ""
            print(f"teacher {name or 'model.teacher'}: {view.model.teacher}{where}")
        return 0
    result = train(config)
    print(f"run directory: {result.run_dir}")
    print(f"final model:   {result.final_dir}")
    if result.last_metrics:
        print(f"last step:     loss {result.last_metrics.get('loss', float('nan')):.4g}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    import os
    import time

    from .lab.config import LabConfig
    from .lab.models import WeakPairError
    from .lab.results import kind_markdown
    from .lab.runner import run_lab

    values = args.settings.values(args)
    values["out"] = values.get("out") or os.path.join("runs", time.strftime("lab-%Y%m%d-%H%M%S"))
    if args.quick and args.full:
        raise ConfigError("--quick and --full contradict each other; choose one")
    if args.study:
        return _lab_study(args, values)
    config = LabConfig.quick(**values) if args.quick else LabConfig.full(**values) if args.full else LabConfig(**values)
    try:
        results = run_lab(config)
    except (ValueError, WeakPairError) as error:
        raise ConfigError(str(error)) from None
    for kind in results["kinds"]:
        print(f"\n{kind_markdown(results, kind)}")
    print(f"\nresults: {os.path.join(config.out, 'results.json')} and results.md; plots under {config.out}/<kind>/")
    print(f"wall time: {results['timing']['total']} s")
    return 0


def _lab_study(args: argparse.Namespace, values: dict) -> int:
    import os

    from .lab.config import LabConfig
    from .lab.models import WeakPairError
    from .lab.study import STUDY_LR_GRID, run_study, summary_line

    for key in ("methods", "privilege"):
        if key in values:
            raise ConfigError(f"--{key} with --study: a study chooses its methods and kinds; leave --{key} out")
    if args.full:
        raise ConfigError("--full with --study: give --seeds (and --lr-grid) to size a study")
    if not args.quick:
        values.setdefault("lr_grid", list(STUDY_LR_GRID))
    config = LabConfig.quick(**values) if args.quick else LabConfig(**values)
    try:
        results = run_study(args.study, config)
    except (ValueError, WeakPairError) as error:
        raise ConfigError(str(error)) from None
    print(f"\nstudy {results['study']}: the DOPD variant minus each baseline (points, mean ± SE over seeds)")
    print(summary_line(results))
    print(f"\nresults: {os.path.join(config.out, 'study.md')}, study.json and study.png; each level's lab below it")
    print(f"wall time: {results['seconds']} s")
    return 0


def _lab_pretrain(args: argparse.Namespace) -> int:
    import shlex
    import time

    import torch

    from .lab.config import LabConfig, PretrainConfig
    from .lab.models import build_pair, pretrain_target
    from .lab.properties import describe_weakness, properties_hold

    before = [name for name in [*LabConfig.__dataclass_fields__, "quick", "full"] if getattr(args, name) is not None]
    if before:
        options = ", ".join("--" + name.replace("_", "-") for name in before)
        raise ConfigError(
            f"{options}: an option of `dopd lab`, not of `dopd lab pretrain` (its options follow `pretrain`)"
        )
    config = PretrainConfig(**args.settings.values(args))
    try:
        pair_config, out = pretrain_target(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    torch.set_num_threads(config.threads)
    start = time.time()
    # The pair records the command that made it (lab_pair.json).
    pair = build_pair(pair_config, out, n_eval=config.n_eval, command="dopd " + shlex.join(args.argv))
    holds = properties_hold(pair.properties.get("checks", {}))
    print(f"wrote {pair.path} in {time.time() - start:.0f} s; properties hold: {holds}")
    if pair.weak:
        print(describe_weakness(pair.properties, pair_config.task))
    return 0


def _report(args: argparse.Namespace) -> int:
    import os

    from .report import build_report

    out = args.out or os.path.join(args.run_dirs[0], "report")
    try:
        report = build_report(args.run_dirs, out, args.token_steps, args.collapse_fraction, args.max_samples)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    print(f"runs:   {', '.join(run.label for run in report.runs)}")
    print(f"report: {report.html_path}")
    print(f"plots:  {', '.join(report.plots.values()) or 'none (no metrics yet)'}")
    for warning in report.warnings:
        print(warning)
    return 0


def _hints(args: argparse.Namespace) -> int:
    from .hints import HintsSpec, describe, run_hints

    spec = HintsSpec(**args.settings.values(args))
    try:
        summary = run_hints(spec)
    except ValueError as error:  # ConfigError included: one line, non-zero exit
        raise ConfigError(str(error)) from None
    for line in describe(summary, spec.output_column):
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import os
    import time

    from .evaluate import EvalSpec, evaluate, results_table, table_path

    values = args.settings.values(args)
    values["out"] = values.get("out") or os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S.json"))
    spec = EvalSpec(**values)
    try:
        report = evaluate(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(results_table(report))
    if report["completions_at_token_limit"]:
        print(
            f"note: {report['completions_at_token_limit']} completions stopped at --max-new-tokens "
            f"{spec.sampling.max_new_tokens} without an end-of-sequence token"
        )
    print(f"report: {spec.out} and {table_path(spec.out)}")
    print(f"wall time: {report['wall_seconds']} s")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os
    import time

    from .bench import BenchSpec, bench, markdown

    values = args.settings.values(args)
    values["out"] = values.get("out") or os.path.join("runs", time.strftime("bench-%Y%m%d-%H%M%S.json"))
    spec = BenchSpec(**values)
    try:
        report = bench(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(markdown(report))
    print(f"report: {spec.out} and {spec.out[: -len('.json')]}.md")
    print(f"wall time: {report['wall_seconds']} s")
    return 0


# ---------------------------------------------------------------------------------- options from the settings


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`dopd lab: error: argument --steps: invalid int value: 'x'`), without
    the usage block: every bad input of every command reads the same way."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dopd", description="Dual On-policy Distillation and its baselines.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser(
        "train",
        help="distil a student from a teacher with privileged context",
        description="Train a student by on-policy distillation. Settings come from a YAML file and dotted "
        "key=value overrides, e.g. `dopd train --config recipe.yaml objective.method=opd train.steps=50`.",
        epilog="keys (default, meaning):\n" + keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file with the settings")
    train.add_argument("overrides", nargs="*", help="dotted key=value settings, applied after the file")
    train.add_argument(
        "--dry-run", action="store_true", help="check the settings and print the objective and teachers, load nothing"
    )
    train.set_defaults(handler=_train)

    _add_lab_parser(commands)
    report = commands.add_parser(
        "report",
        help="plots and a token-level HTML page of one or more runs",
        description="Read run directories (or a lab output directory, which expands to its runs), write PNG plots "
        "and one self-contained report.html. Works on runs in progress.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or lab output directories")
    report.add_argument("--out", help="output directory (default: RUN_DIR/report for the first RUN_DIR)")
    report.add_argument("--token-steps", type=int, default=2, help="latest sampled steps in the token view")
    report.add_argument("--max-samples", type=int, help="completions shown per sampled step (default all saved)")
    report.add_argument(
        "--collapse-fraction",
        type=float,
        default=0.5,
        help="flag entropy collapse below this fraction of the first step's entropy",
    )
    report.set_defaults(handler=_report)
    _add_hints_parser(commands)
    _add_eval_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_lab_parser(commands) -> None:
    from .lab.config import LabConfig, PretrainConfig
    from .lab.methods import split_methods
    from .lab.study import STUDIES, STUDY_LR_GRID

    lab = commands.add_parser(
        "lab",
        help="compare methods on tiny models trained here (the privilege-illusion lab)",
        description="Distil the lab's tiny student from its tiny teacher with each method, the same budget, seeds "
        "and prompts for all, with supervised fine-tuning (sft) and vanilla OPD (opd) as references that show the "
        "budget moves the student. Reports test accuracy (mean ± standard error over seeds) on the prompts that "
        "determine the answer and on those where only the privileged input does, at the common rate picked on "
        "validation and at each method's own, DOPD's paired differences, and plots. `dopd lab pretrain` builds a "
        "pair.",
        epilog="time on a 2-core CPU once the pair exists: `dopd lab` at most 15 minutes (5 methods x 2 rates x 3 "
        "seeds); `--quick` at most 60 seconds (one seed, one rate, 6 steps); `--full` at most 45 minutes (5 seeds "
        "and the ablations of the privileged self's weights and of the regimes). A task without a shipped pair "
        "builds one first (at most 10 minutes).",
    )
    settings = SettingsOptions(LabConfig, parse={"methods": split_methods}, repeat=["pair"])
    settings.add_to(lab)
    lab.add_argument(
        "--quick", action="store_true", default=None, help="the same pipeline at a size that takes under a minute"
    )
    lab.add_argument("--full", action="store_true", default=None, help="five seeds and the ablations")
    lab.add_argument(
        "--study",
        metavar="FACTOR",
        choices=sorted(STUDIES),
        help="run one factor's grid instead: DOPD's paired differences against opd-priv and opd at each level, "
        f"in study.md, study.json and study.png (one of {', '.join(STUDIES)}; rate {STUDY_LR_GRID[0]:g} unless "
        "--lr-grid is given; at most 20 minutes for components, top-k, weights, share on 2 cores)",
    )
    lab.set_defaults(handler=_lab, settings=settings)

    pretrain = lab.add_subparsers(dest="lab_command", title="subcommands", parser_class=_Parser).add_parser(
        "pretrain",
        help="pretrain a lab teacher/student pair and measure its properties",
        description="Pretrain the lab's teacher, choose the student among its checkpoints (or pretrain a student of "
        "its own) and measure the pair's properties; the pair records this command. scripts/pretrain_lab.py is "
        "the same command.",
    )
    settings = SettingsOptions(PretrainConfig, repeat=["pair"], dest_prefix="pretrain_")
    settings.add_to(pretrain)
    pretrain.set_defaults(handler=_lab_pretrain, settings=settings)


def _add_hints_parser(commands) -> None:
    from .hints import HintsSpec

    hints = commands.add_parser(
        "hints",
        help="add a privileged_context column to a data set (rule-based forms or a served model)",
        description="Read a data set with a question, a reference solution and an answer, and write it back with "
        "a privileged_context column in one form. Rule-based: answer, solution, stepwise (the plan, computed values "
        "and final answer hidden), stepwise-executed, summary, boxes (box annotations for VLMs). generated: a model "
        "served over the OpenAI-compatible chat API writes hints without execution; each is checked by a rule and "
        "a second request. Generated rows are saved as they come in OUT.partial; a rerun continues from it.",
    )
    settings = SettingsOptions(HintsSpec, aliases={"prompt_column": ["--question-column"]})
    settings.add_to(
        hints,
        groups={
            "generated form (OpenAI-compatible chat API)": [
                "base_url", "model", "api_key", "concurrency", "retries", "retry_wait", "timeout", "temperature",
                "max_tokens", "max_hints", "verify",
            ],
            "boxes form (VLM)": [
                "boxes_column", "labels_column", "coords", "image_column", "width_column", "height_column",
            ],
        },
    )  # fmt: skip
    hints.set_defaults(handler=_hints, settings=settings)


def _add_eval_parser(commands) -> None:
    from .evaluate import EVAL_OPTIONS, EvalSpec

    evaluation = commands.add_parser(
        "eval",
        help="sample answers from a model on a data set and score them (accuracy, pass@k, gap recovery)",
        description="Sample --samples completions per prompt, check them against the reference answers (math: "
        "equivalence by math-verify; exact: normalized final answer; lab:TASK: a lab task's checker) and write a "
        "JSON report and a markdown table. --teacher-result and --student-result (an accuracy or an earlier report "
        "on the same data) add the gap recovery (model - student) / (teacher - student).",
    )
    settings = SettingsOptions(EvalSpec, flags=EVAL_OPTIONS)
    settings.add_to(evaluation)
    evaluation.set_defaults(handler=_eval, settings=settings)


def _add_bench_parser(commands) -> None:
    from .bench import BenchSpec

    bench = commands.add_parser(
        "bench",
        help="score a checkpoint on standard benchmarks with lm-evaluation-harness (pip install -e '.[bench]')",
        description="Run lm-evaluation-harness on a checkpoint: the paper's benchmarks by name (--benchmarks) or "
        "harness tasks (--tasks, custom ones from --include-path). Writes a JSON report and a markdown table; "
        "--teacher-result and --student-result (earlier reports) add the gap recovery (model - student) / "
        "(teacher - student) per benchmark and on average. docs/evaluation.md lists the benchmarks and their tasks.",
    )
    settings = SettingsOptions(BenchSpec)
    settings.add_to(bench)
    bench.set_defaults(handler=_bench, settings=settings)


class _StderrLines(logging.Handler):
    """dopd's own lines (one per loaded model, warnings) on the stderr of the moment, which tests swap."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"dopd: {record.getMessage()}\n")


def _log_to_stderr() -> None:
    logger = logging.getLogger("dopd")
    if not any(isinstance(handler, _StderrLines) for handler in logger.handlers):
        logger.addHandler(_StderrLines())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `dopd lab pretrain` records in the pair it builds
    _log_to_stderr()
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"dopd: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:  # a run that went wrong numerically: one line, its last checkpoint intact
        print(f"dopd: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
