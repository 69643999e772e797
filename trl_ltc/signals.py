"""Chunked per-token signals from hidden states and output heads; no `(B, T, V)` tensor is ever built.

For every supervised completion position the student's and the teacher's logits are projected from their last
hidden states a chunk of positions at a time, and reduced on the spot to a handful of per-token numbers:

- `student_logprobs`: `log pS(y_t)`, differentiable. The backward pass recomputes the student's projection tile by
  tile (TRL's `ChunkedLogProbFunction` backward), so only the hidden states and one log-normaliser per token are kept
  for it.
- `teacher_logprobs`: `log pT(y_t)`, floored at `log(1e-12)` like the margin's log-probs (formula 4), so that a
  sampled token the teacher masks out (`-inf` logit) gives a finite advantage instead of an infinite loss.
- `margins`: the teacher margin on the student's top-K (formula 4, `trl_ltc.release.support_margin`).
- `student_entropy`: the student's full-vocabulary entropy (for the parent's `entropy` metric).
- `features`: the TA-OPD token features (`trl_ltc.teachability`), when asked for.

All log-probabilities are at the training temperature: `logits * logit_scale`, soft-capped where the model does so,
then divided by the temperature, as in `trl.DistillationTrainer`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from .release import LOG_PROB_FLOOR, support_margin
from .spec import check_top_k
from .teachability import TeachabilityFeatures, features_from_logprobs
from .teacher_scores import LocalTeacherRows, ServedTeacherRows, TeacherScores, TeacherTopLogprobs

# Logits per projection chunk when `chunk_size` is not given (positions = this / vocabulary size).
_LOGITS_PER_CHUNK = 1 << 26
# Vocabulary tile width of the recomputation in the backward pass.
_BACKWARD_VOCAB_TILE = 32768


class TokenSignals(NamedTuple):
    """Per-token signals, each `[B, T]` aligned to the targets and 0 where the mask is 0."""

    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    margins: torch.Tensor | None
    student_entropy: torch.Tensor
    features: TeachabilityFeatures | None = None  # TA-OPD features of `[B, T]` tensors, when asked for
    inexact_margins: torch.Tensor | None = None  # served teacher: margins that are a bound (`TeacherTopLogprobs`)

    @property
    def advantages(self) -> torch.Tensor:
        """`A_t = log pT(y_t) - log pS(y_t)`, detached (formula 1)."""
        return self.teacher_logprobs - self.student_logprobs.detach()


class OutputHead(NamedTuple):
    """An output projection and the logit post-processing its model applies."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model) -> OutputHead:
        """The head of a causal LM (or a PEFT model wrapping one), with its config's logit scaling and soft-capping."""
        config = model.config.get_text_config()
        # Same precedence as `trl.DistillationTrainer`: Cohere `logit_scale`, `output_multiplier`, Falcon-H1
        # `lm_head_multiplier`, then Granite/MiniCPM3 `logits_scaling` (a divisor, except for HyperCLOVA X).
        scale = getattr(config, "logit_scale", None)
        for name in ("output_multiplier", "lm_head_multiplier"):
            scale = getattr(config, name, None) if scale is None else scale
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        head = model.get_output_embeddings()
        return cls(
            head.weight,
            head.bias,
            1.0 if scale is None else float(scale),
            getattr(config, "final_logit_softcapping", None),
        )

    def truncated(self, rows: int | None) -> OutputHead:
        """The head restricted to its first `rows` rows (token ids `0..rows-1`); the same head when it has no more
        rows, or `rows` is None."""
        if rows is None or self.weight.shape[0] <= rows:
            return self
        return self._replace(weight=self.weight[:rows], bias=None if self.bias is None else self.bias[:rows])

    def materialized(self) -> OutputHead:
        """Gather FSDP2-sharded (DTensor) parameters once, so that chunks do not re-gather them."""
        weight, bias = self.weight, self.bias
        if isinstance(weight, torch.distributed.tensor.DTensor):
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        return self._replace(weight=weight, bias=bias)

    def logits(self, hidden: torch.Tensor, temperature: float, compute_dtype: torch.dtype) -> torch.Tensor:
        """Temperature-scaled fp32 logits of a chunk of hidden states `[n, H] -> [n, V]`."""
        z = hidden.to(compute_dtype) @ self.weight.to(compute_dtype).t()
        if self.bias is not None:
            z = z + self.bias.to(compute_dtype)
        z = z.float() * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / temperature


