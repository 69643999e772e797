"""Sampling student rollouts outside the trainer (diagnostics, evaluation), the way the trainer samples them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from trl.data_utils import is_conversational
from trl.trainer.utils import pad


class Rollouts(NamedTuple):
    """Prompts (left-padded) and sampled completions (right-padded, masked after the first EOS, which is kept)."""

    prompt_ids: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def full_completion_mask(self) -> torch.Tensor:
        """The completion mask aligned to `input_ids` (zeros over the prompt)."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)


def tokenize_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of standard (text) or conversational (messages) prompts, with the generation prompt appended."""
    if prompts and is_conversational({"prompt": prompts[0]}):
        return [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
            for p in prompts
        ]
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id, *ids} - {None})


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 1.0,
    do_sample: bool = True,
    seed: int | None = 0,
    progress: bool = True,
    vocab_size: int | None = None,
) -> Rollouts:
    """Sample one completion per prompt from `model`, in batches, with a progress bar.

    Completions are cut after the first EOS (kept, as in `trl.DistillationTrainer`); `seed` makes sampling
    reproducible. With `vocab_size`, only token ids below it are sampled: the rows of a padded output head beyond the
    ids a teacher's head also has are suppressed.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    rows = model.get_output_embeddings().weight.shape[0]
    suppress = list(range(vocab_size, rows)) if vocab_size is not None and vocab_size < rows else None
    prompt_rows, completion_rows = [], []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="Sampling", disable=not progress):
        batch = [torch.tensor(ids) for ids in prompt_ids[start : start + batch_size]]
        ids = pad(batch, padding_value=pad_id, padding_side="left").to(device)
        mask = pad([torch.ones_like(t) for t in batch], padding_value=0, padding_side="left").to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=1.0,
            top_k=0,
            pad_token_id=pad_id,
            eos_token_id=stop,
            suppress_tokens=suppress,
        )[:, ids.shape[1] :].cpu()
        completion_rows += [_cut_after_eos(row, stop) for row in out]
        prompt_rows.extend(batch)
    return _to_rollouts(prompt_rows, completion_rows, pad_id)


def _cut_after_eos(row: torch.Tensor, stop: list[int]) -> torch.Tensor:
    is_eos = torch.isin(row, torch.tensor(stop, dtype=row.dtype))
    end = int(is_eos.int().argmax()) + 1 if is_eos.any() else row.numel()
    return row[:end]


def _to_rollouts(prompt_rows: list[torch.Tensor], completion_rows: list[torch.Tensor], pad_id: int) -> Rollouts:
    prompt_mask = pad([torch.ones_like(t) for t in prompt_rows], padding_value=0, padding_side="left")
    completion_mask = pad([torch.ones_like(t) for t in completion_rows], padding_value=0, padding_side="right")
    return Rollouts(
        pad(prompt_rows, padding_value=pad_id, padding_side="left"),
        prompt_mask,
        pad(completion_rows, padding_value=pad_id, padding_side="right"),
        completion_mask,
    )


def sample_completions_vllm(
    model_path: str,
    tokenizer,
    prompts: list,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int | None = 0,
    llm_kwargs: dict | None = None,
    progress: bool = True,
) -> Rollouts:
    """`sample_completions` with vLLM (GPU): one completion per prompt from the model folder `model_path`, or from a
    LoRA adapter folder (one with `adapter_config.json`) on top of the base model it names.

    The engine is created for this call (`vllm.LLM(model, seed=seed, **llm_kwargs)`, e.g. `gpu_memory_utilization`,
    `tensor_parallel_size`, `max_model_len`) and released afterwards. Sampling is plain (`top_p=1`, no top-k) at
    `temperature`, stops at the model's EOS ids, and the EOS is kept, as in `sample_completions`.
    """
    import gc
    import json
    import os

    from vllm import LLM, SamplingParams

    adapter_config = os.path.join(model_path, "adapter_config.json")
    lora = None
    kwargs = {"seed": seed if seed is not None else 0, **(llm_kwargs or {})}
    if os.path.isfile(adapter_config):
        from vllm.lora.request import LoRARequest

        with open(adapter_config, encoding="utf-8") as file:
            adapter = json.load(file)
        base = adapter["base_model_name_or_path"]
        kwargs.update(enable_lora=True, max_lora_rank=max(int(adapter.get("r", 16)), kwargs.get("max_lora_rank", 0)))
        lora = LoRARequest("trl-ltc-eval", 1, model_path)
    else:
        base = model_path
    llm = LLM(model=base, **kwargs)
    try:
        from transformers import GenerationConfig

        try:
            generation_eos = GenerationConfig.from_pretrained(base).eos_token_id
        except OSError:
            generation_eos = None
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        stop = sorted({tokenizer.eos_token_id, *(generation_eos or [])} - {None})
        # No per-request seed: repeated prompts must draw different samples; the engine's `seed` fixes the stream.
        params = SamplingParams(
            n=1, temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, stop_token_ids=stop
        )
        prompt_ids = tokenize_prompts(tokenizer, prompts)
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = llm.generate(requests, params, lora_request=lora, use_tqdm=progress)
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    completion_rows = []
    for output in outputs:
        sample = output.outputs[0]
        ids = list(sample.token_ids)
        if sample.finish_reason == "stop" and not set(ids) & set(stop):
            # vLLM may leave the stop token out of `token_ids`; the trainer's completions keep it.
            ids.append(sample.stop_reason if isinstance(sample.stop_reason, int) else stop[0])
        completion_rows.append(_cut_after_eos(torch.tensor(ids, dtype=torch.long), stop))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _to_rollouts([torch.tensor(ids) for ids in prompt_ids], completion_rows, pad_id)
