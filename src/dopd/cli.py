"""The `dopd` command: thin wrappers that parse arguments, call one function and say where results went."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, keys_help


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    print(f"run directory: {result.run_dir}")
    print(f"final model:   {result.final_dir}")
    if result.last_metrics:
        print(f"last step:     loss {result.last_metrics.get('loss', float('nan')):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation and its baselines.")
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"dopd: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
