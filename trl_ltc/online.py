"""Online release (DESIGN.md formula 9): stop generating a trajectory once the release rule has released it.

`generate_online` samples completions in blocks of `check_tokens` new tokens. After each block the teacher
scores the new tokens (its KV cache is kept between blocks, so each token is scored once), giving the teacher
margin on the student's top-K at every new position (formula 4) and the teacher's log-prob of the sampled token;
both are returned with the rollout (`OnlineRollout.teacher_logprobs`, `.margins`), so the training step can use
them instead of scoring the kept tokens again (`trl_ltc.signals.TeacherScores`). The completions so far are segmented
(`segment_completions`), their segment scores computed (formula 5), and `trl_ltc.release.online_release`
decides on those scores which trajectories stop. A stopped trajectory keeps segments `0..tau-1`; what it generated
after them is dropped. The rows still running go on to the next block; the others leave both models' caches.

Two block generators are provided:

- `TransformersBlocks`: `model.generate` for `check_tokens` tokens at a time, continuing from its own KV
  cache; the student's top-K comes from the raw logits of the same steps (`output_logits`), so it costs no extra
  forward pass. Its memory holds one block of `[rows, V]` logits per new token.
- `VLLMBlocks` (GPU, only where vLLM is installed): TRL's `VLLMGeneration` continues the unfinished
  sequences from their text so far, `check_tokens` at a time; the student's top-K comes from a forward pass of the
  training student over the new tokens, with its own KV cache.

Stopping happens at block boundaries: a stopped trajectory has generated up to `check_tokens - 1` tokens past the
point where its decision became possible.
"""

from __future__ import annotations

import copy
import time
from typing import NamedTuple

import torch
from trl.extras.profiling import profiling_context
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .release import (
    DEFAULT_PERMUTATIONS,
    LOG_PROB_FLOOR,
    bic_change_point,
    online_release,
    segment_scores,
    support_margin,
)
from .segmentation import segment_completions
from .signals import _LOGITS_PER_CHUNK, OutputHead, _check_finite
from .supervision import gather_stats

__all__ = [
    "CachedForward",
    "TeacherBlocks",
    "OnlineRollout",
    "TransformersBlocks",
    "VLLMBlocks",
    "check_online_support",
    "gather_step_stats",
    "generate_online",
    "log_rollout",
    "rollout_batch_fields",
    "trainer_rollout",
]


class OnlineRollout(NamedTuple):
    """Completions sampled under the online release rule, one entry per prompt."""

    completion_ids: list[list[int]]
    """The completion that goes into the batch: up to and including EOS, or the kept prefix of a stopped row."""
    generated_ids: list[list[int]]
    """Every token the student generated (up to and including EOS); longer than the completion for stopped rows."""
    stopped: torch.Tensor
    """`[B]` bool: stopped early by the online rule."""
    stop_segment: torch.Tensor
    """`[B]` long: complete segments at the stop (formula 9); the final number of segments when not stopped."""
    release_segment: torch.Tensor
    """`[B]` long: kept segments `tau` of a stopped row; the offline change point of the others."""
    bic_gain: torch.Tensor
    """`[B]` float: the BIC gain of the change point that stopped the row (0 when not stopped)."""
    teacher_time: float
    """Seconds spent scoring blocks with the teacher (forward pass and margins)."""
    teacher_logprobs: torch.Tensor | None = None
    """`[B, T]` float: `log pT(y_t)` of each completion token at the training temperature, floored at
    `log(1e-12)` as in `trl_ltc.signals`; aligned to `completion_ids` (`T` = the longest generated row), 0 past each
    completion."""
    margins: torch.Tensor | None = None
    """`[B, T]` float: the teacher margin on the student's top-K (formula 4) at each completion token, aligned and
    padded like `teacher_logprobs`."""
    teacher_positions: int | None = None
    """Completion positions the teacher scored over all blocks (`compute/teacher_tokens`): each generated token once
    with a KV cache; a scorer with `rescores = True` (a served teacher) scores the completion so far at every block."""
    teacher_forward_tokens: int | None = None
    """Tokens the teacher's forward passes processed (prompts included), for `compute/flops`."""


