"""`TeachabilityGKDTrainer`: `trl.DistillationTrainer` with the sampled-token OPD loss and teachability-aware weights."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import textwrap
import warnings

import torch
import trl.trainer.distillation_trainer as _distillation
from datasets import Dataset, IterableDataset
from transformers import AutoConfig, AutoTokenizer, ProcessorMixin
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DistillationTrainer
from trl.extras.profiling import profiling_context
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import (
    RepeatSampler,
    create_model_from_path,
    pad,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .config import TeachabilityGKDConfig
from .diagnostics import ReleaseDiagnosticsCallback, trajectory_records
from .online import OnlineRollout, TransformersBlocks, VLLMBlocks, generate_online
from .prompts import truncate_prompt_ids, validate_prompt_dataset
from .release import NULL_SEED_OFFSET
from .segmentation import segment_completions
from .signals import NON_FINITE_ADVICE, OutputHead, SignalsError, shared_heads, signals_from_hidden
from .supervision import (
    kept_fractions,
    permute_release_fractions,
    reduce_stats,
    supervision_stats,
    supervision_weights,
)

logger = logging.getLogger(__name__)


class TeachabilityGKDTrainer(DistillationTrainer):
    """On-policy distillation that supervises only where the teacher is still teachable.

    A drop-in replacement for `trl.DistillationTrainer` (same constructor, same generation, LoRA, accelerate, vLLM
    paths). The student samples completions; both models score them; the loss is the sampled-token OPD loss

        L = -sum_{b,t} w_bt * stopgrad(log pT(y_bt) - log pS(y_bt)) * log pS(y_bt) / N

    with `N` the completion tokens of the global batch (gradient-accumulation aware, as in the parent) and `w` the
    weights of `args.supervision` (`trl_ltc.supervision`). With `supervision="full"` its gradient is the
    score-function gradient of the per-token reverse KL estimator `sum(log pS(y) - log pT(y)) / N`. With
    `loss_type="parent"` the parent's generalized JSD is weighted per token by `w` instead.

    Args:
        model, teacher_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        quantization_config, peft_config, tools: as in `trl.DistillationTrainer`; `args` is a
            `TeachabilityGKDConfig`.
        teacher_processing_class (*optional*): the teacher's tokenizer, to check token by token that the two
            tokenizers agree (loaded from the teacher's local directory when not given and available; without it,
            the processing class is taken as the tokenizer of both). The two models' output heads may be padded to
            different sizes: the signals are then taken over the first `min(V_student, V_teacher)` token ids
            (`vocab_size`), which must hold every token of the tokenizer, and a padded student never samples its
            extra rows.

    Metrics (logged every `logging_steps`, summed over processes): `release/accepted_frac`,
    `release/accepted_frac_null` (the same change point on each trajectory's segment scores shuffled with
    `null_generator`, whose draws no weight depends on), `release/kept_token_frac`, `release/release_position`,
    `release/bic_gain`, `release/num_segments`, `margin/prefix_mean`, `margin/suffix_mean`, `advantage/mean`,
    `advantage/std`, and `teachability/*` with `supervision="token_teachability"`. Per generation batch (one
    optimizer step), summed over processes: `rollout/generated_tokens` (completion tokens the student generated,
    including any later dropped) and, with `rollout_truncation="online"`, `rollout/truncated_frac` (trajectories
    stopped early), `rollout/saved_tokens_frac` and `rollout/teacher_scoring_time` (see `_log_rollout`).

    With `supervision="random_release"` the release fractions are permuted across the whole generation batch of an
    optimizer step (all its micro-batches, all processes): see `_random_release_fractions`. This costs one extra
    no-grad forward of the student and the teacher over the generation batch per step.

    With `rollout_truncation="online"` the student generates in blocks of `online_check_tokens` tokens, the teacher
    scores each block, and a trajectory stops as soon as the online release rule (formula 9) releases it: the batch
    holds only its kept prefix, weighted 1 (`trl_ltc.online`). Supported with transformers generation on one process
    or DDP, and with vLLM in `vllm_mode="colocate"` with `vllm_tensor_parallel_size=1`; not with tools,
    vision-language models, FSDP or DeepSpeed ZeRO-3 (the blocks of each process would have to be synchronised).
    """

    _tag_names = ["trl", "distillation", "trl-ltc"]
    _name = "TeachabilityGKD"
    _paper = {
        "title": "Prefix Teach, Suffix Fade: Local Teachability Collapse in Strong-to-Weak On-Policy Distillation",
        "id": "2605.13643",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{prefixteach2026,
                title   = {{Prefix Teach, Suffix Fade: Local Teachability Collapse in Strong-to-Weak On-Policy Distillation}},
                journal = {arXiv preprint arXiv:2605.13643},
                year    = 2026,
            }"""),
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: TeachabilityGKDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        teacher_processing_class=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TeachabilityGKDConfig(f"{str(name).rstrip('/').split('/')[-1]}-TeachabilityGKD")
        elif not isinstance(args, TeachabilityGKDConfig):
            raise TypeError(
                f"`args` must be a `TeachabilityGKDConfig`, got {type(args).__name__}. Build one with the same "
                "fields: `TeachabilityGKDConfig(output_dir=..., ...)`."
            )
        if teacher_model is None:
            raise ValueError(_MISSING_TEACHER)
        # Cheap checks first: a wrong dataset or vocabulary fails in seconds, before two models are loaded.
        _check_datasets(train_dataset, eval_dataset)
        sizes = _check_vocabularies(model, teacher_model, processing_class, teacher_processing_class, args)
        with _parent_accepts_padded_heads(teacher_model, *sizes):
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
            )
        self.vocab_size = min(sizes)  # the token ids both output heads have: the signals are taken over these
        _check_tokenizer_fits(self._tokenizer, *sizes)  # when no tokenizer was at hand before loading
        _check_top_k(args, min(self.model.get_output_embeddings().weight.shape[0], self.vocab_size))
        if sizes[0] > self.vocab_size:
            self._suppress_padded_rows(sizes[0])
        if args.rollout_truncation == "online":
            self._check_online_support()
        self._online_rollout: OnlineRollout | None = None
        # Per-process draws (`token_score="random"`, and `random_release` on batches that did not come from generation)
        self.release_generator = torch.Generator().manual_seed(args.release_seed + self.accelerator.process_index)
        # The global `random_release` permutation: the same seed and the same draws on every process
        self.permutation_generator = torch.Generator().manual_seed(args.release_seed)
        # The shuffles of `release/accepted_frac_null`: per process, and apart from the draws that shape the weights
        self.null_generator = torch.Generator().manual_seed(
            args.release_seed + NULL_SEED_OFFSET + self.accelerator.process_index
        )
        self._pending_stats = None
        self._warned_empty = False
        self._warned_truncation = False
        self.last_supervision = None  # the `Supervision` of the latest micro-batch (weights, change point, scores)
        self.release_diagnostics = None
        if args.release_diagnostics_steps > 0:
            self.release_diagnostics = ReleaseDiagnosticsCallback(
                max_steps_kept=args.release_diagnostics_steps,
                max_records=args.release_diagnostics_max_records,
                trackers=self.callback_handler.callbacks,
            )
            self.add_callback(self.release_diagnostics)

    def _suppress_padded_rows(self, student_rows: int) -> None:
        """The student never samples the rows of its head beyond the ids the teacher has (they belong to no token)."""
        padded = range(self.vocab_size, student_rows)
        suppress = sorted({*(self.generation_kwargs.get("suppress_tokens") or ()), *padded})
        self.generation_kwargs["suppress_tokens"] = suppress
        self.generation_config.suppress_tokens = suppress
        if self.use_vllm:  # vLLM's `SamplingParams`
            self.vllm_generation.generation_kwargs.setdefault("allowed_token_ids", list(range(self.vocab_size)))

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint of `output_dir`.

        A run killed while it was writing a checkpoint leaves that folder without a readable `trainer_state.json`
        (the file the trainer writes last); it is skipped with a warning instead of failing the resume.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _get_train_sampler(self, dataset=None):
        # The parent's sampler, built by the parent, with an epoch-indexed order (see `EpochRepeatSampler`).
        with _replaced(_distillation, "RepeatSampler", EpochRepeatSampler):
            return super()._get_train_sampler(dataset)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        limit = self.args.max_prompt_length
        if limit is None:
            return prompt_ids, images, multimodal_fields
        longest = max(map(len, prompt_ids), default=0)
        prompt_ids, truncated = truncate_prompt_ids(prompt_ids, limit)
        if truncated and (images is not None or multimodal_fields):
            raise ValueError(
                f"A prompt has {longest} tokens, more than `max_prompt_length={limit}`, and carries images: "
                "truncating it would cut image tokens. Raise `max_prompt_length` or shorten the prompts."
            )
        if truncated and not self._warned_truncation:
            logger.warning(
                "%d of %d prompts are longer than `max_prompt_length=%d` tokens (the longest has %d) and were "
                "truncated from the left, keeping their end. Raise `max_prompt_length` to keep them whole. This "
                "warning is shown once.",
                truncated, len(prompt_ids), limit, longest,
            )  # fmt: skip
            self._warned_truncation = True
        return prompt_ids, images, multimodal_fields

    # Generation: with `rollout_truncation="online"` the student's completions come from `generate_online` instead of
    # one `generate` call; everything around it (prompt tokenization, padding, metrics, batching) stays the parent's.
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        try:
            if self.args.rollout_truncation != "online":
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            self._online_rollout = self._generate_online(prompt_ids)
            return self._online_rollout.completion_ids
        except RuntimeError as error:  # `torch.multinomial` on NaN/inf probabilities while sampling
            if "probability tensor contains" not in str(error):
                raise
            raise SignalsError(
                "The student model produced non-finite logits (NaN or inf) while sampling completions "
                f"{self._at_step()}. {NON_FINITE_ADVICE['student']}"
            ) from error

    def _at_step(self) -> str:
        step = self.state.global_step
        return f"at optimizer step {step + 1} (global_step={step}); no update of this step was applied"

    def _save_rng_state(self, output_dir: str) -> None:
        # Checkpoints carry the `random_release` / random token-score generators and the null metric's, so a resumed
        # run draws the same.
        super()._save_rng_state(output_dir)
        states = {
            "release": self.release_generator.get_state(),
            "permutation": self.permutation_generator.get_state(),
            "null": self.null_generator.get_state(),
        }
        torch.save(states, _release_rng_file(output_dir, self.args.process_index))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        if (states := _release_rng_states(checkpoint, self.args.process_index)) is not None:
            self.release_generator.set_state(states["release"])
            if "null" in states:  # older checkpoints do not carry it
                self.null_generator.set_state(states["null"])
        # Every process restores process 0's permutation state, so they keep drawing the same permutations (also
        # when the run resumes on another number of processes).
        if (states := _release_rng_states(checkpoint, 0)) is not None and "permutation" in states:
            self.permutation_generator.set_state(states["permutation"])

    def _check_online_support(self) -> None:
        args, fix = self.args, "or set `rollout_truncation='none'`"
        unsupported = [
            (bool(self.tools), f"tool calling (multi-turn generation); drop `tools` {fix}"),
            (self._is_vlm, f"vision-language models; use a text model {fix}"),
            (
                self._dist.is_fsdp or self._dist.is_zero3,
                "FSDP or DeepSpeed ZeRO-3: each process stops its own rows, so the sharded models' blocks would have "
                f"to be synchronised across processes; use DDP or ZeRO-1/2 {fix}",
            ),
            (
                self.use_vllm and (args.vllm_mode != "colocate" or args.vllm_tensor_parallel_size != 1),
                "vLLM in server mode or with tensor parallelism (processes generate different numbers of rows per "
                f"block); use `vllm_mode='colocate'` with `vllm_tensor_parallel_size=1` {fix}",
            ),
        ]
        for failed, message in unsupported:
            if failed:
                raise ValueError(f"`rollout_truncation='online'` does not support {message}.")

    def _generate_online(self, prompt_ids) -> OnlineRollout:
        args, device, pad_id = self.args, self.accelerator.device, self._tokenizer.pad_token_id
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, pad_id, "left", self.pad_to_multiple_of).to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", self.pad_to_multiple_of).to(device)
        teacher = self.accelerator.unwrap_model(self.teacher_model).eval()
        if self.use_vllm and self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        with (
            profiling_context(self, "online_release.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as student,
            torch.no_grad(),
        ):
            if self.use_vllm:
                blocks = VLLMBlocks(
                    self.vllm_generation, student, args.release_top_k, pad_id, args.signal_chunk_size, self.vocab_size
                )
            else:
                blocks = TransformersBlocks(student, self.generation_config, args.release_top_k, self.vocab_size)
            return generate_online(
                blocks,
                teacher,
                self._tokenizer,
                input_ids,
                attention_mask,
                max_new_tokens=self.max_completion_length,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=pad_id,
                check_tokens=args.online_check_tokens,
                temperature=self.temperature,
                segmentation=args.segmentation,
                segment_window=args.segment_window,
                min_segments=args.online_min_segments,
                patience=args.online_patience,
                chunk_size=args.signal_chunk_size,
                vocab_size=self.vocab_size,
            )

    def _log_rollout(self, generated, stopped=None, teacher_time: float = 0.0) -> None:
        """Rollout metrics of one generation batch, summed over processes.

        `rollout/generated_tokens`: completion tokens the student generated (with online truncation, including those
        generated past the kept prefix before the block ended). `rollout/truncated_frac`: fraction of trajectories
        stopped early. `rollout/saved_tokens_frac`: tokens not generated relative to the offline length estimate,
        `sum_stopped (L - n_b) / (sum_stopped L + sum_others n_b)` where `n_b` is the number of tokens a trajectory had
        generated when it stopped (or ended) and `L = max_completion_length` -- a stopped trajectory is counted as if
        it would have run to the length limit, so this is an upper bound on the true saving.
        `rollout/teacher_scoring_time`: seconds the teacher spent scoring blocks during generation (mean over
        processes).
        """
        online = stopped is not None
        stopped = torch.zeros_like(generated, dtype=torch.bool) if stopped is None else stopped.bool()
        limit = self.max_completion_length
        estimate = torch.where(stopped, limit, generated)
        sums = [generated.sum(), stopped.sum(), stopped.numel(), (estimate - generated).sum(), estimate.sum()]
        local = torch.tensor([*map(float, sums), teacher_time], dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.gather(local[None]).sum(0).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["rollout/generated_tokens"].append(total[0])
        if online:
            metrics["rollout/truncated_frac"].append(total[1] / max(total[2], 1))
            metrics["rollout/saved_tokens_frac"].append(total[3] / max(total[4], 1))
            metrics["rollout/teacher_scoring_time"].append(total[5] / self.accelerator.num_processes)

    def _generate_and_score_completions(self, inputs):
        self._online_rollout = None
        output = super()._generate_and_score_completions(inputs)
        rollout, self._online_rollout = self._online_rollout, None
        if rollout is None:  # the model's own tokens: the completions, without tool results
            generated = (output["completion_mask"] * output.get("tool_mask", 1)).sum(1)
            self._log_rollout(generated.cpu())
        else:  # per-trajectory tensors travel with the batch through the parent's shuffle and split
            generated = torch.tensor([len(ids) for ids in rollout.generated_ids])
            self._log_rollout(generated, rollout.stopped, rollout.teacher_time)
            output["online_stopped"] = rollout.stopped.to(self.accelerator.device)
            output["online_bic_gain"] = rollout.bic_gain.to(self.accelerator.device)
        if self.args.supervision == "random_release":
            output["random_release_fraction"] = self._random_release_fractions(output)
        return output

    def _random_release_fractions(self, batch: dict) -> torch.Tensor:
        """The `random_release` fraction `[B]` of each row of this process's generation batch.

        One no-grad scoring pass of the student and the teacher over the generation batch (in micro-batches, through
        the same `_compute_loss` as training) gives each trajectory the kept fraction of the release rule; the
        fractions of all processes are gathered, permuted across the eligible trajectories (supervised tokens and at
        least one segment) with `permutation_generator`, which draws the same permutation on every process, and each
        process takes back the fractions of its own rows. Ineligible rows get 0 (they keep nothing). The rows then
        travel with the batch through the parent's shuffle and split, and the loss keeps the first
        `ceil(fraction * length)` completion tokens of each.
        """
        num_chunks = math.gcd(batch["completion_ids"].shape[0], self.args.gradient_accumulation_steps)
        chunks = split_tensor_dict(split_pixel_values_by_grid(batch), num_chunks)
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        fractions, eligible = [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk in chunks:
                chunk = unsplit_pixel_values_by_grid(chunk)
                f, e, _ = self._forward_redirection(
                    self.model_wrapped, unwrapped, self._compute_loss, unwrapped, chunk, None, fractions_only=True
                )
                fractions.append(f)
                eligible.append(e)
        fractions, eligible = torch.cat(fractions), torch.cat(eligible)
        return global_permutation(self.accelerator, fractions, eligible, self.permutation_generator)

    # The parent's `_compute_loss` prepares both models' hidden states, output heads and logit post-processing and
    # hands them to `_chunked_divergence_loss`; the supervised loss takes that call over for one batch, so none of the
    # preparation (multimodal inputs, tool masks, device placement, FSDP/DeepSpeed routing) is duplicated here.
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch, fractions_only: bool = False):
        loss = functools.partial(self._supervised_loss, inputs, fractions_only=fractions_only)
        with _replaced(_distillation, "_chunked_divergence_loss", loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Summed across processes here, after the wrapped forward returned (no collective inside it).
        stats, self._pending_stats = self._pending_stats, None
        names = sorted(stats)
        local = torch.stack([torch.stack([s.float(), c.float()]) for s, c in (stats[n] for n in names)])
        total = self.accelerator.gather(local[None]).sum(0).tolist()
        mode = "train" if self.model.training else "eval"
        for name, value in reduce_stats(dict(zip(names, map(tuple, total)))).items():
            self._metrics[mode][name].append(value)
        return output

    def _supervised_loss(
        self,
        inputs,
        student_hidden_states,
        teacher_hidden_states,
        student_lm_head_weight,
        teacher_lm_head_weight,
        completion_mask,
        beta,
        num_items_in_batch=None,
        student_lm_head_bias=None,
        teacher_lm_head_bias=None,
        student_logit_scale=1.0,
        teacher_logit_scale=1.0,
        student_final_logit_softcapping=None,
        teacher_final_logit_softcapping=None,
        temperature=1.0,
        fractions_only=False,
    ):
        """The loss of one micro-batch; called with the arguments of the parent's `_chunked_divergence_loss`.

        With `fractions_only` (the scoring pass of `_random_release_fractions`, under `torch.no_grad()`) it returns the
        release rule's `kept_fractions` instead: `(fractions, eligible, None)`.
        """
        args = self.args
        loss_mask = completion_mask
        student = OutputHead(
            student_lm_head_weight, student_lm_head_bias, student_logit_scale, student_final_logit_softcapping
        )
        teacher = OutputHead(
            teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale, teacher_final_logit_softcapping
        )
        parent_loss = args.loss_type == "parent"
        with torch.no_grad() if parent_loss else contextlib.nullcontext():
            try:
                signals = signals_from_hidden(
                    student_hidden_states,
                    teacher_hidden_states,
                    inputs["completion_ids"],
                    loss_mask,
                    student,
                    teacher,
                    top_k=args.release_top_k,
                    temperature=temperature,
                    chunk_size=args.signal_chunk_size,
                    feature_k=args.token_top_k if args.supervision == "token_teachability" else None,
                )
            except SignalsError as error:
                raise SignalsError(f"{error} Raised {self._at_step()}.") from error
        # Every policy reports the change point of the batch (what `release` would keep), so segments are always built.
        segment_ids = segment_completions(
            inputs["completion_ids"], inputs["completion_mask"], self._tokenizer, args.segmentation, args.segment_window
        ).to(loss_mask.device)
        online = {"online_stopped": inputs.get("online_stopped"), "online_bic_gain": inputs.get("online_bic_gain")}
        if fractions_only:
            margins = signals.margins
            rule = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins, **online)
            return *kept_fractions(rule.weights, loss_mask, segment_ids), None
        advantages = signals.advantages
        supervision = supervision_weights(
            args.supervision,
            loss_mask,
            segment_ids=segment_ids,
            margins=signals.margins,
            advantages=advantages,
            features=signals.features,
            fixed_prefix_length=args.fixed_prefix_length,
            generator=self.release_generator,
            token_score=args.token_score,
            token_keep_ratio=args.token_keep_ratio,
            token_min_keep=args.token_min_keep,
            release_fractions=inputs.get("random_release_fraction"),
            **online,
        )
        weights = supervision.weights.to(advantages.dtype)
        if parent_loss:
            valid = loss_mask.bool()
            student, teacher = shared_heads(student, teacher)  # both distributions over the shared token ids
            per_token, _ = ChunkedDivergenceFunction.apply(
                student_hidden_states[valid], *student[:2],
                teacher_hidden_states[valid], *teacher[:2],
                beta, temperature, student.logit_scale, student.softcap, teacher.logit_scale, teacher.softcap,
            )  # fmt: skip
            weighted = (weights[valid] * per_token).sum()
        else:
            weighted = -(weights * advantages * signals.student_logprobs).sum()
        n_valid = loss_mask.sum()
        if n_valid == 0 and not self._warned_empty:
            warnings.warn("A batch has no supervised completion tokens: its loss is 0 and it does not update the model.")
            self._warned_empty = True
        loss = weighted / (n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if not bool(torch.isfinite(loss)):  # one scalar, before backward: the weights are never touched by it
            if parent_loss:
                cause = (
                    "The parent's divergence is infinite where the teacher gives a token probability 0 (a -inf logit, "
                    "e.g. a masked vocabulary) that the student does not; use loss_type='advantage', whose teacher "
                    "log-probabilities are floored at log(1e-12)."
                )
            else:
                cause = "Both models' logits were finite; please report this with the run's config."
            raise FloatingPointError(
                f"The loss is {loss.item()} {self._at_step()} (supervision={args.supervision!r}, "
                f"loss_type={args.loss_type!r}). {cause}"
            )
        self.last_supervision = supervision
        if self.release_diagnostics is not None and self.model.training:
            token_weights = supervision.weights if args.supervision == "token_teachability" else None
            records = trajectory_records(
                inputs["completion_ids"], inputs["completion_mask"], loss_mask, segment_ids, supervision,
                signals.margins, advantages, teachability_weights=token_weights,
            )  # fmt: skip
            self.release_diagnostics.add(records, step=self.state.global_step)
        self._pending_stats = supervision_stats(
            supervision, loss_mask, advantages, signals.margins, signals.features, null_generator=self.null_generator
        )
        return loss, (signals.student_entropy * loss_mask).sum().detach(), n_valid


class EpochRepeatSampler(RepeatSampler):
    """`trl`'s `RepeatSampler` whose order in epoch `e` depends only on `e` (`set_epoch`), so resume is exact.

    `RepeatSampler` shuffles with its own generator, seeded once when it is built; each epoch draws the next
    permutation from it. That generator is not part of a checkpoint: a run resumed at epoch `e` builds a new sampler
    and its first epoch draws permutation 0 again, so every resumed epoch after the first replays epoch 0's order
    (other prompts, so other samples and losses) while an uninterrupted run moves on to permutation `e`. Transformers
    restores the global RNG and skips the batches already trained in the resumed epoch, and calls
    `set_epoch(epoch)` on the sampler before each epoch; here `set_epoch(e)` puts the generator in the state it has
    after `e` permutations, so both runs draw the same order and an uninterrupted run keeps the parent's order. The
    generator states at the start of each epoch are cached (one `randperm` per new epoch, none on a repeated call).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_states = [self.generator.get_state()] if self.shuffle else []

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle:
            return
        while len(self._epoch_states) <= epoch:
            self.generator.set_state(self._epoch_states[-1])
            torch.randperm(self.num_samples, generator=self.generator)  # what `__iter__` draws once per epoch
            self._epoch_states.append(self.generator.get_state())
        self.generator.set_state(self._epoch_states[epoch])


def _release_rng_file(directory: str, process_index: int) -> str:
    return os.path.join(directory, f"release_rng_state_{process_index}.pth")


def _release_rng_states(directory: str, process_index: int) -> dict | None:
    if not os.path.isfile(path := _release_rng_file(directory, process_index)):
        return None
    states = torch.load(path)
    return {"release": states} if isinstance(states, torch.Tensor) else states  # older checkpoints: one tensor


def global_permutation(
    accelerator, fractions: torch.Tensor, eligible: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Permute per-row `fractions` `[B]` across the rows of all processes; returns this process's rows `[B]`.

    The rows of every process (their counts may differ) are gathered in process order, permuted with
    `permute_release_fractions` (`generator` must be in the same state on every process, so that all draw the same
    permutation), and each process keeps the slice of its own rows.
    """
    local = torch.stack([fractions.double(), eligible.double()], -1).to(accelerator.device)
    counts = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device)).tolist()
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
    width = max(counts)
    rows = torch.cat([gathered[i * width : i * width + n] for i, n in enumerate(counts)])
    permuted = permute_release_fractions(rows[:, 0], rows[:, 1] > 0, generator)
    start = sum(counts[: accelerator.process_index])
    return permuted[start : start + local.shape[0]].to(fractions.device)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N whose `trainer_state.json` reads back.

    The trainer writes `trainer_state.json` after the weights, optimizer, scheduler and RNG states, so a folder
    without it (or with a truncated one) is a checkpoint whose writing was interrupted; such folders are skipped with
    a warning. `None` when there is no complete checkpoint.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, "trainer_state.json")) as file:
                json.load(file)
        except (OSError, ValueError):
            logger.warning("Skipping %s: it has no readable trainer_state.json (its writing was interrupted).", path)
            continue
        return path
    return None


