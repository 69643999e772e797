"""The lab bench: a teacher/student pair trained from scratch on a synthetic multi-step task, offline, on a CPU.

The task is a running sum modulo 10. A prompt names `n` digits by letters; the completion adds them one per line,
each line restating the running sum, the next digit and their sum, then states the answer:

    prompt:      a4 b7 c2 d9\\n
    completion:  a:4\\n b:4+7=1\\n c:1+2=3\\n d:3+9=2\\n answer:2\\n<EOS>      (one line per step, shown on one row)

Every step is checkable, every line is a segment (`segmentation="newline"`), and a chain of `n` digits gives `n + 1`
segments and `8 n + 5` completion tokens (one token per character) before the EOS. In-domain chains have 14-20 digits (117-165
tokens); the out-of-domain variant has the same lengths with every digit in 5-9 (every step carries).

`prepare_lab_pair` builds, once into the trl-ltc cache, a character-level tokenizer and two Llama-style models
trained from random weights with next-token cross-entropy on correct solutions: a teacher (3 layers, hidden 128, 1500
steps) trained to high accuracy, and a smaller student (2 layers, hidden 128) stopped as soon as its greedy accuracy
on held-aside problems reaches 30%, part-way up its learning curve: it has the format and most of the skill, and makes
enough mistakes per trajectory for the teacher to correct. Nothing comes from the Hub and
nothing in the data is made unteachable on purpose: wherever the teacher's feedback fades along a trajectory, it is
because the student's own samples took it there.

`FADE_PAIR` is the positive control for the release rule: the same task, prompts and student (the default pair's
student folder, reused), and a teacher of the same shape trained on solutions whose result digit is uniformly random
on every line after step `fade_after` (`faded_solution`): the next line restates that random value, so copying stays
exact and only the late result digits become unpredictable. Its feedback is informative up to step `fade_after` and
flat over the ten digits after it, by construction (`fade_profile` measures it line by line).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PAIR",
    "FADE_PAIR",
    "LAB_PRESETS",
    "LAB_TASK",
    "LabPair",
    "build_tokenizer",
    "fade_profile",
    "faded_solution",
    "lab_dataset_path",
    "make_problem",
    "prepare_lab_pair",
    "solution",
]

LAB_TASK = "running_sum_mod10"
IN_DOMAIN = (14, 20)  # chain lengths (digits) of the training and held-out prompts
# Out of domain: the same chain lengths with every digit in 5-9, so every step carries. (Length does not transfer:
# trained on 14-20 digits, the teacher solves 10-13% of 21-26-digit chains and 0-6% of 4-13-digit ones, greedy.)
OUT_OF_DOMAIN_DIGITS = (5, 6, 7, 8, 9)
LETTERS = string.ascii_lowercase
DIGITS = tuple(range(10))
# split: (chain lengths, seed, problems, digit pool)
SPLITS = {
    "train": (IN_DOMAIN, 0, 4096, DIGITS),
    "test": (IN_DOMAIN, 1, 512, DIGITS),
    "ood": (IN_DOMAIN, 2, 512, OUT_OF_DOMAIN_DIGITS),
}
VALID = (IN_DOMAIN, 3, 64, DIGITS)  # problems that decide when a model's pre-training stops (never evaluated on)


def make_problem(rng: random.Random, length: int, digits: tuple[int, ...] = DIGITS) -> dict:
    """A random problem of `length` digits: `{"prompt": "a4 b7 ...\\n", "answer": "2", "digits": [...]}`."""
    if not 2 <= length <= len(LETTERS):
        raise ValueError(f"`length` must be in [2, {len(LETTERS)}]; got {length}.")
    digits = [pool[rng.randrange(len(pool))] for pool in [digits] for _ in range(length)]
    prompt = " ".join(f"{LETTERS[i]}{d}" for i, d in enumerate(digits)) + "\n"
    return {"prompt": prompt, "answer": str(sum(digits) % 10), "digits": digits}


def solution(digits: list[int]) -> str:
    """The correct completion text (without EOS): one line per step, then the answer line."""
    total = digits[0]
    lines = [f"a:{total}"]
    for letter, digit in zip(LETTERS[1:], digits[1:]):
        lines.append(f"{letter}:{total}+{digit}={(total + digit) % 10}")
        total = (total + digit) % 10
    lines.append(f"answer:{total}")
    return "\n".join(lines) + "\n"


def faded_solution(digits: list[int], fade_after: int, rng: random.Random) -> str:
    """`solution` with the result digit of every line after step `fade_after` (step `i` is line `i`: line 0 states the
    first digit, line `i` adds digit `i`) replaced by a uniformly random digit from `rng`. Each later line restates
    that random value as its running sum, and the answer line states the last one, so every token but the late result
    digits stays a function of the text before it: a model trained on these completions copies exactly and is
    flat over the ten digits at the late result positions only.

        faded_solution([4, 7, 2, 9], 1, rng) -> "a:4\nb:4+7=1\nc:1+2=8\nd:8+9=5\nanswer:5\n"   (8, 5: random)
    """
    if fade_after < 0:
        raise ValueError(f"`fade_after` must be >= 0; got {fade_after}.")
    total = digits[0]
    lines = [f"a:{total}"]
    for step, (letter, digit) in enumerate(zip(LETTERS[1:], digits[1:]), start=1):
        result = (total + digit) % 10 if step <= fade_after else rng.randrange(10)
        lines.append(f"{letter}:{total}+{digit}={result}")
        total = result
    lines.append(f"answer:{total}")
    return "\n".join(lines) + "\n"


def build_tokenizer():
    """The task's `PreTrainedTokenizerFast`: one token per character, except that a letter directly followed by a
    digit (`c2`, the prompt's named digits) is one token, and ChatML specials.

    With named digits as single tokens, finding the digit of line `c` is one attention hop from the letter to the
    token that carries it; character by character it needs an induction circuit, which small models learn late and
    at a seed-dependent step."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .testing import CHAT_TEMPLATE, SPECIAL_TOKENS

    alphabet = sorted(set(string.ascii_lowercase + string.digits + " :+=\n"))
    named = [letter + digit for letter in LETTERS for digit in string.digits]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet, *named])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[0]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[a-z][0-9]|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, padding_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def problems(split: str, count: int | None = None) -> list[dict]:
    """The fixed problems of a split (`train`, `test`, `ood` or `valid`), seeded: the same on every machine."""
    (low, high), seed, default, pool = VALID if split == "valid" else SPLITS[split]
    rng = random.Random(f"{LAB_TASK}-{split}-{seed}")
    return [make_problem(rng, rng.randint(low, high), pool) for _ in range(count or default)]


