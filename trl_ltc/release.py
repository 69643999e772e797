"""The release rule of "Prefix Teach, Suffix Fade" as pure tensor math (DESIGN.md, formulas 4-7).

One batch goes through four steps::

    margins = teacher_margin(student_logits, teacher_logits, k)         # [B, T]              formula 4
    scores, num_segments = segment_scores(margins, segment_ids)         # [B, S_max], [B]     formula 5
    change_point = bic_change_point(scores, num_segments)               # ChangePoint         formula 6
    weights = release_weights(segment_ids, loss_mask, change_point)     # [B, T]              formula 7

[`online_release`] (formula 9) replays the online rule that stops a trajectory's generation once its
supervision is released. [`null_change_point`] is the null model of formula 6: the same rule on each
trajectory's segment scores in a random order ([`shuffle_segments`]). [`permutation_change_point`] (formula 10)
accepts formula 6's drop only where its BIC gain is significant against that null: a stated false-release rate.

Every function is batched and vectorised (no Python loop over trajectories, tokens or candidate change
points), runs on whatever device its inputs live on, and needs nothing but torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LOG_PROB_FLOOR",
    "ChangePoint",
    "OnlineRelease",
    "bic_change_point",
    "DEFAULT_PERMUTATIONS",
    "NULL_SEED_OFFSET",
    "mass_preserving_weights",
    "null_change_point",
    "look_alpha",
    "online_looks",
    "online_release",
    "permutation_change_point",
    "permutation_p_value",
    "release_weights",
    "segment_scores",
    "shuffle_segments",
    "support_margin",
    "teacher_margin",
]

LOG_PROB_FLOOR = math.log(1e-12)
"""Teacher log-probs are floored here (formula 4), so masked (`-inf`) tokens still give finite margins."""

NULL_SEED_OFFSET = 7919
"""Added to a seed to seed the generator of [`null_change_point`], so its draws are its own."""

_BIC_EPS = 1e-12  # the `+ 1e-12` inside the BIC's log (formula 6)
_TIE_RTOL = 1e-10  # candidate RSS within this fraction of the row's sum of squares count as tied
_MIN_KEPT_MASS = 1e-8  # denominator floor of the mass-preserving rescale (formula 7)

DEFAULT_PERMUTATIONS = 199
"""Shuffles per trajectory of [`permutation_change_point`]: p-values on a grid of 1/200, so `alpha=0.05` is 10 of
200, and the Monte-Carlo error of a p-value near 0.05 is about 0.015 (see `benchmarks/calibration.py`)."""


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------- formula 4


def support_margin(teacher_logprobs: Tensor, support: Tensor) -> Tensor:
    """Teacher margin on a given support: the gap between the teacher's two best tokens inside `support`.

    `M = log pT(a1) - log pT(a2)` where `a1, a2` are the teacher's two most likely tokens of the support
    and log-probs are floored at `log(1e-12)` first. This is the one implementation of the margin: both
    [`teacher_margin`] and chunked callers that compute the teacher log-softmax themselves use it.

    Args:
        teacher_logprobs: `[..., V]` teacher log-probs over the full vocabulary (already tempered).
        support: `[..., k]` long, the student's top-k token ids at each position, `k >= 2`.

    Returns:
        `[...]` margins, `>= 0`, in float32 (float64 if `teacher_logprobs` is float64).
    """
    if support.shape[-1] < 2:
        raise ValueError(f"support must hold at least 2 tokens per position (k >= 2); got k={support.shape[-1]}")
    logprobs = teacher_logprobs.gather(-1, support).to(_float_dtype(teacher_logprobs))
    top2 = logprobs.clamp_min(LOG_PROB_FLOOR).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def teacher_margin(student_logits: Tensor, teacher_logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Teacher margin on the student's top-k support (formula 4).

    `C = topK(pS)`; `M = log pT(a1) - log pT(a2)` for the teacher's best two tokens inside `C`, with the
    teacher log-softmax taken over the full vocabulary at `temperature` and floored at `log(1e-12)`. The
    sampled token plays no role. Dividing the student logits by a positive temperature does not change their
    top-k, so the student side is ranked on the raw logits.

    Args:
        student_logits: `[..., V]` (fp32/bf16/fp16/fp64; any leading shape, including empty ones).
        teacher_logits: `[..., V]`, same shape; `-inf` entries (masked vocabulary) are allowed.
        k: support size, `2 <= k <= V`.
        temperature: sampling temperature `> 0`.

    Returns:
        `[...]` margins in float32 (float64 if either input is float64).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape; "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    vocab_size = student_logits.shape[-1]
    if not 2 <= k <= vocab_size:
        raise ValueError(f"k must be in [2, V] with V={vocab_size}; got k={k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    dtype = _float_dtype(student_logits, teacher_logits)
    support = student_logits.to(dtype).topk(k, dim=-1).indices
    teacher_logprobs = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return support_margin(teacher_logprobs, support)


# ----------------------------------------------------------------------------------------------- formula 5


def segment_scores(margins: Tensor, segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-segment scores `S_i = log(1 + mean_{t in segment i} M_t)` (formula 5).

    Args:
        margins: `[B, T]` per-token margins (values at tokens with segment id `-1` are ignored, even NaN).
        segment_ids: `[B, T]` integer, `0..n_b-1` on completion tokens, `-1` elsewhere. Ids are assumed
            contiguous; an id without tokens would get score 0.

    Returns:
        `scores`: `[B, S_max]` float32 (float64 for float64 margins) with `S_max = max_b n_b` (0 when no
        row has a segment, giving a `[B, 0]` tensor); columns `>= num_segments[b]` are 0 and meaningless.
        `num_segments`: `[B]` long, `n_b = max id + 1` (0 for rows without completion tokens).
    """
    if margins.shape != segment_ids.shape or margins.ndim != 2:
        raise ValueError(
            "margins and segment_ids must both be [B, T]; "
            f"got {tuple(margins.shape)} and {tuple(segment_ids.shape)}"
        )
    segment_ids = segment_ids.long()
    batch, length = segment_ids.shape
    if length:
        num_segments = (segment_ids.amax(dim=1) + 1).clamp_min(0)
    else:
        num_segments = segment_ids.new_zeros(batch)
    max_segments = int(num_segments.max()) if batch else 0

    dtype = _float_dtype(margins)
    valid = segment_ids >= 0
    column = torch.where(valid, segment_ids, max_segments)  # non-completion tokens go to a spare last column
    values = torch.where(valid, margins.to(dtype), 0.0)
    sums = values.new_zeros(batch, max_segments + 1).scatter_add_(1, column, values)
    counts = values.new_zeros(batch, max_segments + 1).scatter_add_(1, column, valid.to(dtype))
    means = sums[:, :max_segments] / counts[:, :max_segments].clamp_min(1.0)
    return torch.log1p(means), num_segments


