"""Offline building blocks for tests, benchmarks and examples: nothing is downloaded.

- [`train_bpe`] trains a byte-level BPE tokenizer in-process on a list of texts;
- [`wrap_tokenizer`] turns it into a `PreTrainedTokenizerFast` with a ChatML chat template (`<|im_end|>` is
  the EOS token, `<|endoftext|>` pads, on the left);
- [`tiny_causal_lm`] builds a random Qwen2-style causal LM (2 layers, hidden 64 by default, untied head).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "tiny_causal_lm", "train_bpe", "wrap_tokenizer"]


def train_bpe(corpus: Iterable[str], vocab_size: int, exact: bool = False):
    """A byte-level BPE `tokenizers.Tokenizer` with :data:`SPECIAL_TOKENS`, trained on `corpus`.

    BPE stops early when the corpus has no more merges; `exact=True` then appends `<filler_i>` tokens so that
    the vocabulary has exactly `vocab_size` entries.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    missing = vocab_size - tokenizer.get_vocab_size(with_added_tokens=True)
    if exact and missing > 0:
        tokenizer.add_tokens([f"<filler_{i}>" for i in range(missing)])
    return tokenizer


def wrap_tokenizer(tokenizer):
    """`PreTrainedTokenizerFast` over a `tokenizers.Tokenizer` (or its JSON string) with the ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, str):
        tokenizer = Tokenizer.from_str(tokenizer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_causal_lm(
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int = 2048,
):
    """A random Qwen2-style causal LM in eval mode, its weights drawn from `torch.manual_seed(seed)`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
