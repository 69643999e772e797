"""Tests of trl_ltc.release (DESIGN.md formulas 4-7) against slow references written from the formulas."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_ltc.release import (
    LOG_PROB_FLOOR,
    ChangePoint,
    bic_change_point,
    mass_preserving_weights,
    null_change_point,
    release_weights,
    segment_scores,
    shuffle_segments,
    support_margin,
    teacher_margin,
)

# --------------------------------------------------------------------------------------------- references
# Plain Python, one position / trajectory at a time, straight from the formulas. The change-point reference
# uses exact rational arithmetic for means and RSS, so its ties and "strictly below" tests are exact.


def ref_margin(student: list[float], teacher: list[float], k: int, temperature: float = 1.0) -> float:
    """Formula 4 for one position: float64 softmax over the full vocabulary, sort, floor, best minus second."""
    support = sorted(range(len(student)), key=lambda v: -student[v])[:k]
    scaled = [t / temperature for t in teacher]
    top = max(scaled)
    z = sum(math.exp(t - top) for t in scaled)
    probs = [math.exp(t - top) / z for t in scaled]
    floored = [math.log(max(probs[v], 1e-12)) for v in support]  # log(max(p, 1e-12)) == max(log p, log 1e-12)
    logprobs = sorted(floored, reverse=True)
    return logprobs[0] - logprobs[1]


def ref_segment_scores(margins: list[float], ids: list[int]) -> list[float]:
    """Formula 5 for one trajectory: log(1 + mean margin) of each segment 0..max id."""
    n = max(ids, default=-1) + 1
    sums, counts = [0.0] * n, [0] * n
    for m, i in zip(margins, ids):
        if i >= 0:
            sums[i] += m
            counts[i] += 1
    return [math.log(1 + s / c) if c else 0.0 for s, c in zip(sums, counts)]


def ref_change_point(scores: list[float]) -> tuple[int, bool, float]:
    """Formula 6 for one trajectory by brute force over tau: (release_segment, accepted, bic_gain)."""
    n = len(scores)
    if n < 2:
        return n, False, 0.0
    xs = [Fraction(v) for v in scores]

    def mean(seg):
        return sum(seg) / len(seg)

    def rss(seg):
        m = mean(seg)
        return sum((v - m) ** 2 for v in seg)

    def bic(residual, num_params):
        return n * math.log((float(residual) + 1e-12) / n) + num_params * math.log(n)

    bic0 = bic(rss(xs), 1)
    best_tau, best_bic = None, math.inf
    for tau in range(1, n):
        left, right = xs[:tau], xs[tau:]
        if mean(right) < mean(left):
            candidate = bic(rss(left) + rss(right), 3)
            if candidate < best_bic:  # strict: ties keep the earliest tau
                best_tau, best_bic = tau, candidate
    if best_tau is not None and best_bic < bic0:
        return best_tau, True, max(0.0, bic0 - best_bic)
    return n, False, 0.0


def ref_weights(ids: list[int], loss_mask: list[float], release: int) -> list[float]:
    """Formula 7 for one trajectory."""
    q = [1.0 if 0 <= i < release else 0.0 for i in ids]
    total = sum(loss_mask)
    kept = sum(m * qi for m, qi in zip(loss_mask, q))
    scale = total / max(kept, 1e-8)
    return [m * qi * scale for m, qi in zip(loss_mask, q)]


def check_change_point(scores: torch.Tensor, num_segments: torch.Tensor, cp: ChangePoint) -> None:
    """Assert ``cp`` equals the reference on every row (padding columns of ``scores`` must be ignored)."""
    assert cp.release_segment.dtype == torch.long and cp.accepted.dtype == torch.bool
    assert cp.release_segment.shape == cp.accepted.shape == cp.bic_gain.shape == num_segments.shape
    for b, n in enumerate(num_segments.tolist()):
        release, accepted, gain = ref_change_point(scores[b, :n].tolist())
        got = (int(cp.release_segment[b]), bool(cp.accepted[b]), float(cp.bic_gain[b]))
        assert got[:2] == (release, accepted), (b, scores[b, :n].tolist(), got, (release, accepted, gain))
        assert got[2] == pytest.approx(gain, rel=1e-6, abs=1e-5), (b, got, gain)


# ------------------------------------------------------------------------------------------- random data


def random_curve(rng: random.Random, n: int) -> list[float]:
    """Segment scores of one trajectory: flat, steps up/down, decays, walks, constants, clean steps."""
    kind = rng.choice(["constant", "flat", "down", "up", "decay", "walk", "uniform", "clean_down", "clean_up"])
    noise = rng.choice([0.01, 0.1, 0.4])
    tau = rng.randint(1, max(n - 1, 1))
    hi, lo = rng.uniform(1.0, 3.0), rng.uniform(0.0, 1.0)
    if kind == "constant":
        curve = [rng.uniform(0, 3)] * n
    elif kind == "flat":
        curve = [1.0 + rng.gauss(0, noise) for _ in range(n)]
    elif kind in ("down", "up"):
        first, second = (hi, lo) if kind == "down" else (lo, hi)
        curve = [(first if i < tau else second) + rng.gauss(0, noise) for i in range(n)]
    elif kind == "decay":
        curve = [hi * math.exp(-3 * i / max(n, 1)) + rng.gauss(0, noise) for i in range(n)]
    elif kind == "walk":
        curve = [0.0]
        for _ in range(n - 1):
            curve.append(curve[-1] + rng.gauss(0, noise))
    elif kind == "uniform":
        curve = [rng.uniform(0, 3) for _ in range(n)]
    else:  # exact steps on a dyadic grid: the perfect-fit RSS is exactly 0
        first, second = (2.5, 0.75) if kind == "clean_down" else (0.75, 2.5)
        curve = [first if i < tau else second for i in range(n)]
    return [round(v * 4096) / 4096 for v in curve[:n]]  # a dyadic grid keeps the exact reference fast


def random_scores(rng: random.Random, batch: int, max_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, S]`` float64 scores padded with garbage beyond ``num_segments`` (callers must ignore it)."""
    num_segments = [rng.choice([0, 1, 2, rng.randint(0, max_n), rng.randint(0, max_n)]) for _ in range(batch)]
    width = max(num_segments, default=0) + rng.randint(0, 3)
    scores = torch.empty(batch, width, dtype=torch.float64).uniform_(-50, 50)
    for b, n in enumerate(num_segments):
        scores[b, :n] = torch.tensor(random_curve(rng, n), dtype=torch.float64)
    return scores, torch.tensor(num_segments, dtype=torch.long)


