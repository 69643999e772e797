"""The `trl-ltc` subcommands, one module each with its `build_parser()` and `main(argv) -> int`.

`trl_ltc.cli` dispatches `trl-ltc COMMAND ...` to `trl_ltc.commands.<command>.main`; the library code they run lives
in `trl_ltc.distill`, `trl_ltc.quickstart`, `trl_ltc.diagnostics`, `trl_ltc.evaluation` and `trl_ltc.compare`.
"""
