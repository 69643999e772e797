"""Acceptance rate of the release rule's change point on scores without any change, and of its shuffled null.

    python benchmarks/null_model.py [--trajectories 4000] [--segments 2 3 4 10 50] [--seed 0]

For each number of segments ``n``, ``--trajectories`` rows of ``n`` iid standard normal segment scores (no change
point) go through ``bic_change_point`` (formula 6), and the same rows through ``null_change_point`` (each row's
scores shuffled, then the same rule). Both rates are the false-acceptance rate of the rule at that ``n``: what
``release/accepted_frac`` and ``release/accepted_frac_null`` read on trajectories whose teacher margin does not
fall. On iid scores the shuffle changes nothing in distribution, so the two columns agree up to sampling noise
(the last column, a binomial standard error). Not a test.
"""

from __future__ import annotations

import argparse
import math

import torch

from trl_ltc.release import NULL_SEED_OFFSET, bic_change_point, null_change_point


def acceptance(num_trajectories: int, num_segments: int, seed: int) -> tuple[float, float]:
    """(real, null) acceptance rates on ``num_trajectories`` rows of ``num_segments`` iid N(0, 1) scores."""
    scores = torch.randn(num_trajectories, num_segments, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.float64)  # fmt: skip
    n = torch.full((num_trajectories,), num_segments, dtype=torch.long)
    real = bic_change_point(scores, n).accepted.double().mean().item()
    null_generator = torch.Generator().manual_seed(seed + NULL_SEED_OFFSET)
    null = null_change_point(scores, n, null_generator).accepted.double().mean().item()
    return real, null


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=4000)
    parser.add_argument("--segments", type=int, nargs="+", default=[2, 3, 4, 10, 50])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"iid N(0, 1) segment scores, {args.trajectories} trajectories per row, seed {args.seed}")
    print()
    print("| segments | accepted (bic_change_point) | accepted (shuffled null) | std. error |")
    print("|---:|---:|---:|---:|")
    for n in args.segments:
        real, null = acceptance(args.trajectories, n, args.seed + n)
        stderr = math.sqrt(real * (1 - real) / args.trajectories)
        print(f"| {n} | {real:.1%} | {null:.1%} | {stderr:.1%} |")


if __name__ == "__main__":
    main()