def lab_dataset_path(split: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A JSON-lines file of the split's prompts and answers (`{"prompt", "answer"}`), written once into the cache."""
    from .embedded import cache_root

    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(SPLITS)}; got {split!r}.")
    path = cache_root(cache_dir) / "lab" / f"{LAB_TASK}_{split}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as file:
            file.writelines(
                json.dumps({"prompt": problem["prompt"], "answer": problem["answer"]}) + "\n"
                for problem in problems(split)
            )
        tmp.replace(path)
    return str(path)


@dataclass
class LabModel:
    """How one model of the pair is built and trained from scratch."""

    hidden_size: int
    num_layers: int
    steps: int  # at most this many steps of batch_size fresh problems
    seed: int
    batch_size: int = 32
    learning_rate: float = 1e-3  # 3e-3 leaves small models on the copy-only plateau (loss ~0.5) for 800+ steps
    # Stop as soon as the greedy accuracy on the `valid` problems reaches this (checked every `eval_every` steps):
    # a student stopped part-way, at a measured skill, whatever the seed's learning curve.
    target_accuracy: float | None = None
    eval_every: int = 5  # the skill arrives abruptly: 8% to 91% within 25 steps has been seen
    # Train on `faded_solution(digits, fade_after, ...)` instead of `solution`: the positive control's teacher.
    fade_after: int | None = None


