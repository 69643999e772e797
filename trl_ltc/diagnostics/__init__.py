"""Diagnostics of local teachability collapse: per-trajectory records, the paper's plots and a case-study page.

"Prefix Teach, Suffix Fade" (arXiv 2605.13643) argues from pictures; this module draws them for any
teacher/student pair, from the same functions the trainer uses (``token_signals``, ``segment_completions``,
``supervision_weights("release", ...)``), so what is plotted is what training would do.

``trl-ltc diagnose`` (:func:`main`) samples student completions, scores them and writes into ``--output_dir``:

``records.jsonl``
    One line per trajectory (:func:`trajectory_records`, schema below).
``margin_curve.png``
    Mean *normalised* teacher margin against the relative position in the completion, above the mean advantage
    ``A_t`` with its dispersion on the same axis (paper Figures 1-2).
``release.png``
    BIC gain histogram; pre- vs post-change mean segment score of accepted trajectories (under the diagonal =
    downward); release positions as a fraction of the completion length (paper Figure 3).
``support_sweep.png``
    Normalised margin curves for each K of ``--top_k_sweep`` (paper Figure 5).
``teachability.png``
    The two papers' views of the same rollouts: density of the tokens TA-OPD keeps (``token_teachability``,
    arXiv 2605.26844) against the relative position, overlaid with the density of the release positions of accepted
    trajectories; and the share of TA-OPD's tokens that fall in the release rule's kept prefix, against the share of
    all tokens that do (what an unrelated selection would give).
``cases.html``
    A self-contained page with a few trajectories: kept prefix and released suffix, segment boundaries and scores,
    and an inline SVG chart of the segment scores with the change point (paper Figure 6).
``summary.md``
    Key numbers in a small table, the accepted fraction against its null (below), and the replay of the online
    release rule (below).

Null model of the change point
------------------------------
With a few segments the BIC rule prefers a downward drop often even on scores that have none (on iid scores about
half of the 2-segment and a sixth of the 10-segment trajectories). :func:`null_acceptance` runs the same rule on each
record's segment scores shuffled within the trajectory (``trl_ltc.release.null_change_point``, seeded with the run's
``seed`` plus ``trl_ltc.release.NULL_SEED_OFFSET``): every record of ``trl-ltc diagnose`` gets ``accepted_null``, and
``summary.md`` sets the accepted fraction against the null's. A local teachability collapse is only shown where the
first clearly exceeds the second and the margin curve falls.

Online release replay
---------------------
:func:`online_replay` replays ``trl_ltc.release.online_release`` (formula 9 of the design) on the records' segment
scores: what ``rollout_truncation="online"`` would have decided while generating these completions. Every record
gets ``online_stop_segment``, ``online_release_segment``, ``online_stopped`` (stopped before its last segment),
``online_agrees`` (online and offline release points equal), ``online_generated_tokens`` (tokens generated when it
stopped: the block of ``check_tokens`` tokens in which segment ``online_stop_segment`` started ends, capped at the
completion length; the whole completion when not stopped) and ``online_saved_tokens`` (the rest of the completion).
``trl-ltc diagnose --replay records.jsonl`` replays recorded rollouts (``records.jsonl``, or the trainer's
``release_records.jsonl`` of an offline ``release`` run) without loading any model.

During training, :class:`ReleaseDiagnosticsCallback` keeps the records of the last steps and writes
``release.png`` and ``margin_curve.png`` (and the records, ``release_records.jsonl``) into the trainer's output
directory at each save and at the end.

Definitions
-----------
*Relative position* of completion token ``i`` (0-based) of a completion of ``n`` tokens: ``(i + 0.5) / n``, in
``(0, 1)``; curves average tokens in ``bins`` equal-width position bins (20 by default).

*Normalised margin*: ``M_t / mean_s M_s``, the teacher margin (formula 4 of the design) divided by the mean margin
of its own trajectory, so 1 is the trajectory's average and trajectories of different sharpness share one scale.
Curves first average each trajectory's normalised margins inside a bin, then average those bin means over the
trajectories (each trajectory weighs the same); trajectories whose mean margin is 0 are left out.

Record schema (``records.jsonl`` and :func:`trajectory_records`)
----------------------------------------------------------------
Token lists run over the completion tokens (``completion_mask != 0``) in order; segment lists over segments.

- ``index``, ``prompt_id``, ``step``, ``prompt``: where the trajectory comes from (``None`` when unknown).
- ``completion_ids`` (list of int), ``completion_length`` (int).
- ``num_segments``; ``segment_token_spans`` (``[start, end)`` token indices); ``segment_scores`` (the scores the
  change point was computed on: ``log(1 + mean margin)`` for the release rule); ``segment_margin_mean``;
  ``segment_advantage_mean``, ``segment_advantage_std`` (population std of ``A_t`` over the segment's tokens).
- ``release_segment`` (segments kept: ``tau`` when accepted, else ``num_segments``), ``accepted``, ``bic_gain``.
- ``accepted_null`` (only from ``trl-ltc diagnose``): whether the same rule accepts a drop on the record's segment
  scores shuffled (:func:`null_acceptance`).
- ``kept_tokens``, ``kept_fraction``: supervised tokens with non-zero weight, and their fraction of the supervised
  tokens (the trainer's ``release/release_position``).
- ``token_margins``, ``token_advantages``: per-token ``M_t`` and ``A_t``.
- ``segment_texts`` (only with a tokenizer): each segment's decoded text; they concatenate to the completion's
  decoded text (special tokens skipped).
- ``teachability_kept`` (only when TA-OPD weights are given, as ``trl-ltc diagnose`` does): per token, 1 if
  ``supervision="token_teachability"`` keeps it, else 0.

*Release fraction* of a record: the tokens of its first ``release_segment`` segments as a fraction of its completion
length (1 when not accepted); with ``supervision="release"`` it is the kept fraction.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from ..segmentation import decode_with_offsets

logger = logging.getLogger(__name__)

__all__ = [
    "ReleaseDiagnosticsCallback",
    "diagnose",
    "margin_curve",
    "null_acceptance",
    "online_replay",
    "plot_margin_curve",
    "plot_release",
    "plot_support_sweep",
    "summarize",
    "summarize_online",
    "trajectory_records",
    "visible_text",
    "write_cases_html",
    "write_records",
    "write_summary",
]

DEFAULT_BINS = 20

# ---------------------------------------------------------------------------------------------------------------
# Records: one micro-batch of tensors -> one plain-Python dict per trajectory
# ---------------------------------------------------------------------------------------------------------------


def trajectory_records(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    segment_ids: torch.Tensor,
    supervision,
    margins: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    teacher_logprobs: torch.Tensor | None = None,
    student_logprobs: torch.Tensor | None = None,
    tokenizer=None,
    prompt_ids: Sequence | None = None,
    prompts: Sequence | None = None,
    step: int | None = None,
    start_index: int = 0,
    teachability_weights: torch.Tensor | None = None,
) -> list[dict]:
    """Turn one micro-batch into per-trajectory records (module docstring: schema), for the command and the trainer.

    Nothing is recomputed: segment scores, change point and weights are read from ``supervision``, the
    :class:`trl_ltc.supervision.Supervision` that ``supervision_weights`` returned for these tensors.

    Args:
        completion_ids, completion_mask: ``[B, C]`` sampled completions and their mask (1 on completion tokens).
        loss_mask: ``[B, C]`` supervised tokens (the trainer's ``completion_mask`` argument of the loss).
        segment_ids: ``[B, C]`` from ``segment_completions`` (``-1`` outside the completion).
        supervision: the ``Supervision`` of this batch; it must carry a change point (``supervision_weights`` sets
            one whenever it gets ``segment_ids`` and ``margins``).
        margins: ``[B, C]`` teacher margins ``M_t``.
        advantages: ``[B, C]`` ``A_t = log pT(y_t) - log pS(y_t)``; or give ``teacher_logprobs`` and
            ``student_logprobs`` instead.
        tokenizer: when given, records carry ``segment_texts``.
        prompt_ids, prompts: per-row prompt identifiers / prompts (JSON-serialisable), or ``None``.
        step: training step stored in every record (``None`` outside training).
        start_index: ``index`` of the first row.
        teachability_weights: ``[B, C]`` weights of ``supervision="token_teachability"`` on the same tokens; when
            given, records carry ``teachability_kept``.

    Returns:
        ``B`` dicts of plain Python values (JSON-serialisable).
    """
    if advantages is None:
        if teacher_logprobs is None or student_logprobs is None:
            raise ValueError(
                "trajectory_records needs `advantages` or both `teacher_logprobs` and `student_logprobs`."
            )
        advantages = teacher_logprobs.detach() - student_logprobs.detach()
    tensors = {
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "margins": margins,
        "advantages": advantages,
        "supervision.weights": supervision.weights,
    }
    if teachability_weights is not None:
        tensors["teachability_weights"] = teachability_weights
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(shapes["completion_ids"]) != 2:
        raise ValueError(f"trajectory_records needs [B, C] tensors of one shape (completion-aligned); got {shapes}.")
    change_point = supervision.change_point
    if change_point is None or supervision.segment_scores is None or supervision.num_segments is None:
        raise ValueError(
            "trajectory_records needs a Supervision with a change point: call supervision_weights with `segment_ids` "
            "and `margins`."
        )
    batch = completion_ids.shape[0]
    for name, values in (("prompt_ids", prompt_ids), ("prompts", prompts)):
        if values is not None and len(values) != batch:
            raise ValueError(f"`{name}` has {len(values)} entries for a batch of {batch} trajectories.")

    cpu = {name: t.detach().cpu() for name, t in tensors.items()}
    valid = cpu["completion_mask"] != 0
    supervised = cpu["loss_mask"] > 0
    kept = (cpu["supervision.weights"] > 0) & supervised
    num_segments = supervision.num_segments.detach().cpu().tolist()
    scores = supervision.segment_scores.detach().cpu()
    release = change_point.release_segment.detach().cpu().tolist()
    accepted = change_point.accepted.detach().cpu().tolist()
    gain = change_point.bic_gain.detach().cpu().tolist()

    records = []
    for b in range(batch):
        row = valid[b]
        ids = cpu["completion_ids"][b][row]
        seg = cpu["segment_ids"][b][row].long().numpy()
        n = int(num_segments[b])
        if (seg < 0).any() or (seg.size and int(seg.max()) + 1 != n):
            raise ValueError(
                f"Row {b}: segment ids must cover every completion token with ids 0..num_segments-1 "
                "(segment_completions with the same completion_mask)."
            )
        token_margins = cpu["margins"][b][row].tolist()
        token_advantages = cpu["advantages"][b][row].tolist()
        starts = np.searchsorted(seg, np.arange(n), side="left")
        ends = np.searchsorted(seg, np.arange(n), side="right")
        count = np.maximum(ends - starts, 1)
        m = np.asarray(token_margins, dtype=np.float64)
        a = np.asarray(token_advantages, dtype=np.float64)
        a_mean = np.bincount(seg, weights=a, minlength=n) / count
        a_std = np.sqrt(np.bincount(seg, weights=(a - a_mean[seg]) ** 2, minlength=n) / count) if n else a_mean
        n_supervised = int(supervised[b].sum())
        n_kept = int(kept[b].sum())
        record = {
            "index": start_index + b,
            "prompt_id": None if prompt_ids is None else prompt_ids[b],
            "step": step,
            "prompt": None if prompts is None else prompts[b],
            "completion_ids": ids.tolist(),
            "completion_length": int(row.sum()),
            "num_segments": n,
            "segment_token_spans": [[int(s), int(e)] for s, e in zip(starts, ends)],
            "segment_scores": scores[b, :n].tolist(),
            "segment_margin_mean": (np.bincount(seg, weights=m, minlength=n) / count).tolist(),
            "segment_advantage_mean": a_mean.tolist(),
            "segment_advantage_std": a_std.tolist(),
            "release_segment": int(release[b]),
            "accepted": bool(accepted[b]),
            "bic_gain": float(gain[b]),
            "kept_tokens": n_kept,
            "kept_fraction": n_kept / n_supervised if n_supervised else 0.0,
            "token_margins": token_margins,
            "token_advantages": token_advantages,
        }
        if tokenizer is not None:
            text, char_start, _ = decode_with_offsets(ids, tokenizer)
            bounds = [int(char_start[s]) for s in starts] + [len(text)]
            record["segment_texts"] = [text[bounds[i] : bounds[i + 1]] for i in range(n)]
        if teachability_weights is not None:
            record["teachability_kept"] = ((cpu["teachability_weights"][b] > 0) & supervised[b])[row].int().tolist()
        records.append(record)
    return records


def completion_text(record: dict) -> str:
    """The decoded completion of a record (its ``segment_texts`` joined; ``""`` without them)."""
    return "".join(record.get("segment_texts") or [])


def write_records(records: Sequence[dict], path) -> Path:
    """Write ``records`` as JSON lines (non-finite floats become ``null``)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_finite(record), ensure_ascii=False) + "\n")
    return path


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


