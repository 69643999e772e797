"""Supervision policies: per-token signals and segments -> per-token loss weights `[B, T]`.

Every policy feeds the same OPD loss (formula 2); only the weights differ (see the table in the design):

| policy | weights |
|---|---|
| `full` | the loss mask |
| `fixed_prefix` | the first L completion tokens, mass-preserving rescale |
| `release` | the prefix before the downward change point of the segment margins (formulas 4-7) |
| `random_release` | the release fractions permuted across the batch (in training: an optimizer step's, all ranks) |
| `adv_std_release` | the same change point on the per-segment std of the advantage |
| `token_teachability` | TA-OPD: the top `keep_ratio` positions of the batch by token score |
| `iw_opd` | IW-OPD: `1 + gamma * (1 - S_<t / S)`, `S_<t / S` the share of `|A|` before `t` (not mass-preserving) |

Release-type policies take `release_alpha` (formula 10: the change point calibrated by a permutation test) and
`keep_advantage_below` (tokens of the released suffix whose advantage is below it stay supervised).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .release import (
    DEFAULT_PERMUTATIONS,
    ChangePoint,
    bic_change_point,
    mass_preserving_weights,
    null_change_point,
    permutation_change_point,
    release_weights,
    segment_scores,
)
from .spec import RELEASE_POLICIES
from .teachability import TeachabilityFeatures, score_tokens, token_budget_weights


class Supervision(NamedTuple):
    """The weights of a policy and what it decided on the way (for metrics and diagnostics)."""

    weights: torch.Tensor  # [B, T] float, 0 outside the loss mask
    change_point: ChangePoint | None = None  # the change point the policy found (release-type policies)
    num_segments: torch.Tensor | None = None  # [B] long
    segment_scores: torch.Tensor | None = None  # [B, S] float
    paper_change_point: ChangePoint | None = None  # formula 6's, when `change_point` is calibrated (formula 10)
    corrections: torch.Tensor | None = None  # [B, T] bool: released tokens kept by `keep_advantage_below`


def fixed_mass_preserving_weights(loss_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` completion tokens of each trajectory, mass-preserving rescale (formula 7's `scale`)."""
    keep = (loss_mask > 0) & (loss_mask.gt(0).cumsum(-1) <= length)
    return mass_preserving_weights(keep, loss_mask)