def _check_datasets(train_dataset, eval_dataset) -> None:
    """Empty datasets and datasets without a usable `prompt` column fail here, before any model is loaded."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    for name, dataset in named:
        if isinstance(dataset, (Dataset, IterableDataset)):
            validate_prompt_dataset(dataset, name)


def _check_top_k(args, vocab: int) -> None:
    for name in ("release_top_k", "token_top_k"):
        value, low = getattr(args, name), 2 if name == "release_top_k" else 1
        if value > vocab:
            raise ValueError(f"`{name}` must be in [{low}, {vocab}] (the vocabulary size); got {value}.")


@contextlib.contextmanager
def _replaced(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


_MISSING_TEACHER = (
    "TeachabilityGKDTrainer needs `teacher_model`; got None. Pass a model object, or a Hub id or local path that the "
    "trainer loads in this process (with `teacher_model_init_kwargs`, e.g. `{'dtype': 'bfloat16'}` or a "
    "quantization config, to make it smaller; sharded across GPUs with FSDP2 or DeepSpeed ZeRO-3). A teacher served "
    "by another process is not supported, under any `supervision`: every policy projects the teacher's last hidden "
    "states through its output head in the training forward pass."
)


def _vocab_size(model, args) -> int:
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    else:
        config = model.config
    return config.get_text_config().vocab_size


def _tokenizer_of(processing_class, model):
    if isinstance(processing_class, ProcessorMixin):
        return processing_class.tokenizer
    if processing_class is not None:
        return processing_class
    path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
    if path and os.path.isdir(path):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            return None
    return None


def _token(tokenizer, token_id: int):
    return tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None


def _check_vocabularies(model, teacher_model, processing_class, teacher_processing_class, args) -> tuple[int, int]:
    """Fail before anything is built unless the student and the teacher share one tokenizer; returns the two models'
    `vocab_size` (rows of their output heads).

    The two sizes may differ when one tokenizer's models pad their output layers differently (Qwen2.5-1.5B has 151,936
    rows, Qwen2.5-7B 152,064, for a tokenizer of 151,665 tokens): training then uses the first `min` of them, which
    must hold every token of the tokenizer. The teacher's tokenizer (given, or found in its local directory) must map
    every id as the student's does; without one, the trainer's processing class is the tokenizer of both.
    """
    student_size, teacher_size = _vocab_size(model, args), _vocab_size(teacher_model, args)
    student_tok = _tokenizer_of(processing_class, model)
    teacher_tok = _tokenizer_of(teacher_processing_class, teacher_model)
    if student_tok is not None and teacher_tok is not None:
        s_tokens = student_tok.convert_ids_to_tokens(list(range(len(student_tok))))
        t_tokens = teacher_tok.convert_ids_to_tokens(list(range(len(teacher_tok))))
        n = min(len(s_tokens), len(t_tokens))
        shorter = None if len(s_tokens) == len(t_tokens) else n  # the first id only one tokenizer has
        first = next((i for i in range(n) if s_tokens[i] != t_tokens[i]), shorter)
        if first is not None:
            raise ValueError(
                f"The student and the teacher must share one tokenizer: the student has vocab_size {student_size} "
                f"and a tokenizer of {len(student_tok)} tokens, the teacher vocab_size {teacher_size} and "
                f"{len(teacher_tok)} tokens. The first differing token is id {first}: "
                f"{_token(student_tok, first)!r} (student) vs {_token(teacher_tok, first)!r} (teacher). OPD compares "
                "the two models' log-probabilities of the same token ids."
            )
    _check_tokenizer_fits(student_tok or teacher_tok, student_size, teacher_size)
    if student_size != teacher_size and teacher_tok is None:
        logger.warning(
            "The student's output head has %d rows and the teacher's %d; the teacher's tokenizer is not at hand, so "
            "the trainer's processing class is taken as the tokenizer of both and training uses token ids "
            "0..%d. Pass `teacher_processing_class` to have the two tokenizers compared.",
            student_size, teacher_size, min(student_size, teacher_size) - 1,
        )  # fmt: skip
    _check_top_k(args, min(student_size, teacher_size))
    return student_size, teacher_size


def _check_tokenizer_fits(tokenizer, student_size: int, teacher_size: int) -> None:
    """Every token of `tokenizer` needs a row in both output heads."""
    shared = min(student_size, teacher_size)
    if tokenizer is None or len(tokenizer) <= shared:
        return
    smaller = "student" if student_size == shared else "teacher"
    raise ValueError(
        f"The tokenizer has {len(tokenizer)} tokens but the student has vocab_size {student_size} and the teacher "
        f"{teacher_size}: the first token without a row in the {smaller}'s output head is id {shared}: "
        f"{_token(tokenizer, shared)!r}. OPD compares the two models' log-probabilities of the same token ids, so "
        "every token must have a row in both."
    )


@contextlib.contextmanager
def _parent_accepts_padded_heads(teacher_model, student_size: int, teacher_size: int):
    """Let `trl.DistillationTrainer.__init__` build a pair whose heads are padded to different sizes.

    The parent refuses a teacher whose `vocab_size` differs from the student's; `_check_vocabularies` has accepted
    this pair (one tokenizer, which fits both heads). While the parent builds, the teacher's config reports the
    student's size (the teacher is loaded inside the parent when given as a path); its own size is put back after.
    """
    if student_size == teacher_size:
        yield
        return
    teachers = [] if isinstance(teacher_model, str) else [teacher_model]

    def load(model_id, **kwargs):
        loaded = create_model_from_path(model_id, **kwargs)
        if model_id == teacher_model:
            loaded.config.get_text_config().vocab_size = student_size
            teachers.append(loaded)
        return loaded

    if teachers:
        teachers[0].config.get_text_config().vocab_size = student_size
    try:
        with _replaced(_distillation, "create_model_from_path", load):
            yield
    finally:
        for teacher in teachers:
            teacher.config.get_text_config().vocab_size = teacher_size
