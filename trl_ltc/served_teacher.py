"""The trainer's side of a served teacher (`trl_ltc.teacher_server`): the batch's scores as fields that travel with it,
the block scorer of an online rollout, and the loss of a micro-batch without a teacher forward."""

from __future__ import annotations

import torch

from .release import LOG_PROB_FLOOR, support_margin
from .signals import OutputHead, ServedTeacherRows, TeacherScores, TeacherTopLogprobs
from .teacher_server import RowScores, TeacherServer

__all__ = ["ServedTeacherBlocks", "served_batch_fields", "served_loss"]


def _row_tensors(rows: list[RowScores], width: int, n: int, vocab_size: int):
    """`[B, width]` log-probs and scored mask, `[B, width, n]` top ids (-1 where fewer) and log-probs (the floor)."""
    batch_size = len(rows)
    logprobs, scored = torch.zeros(batch_size, width), torch.zeros(batch_size, width)
    top_ids = torch.full((batch_size, width, n), -1, dtype=torch.long)
    top_logprobs = torch.full((batch_size, width, n), LOG_PROB_FLOOR)
    for b, row in enumerate(rows):
        logprobs[b, : len(row.logprobs)] = torch.tensor(row.logprobs)
        scored[b, : len(row.scored)] = torch.tensor(row.scored, dtype=torch.float32)
        for t, pairs in enumerate(row.top):
            pairs = [(i, v) for i, v in pairs if i < vocab_size]
            if pairs:
                ids, values = zip(*pairs)
                top_ids[b, t, : len(ids)] = torch.tensor(ids)
                top_logprobs[b, t, : len(ids)] = torch.tensor(values)
    return logprobs, top_ids, top_logprobs, scored


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu().bool())]


def served_batch_fields(server: TeacherServer, batch: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """The served teacher's scores of a generation batch, as fields that travel with it through the parent's shuffle
    and split: `served_logprobs` `[B, T]`, `served_top_ids` and `served_top_logprobs` `[B, T, n]` (-1 and the floor
    where fewer were returned), and `served_mask` `[B, T]` (1 on the completion tokens the server scored)."""
    rows = server.score(
        _unpadded(batch["prompt_ids"], batch["prompt_mask"]),
        _unpadded(batch["completion_ids"], batch["completion_mask"]),
    )
    tensors = _row_tensors(rows, batch["completion_ids"].shape[1], server.top_logprobs, vocab_size)
    names = ("served_logprobs", "served_top_ids", "served_top_logprobs", "served_mask")
    return {name: value.to(batch["completion_ids"].device) for name, value in zip(names, tensors)}


class ServedTeacherBlocks:
    """A served teacher's scores of each new block of an online rollout (`trl_ltc.online.generate_online`): the
    prompt and the completion so far are scored again at every block (a server keeps no per-row cache), and the
    margins taken as in the loss (`trl_ltc.signals.TeacherTopLogprobs`). Token-id servers only
    (`TeacherServer.blocks`).
    """

    rescores = True  # no cache: every block scores the prompt and the completion so far (`compute/teacher_tokens`)

    def __init__(self, server: TeacherServer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int):
        self.server, self.vocab_size = server, vocab_size
        self.prompts, self.width = _unpadded(prompt_ids, prompt_mask), prompt_ids.shape[1]

    def score_block(self, ids, mask, new, valid, support) -> torch.Tensor:
        completions = _unpadded(ids[:, self.width :], mask[:, self.width :])
        rows = self.server.score(self.prompts, completions)
        # The new tokens of each row are the last `valid.sum()` of its completion so far: keep only their scores.
        counts = valid.sum(1).tolist()
        rows = [RowScores(*(x[len(x) - k :] for x in row)) for row, k in zip(rows, counts, strict=True)]
        n = self.server.top_logprobs
        logprobs, top_ids, top_logprobs, _ = _row_tensors(rows, new.shape[1], n, self.vocab_size)
        on = valid.cpu()
        teacher = ServedTeacherRows(new.cpu()[on], logprobs[on], top_ids[on], top_logprobs[on])
        filled = teacher.logprobs(slice(None), self.vocab_size, torch.float32)
        block = torch.zeros(*valid.shape, 2)
        block[on] = torch.stack([support_margin(filled, support.cpu()[on]), logprobs[on]], -1)
        return block.to(new.device)

    def keep(self, rows: torch.Tensor) -> None:
        self.prompts = [self.prompts[i] for i in rows.tolist()]


def served_loss(trainer, unwrapped_student, inputs, num_items_in_batch, fractions_only=False):
    """The trainer's loss of one micro-batch with a served teacher: the student's forward only, the teacher's
    scores from the batch (`served_batch_fields`); positions the server did not score are not supervised."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    online = "online_teacher_logprobs" in inputs  # an online rollout's scores, taken while generating
    loss_mask = inputs["completion_mask"] * inputs.get("tool_mask", 1) * (1 if online else inputs["served_mask"])
    logits_to_keep = inputs["completion_ids"].shape[1]
    hidden = trainer._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
    head = OutputHead.of(unwrapped_student)
    hidden, loss_mask = hidden.to(head.weight.device), loss_mask.to(head.weight.device)
    if online:
        scores = TeacherScores(inputs["online_teacher_logprobs"], inputs["online_margins"])
    else:
        scores = TeacherTopLogprobs(inputs["served_logprobs"], inputs["served_top_ids"], inputs["served_top_logprobs"])
    output = trainer._supervised_loss(
        inputs, hidden, None, head.weight, None, loss_mask, trainer.beta, num_items_in_batch,
        student_lm_head_bias=head.bias, student_logit_scale=head.logit_scale,
        student_final_logit_softcapping=head.softcap, temperature=trainer.temperature, fractions_only=fractions_only,
        teacher_scores=scores,
    )  # fmt: skip
    if not (fractions_only or online) and trainer._pending_stats is not None:
        completion = inputs["completion_mask"] * inputs.get("tool_mask", 1)
        unscored = completion * (1 - inputs["served_mask"])
        trainer._pending_stats["teacher_server/unscored_frac"] = (unscored.float().sum(), completion.float().sum())
    return output
