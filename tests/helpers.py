"""Offline test fixtures: a byte-level BPE tokenizer trained in-process and tiny random causal LMs."""

from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = CORPUS if corpus_seed == 0 else [text[::-1] for text in CORPUS]  # another corpus, other merges
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 400, corpus_seed: int = 0):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with a ChatML template, built without any download.

    ``corpus_seed`` other than 0 trains on another corpus: same size, different tokens.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, corpus_seed)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(vocab_size: int, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, dtype=torch.float32):
    """A tiny random Qwen2-style causal LM (2 layers, hidden 64)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
