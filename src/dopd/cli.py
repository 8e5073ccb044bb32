"""The `dopd` command (train, lab, report, hints, eval): thin wrappers that parse arguments, call one function and
say where results went."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, keys_help
from .diagnostics import NonFiniteError


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    print(f"run directory: {result.run_dir}")
    print(f"final model:   {result.final_dir}")
    if result.last_metrics:
        print(f"last step:     loss {result.last_metrics.get('loss', float('nan')):.4g}")
    return 0


def _lab(args: argparse.Namespace) -> int:
    import os
    import time

    from .lab.methods import split_methods
    from .lab.models import WeakPairError
    from .lab.results import kind_markdown
    from .lab.runner import LabConfig, run_lab

    def listed(text, kind=str, option=""):
        if text is None:
            return None
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise ConfigError(f"{option} {text!r}: expected comma-separated {kind.__name__} values") from None

    values = {
        "task": args.task,
        "privilege": listed(args.privilege, option="--privilege"),
        "methods": None if args.methods is None else split_methods(args.methods),
        "seeds": listed(args.seeds, int, "--seeds"),
        "steps": args.steps,
        "lr_grid": listed(args.lr_grid, float, "--lr-grid"),
        "n_test": args.n_test,
        "workers": args.workers,
        "cache_dir": args.cache_dir,
        "pair": args.pair or None,
        "allow_weak_pair": args.allow_weak_pair or None,
        "out": args.out or os.path.join("runs", time.strftime("lab-%Y%m%d-%H%M%S")),
    }
    values = {k: v for k, v in values.items() if v is not None}
    if args.quick and args.full:
        raise ConfigError("--quick and --full contradict each other; choose one")
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

    values = {key: value for key, value in vars(args).items() if key in HintsSpec.__dataclass_fields__}
    spec = HintsSpec(**{key: value for key, value in values.items() if value is not None})
    try:
        summary = run_hints(spec)
    except ValueError as error:  # ConfigError included: one line, non-zero exit
        raise ConfigError(str(error)) from None
    for line in describe(summary, spec.output_column):
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import os
    import time

    from .evaluate import EvalSpec, evaluate, results_table, table_path

    values = {key: value for key, value in vars(args).items() if key in EvalSpec.__dataclass_fields__}
    values["out"] = args.out or os.path.join("runs", time.strftime("eval-%Y%m%d-%H%M%S.json"))
    if args.pass_k:
        try:
            values["pass_k"] = [int(k) for k in args.pass_k.split(",") if k]
        except ValueError:
            raise ConfigError(f"--pass-k {args.pass_k!r} must be comma-separated integers, e.g. 1,4,8") from None
    if args.chat_template_kwargs:
        try:
            values["chat_template_kwargs"] = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"--chat-template-kwargs is not JSON ({error}); e.g. '{{\"enable_thinking\": false}}'"
            ) from None
    spec = EvalSpec(**{key: value for key, value in values.items() if value is not None})
    try:
        report = evaluate(spec)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(results_table(report))
    if report["completions_at_token_limit"]:
        print(
            f"note: {report['completions_at_token_limit']} completions stopped at --max-new-tokens "
            f"{spec.max_new_tokens} without an end-of-sequence token"
        )
    print(f"report: {spec.out} and {table_path(spec.out)}")
    print(f"wall time: {report['wall_seconds']} s")
    return 0


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
    train.set_defaults(handler=_train)

    lab = commands.add_parser(
        "lab",
        help="compare methods on tiny models trained here (the privilege-illusion lab)",
        description="Distil the lab's tiny student from its tiny teacher with each method, the same budget, seeds "
        "and prompts for all, with supervised fine-tuning (sft) and vanilla OPD (opd) as references that show the "
        "budget moves the student. Reports test accuracy (mean ± standard error over seeds) on the prompts that "
        "determine the answer and on those where only the privileged input does, at the common rate picked on "
        "validation and at each method's own, DOPD's paired differences, and plots.",
        epilog="time on a 2-core CPU once the pair exists: `dopd lab` at most 15 minutes (5 methods x 2 rates x 3 "
        "seeds); `--quick` at most 60 seconds (one seed, one rate, 6 steps); `--full` at most 45 minutes (5 seeds "
        "and the ablations of the privileged self's weights and of the regimes). A task without a shipped pair "
        "builds one first (at most 10 minutes).",
    )
    lab.add_argument("--task", help="lab task: order, arith or lookup, or module:Class (default order)")
    lab.add_argument("--privilege", help="privileged kinds, comma-separated: hints, solution, answer (default hints)")
    lab.add_argument(
        "--methods",
        help="methods, comma-separated, each with optional objective overrides in brackets "
        "(dopd[self_weights=ema], dopd[regimes=LH+HT]); sft and opd are always added as references "
        "(default sft,opd,opd-priv,opsd,dopd)",
    )
    lab.add_argument("--seeds", help="seeds, comma-separated (default 0,1,2)")
    lab.add_argument("--steps", type=int, help="optimizer steps per run (default 40)")
    lab.add_argument("--lr-grid", help="learning rates every method runs at, comma-separated (default 1e-4,3e-4)")
    lab.add_argument("--n-test", type=int, help="held-out test prompts (default 1200)")
    lab.add_argument("--workers", type=int, help="runs in parallel processes, one thread each (default 2)")
    lab.add_argument(
        "--pair",
        action="append",
        metavar="KEY=VALUE",
        help="change the pair's pretraining (a LabPairConfig field), e.g. --pair teacher_steps=2000",
    )
    lab.add_argument(
        "--allow-weak-pair",
        action="store_true",
        help="compare methods on a pair that fails a required property (the results say so)",
    )
    lab.add_argument("--quick", action="store_true", help="the same pipeline at a size that takes under a minute")
    lab.add_argument("--full", action="store_true", help="five seeds and the ablations")
    lab.add_argument("--out", help="output directory (default: a new directory under runs/)")
    lab.add_argument("--cache-dir", help="where pretrained lab pairs are cached (default ~/.cache/dopd/lab)")
    lab.set_defaults(handler=_lab)

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
    return parser


def _add_hints_parser(commands) -> None:
    hints = commands.add_parser(
        "hints",
        help="add a privileged_context column to a data set (rule-based forms or a served model)",
        description="Read a data set with a question, a reference solution and an answer, and write it back with "
        "a privileged_context column in one form. Rule-based: answer, solution, stepwise (the plan, computed values "
        "and final answer hidden), stepwise-executed, summary, boxes (box annotations for VLMs). generated: a model "
        "served over the OpenAI-compatible chat API writes hints without execution; each is checked by a rule and "
        "a second request. Generated rows are saved as they come in OUT.partial; a rerun continues from it.",
    )
    hints.add_argument("--input", required=True, help="JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name")
    hints.add_argument(
        "--form", required=True, help="answer | solution | stepwise | stepwise-executed | summary | boxes | generated"
    )
    hints.add_argument("--out", required=True, help="output: .jsonl, .parquet, or a directory (save_to_disk)")
    hints.add_argument("--split", help="split of a hub data set or a saved DatasetDict (default train)")
    hints.add_argument("--name", help="hub data set configuration name")
    hints.add_argument("--max-rows", type=int, help="use only the first N rows")
    hints.add_argument(
        "--prompt-column",
        "--question-column",
        dest="prompt_column",
        help="the question or prompt column, as train and eval read it (default prompt)",
    )
    hints.add_argument("--solution-column", help="default solution")
    hints.add_argument("--answer-column", help="default answer")
    hints.add_argument("--output-column", help="default privileged_context")
    hints.add_argument("--prefix", help="text before the hints (default: a short label per form; '' for none)")
    hints.add_argument("--on-empty", help="drop (default) or keep rows whose privileged context comes out empty")
    hints.add_argument("--summary-words", type=int, help="summary: words kept per step (default 10)")
    hints.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    hints.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    served = hints.add_argument_group("generated form (OpenAI-compatible chat API)")
    served.add_argument("--base-url", help="e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL)")
    served.add_argument("--model", help="served model name (default: $OPENAI_MODEL)")
    served.add_argument("--api-key", help="bearer key (default: $OPENAI_API_KEY; vllm serve needs none)")
    served.add_argument("--concurrency", type=int, help="requests in flight (default 8)")
    served.add_argument("--retries", type=int, help="retries of a failed request (default 5)")
    served.add_argument("--retry-wait", type=float, help="first backoff in seconds, doubled each retry (default 1)")
    served.add_argument("--timeout", type=float, help="seconds per request (default 120)")
    served.add_argument("--temperature", type=float, help="sampling temperature (default 0)")
    served.add_argument("--max-tokens", type=int, help="longest reply in tokens (default 1024)")
    served.add_argument("--max-hints", type=int, help="hints asked for per row (default 8)")
    served.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        default=None,
        help="skip the second request that checks the hints (the answer rule still applies)",
    )
    boxes = hints.add_argument_group("boxes form (VLM)")
    boxes.add_argument("--boxes-column", help="[x1, y1, x2, y2] in pixels, or a list of them (default boxes)")
    boxes.add_argument("--labels-column", help="a label or a list of labels, one per box (default labels)")
    boxes.add_argument("--coords", help="pixel (Qwen2.5-VL, default) | norm1000 (Qwen3-VL) | norm1")
    boxes.add_argument("--image-column", help="images, for their size (default image)")
    boxes.add_argument("--width-column", help="image width in pixels, when there is no image column (default width)")
    boxes.add_argument("--height-column", help="image height in pixels (default height)")
    hints.set_defaults(handler=_hints)


def _add_eval_parser(commands) -> None:
    evaluation = commands.add_parser(
        "eval",
        help="sample answers from a model on a data set and score them (accuracy, pass@k, gap recovery)",
        description="Sample --samples completions per prompt, check them against the reference answers (math: "
        "equivalence by math-verify; exact: normalized final answer; lab:TASK: a lab task's checker) and write a "
        "JSON report and a markdown table. --teacher-result and --student-result (an accuracy or an earlier report "
        "on the same data) add the gap recovery (model - student) / (teacher - student).",
    )
    evaluation.add_argument("--model", required=True, help="model path or hub name")
    evaluation.add_argument(
        "--data", required=True, help="JSONL/JSON/Parquet/CSV file, save_to_disk directory or hub name"
    )
    evaluation.add_argument("--out", help="report .json; the table goes beside it as .md (default runs/eval-TIME.json)")
    evaluation.add_argument("--split", help="split of a hub data set or a saved DatasetDict (default test)")
    evaluation.add_argument("--name", help="hub data set configuration name")
    evaluation.add_argument("--max-rows", type=int, help="use only the first N rows")
    evaluation.add_argument("--prompt-column", help="default prompt (a string or chat messages)")
    evaluation.add_argument("--answer-column", help="default answer")
    evaluation.add_argument("--checker", help="math (default) | exact | lab:TASK (e.g. lab:arith)")
    evaluation.add_argument("--samples", type=int, help="completions per prompt (default 1)")
    evaluation.add_argument("--temperature", type=float, help="0 = greedy (default 0)")
    evaluation.add_argument("--top-p", type=float, help="nucleus sampling (default 1)")
    evaluation.add_argument("--top-k", type=int, help="top-k sampling (default 0: off)")
    evaluation.add_argument("--max-new-tokens", type=int, help="longest completion (default 1024)")
    evaluation.add_argument("--batch-size", type=int, help="prompts per generate call (default 16)")
    evaluation.add_argument("--pass-k", help="k values, comma-separated (default 1, powers of 2, --samples)")
    evaluation.add_argument("--seed", type=int, help="sampling seed (default 0)")
    evaluation.add_argument(
        "--privileged",
        action="store_true",
        default=None,
        help="insert the privileged context into the prompt (to measure a model reading it)",
    )
    evaluation.add_argument("--privileged-column", help="default privileged_context")
    evaluation.add_argument(
        "--template", help="how --privileged inserts it (default '{prompt}\\n\\n{privileged_context}')"
    )
    evaluation.add_argument(
        "--chat-template-kwargs", help="JSON for the chat template, e.g. '{\"enable_thinking\": false}'"
    )
    evaluation.add_argument("--tokenizer", help="tokenizer path or hub name (default: the model's)")
    evaluation.add_argument(
        "--dtype", help="auto (default: bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16"
    )
    evaluation.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda if available)")
    evaluation.add_argument("--trust-remote-code", action="store_true", default=None, help="passed to from_pretrained")
    evaluation.add_argument("--teacher-result", help="the teacher's accuracy in [0, 1] or its report .json")
    evaluation.add_argument("--student-result", help="the base student's accuracy in [0, 1] or its report .json")
    evaluation.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )
    evaluation.set_defaults(handler=_eval)


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
    args = build_parser().parse_args(argv)
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
