"""Trajectory records: one micro-batch of tensors -> one plain-Python dict per trajectory (schema in
`trl_ltc.diagnostics`), and their JSON-lines file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..segmentation import decode_with_offsets

DEFAULT_BINS = 20


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

    Nothing is recomputed: segment scores, change point and weights are read from `supervision`, the
    `trl_ltc.supervision.Supervision` that `supervision_weights` returned for these tensors.

    Args:
        completion_ids, completion_mask: `[B, C]` sampled completions and their mask (1 on completion tokens).
        loss_mask: `[B, C]` supervised tokens (the trainer's `completion_mask` argument of the loss).
        segment_ids: `[B, C]` from `segment_completions` (`-1` outside the completion).
        supervision: the `Supervision` of this batch; it must carry a change point (`supervision_weights` sets
            one whenever it gets `segment_ids` and `margins`).
        margins: `[B, C]` teacher margins `M_t`.
        advantages: `[B, C]` `A_t = log pT(y_t) - log pS(y_t)`; or give `teacher_logprobs` and
            `student_logprobs` instead.
        tokenizer: when given, records carry `segment_texts`.
        prompt_ids, prompts: per-row prompt identifiers / prompts (JSON-serialisable), or `None`.
        step: training step stored in every record (`None` outside training).
        start_index: `index` of the first row.
        teachability_weights: `[B, C]` weights of `supervision="token_teachability"` on the same tokens; when
            given, records carry `teachability_kept`.

    Returns:
        `B` dicts of plain Python values (JSON-serialisable).
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
    """The decoded completion of a record (its `segment_texts` joined; `""` without them)."""
    return "".join(record.get("segment_texts") or [])


def write_records(records: Sequence[dict], path) -> Path:
    """Write `records` as JSON lines (non-finite floats become `null`)."""
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


_TOKEN_ARRAYS = {
    "token_margins": np.float32,
    "token_advantages": np.float32,
    "completion_ids": np.int64,
    "teachability_kept": np.int8,
}


def _compact(record: dict) -> dict:
    """`record` with its per-token lists as numpy arrays (4-8 bytes a token instead of ~32 for Python floats)."""
    return {k: np.asarray(v, dtype=_TOKEN_ARRAYS[k]) if k in _TOKEN_ARRAYS else v for k, v in record.items()}
