"""`evaluate_model`: one model's reverse KL, answer accuracy and completion length on held-out problems."""

from __future__ import annotations

import math
import statistics
import time

import torch

from ..generation import Rollouts, eos_ids
from ..signals import shared_vocab_size
from .grading import answer_is_correct
from .metrics import release_prefix_mask, student_rollouts, token_reverse_kl

METRICS_FILE = "eval_metrics.json"


def evaluate_model(
    model,
    teacher,
    tokenizer,
    prompts: list,
    answers: list | None = None,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int | None = 0,
    answer_type: str = "math",
    chunk_size: int | None = None,
    progress: bool = True,
    rollouts: Rollouts | None = None,
    do_sample: bool = True,
    release: dict | None = None,
) -> dict:
    """Sample `num_samples` completions per problem from `model` (seeded) and measure them.

    Args:
        model: the causal LM (or PEFT model) to evaluate.
        teacher: the reference for the reverse KL, sharing `tokenizer`'s vocabulary; `None` skips the KL.
        tokenizer: the model's tokenizer (prompts are rendered with its chat template when conversational).
        prompts: text prompts or conversations, one per problem.
        answers: the reference answer of each problem; `None` skips the accuracy.
        num_samples: completions per problem; the accuracy is pass@1 estimated from them (avg@num_samples).
        max_new_tokens, temperature: sampling (and KL) settings; completions stop at the first EOS.
        batch_size: completions sampled and scored at a time.
        seed: sampling seed; the global random state is restored afterwards.
        answer_type: `"math"` or `"choice"` (`answer_is_correct`).
        chunk_size: positions projected to the vocabulary at a time for the KL.
        progress: show a progress bar while sampling.
        rollouts: already sampled completions of the repeated prompts (skips the sampling), e.g. from vLLM.
        do_sample: `False` decodes greedily (then `num_samples` must be 1).
        release: `release_prefix_mask` settings (`top_k`, `segmentation`, `segment_window`): also measure the reverse
            KL on the tokens `supervision="release"` would keep (`reverse_kl_prefix`) and their share
            (`release_prefix_frac`). Needs `teacher`.

    Returns:
        A dict: `reverse_kl` (mean per-token KL(model || teacher) in nats over all sampled completion tokens, or
        `None`), with `release`: `reverse_kl_prefix` and `release_prefix_frac`, `accuracy` (in [0, 1], or `None`),
        `accuracy_stderr` (standard error over problems), `completion_length` (mean tokens, EOS included),
        `truncated_frac` (completions without EOS), `num_problems`, `num_samples`, `seconds`, and `samples`: one
        `{"problem", "completion", "length", "correct"}` per completion, problem-major.
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts; give one answer per prompt.")
    if not prompts:
        raise ValueError("No problems to evaluate on.")
    if not do_sample and num_samples != 1:
        raise ValueError(
            f"Greedy decoding (`do_sample=False`) gives one completion per problem; got num_samples={num_samples}."
        )
    start = time.perf_counter()
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]
    if rollouts is None:
        vocab_size = shared_vocab_size(model, teacher) if teacher is not None else None
        rollouts = student_rollouts(
            model, tokenizer, repeated, max_new_tokens, batch_size, seed, temperature, progress, do_sample, vocab_size
        )
    elif rollouts.completion_ids.shape[0] != len(repeated):
        raise ValueError(f"{rollouts.completion_ids.shape[0]} rollouts for {len(repeated)} (problem, sample) pairs.")
    mask = rollouts.completion_mask.bool()
    lengths = mask.sum(1)
    stop = torch.tensor(eos_ids(model, tokenizer))
    last = rollouts.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    ended = (lengths > 0) & torch.isin(last, stop)
    texts = [tokenizer.decode(ids[row], skip_special_tokens=True) for ids, row in zip(rollouts.completion_ids, mask)]
    correct = None
    if answers is not None:
        correct = [answer_is_correct(text, answers[i // num_samples], answer_type) for i, text in enumerate(texts)]
    kl = kl_prefix = prefix_frac = None
    if teacher is not None and int(lengths.sum()) > 0:
        token_kl = token_reverse_kl(model, teacher, rollouts, chunk_size, temperature, batch_size)
        kl = float(token_kl[mask].mean())
        if release is not None:
            keep = release_prefix_mask(
                model, teacher, tokenizer, rollouts, temperature=temperature, batch_size=batch_size, **release
            ) & mask
            kl_prefix = float(token_kl[keep].mean()) if keep.any() else None
            prefix_frac = float(keep.sum() / mask.sum())
    metrics = {
        "reverse_kl": kl,
        **({"reverse_kl_prefix": kl_prefix, "release_prefix_frac": prefix_frac} if release is not None else {}),
        "accuracy": None,
        "accuracy_stderr": None,
        "completion_length": float(lengths.float().mean()),
        "truncated_frac": float((~ended).float().mean()),
        "num_problems": len(prompts),
        "num_samples": num_samples,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if correct is not None:
        per_problem = [statistics.fmean(correct[i : i + num_samples]) for i in range(0, len(correct), num_samples)]
        metrics["accuracy"] = statistics.fmean(per_problem)
        if len(per_problem) > 1:
            metrics["accuracy_stderr"] = statistics.stdev(per_problem) / math.sqrt(len(per_problem))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    verdicts = correct if correct is not None else [None] * len(texts)
    metrics["samples"] = [
        {"problem": i // num_samples, "completion": text, "length": int(n), "correct": verdict}
        for i, (text, n, verdict) in enumerate(zip(texts, lengths.tolist(), verdicts))
    ]
    return metrics
