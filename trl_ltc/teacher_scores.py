"""The teacher's side of the per-token signals (`trl_ltc.signals`): where its log-probs come from.

- `LocalTeacherRows`: a local teacher's rows of log-probs, projected from its hidden states chunk by chunk.
- `TeacherScores`: its signals computed before the loss (while generating online), used as they are.
- `TeacherTopLogprobs` / `ServedTeacherRows`: a served teacher's top-n log-probs (`trl_ltc.teacher_server`), turned
  into rows of log-probs with every token outside the top-n at the n-th returned log-prob.

A rows object gives `logprobs(rows, vocab, compute_dtype) -> [n, V]` for a chunk of the supervised positions, and
`top_n` (None for a full distribution); `_ChunkedSignals` takes the margins and features on them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from .release import LOG_PROB_FLOOR

if TYPE_CHECKING:
    from .signals import OutputHead

__all__ = ["LocalTeacherRows", "ServedTeacherRows", "TeacherScores", "TeacherTopLogprobs"]


class TeacherScores(NamedTuple):
    """The teacher's per-token signals of a batch, computed before the loss (while generating, `trl_ltc.online`).

    Each `[B, T]`, aligned to the targets like `TokenSignals`; given to `signals_from_hidden` in place of the
    teacher's hidden states, so that the loss runs no teacher forward.
    """

    logprobs: torch.Tensor
    """`log pT(y_t)` at the training temperature, over the token ids both heads have, floored at `log(1e-12)`."""
    margins: torch.Tensor | None = None
    """The teacher margin on the student's top-K (formula 4)."""


class TeacherTopLogprobs(NamedTuple):
    """The teacher's scores of a batch from a server (`trl_ltc.teacher_server`): per position the exact `log pT(y_t)`
    and the teacher's top-n log-probs, each aligned to the targets like `TokenSignals`.

    Given to `signals_from_hidden` as `teacher_scores`: the margins and TA-OPD features are computed with the
    student's candidates as with a local teacher, on the teacher's log-probs with every token outside the top-n set to
    the n-th returned log-prob (an upper bound of it); `TokenSignals.inexact_margins` marks the positions where fewer
    than two of the student's top-K are in the top-n (the margin is then a bound, not exact).
    """

    logprobs: torch.Tensor
    """`[B, T]`: `log pT(y_t)` of the sampled token (at temperature 1), floored at `log(1e-12)`."""
    top_ids: torch.Tensor
    """`[B, T, n]` long: the teacher's top-n token ids per position, best first; -1 where fewer were returned."""
    top_logprobs: torch.Tensor
    """`[B, T, n]`: their log-probs."""


class LocalTeacherRows(NamedTuple):
    """A local teacher's rows of log-probs, projected from its hidden states chunk by chunk."""

    head: OutputHead
    hidden: torch.Tensor
    temperature: float
    top_n = None

    def logprobs(self, rows: slice, vocab: int, compute_dtype: torch.dtype) -> torch.Tensor:
        return torch.log_softmax(self.head.logits(self.hidden[rows], self.temperature, compute_dtype), -1)


class ServedTeacherRows(NamedTuple):
    """A served teacher's rows of log-probs: its top-n and the sampled token exact, every other token bounded by the
    n-th returned log-prob (`TeacherTopLogprobs`)."""

    targets: torch.Tensor  # [N]
    sampled: torch.Tensor  # [N], log pT of the targets
    top_ids: torch.Tensor  # [N, n]
    top_logprobs: torch.Tensor  # [N, n]

    @property
    def top_n(self) -> int:
        return self.top_ids.shape[-1]

    def logprobs(self, rows: slice, vocab: int, compute_dtype: torch.dtype) -> torch.Tensor:
        ids, values = self.top_ids[rows], self.top_logprobs[rows].float()
        known = ids >= 0
        bound = torch.where(known, values, math.inf).amin(-1)
        bound = torch.where(known.any(-1), bound, LOG_PROB_FLOOR)  # nothing returned: every token at the floor
        filled = bound[:, None].repeat(1, vocab + 1)  # column `vocab` takes the missing entries, then is cut off
        filled.scatter_(-1, torch.where(known, ids, vocab), values)
        filled.scatter_(-1, self.targets[rows, None], self.sampled[rows, None].float())
        return filled[:, :vocab]

    def inexact(self, rows: slice, candidates: torch.Tensor) -> torch.Tensor:
        """Positions where fewer than two of the student's `candidates` are in the returned top-n."""
        found = (candidates[:, :, None] == self.top_ids[rows][:, None, :]).any(-1)
        return found.sum(-1) < 2