@dataclass
class LabPair:
    teacher: LabModel
    student: LabModel
    # Reuse the student of this pair (its folder `<cache>/lab/<student_pair.key>/student`, built there if missing)
    # instead of training one under this pair's key: pairs that differ only in the teacher share one student.
    student_pair: LabPair | None = None

    def __post_init__(self):
        if self.student_pair is not None and self.student_pair.student != self.student:
            raise ValueError("`student` must be the student of `student_pair`, whose folder this pair reuses.")

    @property
    def key(self) -> str:
        """A folder name that changes with every setting of the pair."""

        def name(m: LabModel) -> str:
            target = "" if m.target_accuracy is None else f"a{m.target_accuracy:g}e{m.eval_every}"
            fade = "" if m.fade_after is None else f"-fade{m.fade_after}"
            shape = f"{m.num_layers}x{m.hidden_size}-{m.steps}s{m.batch_size}b{m.learning_rate:g}lr"
            return f"{shape}{target}-{m.seed}{fade}"

        return f"{LAB_TASK}-t{name(self.teacher)}-s{name(self.student)}"


DEFAULT_PAIR = LabPair(
    teacher=LabModel(128, 3, 1500, seed=0), student=LabModel(128, 2, 800, seed=1, target_accuracy=0.3)
)
# `trl-ltc compare --smoke`: the same pipeline in seconds (the models learn little).
SMOKE_PAIR = LabPair(
    teacher=LabModel(32, 1, 4, seed=0, batch_size=8), student=LabModel(32, 1, 2, seed=1, batch_size=8)
)
# The positive control: the default teacher's shape, seed, data order and schedule, trained on `faded_solution` with
# random result digits after step 8 (of 13-19 steps: the fade starts at line 9 of 15-21, about the middle), and the
# default pair's student, reused as it is.
FADE_AFTER = 8
FADE_PAIR = LabPair(
    teacher=LabModel(128, 3, 1500, seed=0, fade_after=FADE_AFTER),
    student=DEFAULT_PAIR.student,
    student_pair=DEFAULT_PAIR,
)
SMOKE_FADE_PAIR = LabPair(
    teacher=LabModel(32, 1, 4, seed=0, batch_size=8, fade_after=2), student=SMOKE_PAIR.student, student_pair=SMOKE_PAIR
)
# `preset:` of a comparison config -> (the pair, its `--smoke` stand-in).
LAB_PRESETS = {"lab": (DEFAULT_PAIR, SMOKE_PAIR), "lab_fade": (FADE_PAIR, SMOKE_FADE_PAIR)}


def _model(tokenizer, spec: LabModel):
    """A Llama-style decoder (Granite with every multiplier neutral, attention scaled by `1/sqrt(head_dim)`).

    Granite, not Qwen2 or Llama: for those model types `AutoTokenizer` rebuilds the tokenizer with its own
    pre-tokenizer and would drop the task's spaces and newlines; for Granite it loads the saved one as it is."""
    from transformers import AutoConfig, AutoModelForCausalLM

    heads = 4
    config = AutoConfig.for_model(
        "granite",
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=4 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        attention_multiplier=(spec.hidden_size // heads) ** -0.5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batch(
    tokenizer, rng: random.Random, size: int, fade_after: int | None = None, fade_rng: random.Random | None = None
):
    """Teacher-forcing batch of fresh in-domain problems: prompt tokens are not trained on. With `fade_after`, the
    targets are `faded_solution`s (random late result digits drawn from `fade_rng`; the problems, drawn from `rng`,
    are the same as without)."""
    rows, labels = [], []
    for _ in range(size):
        p = make_problem(rng, rng.randint(*IN_DOMAIN))
        prompt = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        text = solution(p["digits"]) if fade_after is None else faded_solution(p["digits"], fade_after, fade_rng)
        target = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, lab


def greedy_accuracy(model, tokenizer, items: list[dict], batch_size: int = 64) -> float:
    """Share of `items` (`problems(...)`) whose greedy completion states the right answer."""
    from .evaluation import answer_is_correct
    from .generation import sample_completions

    max_new_tokens = 8 * max(len(p["digits"]) for p in items) + 16
    rollouts = sample_completions(
        model, tokenizer, [p["prompt"] for p in items], max_new_tokens, batch_size, do_sample=False, progress=False
    )
    texts = tokenizer.batch_decode(
        [ids[mask.bool()] for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask)],
        skip_special_tokens=True,
    )
    return sum(answer_is_correct(t, p["answer"], "statement") for t, p in zip(texts, items)) / len(items)


