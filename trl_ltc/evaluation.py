"""Teacher-student divergence on student samples: the quantity on-policy distillation minimises.

`reverse_kl` is the mean, over the completion tokens of some rollouts, of the exact per-token reverse KL

    KL(pS || pT)(x, y_<t) = sum_v pS(v | x, y_<t) * (log pS(v | x, y_<t) - log pT(v | x, y_<t))

over the full vocabulary. Logits are projected from each model's last hidden states a chunk of positions at a time
(`trl_ltc.signals.OutputHead`), so no `(batch, length, vocab)` tensor is built. `heldout_reverse_kl` samples the
rollouts from the student first (`trl_ltc.generation.sample_completions`). Both work with any causal LM, or a PEFT
model wrapping one, and leave the models' train/eval modes as they found them.
"""

from __future__ import annotations

import contextlib

import torch

from .generation import Rollouts, sample_completions
from .signals import OutputHead, last_hidden_state

__all__ = ["heldout_reverse_kl", "reverse_kl"]

# Logits per projection chunk when `chunk_size` is not given (positions = this / vocabulary size).
_LOGITS_PER_CHUNK = 1 << 24


@contextlib.contextmanager
def _eval_mode(*models):
    """Put the models in eval mode (no dropout) and restore each one's previous mode afterwards."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


@torch.no_grad()
def reverse_kl(
    student,
    teacher,
    rollouts: Rollouts,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> float:
    """Mean per-token reverse KL `KL(pS || pT)` in nats over the completion tokens of `rollouts`, exact over the
    vocabulary.

    Args:
        student, teacher: causal LMs (or PEFT models) sharing a vocabulary; they may sit on different devices.
        rollouts: prompts and completions (`trl_ltc.generation.Rollouts`); every completion token counts once.
        chunk_size: positions projected to the vocabulary at a time (default: about 16M logits per chunk).
        temperature: both distributions are taken at this temperature (logits / temperature).
        batch_size: rollouts run through the backbones at a time (default: all of them at once).
    """
    head_s, head_t = OutputHead.of(student), OutputHead.of(teacher)
    vocab = head_s.weight.shape[0]
    if head_t.weight.shape[0] != vocab:
        raise ValueError(
            f"The student's output head has {vocab} rows but the teacher's has {head_t.weight.shape[0]}; the KL "
            "compares the two distributions token by token and needs one shared vocabulary."
        )
    chunk_size = chunk_size or max(1, _LOGITS_PER_CHUNK // vocab)
    rows = rollouts.prompt_ids.shape[0]
    batch_size = batch_size or max(rows, 1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with _eval_mode(student, teacher):
        for start in range(0, rows, batch_size):
            batch = Rollouts(*(x[start : start + batch_size] for x in rollouts))
            mask = batch.full_completion_mask[:, 1:].bool()  # position t predicts token t + 1
            hidden_s = _completion_hidden(student, batch, mask).to(head_s.weight.device)
            hidden_t = _completion_hidden(teacher, batch, mask).to(head_t.weight.device)
            for first in range(0, hidden_s.shape[0], chunk_size):
                chunk = slice(first, first + chunk_size)
                logp_s = torch.log_softmax(head_s.logits(hidden_s[chunk], temperature, torch.float32), dim=-1)
                logp_t = torch.log_softmax(head_t.logits(hidden_t[chunk], temperature, torch.float32), dim=-1)
                kl = (logp_s.exp() * (logp_s - logp_t.to(logp_s.device))).sum(dim=-1)
                total += kl.sum(dtype=torch.float64).cpu()
            count += hidden_s.shape[0]
    if count == 0:
        raise ValueError("The rollouts have no completion tokens: there is nothing to measure the KL on.")
    return float(total / count)


def _completion_hidden(model, rollouts: Rollouts, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states `[N, H]` of the positions that predict the completion tokens, in row-major order."""
    device = model.get_input_embeddings().weight.device
    hidden = last_hidden_state(model, rollouts.input_ids.to(device), rollouts.attention_mask.to(device))[:, :-1]
    return hidden[mask.to(hidden.device)]


def heldout_reverse_kl(
    student,
    teacher,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int | None = 0,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> float:
    """Sample one completion per prompt from `student` (seeded), then return `reverse_kl` on those samples.

    The global random state is restored afterwards, so evaluating does not change what a later training run samples.

    Args:
        student, teacher: causal LMs (or PEFT models) sharing `tokenizer`'s vocabulary.
        prompts: text prompts or conversations (lists of `{"role", "content"}` messages).
        max_new_tokens: completion length cap; completions stop at the first EOS (kept, as in training).
        batch_size: prompts sampled and scored at a time.
        seed: sampling seed (`None` leaves the global RNG alone).
        temperature: sampling and scoring temperature.
        chunk_size: positions projected to the vocabulary at a time.
        progress: show a progress bar while sampling.
    """
    with torch.random.fork_rng(), _eval_mode(student):
        rollouts = sample_completions(
            student,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            seed=seed,
            progress=progress,
        )
    return reverse_kl(
        student, teacher, rollouts, chunk_size=chunk_size, temperature=temperature, batch_size=batch_size
    )