def _backbone(model):
    """The transformer body of a causal LM (or of a PEFT model wrapping one), returning hidden states."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


class CachedForward:
    """Hidden states of one model for the newest tokens of growing sequences, reusing its KV cache.

    Each call feeds the tokens the cache has not seen, except the last one (its prediction is not needed yet), and
    returns the hidden states that predict the last `num_new` tokens. Rows can be dropped between calls.
    """

    def __init__(self, model):
        self.model = model
        self.device = model.get_output_embeddings().weight.device
        self.cache = None
        self.cached = 0

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, num_new: int) -> torch.Tensor:
        length = ids.shape[1]
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = _backbone(self.model)(
            input_ids=ids[:, self.cached : length - 1],
            attention_mask=mask[:, : length - 1],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache, self.cached = out.past_key_values, length - 1
        return out.last_hidden_state[:, -num_new:]

    def keep(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder_cache(rows.to(self.device))


def _project(hidden: torch.Tensor, head: OutputHead, temperature: float, chunk_size: int | None, reduce):
    """`reduce(logits, start)` over chunks of `hidden` `[n, H]`, concatenated (one chunk of logits at a time)."""
    chunk_size = chunk_size or max(1, _LOGITS_PER_CHUNK // head.weight.shape[0])
    parts = [
        reduce(head.logits(hidden[start : start + chunk_size], temperature, hidden.dtype), start)
        for start in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else None


class TransformersBlocks:
    """Student blocks from `model.generate`, continuing from its KV cache; top-K from the raw step logits (over the
    first `vocab_size` token ids, when given: the ids the teacher's head also has)."""

    def __init__(self, model, generation_config, top_k: int, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size
        self.config = copy.deepcopy(generation_config)
        self.config.return_dict_in_generate = True
        self.config.output_logits = True  # unprocessed logits: the top-K the training forward sees
        self.config.cache_implementation = None  # a dynamic cache, so rows can be dropped and blocks appended
        self.top_k = top_k
        self.cache = None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, num_new: int):
        self.config.max_new_tokens = num_new
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, past_key_values=self.cache, generation_config=self.config
        )
        self.cache = out.past_key_values
        support = torch.stack([x[:, : self.vocab_size].topk(self.top_k, dim=-1).indices for x in out.logits], dim=1)
        return out.sequences[:, ids.shape[1] :], support

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows.to(self.model.device))


class VLLMBlocks:
    """Student blocks from TRL's `VLLMGeneration` (GPU, vLLM installed), continuing each unfinished sequence.

    vLLM generates `num_new` more tokens for each row from its tokens so far (prompt and completion, without
    padding); the student's top-K at the new positions comes from the training student's own forward pass over
    them, with a KV cache kept across blocks. Needs `vllm_mode="colocate"` with `vllm_tensor_parallel_size=1`
    (each process generates its own rows, whose number differs between processes). The top-K is over the first
    `vocab_size` token ids, when given.
    """

    def __init__(
        self,
        vllm_generation,
        student,
        top_k: int,
        pad_token_id: int,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
    ):
        self.vllm = vllm_generation
        self.student = CachedForward(student)
        self.head = OutputHead.of(student).truncated(vocab_size)
        self.top_k, self.pad_token_id, self.chunk_size = top_k, pad_token_id, chunk_size

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, num_new: int):
        prompts = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), mask.cpu())]
        limit = self.vllm.max_completion_length
        self.vllm.max_completion_length = num_new
        try:
            _, completions, _, _ = self.vllm.generate(prompts=prompts, images=None, num_generations=1)
        finally:
            self.vllm.max_completion_length = limit
        new = pad([torch.tensor(c, dtype=torch.long) for c in completions], padding_value=self.pad_token_id)
        new = new.to(ids.device)
        hidden = self.student(torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), new.shape[1])
        support = _project(
            hidden.reshape(-1, hidden.shape[-1]), self.head, 1.0, self.chunk_size,
            lambda logits, _: logits.topk(self.top_k, dim=-1).indices,
        )  # fmt: skip
        return new, support.view(*new.shape, self.top_k)

    def keep(self, rows: torch.Tensor) -> None:
        self.student.keep(rows)