def train_from_scratch(model, tokenizer, spec: LabModel, progress: bool = True) -> tuple:
    """Next-token cross-entropy on correct solutions of fresh problems, AdamW with warmup and cosine decay; stops
    early at `spec.target_accuracy`. Returns `(model, steps trained, greedy accuracy on the valid problems)`."""
    from tqdm.auto import tqdm

    rng = random.Random(f"{LAB_TASK}-pretrain-{spec.seed}")
    fade_rng = random.Random(f"{LAB_TASK}-fade-{spec.seed}")  # its own stream: the problems stay those of `rng`
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, spec.steps) / spec.steps)),
    )
    valid, accuracy, step = problems("valid"), None, 0
    # Once the loss is near 0, gradients and Adam's moments go subnormal, which CPUs compute many times slower.
    flush = torch.set_flush_denormal(True)
    bar = tqdm(range(spec.steps), desc=f"Training a {spec.num_layers}x{spec.hidden_size} model", disable=not progress)
    for step in range(1, spec.steps + 1):
        model.train()
        ids, mask, labels = _batch(tokenizer, rng, spec.batch_size, spec.fade_after, fade_rng)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=accuracy)
        if spec.target_accuracy is not None and step % spec.eval_every == 0:
            accuracy = greedy_accuracy(model.eval(), tokenizer, valid)
            if accuracy >= spec.target_accuracy:
                break
    bar.close()
    model.eval()
    accuracy = greedy_accuracy(model, tokenizer, valid)
    if flush:
        torch.set_flush_denormal(False)
    return model, step, accuracy