# ---------------------------------------------------------------------------------------------------------------
# Aggregates
# ---------------------------------------------------------------------------------------------------------------


def _position_bins(length: int, bins: int) -> np.ndarray:
    """Bin index of each token by relative position ``(i + 0.5) / length``."""
    return np.minimum(((np.arange(length) + 0.5) / length * bins).astype(np.int64), bins - 1)


def normalised_margins(margins: Sequence[float]) -> np.ndarray | None:
    """``M_t / mean(M)`` of one trajectory, or ``None`` when it is empty or its mean margin is not positive."""
    m = np.asarray(margins, dtype=np.float64)
    if m.size == 0 or not np.isfinite(m).all() or m.mean() <= 0:
        return None
    return m / m.mean()


def margin_curve(token_margins: Sequence[Sequence[float]], bins: int = DEFAULT_BINS) -> dict[str, np.ndarray]:
    """Mean normalised margin per relative-position bin over trajectories (module docstring: definitions).

    Returns ``{"position": bin centres, "mean": ..., "sem": standard error over trajectories, "count": trajectories
    with a token in the bin}``; bins without any trajectory are ``nan``.
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
    """Mean, standard deviation and mean absolute value of ``A_t`` per relative-position bin, pooled over tokens."""
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
    return spans[record["release_segment"]][0] if record["release_segment"] < len(spans) else record["completion_length"]


def _before_after(record: dict) -> tuple[list[float], list[float]]:
    """Token margins before and after the change point of an accepted record."""
    cut = release_cut(record)
    return record["token_margins"][:cut], record["token_margins"][cut:]


def release_fraction(record: dict) -> float:
    """The record's release fraction (module docstring): ``release_cut / completion_length``, 1 when empty."""
    length = record["completion_length"]
    return release_cut(record) / length if length else 1.0


