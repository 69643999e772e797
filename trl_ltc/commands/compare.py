"""`trl-ltc compare`: train one student per (policy, seed) and evaluate them all into one table (`trl_ltc.compare`)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..compare import (
    TOP_LEVEL_KEYS,
    CompareConfigError,
    Comparison,
    load_comparison,
    recipe_path,
    run_comparison,
)
from ..reporting import format_duration, show_progress_logs
from ._args import CommandParser


@dataclass
class CompareArguments:
    """The options of `trl-ltc compare`; the comparison itself is described by the YAML given to `--config`."""

    seeds: str | None = field(
        default=None, metadata={"help": "Comma-separated seeds, e.g. 0,1,2 (unset: the config's `seeds`)."}
    )
    policies: str | None = field(
        default=None, metadata={"help": "Comma-separated policy names: run only these (unset: all)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where runs and results go (unset: the config's `output_dir`)."}
    )
    smoke: bool = field(
        default=False,
        metadata={
            "help": "Run the same pipeline on tiny random models and the bundled prompts, one short step per run "
            "(a test)."
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "Train and evaluate the runs in this many processes (one torch thread each), on disjoint groups of "
            "policies, after the shared reference rows and diagnostics; e.g. 2 on 2 CPU cores. In-process training only."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads (unset: torch's own; --smoke: 1). On a CPU shared with other jobs, fewer "
            "threads than cores avoid oversubscription, which can slow generation down several times."
        },
    )


# Keys only a comparison config has: a YAML with none of them is taken for a `trl-ltc distill` recipe.
COMPARISON_ONLY_KEYS = tuple(key for key in TOP_LEVEL_KEYS if key != "output_dir")


def build_parser(prog: str = "trl-ltc compare") -> CommandParser:
    """The parser of `trl-ltc compare`; `--config` is the comparison YAML, read by `trl_ltc.compare.load_comparison`
    (see `split_config`), not options of this parser."""
    return CommandParser(
        [CompareArguments],
        prog=prog,
        description="Train one student per (supervision policy, seed) from the same initial student with the same "
        "prompts, order and seeds, evaluate each on held-out problems (reverse KL to the teacher, answer accuracy, "
        "completion length), and write results.csv, results.md and results.png (with `curves:`, also curves.csv and "
        "curves.png: accuracy against compute along training). Finished runs are not redone. "
        f"`--config FILE.yaml`: the comparison config (default: the quickstart comparison, {recipe_path()}); a "
        "`trl-ltc distill` recipe is used as the `recipe:` of a comparison of the `full` and `release` policies "
        "(seed 0) evaluated on its `dataset_test_split` (written to OUTPUT_DIR/comparison.yaml), and refused with "
        "the fix when it names no `dataset_test_split`.",
    )


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """`(config, rest)`: the value of `--config` in `argv` (None without one) and the other arguments."""
    argv = list(argv)
    if "--config" not in argv:
        return None, argv
    index = argv.index("--config")
    if index + 1 >= len(argv):
        build_parser().error("argument --config: expected one argument")
    return argv[index + 1], argv[:index] + argv[index + 2 :]


def comparison_config(path: str, output_dir: str | None = None) -> str:
    """`path` if it is a comparison config; for a `trl-ltc distill` recipe, the path of a comparison config that runs
    it (written into the output folder), or a `CompareConfigError` that says how to write one."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return path  # `load_comparison` reports it
    if not isinstance(raw, dict) or any(key in raw for key in COMPARISON_ONLY_KEYS):
        return path
    example = (
        f"recipe: {Path(path).resolve()}\npolicies: [full, release]\nseeds: [0, 1]\n"
        "evaluation:\n  datasets:\n    - {dataset: HELD_OUT.jsonl, num_problems: 64}\n"
    )
    test_split, dataset = raw.get("dataset_test_split"), raw.get("dataset_name")
    if not dataset or not test_split:
        raise CompareConfigError(
            f"{path} is a `trl-ltc distill` recipe, not a comparison config (it has none of the keys "
            f"{', '.join(COMPARISON_ONLY_KEYS)}). A comparison needs held-out problems: set `dataset_name` and "
            "`dataset_test_split` in the recipe, or write a comparison config that points at it (see "
            f"configs/compare_quickstart.yaml), e.g.\n{example}"
        )
    held_out = {"name": "test", "dataset": dataset, "split": test_split}
    for key, entry in (("dataset_config", "config"), ("dataset_prompt_column", "prompt_column")):
        if raw.get(key) is not None:
            held_out[entry] = raw[key]
    if raw.get("dataset_prompt_as_chat") is not None:
        held_out["prompt_as_chat"] = raw["dataset_prompt_as_chat"]
    out = Path(output_dir or "runs/compare")
    comparison = {
        "recipe": str(Path(path).resolve()),
        "policies": ["full", "release"],
        "seeds": [0],
        "evaluation": {"datasets": [held_out]},
        "output_dir": str(out),
    }
    out.mkdir(parents=True, exist_ok=True)
    written = out / "comparison.yaml"
    written.write_text(yaml.safe_dump(comparison, sort_keys=False))
    return str(written)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    config, rest = split_config(sys.argv[1:] if argv is None else argv)
    args = parser.parse_command(rest)
    show_progress_logs()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else None
    output_dir = args.output_dir
    if args.smoke and output_dir is None:
        output_dir = "runs/compare_smoke"
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be >= 1; got {args.num_threads}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}")
    try:
        config = comparison_config(config, output_dir) if config else recipe_path()
        comparison = load_comparison(
            config, seeds=args.seeds, output_dir=output_dir, smoke=args.smoke, policies=policies
        )
    except CompareConfigError as error:
        parser.exit(2, f"trl-ltc compare: error: {error}\n")
    if args.workers > 1 and comparison.launcher:
        parser.exit(
            2, "trl-ltc compare: error: --workers: runs with a `launcher` run in their own processes already.\n"
        )
    import torch

    threads, previous = args.num_threads or (1 if args.smoke else None), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compare(comparison, args.workers, args.smoke)
    except CompareConfigError as error:  # e.g. finished runs made with other settings
        parser.exit(2, f"trl-ltc compare: error: {error}\n")
    finally:
        torch.set_num_threads(previous)


def _compare(comparison: Comparison, workers: int = 1, smoke: bool = False) -> int:
    runs = comparison.runs()
    print(
        f"Comparing {len(comparison.policies)} policies x {len(comparison.seeds)} seeds = {len(runs)} runs "
        f"({', '.join(p.name for p in comparison.policies)}) into {comparison.output_dir}",
        flush=True,
    )
    start = time.perf_counter()
    if workers > 1:
        from ..compare.runner import run_parallel

        outcome = run_parallel(comparison, workers, smoke)
    else:
        outcome = run_comparison(comparison)
    print("\n" + (comparison.output_dir / "results.md").read_text(), flush=True)
    files = ", ".join(str(path) for path in outcome["files"].values())
    print(f"Wrote {files} in {format_duration(time.perf_counter() - start)}.")
    return 0
