"""Supervision policies against hand-computed weights and plain-loop references."""

import math

import pytest
import torch

from trl_ltc.release import bic_change_point, null_change_point, release_weights, segment_scores
from trl_ltc.signals import OutputHead, signals_from_hidden
from trl_ltc.supervision import (
    fraction_prefix_weights,
    kept_fractions,
    permute_release_fractions,
    reduce_stats,
    segment_std,
    supervision_stats,
    supervision_weights,
)


def _ragged(lengths, width):
    mask = torch.zeros(len(lengths), width)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return mask


def test_full_is_the_loss_mask():
    mask = _ragged([5, 0, 3], 6)
    torch.testing.assert_close(supervision_weights("full", mask).weights, mask)


def test_fixed_prefix_by_hand():
    mask = _ragged([5, 2, 0], 6)
    mask[0, 0] = 0  # a masked first position does not count towards L
    got = supervision_weights("fixed_prefix", mask, fixed_prefix_length=3).weights
    want = torch.tensor(
        [
            [0, 4 / 3, 4 / 3, 4 / 3, 0, 0],  # 4 supervised tokens, first 3 kept, rescaled by 4/3
            [1, 1, 0, 0, 0, 0],  # shorter than L: all kept
            [0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(got, want)


def _segments(lengths, width, window):
    ids = torch.full((len(lengths), width), -1)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.arange(n) // window
    return ids


def test_release_uses_the_change_point_of_the_segment_margins():
    mask = _ragged([12, 12], 12)
    segment_ids = _segments([12, 12], 12, 2)  # 6 segments of 2 tokens
    margins = torch.tensor([[3.0] * 6 + [0.1] * 6, [1.0] * 12])
    sup = supervision_weights("release", mask, segment_ids=segment_ids, margins=margins)
    assert sup.change_point.accepted.tolist() == [True, False]
    assert sup.change_point.release_segment.tolist() == [3, 6]
    torch.testing.assert_close(sup.weights[0], torch.tensor([2.0] * 6 + [0.0] * 6))
    torch.testing.assert_close(sup.weights[1], torch.ones(12))


def test_sharp_early_flat_late_teacher_is_released_at_the_right_segment():
    """End to end from hidden states: the teacher is sharp for 3 sentences, then uniform."""
    V = H = 8
    head = OutputHead(torch.eye(V, H))
    T = 24
    student_hidden = torch.zeros(1, T, H)
    student_hidden[0, :, 0], student_hidden[0, :, 1] = 5.0, 4.0
    teacher_hidden = torch.zeros(1, T, H)
    teacher_hidden[0, :12, 1] = 3.0 + torch.rand(12)  # sharp, noisy, for segments 0-2
    mask = torch.ones(1, T)
    signals = signals_from_hidden(student_hidden, teacher_hidden, torch.zeros(1, T, dtype=torch.long), mask, head, head, 5)
    segment_ids = _segments([T], T, 4)  # 6 sentences of 4 tokens
    sup = supervision_weights("release", mask, segment_ids=segment_ids, margins=signals.margins)
    assert bool(sup.change_point.accepted[0]) and int(sup.change_point.release_segment[0]) == 3
    assert (sup.weights[0, :12] == 2).all() and (sup.weights[0, 12:] == 0).all()


def test_segment_std_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 10, generator=g)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1], [-1] * 10, [0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    num_segments = torch.tensor([3, 0, 2])
    got = segment_std(values, segment_ids, num_segments)
    for b in range(3):
        for s in range(int(num_segments[b])):
            x = values[b][segment_ids[b] == s].double()
            want = math.sqrt(((x - x.mean()) ** 2).mean())
            assert got[b, s].item() == pytest.approx(want, abs=1e-6)


def test_adv_std_release_uses_the_advantage_spread():
    mask = _ragged([12], 12)
    segment_ids = _segments([12], 12, 3)  # 4 segments of 3 tokens
    advantages = torch.tensor([[2.0, -2.0, 1.0, 3.0, -1.0, 0.0, 0.1, 0.0, -0.1, 0.0, 0.05, 0.0]])
    sup = supervision_weights("adv_std_release", mask, segment_ids=segment_ids, advantages=advantages)
    stds = sup.segment_scores[0, :4]
    for s in range(4):
        x = advantages[0, 3 * s : 3 * s + 3].double()
        assert stds[s].item() == pytest.approx(x.std(unbiased=False).item(), abs=1e-6)
    want = bic_change_point(stds[None], torch.tensor([4]))
    assert sup.change_point.release_segment.tolist() == want.release_segment.tolist() == [2]
    torch.testing.assert_close(sup.weights, release_weights(segment_ids, mask, want))


def test_random_release_permutes_the_release_fractions():
    lengths = [12, 12, 12, 12, 0]
    mask = _ragged(lengths, 12)
    segment_ids = _segments(lengths, 12, 2)
    margins = torch.stack(
        [torch.tensor([3.0] * k + [0.0] * (12 - k)) for k in (2, 4, 8, 10)] + [torch.zeros(12)]
    )  # drops after 1, 2, 4, 5 segments of 6
    release = supervision_weights("release", mask, segment_ids=segment_ids, margins=margins)
    kept_release = sorted((release.weights > 0).sum(-1).tolist())
    seen = set()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        sup = supervision_weights("random_release", mask, segment_ids=segment_ids, margins=margins, generator=g)
        kept = (sup.weights > 0).sum(-1)
        assert sorted(kept.tolist()) == kept_release  # a permutation of the release lengths (equal lengths here)
        assert kept[4] == 0 and (sup.weights[4] == 0).all()  # the empty trajectory stays empty
        for b in range(4):  # a kept prefix, mass preserved
            n = int(kept[b])
            assert (sup.weights[b, :n] > 0).all() and (sup.weights[b, n:] == 0).all()
            assert sup.weights[b].sum().item() == pytest.approx(12.0)
        seen.add(tuple(kept.tolist()))
        again = supervision_weights(
            "random_release", mask, segment_ids=segment_ids, margins=margins, generator=torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(again.weights, sup.weights)
    assert len(seen) > 5  # the permutation really varies with the seed


def test_random_release_applies_fractions_to_each_own_length():
    mask = _ragged([4, 8], 8)
    segment_ids = torch.tensor([[0, 0, 1, 1, -1, -1, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    change_point = bic_change_point(torch.tensor([[2.0, 0.0], [1.0, 0.0]]), torch.tensor([2, 1]))
    # Row 0 keeps 2/4 = 0.5, row 1 keeps everything. Swapped: row 0 keeps 4/4, row 1 keeps ceil(0.5 * 8) = 4.
    from trl_ltc.supervision import random_release_weights

    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        swapped = torch.randperm(2, generator=torch.Generator().manual_seed(seed)).tolist() == [1, 0]
        kept = (random_release_weights(segment_ids, mask, change_point, g) > 0).sum(-1).tolist()
        assert kept == ([4, 4] if swapped else [2, 8])


def test_release_fraction_permutation_and_prefix_weights_by_hand():
    fractions = torch.tensor([0.5, 1.0, 0.9, 0.25, 0.75, 0.0], dtype=torch.float64)
    eligible = torch.tensor([True, True, False, True, True, False])
    got = permute_release_fractions(fractions, eligible, torch.Generator().manual_seed(3))
    order = torch.randperm(4, generator=torch.Generator().manual_seed(3))  # the 4 eligible rows, in order
    rows = torch.tensor([0, 1, 3, 4])
    want = torch.zeros(6, dtype=torch.float64)
    want[rows] = fractions[rows[order]]
    assert order.tolist() != [0, 1, 2, 3]  # the seed really moves fractions
    assert torch.equal(got, want) and got[2] == got[5] == 0  # ineligible rows get 0, even with a fraction of their own

    # First ceil(fraction * own length) supervised tokens, rescaled to the row's mass; an empty row keeps nothing.
    mask = _ragged([4, 6, 3, 0], 6)
    weights = fraction_prefix_weights(mask, torch.tensor([0.5, 1 / 3, 0.5, 0.7], dtype=torch.float64))
    want = torch.tensor(
        [
            [2, 2, 0, 0, 0, 0],  # ceil(0.5 * 4) = 2 of 4
            [3, 3, 0, 0, 0, 0],  # ceil(6 / 3) = 2 of 6 (not 3: 6 * (1/3) is 2 up to rounding)
            [1.5, 1.5, 0, 0, 0, 0],  # ceil(0.5 * 3) = 2 of 3
            [0, 0, 0, 0, 0, 0],
        ]
    )
    torch.testing.assert_close(weights, want)

    # `kept_fractions` reads them back from weights; `supervision_weights` applies precomputed fractions as given.
    segment_ids = _segments([4, 6, 3, 0], 6, 2)
    back, back_eligible = kept_fractions(weights, mask, segment_ids)
    assert back.tolist() == [0.5, 1 / 3, 2 / 3, 0.0] and back_eligible.tolist() == [True, True, True, False]
    sup = supervision_weights(
        "random_release", mask, segment_ids=segment_ids, margins=torch.zeros(4, 6), release_fractions=back
    )
    torch.testing.assert_close(sup.weights, fraction_prefix_weights(mask, back))


def test_stats_and_reduction_by_hand():
    mask = _ragged([4, 2], 4)
    segment_ids = _segments([4, 2], 4, 2)
    margins = torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    sup = supervision_weights("release", mask, segment_ids=segment_ids, margins=margins)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 0.0], [4.0, 0.0, 9.0, 9.0]])
    stats = supervision_stats(sup, mask, advantages, margins)
    totals = {k: (float(s), float(c)) for k, (s, c) in stats.items()}
    out = reduce_stats(totals)
    scores, n = segment_scores(margins, segment_ids)
    cp = bic_change_point(scores, n)
    kept = (release_weights(segment_ids, mask, cp) > 0).float()
    assert out["release/kept_token_frac"] == pytest.approx(kept.sum().item() / 6)
    assert out["release/accepted_frac"] == pytest.approx(cp.accepted.float().mean().item())
    assert out["release/num_segments"] == pytest.approx(1.5)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0, 4.0, 0.0])
    assert out["advantage/mean"] == pytest.approx(a.mean().item())
    assert out["advantage/std"] == pytest.approx(a.std(unbiased=False).item(), rel=1e-5)
    assert "advantage/sq_mean" not in out
    assert math.isnan(reduce_stats({"margin/suffix_mean": (0.0, 0.0)})["margin/suffix_mean"])


def test_null_acceptance_stat_uses_its_own_generator_only():
    g = torch.Generator().manual_seed(0)
    lengths = [12, 12, 8, 12, 0, 6]
    mask = _ragged(lengths, 12)
    segment_ids = _segments(lengths, 12, 2)
    margins = torch.rand(6, 12, generator=g) * 3
    margins[:, 6:] *= 0.01  # a drop half way through
    release_generator = torch.Generator().manual_seed(1)
    before = release_generator.get_state()
    sup = supervision_weights(
        "random_release", mask, segment_ids=segment_ids, margins=margins, generator=release_generator
    )
    after_weights = release_generator.get_state()
    advantages = torch.randn(6, 12, generator=g)

    plain = supervision_stats(sup, mask, advantages, margins)
    assert "release/accepted_frac_null" not in plain
    null_generator = torch.Generator().manual_seed(7)
    stats = supervision_stats(sup, mask, advantages, margins, null_generator=null_generator)
    assert torch.equal(release_generator.get_state(), after_weights) and not torch.equal(before, after_weights)
    assert {k: tuple(map(float, v)) for k, v in plain.items()} == {
        k: tuple(map(float, v)) for k, v in stats.items() if k != "release/accepted_frac_null"
    }
    null = null_change_point(sup.segment_scores, sup.num_segments, torch.Generator().manual_seed(7))
    out = reduce_stats({k: (float(s), float(c)) for k, (s, c) in stats.items()})
    assert out["release/accepted_frac_null"] == pytest.approx(null.accepted.float().mean().item())
    assert out["release/accepted_frac"] == pytest.approx(sup.change_point.accepted.float().mean().item())
    # the null generator moves on at each call; the pairs of two batches are summed before dividing
    again = supervision_stats(sup, mask, advantages, margins, null_generator=null_generator)
    assert torch.equal(release_generator.get_state(), after_weights)
    (s1, c1), (s2, c2) = stats["release/accepted_frac_null"], again["release/accepted_frac_null"]
    totals = {"release/accepted_frac_null": (float(s1 + s2), float(c1 + c2))}
    assert c1 == c2 == 6
    assert reduce_stats(totals)["release/accepted_frac_null"] == pytest.approx(float(s1 + s2) / 12)


def test_teacher_mass_off_the_student_support_is_not_selected():
    """TA-OPD: disagreement on the student's support is teachable; mass on a token the student ignores is not."""
    V = H = 8
    head = OutputHead(torch.eye(V, H))
    T = 30
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.zeros(1, T, H)
    student_hidden[0, :, 0], student_hidden[0, :, 1] = 5.0, 4.0  # support {0, 1} with K = 2
    teacher_hidden = student_hidden.clone()  # positions 20-29 agree with the student
    teacher_hidden[0, :10, 1] = 7.0 + torch.rand(10, generator=g)  # prefers token 1: on the support
    teacher_hidden[0, 10:20, 7] = 14.0 + torch.rand(10, generator=g)  # prefers token 7: off the support
    mask = torch.ones(1, T)
    targets = torch.zeros(1, T, dtype=torch.long)
    signals = signals_from_hidden(student_hidden, teacher_hidden, targets, mask, head, head, None, feature_k=2)
    compatibility = signals.features.compatibility[0]
    assert (compatibility[10:20] < 1e-3).all() and (compatibility[:10] > 0.99).all()
    sup = supervision_weights(
        "token_teachability", mask, features=signals.features, token_keep_ratio=1 / 3, token_min_keep=0
    )
    kept = sup.weights[0] > 0
    assert kept[:10].all() and not kept[10:].any()
    torch.testing.assert_close(sup.weights[0, :10], torch.full((10,), 3.0))
