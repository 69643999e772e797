"""Compute accounting (DESIGN.md formula 12): what a run's rollouts, teacher scoring and training cost, cumulative.

`ComputeCallback` keeps four counters from the start of training, summed over processes and logged every logged step:

- `compute/generated_tokens`: completion tokens the student sampled (EOS included; with online truncation also the
  tokens generated past the kept prefix before the block ended; tool results excluded).
- `compute/teacher_tokens`: completion positions the teacher scored, every time it scored them: the teacher forward of
  the loss, the online rule's block scoring while generating (`trl_ltc.online`; a local teacher scores each new token
  once through its KV cache, a served one rescores the completion so far at every block), a served teacher's scoring
  of the batch (`trl_ltc.served_teacher`), and the extra no-grad scoring pass of `random_release`.
- `compute/trained_tokens`: completion positions in the student's training forward (every completion token of the
  micro-batch, whatever its supervision weight: a released token still goes through the forward and the backward).
- `compute/flops`: an estimate from the two models' parameter counts,

      flops = 2 * P_S * (student no-grad forward tokens) + 2 * P_T * (teacher forward tokens)
              + (4 * P_S + 2 * P_S_trainable) * (student training forward tokens)

  where a model's forward tokens are the real (non-padding) tokens of each sequence it processes, prompt included
  (the prefill of generation, the training and scoring forwards), each counted once per pass (a KV cache reused
  across generation steps or online blocks is not counted again). Student no-grad forwards: generation, and the
  scoring pass of `random_release`. `P` counts every parameter a token's forward multiplies, the output head
  included, the input embedding matrix excluded (a lookup) unless tied to the head. Training costs the forward
  (2P), the gradients of the activations (2P) and the gradients of the trainable weights (2 * P_trainable): 6P for
  full fine-tuning, about 4P with LoRA, whose frozen base weights get no weight gradient.

What the estimate leaves out (docs/compute.md): attention's own cost (about `2 * layers * context * hidden` per token,
small next to `2P` at short contexts), padding and the finished rows a batched `generate` keeps decoding (an engine
that drops them, as vLLM does, does not pay them), and the optimizer update.

Each process counts its own rows; the totals are gathered once per optimizer step (`on_step_end`, every process),
written into each checkpoint (`compute_state.json`) and restored from it on resume, so a resumed run continues the
same totals. With `max_flops` (config) training stops at the first step whose cumulative flops reach it.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import SaveStrategy

__all__ = ["COMPUTE_FILE", "COMPUTE_METRICS", "ComputeCallback", "forward_parameters", "training_flops_per_token"]

COMPUTE_FILE = "compute_state.json"
COMPUTE_METRICS = ("compute/generated_tokens", "compute/teacher_tokens", "compute/trained_tokens", "compute/flops")
# The tallies each process keeps (the logged counters, and the forward tokens of the flops estimate).
_TALLIES = (
    "generated_tokens", "teacher_tokens", "trained_tokens",
    "student_forward_tokens", "teacher_forward_tokens", "trained_forward_tokens",
)  # fmt: skip


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_parameters(model) -> tuple[int, int]:
    """`(P, P_trainable)` of a causal LM for the flops estimate: every parameter a token's forward multiplies (the
    output head included; the input embedding matrix, a lookup, excluded unless it is tied to the head), and those of
    them that get gradients."""
    if model is None:
        return 0, 0
    params = {id(p): p for p in model.parameters()}  # tied weights once
    base = _unwrap(model)
    embedding = base.get_input_embeddings().weight if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if embedding is not None and (head is None or head.weight is not embedding):
        params.pop(id(embedding), None)
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return total, trainable


def training_flops_per_token(params: int, trainable: int) -> int:
    """Forward (2P) + activations' gradients (2P) + trainable weights' gradients (2 P_trainable)."""
    return 4 * params + 2 * trainable


class ComputeCallback(TrainerCallback):
    """The compute counters of one trainer (module docstring); `attach(trainer)` builds and registers it."""

    def __init__(self, trainer, max_flops: float | None = None):
        self.trainer = trainer
        self.max_flops = _check_max_flops(max_flops)
        self.student_params, self.student_trainable = forward_parameters(trainer.model)
        teacher = getattr(trainer, "teacher_model", None)
        self.teacher_params = forward_parameters(trainer.accelerator.unwrap_model(teacher))[0] if teacher else 0
        self.local = dict.fromkeys(_TALLIES, 0)  # this process, since the start or the resumed checkpoint
        self.base = dict.fromkeys(_TALLIES, 0)  # all processes, restored from a checkpoint
        self.totals = dict(self.base)  # all processes, as of the last optimizer step
        self.served_params: int | None = None  # a served teacher's parameter count, when known (`set_teacher_params`)

    @classmethod
    def attach(cls, trainer) -> ComputeCallback:
        callback = cls(trainer, getattr(trainer.args, "max_flops", None))
        trainer.add_callback(callback)
        return callback

    def set_teacher_params(self, params: int) -> None:
        """The teacher's parameter count where the trainer cannot see the model (a served teacher)."""
        self.teacher_params = int(params)

    # --- Counting (each process its own rows) ------------------------------------------------------------------

    def _counting(self) -> bool:
        return self.trainer.model.training  # evaluation costs are not training compute

    def add(self, **counts: int) -> None:
        for name, value in counts.items():
            self.local[name] += int(value)

    def rollout(self, batch: dict, rollout=None) -> None:
        """One generation batch: the student's sampled tokens and prefill, and the teacher's scoring while generating
        (an online rollout's blocks) or right after it (a served teacher's `served_*` fields)."""
        if not self._counting():
            return
        prompt = int(batch["prompt_mask"].sum())
        if rollout is None:
            generated = int((batch["completion_mask"] * batch.get("tool_mask", 1)).sum())
        else:
            generated = sum(len(ids) for ids in rollout.generated_ids)
            positions = getattr(rollout, "teacher_positions", None)
            if positions is None:  # an older rollout without the count: each generated token scored once
                positions, forward = generated, prompt + generated
            else:
                forward = rollout.teacher_forward_tokens
            self.add(teacher_tokens=positions, teacher_forward_tokens=forward)
        self.add(generated_tokens=generated, student_forward_tokens=prompt + generated)
        if "served_mask" in batch:  # the server scored the whole batch: prompts and completions
            completion = int(batch["completion_mask"].sum())
            self.add(teacher_tokens=completion, teacher_forward_tokens=prompt + completion)

    def forward(self, teacher: bool, attention_mask: torch.Tensor, logits_to_keep: int) -> None:
        """One forward pass of the loss (`_get_last_hidden_state`): the student's (training, or the no-grad scoring
        pass of `random_release`) or the teacher's, over prompt + completion, scoring the last `logits_to_keep`."""
        if not self._counting():
            return
        tokens = int(attention_mask.sum())
        positions = int(attention_mask[:, attention_mask.shape[1] - logits_to_keep :].sum())
        if teacher:
            self.add(teacher_tokens=positions, teacher_forward_tokens=tokens)
        elif torch.is_grad_enabled():
            self.add(trained_tokens=positions, trained_forward_tokens=tokens)
        else:
            self.add(student_forward_tokens=tokens)

    # --- Totals ---------------------------------------------------------------------------------------------------

    def flops(self, tallies: dict) -> float:
        training = training_flops_per_token(self.student_params, self.student_trainable)
        return float(
            2 * self.student_params * tallies["student_forward_tokens"]
            + 2 * self.teacher_params * tallies["teacher_forward_tokens"]
            + training * tallies["trained_forward_tokens"]
        )

    def metrics(self) -> dict[str, float]:
        """The logged counters, as of the last optimizer step."""
        totals = self.totals
        return {
            "compute/generated_tokens": float(totals["generated_tokens"]),
            "compute/teacher_tokens": float(totals["teacher_tokens"]),
            "compute/trained_tokens": float(totals["trained_tokens"]),
            "compute/flops": self.flops(totals),
        }

    def _gather(self) -> dict:
        accelerator = self.trainer.accelerator
        local = torch.tensor([self.local[n] for n in _TALLIES], dtype=torch.float64, device=accelerator.device)
        summed = accelerator.gather(local[None]).sum(0).tolist() if accelerator.num_processes > 1 else local.tolist()
        return {n: self.base[n] + round(v) for n, v in zip(_TALLIES, summed)}

    # --- Resume ---------------------------------------------------------------------------------------------------

    def begin(self, checkpoint) -> None:
        """At `train()`: zero, or the totals stored in the checkpoint a run resumes from (a path)."""
        self.local = dict.fromkeys(_TALLIES, 0)
        self.base = dict.fromkeys(_TALLIES, 0)
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.join(checkpoint, COMPUTE_FILE)
            if os.path.isfile(path):
                with open(path) as file:
                    stored = json.load(file)["tallies"]
                self.base.update({n: int(stored.get(n, 0)) for n in _TALLIES})
        self.totals = dict(self.base)

    def save(self, checkpoint_dir: str) -> None:
        """Write the totals as of the checkpoint's step into its folder (before `trainer_state.json`, so a complete
        checkpoint has them; the process that writes the trainer state writes them)."""
        if not self.trainer.args.should_save:
            return
        state = {"tallies": self.totals, **self.metrics(), "student_params": self.student_params,
                 "student_trainable_params": self.student_trainable, "teacher_params": self.teacher_params}  # fmt: skip
        with open(os.path.join(checkpoint_dir, COMPUTE_FILE), "w") as file:
            json.dump(state, file, indent=2)

    # --- Callback events ------------------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        # Every process, once per optimizer step: the totals (one small gather), the metrics of the next log, and the
        # budget, decided on the same gathered totals everywhere.
        self.totals = self._gather()
        metrics = self.metrics()
        logged = self.trainer._metrics["train"]
        for name, value in metrics.items():
            logged[name] = [value]  # the latest total, whatever the logging interval averages
        if self.max_flops is not None and metrics["compute/flops"] >= self.max_flops:
            control.should_training_stop = True
            control.should_log = args.logging_strategy != "no"
            if args.save_strategy == SaveStrategy.STEPS:
                control.should_save = True
        return control


def _check_max_flops(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`max_flops` must be a positive number of floating-point operations or None; got {value!r}.")
    return float(value)