def teachability_positions(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Relative positions of all tokens and of TA-OPD's kept tokens, and whether each lies in the release prefix.

    Only records with ``teachability_kept`` count. Returns ``position``, ``kept`` and ``in_prefix``, one entry per
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

    ``margin_before_change`` / ``margin_after_change`` pool the tokens of accepted trajectories before / after their
    change point; ``bic_gain_mean`` averages over all trajectories (0 when not accepted), as the trainer's metric.
    When the records carry ``accepted_null`` (:func:`null_acceptance`), ``accepted_frac_null`` is its mean over
    them: the accepted fraction of the shuffled null, to set against ``accepted_fraction``. When the records carry
    ``teachability_kept``, the TA-OPD numbers are added: ``teachability_kept_fraction`` (kept tokens / tokens),
    ``teachability_kept_position_mean`` (mean relative position of the kept tokens), ``teachability_in_release_prefix``
    (share of the kept tokens inside the release prefix) and ``release_prefix_token_fraction`` (share of all tokens
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
    nulls = [r["accepted_null"] for r in records if "accepted_null" in r]
    return {"accepted_frac_null": float(np.mean(nulls))} if nulls else {}


def null_acceptance(records: Sequence[dict], seed: int = 0) -> list[bool]:
    """``accepted_null`` of each record: the change point of formula 6 on its segment scores in a random order.

    All records go through one ``trl_ltc.release.null_change_point`` call (each row's scores shuffled among
    themselves, then ``bic_change_point``) with a generator seeded with ``seed + NULL_SEED_OFFSET``, so the same
    records and seed always give the same answers. Records without two segments are never accepted.
    """
    from ..release import NULL_SEED_OFFSET, null_change_point

    if not records:
        return []
    width = max(r["num_segments"] for r in records)
    scores = torch.zeros(len(records), width, dtype=torch.float64)
    for row, record in enumerate(records):
        scores[row, : record["num_segments"]] = torch.tensor(record["segment_scores"], dtype=torch.float64)
    num_segments = torch.tensor([r["num_segments"] for r in records], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed + NULL_SEED_OFFSET)
    return null_change_point(scores, num_segments, generator).accepted.tolist()


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
    records: Sequence[dict], min_segments: int = 3, patience: int = 2, check_tokens: int = 1
) -> list[dict]:
    """The online release rule replayed on each record's segment scores (module docstring: fields).

    Args:
        records: trajectory records (``segment_scores``, ``segment_token_spans``, ``release_segment``,
            ``completion_length``).
        min_segments, patience: of ``online_release``.
        check_tokens: tokens per generation block (1: the stop happens right after the first token of the
            segment that completes the decision).

    Returns:
        One dict of ``online_*`` fields per record, in order.
    """
    from ..release import online_release

    if check_tokens < 1:
        raise ValueError(f"check_tokens must be >= 1; got {check_tokens}")
    if not records:
        return []
    width = max(r["num_segments"] for r in records)
    scores = torch.zeros(len(records), width, dtype=torch.float64)
    for row, record in enumerate(records):
        scores[row, : record["num_segments"]] = torch.tensor(record["segment_scores"], dtype=torch.float64)
    num_segments = torch.tensor([r["num_segments"] for r in records], dtype=torch.long)
    decision = online_release(scores, num_segments, min_segments, patience)
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
    """Overall numbers of an :func:`online_replay`: stops, agreement with the offline release, tokens saved."""
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
    """Markdown lines of :func:`summarize_online`'s numbers."""
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
    """The sentence of ``summary.md`` that sets the accepted fraction against its shuffled null."""
    return (
        f"Accepted fraction {accepted:.3f} vs {accepted_null:.3f} under the null (the same BIC rule on each "
        "trajectory's segment scores in a random order). A local teachability collapse is only shown where the first "
        "clearly exceeds the second and the margin curve falls."
    )


def write_summary(
    records: Sequence[dict], path, settings: dict | None = None, online: list[str] | None = None
) -> Path:
    """Write ``summary.md``: the numbers of :func:`summarize` in a table, the ``online`` replay lines, the
    run's ``settings``."""
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


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: headless, no pyplot state)
# ---------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_margin_curve(records: Sequence[dict], path, bins: int = DEFAULT_BINS, top_k: int | None = None) -> Path:
    """``margin_curve.png``: normalised teacher margin (top) and advantage (bottom) vs relative position."""
    curve = margin_curve([r["token_margins"] for r in records], bins)
    adv = advantage_curve([r["token_advantages"] for r in records], bins)
    figure = _figure(8, 6.5)
    top, bottom = figure.subplots(2, 1, sharex=True)
    k = f", K={top_k}" if top_k else ""
    figure.suptitle(f"Teacher margin vs. advantage along the completion ({len(records)} trajectories{k})")
    x = curve["position"]
    if np.isfinite(curve["mean"]).any():
        band = 1.96 * np.nan_to_num(curve["sem"])
        top.fill_between(x, curve["mean"] - band, curve["mean"] + band, color="tab:blue", alpha=0.2, label="95% CI")
        top.plot(x, curve["mean"], "o-", color="tab:blue", label="mean normalised margin")
        top.axhline(1.0, color="0.5", lw=0.8, ls="--", label="trajectory average (= 1)")
        top.legend(loc="best", fontsize=8)
    else:
        _empty(top, "no trajectory with a positive mean margin")
    top.set_ylabel("normalised margin\nM_t / mean margin of its trajectory")
    top.set_title("Teacher margin on the student's top-K (local teachability)", fontsize=10)
    top.grid(alpha=0.3)
    if np.isfinite(adv["mean"]).any():
        bottom.fill_between(
            x,
            adv["mean"] - adv["std"],
            adv["mean"] + adv["std"],
            color="tab:orange",
            alpha=0.2,
            label="mean ± std (tokens)",
        )
        bottom.plot(x, adv["mean"], "o-", color="tab:orange", label="mean A_t")
        bottom.plot(x, adv["abs_mean"], "s--", color="tab:red", ms=3, label="mean |A_t|")
        bottom.axhline(0.0, color="0.5", lw=0.8)
        bottom.legend(loc="best", fontsize=8)
    else:
        _empty(bottom, "no completion tokens")
    bottom.set_ylabel("advantage\nA_t = log pT(y_t) - log pS(y_t)")
    bottom.set_xlabel("relative position in the completion (token index + 0.5) / length")
    bottom.set_title("Sampled-token advantage stays non-zero", fontsize=10)
    bottom.set_xlim(0, 1)
    bottom.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_release(records: Sequence[dict], path) -> Path:
    """``release.png``: BIC gain histogram, pre- vs post-change segment scores, release positions."""
    from matplotlib.ticker import MaxNLocator

    accepted = [r for r in records if r["accepted"]]
    figure = _figure(14, 4.6)
    gain_ax, drop_ax, position_ax = figure.subplots(1, 3)
    figure.suptitle(f"Change points: {len(accepted)} of {len(records)} trajectories accepted")

    eligible = [r for r in records if r["num_segments"] >= 2]
    if accepted:
        # With 2 segments the one-drop model fits exactly (RSS 0), so the gain is set by the BIC's 1e-12 floor.
        groups = [
            [r["bic_gain"] for r in accepted if r["num_segments"] > 2],
            [r["bic_gain"] for r in accepted if r["num_segments"] == 2],
        ]
        labels = [f">= 3 segments ({len(groups[0])})", f"2 segments, exact fit ({len(groups[1])})"]
        gain_ax.hist(
            groups,
            bins=min(20, max(5, len(accepted))),
            stacked=True,
            color=["tab:green", "tab:olive"],
            edgecolor="white",
            label=labels,
        )
        gain_ax.legend(
            title=f"accepted; {len(eligible) - len(accepted)} with >= 2 segments not", fontsize=8, title_fontsize=8
        )
    else:
        _empty(gain_ax, f"no accepted change point\n({len(eligible)} trajectories with >= 2 segments)")
    gain_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    gain_ax.set_xlabel("BIC gain = BIC(no change) - BIC(one drop)")
    gain_ax.set_ylabel("trajectories")
    gain_ax.set_title("When is a one-drop summary preferred?", fontsize=10)

    if accepted:
        pre = [float(np.mean(r["segment_scores"][: r["release_segment"]])) for r in accepted]
        post = [float(np.mean(r["segment_scores"][r["release_segment"] :])) for r in accepted]
        drop_ax.scatter(pre, post, s=18, color="tab:purple", alpha=0.7, label="accepted trajectory")
        low, high = min(pre + post), max(pre + post)
        pad = 0.05 * (high - low or 1.0)
        drop_ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", ls="--", lw=1, label="no change")
        drop_ax.set_xlim(low - pad, high + pad)
        drop_ax.set_ylim(low - pad, high + pad)
        drop_ax.legend(loc="upper left", fontsize=8)
    else:
        _empty(drop_ax, "no accepted change point")
    drop_ax.set_xlabel("mean segment score before the change")
    drop_ax.set_ylabel("mean segment score after the change")
    drop_ax.set_title("Accepted changes are downward (below the diagonal)", fontsize=10)

    if accepted:
        position_ax.hist(
            [r["kept_fraction"] for r in accepted], bins=np.linspace(0, 1, 11), color="tab:blue", edgecolor="white"
        )
    else:
        _empty(position_ax, "no accepted change point")
    position_ax.set_xlim(0, 1)
    position_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    position_ax.set_xlabel("release position (kept fraction of the completion)")
    position_ax.set_ylabel("accepted trajectories")
    position_ax.set_title("Where supervision stops varies per sample", fontsize=10)
    for ax in (gain_ax, drop_ax, position_ax):
        ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_teachability(records: Sequence[dict], path, bins: int = DEFAULT_BINS) -> Path:
    """``teachability.png``: where TA-OPD's kept tokens sit against where the release rule stops supervising."""
    tokens = teachability_positions(records)
    kept = tokens["kept"]
    accepted = [release_fraction(r) for r in records if r["accepted"]]
    figure = _figure(12, 4.6)
    density_ax, share_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    figure.suptitle("Token teachability (TA-OPD) and the release rule on the same rollouts")
    edges = np.linspace(0, 1, bins + 1)
    if kept.any():
        density_ax.hist(tokens["position"], bins=edges, density=True, histtype="step", color="0.5", ls="--", lw=1.2,
                        label=f"all completion tokens ({len(kept)})")  # fmt: skip
        density_ax.hist(tokens["position"][kept], bins=edges, density=True, histtype="step", color="tab:red", lw=2,
                        label=f"tokens TA-OPD keeps ({int(kept.sum())})")  # fmt: skip
    if accepted:
        density_ax.hist(accepted, bins=edges, density=True, color="tab:blue", alpha=0.35,
                        label=f"release positions (accepted, {len(accepted)})")  # fmt: skip
    if kept.any() or accepted:
        density_ax.legend(fontsize=8)
    else:
        _empty(density_ax, "no TA-OPD tokens and no accepted change point")
    density_ax.set_xlim(0, 1)
    density_ax.set_xlabel("relative position in the completion")
    density_ax.set_ylabel("density")
    density_ax.set_title("Do the teachable tokens sit where release keeps supervising?", fontsize=10)

    if kept.any():
        shares = [float(tokens["in_prefix"].mean()), float(tokens["in_prefix"][kept].mean())]
        bars = share_ax.bar(["all tokens", "TA-OPD kept"], shares, color=["0.6", "tab:red"])
        share_ax.bar_label(bars, labels=[f"{v:.0%}" for v in shares], fontsize=9)
        share_ax.set_ylim(0, 1.1)
    else:
        _empty(share_ax, "no TA-OPD tokens")
    share_ax.set_ylabel("share inside the release prefix")
    share_ax.set_title("Inside the kept prefix", fontsize=10)
    for ax in (density_ax, share_ax):
        ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_support_sweep(margins_by_k: dict[int, Sequence[Sequence[float]]], path, bins: int = DEFAULT_BINS) -> Path:
    """``support_sweep.png``: one normalised margin curve per support size K (``{K: per-trajectory margins}``)."""
    figure = _figure(8, 4.8)
    ax = figure.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for i, (k, margins) in enumerate(sorted(margins_by_k.items())):
        curve = margin_curve(margins, bins)
        ax.plot(curve["position"], curve["mean"], "o-", ms=3, color=colors[i % len(colors)], label=f"K = {k}")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative position in the completion (token index + 0.5) / length")
    ax.set_ylabel("normalised margin\nM_t / mean margin of its trajectory")
    ax.set_title("Teacher margin over the student's top-K, for each K", fontsize=11)
    ax.legend(title="support size", fontsize=8)
    ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Case-study page