class TeacherBlocks:
    """A local teacher's scores of each new block, through its KV cache: `score_block` returns `[A, n, 2]`, the
    margin on the student's top-K (formula 4) and `log pT(y_t)` at each new position (0 after EOS)."""

    def __init__(
        self, teacher, temperature: float = 1.0, chunk_size: int | None = None, vocab_size: int | None = None
    ):
        self.forward, self.head = CachedForward(teacher), OutputHead.of(teacher).truncated(vocab_size)
        self.temperature, self.chunk_size = temperature, chunk_size

    def score_block(self, ids, mask, new, valid, support) -> torch.Tensor:
        hidden = self.forward(ids, mask, new.shape[1])
        on = valid.to(hidden.device)
        support, targets = support.to(hidden.device)[on], new.to(hidden.device)[on]

        def score(logits, at):  # margin and log pT(y_t) of one chunk of positions: `[n, 2]`
            logprobs, part = torch.log_softmax(logits, -1), slice(at, at + logits.shape[0])
            sampled = logprobs.gather(-1, targets[part, None]).squeeze(-1)
            return torch.stack([support_margin(logprobs, support[part]), sampled], -1)

        block = torch.zeros(*valid.shape, 2, device=hidden.device)
        block[on] = _project(hidden[on], self.head, self.temperature, self.chunk_size, score)
        _check_finite(block[..., 1][on], "teacher", allow_neg_inf=True)
        block[..., 1].clamp_(min=LOG_PROB_FLOOR).masked_fill_(~on, 0.0)
        return block

    def keep(self, rows: torch.Tensor) -> None:
        self.forward.keep(rows)


