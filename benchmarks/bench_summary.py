"""A compact, paired summary of a `trl-ltc compare` run from its results.csv: per policy, average pass@1 (mean over
the evaluation sets), its paired difference against `full` on the same seed (mean ± sample std over seeds, and each
seed's value), greedy accuracy, compute, generated tokens, and the paired difference against `full` at equal compute
(`delta_at_equal_compute`, on the curve sets).

    python benchmarks/bench_summary.py runs/compare_lab_compute/results.csv

Prints a markdown table (ratios and differences, not times). Not a test.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict


def _float(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    runs = defaultdict(dict)
    references = {}
    for row in rows:
        if row["kind"] == "reference":
            references[row["policy"]] = row
        elif row["kind"] == "run":
            runs[row["policy"]][row["seed"]] = row
    full = runs.get("full", {})
    lines = [
        (
            "| policy | seeds | average pass@1 (%) | Δ vs full, paired (points; per seed) | greedy (%) | compute (TFLOP) "
            "| generated tokens (k) | Δ vs full at equal compute, curve set (points) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in references.items():
        lines.append(
            f"| {name} | – | {100 * float(row['accuracy']):.1f} | | {100 * float(row['accuracy_greedy']):.1f} | | | |"
        )
    for policy, by_seed in runs.items():
        seeds = sorted(by_seed)
        accuracy = [_float(by_seed[s]["accuracy"]) for s in seeds]
        deltas = (
            [100 * (_float(by_seed[s]["accuracy"]) - _float(full[s]["accuracy"])) for s in seeds if s in full]
            if policy != "full"
            else []
        )
        delta = "" if not deltas else f"{_mean_std(deltas)} ({', '.join(f'{d:+.1f}' for d in deltas)})"
        equal = [_float(by_seed[s].get("delta_at_equal_compute")) for s in seeds]
        equal_text = _mean_std(equal, 100) if policy != "full" else ""
        lines.append(
            f"| {policy} | {len(seeds)} | {_mean_std(accuracy, 100)} | {delta} "
            f"| {_mean_std([_float(by_seed[s]['accuracy_greedy']) for s in seeds], 100)} "
            f"| {_mean_std([_float(by_seed[s]['flops']) for s in seeds], 1e-12, 2)} "
            f"| {_mean_std([_float(by_seed[s]['generated_tokens']) for s in seeds], 1e-3, 1)} | {equal_text} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