# ----------------------------------------------------------------------------------------------- formula 6


class ChangePoint(NamedTuple):
    """Result of [`bic_change_point`], one entry per trajectory."""

    release_segment: Tensor
    """`[B]` long: number of leading segments kept (`tau` if accepted, else `num_segments`)."""
    accepted: Tensor
    """`[B]` bool: whether the one-drop model beats the no-change model."""
    bic_gain: Tensor
    """`[B]` float: `max(0, BIC0 - BIC_best)`; positive exactly when `accepted` under formula 6 (a calibrated change
    point, formula 10, keeps the gain of formula 6 where its test rejects the drop)."""


def bic_change_point(scores: Tensor, num_segments: Tensor) -> ChangePoint:
    """Profiled RSS-BIC test for one downward drop in each trajectory's segment scores (formula 6).

    For the `n = num_segments[b]` leading scores `x_0..x_{n-1}` of a row::

        BIC(rss, k) = n * log((rss + 1e-12) / n) + k * log(n)
        BIC0        = BIC(RSS of one mean, k=1)
        BIC(tau)    = BIC(RSS of mean(x[:tau]) and mean(x[tau:]), k=3),   tau in 1..n-1,

    where only *downward* candidates (right mean strictly below left mean) compete. The candidate with the
    lowest BIC wins; ties go to the earliest `tau` (RSS values within `1e-10 * sum((x - x_0)^2)` of the
    minimum, far above float64 round-off, count as tied). The drop is accepted iff `BIC(tau) < BIC0`;
    `n < 2` or no downward candidate is never accepted.

    All candidates of all rows are scored at once from float64 prefix sums of `x` and `x^2` (after
    shifting each row by its first score to limit cancellation; round-off negatives are clamped to 0):
    `O(S)` work per trajectory, no Python loop.

    Args:
        scores: `[B, S]` segment scores; columns `>= num_segments[b]` are ignored.
        num_segments: `[B]` integer, each `<= S`.

    Returns:
        [`ChangePoint`]. `release_segment = tau` if accepted else `n`; `bic_gain = BIC0 - BIC(tau)`
        if accepted else 0, in float32 (float64 for float64 scores).
    """
    if scores.ndim != 2 or num_segments.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [B, S] and num_segments [B]; got {tuple(scores.shape)} and {tuple(num_segments.shape)}"
        )
    batch, max_segments = scores.shape
    n = num_segments.to(device=scores.device, dtype=torch.long)
    if max_segments < 2:  # no row can have two segments
        never = n.new_zeros(batch, dtype=torch.bool)
        return ChangePoint(n.clone(), never, scores.new_zeros(batch, dtype=_float_dtype(scores)))

    positions = torch.arange(max_segments, device=scores.device)
    x = scores.to(torch.float64)
    x = torch.where(positions < n[:, None], x - x[:, :1], 0.0)  # shift, and zero the padding
    zero = x.new_zeros(batch, 1)
    prefix1 = torch.cat([zero, x.cumsum(dim=1)], dim=1)  # prefix1[:, tau] = sum(x[:tau])
    prefix2 = torch.cat([zero, (x * x).cumsum(dim=1)], dim=1)
    total1, total2 = prefix1[:, -1:], prefix2[:, -1:]  # padding is 0, so these are the row totals
    count = n.to(torch.float64)[:, None].clamp_min(1.0)

    def rss(sum1: Tensor, sum2: Tensor, size: Tensor) -> Tensor:
        return (sum2 - sum1 * sum1 / size).clamp_min(0.0)

    def bic(residual: Tensor, num_params: int) -> Tensor:
        return count * torch.log((residual + _BIC_EPS) / count) + num_params * torch.log(count)

    tau = positions[1:].to(torch.float64)  # candidates 1..S-1, [S-1]
    left1, left2 = prefix1[:, 1:max_segments], prefix2[:, 1:max_segments]
    right1, right2 = total1 - left1, total2 - left2
    right_size = (count - tau).clamp_min(1.0)
    candidate_rss = rss(left1, left2, tau) + rss(right1, right2, right_size)
    downward = (tau < n[:, None]) & (right1 / right_size < left1 / tau)
    candidate_rss = torch.where(downward, candidate_rss, torch.inf)

    min_rss = candidate_rss.amin(dim=1, keepdim=True)
    tied = candidate_rss <= min_rss + _TIE_RTOL * total2
    best = torch.where(tied, positions[1:], max_segments).amin(dim=1, keepdim=True)  # earliest tied tau
    best_rss = candidate_rss.gather(1, best - 1)  # inf when there is no downward candidate

    gain = (bic(rss(total1, total2, count), 1) - bic(best_rss, 3)).squeeze(1)  # -inf without a candidate
    accepted = gain > 0
    return ChangePoint(
        release_segment=torch.where(accepted, best.squeeze(1), n),
        accepted=accepted,
        bic_gain=torch.where(accepted, gain, 0.0).to(_float_dtype(scores)),
    )


