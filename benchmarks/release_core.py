"""Time the batched ``bic_change_point`` against a plain-Python O(n^2) change-point search.

    python benchmarks/release_core.py [--batch 256] [--segments 256] [--python-subset 16]

Scores are step-down-plus-noise curves with ragged lengths (num_segments uniform in [S/4, S]). The Python
baseline loops over tau and recomputes both means and RSS from scratch for every tau; it is timed on a subset
of the trajectories and reported per trajectory, like the batched version (best total time / B). Both run on
one thread by default (``--threads``), which also keeps the numbers stable on a shared machine. Not a test.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from trl_ltc.release import bic_change_point


def python_change_point(scores: list[float]) -> tuple[int, bool, float]:
    """Formula 6 by brute force: (release_segment, accepted, bic_gain), O(n^2)."""
    n = len(scores)
    if n < 2:
        return n, False, 0.0

    def rss(seg: list[float]) -> float:
        mean = sum(seg) / len(seg)
        return sum((v - mean) ** 2 for v in seg)

    def bic(residual: float, num_params: int) -> float:
        return n * math.log((residual + 1e-12) / n) + num_params * math.log(n)

    bic0 = bic(rss(scores), 1)
    best_tau, best_bic = n, math.inf
    for tau in range(1, n):
        left, right = scores[:tau], scores[tau:]
        if sum(right) / len(right) < sum(left) / len(left):
            candidate = bic(rss(left) + rss(right), 3)
            if candidate < best_bic:
                best_tau, best_bic = tau, candidate
    if best_bic < bic0:
        return best_tau, True, bic0 - best_bic
    return n, False, 0.0


def make_scores(batch: int, segments: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment scores ``log(1 + margin)``-like: a high plateau, a drop at a random point, Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    num_segments = torch.randint(max(segments // 4, 2), segments + 1, (batch,), generator=gen)
    num_segments[0] = segments
    drop = (torch.rand(batch, 1, generator=gen) * num_segments[:, None]).long()
    high = 1.5 + torch.rand(batch, 1, generator=gen)
    low = high * torch.rand(batch, 1, generator=gen)  # some drops are tiny, some large
    position = torch.arange(segments)
    scores = torch.where(position < drop, high, low) + 0.3 * torch.randn(batch, segments, generator=gen)
    scores = torch.where(position < num_segments[:, None], scores.clamp_min(0), 0.0)
    return scores, num_segments


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="trajectories B")
    parser.add_argument("--segments", type=int, default=256, help="segments per trajectory S (max)")
    parser.add_argument("--python-subset", type=int, default=16, help="trajectories timed in plain Python")
    parser.add_argument("--repeats", type=int, default=20, help="batched repeats (the best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (Python baseline: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scores, num_segments = make_scores(args.batch, args.segments, args.seed)
    bic_change_point(scores, num_segments)  # warm-up
    batched_s = best_time(lambda: bic_change_point(scores, num_segments), args.repeats) / args.batch

    subset = min(args.python_subset, args.batch)
    rows = [scores[b, : int(num_segments[b])].tolist() for b in range(subset)]
    start = time.perf_counter()
    expected = [python_change_point(row) for row in rows]
    python_s = (time.perf_counter() - start) / subset

    cp = bic_change_point(scores, num_segments)
    for b, (release, accepted, _) in enumerate(expected):  # sanity: both give the same decisions
        assert (int(cp.release_segment[b]), bool(cp.accepted[b])) == (release, accepted), b

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}; B={args.batch}, S={args.segments}, "
          f"mean n={num_segments.double().mean():.1f}, accepted {int(cp.accepted.sum())}/{args.batch}")
    print(f"batched bic_change_point : {batched_s * 1e6:10.2f} us / trajectory "
          f"({batched_s * args.batch * 1e3:.2f} ms for the batch)")
    print(f"plain Python O(n^2)      : {python_s * 1e6:10.2f} us / trajectory (timed on {subset})")
    print(f"speed-up                 : {python_s / batched_s:10.0f}x")


if __name__ == "__main__":
    main()
