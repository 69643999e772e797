"""The `trl-ltc` subcommands, one module each with its `build_parser()` and `main(argv) -> int`.

`trl_ltc.cli` dispatches `trl-ltc COMMAND ...` to `trl_ltc.commands.<command>.main`; the library code they run lives
in `trl_ltc.distill`, `trl_ltc.quickstart`, `trl_ltc.diagnostics`, `trl_ltc.evaluation` and `trl_ltc.compare`.

Every command parses its options with TRL's `TrlParser` over dataclasses (`DiagnoseArguments`, `EvaluateArguments`,
...), takes `--config FILE.yaml` and spells its options as TRL does; `trl_ltc.commands._args` holds what they share
(the parser that ignores a recipe's unused keys, the deprecated flag spellings).
"""

from ._args import CommandParser, rename_deprecated_flags

__all__ = ["CommandParser", "rename_deprecated_flags"]