def shuffle_segments(scores: Tensor, num_segments: Tensor, generator: torch.Generator) -> Tensor:
    """Each trajectory's valid segment scores in a random order; padding stays where it is.

    Row `b`'s first `num_segments[b]` scores are permuted uniformly among themselves, independently of the
    other rows; columns `>= num_segments[b]` keep their values. One `[B, S]` draw of random keys from
    `generator` (on the generator's device), padding keys set to `+inf`, and a stable `argsort` per row: no
    loop over trajectories, and the draw depends only on the shape and the generator's state.

    Args:
        scores: `[B, S]` segment scores.
        num_segments: `[B]` integer, each `<= S`.
        generator: the random source; it is advanced by one `[B, S]` draw.

    Returns:
        `[B, S]` tensor of the dtype and device of `scores`.
    """
    if scores.ndim != 2 or num_segments.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [B, S] and num_segments [B]; got {tuple(scores.shape)} and {tuple(num_segments.shape)}"
        )
    n = num_segments.to(device=scores.device, dtype=torch.long)
    keys = torch.rand(scores.shape, generator=generator, device=generator.device, dtype=torch.float64)
    positions = torch.arange(scores.shape[1], device=scores.device)
    keys = torch.where(positions < n[:, None], keys.to(scores.device), torch.inf)
    order = keys.argsort(dim=1, stable=True)  # padding (+inf keys) stays last, in its own order
    return scores.gather(1, order)


