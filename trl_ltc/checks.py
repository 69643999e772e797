"""Construction checks of `TeachabilityGKDTrainer`: cheap ones that fail before two models are loaded.

A wrong dataset, a teacher missing, two tokenizers that differ or a top-K larger than the vocabulary are reported
with the field to change, in seconds, instead of after the models are built or in the first training step.
"""

from __future__ import annotations

import contextlib
import logging
import os

from datasets import Dataset, IterableDataset
from transformers import AutoConfig, AutoTokenizer, ProcessorMixin
from trl.trainer.utils import create_model_from_path

from .hooks import teacher_loader_replaced
from .prompts import validate_prompt_dataset

__all__ = [
    "MISSING_TEACHER",
    "check_datasets",
    "check_tokenizer_fits",
    "check_vocabularies",
    "parent_accepts_padded_heads",
    "suppress_padded_rows",
]

logger = logging.getLogger(__name__)

MISSING_TEACHER = (
    "TeachabilityGKDTrainer needs `teacher_model`; got None. Pass a model object, or a Hub id or local path that the "
    "trainer loads in this process (with `teacher_model_init_kwargs`, e.g. `{'dtype': 'bfloat16'}` or a "
    "quantization config, to make it smaller; sharded across GPUs with FSDP2 or DeepSpeed ZeRO-3), or set "
    "`teacher_server_url` in the config to score with a teacher served by another process (`docs/teacher_server.md`)."
)


def checked_args(model, teacher_model, args):
    """The trainer's `args`: a default `TeachabilityGKDConfig` named after the model when `None`; a clear error for
    another config class or a missing teacher."""
    from .config import TeachabilityGKDConfig

    served = getattr(args, "teacher_server_url", None) is not None
    if teacher_model is None and not served:
        raise ValueError(MISSING_TEACHER)
    if teacher_model is not None and served:
        raise ValueError(
            f"Both `teacher_model` and `teacher_server_url={args.teacher_server_url!r}` were given: pass "
            "`teacher_model=None` to use the served teacher, or unset `teacher_server_url` to use the local one."
        )
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        return TeachabilityGKDConfig(f"{str(name).rstrip('/').split('/')[-1]}-TeachabilityGKD")
    if not isinstance(args, TeachabilityGKDConfig):
        raise TypeError(
            f"`args` must be a `TeachabilityGKDConfig`, got {type(args).__name__}. Build one with the same "
            "fields: `TeachabilityGKDConfig(output_dir=..., ...)`."
        )
    return args


def check_datasets(train_dataset, eval_dataset) -> None:
    """Empty datasets and datasets without a usable `prompt` column fail here, before any model is loaded."""
    named = [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", value) for key, value in eval_dataset.items()]
    else:
        named.append(("eval_dataset", eval_dataset))
    for name, dataset in named:
        if isinstance(dataset, (Dataset, IterableDataset)):
            validate_prompt_dataset(dataset, name)


def _vocab_size(model, trust_remote_code: bool) -> int:
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
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


def check_vocabularies(
    model, teacher_model, processing_class, teacher_processing_class, trust_remote_code: bool = False
) -> tuple[int, int]:
    """Fail before anything is built unless the student and the teacher share one tokenizer; returns the two models'
    `vocab_size` (rows of their output heads).

    The two sizes may differ when one tokenizer's models pad their output layers differently (Qwen2.5-1.5B has 151,936
    rows, Qwen2.5-7B 152,064, for a tokenizer of 151,665 tokens): training then uses the first `min` of them, which
    must hold every token of the tokenizer. The teacher's tokenizer (given, or found in its local directory) must map
    every id as the student's does; without one, the trainer's processing class is the tokenizer of both.
    """
    student_size, teacher_size = _vocab_size(model, trust_remote_code), _vocab_size(teacher_model, trust_remote_code)
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
    check_tokenizer_fits(student_tok or teacher_tok, student_size, teacher_size)
    if student_size != teacher_size and teacher_tok is None:
        logger.warning(
            "The student's output head has %d rows and the teacher's %d; the teacher's tokenizer is not at hand, so "
            "the trainer's processing class is taken as the tokenizer of both and training uses token ids "
            "0..%d. Pass `teacher_processing_class` to have the two tokenizers compared.",
            student_size, teacher_size, min(student_size, teacher_size) - 1,
        )  # fmt: skip
    return student_size, teacher_size


def check_tokenizer_fits(tokenizer, student_size: int, teacher_size: int) -> None:
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
def parent_accepts_padded_heads(teacher_model, student_size: int, teacher_size: int):
    """Let `trl.DistillationTrainer.__init__` build a pair whose heads are padded to different sizes.

    The parent refuses a teacher whose `vocab_size` differs from the student's; `check_vocabularies` has accepted
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
        with teacher_loader_replaced(load):
            yield
    finally:
        for teacher in teachers:
            teacher.config.get_text_config().vocab_size = teacher_size


def suppress_padded_rows(trainer, student_rows: int) -> None:
    """The student never samples the rows of its head beyond the ids the teacher has (they belong to no token).

    Rows `trainer.vocab_size..student_rows-1` join the generation's `suppress_tokens`; with vLLM its sampling is
    restricted to the ids below `trainer.vocab_size`.
    """
    padded = range(trainer.vocab_size, student_rows)
    suppress = sorted({*(trainer.generation_kwargs.get("suppress_tokens") or ()), *padded})
    trainer.generation_kwargs["suppress_tokens"] = suppress
    trainer.generation_config.suppress_tokens = suppress
    if trainer.use_vllm:  # vLLM's `SamplingParams`
        trainer.vllm_generation.generation_kwargs.setdefault("allowed_token_ids", list(range(trainer.vocab_size)))
