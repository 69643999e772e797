"""Evaluating a student against its teacher: divergence on its own samples, answer accuracy, completion length.

`reverse_kl` is the mean, over the completion tokens of some rollouts, of the exact per-token reverse KL

    KL(pS || pT)(x, y_<t) = sum_v pS(v | x, y_<t) * (log pS(v | x, y_<t) - log pT(v | x, y_<t))

over the full vocabulary, the quantity on-policy distillation minimises. Logits are projected from each model's last
hidden states a chunk of positions at a time (`trl_ltc.signals.OutputHead`), so no `(batch, length, vocab)` tensor is
built. `heldout_reverse_kl` samples the rollouts from the student first (`trl_ltc.generation.sample_completions`).

`evaluate_model` samples `num_samples` completions per held-out problem once and measures on them: the reverse KL,
the answer accuracy (pass@1, the mean over problems of the fraction of correct samples, checked by
`answer_is_correct`), the mean completion length and the fraction of completions cut at the length cap.

`answer_is_correct` uses the `math-verify` package: it extracts the completion's final answer (a `\\boxed{}` or
`$...$` answer or an "answer is ..." statement first, else the last number or expression of the text) and compares it
with the reference answer mathematically (`12` = `12.0` = `$\\frac{24}{2}$`, `0.75` = `3/4`). Multiple-choice sets
(`answer_type="choice"`) compare the chosen letter instead (`choice_letter`).

`trl-ltc evaluate` (`trl_ltc.commands.evaluate`) runs `evaluate_model` on any checkpoint (a base model, a full
fine-tune or a LoRA adapter directory) and prints and saves the metrics. Everything here works with any causal LM, or
a PEFT model wrapping one, and leaves the models' train/eval modes as they found them.

## Modules

- `metrics`: `token_reverse_kl`, `reverse_kl`, `heldout_reverse_kl`, `student_rollouts`, `release_prefix_mask`.
- `grading`: `answer_is_correct`, `choice_letter`, `ANSWER_TYPES`.
- `loading`: `load_for_evaluation`, `resolve_device_dtype`, `load_eval_problems`.
- `evaluate`: `evaluate_model`.

All of them are importable from `trl_ltc.evaluation`.
"""

from .evaluate import METRICS_FILE, evaluate_model
from .grading import ANSWER_TYPES, answer_is_correct, choice_letter
from .loading import load_eval_problems, load_for_evaluation, resolve_device_dtype
from .metrics import heldout_reverse_kl, release_prefix_mask, reverse_kl, student_rollouts, token_reverse_kl

__all__ = [
    "ANSWER_TYPES",
    "METRICS_FILE",
    "answer_is_correct",
    "choice_letter",
    "evaluate_model",
    "heldout_reverse_kl",
    "load_eval_problems",
    "load_for_evaluation",
    "release_prefix_mask",
    "resolve_device_dtype",
    "reverse_kl",
    "student_rollouts",
    "token_reverse_kl",
]


def __getattr__(name):  # the command line, now in `trl_ltc.commands.evaluate`
    if name in ("build_parser", "format_metrics", "main"):
        from ..commands import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