def null_change_point(scores: Tensor, num_segments: Tensor, generator: torch.Generator) -> ChangePoint:
    """The change point of formula 6 on each trajectory's segment scores shuffled ([`shuffle_segments`]).

    A null model for the release rule: the same scores, the same number of segments, the same BIC test, but no
    order. Its acceptance rate is what [`bic_change_point`] accepts on these scores by chance alone (with a few
    segments the one-drop model is preferred often even on scores without any drop), so a local collapse is only
    shown where the real acceptance rate clearly exceeds it.

    Args:
        scores: `[B, S]` segment scores; columns `>= num_segments[b]` are ignored.
        num_segments: `[B]` integer, each `<= S`.
        generator: the random source of the shuffle (advanced by one `[B, S]` draw).

    Returns:
        [`ChangePoint`] of the shuffled scores (its `release_segment` indexes the shuffled order).
    """
    return bic_change_point(shuffle_segments(scores, num_segments, generator), num_segments)


def _permutation_p_values(scores: Tensor, num_segments: Tensor, gain: Tensor, keys: Tensor) -> Tensor:
    """`(1 + #{gain of a shuffle >= gain}) / (1 + P)` per row, the shuffles ordering each row by `keys` `[B|1, P, S]`.

    Row `b`'s shuffle `p` puts its first `num_segments[b]` scores in the order of `keys[b, p, :n_b]` (columns beyond
    are padding and stay last); all `B * P` shuffled rows go through one [`bic_change_point`] call.
    """
    batch, width = scores.shape
    num_permutations = keys.shape[1]
    n = num_segments.to(device=scores.device, dtype=torch.long)
    positions = torch.arange(width, device=scores.device)
    keys = torch.where(positions < n[:, None, None], keys.to(scores.device).expand(batch, -1, -1), torch.inf)
    shuffled = scores[:, None, :].expand(-1, num_permutations, -1).gather(2, keys.argsort(dim=2, stable=True))
    rows = shuffled.reshape(batch * num_permutations, width)
    null_gain = bic_change_point(rows, n.repeat_interleave(num_permutations)).bic_gain.view(batch, -1)
    exceed = (null_gain.double() >= gain.double()[:, None] * (1 - 1e-9)).sum(dim=1)  # ties count against the drop
    return (1.0 + exceed.double()) / (1.0 + num_permutations)


