"""The calibrated change point (formula 10) against the paper's rule: false releases, power, and what it costs.

    python benchmarks/calibration.py [--trajectories 2000] [--alpha 0.05] [--records RECORDS_JSONL]

1. False releases on exchangeable segment scores (iid N(0, 1) and iid Exp(1), no drop at all), n = 2 ... 50:
   the paper's offline rule (`bic_change_point`), the calibrated offline rule (`permutation_change_point`), the
   paper's online rule (`online_release`, min_segments=3, patience=2: a stop at any look) and the calibrated online
   rule (`online_release(alpha=...)`). A binomial standard error is given for the calibrated columns.
2. Power on a constructed drop (the first 40% of the segments at level 1, the rest at 0, noise sd sigma): the share
   accepted and the mean |tau - true tau|, offline; the share stopped and the mean stop delay in segments, online.
3. The number of permutations: p-value resolution against the time of one batched call (16 and 64 trajectories of
   20 and 100 segments); the Monte-Carlo standard error of a p-value near alpha is sqrt(alpha (1 - alpha) / (P + 1)).
4. With `--records` (a `trl-ltc diagnose` records.jsonl, e.g. the lab bench's untrained student): accepted under the
   paper's rule, calibrated, the shuffled null, and the online stop fraction replayed, paper and calibrated.

Timings are medians of repeated calls on this machine (CPU, one thread); the rates are exact counts. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from trl_ltc.release import (
    DEFAULT_PERMUTATIONS,
    bic_change_point,
    null_change_point,
    online_release,
    permutation_change_point,
)


def _scores(kind: str, batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(batch, n, generator=g, dtype=torch.float64)
    return torch.empty(batch, n, dtype=torch.float64).exponential_(1.0, generator=g)


def false_releases(batch: int, alpha: float, segments: list[int]) -> None:
    print(f"\n## False releases on exchangeable scores ({batch} trajectories per cell, alpha={alpha})\n")
    print("| scores | n | offline, paper | offline, calibrated | online stop, paper | online stop, calibrated |")
    print("|---|---|---|---|---|---|")
    se = math.sqrt(alpha * (1 - alpha) / batch)
    for kind in ("normal", "exponential"):
        for n in segments:
            x = _scores(kind, batch, n, seed=n)
            counts = torch.full((batch,), n)
            g = torch.Generator().manual_seed(1)
            paper = bic_change_point(x, counts).accepted.double().mean().item()
            calibrated = permutation_change_point(x, counts, alpha, generator=g).accepted.double().mean().item()
            online = (online_release(x, counts, 3, 2).stop_segment < counts).double().mean().item()
            stop = (online_release(x, counts, 3, 2, alpha=alpha, generator=g).stop_segment < counts).double().mean()
            print(f"| {kind} | {n} | {paper:.1%} | {calibrated:.1%} | {online:.1%} | {stop.item():.1%} |")
    print(f"\nBinomial standard error of a rate near alpha: {se:.1%}.")


def power(batch: int, alpha: float, sigma: float) -> None:
    print(f"\n## Power on a constructed drop (level 1 -> 0 after 40% of the segments, noise sd {sigma})\n")
    print("| n | true tau | offline accepted, paper | calibrated | mean abs(tau error), calibrated "
          "| online stopped, calibrated | mean stop delay (segments after tau) |")
    print("|---|---|---|---|---|---|---|")
    for n in (5, 10, 20, 50):
        tau = max(1, round(0.4 * n))
        g = torch.Generator().manual_seed(n)
        x = torch.where(torch.arange(n) < tau, 1.0, 0.0).double() + sigma * torch.randn(batch, n, generator=g,
                                                                                       dtype=torch.float64)
        counts = torch.full((batch,), n)
        paper = bic_change_point(x, counts)
        cp = permutation_change_point(x, counts, alpha, generator=g)
        error = (cp.release_segment[cp.accepted] - tau).abs().double().mean().item() if cp.accepted.any() else math.nan
        online = online_release(x, counts, 3, 2, alpha=alpha, generator=g)
        stopped = online.stop_segment < counts
        delay = (online.stop_segment[stopped] - tau).double().mean().item() if stopped.any() else math.nan
        rates = [x.double().mean().item() for x in (paper.accepted, cp.accepted, stopped)]
        print(f"| {n} | {tau} | {rates[0]:.1%} | {rates[1]:.1%} | {error:.2f} | {rates[2]:.1%} | {delay:.1f} |")


def _median_seconds(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def permutations_cost(alpha: float) -> None:
    print("\n## Permutations: resolution against cost (one batched call, median of 15)\n")
    print("| P | p-value grid | MC s.e. at p = alpha | 16 x 20 (ms) | 64 x 20 (ms) | 16 x 100 (ms) | 64 x 100 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for num in (49, 99, DEFAULT_PERMUTATIONS, 499, 999):
        cells = []
        for batch, n in ((16, 20), (64, 20), (16, 100), (64, 100)):
            # a drop in every row, so every row is tested (the worst case: rows the paper rejects are skipped)
            x = torch.where(torch.arange(n) < n // 2, 1.0, 0.0) + torch.randn(batch, n, generator=torch.Generator())
            counts = torch.full((batch,), n)
            g = torch.Generator().manual_seed(0)
            cells.append(1e3 * _median_seconds(lambda: permutation_change_point(x, counts, alpha, num, g)))
        se = math.sqrt(alpha * (1 - alpha) / (num + 1))
        print(f"| {num} | 1/{num + 1} | {se:.3f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    x = torch.randn(16, 20)
    base = 1e3 * _median_seconds(lambda: bic_change_point(x, torch.full((16,), 20)))
    print(f"\nThe paper's rule alone on 16 x 20: {base:.2f} ms.")


def records_summary(path: str, alpha: float) -> None:
    from trl_ltc.diagnostics.analysis import calibrated_acceptance, online_replay, segment_score_batch

    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    scores, counts = segment_score_batch(records)
    paper = bic_change_point(scores, counts).accepted.double().mean().item()
    null = null_change_point(scores, counts, torch.Generator().manual_seed(1)).accepted.double().mean().item()
    calibrated = sum(calibrated_acceptance(records, alpha)) / len(records)
    stop_paper = sum(r["online_stopped"] for r in online_replay(records)) / len(records)
    stop_calibrated = sum(r["online_stopped"] for r in online_replay(records, alpha=alpha)) / len(records)
    mean_segments = counts.double().mean().item()
    print(f"\n## Recorded trajectories: {path} ({len(records)}, {mean_segments:.1f} segments on average)\n")
    print("| accepted, paper | accepted, calibrated | null (shuffled, paper's rule) | online stop, paper "
          "| online stop, calibrated |")
    print("|---|---|---|---|---|")
    print(f"| {paper:.1%} | {calibrated:.1%} | {null:.1%} | {stop_paper:.1%} | {stop_calibrated:.1%} |")
    rows, g = scores[:16], torch.Generator()
    seconds = _median_seconds(lambda: permutation_change_point(rows, counts[:16], alpha, generator=g))
    print(f"\nCalibrating one batch of 16 of these trajectories: {1e3 * seconds:.1f} ms.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--segments", type=int, nargs="+", default=[2, 3, 4, 5, 10, 20, 50])
    parser.add_argument("--records", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    false_releases(args.trajectories, args.alpha, args.segments)
    power(args.trajectories // 4, args.alpha, args.sigma)
    permutations_cost(args.alpha)
    if args.records:
        records_summary(args.records, args.alpha)


if __name__ == "__main__":
    main()
