"""`TeachabilityGKDTrainer`: `trl.DistillationTrainer` with the sampled-token OPD loss and teachability-aware weights.

Glue only: the policies are described by `trl_ltc.spec`, the per-token signals computed by `trl_ltc.signals`, the
weights by `trl_ltc.supervision`; construction checks live in `trl_ltc.checks`, resume helpers in `trl_ltc.resume`,
online generation in `trl_ltc.online`, and the private TRL names swapped at run time in `trl_ltc.hooks`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import textwrap
import time
import warnings

import torch
from trl import DistillationTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from .checks import check_datasets, check_tokenizer_fits, check_vocabularies, checked_args
from .checks import parent_accepts_padded_heads, suppress_padded_rows
from .compute import ComputeCallback
from .config import TeachabilityGKDConfig
from .diagnostics import ReleaseDiagnosticsCallback, trajectory_records
from .hooks import divergence_loss_replaced
from .online import OnlineRollout, check_online_support, gather_step_stats, log_rollout
from .online import rollout_batch_fields, trainer_rollout
from .prompts import truncate_prompts
from .resume import EpochRepeatSampler, global_permutation, last_complete_checkpoint  # noqa: F401 (as before)
from .resume import load_release_generators, release_generators, save_release_generators
from .segmentation import segment_completions
from .served_teacher import served_batch_fields, served_loss
from .signals import NON_FINITE_ADVICE, NON_FINITE_LOSS_CAUSE, OutputHead, SignalsError, TeacherScores
from .signals import signals_from_hidden, weighted_divergence
from .spec import SupervisionSpec
from .supervision import kept_fractions, permute_release_fractions, supervision_stats, supervision_weights
from .teacher_server import TeacherServer


class TeachabilityGKDTrainer(DistillationTrainer):
    """On-policy distillation that supervises only where the teacher is still teachable.

    A drop-in replacement for `trl.DistillationTrainer` (same constructor, same generation, LoRA, accelerate, vLLM
    paths). The student samples completions; both models score them; the loss is the sampled-token OPD loss

        L = -sum_{b,t} w_bt * stopgrad(log pT(y_bt) - log pS(y_bt)) * log pS(y_bt) / N

    with `N` the completion tokens of the global batch (gradient-accumulation aware, as in the parent) and `w` the
    weights of `args.supervision` (`trl_ltc.supervision`). With `supervision="full"` its gradient is the
    score-function gradient of the per-token reverse KL estimator `sum(log pS(y) - log pT(y)) / N`. With
    `loss_type="parent"` the parent's generalized JSD is weighted per token by `w` instead. The policy and its
    parameters are read once into `self.spec`, a `trl_ltc.spec.SupervisionSpec`.

    Args:
        model, teacher_model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
        quantization_config, peft_config, tools: as in `trl.DistillationTrainer`; `args` is a
            `TeachabilityGKDConfig`.
        teacher_processing_class (*optional*): the teacher's tokenizer, checked token by token against the
            student's (`trl_ltc.checks`). Padded output heads: the signals use the first `min(V_student, V_teacher)`
            ids (`vocab_size`), which must hold the whole tokenizer; a padded student never samples its extra rows.

    Metrics (every `logging_steps`, summed over processes): `release/*`, `margin/*`, `advantage/*`, `teachability/*`
    (`trl_ltc.supervision.supervision_stats`) and `rollout/*` (`trl_ltc.online.log_rollout`); see `docs/policies.md`.

    With `supervision="random_release"` the release fractions are permuted across the generation batch of an optimizer
    step, all micro-batches and processes (`_random_release_fractions`: one extra no-grad scoring pass per step).

    With `args.teacher_server_url` the teacher is served by another process and `teacher_model` is None: the batch is
    scored by the server after generation (`trl_ltc.teacher_server`, `trl_ltc.served_teacher`).

    With `rollout_truncation="online"` the student generates in blocks and a trajectory stops once the online release
    rule (formula 9) releases it; the batch holds its kept prefix, weighted 1, and the teacher's generation-time scores
    of it, which the advantage loss uses instead of a teacher forward (`trl_ltc.online`, `docs/online_release.md`).
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
        args = checked_args(model, teacher_model, args)
        spec = SupervisionSpec.from_config(args)
        # Cheap checks first: a wrong dataset or vocabulary fails in seconds, before two models are loaded.
        check_datasets(train_dataset, eval_dataset)
        served = args.teacher_server_url is not None  # the teacher's vocabulary is checked on the server
        sizes = check_vocabularies(model, model if served else teacher_model, processing_class,
                                   None if served else teacher_processing_class, args.trust_remote_code)  # fmt: skip
        spec.check_vocabulary(min(sizes))
        with parent_accepts_padded_heads(teacher_model, *sizes):
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
        self.spec = spec  # the supervision policy, its parameters and the signals it needs
        self.vocab_size = min(sizes)  # the token ids both output heads have: the signals are taken over these
        check_tokenizer_fits(self._tokenizer, *sizes)  # when no tokenizer was at hand before loading
        spec.check_vocabulary(min(self.model.get_output_embeddings().weight.shape[0], self.vocab_size))
        if sizes[0] > self.vocab_size:
            suppress_padded_rows(self, sizes[0])
        if spec.online:
            check_online_support(self)
        if self.use_vllm:  # vLLM's CPU build repacks its layers: TRL's colocated weight sync needs another call
            from .vllm_compat import adapt_weight_sync
            adapt_weight_sync(self)
        self.teacher_server = TeacherServer.for_trainer(self) if served else None
        self._online_rollout: OnlineRollout | None = None
        self._skip_teacher_forward = False  # set by `_compute_loss` while the loss uses an online rollout's scores
        self._loss_teacher_time = 0.0  # seconds of teacher forward in the loss of the current micro-batch (online)
        # `release_generator`: per-process draws; `permutation_generator`: the same on every process; `null_generator`:
        # the shuffles of `release/accepted_frac_null` (see `trl_ltc.resume.release_generators`)
        generators = release_generators(spec.seed, self.accelerator.process_index)
        self.release_generator, self.permutation_generator, self.null_generator = generators
        self._pending_stats = None
        self._warned_empty = self._warned_truncation = False  # one warning per run each
        self.last_supervision = None  # the `Supervision` of the latest micro-batch (weights, change point, scores)
        self.release_diagnostics = ReleaseDiagnosticsCallback.attach(self)  # None with release_diagnostics_steps=0
        self.compute = ComputeCallback.attach(self)  # `compute/*` counters and the `max_flops` budget

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint of `output_dir`.

        A run killed while it was writing a checkpoint leaves that folder without a readable `trainer_state.json`
        (the file the trainer writes last); it is skipped with a warning instead of failing the resume.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        self.compute.begin(resume_from_checkpoint)  # zero, or the totals of the checkpoint resumed from
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _get_train_sampler(self, dataset=None):
        # The parent's sampler, built by the parent, with an epoch-indexed order (see `EpochRepeatSampler`).
        return EpochRepeatSampler.like(super()._get_train_sampler(dataset))

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        if (limit := self.args.max_prompt_length) is not None:  # cut from the left, with one warning per run
            multimodal = images is not None or bool(multimodal_fields)
            prompt_ids, truncated = truncate_prompts(prompt_ids, limit, multimodal, warn=not self._warned_truncation)
            self._warned_truncation |= truncated
        return prompt_ids, images, multimodal_fields

    # Generation: with `rollout_truncation="online"` the student's completions come from `generate_online` instead of
    # one `generate` call; everything around it (prompt tokenization, padding, metrics, batching) stays the parent's.
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        try:
            if not self.spec.online:
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
        except SignalsError as error:  # the teacher's block scoring of an online rollout
            raise SignalsError(f"{error} Raised while generating {self._at_step()}.") from error

    def _at_step(self) -> str:
        step = self.state.global_step
        return f"at optimizer step {step + 1} (global_step={step}); no update of this step was applied"

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # and the policies' generators, so a resumed run draws the same
        self.compute.save(output_dir)
        save_release_generators(output_dir, self.args.process_index, release=self.release_generator,
                                permutation=self.permutation_generator, null=self.null_generator)  # fmt: skip

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            generators = self.release_generator, self.permutation_generator, self.null_generator
            load_release_generators(checkpoint, self.args.process_index, *generators)

    def _generate_online(self, prompt_ids) -> OnlineRollout:
        return trainer_rollout(self, prompt_ids)

    def _generate_and_score_completions(self, inputs):
        self._online_rollout = None
        output = super()._generate_and_score_completions(inputs)
        rollout, self._online_rollout = self._online_rollout, None
        if rollout is None:  # the model's own tokens: the completions, without tool results
            generated = (output["completion_mask"] * output.get("tool_mask", 1)).sum(1)
            log_rollout(self, generated.cpu())
        else:  # per-trajectory tensors travel with the batch through the parent's shuffle and split
            generated = torch.tensor([len(ids) for ids in rollout.generated_ids])
            log_rollout(self, generated, rollout.stopped, rollout.teacher_time)
            output |= rollout_batch_fields(rollout, output["completion_ids"].shape[1], self.accelerator.device)
        if self.teacher_server is not None and rollout is None:  # the whole batch, before any update of the step
            output |= served_batch_fields(self.teacher_server, output, self.vocab_size)
        self.compute.rollout(output, rollout)
        if self.spec.needs_global_permutation:
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
        generator = self.permutation_generator
        return global_permutation(self.accelerator, fractions, eligible, generator, permute=permute_release_fractions)

    # The parent's `_compute_loss` prepares both models' hidden states, heads and logit post-processing (multimodal
    # inputs, tool masks, devices, FSDP/DeepSpeed routing) and hands them to its loss, which `_supervised_loss` takes
    # over for one call (`trl_ltc.hooks`). An online rollout carries the teacher's generation-time scores: the loss
    # uses them and the teacher forward is skipped (`_get_last_hidden_state`), except with `loss_type="parent"`, which
    # needs the teacher's distribution (its forward time then counts in `rollout/teacher_scoring_time`).
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch, fractions_only: bool = False):
        if self.teacher_server is not None:
            return served_loss(self, unwrapped_student, inputs, num_items_in_batch, fractions_only)
        cached = not (fractions_only or self.spec.parent_loss) and "online_teacher_logprobs" in inputs
        scores = TeacherScores(inputs["online_teacher_logprobs"], inputs["online_margins"]) if cached else None
        loss = functools.partial(self._supervised_loss, inputs, fractions_only=fractions_only, teacher_scores=scores)
        self._skip_teacher_forward = scores is not None
        try:
            with divergence_loss_replaced(loss):
                return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._skip_teacher_forward = False

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if self.teacher_model is None or unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
            self.compute.forward(False, attention_mask, logits_to_keep)
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if self._skip_teacher_forward:  # no teacher forward: `_supervised_loss` reads the cached scores instead
            return input_ids.new_zeros(input_ids.shape[0], logits_to_keep, 0, dtype=torch.float32)
        self.compute.forward(True, attention_mask, logits_to_keep)
        start = time.perf_counter()
        hidden = super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        if self.spec.online:  # counted with the generation-time scoring of the same tokens (`compute_loss`)
            self._loss_teacher_time += time.perf_counter() - start
        return hidden

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._loss_teacher_time = 0.0
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Summed across processes here, after the wrapped forward returned (no collective inside it).
        stats, self._pending_stats = self._pending_stats, None
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in gather_step_stats(self, stats, self._loss_teacher_time).items():
            metrics[name].append(value)
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
        teacher_scores=None,
    ):
        """The loss of one micro-batch; called with the arguments of the parent's loss (`trl_ltc.hooks`).

        With `fractions_only` (the scoring pass of `_random_release_fractions`, under `torch.no_grad()`) it returns the
        release rule's `kept_fractions` instead: `(fractions, eligible, None)`. With `teacher_scores` (an online
        rollout's, see `_compute_loss`) the teacher's hidden states are a placeholder and its signals are those scores.
        """
        spec, loss_mask = self.spec, completion_mask
        student = OutputHead(
            student_lm_head_weight, student_lm_head_bias, student_logit_scale, student_final_logit_softcapping
        )
        teacher = None if teacher_lm_head_weight is None else OutputHead(
            teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale, teacher_final_logit_softcapping
        )  # fmt: skip
        with torch.no_grad() if spec.parent_loss else contextlib.nullcontext():
            try:
                signals = signals_from_hidden(
                    student_hidden_states, teacher_hidden_states, inputs["completion_ids"], loss_mask, student,
                    teacher, top_k=spec.release_top_k, temperature=temperature,
                    chunk_size=self.args.signal_chunk_size, feature_k=spec.feature_k, teacher_scores=teacher_scores,
                )  # fmt: skip
            except SignalsError as error:
                raise SignalsError(f"{error} Raised {self._at_step()}.") from error
        # Every policy reports the change point of the batch (what `release` would keep), so segments are always built.
        completions = inputs["completion_ids"], inputs["completion_mask"]
        segment_ids = segment_completions(*completions, self._tokenizer, spec.segmentation, spec.segment_window)
        segment_ids = segment_ids.to(loss_mask.device)
        online = {"online_stopped": inputs.get("online_stopped"), "online_bic_gain": inputs.get("online_bic_gain")}
        advantages, margins, generator = signals.advantages, signals.margins, self.release_generator
        if fractions_only:  # the kept fractions of the release rule (its calibration included), nothing else
            calibration = {"release_alpha": spec.release_alpha, "release_permutations": spec.release_permutations}
            rule = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins,
                                       generator=generator, **online, **calibration)  # fmt: skip
            return *kept_fractions(rule.weights, loss_mask, segment_ids), None
        supervision = supervision_weights(
            spec.policy, loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages,
            features=signals.features, generator=generator, release_fractions=inputs.get("random_release_fraction"),
            **online, **spec.weight_kwargs(),
        )  # fmt: skip
        weights = supervision.weights.to(advantages.dtype)
        if spec.parent_loss:
            weighted = weighted_divergence(
                student_hidden_states, teacher_hidden_states, loss_mask, weights, student, teacher, beta, temperature
            )
        else:
            weighted = -(weights * advantages * signals.student_logprobs).sum()
        n_valid = loss_mask.sum()
        if n_valid == 0 and not self._warned_empty:
            warnings.warn(
                "A batch has no supervised completion tokens: its loss is 0 and it does not update the model."
            )
            self._warned_empty = True
        loss = weighted / (n_valid.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if not bool(torch.isfinite(loss)):  # one scalar, before backward: the weights are never touched by it
            raise FloatingPointError(
                f"The loss is {loss.item()} {self._at_step()} (supervision={spec.policy!r}, "
                f"loss_type={spec.loss_type!r}). {NON_FINITE_LOSS_CAUSE[spec.loss_type]}"
            )
        self.last_supervision = supervision
        if self.release_diagnostics is not None and self.model.training:
            token_weights = supervision.weights if spec.needs_teachability_features else None
            records = trajectory_records(
                inputs["completion_ids"], inputs["completion_mask"], loss_mask, segment_ids, supervision,
                signals.margins, advantages, teachability_weights=token_weights,
            )  # fmt: skip
            self.release_diagnostics.add(records, step=self.state.global_step)
        self._pending_stats = supervision_stats(
            supervision, loss_mask, advantages, margins, signals.features, null_generator=self.null_generator,
            inexact_margins=signals.inexact_margins, iw_opd=spec.policy == "iw_opd",
        )
        return loss, (signals.student_entropy * loss_mask).sum().detach(), n_valid
