"""Offline test fixtures: a byte-level BPE tokenizer trained in-process and tiny random causal LMs."""

from __future__ import annotations

import functools

import torch

from trl_ltc.testing import tiny_causal_lm, train_bpe, wrap_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was not amused!",
    "Dr. Smith paid $3.50 for 2 apples. Then he left at 5 p.m. sharp.",
    "Let x = 3. Then 2x + 1 = 7, so the answer is 7.",
    "First, add the numbers.\nSecond, divide by two.\nFinally, report the result.",
    "def f(x):\n    return x * 2  # doubles x\n",
    "We compute $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$. Is that right? Yes.",
    "東京は日本の首都です。富士山は高い。",
    "Emoji test 🙂🚀 done. Another sentence follows here.",
    "How many apples does Tom have? Tom has 12 apples. He gives away 5, so 7 remain.",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int, corpus_seed: int) -> str:
    corpus = CORPUS if corpus_seed == 0 else [text[::-1] for text in CORPUS]  # another corpus, other merges
    return train_bpe(corpus * 4, vocab_size).to_str()


def make_tokenizer(vocab_size: int = 400, corpus_seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a ChatML template, built without any download.

    ``corpus_seed`` other than 0 trains on another corpus: same size, different tokens.
    """
    return wrap_tokenizer(_tokenizer_json(vocab_size, corpus_seed))


def make_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, dtype=torch.float32):
    """A tiny random Qwen2-style causal LM (2 layers, hidden 64)."""
    return tiny_causal_lm(vocab_size, seed, hidden_size, num_layers, dtype, max_position_embeddings=1024)


def padded_copy(model, extra_rows: int = 16):
    """A copy of `model` whose embedding matrix and output head have `extra_rows` more rows after the same ones, as
    checkpoints that pad their vocabulary to a multiple of 64 or 128 have."""
    import copy

    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + extra_rows)
    return padded
