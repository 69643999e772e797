"""Token teachability (TA-OPD, arXiv 2605.26844; DESIGN.md formula 8): pure tensor math.

Per completion position t, with pS / pT the student's / teacher's next-token distributions at temperature τ
(softmax of logits / τ over the full vocabulary) and K the support size:

- compatibility  `C_t = Σ_{v ∈ topK(pS)} pT(v)`, clamped to [0, 1];
- disagreement   `D_t = Σ_{v ∈ U} p̂T(v) (log p̂T(v) - log p̂S(v))` with `U = topK(pS) ∪ topK(pT)` and
  `p̂(v) = max(p(v) / Σ_{u ∈ U} p(u), 1e-12)` for each model (forward KL on the union);
- student entropy `H_t = -Σ_{v ∈ topK(pS)} p̃S(v) log p̃S(v) / log K` with p̃S = pS renormalised over
  topK(pS), in [0, 1] (`H ≡ 0` for K = 1).

Each feature is normalised over the valid tokens of the rollout batch by its 5% / 95% quantiles
([`batch_quantile_normalize`]), combined into a per-token score ([`token_scores`] /
[`score_tokens`]), and the batch keeps its `ceil(ρ N)` best tokens plus a per-trajectory minimum
([`token_budget_weights`]). This module is the only place where that selection rule lives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "TOKEN_SCORES",
    "TeachabilityFeatures",
    "batch_quantile_normalize",
    "features_from_logprobs",
    "score_tokens",
    "teachability_features",
    "token_budget_weights",
    "token_scores",
]

TOKEN_SCORES = ("teachability", "tip", "entropy", "divergence", "random")

_PROB_FLOOR = 1e-12


class TeachabilityFeatures(NamedTuple):
    """Per-position features, each shaped like the logits without the vocabulary dimension."""

    compatibility: torch.Tensor
    disagreement: torch.Tensor
    student_entropy: torch.Tensor


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 or better: the promoted dtype of `tensors` and float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@torch.no_grad()
def features_from_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, k: int = 16
) -> TeachabilityFeatures:
    """Teachability features from full-vocabulary log-probs `[..., V]` (already `log_softmax(logits / τ)`).

    Works on any leading shape, so a chunked caller can pass one chunk of positions at a time. Computed in
    float32 or better (float64 stays float64). The union U is represented as the 2K columns
    `topK(pS) ++ topK(pT)` with the teacher's indices that already occur in the student's set masked out.
    Ties inside `topk` are broken by `torch.topk`.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ValueError(
            f"student and teacher log-probs must have the same shape, got {tuple(student_logprobs.shape)} "
            f"and {tuple(teacher_logprobs.shape)}"
        )
    vocab = student_logprobs.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, vocab size={vocab}], got {k!r}")
    dtype = _float_dtype(student_logprobs, teacher_logprobs)
    s_lp = student_logprobs.to(dtype)
    t_lp = teacher_logprobs.to(dtype)
    log_floor = math.log(_PROB_FLOOR)

    s_top, s_idx = s_lp.topk(k, dim=-1)  # [..., K]
    t_idx = t_lp.topk(k, dim=-1).indices  # [..., K]

    # Compatibility: the teacher's true mass on the student's support.
    compatibility = t_lp.gather(-1, s_idx).exp().sum(-1).clamp(0.0, 1.0)

    # Student entropy on its own support, renormalised, divided by log K.
    if k == 1:
        student_entropy = torch.zeros_like(s_top[..., 0])
    else:
        log_p = s_top - s_top.logsumexp(-1, keepdim=True)
        p = log_p.exp()
        plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))  # 0 · log 0 = 0
        student_entropy = (-plogp.sum(-1) / math.log(k)).clamp(0.0, 1.0)

    # Disagreement: forward KL(p̂T || p̂S) on U = topK(pS) ∪ topK(pT), both renormalised over U and floored.
    union_idx = torch.cat([s_idx, t_idx], dim=-1)  # [..., 2K]
    duplicate = (t_idx.unsqueeze(-1) == s_idx.unsqueeze(-2)).any(-1)  # [..., K]: teacher index already in S
    in_union = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)  # [..., 2K]
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=s_lp.device)

    def renormalised_log(lp: torch.Tensor) -> torch.Tensor:
        u = torch.where(in_union, lp.gather(-1, union_idx), neg_inf)
        return (u - u.logsumexp(-1, keepdim=True)).clamp_min(log_floor)

    log_ps_u = renormalised_log(s_lp)
    log_pt_u = renormalised_log(t_lp)
    kl_terms = log_pt_u.exp() * (log_pt_u - log_ps_u)
    disagreement = torch.where(in_union, kl_terms, torch.zeros_like(kl_terms)).sum(-1)

    return TeachabilityFeatures(compatibility, disagreement, student_entropy)