# ---------------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible_text(text: str) -> str:
    """``text`` as the case page shows it: control characters that HTML cannot carry, other than tab and newline,
    become visible stand-ins (C0 and DEL their Unicode Control Picture, e.g. U+0001 -> "␁"; C1 controls ``\\x85``).
    Every other character is kept as is, so the page's text is the decoded completion for ordinary text."""

    def stand_in(match: re.Match) -> str:
        code = ord(match.group())
        if code < 0x20:
            return chr(0x2400 + code)
        return "\u2421" if code == 0x7F else f"\\x{code:02x}"

    return _CONTROL.sub(stand_in, text)


def select_cases(records: Sequence[dict], num_cases: int) -> list[dict]:
    """Up to ``num_cases`` records, accepted ones with the largest BIC gain first, then not-accepted ones with the
    most segments (at least ``num_cases // 3`` of them when both kinds exist); shown in their original order."""
    accepted = sorted((r for r in records if r["accepted"]), key=lambda r: -r["bic_gain"])
    others = sorted((r for r in records if not r["accepted"]), key=lambda r: -r["num_segments"])
    n_others = min(len(others), max(num_cases // 3, num_cases - len(accepted)))
    chosen = accepted[: num_cases - n_others] + others[:n_others]
    return sorted(chosen, key=lambda r: r["index"])


def _segment_svg(record: dict, width: int = 420, height: int = 150) -> str:
    """Inline SVG bar chart of the segment scores, kept vs released, with the change point marked."""
    scores = record["segment_scores"]
    n, tau = len(scores), record["release_segment"]
    left, right, top, bottom = 42, 10, 20, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="segment scores">'
        )
    ]
    if n == 0:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no segments</text>')
        return "".join(parts) + "</svg>"
    high = max(max(scores), 1e-9)

    def y(value: float) -> float:
        return top + plot_h * (1 - max(value, 0.0) / high)

    step = plot_w / n
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="frame"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="frame"/>')
    for value, label in ((0.0, "0"), (high, f"{high:.2f}")):
        parts.append(f'<text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end" class="axis">{label}</text>')
    for i, score in enumerate(scores):
        kind = "kept" if i < tau else "released"
        x0 = left + i * step + 0.12 * step
        parts.append(
            f'<rect x="{x0:.1f}" y="{y(score):.1f}" width="{0.76 * step:.1f}" height="{top + plot_h - y(score):.1f}" '
            f'class="bar {kind}"><title>segment {i}: score {score:.3f}</title></rect>'
        )
    label_every = max(1, math.ceil(n / 12))
    for i in range(0, n, label_every):
        parts.append(
            f'<text x="{left + (i + 0.5) * step:.1f}" y="{top + plot_h + 13}" text-anchor="middle" '
            f'class="axis">{i}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle" class="axis">'
        "segment (score = log(1 + mean margin))</text>"
    )
    if record["accepted"] and 0 < tau < n:
        for lo, hi in ((0, tau), (tau, n)):
            mean = float(np.mean(scores[lo:hi]))
            parts.append(
                f'<line x1="{left + lo * step:.1f}" y1="{y(mean):.1f}" x2="{left + hi * step:.1f}" '
                f'y2="{y(mean):.1f}" class="mean"/>'
            )
        x_cut = left + tau * step
        parts.append(f'<line x1="{x_cut:.1f}" y1="{top - 12}" x2="{x_cut:.1f}" y2="{top + plot_h}" class="cut"/>')
        anchor, dx = ("end", -4) if x_cut > left + 0.6 * plot_w else ("start", 4)  # keep the label inside the chart
        parts.append(
            f'<text x="{x_cut + dx:.1f}" y="{top - 5}" text-anchor="{anchor}" class="cut-label">change point</text>'
        )
    return "".join(parts) + "</svg>"


