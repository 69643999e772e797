"""Loading held-out problems and any checkpoint (base model, full fine-tune or LoRA adapter) for evaluation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


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
