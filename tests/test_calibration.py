"""Calibrated release (formula 10), keep-corrections and IW-OPD weights (formula 11): pure math, then the trainer."""

import itertools
import math

import pytest
import torch
from helpers import make_model
from test_trainer import _config, _prompts

from trl_ltc import TeachabilityGKDTrainer
from trl_ltc.release import (
    bic_change_point,
    look_alpha,
    online_looks,
    online_release,
    permutation_change_point,
    permutation_p_value,
)
from trl_ltc.spec import SupervisionSpec
from trl_ltc.supervision import iw_opd_weights, keep_corrections, supervision_stats, supervision_weights


def _mc_bound(alpha: float, trials: int) -> float:
    """`alpha` plus three Monte-Carlo standard errors of a rate estimated from `trials` draws."""
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


def _null_scores(kind: str, batch: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(batch, n, generator=g, dtype=torch.float64)
    return torch.empty(batch, n, dtype=torch.float64).exponential_(1.0, generator=g)  # heavy right tail


# ------------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("kind", ["normal", "exponential"])
@pytest.mark.parametrize("n", [2, 3, 4, 10, 50])
def test_false_release_rate_is_at_most_alpha(kind, n):
    alpha, batch = 0.1, 400
    scores = _null_scores(kind, batch, n, seed=n)
    counts = torch.full((batch,), n)
    calibrated = permutation_change_point(scores, counts, alpha, 99, torch.Generator().manual_seed(1))
    paper = bic_change_point(scores, counts)
    rate = calibrated.accepted.double().mean().item()
    assert rate <= _mc_bound(alpha, batch), (kind, n, rate)
    # the paper's rule releases noise far more often at few segments (50% at n=2: the one-drop model always fits)
    if n <= 4:
        assert paper.accepted.double().mean().item() > 2 * alpha


def test_calibrated_accepts_a_subset_of_the_paper_with_the_same_tau_and_gain():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(1, 25, (300,), generator=g)
    scores = torch.randn(300, 24, generator=g) + torch.where(torch.arange(24) < 8, 0.7, 0.0)  # some real drops
    paper = bic_change_point(scores, n)
    calibrated = permutation_change_point(scores, n, 0.05, generator=g)
    assert not (calibrated.accepted & ~paper.accepted).any()
    assert calibrated.accepted.any() and (paper.accepted & ~calibrated.accepted).any()
    assert torch.equal(calibrated.release_segment[calibrated.accepted], paper.release_segment[calibrated.accepted])
    assert torch.equal(calibrated.release_segment[~calibrated.accepted], n[~calibrated.accepted])
    torch.testing.assert_close(calibrated.bic_gain, paper.bic_gain)
    p_value = permutation_p_value(scores, n, generator=torch.Generator().manual_seed(1))
    assert ((p_value > 0) & (p_value <= 1)).all() and (p_value[~paper.accepted] == 1).all()
    again = permutation_change_point(scores, n, 0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.accepted, paper.accepted & (p_value <= 0.05))  # the same draws give the same test


def test_p_value_matches_exhaustive_enumeration():
    """With 4 segments there are 24 orders: the Monte-Carlo p-value estimates the exact share with a gain >= ours."""
    scores = torch.tensor([[3.0, 2.9, 0.2, 0.1], [2.0, 0.0, 1.9, 0.1], [1.0, 0.9, 0.8, -2.0]], dtype=torch.float64)
    counts = torch.full((3,), 4)
    observed = bic_change_point(scores, counts).bic_gain
    exact = []
    for row, gain in zip(scores, observed):
        orders = torch.stack([row[list(p)] for p in itertools.permutations(range(4))])
        null = bic_change_point(orders, torch.full((24,), 4)).bic_gain
        exact.append((null >= gain * (1 - 1e-9)).double().mean().item())
    p = permutation_p_value(scores, counts, 20000, torch.Generator().manual_seed(3))
    for estimate, truth, gain in zip(p.tolist(), exact, observed.tolist()):
        if gain > 0:
            assert abs(estimate - truth) < 4 * math.sqrt(truth * (1 - truth) / 20000) + 1e-4, (estimate, truth)


def test_a_clear_drop_is_still_accepted_at_the_true_tau():
    g = torch.Generator().manual_seed(5)
    tau = torch.randint(4, 16, (64,), generator=g)
    level = torch.where(torch.arange(20) < tau[:, None], 2.0, 0.5)
    scores = level + 0.3 * torch.randn(64, 20, generator=g)
    cp = permutation_change_point(scores, torch.full((64,), 20), 0.05, generator=g)
    assert cp.accepted.all()
    assert (cp.release_segment - tau).abs().max() <= 1


def test_draws_are_seeded():
    scores = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    counts = torch.full((32,), 12)
    a = permutation_change_point(scores, counts, 0.2, 50, torch.Generator().manual_seed(7))
    b = permutation_change_point(scores, counts, 0.2, 50, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(permutation_p_value(scores, counts, 50, torch.Generator().manual_seed(7)),
                       permutation_p_value(scores, counts, 50, torch.Generator().manual_seed(7)))  # fmt: skip


def test_bad_arguments():
    scores, counts = torch.zeros(2, 3), torch.full((2,), 3)
    with pytest.raises(ValueError, match="alpha"):
        permutation_change_point(scores, counts, 1.5)
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_change_point(scores, counts, 0.05, 0)
    with pytest.raises(ValueError, match="num_permutations"):
        permutation_p_value(scores, counts, 0)


# ------------------------------------------------------------------------------------------------ online


def test_looks_and_spending():
    assert online_looks(3, 30, 0.05) == [7, 11, 17, 26]  # C(7, 3) = 35 >= 1 / look_alpha(0.05, 1) = 32.9
    assert online_looks(3, 30, 0.2) == [5, 8, 12, 18, 27]  # C(5, 2) = 10 >= 1 / look_alpha(0.2, 1) = 8.2
    assert online_looks(10, 30, 0.05) == [10, 15, 23]
    assert online_looks(3, 7, 0.05) == []
    assert sum(look_alpha(0.05, j) for j in range(1, 100_000)) <= 0.05
    assert look_alpha(0.05, 1) == pytest.approx(0.05 * 6 / math.pi**2)


@pytest.mark.parametrize("kind", ["normal", "exponential"])
def test_online_stop_rate_on_exchangeable_scores_is_at_most_alpha(kind):
    alpha, batch, n = 0.1, 300, 30
    scores = _null_scores(kind, batch, n, seed=11)
    counts = torch.full((batch,), n)
    paper = online_release(scores, counts, min_segments=3, patience=2)
    calibrated = online_release(scores, counts, 3, 2, alpha=alpha, generator=torch.Generator().manual_seed(2))
    paper_rate = (paper.stop_segment < counts).double().mean().item()
    rate = (calibrated.stop_segment < counts).double().mean().item()
    assert paper_rate > 0.4  # formula 9 stops most trajectories of pure noise
    assert rate <= _mc_bound(alpha, batch), rate


def test_online_still_stops_soon_after_a_clear_drop():
    g = torch.Generator().manual_seed(4)
    level = torch.where(torch.arange(40) < 8, 2.0, 0.5)
    scores = level + 0.3 * torch.randn(32, 40, generator=g)
    counts = torch.full((32,), 40)
    decision = online_release(scores, counts, 3, 2, alpha=0.05, generator=torch.Generator().manual_seed(0))
    # looks at 7, 11, 17: the drop after segment 8 is stopped at the look of 11 or, at the latest, of 17 segments
    assert ((decision.stop_segment == 11) | (decision.stop_segment == 17)).all()
    assert (decision.release_segment - 8).abs().max() <= 1


def test_online_decisions_do_not_depend_on_the_other_rows_or_on_what_comes_later():
    """The generation loop calls the rule on the rows still running and on the segments so far: same decisions."""
    g = torch.Generator().manual_seed(9)
    level = torch.where(torch.arange(30) < torch.randint(5, 20, (40, 1), generator=g), 1.0, 0.2)
    scores = level + 0.4 * torch.randn(40, 30, generator=g)
    counts = torch.randint(10, 31, (40,), generator=g)
    full = online_release(scores, counts, 3, 2, alpha=0.1, generator=torch.Generator().manual_seed(5))
    rows = torch.arange(0, 40, 3)
    subset = online_release(scores[rows], counts[rows], 3, 2, alpha=0.1, generator=torch.Generator().manual_seed(5))
    stopped = full.stop_segment < counts
    assert stopped.any() and (~stopped).any()
    assert torch.equal(subset.stop_segment, full.stop_segment[rows])
    assert torch.equal(subset.release_segment[stopped[rows]], full.release_segment[rows][stopped[rows]])
    # replaying on a prefix of the scores: a trajectory stopped at s is stopped at s once segment s has started
    for b in torch.nonzero(stopped).squeeze(1).tolist()[:6]:
        s = int(full.stop_segment[b])
        prefix = online_release(scores[b : b + 1, : s + 1], torch.tensor([s + 1]), 3, 2, alpha=0.1,
                                generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert int(prefix.stop_segment) == s and int(prefix.release_segment) == int(full.release_segment[b])


def test_online_without_alpha_is_unchanged():
    scores = torch.randn(20, 15, generator=torch.Generator().manual_seed(1))
    counts = torch.full((20,), 15)
    a, b = online_release(scores, counts, 3, 2), online_release(scores, counts, 3, 2, alpha=None)
    assert torch.equal(a.stop_segment, b.stop_segment) and torch.equal(a.release_segment, b.release_segment)


# ------------------------------------------------------------------------------------------------ weights


def test_keep_corrections_by_hand():
    loss_mask = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    weights = torch.tensor([[2.0, 2, 2, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])  # row 0 released after 3 tokens
    advantages = torch.tensor([[-5.0, 0, 0, -3.0, -1.0, -2.5, -9.0], [-9.0, 0, 0, 0, 0, 0, 0]])
    out, corrections = keep_corrections(weights, loss_mask, advantages, threshold=-2.0)
    # row 0 keeps 3 + 2 (tokens 3 and 5; token 6 is padding) of 6 tokens: scale 6/5
    expected = torch.tensor([[1.2, 1.2, 1.2, 1.2, 0, 1.2, 0], [1, 1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(out, expected)
    assert corrections.tolist() == [[False, False, False, True, False, True, False], [False] * 7]


def _iw_opd_reference(mask, advantages, gamma):
    out = torch.zeros_like(advantages)
    for b in range(mask.shape[0]):
        total = sum(abs(float(a)) for a, m in zip(advantages[b], mask[b]) if m > 0)
        before = 0.0
        for t in range(mask.shape[1]):
            if mask[b, t] > 0:
                out[b, t] = 1 + gamma * (1 - before / max(total, 1e-8))
                before += abs(float(advantages[b, t]))
    return out


def test_iw_opd_weights_against_the_formula():
    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(4, 9, generator=g)
    mask = torch.tensor([[1.0] * 9, [0, 0, 1, 1, 1, 1, 0, 0, 0], [0.0] * 9, [1, 1, 1, 0, 0, 0, 0, 0, 0]])
    advantages[1, 0] = 100.0  # outside the mask: ignored
    for gamma in (0.5, 2.0):
        torch.testing.assert_close(iw_opd_weights(mask, advantages, gamma), _iw_opd_reference(mask, advantages, gamma))
    weights = iw_opd_weights(mask, advantages, 0.5)
    assert weights[2].eq(0).all()  # an empty row
    assert weights[0, 0] == pytest.approx(1.5)
    zero = iw_opd_weights(mask[:1], torch.zeros(1, 9))
    assert torch.allclose(zero, torch.full((1, 9), 1.5))  # S floored: every token 1 + gamma


def test_supervision_weights_and_stats_with_the_new_options():
    g = torch.Generator().manual_seed(0)
    loss_mask = torch.ones(6, 24)
    segment_ids = torch.arange(24).div(2, rounding_mode="floor").expand(6, -1)  # 12 segments of 2 tokens
    margins = torch.where(torch.arange(24) < 10, 3.0, 0.2) + 0.1 * torch.rand(6, 24, generator=g)
    advantages = -torch.rand(6, 24, generator=g) * 4
    calibrated = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins,
                                     advantages=advantages, release_alpha=0.05, generator=g)  # fmt: skip
    assert calibrated.change_point.accepted.all() and calibrated.paper_change_point.accepted.all()
    assert (calibrated.change_point.release_segment == 5).all()
    kept = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages,
                               release_alpha=0.05, generator=g, keep_advantage_below=-2.0)  # fmt: skip
    expected_corrections = (torch.arange(24) >= 10) & (advantages < -2.0)
    assert torch.equal(kept.corrections, expected_corrections)
    stats = supervision_stats(kept, loss_mask, advantages, margins)
    s, c = stats["release/corrections_kept_frac"]
    assert float(s) == expected_corrections.sum() and float(c) == 6 * 14
    assert "release/accepted_frac_bic" in stats
    iw = supervision_weights("iw_opd", loss_mask, advantages=advantages, iw_opd_gamma=0.5)
    stats = supervision_stats(iw, loss_mask, advantages, iw_opd=True)
    assert float(stats["iw_opd/weight_max"][0]) == pytest.approx(1.5)
    assert float(stats["iw_opd/weight_min"][0]) == pytest.approx(float(iw.weights.min()))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"release_alpha": 0.0}, "release_alpha"),
        ({"release_alpha": 0.01, "release_permutations": 50}, "release_permutations"),
        ({"policy": "full", "release_keep_advantage_below": -2.0}, "release_keep_advantage_below"),
        ({"release_keep_advantage_below": float("nan")}, "release_keep_advantage_below"),
        ({"policy": "iw_opd", "iw_opd_gamma": -1.0}, "iw_opd_gamma"),
    ],
)
def test_spec_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        SupervisionSpec(**overrides)


# ------------------------------------------------------------------------------------------------ trainer


@pytest.mark.parametrize(
    "overrides, metric",
    [
        ({"supervision": "release", "release_alpha": 0.2, "release_permutations": 19}, "release/accepted_frac_bic"),
        ({"supervision": "random_release", "release_alpha": 0.2}, "release/accepted_frac_bic"),
        ({"supervision": "release", "release_keep_advantage_below": 0.0}, "release/corrections_kept_frac"),
        ({"supervision": "release", "rollout_truncation": "online", "release_alpha": 0.2}, "release/accepted_frac"),
        ({"supervision": "iw_opd", "iw_opd_gamma": 1.0}, "iw_opd/weight_max"),
    ],
)
def test_trainer_runs_with_each_option(tmp_path, tokenizer, overrides, metric):
    vocab = len(tokenizer)
    trainer = TeachabilityGKDTrainer(
        model=make_model(vocab, seed=1), teacher_model=make_model(vocab, seed=2),
        args=_config(tmp_path, online_check_tokens=4, **overrides), train_dataset=_prompts(),
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert all(metric in log for log in logs), metric
    if "iw_opd" in metric:
        assert all(1.0 <= log["iw_opd/weight_min"] <= log["iw_opd/weight_max"] <= 2.0 for log in logs)