@torch.no_grad()
def generate_online(
    blocks,
    teacher,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids,
    pad_token_id: int,
    check_tokens: int,
    temperature: float = 1.0,
    segmentation: str = "nltk",
    segment_window: int = 64,
    min_segments: int = 3,
    patience: int = 2,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    alpha: float | None = None,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> OnlineRollout:
    """Sample one completion per prompt and stop each trajectory once the online release rule says so.

    Args:
        blocks: a block generator (`TransformersBlocks` or `VLLMBlocks`): `blocks(ids, mask, n)`
            returns the next (up to) `n` tokens `[A, n']` of every row, padded after EOS, and the student's
            top-K ids `[A, n', K]` at those positions; `blocks.keep(rows)` drops the other rows.
        teacher: the teacher causal LM (scores each new token once, through its KV cache: the margin and the
            log-prob of the sampled token, returned in `OnlineRollout.margins` and `.teacher_logprobs`), or an object
            with the methods of `TeacherBlocks` (`score_block`, `keep`), e.g. a served teacher's
            (`trl_ltc.teacher_server.ServedTeacherBlocks`).
        tokenizer: for the segmentation.
        input_ids, attention_mask: `[B, P]` left-padded prompts.
        max_new_tokens: the completion length limit.
        eos_token_ids: ids that end a completion (kept in it).
        pad_token_id: fills finished rows.
        check_tokens: new tokens per block.
        temperature: teacher log-softmax temperature (the training temperature).
        segmentation, segment_window: as in `TeachabilityGKDConfig`.
        min_segments, patience, alpha, num_permutations: of `trl_ltc.release.online_release`.
        seed: with `alpha`, every decision's shuffles come from `torch.Generator().manual_seed(seed)`, so the rule
            decides on a trajectory as a replay on its recorded scores with the same seed does.
        chunk_size: positions projected to the vocabulary at a time.
        vocab_size: the teacher's distribution is taken over the first `vocab_size` token ids (those both models'
            output heads have, when they are padded to different sizes); default: all its rows.
    """
    batch, device = input_ids.shape[0], input_ids.device
    eos = torch.tensor(sorted(set(eos_token_ids)), device=device)
    tokens = input_ids.new_full((batch, max_new_tokens), pad_token_id)
    margins = torch.zeros(batch, max_new_tokens, device=device)
    teacher_logprobs = torch.zeros(batch, max_new_tokens, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)  # tokens up to and including EOS
    kept = torch.full((batch,), -1, dtype=torch.long, device=device)  # kept prefix length of stopped rows
    stop_segment = torch.zeros(batch, dtype=torch.long, device=device)
    release_segment = torch.zeros(batch, dtype=torch.long, device=device)
    bic_gain = torch.zeros(batch, device=device)
    local = not hasattr(teacher, "score_block")  # a model, not a block scorer
    scorer = TeacherBlocks(teacher, temperature, chunk_size, vocab_size) if local else teacher
    teacher_time = 0.0
    rows, ids, mask, done = torch.arange(batch, device=device), input_ids, attention_mask, 0
    prompt_lengths = attention_mask.sum(1).to(device)
    rescores = getattr(scorer, "rescores", False)  # scores prompt + completion so far at every block, no cache
    scored, forward_tokens = 0, 0 if rescores else int(prompt_lengths.sum())

    while rows.numel() and done < max_new_tokens:
        new, support = blocks(ids, mask, min(check_tokens, max_new_tokens - done))
        width = new.shape[1]
        if width == 0:
            break
        is_eos = torch.isin(new, eos)
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), width)
        valid = torch.arange(width, device=device) <= first_eos[:, None]
        ids, mask = torch.cat([ids, new], 1), torch.cat([mask, valid.to(mask.dtype)], 1)

        start = time.perf_counter()
        block = scorer.score_block(ids, mask, new, valid, support)
        teacher_time += time.perf_counter() - start

        tokens[rows, done : done + width] = new
        margins[rows, done : done + width] = block[..., 0].to(device)
        teacher_logprobs[rows, done : done + width] = block[..., 1].to(device)
        lengths[rows] += valid.sum(1)
        done += width
        scored += int(lengths[rows].sum()) if rescores else int(valid.sum())
        forward_tokens += int((prompt_lengths[rows] + lengths[rows]).sum()) if rescores else int(valid.sum())

        # The decision of formula 9 on the segments so far: the last one is still open unless the row ended.
        so_far = torch.arange(done, device=device) < lengths[rows, None]
        segment_ids = segment_completions(tokens[rows, :done], so_far, tokenizer, segmentation, segment_window)
        segment_ids = segment_ids.to(device)
        scores, num_segments = segment_scores(margins[rows, :done], segment_ids)
        shuffles = None if alpha is None else torch.Generator().manual_seed(seed)
        decision = online_release(scores, num_segments, min_segments, patience, alpha, num_permutations, shuffles)
        stop = decision.stop_segment < num_segments
        ended = (first_eos < width) | (done >= max_new_tokens)
        stop_segment[rows] = decision.stop_segment
        release_segment[rows] = decision.release_segment
        if stop.any():
            stopped_rows = rows[stop]
            keep = (segment_ids >= 0) & (segment_ids < decision.release_segment[:, None])
            kept[stopped_rows] = keep.sum(1)[stop]
            bic_gain[stopped_rows] = bic_change_point(scores, decision.stop_segment).bic_gain[stop].float()

        running = (~stop & ~ended).nonzero().squeeze(1)
        if running.numel() < rows.numel():
            blocks.keep(running)
            scorer.keep(running)
            rows, ids, mask = rows[running], ids[running], mask[running]

    stopped = kept >= 0
    final = torch.where(stopped, kept, lengths)
    beyond = torch.arange(done, device=device) >= final[:, None]  # the dropped suffix of stopped rows, padding
    scores = [x[:, :done].masked_fill(beyond, 0.0).cpu() for x in (teacher_logprobs, margins)]
    final, lengths = final.tolist(), lengths.tolist()
    tokens = tokens.cpu()
    return OnlineRollout(
        completion_ids=[tokens[b, : final[b]].tolist() for b in range(batch)],
        generated_ids=[tokens[b, : lengths[b]].tolist() for b in range(batch)],
        stopped=stopped.cpu(),
        stop_segment=stop_segment.cpu(),
        release_segment=release_segment.cpu(),
        bic_gain=bic_gain.cpu(),
        teacher_time=teacher_time,
        teacher_logprobs=scores[0],
        margins=scores[1],
        teacher_positions=scored,
        teacher_forward_tokens=forward_tokens,
    )


