"""The command-line convention shared by the `trl-ltc` subcommands.

Every subcommand parses its options with TRL's `TrlParser` over dataclasses, so that `--config FILE.yaml` sets any of
them and flags override the file. Options are spelled as in TRL (`--model_name_or_path`, `--dataset_name`,
`--max_completion_length`, `--output_dir`, `--disable_tqdm`, ...). The spellings of earlier releases still work for
one release: `rename_deprecated_flags` maps them to the new names with a `FutureWarning`.

A `trl-ltc distill` recipe can be given to `--config` of the commands that read a teacher/student pair
(`diagnose`, `evaluate`): its keys that the command does not have are ignored (TRL's `fail_with_unknown_args=False`),
while an unknown flag on the command line is still an error.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterable, Mapping

from trl import TrlParser

CONFIG_HELP = (
    "Every option below can also be set in a YAML file given with `--config FILE.yaml`; flags override the file."
)


class CommandParser(TrlParser):
    """A `TrlParser` whose `--config` file may hold keys the command does not use (a `trl-ltc distill` recipe).

    Args:
        dataclass_types: the dataclasses of the command's options.
        aliases: deprecated flag -> its new flag (`{"--student": "--model_name_or_path"}`), listed in `--help`.
        config_exclude: option names never read from `--config` (e.g. `output_dir`: a recipe's `output_dir` is its
            training folder, not where this command writes).
        **kwargs: passed to `TrlParser` (`prog`, `description`, `epilog`, `allow_abbrev`, ...).
    """

    def __init__(
        self,
        dataclass_types,
        aliases: Mapping[str, str] | None = None,
        config_exclude: Iterable[str] = (),
        **kwargs,
    ):
        self.aliases = dict(aliases or {})
        self.config_exclude = frozenset(config_exclude)
        epilog = kwargs.pop("epilog", None)
        if self.aliases:
            renamed = ", ".join(f"{old} -> {new}" for old, new in self.aliases.items())
            deprecated = f"Deprecated spellings, still accepted for one release (with a warning): {renamed}."
            epilog = f"{epilog} {deprecated}" if epilog else deprecated
        super().__init__(dataclass_types, epilog=epilog, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """TRL's `set_defaults_with_config` without the keys of `config_exclude` (they are not consumed)."""
        kept = {key: value for key, value in kwargs.items() if key not in self.config_exclude}
        return super().set_defaults_with_config(**kept)

    def parse_command(self, argv: Iterable[str] | None = None, passthrough: bool = False):
        """Parse `argv` (default: `sys.argv[1:]`) and its `--config` file into the command's dataclasses.

        Deprecated flags are renamed first (with a `FutureWarning`). Keys of the `--config` file that no dataclass
        declares are ignored. Flags that no dataclass declares are an error (exit status 2), unless `passthrough`: then
        they are returned, in order, after the dataclasses.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        argv = rename_deprecated_flags(argv, self.aliases, self.prog)
        if "--config" in argv and argv.index("--config") == len(argv) - 1:
            self.error("argument --config: expected one argument")
        *dataclasses, _config_unused, cli_unused = self.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        if passthrough:
            return (*dataclasses, cli_unused)
        if cli_unused:
            self.error(f"unrecognized arguments: {' '.join(cli_unused)}")
        return dataclasses[0] if len(dataclasses) == 1 else tuple(dataclasses)


def rename_deprecated_flags(argv: list[str], aliases: Mapping[str, str], prog: str = "trl-ltc") -> list[str]:
    """`argv` with each deprecated flag of `aliases` (`--old` or `--old=value`) replaced by its new name.

    Each deprecated flag found warns once per call with a `FutureWarning` naming the old and the new flag. Nothing
    after a bare `--` is renamed.
    """
    renamed, warned = [], set()
    for index, arg in enumerate(argv):
        if arg == "--":
            renamed += argv[index:]
            break
        name, sep, value = arg.partition("=")
        new = aliases.get(name) if name.startswith("--") else None
        if new is None:
            renamed.append(arg)
            continue
        if name not in warned:
            warned.add(name)
            warnings.warn(
                f"`{prog} {name}` is deprecated and will be removed in the next release; use `{new}` instead.",
                FutureWarning,
                stacklevel=3,
            )
        renamed.append(f"{new}{sep}{value}")
    return renamed


def missing_error(parser: argparse.ArgumentParser, names: Iterable[str], hint: str = "") -> None:
    """Exit with a usage error naming the missing options, e.g. `missing --model_name_or_path (formerly --student)`."""
    formerly = {new: old for old, new in getattr(parser, "aliases", {}).items()}
    flags = []
    for name in names:
        flag = f"--{name}"
        flags.append(f"{flag} (formerly {formerly[flag]})" if flag in formerly else flag)
    parser.error(f"missing {', '.join(flags)}{f' ({hint})' if hint else ''}")
