"""The `edm-sampling` command: `bench` (the main job), `tune` and `train`.

Each subcommand lives beside the code it drives and registers itself through a
`register(subparsers)` function; this module only dispatches, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

_SUBCOMMAND_MODULES = (
    "edm_sampling.evaluation.command",
    "edm_sampling.training.command",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    import importlib

    parser = argparse.ArgumentParser(prog="edm-sampling", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ValueError as error:
        parser.exit(2, f"edm-sampling {args.command}: error: {error}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
