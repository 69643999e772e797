"""Throughput of ``trl_ltc.segmentation.segment_completions``.

Builds a realistic batch (default 64 completions x 1024 tokens of generated-looking English with numbers and LaTeX),
tokenized by a byte-level BPE tokenizer trained in-process (default vocab 8k), and reports:

* completion tokens / s for each method (``nltk``, ``newline``, ``fixed``);
* the time of NLTK's own sentence splitting (``span_tokenize``) on the same decoded texts alone, and the overhead
  ratio ``nltk method time / NLTK split-only time`` (target <= 1.5);
* targets for ``newline`` / ``fixed``: > 2M tokens/s.

Run: ``python benchmarks/segmentation.py [--batch 64] [--tokens 1024] [--vocab 8000] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from trl_ltc import segmentation
from trl_ltc.segmentation import segment_completions

_NAMES = ["Tom", "Alice", "Bob", "Maria", "the store", "the train", "each box", "the farmer", "Sam", "the class"]
_OBJECTS = [
    "apples",
    "marbles",
    "dollars",
    "pages",
    "cookies",
    "liters of water",
    "students",
    "minutes",
    "km",
    "cards",
]
_VERBS = ["has", "buys", "sells", "reads", "gives away", "collects", "loses", "needs", "finds", "shares"]
_CONNECT = ["So", "Then", "Therefore", "Next", "Now", "Hence", "Thus", "First", "Finally", "Also"]


_WORDS = (
    "the a of to and in is it that for on with as was be by this are or from at an but not have which one all were "
    "we when there can more if out so up said what about than into them only some could time two may then do first "
    "any my now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three number value total result answer equation "
    "solve compute check simplify substitute multiply divide subtract add remainder fraction ratio probability "
    "integer prime factor divisor multiple sum product difference square root triangle circle radius area perimeter "
    "angle degree length width height volume rate speed distance price cost profit discount percent average median "
    "function derivative integral limit sequence series term coefficient polynomial matrix vector inequality bound"
).split()
_SYLLABLES = "ka lo mi ne ra tu vo shi pel dor an ex ber tion ing qua zor lim pra ent ost ive ump".split()


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _filler(rng: random.Random) -> str:
    """A clause of common words mixed with rarer pseudo-words (names, jargon) to give BPE a realistic vocabulary."""
    words = [rng.choice(_WORDS) if rng.random() < 0.8 else _pseudo_word(rng) for _ in range(rng.randint(4, 14))]
    return " ".join(words)


def _sentence(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 12)
    kind = rng.randrange(16)
    if kind >= 13:
        text = _filler(rng)
        return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?", ":", ";", ","])
    if kind == 0:
        return f"{rng.choice(_NAMES).capitalize()} {rng.choice(_VERBS)} {a} {rng.choice(_OBJECTS)}."
    if kind == 1:
        return f"{rng.choice(_CONNECT)}, we compute ${a} \\times {b} = {a * b}$."
    if kind == 2:
        frac = f"$\\frac{{{a}}}{{{c}}} + \\frac{{{b}}}{{{c}}} = \\frac{{{a + b}}}{{{c}}}$"
        return f"We have {frac}, which simplifies nicely."
    if kind == 3:
        return f"Let $x = {a}$ and $y = {b}$; then $x + y = {a + b}$ and $x - y = {a - b}$."
    if kind == 4:
        return f"Is ${a}^2 = {a * a}$ correct? Yes, because ${a} \\cdot {a} = {a * a}$."
    if kind == 5:
        return f"\n\nStep {c}: {rng.choice(_CONNECT).lower()} divide {a * c} by {c} to get {a}."
    if kind == 6:
        return f"That is {a}.{b % 10} percent of the total, i.e. about {a / c:.2f} per item."
    if kind == 7:
        return f"{rng.choice(_CONNECT)} {rng.choice(_NAMES)} {rng.choice(_VERBS)} {b} more, so the total is {a + b}!"
    if kind == 8:
        return f"\\[ \\sum_{{i=1}}^{{{c}}} i = \\frac{{{c}({c}+1)}}{{2}} = {c * (c + 1) // 2} \\]"
    if kind == 9:
        return f"Dr. Smith says the answer is {a} mod {c} = {a % c}, not {b}."
    if kind == 10:
        return f"- {rng.choice(_NAMES).capitalize()}: {a} {rng.choice(_OBJECTS)}\n"
    if kind == 11:  # non-ASCII: exercises the multi-byte offset mapping
        sym = rng.choice(["×", "÷", "≈", "≤", "→", "π", "°", "√", "—", "✅", "🙂"])
        return f"So {a} {sym} {c} gives about {a * c} — the estimate holds {sym}."
    return f"The answer is $\\boxed{{{a + b - c}}}$."


def _completion(rng: random.Random, n_chars: int) -> str:
    parts: list[str] = []
    size = 0
    while size < n_chars:
        s = _sentence(rng)
        sep = "" if not parts or s.startswith("\n") or parts[-1].endswith("\n") else " "
        parts.append(sep + s)
        size += len(sep) + len(s)
    return "".join(parts)


def _train_tokenizer(corpus: list[str], vocab_size: int):
    from trl_ltc.testing import train_bpe, wrap_tokenizer

    return wrap_tokenizer(train_bpe(corpus, vocab_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    corpus = [_completion(rng, 2000) for _ in range(1000)]
    tokenizer = _train_tokenizer(corpus, args.vocab)
    print(f"tokenizer: byte-level BPE, vocab {len(tokenizer)} (trained in {time.perf_counter() - t0:.1f}s)")

    rows = []
    while len(rows) < args.batch:
        ids = tokenizer.encode(_completion(rng, args.tokens * 8))
        if len(ids) >= args.tokens:
            ids = ids[: args.tokens - 1] + [tokenizer.eos_token_id]
            rows.append(ids)
    # right-pad a few rows a bit to look like a real batch: the last 10% of rows lose up to 25% of their tokens
    completion_ids = torch.tensor(rows, dtype=torch.long)
    completion_mask = torch.ones_like(completion_ids)
    for b in range(int(args.batch * 0.9), args.batch):
        cut = args.tokens - rng.randint(1, args.tokens // 4)
        completion_mask[b, cut:] = 0
        completion_ids[b, cut:] = tokenizer.pad_token_id
    n_tokens = int(completion_mask.sum())
    print(f"batch: {args.batch} x {args.tokens}, {n_tokens} completion tokens")

    punkt = segmentation._punkt_tokenizer()
    params = "pretrained punkt_tab" if segmentation._punkt_tab_available() else "default parameters"
    print(f"punkt: {type(punkt).__name__} ({params})")

    # warm up (tokenizer table, caches)
    for method in ("nltk", "newline", "fixed"):
        segment_completions(completion_ids, completion_mask, tokenizer, method=method)

    texts = [
        tokenizer.decode(completion_ids[b][completion_mask[b].bool()].tolist(), skip_special_tokens=True)
        for b in range(args.batch)
    ]
    print(f"decoded text: {sum(map(len, texts)) / len(texts):.0f} chars / completion on average")

    def nltk_split_only():
        for text in texts:
            list(punkt.span_tokenize(text))

    # interleave the measurements so that machine noise hits all of them alike; report best and median
    fns = {"split": nltk_split_only}
    for method in ("nltk", "newline", "fixed"):
        fns[method] = lambda m=method: segment_completions(completion_ids, completion_mask, tokenizer, method=m)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    results = {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}
    split_best, split_med = results.pop("split")

    print()
    print(f"{'what':<28}{'best ms':>10}{'median ms':>11}{'tokens/s':>14}")
    split_row = f"{split_best * 1e3:>10.2f}{split_med * 1e3:>11.2f}{n_tokens / split_best:>14,.0f}"
    print(f"{'NLTK span_tokenize only':<28}{split_row}")
    for method, (best, med) in results.items():
        print(f"{'segment_completions ' + method:<28}{best * 1e3:>10.2f}{med * 1e3:>11.2f}{n_tokens / best:>14,.0f}")
    ratio = results["nltk"][0] / split_best
    print()
    verdict = "OK" if ratio <= 1.5 else "MISSED"
    print(f"nltk overhead ratio (nltk method / NLTK split only): {ratio:.3f}  (target <= 1.5: {verdict})")
    for method in ("newline", "fixed"):
        tps = n_tokens / results[method][0]
        print(f"{method} throughput: {tps / 1e6:.2f}M tokens/s  (target > 2M: {'OK' if tps > 2e6 else 'MISSED'})")


if __name__ == "__main__":
    main()
