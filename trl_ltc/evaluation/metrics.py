"""The exact per-token reverse KL of a student to its teacher on the student's own samples, over the full
vocabulary and a chunk of positions at a time, and the release prefix it can be restricted to.
"""

from __future__ import annotations

import contextlib

import torch

from ..generation import Rollouts, sample_completions
from ..signals import OutputHead, last_hidden_state, shared_heads, shared_vocab_size

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
def token_reverse_kl(
    student,
    teacher,
    rollouts: Rollouts,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Per-token reverse KL `KL(pS || pT)` in nats, exact over the vocabulary: `[B, C]` float64, aligned to
    `rollouts.completion_ids`, 0 outside `rollouts.completion_mask`.

    Args:
        student, teacher: causal LMs (or PEFT models) sharing a tokenizer; they may sit on different devices. Output
            heads padded to different sizes are compared over the token ids both have (`trl_ltc.signals.shared_heads`).
        rollouts: prompts and completions (`trl_ltc.generation.Rollouts`).
        chunk_size: positions projected to the vocabulary at a time (default: about 16M logits per chunk).
        temperature: both distributions are taken at this temperature (logits / temperature).
        batch_size: rollouts run through the backbones at a time (default: all of them at once).
    """
    head_s, head_t = shared_heads(OutputHead.of(student), OutputHead.of(teacher))
    vocab = head_s.weight.shape[0]
    completion_ids = rollouts.completion_ids[rollouts.completion_mask.bool()]
    if completion_ids.numel() and int(completion_ids.max()) >= vocab:
        raise ValueError(
            f"A completion holds token id {int(completion_ids.max())}, but the two output heads share only ids below "
            f"{vocab} (the student's head has {OutputHead.of(student).weight.shape[0]} rows, the teacher's "
            f"{OutputHead.of(teacher).weight.shape[0]}); the KL compares the two distributions over one shared "
            "vocabulary."
        )
    chunk_size = chunk_size or max(1, _LOGITS_PER_CHUNK // vocab)
    rows = rollouts.prompt_ids.shape[0]
    batch_size = batch_size or max(rows, 1)
    out = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float64)
    with _eval_mode(student, teacher):
        for start in range(0, rows, batch_size):
            batch = Rollouts(*(x[start : start + batch_size] for x in rollouts))
            mask = batch.full_completion_mask[:, 1:].bool()  # position t predicts token t + 1
            hidden_s = _completion_hidden(student, batch, mask).to(head_s.weight.device)
            hidden_t = _completion_hidden(teacher, batch, mask).to(head_t.weight.device)
            values = []
            for first in range(0, hidden_s.shape[0], chunk_size):
                chunk = slice(first, first + chunk_size)
                logp_s = torch.log_softmax(head_s.logits(hidden_s[chunk], temperature, torch.float32), dim=-1)
                logp_t = torch.log_softmax(head_t.logits(hidden_t[chunk], temperature, torch.float32), dim=-1)
                values.append((logp_s.exp() * (logp_s - logp_t.to(logp_s.device))).sum(dim=-1).double().cpu())
            block = out[start : start + batch_size]
            if values:
                block[batch.completion_mask.bool()] = torch.cat(values)
    return out


def reverse_kl(
    student,
    teacher,
    rollouts: Rollouts,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> float:
    """Mean per-token reverse KL `KL(pS || pT)` in nats over the completion tokens of `rollouts`, exact over the
    vocabulary (`token_reverse_kl`, every completion token counted once)."""
    mask = rollouts.completion_mask.bool()
    if not mask.any():
        raise ValueError("The rollouts have no completion tokens: there is nothing to measure the KL on.")
    kl = token_reverse_kl(student, teacher, rollouts, chunk_size, temperature, batch_size)
    return float(kl[mask].mean())


@torch.no_grad()
def release_prefix_mask(
    student,
    teacher,
    tokenizer,
    rollouts: Rollouts,
    top_k: int = 10,
    segmentation: str = "nltk",
    segment_window: int = 64,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """`[B, C]` bool: the completion tokens `supervision="release"` would keep on these rollouts (the prefix before
    the accepted change point of the teacher margin, or the whole completion), computed with the trainer's functions
    (`token_signals`, `segment_completions`, `supervision_weights`)."""
    from ..segmentation import segment_completions
    from ..signals import token_signals
    from ..supervision import supervision_weights

    rows = rollouts.prompt_ids.shape[0]
    batch_size = batch_size or max(rows, 1)
    keep = torch.zeros(rollouts.completion_ids.shape, dtype=torch.bool)
    device = student.get_input_embeddings().weight.device
    with _eval_mode(student, teacher):
        for start in range(0, rows, batch_size):
            batch = Rollouts(*(x[start : start + batch_size] for x in rollouts))
            full = (batch.input_ids, batch.attention_mask, batch.full_completion_mask)
            signals = token_signals(student, teacher, *(x.to(device) for x in full), top_k, temperature)
            margins = signals.margins[:, batch.prompt_ids.shape[1] :].cpu()
            segments = segment_completions(
                batch.completion_ids, batch.completion_mask, tokenizer, segmentation, segment_window
            )
            weights = supervision_weights(
                "release", batch.completion_mask.float(), segment_ids=segments, margins=margins
            ).weights
            keep[start : start + batch_size] = weights > 0
    return keep


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
    vocab_size = shared_vocab_size(student, teacher)
    rollouts = student_rollouts(
        student, tokenizer, prompts, max_new_tokens, batch_size, seed, temperature, progress, vocab_size=vocab_size
    )
    return reverse_kl(
        student, teacher, rollouts, chunk_size=chunk_size, temperature=temperature, batch_size=batch_size
    )


def student_rollouts(
    student,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int | None = 0,
    temperature: float = 1.0,
    progress: bool = True,
    do_sample: bool = True,
    vocab_size: int | None = None,
) -> Rollouts:
    """`sample_completions` in eval mode (no dropout), seeded, with the global random state restored afterwards;
    `do_sample=False` decodes greedily; `vocab_size` limits the sampled ids (see `sample_completions`)."""
    with torch.random.fork_rng(), _eval_mode(student):
        return sample_completions(
            student,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size=batch_size,
            temperature=temperature,
            do_sample=do_sample,
            seed=seed,
            progress=progress,
            vocab_size=vocab_size,
        )
