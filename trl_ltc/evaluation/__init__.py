"""Evaluating a student against its teacher: divergence on its own samples, answer accuracy, completion length.

`reverse_kl` is the mean, over the completion tokens of some rollouts, of the exact per-token reverse KL

    KL(pS || pT)(x, y_<t) = sum_v pS(v | x, y_<t) * (log pS(v | x, y_<t) - log pT(v | x, y_<t))

over the full vocabulary, the quantity on-policy distillation minimises. Logits are projected from each model's last
hidden states a chunk of positions at a time (`trl_ltc.signals.OutputHead`), so no `(batch, length, vocab)` tensor is
built. `heldout_reverse_kl` samples the rollouts from the student first (`trl_ltc.generation.sample_completions`).

`evaluate_model` samples `num_samples` completions per held-out problem once and measures on them: the reverse KL,
the answer accuracy (pass@1, the mean over problems of the fraction of correct samples, checked by
`answer_is_correct`), the mean completion length and the fraction of completions cut at the length cap.

`answer_is_correct` uses the `math-verify` package: it extracts the completion's final answer (a `\\boxed{}` or
`$...$` answer or an "answer is ..." statement first, else the last number or expression of the text) and compares it
with the reference answer mathematically (`12` = `12.0` = `$\\frac{24}{2}$`, `0.75` = `3/4`). Multiple-choice sets
(`answer_type="choice"`) compare the chosen letter instead (`choice_letter`).

`trl-ltc evaluate` (`main`) runs `evaluate_model` on any checkpoint (a base model, a full fine-tune or a LoRA adapter
directory) and prints and saves the metrics. Everything here works with any causal LM, or a PEFT model wrapping one,
and leaves the models' train/eval modes as they found them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import threading
import time
from pathlib import Path

import torch

from ..generation import Rollouts, eos_ids, sample_completions
from ..signals import OutputHead, last_hidden_state, shared_heads, shared_vocab_size

__all__ = [
    "ANSWER_TYPES",
    "answer_is_correct",
    "choice_letter",
    "evaluate_model",
    "heldout_reverse_kl",
    "load_eval_problems",
    "load_for_evaluation",
    "release_prefix_mask",
    "reverse_kl",
    "student_rollouts",
    "token_reverse_kl",
]

ANSWER_TYPES = ("math", "choice", "statement")
METRICS_FILE = "eval_metrics.json"

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


# ---------------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------------

# Multiple choice: the letter of "answer is (C)" / "Answer: C" / "\boxed{C}" (the last such statement wins), else the
# last parenthesised letter "(C)". A bare capital letter elsewhere is not taken: "A train leaves..." is no answer.
_CHOICE_PATTERNS = (
    re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
    re.compile(r"[Aa]nswer\s*(?:is|:)?\s*(?:option|choice)?\s*[:\-]?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-J])\)"),
)


def choice_letter(text: str) -> str | None:
    """The chosen option letter (`A`-`J`) of a multiple-choice completion, or `None`.

    The first of these that occurs decides, and within it the last occurrence: a `\\boxed{C}` answer; an "answer is C",
    "Answer: (C)" or "answer: **C**" statement; a parenthesised letter "(C)".
    """
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


# `answer_type="statement"`: the rest of the line after the last "answer:".
_STATEMENT = re.compile(r"answer:([^\n]*)")


def _timeout() -> int | None:
    # math-verify bounds parsing and comparison with SIGALRM, which exists only in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def answer_is_correct(completion: str, answer, answer_type: str = "math") -> bool:
    """Whether the final answer of `completion` equals the reference `answer`.

    `answer_type="math"`: `math-verify` extracts the completion's final answer (a `\\boxed{}` or `$...$` answer or an
    "answer is ..." statement first, else the last number or expression) and checks it against `answer` (a number or
    a LaTeX expression, with or without `$`) mathematically: `12`, `12.0`, `$12$`, `1,200` = `1200`, `3/4` = `0.75`.
    `answer_type="choice"`: the option letter of `choice_letter(completion)` equals `answer` (a letter, any case).
    `answer_type="statement"`: the text after the last `answer:` on its line equals `answer` exactly (after stripping
    spaces); nothing else of the completion is parsed (the lab bench's task, `trl_ltc.lab`).
    """
    if answer_type == "choice":
        letter = choice_letter(completion)
        return letter is not None and letter.upper() == str(answer).strip().upper()
    if answer_type == "statement":
        found = _STATEMENT.findall(completion)
        return bool(found) and found[-1].strip() == str(answer).strip()
    if answer_type != "math":
        raise ValueError(f"`answer_type` must be one of {', '.join(map(repr, ANSWER_TYPES))}; got {answer_type!r}.")
    from math_verify import parse, verify

    gold_text = str(answer).strip()
    timeout = _timeout()
    delimited = gold_text if ("$" in gold_text or "\\boxed" in gold_text) else f"${gold_text}$"
    gold = parse(delimited, parsing_timeout=timeout) or parse(gold_text, parsing_timeout=timeout) or [gold_text]
    prediction = parse(completion, parsing_timeout=timeout)
    if not prediction:
        return False
    return bool(verify(gold, prediction, timeout_seconds=timeout))


# ---------------------------------------------------------------------------------------------------------------
# Metrics of one model on held-out problems
# ---------------------------------------------------------------------------------------------------------------


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
        `None`), with `release`: `reverse_kl_prefix` and `release_prefix_frac`, `accuracy` (in [0, 1], or `None`), `accuracy_stderr` (standard error over problems),
        `completion_length` (mean tokens, EOS included), `truncated_frac` (completions without EOS),
        `num_problems`, `num_samples`, `seconds`, and `samples`: one `{"problem", "completion", "length", "correct"}`
        per completion, problem-major.
    """
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts; give one answer per prompt.")
    if not prompts:
        raise ValueError("No problems to evaluate on.")
    if not do_sample and num_samples != 1:
        raise ValueError(f"Greedy decoding (`do_sample=False`) gives one completion per problem; got num_samples={num_samples}.")
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


def load_eval_problems(
    dataset: str,
    split: str = "train",
    config: str | None = None,
    prompt_column: str = "prompt",
    answer_column: str | None = "answer",
    prompt_as_chat: bool = False,
    num_problems: int | None = None,
    prompt_template: str | None = None,
) -> tuple[list, list | None]:
    """`(prompts, answers)` of the first `num_problems` rows (all when `None`) of a dataset split.

    `dataset` is what `trl_ltc.prompts.load_prompt_dataset` reads (a local .json/.jsonl/.parquet/.csv file, a
    `save_to_disk` directory or a `datasets` name). `prompt_column` is read like the trainer reads prompts (text or
    messages). `prompt_template` (e.g. `"{prompt}\n\nPut your final answer within \\boxed{}."`: `{prompt}` is replaced
    by the text) is applied to text prompts first; `prompt_as_chat` then wraps them into a user message.
    `answer_column=None` gives no answers.
    """
    from ..prompts import PROMPT_COLUMN, load_prompt_dataset, prepare_prompt_dataset

    if num_problems is not None and num_problems < 1:
        raise ValueError(f"`num_problems` must be >= 1 (or unset for all); got {num_problems}.")
    rows = load_prompt_dataset(dataset, config, split=split)
    if answer_column is not None and answer_column not in rows.column_names:
        raise ValueError(
            f"Dataset {dataset!r} has no answer column {answer_column!r}; found columns {rows.column_names}. Set the "
            "answer column (`--answer_column` / `answer_column:`) to the column holding the reference answers."
        )
    answer_values = rows[answer_column] if answer_column is not None else None
    rows = prepare_prompt_dataset(rows, dataset, prompt_column, as_chat=False)
    n = len(rows) if num_problems is None else min(num_problems, len(rows))
    prompts = rows.select(range(n))[PROMPT_COLUMN]
    if prompt_template is not None:
        if "{prompt}" not in prompt_template:
            raise ValueError(f"`prompt_template` must contain '{{prompt}}'; got {prompt_template!r}.")
        prompts = [prompt_template.replace("{prompt}", p) if isinstance(p, str) else p for p in prompts]
    if prompt_as_chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    answers = None if answer_values is None else [str(a) for a in answer_values[:n]]
    return prompts, answers


# ---------------------------------------------------------------------------------------------------------------
# Loading any checkpoint
# ---------------------------------------------------------------------------------------------------------------


def resolve_device_dtype(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`device` (default: cuda when available, else cpu) and `dtype` (`"auto"`: bfloat16 on a CUDA device that
    supports it, else float32; or `"float32"`, `"bfloat16"`, `"float16"`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16 else torch.float32
    return device, getattr(torch, dtype)


def load_for_evaluation(path: str, base_model: str | None = None, dtype=torch.float32, device="cpu"):
    """`(model, tokenizer)` of a model directory or id, a full fine-tune, or a LoRA (PEFT) adapter directory.

    An adapter directory (one with `adapter_config.json`) is loaded on top of `base_model`, by default the base model
    its config names (`base_model_name_or_path`). The tokenizer comes from `path` when it has one, else from the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(os.path.expanduser(path))
    adapter = local.is_dir() and (local / "adapter_config.json").is_file()
    if not adapter:
        if base_model is not None:
            raise ValueError(f"--base_model is only for LoRA adapter directories; {path} has no adapter_config.json.")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(device).eval(), AutoTokenizer.from_pretrained(path)
    from peft import PeftModel

    config = json.loads((local / "adapter_config.json").read_text())
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The adapter {path} does not name its base model; pass --base_model.")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(local))
    has_tokenizer = (local / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(local) if has_tokenizer else base)
    return model.to(device).eval(), tokenizer


def __getattr__(name):  # the command line, now in `trl_ltc.commands.evaluate`
    if name in ('build_parser', 'format_metrics', 'main'):
        from ..commands import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


