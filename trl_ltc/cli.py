"""The `trl-ltc` command line: `trl-ltc COMMAND [ARGS...]`; `trl-ltc COMMAND --help` for each command."""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from . import __version__

# command -> (module with a `main(argv) -> int`, one-line description)
COMMANDS = {
    "distill": (
        "trl_ltc.commands.distill",
        "Train a student with TeachabilityGKDTrainer from a YAML recipe and/or flags.",
    ),
    "quickstart": (
        "trl_ltc.commands.quickstart",
        "The embedded CPU demo: SmolLM2-135M teacher, noisy student, LoRA, minutes.",
    ),
    "diagnose": (
        "trl_ltc.commands.diagnose",
        "Measure local teachability collapse on a teacher/student pair; plots + HTML.",
    ),
    "evaluate": (
        "trl_ltc.commands.evaluate",
        "Reverse KL to the teacher, answer accuracy and length of any checkpoint.",
    ),
    "compare": (
        "trl_ltc.commands.compare",
        "Train one student per (policy, seed) and evaluate them all into one table.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ltc",
        description="Teachability-aware on-policy distillation for Hugging Face TRL.",
        epilog="Run `trl-ltc COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"trl-ltc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, description) in COMMANDS.items():
        commands.add_parser(name, help=description, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # handles --help / --version / unknown commands
        parser.print_help()
        return 0
    module, _ = COMMANDS[argv[0]]
    result = import_module(module).main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