def _prompt_text(prompt) -> str:
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _case_html(record: dict) -> str:
    esc = html.escape
    tau, n = record["release_segment"], record["num_segments"]
    status = (
        f"accepted: supervision stops after segment {tau - 1} (keeps {tau} of {n})"
        if record["accepted"]
        else f"not accepted: all {n} segments kept"
    )
    texts = record.get("segment_texts") or [""] * n
    spans = []
    for i, (text, score) in enumerate(zip(texts, record["segment_scores"])):
        kind = "kept" if i < tau else "released"
        cut = " cut" if record["accepted"] and i == tau else ""
        spans.append(
            f'<span class="seg {kind}{cut}" data-label="{i} · {score:.2f}" '
            f'title="segment {i}: score {score:.3f}, {kind}">{esc(visible_text(text))}</span>'
        )
    rows = []
    for i, (span, score, margin, a_mean, a_std) in enumerate(
        zip(
            record["segment_token_spans"],
            record["segment_scores"],
            record["segment_margin_mean"],
            record["segment_advantage_mean"],
            record["segment_advantage_std"],
        )
    ):
        kind = "kept" if i < tau else "released"
        rows.append(
            f'<tr class="{kind}"><td>{i}</td><td>{span[0]}–{span[1]}</td><td>{_fmt(score)}</td><td>{_fmt(margin)}</td>'
            f"<td>{_fmt(a_mean)}</td><td>{_fmt(a_std)}</td><td>{kind}</td></tr>"
        )
    prompt = _prompt_text(record.get("prompt"))
    prompt_html = f'<div class="prompt"><b>Prompt</b><pre>{esc(visible_text(prompt))}</pre></div>' if prompt else ""
    prompt_id = record.get("prompt_id")
    ident = f"trajectory {record['index']}" + (f" · prompt {esc(str(prompt_id))}" if prompt_id is not None else "")
    return (
        f'<section class="case {"accepted" if record["accepted"] else "rejected"}" id="case-{record["index"]}">'
        f"<h2>{ident} · {esc(status)}</h2>"
        f'<p class="facts">{record["completion_length"]} tokens · {n} segments · BIC gain {_fmt(record["bic_gain"], 2)}'
        f" · kept fraction {_fmt(record['kept_fraction'], 2)}</p>"
        f"{prompt_html}"
        f'<div class="body"><div class="chart">{_segment_svg(record)}{_CHART_NOTE}</div>'
        f'<div class="completion" data-index="{record["index"]}">{"".join(spans)}</div></div>'
        "<details><summary>segment table</summary><table><thead><tr><th>segment</th><th>tokens</th><th>score</th>"
        "<th>mean margin</th><th>mean A</th><th>std A</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></details></section>"
    )