# The trainer's side: `TeachabilityGKDTrainer` calls these with itself; they read its `spec`, models and generation
# settings (the parent's `generation_kwargs`, `generation_config`, `vllm_generation`, `eos_token_ids`).


def check_online_support(trainer) -> None:
    """Refuse the setups where the processes' blocks would have to be synchronised, naming the fix."""
    args, fix = trainer.args, "or set `rollout_truncation='none'`"
    unsupported = [
        (bool(trainer.tools), f"tool calling (multi-turn generation); drop `tools` {fix}"),
        (trainer._is_vlm, f"vision-language models; use a text model {fix}"),
        (
            trainer._dist.is_fsdp or trainer._dist.is_zero3,
            "FSDP or DeepSpeed ZeRO-3: each process stops its own rows, so the sharded models' blocks would have "
            f"to be synchronised across processes; use DDP or ZeRO-1/2 {fix}",
        ),
        (
            trainer.use_vllm and (args.vllm_mode != "colocate" or args.vllm_tensor_parallel_size != 1),
            "vLLM in server mode or with tensor parallelism (processes generate different numbers of rows per "
            f"block); use `vllm_mode='colocate'` with `vllm_tensor_parallel_size=1` {fix}",
        ),
    ]
    for failed, message in unsupported:
        if failed:
            raise ValueError(f"`rollout_truncation='online'` does not support {message}.")


def trainer_rollout(trainer, prompt_ids: list[list[int]]) -> OnlineRollout:
    """`generate_online` for the prompts of one generation batch, with the trainer's student, teacher and settings.

    The prompts are left-padded and the student unwrapped for generation as in the parent's `_generate_single_turn`
    (vLLM weights synced once per step); the blocks are `VLLMBlocks` with vLLM, `TransformersBlocks` otherwise.
    """
    args, spec, pad_id = trainer.args, trainer.spec, trainer._tokenizer.pad_token_id
    generator = trainer.release_generator  # with `release_alpha`: one seed per rollout for the rule's shuffles
    prompts = [torch.tensor(ids) for ids in prompt_ids]
    input_ids = pad(prompts, pad_id, "left", trainer.pad_to_multiple_of).to(trainer.accelerator.device)
    attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", trainer.pad_to_multiple_of)
    attention_mask = attention_mask.to(trainer.accelerator.device)
    if getattr(trainer, "teacher_server", None) is not None:  # a served teacher scores the blocks
        teacher = trainer.teacher_server.blocks(input_ids, attention_mask, trainer.vocab_size)
    else:
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model).eval()
    if trainer.use_vllm and trainer.state.global_step != trainer._last_loaded_step:
        with profiling_context(trainer, "sync_weights"):
            trainer.vllm_generation.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step
    with (
        profiling_context(trainer, "online_release.generate"),
        unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as student,
        torch.no_grad(),
    ):
        if trainer.use_vllm:
            blocks = VLLMBlocks(
                trainer.vllm_generation, student, spec.release_top_k, pad_id, args.signal_chunk_size,
                trainer.vocab_size,
            )  # fmt: skip
        else:
            blocks = TransformersBlocks(student, trainer.generation_config, spec.release_top_k, trainer.vocab_size)
        return generate_online(
            blocks,
            teacher,
            trainer._tokenizer,
            input_ids,
            attention_mask,
            max_new_tokens=trainer.max_completion_length,
            eos_token_ids=trainer.eos_token_ids,
            pad_token_id=pad_id,
            check_tokens=spec.online_check_tokens,
            temperature=trainer.temperature,
            segmentation=spec.segmentation,
            segment_window=spec.segment_window,
            min_segments=spec.online_min_segments,
            patience=spec.online_patience,
            chunk_size=args.signal_chunk_size,
            vocab_size=trainer.vocab_size,
            alpha=spec.release_alpha,
            num_permutations=spec.release_permutations,
            seed=0 if spec.release_alpha is None else int(torch.randint(2**31 - 1, (1,), generator=generator)),
        )


