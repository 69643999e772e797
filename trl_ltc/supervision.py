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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .release import (
    ChangePoint,
    bic_change_point,
    mass_preserving_weights,
    null_change_point,
    release_weights,
    segment_scores,
)
from .teachability import TeachabilityFeatures, score_tokens, token_budget_weights


class Supervision(NamedTuple):
    """The weights of a policy and what it decided on the way (for metrics and diagnostics)."""

    weights: torch.Tensor  # [B, T] float, 0 outside the loss mask
    change_point: ChangePoint | None = None  # the change point the policy found (release-type policies)
    num_segments: torch.Tensor | None = None  # [B] long
    segment_scores: torch.Tensor | None = None  # [B, S] float


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
    """
    loss_mask = loss_mask.float()
    change_point = num_segments = scores = None
    if policy == "adv_std_release":
        num_segments = segment_ids.amax(-1).clamp(min=-1) + 1
        scores = segment_std(advantages, segment_ids, num_segments)
    elif segment_ids is not None and margins is not None:
        scores, num_segments = segment_scores(margins, segment_ids)
    if scores is not None:
        change_point = bic_change_point(scores, num_segments)
    if online_stopped is not None and change_point is not None:
        stopped = online_stopped.to(change_point.accepted.device).bool()
        gain = change_point.bic_gain if online_bic_gain is None else online_bic_gain.to(change_point.bic_gain)
        change_point = ChangePoint(
            release_segment=torch.where(stopped, num_segments, change_point.release_segment),
            accepted=change_point.accepted | stopped,
            bic_gain=torch.where(stopped, gain, change_point.bic_gain),
        )

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
    else:
        raise ValueError(f"Unknown supervision policy {policy!r}.")
    return Supervision(weights, change_point, num_segments, scores)


def supervision_stats(
    supervision: Supervision,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    margins: torch.Tensor | None = None,
    features: TeachabilityFeatures | None = None,
    null_generator: torch.Generator | None = None,
    inexact_margins: torch.Tensor | None = None,
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
        if null_generator is not None and supervision.segment_scores is not None:
            null = null_change_point(supervision.segment_scores, supervision.num_segments, null_generator)
            stats["release/accepted_frac_null"] = (one(null.accepted), n_traj)
        stats["release/bic_gain"] = (one(cp.bic_gain), n_traj)
        stats["release/num_segments"] = (one(supervision.num_segments), n_traj)
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


def reduce_stats(totals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Turn summed `(sum, count)` pairs into metric values (`nan` where nothing was counted)."""
    out = {name: s / c if c > 0 else math.nan for name, (s, c) in totals.items() if name != "advantage/sq_mean"}
    if "advantage/sq_mean" in totals:
        s, c = totals["advantage/sq_mean"]
        mean = out["advantage/mean"]
        out["advantage/std"] = math.sqrt(max(s / c - mean * mean, 0.0)) if c > 0 else math.nan
    return out


def gather_stats(stats: dict[str, tuple[torch.Tensor, torch.Tensor]], gather) -> dict[str, float]:
    """`reduce_stats` of `supervision_stats` summed over processes: `gather` is `accelerator.gather` (one call)."""
    names = sorted(stats)
    local = torch.stack([torch.stack([s.float(), c.float()]) for s, c in (stats[n] for n in names)])
    total = gather(local[None]).sum(0).tolist()
    return reduce_stats(dict(zip(names, map(tuple, total))))