def permutation_p_value(
    scores: Tensor,
    num_segments: Tensor,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The permutation p-value of formula 6's BIC gain per trajectory (formula 10); 1 where formula 6 finds no drop.

    `p = (1 + #{shuffled gains >= observed gain}) / (1 + P)`, the shuffled gains being formula 6 on `P` uniform
    within-trajectory shuffles of the same scores. Under the null (a trajectory's scores are exchangeable) `p` is a
    valid p-value: `P(p <= a) <= a` for every `a`. One `[B, P, S]` draw of random keys from `generator` (default:
    torch's global one), one batched [`bic_change_point`] over the `P` shuffles of each row formula 6 accepts (the
    others are not tested): `O(P * S)` work per trajectory, no Python loop.

    Args:
        scores: `[B, S]` segment scores; columns `>= num_segments[b]` are ignored.
        num_segments: `[B]` integer, each `<= S`.
        num_permutations: `P >= 1`; p-values live on a grid of `1 / (P + 1)`.
        generator: the random source (advanced by one `[B, P, S]` draw, whatever the scores).

    Returns:
        `[B]` float64 p-values in `(0, 1]`.
    """
    return _permutation_test(scores, num_segments, num_permutations, generator)[1]


def _permutation_test(scores, num_segments, num_permutations, generator) -> tuple[ChangePoint, Tensor]:
    """Formula 6's change point and its [`permutation_p_value`], formula 6 computed once for both."""
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1; got {num_permutations}")
    batch, width = scores.shape
    device = generator.device if generator is not None else scores.device
    keys = torch.rand(batch, num_permutations, width, generator=generator, device=device, dtype=torch.float64)
    paper = bic_change_point(scores, num_segments)
    return paper, _p_values_where_accepted(paper, scores, num_segments, keys)


def permutation_change_point(
    scores: Tensor,
    num_segments: Tensor,
    alpha: float,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    generator: torch.Generator | None = None,
) -> ChangePoint:
    """Formula 6's change point, accepted only where its BIC gain is significant at level `alpha` (formula 10).

    The drop of [`bic_change_point`] (same `tau`, same gain) is accepted iff formula 6 accepts it **and** its
    [`permutation_p_value`] is at most `alpha`. Under the null (a trajectory's scores are exchangeable: no order,
    let alone a drop) a drop is then accepted with probability at most `alpha`, whatever the number of segments or
    the distribution of the scores. With `n <= 3` segments no p-value reaches 0.05 (3! = 6 orders), so nothing is
    released there at the usual levels. A rejected drop keeps formula 6's gain in `bic_gain` (the test statistic).

    Args:
        scores: `[B, S]` segment scores; columns `>= num_segments[b]` are ignored.
        num_segments: `[B]` integer, each `<= S`.
        alpha: the false-release rate, in (0, 1).
        num_permutations, generator: of [`permutation_p_value`] (the same draws).

    Returns:
        [`ChangePoint`].
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    paper, p_value = _permutation_test(scores, num_segments, num_permutations, generator)
    return _calibrated(paper, num_segments, p_value, alpha)


def _calibrated(paper: ChangePoint, num_segments: Tensor, p_value: Tensor, alpha: float) -> ChangePoint:
    """`paper` accepted only where `p_value <= alpha` (the gain is kept: the test statistic)."""
    accepted = paper.accepted & (p_value.to(paper.accepted.device) <= alpha)
    n = num_segments.to(device=paper.release_segment.device, dtype=torch.long)
    return ChangePoint(torch.where(accepted, paper.release_segment, n), accepted, paper.bic_gain)


def _p_values_where_accepted(paper: ChangePoint, scores: Tensor, num_segments: Tensor, keys: Tensor) -> Tensor:
    """`_permutation_p_values` of the rows formula 6 accepts (only those are shuffled and tested); 1 elsewhere."""
    p_value = torch.ones(scores.shape[0], dtype=torch.float64, device=scores.device)
    rows = paper.accepted.nonzero().squeeze(1)
    if rows.numel():
        row_keys = keys if keys.shape[0] == 1 else keys[rows.to(keys.device)]
        p_value[rows] = _permutation_p_values(scores[rows], num_segments[rows], paper.bic_gain[rows], row_keys)
    return p_value


# ----------------------------------------------------------------------------------------------- formula 7


def mass_preserving_weights(keep: Tensor, loss_mask: Tensor) -> Tensor:
    """Keep the `keep` tokens of each trajectory and rescale them to the trajectory's full mass.

    `scale = sum_t loss_mask_t / max(sum_t loss_mask_t * keep_t, 1e-8)` and
    `w_t = loss_mask_t * keep_t * scale`, per row (the last dimension). Every supervision policy that
    drops tokens (release, fixed prefix, ...) uses this same rescale. Rows with an all-zero loss mask, or
    nothing kept, get zero weights (never NaN/inf).

    Args:
        keep: `[..., T]` bool/0-1 mask of the tokens to keep.
        loss_mask: `[..., T]` 0/1 (or non-negative float) completion mask.

    Returns:
        `[..., T]` weights in float32 (float64 for a float64 loss mask).
    """
    mask = loss_mask.to(_float_dtype(loss_mask))
    kept = mask * keep.to(mask.dtype)
    scale = mask.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(_MIN_KEPT_MASS)
    return kept * scale


def release_weights(segment_ids: Tensor, loss_mask: Tensor, change_point: ChangePoint) -> Tensor:
    """Release weights (formula 7): keep segments `0..release_segment-1`, drop the rest, preserve mass.

    `q_t = 1` iff `0 <= segment_ids_t < release_segment`, so tokens with segment id `-1` are never kept;
    then `w = loss_mask * q * sum(loss_mask) / max(sum(loss_mask * q), 1e-8)` per trajectory
    ([`mass_preserving_weights`]). When the release is not accepted every segmented token is kept and
    `w == loss_mask`.

    Args:
        segment_ids: `[B, T]` integer, as for [`segment_scores`].
        loss_mask: `[B, T]` completion mask.
        change_point: from [`bic_change_point`] (only `release_segment` is used).

    Returns:
        `[B, T]` float32 weights (float64 for a float64 loss mask).
    """
    release = change_point.release_segment.to(segment_ids.device)[:, None]
    keep = (segment_ids >= 0) & (segment_ids < release)
    return mass_preserving_weights(keep, loss_mask)


# ----------------------------------------------------------------------------------------------- formula 9


class OnlineRelease(NamedTuple):
    """Result of [`online_release`], one entry per trajectory."""

    stop_segment: Tensor
    """`[B]` long: complete segments when generation stopped (`num_segments` when it never stopped)."""
    release_segment: Tensor
    """`[B]` long: segments kept (`tau` of the stop; the offline change point when it never stopped)."""


def online_looks(min_segments: int, max_segments: int, alpha: float) -> list[int]:
    """The segment counts at which the calibrated online rule looks (formula 10): a geometric grid.

    The first look is the smallest `n >= min_segments` at which a perfectly separated drop can be significant at
    the first look's level: `C(n, n // 2) * look_alpha(alpha, 1) >= 1` (a permutation test on `n` scores cannot give
    a p-value below `1 / C(n, tau)`; for `alpha = 0.05` that is `n = 7`). Then `n_{j+1} = ceil(1.5 * n_j)`:
    7, 11, 17, 26, 39, ... up to `max_segments - 1`. A look at every segment would split `alpha` over many more
    tests for little gain in delay.
    """
    n = max(min_segments, 2)
    while math.comb(n, n // 2) * look_alpha(alpha, 1) < 1:
        n += 1
    looks = []
    while n < max_segments:
        looks.append(n)
        n = math.ceil(1.5 * n)
    return looks


def look_alpha(alpha: float, look: int) -> float:
    """The share of `alpha` spent at look `look` (1-based): `alpha * 6 / (pi^2 * look^2)`; they sum to `alpha`."""
    return alpha * 6.0 / (math.pi**2 * look**2)


def online_release(
    scores: Tensor,
    num_segments: Tensor,
    min_segments: int = 3,
    patience: int = 2,
    alpha: float | None = None,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    generator: torch.Generator | None = None,
) -> OnlineRelease:
    """The online release rule (formula 9) replayed on complete trajectories; calibrated with `alpha` (formula 10).

    While a trajectory is generated, each time its `n`-th segment is complete (segment `n` has started) the
    change point of formula 6 is run on its first `n` scores; generation stops at the first `n` with
    `n >= min_segments` whose change point is accepted at `tau` with `n - tau >= patience`. Here every
    `n` in `min_segments .. num_segments - 1` is tried at once: the first that qualifies gives
    `stop_segment = n` and `release_segment = tau`; a trajectory where none does was generated to its end
    and gets the offline rule, `stop_segment = num_segments` and `release_segment` of
    [`bic_change_point`] on all its scores. The generation loop of the trainer calls this same function on
    the scores it has so far, so a replay on recorded scores makes the same decisions.

    **Calibrated** (`alpha` set): every look is another chance of a false stop (formula 6 alone stops most
    trajectories of pure noise once it looks often enough), so the looks are few and the level is spent across them.
    The rule looks only at the `n` of [`online_looks`] (7, 11, 17, 26, ... for `alpha=0.05`); the `j`-th look is a
    permutation test ([`permutation_change_point`]) at level `alpha_j = alpha * 6 / (pi^2 j^2)` ([`look_alpha`]) with
    `max(num_permutations, ceil(4 / alpha_j))` shuffles, so that a small level can still be reached. The
    `alpha_j` sum to `alpha` however long the trajectory, so by the union bound a trajectory of exchangeable
    scores is ever stopped with probability at most `alpha`. Alpha spending rather than a permutation distribution
    of the running maximum: the future of a trajectory is unknown at a look, and the union bound needs no
    assumption on how the looks depend on one another. The shuffles of look `j` are drawn from a seed that
    depends only on the generator's first draw and on `j`, and are shared by all rows: the decision on a trajectory
    does not depend on which other trajectories are still running, so the generation loop (whose batch shrinks as
    rows stop) and a replay agree. A trajectory that is never stopped gets [`permutation_change_point`] on all its
    scores at level `alpha` (so its supervision is released with probability at most `2 alpha` in all).

    Every prefix of every row goes through one batched [`bic_change_point`] call (`O(S^2)` work per
    trajectory, no Python loop over trajectories; calibrated, one batched permutation test per look).

    Args:
        scores: `[B, S]` segment scores; columns `>= num_segments[b]` are ignored.
        num_segments: `[B]` integer, each `<= S`.
        min_segments: smallest number of complete segments a stop is decided on (`>= 1`).
        patience: complete segments that must follow the drop (`>= 1`).
        alpha: the stop rate on exchangeable scores, in (0, 1); `None` is formula 9 exactly.
        num_permutations: the least number of shuffles per test (calibrated only).
        generator: calibrated only: one integer is drawn from it, the seed of every look's shuffles (pass a
            generator in the same state to every call that should make the same decisions). Default: seed 0.

    Returns:
        [`OnlineRelease`].
    """
    if scores.ndim != 2 or num_segments.shape != scores.shape[:1]:
        raise ValueError(
            f"scores must be [B, S] and num_segments [B]; got {tuple(scores.shape)} and {tuple(num_segments.shape)}"
        )
    if min_segments < 1 or patience < 1:
        raise ValueError(f"min_segments and patience must be >= 1; got {min_segments} and {patience}")
    batch, max_segments = scores.shape
    n = num_segments.to(device=scores.device, dtype=torch.long)
    if alpha is not None:
        return _calibrated_online_release(scores, n, min_segments, patience, alpha, num_permutations, generator)
    offline = bic_change_point(scores, n).release_segment
    prefixes = torch.arange(min(min_segments, max_segments), max_segments, device=scores.device)  # candidate n
    if prefixes.numel() == 0:
        return OnlineRelease(n.clone(), offline)
    num_prefixes = prefixes.numel()
    rows = scores[:, None, :].expand(batch, num_prefixes, max_segments).reshape(-1, max_segments)
    tau = bic_change_point(rows, prefixes.repeat(batch)).release_segment.view(batch, num_prefixes)
    # an accepted change point has tau < n; a rejected one has tau == n and fails the patience test
    stops = (prefixes < n[:, None]) & (prefixes - tau >= patience)
    first = torch.where(stops, torch.arange(num_prefixes, device=scores.device), num_prefixes).amin(dim=1)
    stopped = first < num_prefixes
    first = first.clamp(max=num_prefixes - 1)[:, None]
    return OnlineRelease(
        stop_segment=torch.where(stopped, prefixes[first.squeeze(1)], n),
        release_segment=torch.where(stopped, tau.gather(1, first).squeeze(1), offline),
    )


def _calibrated_online_release(
    scores: Tensor,
    n: Tensor,
    min_segments: int,
    patience: int,
    alpha: float,
    num_permutations: int,
    generator: torch.Generator | None,
) -> OnlineRelease:
    """`online_release` with `alpha` (formula 10): the looks of `online_looks`, alpha spent by `look_alpha`."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    base = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
    offline = permutation_change_point(scores, n, alpha, num_permutations, generator).release_segment
    stop_segment, release_segment = n.clone(), offline
    pending = torch.ones_like(n, dtype=torch.bool)
    for look, prefix in enumerate(online_looks(min_segments, scores.shape[1], alpha), start=1):
        level = look_alpha(alpha, look)
        draws = max(num_permutations, math.ceil(4.0 / level))
        keys = torch.rand(1, draws, prefix, generator=torch.Generator().manual_seed(base * 1009 + look),
                          dtype=torch.float64)  # fmt: skip
        eligible = pending & (prefix < n)  # segment `prefix` has started: the first `prefix` are complete
        at = torch.full_like(n, prefix)
        paper = bic_change_point(scores[:, :prefix], at)
        p_value = _p_values_where_accepted(paper, scores[:, :prefix], at, keys)
        tau = _calibrated(paper, at, p_value, level).release_segment
        stop = eligible & (prefix - tau >= patience)
        stop_segment = torch.where(stop, at, stop_segment)
        release_segment = torch.where(stop, tau, release_segment)
        pending &= ~stop
    return OnlineRelease(stop_segment, release_segment)
