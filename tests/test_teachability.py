"""TA-OPD token teachability (formula 8): features, batch-quantile normalisation, scores, budget selection.

Every expectation is computed independently in plain Python from the definitions.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from trl_ltc.teachability import (
    TOKEN_SCORES,
    TeachabilityFeatures,
    batch_quantile_normalize,
    features_from_logprobs,
    score_tokens,
    teachability_features,
    token_budget_weights,
    token_scores,
)

# ----------------------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------------------


def _softmax(xs, temperature):
    z = [x / temperature for x in xs]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def naive_features_row(s_logits, t_logits, k, temperature):
    """(C, D, H) for one position from python lists of float logits."""
    ps, pt = _softmax(s_logits, temperature), _softmax(t_logits, temperature)
    vocab = range(len(ps))
    top_s = sorted(vocab, key=lambda v: -ps[v])[:k]
    top_t = sorted(vocab, key=lambda v: -pt[v])[:k]

    c = min(1.0, max(0.0, sum(pt[v] for v in top_s)))

    union = set(top_s) | set(top_t)
    zs, zt = sum(ps[v] for v in union), sum(pt[v] for v in union)
    d = 0.0
    for v in union:
        hat_s = max(ps[v] / zs, 1e-12)
        hat_t = max(pt[v] / zt, 1e-12)
        d += hat_t * (math.log(hat_t) - math.log(hat_s))

    if k == 1:
        h = 0.0
    else:
        z = sum(ps[v] for v in top_s)
        q = [ps[v] / z for v in top_s]
        h = -sum(x * math.log(x) for x in q if x > 0) / math.log(k)
    return c, d, h


def naive_features(s_logits: torch.Tensor, t_logits: torch.Tensor, k, temperature):
    lead = s_logits.shape[:-1]
    s_rows = s_logits.double().reshape(-1, s_logits.shape[-1]).tolist()
    t_rows = t_logits.double().reshape(-1, t_logits.shape[-1]).tolist()
    out = [naive_features_row(s, t, k, temperature) for s, t in zip(s_rows, t_rows)]
    return [torch.tensor([o[i] for o in out], dtype=torch.float64).reshape(lead) for i in range(3)]


def naive_quantile(sorted_vals, q):
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def naive_normalize(values, mask, q_low=0.05, q_high=0.95):
    vals, msk = values.double().tolist(), mask.tolist()
    rows, cols = len(vals), len(vals[0])
    valid = sorted(vals[b][t] for b in range(rows) for t in range(cols) if msk[b][t] > 0)
    out = [[0.0] * cols for _ in range(rows)]
    if not valid:
        return torch.tensor(out, dtype=torch.float64)
    lo, hi = naive_quantile(valid, q_low), naive_quantile(valid, q_high)
    if hi - lo < 1e-12:
        return torch.tensor(out, dtype=torch.float64)
    for b in range(rows):
        for t in range(cols):
            if msk[b][t] > 0:
                out[b][t] = min(1.0, max(0.0, (vals[b][t] - lo) / (hi - lo)))
    return torch.tensor(out, dtype=torch.float64)


def naive_budget_weights(scores, mask, keep_ratio, min_keep):
    sc, msk = scores.tolist(), mask.tolist()
    rows, cols = len(sc), len(sc[0])
    valid = [(b, t) for b in range(rows) for t in range(cols) if msk[b][t] > 0]
    n = len(valid)
    w = [[0.0] * cols for _ in range(rows)]
    if n == 0:
        return torch.tensor(w)
    order = [(b, t) for _, b, t in sorted((-sc[b][t], b, t) for b, t in valid)]
    budget = min(n, math.ceil(n * keep_ratio))
    kept = set(order[:budget])
    for b in range(rows):
        need = min(min_keep, sum(1 for bb, _ in valid if bb == b))
        have = sum(1 for bb, _ in kept if bb == b)
        for bb, t in order[budget:]:
            if have >= need:
                break
            if bb == b:
                kept.add((bb, t))
                have += 1
    for b, t in kept:
        w[b][t] = n / len(kept)
    return torch.tensor(w)


def distinct_logits(gen, lead, vocab, spread=0.25):
    """Logits whose values are distinct even after bf16 rounding (no top-K ties): a shuffled grid plus jitter."""
    base = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(math.prod(lead))]).double()
    jitter = torch.rand(base.shape, generator=gen, dtype=torch.float64) * 0.5
    return ((base + jitter) * spread - vocab * spread / 2).reshape(*lead, vocab)


# ----------------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_features_match_naive_float32(k, temperature):
    gen = torch.Generator().manual_seed(100 * k + int(10 * temperature))
    s = torch.randn(2, 3, 24, generator=gen) * 3
    t = torch.randn(2, 3, 24, generator=gen) * 3
    got = teachability_features(s, t, k=k, temperature=temperature)
    assert isinstance(got, TeachabilityFeatures)
    want = naive_features(s, t, k, temperature)
    for g, w in zip(got, want):
        assert g.shape == (2, 3) and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_features_match_naive_float64_with_floor(k):
    # Large logits push renormalised probabilities below 1e-12, exercising the floor; float64 stays float64.
    gen = torch.Generator().manual_seed(7 + k)
    s = torch.randn(4, 20, generator=gen, dtype=torch.float64) * 25
    t = torch.randn(4, 20, generator=gen, dtype=torch.float64) * 25
    got = teachability_features(s, t, k=k, temperature=1.0)
    want = naive_features(s, t, k, 1.0)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == (4,)
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_features_bf16_input(k, temperature):
    gen = torch.Generator().manual_seed(k)
    s = distinct_logits(gen, (3, 2), 32).bfloat16()
    t = distinct_logits(gen, (3, 2), 32).bfloat16()
    got = teachability_features(s, t, k=k, temperature=temperature)
    want = naive_features(s.double(), t.double(), k, temperature)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == (3, 2)
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4)


def test_feature_ranges_shapes_and_no_grad():
    gen = torch.Generator().manual_seed(3)
    s = (torch.randn(2, 1, 3, 40, generator=gen) * 4).requires_grad_()
    t = torch.randn(2, 1, 3, 40, generator=gen) * 4
    feats = teachability_features(s, t, k=16, temperature=1.3)
    for f in feats:
        assert f.shape == (2, 1, 3)
        assert not f.requires_grad
        assert torch.isfinite(f).all()
    assert ((feats.compatibility >= 0) & (feats.compatibility <= 1)).all()
    assert ((feats.student_entropy >= 0) & (feats.student_entropy <= 1)).all()
    assert (feats.disagreement >= -1e-6).all()
    # K = V: the union is the whole vocabulary, so C = 1 and D = KL(pT || pS).
    full = teachability_features(s, t, k=40)
    torch.testing.assert_close(full.compatibility, torch.ones(2, 1, 3))
    ls, lt = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    torch.testing.assert_close(full.disagreement, (lt.exp() * (lt - ls)).sum(-1), atol=1e-5, rtol=1e-5)


def test_features_from_logprobs_is_the_same_math_and_chunks():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 6, 30, generator=gen) * 2
    t = torch.randn(2, 6, 30, generator=gen) * 2
    ls, lt = torch.log_softmax(s / 0.8, -1), torch.log_softmax(t / 0.8, -1)
    whole = teachability_features(s, t, k=5, temperature=0.8)
    from_lp = features_from_logprobs(ls, lt, k=5)
    chunks = [features_from_logprobs(ls[:, i : i + 4], lt[:, i : i + 4], k=5) for i in range(0, 6, 4)]
    for i in range(3):
        torch.testing.assert_close(from_lp[i], whole[i])
        torch.testing.assert_close(torch.cat([c[i] for c in chunks], dim=1), whole[i])


def test_features_half_and_masked_vocab_are_finite():
    s = torch.randn(3, 12).half()
    t = torch.randn(3, 12).half()
    s[:, 3:] = float("-inf")  # only 3 finite student logits, K = 5
    feats = teachability_features(s, t, k=5)
    for f in feats:
        assert f.dtype == torch.float32 and torch.isfinite(f).all()


@pytest.mark.parametrize("bad_k", [0, -1, 13])
def test_features_reject_bad_k(bad_k):
    s, t = torch.randn(2, 12), torch.randn(2, 12)
    with pytest.raises(ValueError, match="k"):
        teachability_features(s, t, k=bad_k)
    with pytest.raises(ValueError, match="k"):
        features_from_logprobs(s.log_softmax(-1), t.log_softmax(-1), k=bad_k)


def test_compatibility_off_and_on_support():
    vocab = 10
    student = torch.zeros(vocab)
    student[[0, 1]] = 20.0  # student support {0, 1} for K = 2
    off = torch.zeros(vocab)
    off[[5, 6]] = 20.0
    on = torch.zeros(vocab)
    on[[0, 1]] = 20.0
    on[0] += 1.0
    f_off = teachability_features(student[None], off[None], k=2)
    f_on = teachability_features(student[None], on[None], k=2)
    assert f_off.compatibility.item() < 1e-6
    assert f_on.compatibility.item() > 1 - 1e-6
    assert f_off.disagreement.item() > 10 * f_on.disagreement.item()
    # The student is uniform on its support: entropy 1.
    assert f_on.student_entropy.item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------------------------------


def test_normalize_matches_naive_random():
    rng = random.Random(0)
    for case in range(40):
        rows, cols = rng.randint(1, 4), rng.randint(1, 9)
        values = torch.randn(rows, cols, generator=torch.Generator().manual_seed(case)) * rng.choice([1e-3, 1, 50])
        mask = torch.tensor([[float(rng.random() < 0.7) for _ in range(cols)] for _ in range(rows)])
        got = batch_quantile_normalize(values, mask)
        want = naive_normalize(values, mask)
        assert got.shape == values.shape
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
        if mask.sum() > 0:  # the hand-written quantile agrees with torch.quantile
            valid = values[mask > 0].double()
            q = torch.quantile(valid, torch.tensor([0.05, 0.95], dtype=torch.float64))
            srt = sorted(valid.tolist())
            assert naive_quantile(srt, 0.05) == pytest.approx(q[0].item())
            assert naive_quantile(srt, 0.95) == pytest.approx(q[1].item())


def test_normalize_other_quantiles_and_outside_mask():
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 1e9, float("nan"), 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1]])
    got = batch_quantile_normalize(values, mask, q_low=0.2, q_high=0.8)
    torch.testing.assert_close(got.double(), naive_normalize(values.nan_to_num(), mask, 0.2, 0.8))
    assert got[1, 1] == 0 and got[1, 2] == 0


def test_normalize_degenerate_cases():
    zeros = torch.zeros(2, 3)
    const = torch.full((2, 3), 0.7)
    mask = torch.ones(2, 3)
    assert torch.equal(batch_quantile_normalize(const, mask), zeros)  # constant values
    assert torch.equal(batch_quantile_normalize(torch.randn(2, 3), torch.zeros(2, 3)), zeros)  # all masked
    single = torch.zeros(2, 3)
    single[1, 2] = 1
    assert torch.equal(batch_quantile_normalize(torch.randn(2, 3), single), zeros)  # single valid token
    assert torch.equal(batch_quantile_normalize(torch.empty(0, 5), torch.empty(0, 5)), torch.empty(0, 5))


# ----------------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------------


def _random_features(seed, shape=(3, 7)):
    gen = torch.Generator().manual_seed(seed)
    return TeachabilityFeatures(
        torch.rand(shape, generator=gen), torch.rand(shape, generator=gen) * 5, torch.rand(shape, generator=gen)
    )


@pytest.mark.parametrize("name", ["teachability", "tip", "entropy", "divergence"])
def test_score_tokens_hand_formulas(name):
    feats = _random_features(11)
    mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) < 0.8).long()
    mask[2] = 0
    c, d, h = (naive_normalize(x, mask) for x in feats)
    want = {"teachability": d * c, "tip": h + d - h * d, "entropy": h, "divergence": d}[name]
    got = score_tokens(feats, mask, score=name)
    assert got.shape == (3, 7)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert (got[mask == 0] == 0).all()
    # token_scores on already-normalised features gives the same combination.
    norm = TeachabilityFeatures(*(x.float() for x in (c, d, h)))
    torch.testing.assert_close(token_scores(norm, name).double(), want, atol=1e-6, rtol=1e-5)


def test_score_tokens_random_is_seeded_and_masked():
    feats = _random_features(2)
    mask = torch.ones(3, 7)
    mask[0, 3:] = 0
    a = score_tokens(feats, mask, "random", generator=torch.Generator().manual_seed(5))
    b = score_tokens(feats, mask, "random", generator=torch.Generator().manual_seed(5))
    c = score_tokens(feats, mask, "random", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a[mask == 0] == 0).all()
    assert ((a >= 0) & (a < 1)).all() and (a[mask > 0] > 0).any()


def test_score_names():
    assert TOKEN_SCORES == ("teachability", "tip", "entropy", "divergence", "random")
    with pytest.raises(ValueError, match="score"):
        score_tokens(_random_features(0), torch.ones(3, 7), score="margin")
    with pytest.raises(ValueError, match="score"):
        token_scores(_random_features(0), "margin")


# ----------------------------------------------------------------------------------------------------------------
# budget selection
# ----------------------------------------------------------------------------------------------------------------


def test_budget_weights_match_naive_random_cases():
    rng = random.Random(1234)
    for case in range(300):
        rows, cols = rng.randint(1, 5), rng.randint(1, 8)
        if rng.random() < 0.5:  # many ties
            scores = torch.tensor([[float(rng.randint(0, 2)) for _ in range(cols)] for _ in range(rows)])
        else:
            scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(case))
        p_valid = rng.choice([0.0, 0.3, 0.8, 1.0])
        mask = torch.tensor([[int(rng.random() < p_valid) for _ in range(cols)] for _ in range(rows)])
        if rows > 1 and rng.random() < 0.3:
            mask[rng.randrange(rows)] = 0  # an all-masked row
        keep_ratio = rng.choice([0.05, 0.1, 0.25, 0.5, 1.0, rng.uniform(0.01, 1.0)])
        min_keep = rng.choice([0, 1, 3])
        got = token_budget_weights(scores, mask, keep_ratio, min_keep)
        want = naive_budget_weights(scores, mask, keep_ratio, min_keep)
        assert got.shape == (rows, cols) and got.dtype == torch.float32
        assert torch.equal(got > 0, want > 0), (case, scores, mask, keep_ratio, min_keep)
        torch.testing.assert_close(got, want)
        n = int((mask > 0).sum())
        assert not torch.isnan(got).any()
        if n:
            assert got.sum().item() == pytest.approx(n, rel=1e-5)
        else:
            assert torch.equal(got, torch.zeros(rows, cols))


def test_budget_ties_break_by_batch_order_and_top_up():
    scores = torch.ones(3, 4)
    mask = torch.ones(3, 4)
    # N = 12, budget = ceil(12 * 0.25) = 3: the first three tokens of row 0; rows 1, 2 top up their first token.
    w = token_budget_weights(scores, mask, keep_ratio=0.25, min_keep_per_sequence=1)
    kept = (w > 0).nonzero().tolist()
    assert kept == [[0, 0], [0, 1], [0, 2], [1, 0], [2, 0]]
    torch.testing.assert_close(w[w > 0], torch.full((5,), 12 / 5))
    # Top-up follows the score order inside the row, and a row shorter than min_keep keeps all its tokens.
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [0.1, 0.3, 0.2, 0.3], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    w = token_budget_weights(scores, mask, keep_ratio=0.1, min_keep_per_sequence=3)
    assert (w > 0).tolist() == [
        [True, True, True, False],  # budget 1 (token 0) + top-up 2
        [False, True, True, True],  # 0.3 @1, 0.3 @3 (tie, earlier first), then 0.2
        [True, False, False, False],  # only one valid token
    ]


def test_budget_keep_all_and_no_valid_tokens():
    scores = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    assert torch.equal(token_budget_weights(scores, mask, 1.0), mask.float())
    w = token_budget_weights(scores, torch.zeros(2, 5), 0.5)
    assert torch.equal(w, torch.zeros(2, 5))
    w64 = token_budget_weights(scores.double(), mask, 0.3)
    assert w64.dtype == torch.float64 and w64.sum().item() == pytest.approx(7.0)


def test_budget_argument_checks():
    scores, mask = torch.randn(2, 3), torch.ones(2, 3)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            token_budget_weights(scores, mask, bad)
    with pytest.raises(ValueError, match="min_keep_per_sequence"):
        token_budget_weights(scores, mask, 0.5, min_keep_per_sequence=-1)
