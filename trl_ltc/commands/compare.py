"""`trl-ltc compare`: train one student per (policy, seed) and evaluate them all into one table (`trl_ltc.compare`)."""

from __future__ import annotations

import argparse
import time

from ..compare import CompareConfigError, Comparison, load_comparison, recipe_path, run_comparison
from ..reporting import format_duration, show_progress_logs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ltc compare",
        description="Train one student per (supervision policy, seed) from the same initial student with the same "
        "prompts, order and seeds, evaluate each on held-out problems (reverse KL to the teacher, answer accuracy, "
        "completion length), and write results.csv, results.md and results.png. Finished runs are not redone.",
    )
    parser.add_argument("--config", help=f"comparison YAML (default: the quickstart comparison, {recipe_path()})")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the config's `seeds`)")
    parser.add_argument("--policies", help="comma-separated policy names: run only these (default: all)")
    parser.add_argument("--output_dir", help="where runs and results go (default: the config's `output_dir`)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run the same pipeline on tiny random models and the bundled prompts, one short step per run (a test)",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        help="torch CPU threads (default: torch's own; --smoke: 1). On a CPU shared with other jobs, fewer threads "
        "than cores avoid oversubscription, which can slow generation down several times",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show_progress_logs()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else None
    output_dir = args.output_dir
    if args.smoke and output_dir is None:
        output_dir = "runs/compare_smoke"
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be >= 1; got {args.num_threads}")
    try:
        comparison = load_comparison(
            args.config or recipe_path(), seeds=args.seeds, output_dir=output_dir, smoke=args.smoke, policies=policies
        )
    except CompareConfigError as error:
        parser.exit(2, f"trl-ltc compare: error: {error}\n")
    import torch

    threads, previous = args.num_threads or (1 if args.smoke else None), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compare(comparison)
    except CompareConfigError as error:  # e.g. finished runs made with other settings
        parser.exit(2, f"trl-ltc compare: error: {error}\n")
    finally:
        torch.set_num_threads(previous)


def _compare(comparison: Comparison) -> int:
    runs = comparison.runs()
    print(
        f"Comparing {len(comparison.policies)} policies x {len(comparison.seeds)} seeds = {len(runs)} runs "
        f"({', '.join(p.name for p in comparison.policies)}) into {comparison.output_dir}",
        flush=True,
    )
    start = time.perf_counter()
    outcome = run_comparison(comparison)
    print("\n" + (comparison.output_dir / "results.md").read_text(), flush=True)
    files = ", ".join(str(path) for path in outcome["files"].values())
    print(f"Wrote {files} in {format_duration(time.perf_counter() - start)}.")
    return 0
