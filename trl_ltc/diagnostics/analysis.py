"""Aggregates of trajectory records: position curves, summaries, the null model of the change point, the replay
of the online release rule and `summary.md`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .records import DEFAULT_BINS


def _position_bins(length: int, bins: int) -> np.ndarray:
    """Bin index of each token by relative position `(i + 0.5) / length`."""
    return np.minimum(((np.arange(length) + 0.5) / length * bins).astype(np.int64), bins - 1)


def normalised_margins(margins: Sequence[float]) -> np.ndarray | None:
    """`M_t / mean(M)` of one trajectory, or `None` when it is empty or its mean margin is not positive."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0 or not np.isfinite(m).all() or m.mean() <= 0:
        return None
    return m / m.mean()


def margin_curve(token_margins: Sequence[Sequence[float]], bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Mean normalised margin per relative-position bin over trajectories (module docstring: definitions).

    Returns `{"position": bin centres, "mean": ..., "sem": standard error over trajectories, "count": trajectories
    with a token in the bin}`; bins without any trajectory are `nan`.
    """
    sums = np.zeros(bins)
    squares = np.zeros(bins)
    count = np.zeros(bins)
    for margins in token_margins:
        m = normalised_margins(margins)
        if m is None:
            continue
        where = _position_bins(m.size, bins)
        tokens = np.bincount(where, minlength=bins)
        means = np.bincount(where, weights=m, minlength=bins) / np.maximum(tokens, 1)
        present = tokens > 0
        sums[present] += means[present]
        squares[present] += means[present] ** 2
        count[present] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, sums / count, np.nan)
        var = np.where(count > 1, (squares - count * mean**2) / (count - 1), np.nan)
        sem = np.sqrt(np.maximum(var, 0.0) / count)
    return {"position": (np.arange(bins) + 0.5) / bins, "mean": mean, "sem": sem, "count": count}


def advantage_curve(token_advantages: Sequence[Sequence[float]], bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Mean, standard deviation and mean absolute value of `A_t` per relative-position bin, pooled over tokens."""
    sums, squares, absolute, count = (np.zeros(bins) for _ in range(4))
    for advantages in token_advantages:
        a = np.asarray(advantages, dtype=np.float64)
        if a.size == 0:
            continue
        where = _position_bins(a.size, bins)
        sums += np.bincount(where, weights=a, minlength=bins)
        squares += np.bincount(where, weights=a * a, minlength=bins)
        absolute += np.bincount(where, weights=np.abs(a), minlength=bins)
        count += np.bincount(where, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, sums / count, np.nan)
        std = np.sqrt(np.maximum(np.where(count > 0, squares / count, np.nan) - mean**2, 0.0))
        abs_mean = np.where(count > 0, absolute / count, np.nan)
    return {"position": (np.arange(bins) + 0.5) / bins, "mean": mean, "std": std, "abs_mean": abs_mean, "count": count}


def release_cut(record: dict) -> int:
    """Completion tokens before the record's change point (its whole length when not accepted)."""
    spans = record["segment_token_spans"]
    release = record["release_segment"]
    return spans[release][0] if release < len(spans) else record["completion_length"]


def _before_after(record: dict) -> tuple[list[float], list[float]]:
    """Token margins before and after the change point of an accepted record."""
    cut = release_cut(record)
    return record["token_margins"][:cut], record["token_margins"][cut:]


def release_fraction(record: dict) -> float:
    """The record's release fraction (module docstring): `release_cut / completion_length`, 1 when empty."""
    length = record["completion_length"]
    return release_cut(record) / length if length else 1.0


def teachability_positions(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Relative positions of all tokens and of TA-OPD's kept tokens, and whether each lies in the release prefix.

    Only records with `teachability_kept` count. Returns `position`, `kept` and `in_prefix`, one entry per
    token of those records.
    """
    position, kept, in_prefix = [], [], []
    for record in records:
        if "teachability_kept" not in record:
            continue
        length = record["completion_length"]
        index = np.arange(length)
        position.append((index + 0.5) / max(length, 1))
        kept.append(np.asarray(record["teachability_kept"], dtype=bool))
        in_prefix.append(index < release_cut(record))
    join = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return {"position": join(position, float), "kept": join(kept, bool), "in_prefix": join(in_prefix, bool)}


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """Key numbers of a set of records.

    `margin_before_change` / `margin_after_change` pool the tokens of accepted trajectories before / after their
    change point; `bic_gain_mean` averages over all trajectories (0 when not accepted), as the trainer's metric.
    When the records carry `accepted_null` (`null_acceptance`), `accepted_frac_null` is its mean over
    them: the accepted fraction of the shuffled null, to set against `accepted_fraction`; likewise
    `accepted_frac_calibrated` (`calibrated_acceptance`, formula 10) and the online replay's stop fractions,
    `online_stopped_frac` (the paper's rule) and `online_stopped_frac_calibrated`. When the records carry
    `teachability_kept`, the TA-OPD numbers are added: `teachability_kept_fraction` (kept tokens / tokens),
    `teachability_kept_position_mean` (mean relative position of the kept tokens), `teachability_in_release_prefix`
    (share of the kept tokens inside the release prefix) and `release_prefix_token_fraction` (share of all tokens
    inside it: what a selection blind to position would give).
    """
    n = len(records)
    accepted = [r for r in records if r["accepted"]]
    before = [m for r in accepted for m in _before_after(r)[0]]
    after = [m for r in accepted for m in _before_after(r)[1]]

    def mean(values) -> float:
        return float(np.mean(values)) if len(values) else math.nan

    return {
        "trajectories": n,
        "accepted": len(accepted),
        "accepted_fraction": len(accepted) / n if n else math.nan,
        "kept_fraction_mean": mean([r["kept_fraction"] for r in records]),
        "kept_fraction_mean_accepted": mean([r["kept_fraction"] for r in accepted]),
        "margin_before_change": mean(before),
        "margin_after_change": mean(after),
        "bic_gain_mean": mean([r["bic_gain"] for r in records]),
        "bic_gain_mean_accepted": mean([r["bic_gain"] for r in accepted]),
        "num_segments_mean": mean([r["num_segments"] for r in records]),
        "completion_length_mean": mean([r["completion_length"] for r in records]),
    } | _null_summary(records) | _teachability_summary(records)


def _null_summary(records: Sequence[dict]) -> dict[str, float]:
    out = {}
    for field, name in (
        ("accepted_null", "accepted_frac_null"),
        ("accepted_calibrated", "accepted_frac_calibrated"),
        ("online_stopped", "online_stopped_frac"),
        ("online_stopped_calibrated", "online_stopped_frac_calibrated"),
    ):
        values = [r[field] for r in records if field in r]
        if values:
            out[name] = float(np.mean(values))
    return out


def segment_score_batch(records: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The records' segment scores as the batch `bic_change_point` takes: `[N, S_max]` float64 scores, zero-padded,
    and `[N]` segment counts."""
    width = max(r["num_segments"] for r in records)
    scores = torch.zeros(len(records), width, dtype=torch.float64)
    for row, record in enumerate(records):
        scores[row, : record["num_segments"]] = torch.tensor(record["segment_scores"], dtype=torch.float64)
    return scores, torch.tensor([r["num_segments"] for r in records], dtype=torch.long)


def null_acceptance(records: Sequence[dict], seed: int = 0) -> list[bool]:
    """`accepted_null` of each record: the change point of formula 6 on its segment scores in a random order.

    All records go through one `trl_ltc.release.null_change_point` call (each row's scores shuffled among
    themselves, then `bic_change_point`) with a generator seeded with `seed + NULL_SEED_OFFSET`, so the same
    records and seed always give the same answers. Records without two segments are never accepted.
    """
    from ..release import NULL_SEED_OFFSET, null_change_point

    if not records:
        return []
    scores, num_segments = segment_score_batch(records)
    generator = torch.Generator().manual_seed(seed + NULL_SEED_OFFSET)
    return null_change_point(scores, num_segments, generator).accepted.tolist()


def calibrated_acceptance(
    records: Sequence[dict], alpha: float = 0.05, num_permutations: int | None = None, seed: int = 0
) -> list[bool]:
    """`accepted_calibrated` of each record: formula 10, the paper's drop accepted only where its permutation p-value
    is at most `alpha` (`trl_ltc.release.permutation_change_point`, one batched call, generator seeded with `seed`)."""
    from ..release import DEFAULT_PERMUTATIONS, permutation_change_point

    if not records:
        return []
    scores, num_segments = segment_score_batch(records)
    generator = torch.Generator().manual_seed(seed)
    permutations = num_permutations or DEFAULT_PERMUTATIONS
    return permutation_change_point(scores, num_segments, alpha, permutations, generator).accepted.tolist()


def _teachability_summary(records: Sequence[dict]) -> dict[str, float]:
    if not any("teachability_kept" in r for r in records):
        return {}
    tokens = teachability_positions(records)
    kept = tokens["kept"]

    def share(values) -> float:
        return float(np.mean(values)) if len(values) else math.nan

    return {
        "teachability_kept_fraction": share(kept),
        "teachability_kept_position_mean": share(tokens["position"][kept]),
        "teachability_in_release_prefix": share(tokens["in_prefix"][kept]),
        "release_prefix_token_fraction": share(tokens["in_prefix"]),
    }


def online_replay(
    records: Sequence[dict],
    min_segments: int = 3,
    patience: int = 2,
    check_tokens: int = 1,
    alpha: float | None = None,
    num_permutations: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """The online release rule replayed on each record's segment scores (module docstring: fields).

    Args:
        records: trajectory records (`segment_scores`, `segment_token_spans`, `release_segment`,
            `completion_length`).
        min_segments, patience: of `online_release`.
        check_tokens: tokens per generation block (1: the stop happens right after the first token of the
            segment that completes the decision).
        alpha, num_permutations, seed: the calibrated online rule (formula 10), its shuffles seeded with `seed`.

    Returns:
        One dict of `online_*` fields per record, in order.
    """
    from ..release import online_release

    if check_tokens < 1:
        raise ValueError(f"check_tokens must be >= 1; got {check_tokens}")
    if not records:
        return []
    scores, num_segments = segment_score_batch(records)
    calibration = {} if alpha is None else {"alpha": alpha, "generator": torch.Generator().manual_seed(seed)}
    if num_permutations is not None:
        calibration["num_permutations"] = num_permutations
    decision = online_release(scores, num_segments, min_segments, patience, **calibration)
    replayed = []
    for record, stop, release in zip(records, decision.stop_segment.tolist(), decision.release_segment.tolist()):
        length, stopped = record["completion_length"], stop < record["num_segments"]
        generated = length
        if stopped:  # the stop is decided in the block holding the first token of segment `stop`
            first = record["segment_token_spans"][stop][0]
            generated = min(length, -(-(first + 1) // check_tokens) * check_tokens)
        replayed.append(
            {
                "online_stop_segment": stop,
                "online_release_segment": release,
                "online_stopped": stopped,
                "online_agrees": release == record["release_segment"],
                "online_generated_tokens": generated,
                "online_saved_tokens": length - generated,
            }
        )
    return replayed


def summarize_online(records: Sequence[dict], replayed: Sequence[dict]) -> dict[str, float]:
    """Overall numbers of an `online_replay`: stops, agreement with the offline release, tokens saved."""
    n = len(replayed)
    stopped = [(r, o) for r, o in zip(records, replayed) if o["online_stopped"]]
    length = sum(r["completion_length"] for r in records)
    return {
        "trajectories": n,
        "stopped_fraction": len(stopped) / n if n else math.nan,
        "agreement": sum(o["online_agrees"] for o in replayed) / n if n else math.nan,
        "agreement_stopped": sum(o["online_agrees"] for _, o in stopped) / len(stopped) if stopped else math.nan,
        "accepted_agreement_stopped": (
            sum(r["accepted"] for r, _ in stopped) / len(stopped) if stopped else math.nan
        ),
        "generated_tokens": sum(o["online_generated_tokens"] for o in replayed),
        "completion_tokens": length,
        "saved_tokens_fraction": sum(o["online_saved_tokens"] for o in replayed) / length if length else math.nan,
    }


_ONLINE_ROWS = (
    ("stopped_fraction", "Stopped early (fraction of trajectories)", "{:.3f}"),
    ("agreement", "Online release point = offline release point (all trajectories)", "{:.3f}"),
    ("agreement_stopped", "Online release point = offline release point (stopped trajectories)", "{:.3f}"),
    ("accepted_agreement_stopped", "Offline rule also accepts a drop (stopped trajectories)", "{:.3f}"),
    ("generated_tokens", "Completion tokens generated with online stopping", "{:d}"),
    ("completion_tokens", "Completion tokens generated without it", "{:d}"),
    ("saved_tokens_fraction", "Tokens saved (fraction of the completion tokens)", "{:.3f}"),
)


def online_summary_lines(numbers: dict, settings: str = "") -> list[str]:
    """Markdown lines of `summarize_online`'s numbers."""
    lines = ["## Online release replay (formula 9)", "", settings, "", "| quantity | value |", "|---|---|"]
    for key, label, fmt in _ONLINE_ROWS:
        value = numbers[key]
        text = "n/a" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
        lines.append(f"| {label} | {text} |")
    return lines


_SUMMARY_ROWS = (
    ("trajectories", "Trajectories", "{:d}"),
    ("accepted_fraction", "Accepted fraction (one-drop summary preferred by BIC)", "{:.3f}"),
    ("accepted_frac_null", "Accepted fraction under the null (segment scores shuffled per trajectory)", "{:.3f}"),
    ("accepted_frac_calibrated", "Accepted fraction, calibrated (permutation p-value <= release_alpha)", "{:.3f}"),
    ("online_stopped_frac", "Online rule replayed: stopped fraction (paper's rule at every segment)", "{:.3f}"),
    ("online_stopped_frac_calibrated", "Online rule replayed: stopped fraction, calibrated", "{:.3f}"),
    ("kept_fraction_mean", "Mean kept fraction of the completion (all trajectories)", "{:.3f}"),
    ("kept_fraction_mean_accepted", "Mean kept fraction (accepted trajectories)", "{:.3f}"),
    ("margin_before_change", "Mean teacher margin before the change (accepted, per token)", "{:.4f}"),
    ("margin_after_change", "Mean teacher margin after the change (accepted, per token)", "{:.4f}"),
    ("bic_gain_mean", "Mean BIC gain (all trajectories; 0 when not accepted)", "{:.3f}"),
    ("bic_gain_mean_accepted", "Mean BIC gain (accepted trajectories)", "{:.3f}"),
    ("num_segments_mean", "Mean segments per completion", "{:.2f}"),
    ("completion_length_mean", "Mean completion length (tokens)", "{:.1f}"),
    ("teachability_kept_fraction", "TA-OPD: kept fraction of the tokens", "{:.3f}"),
    ("teachability_kept_position_mean", "TA-OPD: mean relative position of the kept tokens", "{:.3f}"),
    ("teachability_in_release_prefix", "TA-OPD: share of the kept tokens inside the release prefix", "{:.3f}"),
    ("release_prefix_token_fraction", "Share of all tokens inside the release prefix", "{:.3f}"),
)


def null_summary_line(accepted: float, accepted_null: float) -> str:
    """The sentence of `summary.md` that sets the accepted fraction against its shuffled null."""
    return (
        f"Accepted fraction {accepted:.3f} vs {accepted_null:.3f} under the null (the same BIC rule on each "
        "trajectory's segment scores in a random order). A local teachability collapse is only shown where the first "
        "clearly exceeds the second and the margin curve falls."
    )


def write_summary(
    records: Sequence[dict], path, settings: dict | None = None, online: list[str] | None = None
) -> Path:
    """Write `summary.md`: the numbers of `summarize` in a table, the `online` replay lines, the
    run's `settings`."""
    numbers = summarize(records)
    lines = ["# Release diagnostics", "", "| quantity | value |", "|---|---|"]
    for key, label, fmt in _SUMMARY_ROWS:
        if key not in numbers:
            continue
        value = numbers[key]
        text = "n/a" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
        lines.append(f"| {label} | {text} |")
    if "accepted_frac_null" in numbers:
        lines += ["", null_summary_line(numbers["accepted_fraction"], numbers["accepted_frac_null"])]
    if online:
        lines += ["", *online]
    if settings:
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in settings.items()]
    lines += [
        "",
        "Normalised margin (plots): each token's teacher margin divided by its trajectory's mean margin.",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