def random_segment_ids(rng: random.Random, batch: int) -> torch.Tensor:
    """``[B, T]`` ids with left and right padding (-1), ragged lengths and segments of 1..6 tokens."""
    rows = []
    for _ in range(batch):
        lengths = [rng.randint(1, 6) for _ in range(rng.choice([0, 1, 2, rng.randint(0, 12)]))]
        row = [-1] * rng.randint(0, 4) + [i for i, size in enumerate(lengths) for _ in range(size)]
        rows.append(row + [-1] * rng.randint(0, 4))
    width = max(len(r) for r in rows)
    padded = [[-1] * (width - len(r)) + r if rng.random() < 0.5 else r + [-1] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long)


# ---------------------------------------------------------------------------------------- teacher_margin


def test_teacher_margin_matches_reference():
    gen = torch.Generator().manual_seed(0)
    for vocab, k, temperature in [(2, 2, 1.0), (7, 3, 1.0), (31, 5, 0.7), (50, 50, 1.3), (64, 16, 1.0)]:
        student = torch.randn(3, 5, vocab, generator=gen) * 3
        teacher = torch.randn(3, 5, vocab, generator=gen) * 4
        teacher[0, 0, : vocab // 2] = -math.inf  # masked vocabulary
        teacher[1, 1] = -math.inf
        teacher[1, 1, vocab - 1] = 0.0  # all mass on one token
        got = teacher_margin(student, teacher, k, temperature)
        assert got.shape == (3, 5) and got.dtype == torch.float32
        expected = [
            ref_margin(s, t, k, temperature)
            for s, t in zip(student.reshape(-1, vocab).tolist(), teacher.reshape(-1, vocab).tolist())
        ]
        torch.testing.assert_close(got.reshape(-1), torch.tensor(expected), rtol=1e-5, atol=1e-4)


def test_teacher_margin_hand_case():
    student = torch.tensor([[5.0, 4.0, 3.0, -9.0]])  # top-3 support {0, 1, 2}
    teacher_probs = torch.tensor([[0.1, 0.2, 0.05, 0.65]])  # token 3 is the teacher's best, but outside C
    got = teacher_margin(student, teacher_probs.log(), k=3)
    torch.testing.assert_close(got, torch.tensor([math.log(0.2 / 0.1)]))
    torch.testing.assert_close(teacher_margin(student, teacher_probs.log(), k=4), torch.tensor([math.log(0.65 / 0.2)]))


@pytest.mark.parametrize("k", [-1, 0, 1, 9, 100])
def test_teacher_margin_rejects_bad_k(k):
    logits = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"\bk\b"):
        teacher_margin(logits, logits, k)