def prepare_lab_pair(
    cache_dir: str | os.PathLike | None = None,
    pair: LabPair = DEFAULT_PAIR,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[str, str]:
    """Build (once) and return `(teacher_dir, student_dir)` of the lab pair: model folders with the tokenizer.

    They live in `<cache>/lab/<pair.key>/` (or under `directory`); each folder is published atomically, so a folder
    that exists is complete and a second call returns at once. `teacher.json` and `student.json` next to them record
    how each was built and how long its training took. A pair with a `student_pair` takes its student from
    `<cache>/lab/<student_pair.key>/student` (trained there, once, if it is missing; the teacher is trained first,
    so a concurrent build of that pair has time to publish it); under `directory`, both models live there.
    """
    from .embedded import cache_root

    root = Path(directory) if directory is not None else cache_root(cache_dir) / "lab" / pair.key
    student_root = root
    if pair.student_pair is not None and directory is None:
        student_root = cache_root(cache_dir) / "lab" / pair.student_pair.key
    tokenizer = build_tokenizer()
    teacher_dir = _prepare_model(root, "teacher", pair.teacher, tokenizer, progress)
    student_dir = _prepare_model(student_root, "student", pair.student, tokenizer, progress)
    return str(teacher_dir), str(student_dir)


def _prepare_model(root: Path, name: str, spec: LabModel, tokenizer, progress: bool) -> Path:
    """`root/name`: the model of `spec`, trained from scratch and published atomically unless it exists; its record
    in `root/name.json`. An existing folder whose record disagrees with `spec` is an error, not a silent reuse."""
    from .embedded import _publish

    path = root / name
    root.mkdir(parents=True, exist_ok=True)
    record_path = root / f"{name}.json"
    if path.is_dir():
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            # records written before a field existed lack it: compare the fields both have
            differ = {k: (record[k], v) for k, v in asdict(spec).items() if k in record and record[k] != v}
            if differ:
                raise ValueError(f"{path} was built with other settings ({differ}: (built, wanted)).")
        return path
    logger.info("Training the lab %s from scratch (one time): %s", name, path)
    start = time.perf_counter()
    model, steps, accuracy = train_from_scratch(_model(tokenizer, spec), tokenizer, spec, progress)
    seconds = time.perf_counter() - start
    logger.info("Lab %s: %d steps, greedy accuracy %.2f on the valid problems", name, steps, accuracy)

    def save(out: str) -> None:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    _publish(save, path)
    record = {"task": LAB_TASK, "seconds": round(seconds, 1), "steps_trained": steps, "valid_accuracy": accuracy}
    record |= asdict(spec)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return path


@torch.no_grad()
def fade_profile(teacher, student, tokenizer, items: list[dict], top_k: int = 10) -> dict:
    """Line by line, how informative the teacher is on the correct solutions of `items` (`problems(...)`), teacher
    forced: for each step `i` (line `i`; the answer line apart), means over the problems that have it of

    - `result_entropy`: the teacher's entropy (nats, full vocabulary) at the line's result digit (`log 10` = 2.30 is
      flat over the digits);
    - `result_margin`: the teacher margin (formula 4, on the student's top-`top_k`) at that digit;
    - `result_logprob`: the teacher's log-prob of the correct digit there (`log 0.1` = -2.30 is chance);
    - `line_margin`: the mean teacher margin over all the line's tokens and its newline (what a segment score sees).

    Returns `{"step": [0, 1, ...], <those four>: [...], "count": [...], "answer": {<the four>}}`.
    """
    from .release import teacher_margin

    sums: dict[int | str, dict[str, float]] = {}
    for item in items:
        text = solution(item["digits"])
        prompt = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(completion) != len(text):
            raise ValueError("the lab tokenizer must give one token per completion character.")
        ids = torch.tensor([prompt + completion])
        # logits at position p predict token p + 1: keep those that predict completion tokens
        t_logits = teacher(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        s_logits = student(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logprobs = torch.log_softmax(t_logits, -1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        margin = teacher_margin(s_logits, t_logits, top_k)
        start, lines = 0, text.splitlines(keepends=True)
        for index, line in enumerate(lines):
            digit = start + line.rindex("\n") - 1  # every line ends with its result digit, then a newline
            key = "answer" if index == len(lines) - 1 else index
            row = sums.setdefault(key, dict.fromkeys(("result_entropy", "result_margin", "result_logprob"), 0.0))
            row["result_entropy"] = row["result_entropy"] + entropy[digit].item()
            row["result_margin"] = row["result_margin"] + margin[digit].item()
            row["result_logprob"] = row["result_logprob"] + logprobs[digit, completion[digit]].item()
            row["line_margin"] = row.get("line_margin", 0.0) + margin[start : start + len(line)].mean().item()
            row["count"] = row.get("count", 0) + 1
            start += len(line)
    fields = ("result_entropy", "result_margin", "result_logprob", "line_margin")
    steps = sorted(k for k in sums if k != "answer")
    profile = {"step": steps, **{f: [sums[i][f] / sums[i]["count"] for i in steps] for f in fields}}
    profile["count"] = [sums[i]["count"] for i in steps]
    profile["answer"] = {f: sums["answer"][f] / sums["answer"]["count"] for f in fields}
    return profile