@torch.no_grad()
def teachability_features(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 16, temperature: float = 1.0
) -> TeachabilityFeatures:
    """Teachability features from raw logits `[..., V]`: `log_softmax(logits / temperature)` then
    [`features_from_logprobs`]. Returns three tensors of shape `logits.shape[:-1]` (float32, or float64
    for float64 input), without gradient. ValueError when `k < 1` or `k > V`, or `temperature <= 0`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    s = student_logits.to(_float_dtype(student_logits))
    t = teacher_logits.to(_float_dtype(teacher_logits))
    return features_from_logprobs(
        torch.log_softmax(s / temperature, dim=-1), torch.log_softmax(t / temperature, dim=-1), k
    )


def batch_quantile_normalize(
    values: torch.Tensor, mask: torch.Tensor, q_low: float = 0.05, q_high: float = 0.95
) -> torch.Tensor:
    """`clip((x - q_low) / (q_high - q_low), 0, 1)` with the quantiles taken over the valid (`mask > 0`)
    entries of the whole batch, linear interpolation as `torch.quantile` (computed by sorting, so there is
    no size limit). Zero outside the mask; all zeros when nothing is valid or `q_high - q_low < 1e-12`.
    Same shape as `values`; float32 or better.
    """
    if not 0.0 <= q_low <= q_high <= 1.0:
        raise ValueError(f"need 0 <= q_low <= q_high <= 1, got q_low={q_low!r}, q_high={q_high!r}")
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    x = values.detach().to(_float_dtype(values))
    valid = mask > 0
    out = torch.zeros_like(x)
    n = int(valid.sum())
    if n == 0:
        return out
    ordered = x[valid].sort().values

    def quantile(q: float) -> torch.Tensor:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    low, high = quantile(q_low), quantile(q_high)
    span = high - low
    if float(span) < 1e-12:
        return out
    return torch.where(valid, ((x - low) / span).clamp(0.0, 1.0), out)


def _check_score(score: str) -> None:
    if score not in TOKEN_SCORES:
        raise ValueError(f"score must be one of {TOKEN_SCORES}, got {score!r}")


def token_scores(
    normalized: TeachabilityFeatures,
    score: str = "teachability",
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine already-normalised features (each in [0, 1], zero off the mask) into a per-token score.

    `teachability = D·C` (TA-OPD), `tip = H + D - H·D`, `entropy = H`, `divergence = D`,
    `random = torch.rand(shape, generator=generator)` (times `loss_mask > 0` when a mask is given).
    """
    _check_score(score)
    c, d, h = normalized
    if score == "teachability":
        return d * c
    if score == "tip":
        return h + d - h * d
    if score == "entropy":
        return h.clone()
    if score == "divergence":
        return d.clone()
    r = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float32)
    return r if loss_mask is None else r * (loss_mask > 0)


def score_tokens(
    features: TeachabilityFeatures,
    loss_mask: torch.Tensor,
    score: str = "teachability",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Normalise the features that `score` needs with [`batch_quantile_normalize`] over `loss_mask`
    and combine them with [`token_scores`]. Returns `[B, T]` scores, zero outside the mask."""
    _check_score(score)
    needed = {"teachability": "cd", "tip": "dh", "entropy": "h", "divergence": "d", "random": ""}[score]
    zeros = torch.zeros(loss_mask.shape, dtype=torch.float32, device=loss_mask.device)
    c, d, h = (
        batch_quantile_normalize(x, loss_mask) if name in needed else zeros
        for name, x in zip("cdh", features)
    )
    return token_scores(TeachabilityFeatures(c, d, h), score, loss_mask=loss_mask, generator=generator)


@torch.no_grad()
def token_budget_weights(
    scores: torch.Tensor, loss_mask: torch.Tensor, keep_ratio: float, min_keep_per_sequence: int = 1
) -> torch.Tensor:
    """Batch-level token budget: weights `[B, T]` = `keep · N / N_kept`.

    N = number of valid tokens (`loss_mask > 0`). Order: scores descending, ties by batch order (row, then
    position; earlier wins), NaN scores last. Keep the first `min(N, ceil(N · keep_ratio))` tokens of that
    order; then each row with fewer than `min(min_keep_per_sequence, its valid tokens)` kept tokens also keeps
    its best remaining tokens (same order) until it reaches that number. All zeros when N == 0.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if min_keep_per_sequence < 0:
        raise ValueError(f"min_keep_per_sequence must be >= 0, got {min_keep_per_sequence!r}")
    if scores.dim() != 2 or scores.shape != loss_mask.shape:
        raise ValueError(
            f"scores and loss_mask must both be [B, T], got {tuple(scores.shape)} and {tuple(loss_mask.shape)}"
        )
    dtype = _float_dtype(scores) if scores.is_floating_point() else torch.float32
    n_rows, n_cols = scores.shape
    valid = (loss_mask > 0).reshape(-1)
    weights = torch.zeros(n_rows * n_cols, dtype=dtype, device=scores.device)
    n = int(valid.sum())
    if n == 0:
        return weights.view(n_rows, n_cols)
    budget = min(n, math.ceil(n * keep_ratio))

    # Global order over valid tokens: stable sort of -score keeps ascending flat index among ties.
    flat_idx = valid.nonzero().squeeze(1)  # ascending = (row, position) order
    neg = -scores.detach().reshape(-1)[flat_idx].to(dtype) + 0.0  # + 0.0 maps -0.0 to 0.0 (equal keys)
    order = torch.sort(neg, stable=True).indices
    ranked = flat_idx[order]
    rows = ranked // n_cols
    keep = torch.zeros_like(valid)
    keep[ranked[:budget]] = True

    # Per-row top-up: rank each remaining token within its row (in global order) and keep the first deficit.
    need = valid.view(n_rows, n_cols).sum(1).clamp(max=min_keep_per_sequence)
    deficit = (need - torch.bincount(rows[:budget], minlength=n_rows)).clamp(min=0)
    rest, rest_rows = ranked[budget:], rows[budget:]
    if rest.numel() and bool(deficit.any()):
        by_row = torch.sort(rest_rows, stable=True).indices  # groups rows, keeps global order inside a row
        counts = torch.bincount(rest_rows, minlength=n_rows)
        starts = counts.cumsum(0) - counts
        rank_in_row = torch.empty_like(by_row)
        rank_in_row[by_row] = torch.arange(rest.numel(), device=rest.device) - starts[rest_rows[by_row]]
        keep[rest[rank_in_row < deficit[rest_rows]]] = True

    n_kept = int(keep.sum())
    weights[keep] = n / max(n_kept, 1)
    return weights.view(n_rows, n_cols)