def test_teacher_margin_rejects_mismatched_shapes_and_temperature():
    with pytest.raises(ValueError, match="shape"):
        teacher_margin(torch.randn(2, 8), torch.randn(2, 9), 2)
    with pytest.raises(ValueError, match="temperature"):
        teacher_margin(torch.randn(2, 8), torch.randn(2, 8), 2, temperature=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_margin_half_precision_equals_fp32_of_rounded_values(dtype):
    gen = torch.Generator().manual_seed(1)
    student = (torch.randn(4, 6, 40, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(4, 6, 40, generator=gen) * 3).to(dtype)
    got = teacher_margin(student, teacher, 8, temperature=0.9)
    assert got.dtype == torch.float32
    expected = teacher_margin(student.float(), teacher.float(), 8, temperature=0.9)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_teacher_margin_float64_stays_float64():
    student, teacher = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    got = teacher_margin(student, teacher, 4)
    assert got.dtype == torch.float64
    expected = [ref_margin(s, t, 4) for s, t in zip(student.tolist(), teacher.tolist())]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_teacher_margin_masked_and_degenerate_teachers_are_finite():
    student = torch.randn(5, 12)
    teacher = torch.full((5, 12), -math.inf)
    teacher[:, 3] = 0.0  # a teacher with all mass on one token (the rest masked)
    teacher[1] = torch.randn(12)
    teacher[1, ::2] = -math.inf
    teacher[2] = 0.0
    teacher[2, 7] = 1e4  # finite but all mass on one token
    got = teacher_margin(student, teacher, 5)
    assert torch.isfinite(got).all() and (got >= 0).all() and (got <= -LOG_PROB_FLOOR + 1e-4).all()
    support = student.topk(5, dim=-1).indices
    for row in (0, 3, 4):  # -log(1e-12) if token 3 is in the support, else both floored: 0
        expected = -LOG_PROB_FLOOR if (support[row] == 3).any() else 0.0
        assert float(got[row]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("leading", [(), (3,), (2, 3), (2, 3, 4), (0,), (0, 5), (2, 0)])
def test_teacher_margin_leading_shapes(leading):
    student, teacher = torch.randn(*leading, 9), torch.randn(*leading, 9)
    got = teacher_margin(student, teacher, 3)
    assert got.shape == leading
    torch.testing.assert_close(got.reshape(-1), teacher_margin(student.reshape(-1, 9), teacher.reshape(-1, 9), 3))


def test_support_margin_is_the_margin_of_teacher_margin():
    student, teacher = torch.randn(4, 20), torch.randn(4, 20)
    support = student.topk(6, dim=-1).indices
    torch.testing.assert_close(
        support_margin(torch.log_softmax(teacher, dim=-1), support), teacher_margin(student, teacher, 6)
    )
    with pytest.raises(ValueError, match="k"):
        support_margin(torch.log_softmax(teacher, dim=-1), support[:, :1])


# ---------------------------------------------------------------------------------------- segment_scores


def test_segment_scores_hand_case():
    margins = torch.tensor([[9.0, 1.0, 3.0, 0.5, 9.0], [math.nan, math.nan, 2.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ids = torch.tensor([[-1, 0, 0, 1, -1], [-1, -1, 0, 0, 1], [-1, -1, -1, -1, -1]])
    scores, num_segments = segment_scores(margins, ids)
    assert num_segments.tolist() == [2, 2, 0] and num_segments.dtype == torch.long
    assert scores.shape == (3, 2) and scores.dtype == torch.float32
    expected = torch.tensor([[math.log(3.0), math.log(1.5)], [math.log(3.0), math.log(5.0)], [0.0, 0.0]])
    torch.testing.assert_close(scores, expected)


def test_segment_scores_empty_inputs():
    scores, num_segments = segment_scores(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.long))
    assert scores.shape == (3, 0) and num_segments.tolist() == [0, 0, 0]
    scores, num_segments = segment_scores(torch.zeros(2, 4), torch.full((2, 4), -1))
    assert scores.shape == (2, 0) and num_segments.tolist() == [0, 0]
    scores, num_segments = segment_scores(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long))
    assert scores.shape == (0, 0) and num_segments.shape == (0,)


def test_segment_scores_match_reference():
    rng = random.Random(0)
    for _ in range(20):
        ids = random_segment_ids(rng, rng.randint(1, 6))
        margins = torch.rand(ids.shape) * 20
        scores, num_segments = segment_scores(margins, ids)
        assert scores.shape[1] == max(num_segments.tolist(), default=0)
        for b in range(ids.shape[0]):
            expected = ref_segment_scores(margins[b].tolist(), ids[b].tolist())
            assert int(num_segments[b]) == len(expected)
            torch.testing.assert_close(scores[b, : len(expected)], torch.tensor(expected), rtol=1e-6, atol=1e-6)
            assert (scores[b, len(expected) :] == 0).all()


# -------------------------------------------------------------------------------------- bic_change_point


def bic(rss: float, n: int, num_params: int) -> float:
    return n * math.log((rss + 1e-12) / n) + num_params * math.log(n)


def change_point(rows: list[list[float]]) -> ChangePoint:
    width = max((len(r) for r in rows), default=0)
    scores = torch.tensor([r + [7.0] * (width - len(r)) for r in rows]).reshape(len(rows), width)
    return bic_change_point(scores, torch.tensor([len(r) for r in rows], dtype=torch.long))


def test_change_point_clean_step_down_hand_computed():
    cp = change_point([[2.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    # no change: mean 1, RSS 6; one drop at tau=3: means 2 and 0, RSS 0
    expected_gain = bic(6.0, 6, 1) - bic(0.0, 6, 3)
    assert cp.release_segment.tolist() == [3] and cp.accepted.tolist() == [True]
    assert float(cp.bic_gain[0]) == pytest.approx(expected_gain, rel=1e-6)
    assert expected_gain == pytest.approx(6 * math.log(6 / 1e-12) - 2 * math.log(6), rel=1e-9)


def test_change_point_small_n():
    cp = change_point([[], [3.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert cp.release_segment.tolist() == [0, 1, 1, 2, 2]
    assert cp.accepted.tolist() == [False, False, True, False, False]
    # n = 2, drop at tau=1: RSS 0 against 0.5 for one mean
    expected = [0.0, 0.0, bic(0.5, 2, 1) - bic(0.0, 2, 3), 0.0, 0.0]
    torch.testing.assert_close(cp.bic_gain, torch.tensor(expected))


def test_change_point_constant_and_upward_never_accepted():
    rows = [[1.7] * 9, [0.0] * 4, [math.log(1.3)] * 30, [0.0, 0.0, 0.0, 2.0, 2.0, 2.0], [0.1 * i for i in range(12)]]
    cp = change_point(rows)
    assert not cp.accepted.any()
    assert cp.release_segment.tolist() == [len(r) for r in rows]
    assert (cp.bic_gain == 0).all()


def test_change_point_ties_go_to_the_earliest_tau():
    # [2, 1, 1, 0]: tau=1 and tau=3 both leave RSS 2/3 (tau=2 leaves 1), no change leaves 2
    cp = change_point([[2.0, 1.0, 1.0, 0.0], [4.0, 2.0, 2.0, 0.0, 9.0][:4]])
    assert cp.release_segment.tolist() == [1, 1] and cp.accepted.all()
    assert float(cp.bic_gain[0]) == pytest.approx(bic(2.0, 4, 1) - bic(2 / 3, 4, 3), rel=1e-6)
    # the same tie inside a long noise-free row: the mirror candidates 1 and n-1 tie and win
    row = [5.0] + [2.0] * 40 + [-1.0]
    cp = change_point([row])
    release, accepted, _ = ref_change_point(row)
    assert (int(cp.release_segment[0]), bool(cp.accepted[0])) == (release, accepted) == (1, True)


def test_change_point_matches_reference_on_random_batches():
    rng = random.Random(0)
    for _ in range(25):
        scores, num_segments = random_scores(rng, rng.randint(1, 10), max_n=24)
        check_change_point(scores, num_segments, bic_change_point(scores, num_segments))
        cp32 = bic_change_point(scores.float(), num_segments)
        assert cp32.bic_gain.dtype == torch.float32
        check_change_point(scores.float(), num_segments, cp32)


def test_change_point_long_rows_match_reference():
    rng = random.Random(1)
    scores, num_segments = random_scores(rng, 6, max_n=160)
    num_segments[0] = scores.shape[1]
    check_change_point(scores, num_segments, bic_change_point(scores, num_segments))


def test_change_point_is_shift_invariant():
    rng = random.Random(2)
    scores, num_segments = random_scores(rng, 64, max_n=40)
    base = bic_change_point(scores, num_segments)
    shifted = bic_change_point(scores + 1e4, num_segments)
    assert torch.equal(base.release_segment, shifted.release_segment) and torch.equal(base.accepted, shifted.accepted)
    torch.testing.assert_close(base.bic_gain, shifted.bic_gain, rtol=1e-6, atol=1e-4)


def test_change_point_exact_steps_at_large_non_dyadic_levels_stay_finite():
    # the perfect fit has RSS 0, which prefix sums only reach up to round-off (possibly negative before clamping)
    rows, releases = [], []
    for hi, lo in [(1000.1, 0.3), (3e4 + 0.7, 1e4 + 0.1), (123.456, 78.9)]:
        for left, right in [(3, 5), (7, 9), (13, 2)]:
            rows += [[hi] * left + [lo] * right, [lo] * left + [hi] * right, [hi] * (left + right)]
            releases += [left, left + right, left + right]
    cp = change_point(rows)
    assert cp.release_segment.tolist() == releases
    assert cp.accepted.tolist() == [r < len(row) for r, row in zip(releases, rows)]
    assert torch.isfinite(cp.bic_gain).all() and ((cp.bic_gain > 100) == cp.accepted).all()


def test_change_point_degenerate_widths():
    cp = bic_change_point(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    assert cp.release_segment.tolist() == [0, 0, 0] and not cp.accepted.any() and (cp.bic_gain == 0).all()
    cp = bic_change_point(torch.zeros(2, 1), torch.tensor([1, 0]))
    assert cp.release_segment.tolist() == [1, 0] and not cp.accepted.any()
    cp = bic_change_point(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert cp.release_segment.shape == (0,)


# --------------------------------------------------------------------------------------- release_weights


def check_weights(ids: torch.Tensor, loss_mask: torch.Tensor, cp: ChangePoint, weights: torch.Tensor) -> None:
    """Reference equality plus the invariants: finite, >= 0, zero off the mask, mass kept, a prefix kept."""
    assert weights.shape == ids.shape and weights.dtype == torch.float32
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert (weights[loss_mask == 0] == 0).all()
    for b in range(ids.shape[0]):
        release = int(cp.release_segment[b])
        expected = ref_weights(ids[b].tolist(), loss_mask[b].tolist(), release)
        torch.testing.assert_close(weights[b], torch.tensor(expected), rtol=1e-6, atol=1e-6)
        supervised = (loss_mask[b] > 0) & (ids[b] >= 0)
        assert torch.equal(weights[b] > 0, supervised & (ids[b] < release))  # exactly the leading segments
        if (weights[b] > 0).any():
            assert float(weights[b].sum()) == pytest.approx(float(loss_mask[b].sum()), rel=1e-6)
        if not cp.accepted[b] and torch.equal(supervised, loss_mask[b] > 0):
            assert torch.equal(weights[b], loss_mask[b].float())  # nothing released: plain OPD weights


def test_release_weights_hand_case():
    ids = torch.tensor(
        [[-1, 0, 0, 1, 1, 2, -1], [0, 0, 1, 1, 2, 2, 2], [-1, -1, -1, -1, -1, -1, -1], [0, 0, 1, 1, -1, -1, -1]]
    )
    loss_mask = (ids >= 0).float()
    loss_mask[3, 4] = 1.0  # a masked-in token without a segment is never kept
    cp = ChangePoint(torch.tensor([1, 3, 0, 2]), torch.tensor([True, False, False, False]), torch.zeros(4))
    weights = release_weights(ids, loss_mask, cp)
    expected = torch.tensor([[0, 2.5, 2.5, 0, 0, 0, 0], [1.0] * 7, [0.0] * 7, [1.25, 1.25, 1.25, 1.25, 0, 0, 0]])
    torch.testing.assert_close(weights, expected)


def test_release_weights_zero_rows_and_nothing_kept():
    ids = torch.tensor([[0, 0, 1], [0, 1, 1], [-1, -1, -1]])
    loss_mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    cp = ChangePoint(torch.tensor([1, 1, 0]), torch.tensor([True, True, False]), torch.zeros(3))
    weights = release_weights(ids, loss_mask, cp)
    assert torch.equal(weights, torch.zeros(3, 3))  # row 1 keeps segment 0, which the mask excludes
    empty = mass_preserving_weights(torch.zeros(2, 0, dtype=torch.bool), torch.zeros(2, 0))
    assert empty.shape == (2, 0)


def test_mass_preserving_weights_float64_and_non_prefix_keep():
    keep = torch.tensor([[True, False, True, False]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    weights = mass_preserving_weights(keep, loss_mask)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.0, 1.5, 0.0]], dtype=torch.float64))


def test_pipeline_matches_reference_on_random_batches():
    rng = random.Random(3)
    for _ in range(20):
        ids = random_segment_ids(rng, rng.randint(1, 8))
        loss_mask = ((ids >= 0) & (torch.rand(ids.shape) > 0.1)).float()
        margins = torch.rand(ids.shape) * 5
        drop = torch.rand(ids.shape[0], 1) * ids.clamp_min(0).amax() * 1.2  # lower margins after a random point
        margins = torch.where(ids >= drop, margins * 0.05, margins)
        scores, num_segments = segment_scores(margins, ids)
        cp = bic_change_point(scores, num_segments)
        check_change_point(scores, num_segments, cp)
        check_weights(ids, loss_mask, cp, release_weights(ids, loss_mask, cp))


GRID = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]


@st.composite
def trajectories(draw):
    """Ragged batches: left/right padding, 0..8 segments of 1..3 tokens, a loss mask with holes, grid scores."""
    batch = draw(st.integers(1, 4))
    rows, all_scores = [], []
    for _ in range(batch):
        lengths = draw(st.lists(st.integers(1, 3), max_size=8))
        left, right = draw(st.integers(0, 3)), draw(st.integers(0, 3))
        rows.append([-1] * left + [i for i, size in enumerate(lengths) for _ in range(size)] + [-1] * right)
        all_scores.append(draw(st.lists(st.sampled_from(GRID), min_size=len(lengths), max_size=len(lengths))))
    width = max(len(r) for r in rows)
    rows = [r + [-1] * (width - len(r)) if draw(st.booleans()) else [-1] * (width - len(r)) + r for r in rows]
    ids = torch.tensor(rows, dtype=torch.long).reshape(batch, width)
    holes = draw(st.lists(st.booleans(), min_size=batch * width, max_size=batch * width))
    holes = torch.tensor(holes, dtype=torch.bool)
    loss_mask = ((ids >= 0) & ~(holes.reshape(batch, width) & draw(st.booleans()))).float()
    num_segments = torch.tensor([len(s) for s in all_scores], dtype=torch.long)
    s_max = max(len(s) for s in all_scores)
    scores = torch.tensor([s + [99.0] * (s_max - len(s)) for s in all_scores]).reshape(batch, s_max)
    return ids, loss_mask, scores, num_segments


@settings(max_examples=100, deadline=None)
@given(trajectories())
def test_property_change_point_and_weights(data):
    ids, loss_mask, scores, num_segments = data
    cp = bic_change_point(scores, num_segments)
    check_change_point(scores, num_segments, cp)
    assert ((cp.release_segment >= 1) | ~cp.accepted).all() and (cp.release_segment <= num_segments).all()
    assert (cp.accepted == (cp.release_segment < num_segments)).all() and (cp.accepted == (cp.bic_gain > 0)).all()
    check_weights(ids, loss_mask, cp, release_weights(ids, loss_mask, cp))


# ------------------------------------------------------------------------------- shuffled null of the change point


def test_shuffle_segments_permutes_each_row_and_leaves_padding():
    num_segments = torch.tensor([6, 0, 1, 3, 6])
    scores = torch.arange(30, dtype=torch.float64).reshape(5, 6) + 100 * (torch.arange(6) >= num_segments[:, None])
    shuffled = shuffle_segments(scores, num_segments, torch.Generator().manual_seed(0))
    assert shuffled.shape == scores.shape and shuffled.dtype == scores.dtype
    for row, n in enumerate(num_segments.tolist()):
        assert sorted(shuffled[row, :n].tolist()) == scores[row, :n].tolist()  # the same multiset of valid scores
        assert torch.equal(shuffled[row, n:], scores[row, n:])  # padding untouched
    assert not torch.equal(shuffled[[0, 4]], scores[[0, 4]])  # full rows were reordered

    # every order of three scores is drawn, about equally often
    rows = torch.tensor([[0.0, 1.0, 2.0]]).repeat(6000, 1)
    orders = shuffle_segments(rows, torch.full((6000,), 3), torch.Generator().manual_seed(1))
    counts = torch.unique(orders, dim=0, return_counts=True)[1]
    assert counts.numel() == 6 and (counts - 1000).abs().max() < 120

    with pytest.raises(ValueError, match=r"\[B, S\]"):
        shuffle_segments(torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.Generator())
    for shape in ((3, 0), (0, 5)):
        empty = shuffle_segments(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long), torch.Generator())
        assert empty.shape == shape


def test_shuffle_segments_and_null_change_point_are_seeded():
    scores = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    num_segments = torch.randint(0, 9, (50,), generator=torch.Generator().manual_seed(1))
    first = shuffle_segments(scores, num_segments, torch.Generator().manual_seed(3))
    assert torch.equal(first, shuffle_segments(scores, num_segments, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, shuffle_segments(scores, num_segments, torch.Generator().manual_seed(4)))
    null = null_change_point(scores, num_segments, torch.Generator().manual_seed(3))
    want = bic_change_point(first, num_segments)
    for got, expected in zip(null, want):
        assert torch.equal(got, expected)


def test_null_rarely_accepts_a_clear_drop():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.ones(200, 10), torch.zeros(200, 10)], 1) + 0.05 * torch.randn(200, 20, generator=g)
    num_segments = torch.full((200,), 20)
    real = bic_change_point(scores, num_segments)
    assert real.accepted.all() and (real.release_segment == 10).all()
    null = null_change_point(scores, num_segments, torch.Generator().manual_seed(1))
    assert null.accepted.double().mean().item() < 0.3


@pytest.mark.parametrize("n", [3, 10])
def test_null_rate_matches_the_real_rate_on_iid_scores(n):
    scores = torch.randn(2000, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    num_segments = torch.full((2000,), n)
    real = bic_change_point(scores, num_segments).accepted.double().mean().item()
    null = null_change_point(scores, num_segments, torch.Generator().manual_seed(0)).accepted.double().mean().item()
    assert abs(real - null) < 0.04
    assert 0.05 < real < 0.5  # the rule itself accepts often without any drop