def rollout_batch_fields(rollout: OnlineRollout, width: int, device) -> dict[str, torch.Tensor]:
    """The per-trajectory tensors of an online rollout that travel with the batch through the parent's shuffle and
    split: `online_stopped`, `online_bic_gain`, and the teacher's scores of the kept tokens padded like
    `completion_ids` to `width` (`online_teacher_logprobs`, `online_margins`), which the loss uses instead of a
    teacher forward. A rollout without scores leaves the loss to the teacher's forward."""
    fields = {"online_stopped": rollout.stopped, "online_bic_gain": rollout.bic_gain}
    if rollout.teacher_logprobs is not None and rollout.margins is not None:
        scores = {"online_teacher_logprobs": rollout.teacher_logprobs, "online_margins": rollout.margins}
        for name, values in scores.items():
            fields[name] = torch.nn.functional.pad(values[:, :width], (0, max(width - values.shape[1], 0)))
    return {name: value.to(device) for name, value in fields.items()}


def gather_step_stats(trainer, stats: dict, loss_teacher_seconds: float) -> dict[str, float]:
    """`gather_stats` of one micro-batch's supervision statistics, in one collective. With online release the seconds
    of the loss's teacher forward (where an online rollout's cached scores could not be used, e.g.
    `loss_type="parent"`) travel with them, averaged over processes, and are added to the
    `rollout/teacher_scoring_time` entry of the rollout this micro-batch came from."""
    if not trainer.spec.online:
        return gather_stats(stats, trainer.accelerator.gather)
    one = torch.ones((), device=trainer.accelerator.device)
    stats = {**stats, "rollout/loss_teacher_time": (one * loss_teacher_seconds, one)}
    totals = gather_stats(stats, trainer.accelerator.gather)
    seconds = totals.pop("rollout/loss_teacher_time")
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    if times := metrics.get("rollout/teacher_scoring_time"):
        times[-1] += seconds
    return totals

def log_rollout(trainer, generated: torch.Tensor, stopped: torch.Tensor | None = None, teacher_time: float = 0.0):
    """Append the rollout metrics of one generation batch, summed over processes, to the trainer's metrics.

    `rollout/generated_tokens`: completion tokens the student generated (with online truncation, including those
    generated past the kept prefix before the block ended). `rollout/truncated_frac`: fraction of trajectories
    stopped early. `rollout/saved_tokens_frac`: tokens not generated relative to the offline length estimate,
    `sum_stopped (L - n_b) / (sum_stopped L + sum_others n_b)` where `n_b` is the number of tokens a trajectory had
    generated when it stopped (or ended) and `L = max_completion_length` -- a stopped trajectory is counted as if
    it would have run to the length limit, so this is an upper bound on the true saving.
    `rollout/teacher_scoring_time`: seconds the teacher spent scoring blocks during generation (mean over
    processes); with `loss_type="parent"`, whose loss runs the teacher forward again, the trainer adds the time of
    that forward (`TeachabilityGKDTrainer.compute_loss`). The last three only with online truncation (`stopped`
    given).
    """
    online = stopped is not None
    stopped = torch.zeros_like(generated, dtype=torch.bool) if stopped is None else stopped.bool()
    limit = trainer.max_completion_length
    estimate = torch.where(stopped, limit, generated)
    sums = [generated.sum(), stopped.sum(), stopped.numel(), (estimate - generated).sum(), estimate.sum()]
    accelerator = trainer.accelerator
    local = torch.tensor([*map(float, sums), teacher_time], dtype=torch.float64, device=accelerator.device)
    total = accelerator.gather(local[None]).sum(0).tolist()
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    metrics["rollout/generated_tokens"].append(total[0])
    if online:
        metrics["rollout/truncated_frac"].append(total[1] / max(total[2], 1))
        metrics["rollout/saved_tokens_frac"].append(total[3] / max(total[4], 1))
        metrics["rollout/teacher_scoring_time"].append(total[5] / accelerator.num_processes)