def segment_std(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of `values` `[B, T]` over the tokens of each segment -> `[B, S]`."""
    width = max(int(num_segments.max()) if num_segments.numel() else 0, 1)
    valid = segment_ids >= 0
    index = segment_ids.clamp(min=0)
    x = torch.where(valid, values.double(), 0.0)
    sums = x.new_zeros(values.shape[0], width)
    count = sums.scatter_add(1, index, valid.double())
    mean = sums.scatter_add(1, index, x) / count.clamp(min=1)
    dev = torch.where(valid, x - mean.gather(1, index), 0.0)
    var = sums.scatter_add(1, index, dev * dev) / count.clamp(min=1)
    return var.sqrt().float()


def kept_fractions(
    weights: torch.Tensor, loss_mask: torch.Tensor, segment_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trajectory's kept fraction under `weights` and whether `random_release` may move it.

    Returns `fractions` `[B]` float64 (kept completion tokens / completion tokens) and `eligible` `[B]` bool: the
    trajectory has supervised tokens and at least one segment. Float64, so that `ceil(fraction * length)` gives the
    kept count back exactly.
    """
    mask = loss_mask > 0
    fractions = ((weights > 0) & mask).sum(-1).double() / mask.sum(-1).clamp(min=1).double()
    return fractions, (mask & (segment_ids >= 0)).any(-1)


def permute_release_fractions(
    fractions: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The fractions of the eligible trajectories shuffled among themselves; 0 for the others.

    The eligible rows, in order, receive `fractions[rows[torch.randperm(len(rows), generator=generator)]]`: the draw
    depends only on the number of eligible rows and the generator's state.
    """
    rows = eligible.nonzero().squeeze(-1)
    order = torch.randperm(rows.numel(), generator=generator, device=generator.device).to(rows.device)
    permuted = torch.zeros_like(fractions)
    permuted[rows] = fractions[rows[order]]
    return permuted


def fraction_prefix_weights(loss_mask: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Keep the first `ceil(fraction * length)` completion tokens of each trajectory, mass-preserving rescale.

    `fractions` `[B]`; `length` is the trajectory's own number of supervised tokens (formula 7's `scale`).
    """
    mask = loss_mask > 0
    keep_len = torch.ceil(fractions.double().to(mask.device) * mask.sum(-1) - 1e-6)
    keep = mask & (mask.cumsum(-1) <= keep_len[:, None])
    return mass_preserving_weights(keep, loss_mask)


def random_release_weights(
    segment_ids: torch.Tensor, loss_mask: torch.Tensor, change_point: ChangePoint, generator: torch.Generator
) -> torch.Tensor:
    """The release fractions of `change_point` permuted across this batch's segmented trajectories.

    Each trajectory's kept fraction is computed by the release rule (`kept_fractions`), the fractions are shuffled
    across the trajectories that have supervised tokens and at least one segment (`permute_release_fractions`), and
    each of them keeps the first `ceil(fraction * its own length)` completion tokens (`fraction_prefix_weights`).
    Trajectories without a segment (empty completions) keep nothing, as under `release`. The trainer permutes across
    the whole generation batch of an optimizer step instead and passes the result as `release_fractions`.
    """
    fractions, eligible = kept_fractions(release_weights(segment_ids, loss_mask, change_point), loss_mask, segment_ids)
    return fraction_prefix_weights(loss_mask, permute_release_fractions(fractions, eligible, generator))


def iw_opd_weights(loss_mask: torch.Tensor, advantages: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """IW-OPD weights (arXiv 2606.22600; DESIGN.md formula 11): `w_t = mask_t * (1 + gamma * (1 - S_<t / S))`.

    `S_<t` is the sum of `|A_s|` over the completion tokens before `t` and `S` over the whole completion (advantages
    detached; `S` floored at 1e-8, so a row of zero advantages weighs every token `1 + gamma`). Early tokens, with
    most of the trajectory's disagreement still ahead, weigh up to `1 + gamma`; not mass-preserving, as published.
    Rows without completion tokens get zeros.
    """
    mask = loss_mask.float()
    magnitude = (advantages.detach().float().abs() * (mask > 0)).double()
    before = magnitude.cumsum(-1) - magnitude  # S_<t: the tokens strictly before t
    total = magnitude.sum(-1, keepdim=True).clamp_min(1e-8)
    return (mask * (1.0 + gamma * (1.0 - before / total))).float()


def keep_corrections(
    weights: torch.Tensor, loss_mask: torch.Tensor, advantages: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release weights with the released tokens whose advantage is below `threshold` supervised again.

    Where `A_t = log pT(y_t) - log pS(y_t) < threshold` the teacher clearly rejects the sampled token: discriminative
    feedback whatever the margin among the student's candidates. Kept = the policy's kept tokens plus those
    corrections, then the mass-preserving rescale of formula 7. Returns `(weights, corrections)`, the latter the
    `[B, T]` bool mask of the released tokens kept this way.
    """
    mask = loss_mask > 0
    kept = (weights > 0) & mask
    corrections = mask & ~kept & (advantages.detach() < threshold)
    return mass_preserving_weights(kept | corrections, loss_mask), corrections


def supervision_weights(
    policy: str,
    loss_mask: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    features: TeachabilityFeatures | None = None,
    fixed_prefix_length: int | None = None,
    generator: torch.Generator | None = None,
    token_score: str = "teachability",
    token_keep_ratio: float = 0.05,
    token_min_keep: int = 1,
    online_stopped: torch.Tensor | None = None,
    online_bic_gain: torch.Tensor | None = None,
    release_fractions: torch.Tensor | None = None,
    release_alpha: float | None = None,
    release_permutations: int = DEFAULT_PERMUTATIONS,
    keep_advantage_below: float | None = None,
    iw_opd_gamma: float = 0.5,
) -> Supervision:
    """Weights `[B, T]` of `policy` for one batch of trajectories.

    Args:
        policy: one of `trl_ltc.config.SUPERVISIONS`.
        loss_mask: `[B, T]`, 1 on supervised completion tokens.
        segment_ids: `[B, T]` long segment ids (`trl_ltc.segmentation`), for the release-type policies.
        margins: `[B, T]` teacher margins (formula 4): `release` and `random_release` use them; with the other
            policies they still give the change point reported in the metrics.
        advantages: `[B, T]` `log pT(y) - log pS(y)`, for `adv_std_release`.
        features: TA-OPD features `[B, T]`, for `token_teachability`.
        fixed_prefix_length: L of `fixed_prefix`.
        generator: random source of `random_release` and `token_score="random"`.
        token_score, token_keep_ratio, token_min_keep: TA-OPD selection (`trl_ltc.teachability`).
        online_stopped: `[B]` bool, trajectories whose generation the online release rule stopped (formula 9).
            Their completion is already the kept prefix: the change point reports them as accepted with every
            segment kept (bic gain `online_bic_gain`), so `release` weighs their tokens 1.
        online_bic_gain: `[B]` float, the BIC gain of the change point that stopped each trajectory.
        release_fractions: `[B]` float, the already permuted fractions `random_release` applies (the trainer draws
            them across the generation batch of an optimizer step); without them it permutes within this batch.
        release_alpha: calibrate the change point (formula 10, `permutation_change_point` with
            `release_permutations` shuffles drawn from `generator`); `None` is formula 6 exactly.
        keep_advantage_below: release-type policies keep the released tokens whose advantage is below this (nats).
        iw_opd_gamma: `gamma` of `iw_opd` (formula 11; needs `advantages`).
    """
    loss_mask = loss_mask.float()
    change_point = num_segments = scores = None
    if policy == "adv_std_release":
        num_segments = segment_ids.amax(-1).clamp(min=-1) + 1
        scores = segment_std(advantages, segment_ids, num_segments)
    elif segment_ids is not None and margins is not None:
        scores, num_segments = segment_scores(margins, segment_ids)
    paper = None
    if scores is not None:
        change_point = bic_change_point(scores, num_segments)
        if release_alpha is not None:
            paper = change_point
            calibrated = release_alpha, release_permutations, generator
            change_point = permutation_change_point(scores, num_segments, *calibrated)
    if online_stopped is not None and change_point is not None:
        stopped = online_stopped.to(change_point.accepted.device).bool()
        gain = change_point.bic_gain if online_bic_gain is None else online_bic_gain.to(change_point.bic_gain)
        change_point, paper = (
            None if cp is None else ChangePoint(
                release_segment=torch.where(stopped, num_segments, cp.release_segment),
                accepted=cp.accepted | stopped,
                bic_gain=torch.where(stopped, gain, cp.bic_gain),
            )
            for cp in (change_point, paper)
        )  # fmt: skip

    if policy == "full":
        weights = loss_mask
    elif policy == "fixed_prefix":
        weights = fixed_mass_preserving_weights(loss_mask, fixed_prefix_length)
    elif policy in ("release", "adv_std_release"):
        weights = release_weights(segment_ids, loss_mask, change_point)
    elif policy == "random_release" and release_fractions is not None:
        weights = fraction_prefix_weights(loss_mask, release_fractions)
    elif policy == "random_release":
        weights = random_release_weights(segment_ids, loss_mask, change_point, generator)
    elif policy == "token_teachability":
        token_scores = score_tokens(features, loss_mask, token_score, generator=generator)
        weights = token_budget_weights(token_scores, loss_mask, token_keep_ratio, token_min_keep)
    elif policy == "iw_opd":
        weights = iw_opd_weights(loss_mask, advantages, iw_opd_gamma)
    else:
        raise ValueError(f"Unknown supervision policy {policy!r}.")
    corrections = None
    if keep_advantage_below is not None and policy in RELEASE_POLICIES:
        weights, corrections = keep_corrections(weights, loss_mask, advantages, keep_advantage_below)
    return Supervision(weights, change_point, num_segments, scores, paper, corrections)


def supervision_stats(
    supervision: Supervision,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    margins: torch.Tensor | None = None,
    features: TeachabilityFeatures | None = None,
    null_generator: torch.Generator | None = None,
    inexact_margins: torch.Tensor | None = None,
    iw_opd: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Metric name -> (sum, count) over this batch, so that processes can be summed before dividing.

    `release/*` describe the change point of the batch (`accepted_frac`, `bic_gain`, `num_segments` and
    `release_position`, the kept fraction of the completion length, are means over trajectories) and the kept tokens of
    the active policy (`kept_token_frac`). With `null_generator`, `release/accepted_frac_null` is the acceptance rate
    of the same change point on each trajectory's segment scores shuffled with that generator (`null_change_point`, the
    only draw from it): what the rule accepts on these scores without their order. `margin/prefix_mean` and
    `margin/suffix_mean` are the mean margins on kept and released tokens; `advantage/mean` and `advantage/std` are
    over supervised tokens (the std is rebuilt from the sums of `A` and `A^2`). With a served teacher's
    `inexact_margins` (`[B, T]` bool), `teacher_server/inexact_margin_frac` is their share of the completion tokens.
    With a calibrated change point (formula 10) `release/accepted_frac` is its acceptance and
    `release/accepted_frac_bic` formula 6's on the same scores; `release/corrections_kept_frac` is the share of the
    released tokens kept by `keep_advantage_below`. With `iw_opd`, `iw_opd/weight_{mean,min,max}` over completion
    tokens (the min and max are reduced across processes by `gather_stats` as extremes, not sums).
    """
    mask = loss_mask > 0
    kept = (supervision.weights > 0) & mask
    length = mask.sum(-1).float()
    one = lambda x: x.float().sum()  # noqa: E731
    n_traj = torch.tensor(float(mask.shape[0]), device=mask.device)
    n_tok = one(mask)
    adv = torch.where(mask, advantages.float(), 0.0)
    stats = {
        "release/kept_token_frac": (one(kept), n_tok),
        "release/release_position": (one(kept.sum(-1) / length.clamp(min=1)), n_traj),
        "advantage/mean": (adv.sum(), n_tok),
        "advantage/sq_mean": ((adv * adv).sum(), n_tok),
    }
    if inexact_margins is not None:
        stats["teacher_server/inexact_margin_frac"] = (one(inexact_margins & mask), n_tok)
    cp = supervision.change_point
    if cp is not None:
        stats["release/accepted_frac"] = (one(cp.accepted), n_traj)
        if supervision.paper_change_point is not None:  # calibrated: formula 6's acceptance on the same scores
            stats["release/accepted_frac_bic"] = (one(supervision.paper_change_point.accepted), n_traj)
        if null_generator is not None and supervision.segment_scores is not None:
            null = null_change_point(supervision.segment_scores, supervision.num_segments, null_generator)
            stats["release/accepted_frac_null"] = (one(null.accepted), n_traj)
        stats["release/bic_gain"] = (one(cp.bic_gain), n_traj)
        stats["release/num_segments"] = (one(supervision.num_segments), n_traj)
    if supervision.corrections is not None:  # released tokens kept by `keep_advantage_below`
        corrections = supervision.corrections & mask
        stats["release/corrections_kept_frac"] = (one(corrections), one(corrections) + one(mask & ~kept))
    if iw_opd:
        weights = supervision.weights.float()
        stats["iw_opd/weight_mean"] = (one(torch.where(mask, weights, 0.0)), n_tok)
        if bool(mask.any()):
            stats["iw_opd/weight_min"] = (weights[mask].min(), torch.ones((), device=mask.device))
            stats["iw_opd/weight_max"] = (weights[mask].max(), torch.ones((), device=mask.device))
    if margins is not None:
        m = margins.float()
        released = mask & ~kept
        stats["margin/prefix_mean"] = (one(torch.where(kept, m, 0.0)), one(kept))
        stats["margin/suffix_mean"] = (one(torch.where(released, m, 0.0)), one(released))
    if features is not None:
        position = (mask.cumsum(-1) - 1).float() / (length[:, None] - 1).clamp(min=1)
        for name, values, where in (
            ("teachability/kept_token_frac", kept, mask),
            ("teachability/compatibility_mean", features.compatibility, mask),
            ("teachability/disagreement_mean", features.disagreement, mask),
            ("teachability/kept_compatibility_mean", features.compatibility, kept),
            ("teachability/kept_position", position, kept),
        ):
            stats[name] = (one(torch.where(where, values.float(), 0.0)), one(where))
    return stats


_EXTREMES = {"_min": min, "_max": max}  # metrics whose `(value, 1)` pairs reduce to an extreme, not a mean


def _extreme(name: str):
    return _EXTREMES.get(name[-4:])


def reduce_stats(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Turn summed `(sum, count)` pairs into metric values (`nan` where nothing was counted).

    Names ending in `_min` / `_max` hold `(extreme, number of processes that had one)`, already reduced."""
    out = {
        name: (s if _extreme(name) else s / c) if c > 0 else math.nan
        for name, (s, c) in totals.items()
        if name != "advantage/sq_mean"
    }
    if "advantage/sq_mean" in totals:
        s, c = totals["advantage/sq_mean"]
        mean = out["advantage/mean"]
        out["advantage/std"] = math.sqrt(max(s / c - mean * mean, 0.0)) if c > 0 else math.nan
    return out


def gather_stats(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], gather) -> dict[str, float]:
    """`reduce_stats` of `supervision_stats` summed over processes: `gather` is `accelerator.gather` (one call)."""
    names = sorted(stats)
    local = torch.stack([torch.stack([s.float(), c.float()]) for s, c in (stats[n] for n in names)])
    gathered = gather(local[None])  # [processes, names, 2]
    total = gathered.sum(0).tolist()
    for i, name in enumerate(names):
        if reduce := _extreme(name):  # the extreme over the processes that had tokens
            values = [v for v, c in gathered[:, i].tolist() if c > 0]
            total[i] = [reduce(values) if values else 0.0, float(len(values))]
    return reduce_stats(dict(zip(names, map(tuple, total))))