_CHART_NOTE = (
    '<p class="chart-note"><span class="key kept"></span>kept <span class="key released"></span>released '
    '<span class="key mean"></span>mean before / after the change</p>'
)

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 15px; margin: 0 0 4px; }
.meta, .facts { color: #555; margin: 2px 0 8px; }
.legend span { padding: 2px 6px; margin-right: 8px; border-radius: 3px; }
.case { border: 1px solid #ddd; border-radius: 6px; padding: 12px 14px; margin: 16px 0; }
.case.accepted { border-left: 4px solid #c62828; }
.prompt pre { white-space: pre-wrap; margin: 2px 0 8px; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace;
              color: #444; background: #f6f6f6; padding: 6px 8px; border-radius: 4px; }
.body { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.chart { flex: 0 0 auto; }
.completion { flex: 1 1 420px; min-width: 300px; white-space: pre-wrap; overflow-wrap: anywhere;
              font: 13px/1.9 ui-monospace, Menlo, Consolas, monospace; }
.completion:empty::before { content: "(empty completion)"; color: #888; font-style: italic; }
.seg { border-left: 2px solid #9aa; padding: 1px 2px 1px 3px; }
.seg::before { content: attr(data-label); font: 9px/1 system-ui, sans-serif; color: #456; background: #eef2f5;
               border-radius: 2px; padding: 0 3px; margin-right: 3px; vertical-align: super; white-space: nowrap; }
.kept, .legend .kept { background: #e3f4e6; }
.released, .legend .released { background: #f1f1f1; color: #8a8a8a; }
.seg.cut { border-left: 3px solid #c62828; }
.seg.cut::before { content: "✂ released · " attr(data-label); color: #fff; background: #c62828; }
svg .frame { stroke: #888; stroke-width: 1; }
svg .axis { font: 10px system-ui, sans-serif; fill: #555; }
svg .bar.kept { fill: #4caf50; }
svg .bar.released { fill: #b0b0b0; }
svg .mean { stroke: #1565c0; stroke-width: 1.5; stroke-dasharray: 4 2; }
svg .cut { stroke: #c62828; stroke-width: 2; }
svg .cut-label { font: 10px system-ui, sans-serif; fill: #c62828; }
table { border-collapse: collapse; margin-top: 6px; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
tr.released td { color: #888; }
.chart-note { font-size: 11px; color: #555; margin: 0; }
.key { display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; vertical-align: -1px; }
.key.kept { background: #4caf50; } .key.released { background: #b0b0b0; }
.key.mean { height: 0; border-top: 2px dashed #1565c0; width: 14px; vertical-align: 3px; }
details summary { cursor: pointer; color: #555; margin-top: 6px; }
"""


def write_cases_html(
    records: Sequence[dict], path, num_cases: int = 8, title: str = "Release cases", meta: str = ""
) -> Path:
    """Write ``cases.html``: a self-contained page (inline CSS and SVG, no external assets) of selected trajectories.

    Each case shows its completion split into segments (a label before each with its index and score), the kept
    prefix on green and the released suffix in grey from the change point (red marker) on, and an SVG bar chart
    of the segment scores with the change point and the left/right means. Text is HTML-escaped and shown through
    :func:`visible_text`, so stripping the tags of a ``.completion`` element and un-escaping gives the completion.
    """
    cases = select_cases(records, num_cases)
    legend = (
        '<p class="legend"><span class="kept">kept prefix (supervised)</span>'
        '<span class="released">released suffix (not supervised)</span>'
        "labels: segment index · score log(1 + mean teacher margin)</p>"
    )
    body = "".join(_case_html(r) for r in cases) or "<p>No trajectories.</p>"
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(meta)} Showing {len(cases)} of '
        f"{len(records)} trajectories.</p>{legend}{body}</body></html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def diagnose(
    student,
    teacher,
    tokenizer,
    prompts: Sequence,
    output_dir,
    *,
    prompt_ids: Sequence | None = None,
    top_k: int = 10,
    top_k_sweep: Sequence[int] = (2, 5, 10, 20),
    segmentation: str = "nltk",
    segment_window: int = 64,
    max_completion_length: int = 256,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    num_cases: int = 8,
    bins: int = DEFAULT_BINS,
    progress: bool = True,
    settings: dict | None = None,
    token_top_k: int = 16,
    token_score: str = "teachability",
    token_keep_ratio: float = 0.05,
    token_min_keep: int = 1,
    online_min_segments: int = 3,
    online_patience: int = 2,
    online_check_tokens: int = 16,
) -> dict[str, Path]:
    """Sample, score and segment completions of ``prompts`` and write every diagnostics file into ``output_dir``.

    Uses the trainer's functions throughout: ``sample_completions`` (completions cut after the first EOS, which is
    kept), ``token_signals`` at ``temperature`` with the margin over the student's top-``top_k``,
    ``segment_completions``, and ``supervision_weights("release", ...)`` for the change point and the weights.
    Margins for each K of ``top_k_sweep`` are computed the same way (``support_sweep.png``). The TA-OPD features
    (``token_top_k``) come from the same pass, and ``supervision_weights("token_teachability", ...)`` selects the
    tokens over each scoring batch of ``batch_size`` trajectories, as training does over a per-device batch
    (``teachability.png``); ``token_score="random"`` draws from a generator seeded with ``seed``. Every record gets
    ``accepted_null`` from :func:`null_acceptance` with the same ``seed`` (module docstring). The online
    release rule is replayed on the records with ``online_min_segments``, ``online_patience`` and
    ``online_check_tokens`` (:func:`online_replay`; fields in ``records.jsonl``, overall numbers in ``summary.md``).

    Returns ``{file name: path}`` of the files written.
    """
    from tqdm.auto import tqdm

    from ..generation import sample_completions
    from ..segmentation import segment_completions
    from ..signals import shared_vocab_size, token_signals
    from ..supervision import supervision_weights
    from ..teachability import TeachabilityFeatures

    vocab = shared_vocab_size(student, teacher)  # the token ids both output heads have (they may be padded)
    for k in (top_k, *top_k_sweep):
        if not 2 <= k <= vocab:
            raise ValueError(
                f"Every K (--top_k, --top_k_sweep) must be in [2, {vocab}] (the vocabulary size); got {k}."
            )
    if not 1 <= token_top_k <= vocab:
        raise ValueError(f"--token_top_k must be in [1, {vocab}] (the vocabulary size); got {token_top_k}.")
    generator = torch.Generator().manual_seed(seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompts = list(prompts)
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    student.eval()
    teacher.eval()
    rollouts = sample_completions(
        student, tokenizer, prompts, max_completion_length, batch_size, temperature, seed=seed, progress=progress,
        vocab_size=vocab,
    )
    sweep = sorted(set(top_k_sweep))
    records, sweep_margins = [], {k: [] for k in sweep}
    for start in tqdm(range(0, len(prompts), batch_size), desc="Scoring", disable=not progress):
        rows = slice(start, start + batch_size)
        prompt_ids_b, prompt_mask, completion_ids, completion_mask = _trimmed(rollouts, rows)
        batch = (
            torch.cat([prompt_ids_b, completion_ids], 1).to(student.device),  # input_ids
            torch.cat([prompt_mask, completion_mask], 1).to(student.device),  # attention_mask
            torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).to(student.device),  # completion mask
        )
        main = token_signals(student, teacher, *batch, top_k=top_k, temperature=temperature, feature_k=token_top_k)
        completion = slice(prompt_ids_b.shape[1], None)
        margins, advantages = (x[:, completion].cpu() for x in (main.margins, main.advantages))
        features = TeachabilityFeatures._make(x[:, completion].cpu() for x in main.features)
        loss_mask = completion_mask.float()
        segment_ids = segment_completions(completion_ids, completion_mask, tokenizer, segmentation, segment_window)
        supervision = supervision_weights(
            "release", loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages
        )
        token_teachability = supervision_weights(
            "token_teachability",
            loss_mask,
            features=features,
            generator=generator,
            token_score=token_score,
            token_keep_ratio=token_keep_ratio,
            token_min_keep=token_min_keep,
        )
        records += trajectory_records(
            completion_ids,
            completion_mask,
            loss_mask,
            segment_ids,
            supervision,
            margins,
            advantages,
            tokenizer=tokenizer,
            prompt_ids=prompt_ids[rows],
            prompts=prompts[rows],
            start_index=start,
            teachability_weights=token_teachability.weights,
        )
        valid = completion_mask.bool()
        for k in sweep:
            if k == top_k:
                k_margins = margins
            else:
                k_signals = token_signals(student, teacher, *batch, top_k=k, temperature=temperature)
                k_margins = k_signals.margins[:, completion].cpu()
            sweep_margins[k] += [k_margins[b][valid[b]].tolist() for b in range(valid.shape[0])]

    meta = (
        f"K={top_k}, segmentation={segmentation}, temperature={temperature}, "
        f"max_completion_length={max_completion_length}, seed={seed}."
    )
    for record, accepted_null in zip(records, null_acceptance(records, seed)):
        record["accepted_null"] = accepted_null
    replayed = online_replay(records, online_min_segments, online_patience, online_check_tokens)
    for record, fields in zip(records, replayed):
        record.update(fields)
    online = online_summary_lines(
        summarize_online(records, replayed),
        f"online_min_segments={online_min_segments}, online_patience={online_patience}, "
        f"online_check_tokens={online_check_tokens}.",
    )
    files = {
        "records.jsonl": write_records(records, output_dir / "records.jsonl"),
        "margin_curve.png": plot_margin_curve(records, output_dir / "margin_curve.png", bins, top_k),
        "release.png": plot_release(records, output_dir / "release.png"),
        "support_sweep.png": plot_support_sweep(sweep_margins, output_dir / "support_sweep.png", bins),
        "teachability.png": plot_teachability(records, output_dir / "teachability.png", bins),
        "cases.html": write_cases_html(records, output_dir / "cases.html", num_cases, meta=meta),
        "summary.md": write_summary(records, output_dir / "summary.md", settings, online),
    }
    return files


def _trimmed(rollouts, rows: slice):
    """Rows of ``rollouts`` without the columns that are padding for every one of them."""
    prompt_ids, prompt_mask = rollouts.prompt_ids[rows], rollouts.prompt_mask[rows]
    completion_ids, completion_mask = rollouts.completion_ids[rows], rollouts.completion_mask[rows]
    first = int(prompt_mask.any(0).int().argmax()) if prompt_mask.any() else prompt_mask.shape[1]
    last = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 0
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :last], completion_mask[:, :last]


def _load_prompts(name_or_path: str, config: str | None, split: str):
    """The prompt dataset (``trl_ltc.prompts``: local file, ``save_to_disk`` directory or ``datasets`` name), checked."""
    from ..prompts import load_prompt_dataset, validate_prompt_dataset

    dataset = load_prompt_dataset(name_or_path, config=config, split=split)
    validate_prompt_dataset(dataset, name_or_path)
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# During training
# ---------------------------------------------------------------------------------------------------------------


_TOKEN_ARRAYS = {
    "token_margins": np.float32,
    "token_advantages": np.float32,
    "completion_ids": np.int64,
    "teachability_kept": np.int8,
}


def _compact(record: dict) -> dict:
    """``record`` with its per-token lists as numpy arrays (4-8 bytes a token instead of ~32 for Python floats)."""
    return {k: np.asarray(v, dtype=_TOKEN_ARRAYS[k]) if k in _TOKEN_ARRAYS else v for k, v in record.items()}


class ReleaseDiagnosticsCallback(TrainerCallback):
    """Keep the trajectory records of the last ``max_steps_kept`` training steps; plot them at saves and at the end.

    The trainer hands over each micro-batch's records (:func:`trajectory_records`) with :meth:`add`. At most
    ``max_records`` trajectories are kept, the oldest dropped first, so memory and ``release_records.jsonl`` stay
    bounded however large the batches (about 30 bytes per completion token in the file). On ``on_save`` and
    ``on_train_end`` the main process (``state.is_world_process_zero``) writes ``release.png`` and
    ``margin_curve.png`` (and the records as ``release_records.jsonl``; ``teachability.png`` too when the records
    carry ``teachability_kept``, as with ``supervision="token_teachability"``) into ``args.output_dir``, or into
    ``args.output_dir/subdir`` when ``subdir`` is given, and logs the plots to the image-capable trackers among
    ``trackers`` (:meth:`log_images`). Each process keeps only its own records, so the plots show the main process's
    share of the batches.

    Args:
        max_steps_kept: how many of the most recent distinct steps are kept.
        subdir: optional sub-directory of the output directory for the files.
        bins: relative-position bins of the margin curve.
        max_records: how many trajectories are kept at most (``None``: no limit).
        trackers: the trainer's callbacks (a live list is fine); its ``WandbCallback`` and ``TensorBoardCallback``
            (those of ``report_to="wandb"`` / ``"tensorboard"``) receive the plots as images.
    """

    def __init__(
        self,
        max_steps_kept: int = 20,
        subdir: str | None = None,
        bins: int = DEFAULT_BINS,
        max_records: int | None = 256,
        trackers: Sequence = (),
    ):
        if max_steps_kept < 1:
            raise ValueError(f"max_steps_kept must be >= 1; got {max_steps_kept}.")
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be >= 1 or None; got {max_records}.")
        self.max_steps_kept = max_steps_kept
        self.max_records = max_records
        self.subdir = subdir
        self.bins = bins
        self.trackers = trackers
        self._steps: OrderedDict[int, list[dict]] = OrderedDict()

    def add(self, records: Sequence[dict], step: int) -> None:
        """Add one micro-batch's records for training step ``step`` (several micro-batches may share a step)."""
        self._steps.setdefault(int(step), []).extend(_compact(dict(r, step=int(step))) for r in records)
        while len(self._steps) > self.max_steps_kept:
            self._steps.popitem(last=False)
        excess = sum(map(len, self._steps.values())) - (self.max_records or math.inf)
        while excess > 0:  # drop the oldest trajectories
            oldest = next(iter(self._steps.values()))
            dropped = min(excess, len(oldest))
            del oldest[:dropped]
            excess -= dropped
            if not oldest:
                self._steps.popitem(last=False)

    @property
    def records(self) -> list[dict]:
        """The kept records, oldest step first."""
        return [r for records in self._steps.values() for r in records]

    def write(self, output_dir) -> dict[str, Path]:
        """Write the plots (and records) of the kept records into ``output_dir``; nothing when there are none."""
        records = self.records
        if not records:
            logger.info("ReleaseDiagnosticsCallback: no records yet, nothing written.")
            return {}
        directory = Path(output_dir) / self.subdir if self.subdir else Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            "release.png": plot_release(records, directory / "release.png"),
            "margin_curve.png": plot_margin_curve(records, directory / "margin_curve.png", self.bins),
            "release_records.jsonl": write_records(records, directory / "release_records.jsonl"),
        }
        if any("teachability_kept" in r for r in records):
            files["teachability.png"] = plot_teachability(records, directory / "teachability.png", self.bins)
        return files

    def log_images(self, files: dict[str, Path], step: int) -> list[str]:
        """Log the ``.png`` files among ``files`` to the image-capable trackers among ``self.trackers``, tagged
        ``release_diagnostics/<name>`` at training step ``step``; returns the names of the trackers logged to.

        ``WandbCallback``: ``wandb.log`` of ``wandb.Image``s with ``train/global_step`` (when its run is active).
        ``TensorBoardCallback``: ``SummaryWriter.add_image`` (while its writer is open; it closes at the end of
        training, before this callback's ``on_train_end``, so the last save's plots are the last ones logged there).
        """
        from transformers.integrations import TensorBoardCallback, WandbCallback

        images = {f"release_diagnostics/{Path(n).stem}": path for n, path in files.items() if n.endswith(".png")}
        logged = []
        for tracker in self.trackers if images else ():
            if isinstance(tracker, WandbCallback) and getattr(tracker._wandb, "run", None) is not None:
                wandb = tracker._wandb
                wandb.log({**{tag: wandb.Image(str(path)) for tag, path in images.items()}, "train/global_step": step})
                logged.append("wandb")
            elif isinstance(tracker, TensorBoardCallback) and tracker.tb_writer is not None:
                import matplotlib.image

                for tag, path in images.items():
                    pixels = matplotlib.image.imread(path)[..., :3]  # float RGB in [0, 1], height x width x 3
                    tracker.tb_writer.add_image(tag, pixels, step, dataformats="HWC")
                tracker.tb_writer.flush()
                logged.append("tensorboard")
        return logged

    def _maybe_write(self, args, state) -> None:
        if state.is_world_process_zero and args.output_dir:
            self.log_images(self.write(args.output_dir), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._maybe_write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_write(args, state)


def __getattr__(name):  # the command line, now in `trl_ltc.commands.diagnose`
    if name in ('build_parser', 'main'):
        from ..commands import diagnose

        return getattr(diagnose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
