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
) -> Rollouts:
    """Sample one completion per prompt from `model`, in batches, with a progress bar.

    Completions are cut after the first EOS (kept, as in `trl.DistillationTrainer`); `seed` makes sampling
    reproducible.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    prompt_ids = tokenize_prompts(tokenizer, prompts)
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
        )[:, ids.shape[1] :].cpu()
        for row in out:
            is_eos = torch.isin(row, torch.tensor(stop))
            end = int(is_eos.int().argmax()) + 1 if is_eos.any() else row.numel()
            completion_rows.append(row[:end])
        prompt_rows.extend(batch)
    prompt_mask = pad([torch.ones_like(t) for t in prompt_rows], padding_value=0, padding_side="left")
    completion_mask = pad([torch.ones_like(t) for t in completion_rows], padding_value=0, padding_side="right")
    return Rollouts(
        pad(prompt_rows, padding_value=pad_id, padding_side="left"),
        prompt_mask,
        pad(completion_rows, padding_value=pad_id, padding_side="right"),
        completion_mask,
    )