def shared_heads(student_head: OutputHead, teacher_head: OutputHead) -> tuple[OutputHead, OutputHead]:
    """Both heads materialised and restricted to the token ids they share, the first `min(V_student, V_teacher)` rows.

    Models that share one tokenizer often pad their output layers to different sizes (151,936 and 152,064 rows for
    one tokenizer of 151,665 tokens); the rows beyond the shared range belong to no token. Restricting both heads to
    it gives two distributions over the same ids; slicing the student's weight keeps its gradient (the padded rows
    get none).
    """
    student_head, teacher_head = student_head.materialized(), teacher_head.materialized()
    rows = min(student_head.weight.shape[0], teacher_head.weight.shape[0])
    return student_head.truncated(rows), teacher_head.truncated(rows)


def shared_vocab_size(*models) -> int:
    """The number of token ids every model's output head has a row for (`min` of their rows)."""
    return min(model.get_output_embeddings().weight.shape[0] for model in models)


class _ChunkedSignals(ChunkedLogProbFunction):
    """`log pS(y)` with TRL's chunked backward, plus the no-grad teacher signals computed in the same pass.

    Inputs 0-7 are those of `ChunkedLogProbFunction` (same saved tensors and context), so its backward applies as is.
    `teacher` gives the teacher's log-probs of a chunk of rows (`LocalTeacherRows`, `ServedTeacherRows`); with
    `teacher=None` (and no `top_k`, `feature_k`) only the student is projected and the teacher log-probs are 0.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, student, teacher, top_k, feature_k, chunk_size):
        device_type = hidden.device.type
        compute_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        )
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        log_z, target_logits, entropy, teacher_logprobs = hidden.new_zeros(4, n_tokens, dtype=torch.float32)
        margins = hidden.new_zeros(n_tokens, dtype=torch.float32) if top_k else None
        inexact = hidden.new_zeros(n_tokens, dtype=torch.bool) if top_k and teacher.top_n else None
        features = []
        # Autograd is off inside `forward`: nothing below is recorded.
        for start in range(0, n_tokens, chunk_size):
            rows = slice(start, min(start + chunk_size, n_tokens))
            z = student.logits(hidden[rows], temperature, compute_dtype)
            log_z[rows] = torch.logsumexp(z, dim=-1)
            target_logits[rows] = z.gather(-1, targets[rows, None]).squeeze(-1)
            student_logprobs = z - log_z[rows, None]
            # 0 * -inf (a masked-out vocabulary entry) is NaN: such entries contribute 0 to the entropy.
            entropy[rows] = -(student_logprobs.exp() * student_logprobs).nan_to_num_(0.0).sum(-1)
            if teacher is None:  # the teacher's scores were computed before (`TeacherScores`)
                continue
            t_logprobs = teacher.logprobs(rows, vocab, compute_dtype)
            teacher_logprobs[rows] = t_logprobs.gather(-1, targets[rows, None]).squeeze(-1)
            if top_k:
                candidates = z.topk(top_k, dim=-1).indices
                margins[rows] = support_margin(t_logprobs, candidates)
                if inexact is not None:
                    inexact[rows] = teacher.inexact(rows, candidates)
            if feature_k:
                features.append(features_from_logprobs(student_logprobs, t_logprobs, feature_k))
        _check_finite(log_z, "student")
        _check_finite(teacher_logprobs, "teacher", allow_neg_inf=True)
        teacher_logprobs.clamp_(min=LOG_PROB_FLOOR)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z)  # no entropy gradient: `log_z` fills it
        ctx.compute_dtype = compute_dtype
        ctx.chunk_size = min(vocab, _BACKWARD_VOCAB_TILE)
        ctx.kernel_args = {
            "logit_scale": student.logit_scale,
            "softcap": student.softcap or 1.0,
            "inv_t": 1 / temperature,
            "HAS_SOFTCAP": student.softcap is not None,
        }
        stacked = ()
        if feature_k:  # an all-masked batch has no chunk: three empty feature tensors
            empty = tuple(hidden.new_zeros(3, 0, dtype=torch.float32))
            stacked = tuple(torch.cat(parts) for parts in zip(*features)) if features else empty
        extra = (teacher_logprobs, entropy, *(x for x in (margins,) if x is not None), *stacked)
        extra += () if inexact is None else (inexact,)
        ctx.mark_non_differentiable(*extra)
        return (target_logits - log_z, *extra)

    @staticmethod
    def backward(ctx, grad_logprobs, *_):
        grads = ChunkedLogProbFunction.backward(ctx, grad_logprobs, None)
        return (*grads[:4], *([None] * (len(ctx.needs_input_grad) - 4)))


class SignalsError(FloatingPointError):
    """Non-finite logits reached the signals (the message names the model)."""


NON_FINITE_ADVICE = {
    "student": "The student's weights or activations overflowed: lower the learning rate, keep gradient clipping on "
    "(`max_grad_norm`), train in bf16 or fp32 rather than fp16, and resume from the last checkpoint.",
    "teacher": "The teacher overflowed in its dtype: load it in bf16 or fp32 rather than fp16 and check its weights "
    "(a teacher whose logits are all -inf at a position is not a distribution either).",
}


# Why the loss of finite signals can still be non-finite, by `loss_type`.
NON_FINITE_LOSS_CAUSE = {
    "parent": "The parent's divergence is infinite where the teacher gives a token probability 0 (a -inf logit, "
    "e.g. a masked vocabulary) that the student does not; use loss_type='advantage', whose teacher "
    "log-probabilities are floored at log(1e-12).",
    "advantage": "Both models' logits were finite; please report this with the run's config.",
}


def _check_finite(values: torch.Tensor, model: str, allow_neg_inf: bool = False) -> None:
    # One reduction over per-token values the pass computes anyway: NaN or +inf anywhere in a row of logits makes the
    # row's log-normaliser (student) or log-softmax (teacher) NaN/inf.
    bad = torch.isnan(values) | (values == math.inf) | (False if allow_neg_inf else values == -math.inf)
    if bool(bad.any()):
        raise SignalsError(
            f"The {model} model produced non-finite logits (NaN or inf) at {int(bad.sum())} completion position(s). "
            f"{NON_FINITE_ADVICE[model]}"
        )


def signals_from_hidden(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    top_k: int | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    feature_k: int | None = None,
    teacher_scores: TeacherScores | TeacherTopLogprobs | None = None,
) -> TokenSignals:
    """Per-token signals from hidden states already aligned to their targets.

    Args:
        student_hidden, teacher_hidden: `[B, T, H_s]`, `[B, T, H_t]`; position `t` predicts `targets[:, t]`.
        targets: `[B, T]` long, the sampled tokens.
        mask: `[B, T]`, non-zero where a signal is wanted; only those positions are projected.
        student_head, teacher_head: the output heads (`OutputHead.of(model)`). Heads with different numbers of rows
            (one tokenizer, padded to different sizes) are restricted to the ids both have (`shared_heads`); every
            target must be one of them. `teacher_head` may be `None` with `teacher_scores` (the student's ids).
        top_k: K of the teacher margin (formula 4), or `None` to skip the margins.
        temperature: logits are divided by it before every softmax.
        chunk_size: positions projected at a time (default: about 64M logits per chunk).
        feature_k: K of the TA-OPD token features, or `None` to skip them.
        teacher_scores: the teacher's scores computed elsewhere; `teacher_hidden` is then not read (it may be `None`)
            and only the student is projected. `TeacherScores` (e.g. while generating online) are used as they are
            (not with `feature_k`: the features need the teacher's distribution); `TeacherTopLogprobs` (a served
            teacher) give the margins and features on the student's candidates of this pass.
    """
    cached = isinstance(teacher_scores, TeacherScores)
    if cached and feature_k is not None:
        raise ValueError("The TA-OPD features need the teacher's distribution; cached teacher scores do not have it.")
    teacher_head = student_head if teacher_head is None else teacher_head
    rows = student_head.weight.shape[0], teacher_head.weight.shape[0]
    student_head, teacher_head = shared_heads(student_head, teacher_head)
    vocab = student_head.weight.shape[0]
    for name, k in (("top_k", top_k), ("feature_k", feature_k)):
        if k is not None:
            check_top_k(name, k, vocab, minimum=1)
    chunk_size = chunk_size or max(1, _LOGITS_PER_CHUNK // vocab)
    valid = mask.bool()
    if rows[0] != rows[1] and bool((outside := targets[valid] >= vocab).any()):
        raise ValueError(
            f"Token id {int(targets[valid][outside][0])} has no row in the teacher's output head: the student's head "
            f"has {rows[0]} rows and the teacher's {rows[1]}, and the signals compare the two distributions over the "
            f"{vocab} token ids both have. Only ids below {vocab} may be sampled (a tokenizer of at most {vocab} "
            "tokens, padded rows suppressed in generation)."
        )
    device = student_head.weight.device
    if cached:
        teacher = None
    elif teacher_scores is not None:  # `TeacherTopLogprobs`
        served = (x[valid.to(x.device)].to(device) for x in teacher_scores)
        teacher = ServedTeacherRows(targets[valid].to(device), *served)
    else:
        teacher = LocalTeacherRows(teacher_head, teacher_hidden[valid].to(teacher_head.weight.device), temperature)
    outputs = _ChunkedSignals.apply(
        student_hidden[valid].to(device),
        student_head.weight,
        student_head.bias,
        targets[valid].to(device),
        temperature,
        student_head,
        teacher,
        None if cached else top_k,
        feature_k,
        chunk_size,
    )

    def scatter(values: torch.Tensor) -> torch.Tensor:
        # `masked_scatter` keeps an all-masked batch connected to the graph (a differentiable zero).
        return values.new_zeros(mask.shape).masked_scatter(valid.to(values.device), values)

    student_logprobs, teacher_logprobs, entropy, *rest = (scatter(x) for x in outputs)
    margins = rest.pop(0) if top_k and not cached else None
    inexact = rest.pop() if top_k and teacher is not None and teacher.top_n else None
    if cached:
        on = valid.to(teacher_logprobs.device)
        teacher_logprobs, margins = (
            None if x is None else torch.where(on, x.to(teacher_logprobs), 0.0) for x in teacher_scores
        )
    features = TeachabilityFeatures(*rest) if feature_k else None
    return TokenSignals(student_logprobs, teacher_logprobs, margins, entropy, features, inexact)


def weighted_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`sum_t w_t * D_t` over the positions where `mask` is non-zero, `D_t` the parent's generalized JSD per token.

    `D_t` is `trl.DistillationTrainer`'s divergence (`beta`: 0 forward KL, 1 reverse KL, else generalized JSD),
    computed by TRL's `ChunkedDivergenceFunction` over the token ids both heads have (`shared_heads`); with `weights`
    equal to `mask` the sum is the parent's loss before its division by the number of tokens.

    Args:
        student_hidden, teacher_hidden: `[B, T, H_s]`, `[B, T, H_t]` hidden states aligned to their targets.
        mask: `[B, T]`, non-zero on the positions of the loss.
        weights: `[B, T]` per-token weights (the supervision weights).
        student_head, teacher_head: the output heads.
        beta: the parent's `beta`.
        temperature: logits are divided by it before every softmax.
    """
    valid = mask.bool()
    student_head, teacher_head = shared_heads(student_head, teacher_head)
    per_token, _ = ChunkedDivergenceFunction.apply(
        student_hidden[valid], *student_head[:2],
        teacher_hidden[valid], *teacher_head[:2],
        beta, temperature,
        student_head.logit_scale, student_head.softcap, teacher_head.logit_scale, teacher_head.softcap,
    )  # fmt: skip
    return (weights[valid] * per_token).sum()


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states `[B, L, H]` of a causal LM or of a PEFT model wrapping one."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def token_signals(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    top_k: int | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    feature_k: int | None = None,
) -> TokenSignals:
    """Per-token OPD signals of two causal LMs on the same token sequences.

    Args:
        student, teacher: causal LMs (or PEFT models) sharing a tokenizer; their output heads may be padded to
            different sizes (the signals are taken over the ids both have, see `shared_heads`).
        input_ids, attention_mask: `[B, L]` prompt + completion tokens (either padding side).
        completion_mask: `[B, L]`, 1 on the completion tokens that get signals.
        top_k: K of the teacher margin (formula 4), or `None` to skip it.
        temperature: training temperature.
        chunk_size: positions projected to the vocabulary at a time.
        feature_k: K of the TA-OPD token features, or `None` to skip them.

    Returns:
        `TokenSignals` with `[B, L]` fields aligned to `input_ids`: the value at position `t` is about token `t`,
        predicted from the tokens before it; 0 where `completion_mask` is 0 (and always at position 0).
        `student_logprobs` keeps the graph; the teacher runs under `torch.no_grad()`.
    """
    student_hidden = last_hidden_state(student, input_ids, attention_mask)[:, :-1]
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, input_ids, attention_mask)[:, :-1]
    inner = signals_from_hidden(
        student_hidden,
        teacher_hidden,
        input_ids[:, 1:],
        completion_mask[:, 1:],
        OutputHead.of(student),
        OutputHead.of(teacher),
        top_k,
        temperature,
        chunk_size,
        feature_k,
    )
    pad = lambda x: None if x is None else torch.nn.functional.pad(x, (1, 0))
    features = inner.features
    if features is not None:
        features = type(features)(*(pad(x) for x in features))
    return TokenSignals(*(pad(x) for x in inner[:4]), features)
