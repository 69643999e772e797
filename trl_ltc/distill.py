"""Building a `TeachabilityGKDTrainer` from a YAML recipe and/or command-line flags (`trl-ltc distill`).

The library side of `trl-ltc distill` (`trl_ltc.commands.distill`), the counterpart of `trl/scripts/distillation.py`:
the same `TrlParser` over TRL's `ScriptArguments`, the trainer's config (`TeachabilityGKDConfig`), `ModelConfig` and
`DatasetMixtureConfig`, so every TRL flag works, plus the supervision fields (`--supervision`, `--release_top_k`,
...). Flags override the values of `--config`.

    trl-ltc distill --config configs/qwen3-1.7b_from_qwen3-30b-a3b.yaml --output_dir out
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/distill.py --config RECIPE.yaml
    trl-ltc distill --model_name_or_path STUDENT --teacher_model_name_or_path TEACHER \\
        --dataset_name prompts.jsonl --use_peft --lora_r 16 --lora_target_modules all-linear

The prompts (`--dataset_name`: a local .json/.jsonl/.parquet/.csv file, a directory or a Hub dataset; or a `datasets:`
mixture in the YAML) are loaded and checked before any model is loaded.

From Python, without an argument list:

    script_args, training_args, model_args, dataset_args = recipe_args(yaml.safe_load(open("recipe.yaml")))
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from trl import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)

from .config import TeachabilityGKDConfig
from .prompts import PROMPT_COLUMN, load_prompt_dataset, prepare_prompt_dataset

logger = logging.getLogger(__name__)


@dataclass
class DistillScriptArguments(ScriptArguments):
    """TRL's `ScriptArguments` plus how prompts are read from a dataset without a `prompt` column."""

    dataset_prompt_column: str = field(
        default=PROMPT_COLUMN,
        metadata={
            "help": "Column of the dataset that holds the prompts; renamed to `prompt` for the trainer (e.g. "
            "`question` for zwhe99/DeepMath-103K)."
        },
    )
    dataset_prompt_as_chat: bool = field(
        default=False,
        metadata={
            "help": "Wrap each text prompt into one user message so that the tokenizer's chat template is applied "
            "(for chat/instruct students). Conversational prompts are left as they are."
        },
    )


DATACLASS_TYPES = (DistillScriptArguments, TeachabilityGKDConfig, ModelConfig, DatasetMixtureConfig)
DistillArguments = tuple[DistillScriptArguments, TeachabilityGKDConfig, ModelConfig, DatasetMixtureConfig]


def load_prompts(script_args: DistillScriptArguments, training_args: TeachabilityGKDConfig, dataset_args):
    """The train (and, when `eval_strategy` is set, eval) prompt datasets, validated and with a `prompt` column."""
    evaluate = training_args.eval_strategy != "no"
    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set; the `datasets` mixture is used.")
        name = ", ".join(dataset.path for dataset in dataset_args.datasets)
        splits = get_dataset(dataset_args)
        if evaluate and "test" not in splits:
            raise ValueError(
                "`eval_strategy` is set but the `datasets` mixture has no test split; set `test_split_size`."
            )
        train, test = splits["train"], splits["test"] if evaluate else None
    elif script_args.dataset_name:
        name = script_args.dataset_name
        load = functools.partial(
            load_prompt_dataset, name, script_args.dataset_config, streaming=script_args.dataset_streaming
        )
        train = load(split=script_args.dataset_train_split)
        test = load(split=script_args.dataset_test_split) if evaluate else None
    else:
        raise ValueError(
            "No prompts: set `--dataset_name` (a local .jsonl/.json/.parquet/.csv file, a directory or a Hub dataset) "
            "or a `datasets:` list in the YAML config."
        )
    column, as_chat = script_args.dataset_prompt_column, script_args.dataset_prompt_as_chat
    train = prepare_prompt_dataset(train, name, column, as_chat)
    if test is not None:
        test = prepare_prompt_dataset(test, f"{name} (eval split)", column, as_chat)
    return train, test


def _init_kwargs(overrides: dict | None, **defaults) -> dict:
    return {**defaults, **(overrides or {})}


def teacher_init_kwargs(training_args: TeachabilityGKDConfig, model_args: ModelConfig) -> dict:
    """Keyword arguments the teacher is loaded with: `teacher_model_init_kwargs` over the model flags (dtype,
    attention implementation) and the teacher's revision; unquantized unless `teacher_model_init_kwargs` says so."""
    return _init_kwargs(
        training_args.teacher_model_init_kwargs,
        revision=training_args.teacher_model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )


def recipe_args(recipe: dict, flags: Sequence[str] = ()) -> DistillArguments:
    """The four argument dataclasses of a `trl-ltc distill` recipe, the mapping of a YAML file given to `--config`.

    The recipe is read exactly as `trl-ltc distill --config RECIPE.yaml [FLAGS...]` reads it (TRL's `TrlParser` over
    `DATACLASS_TYPES`): its values become the parser's defaults, so that they are converted by each field's type as a
    flag's value would be (a YAML string such as `1e-4` becomes a float); `flags` (e.g. `["--max_steps", "2"]`)
    override them; an `env` mapping sets environment variables. An unknown field is a `ValueError`.

    Args:
        recipe: field -> value, e.g. `yaml.safe_load` of a recipe file.
        flags: `trl-ltc distill` command-line flags over the recipe.

    Returns:
        `(script_args, training_args, model_args, dataset_args)`: `DistillScriptArguments`, `TeachabilityGKDConfig`,
        `trl.ModelConfig` and `trl.DatasetMixtureConfig`, to pass to `build_trainer`.
    """
    recipe = dict(recipe)
    env = recipe.pop("env", None)
    if env is not None:
        if not isinstance(env, dict):
            raise ValueError("`env` field should be a dict in the YAML file.")
        os.environ.update({key: str(value) for key, value in env.items()})
    parser = TrlParser(DATACLASS_TYPES)
    unknown = parser.set_defaults_with_config(**recipe)
    if unknown:
        raise ValueError(
            f"Unknown arguments from config file: {unknown}. Please remove them, add them to the dataclass, or set "
            "`fail_with_unknown_args=False`."
        )
    with explain_bf16():
        return tuple(parser.parse_args_into_dataclasses(args=list(flags)))


@contextlib.contextmanager
def explain_bf16():
    """Name the flags that override a GPU recipe when the arguments are refused for `bf16` on this machine.

    GPU recipes set `bf16: true`; on a machine without a bf16-capable GPU transformers refuses it with a message that
    does not say how to override a recipe, so the error raised here names the flags that do.
    """
    try:
        yield
    except ValueError as error:
        if "support bf16" not in str(error):  # transformers: "Your setup doesn't support bf16/gpu."
            raise
        raise ValueError(
            f"{error} To run a GPU recipe (`bf16: true`) on this machine, pass `--bf16 false --use_cpu true` (flags "
            "override the recipe), or set `bf16: false` and `use_cpu: true` in the YAML."
        ) from error


def load_teacher(training_args: TeachabilityGKDConfig, model_args: ModelConfig):
    """The teacher of the arguments, loaded as `build_trainer` would load it; pass it to
    `build_trainer(..., teacher_model=...)` so that several trainers share one teacher in memory."""
    from trl.trainer.utils import create_model_from_path

    if training_args.teacher_model_name_or_path is None:
        raise ValueError("Set the teacher with `--teacher_model_name_or_path` (a Hub id or a local directory).")
    kwargs = teacher_init_kwargs(training_args, model_args)
    return create_model_from_path(training_args.teacher_model_name_or_path, **kwargs).eval()


def build_trainer(
    script_args: DistillScriptArguments,
    training_args: TeachabilityGKDConfig,
    model_args: ModelConfig,
    dataset_args: DatasetMixtureConfig | None = None,
    teacher_model=None,
):
    """Load and check the prompts, then build the trainer; do not train.

    Args:
        script_args: the prompts (`dataset_name`, `dataset_prompt_column`, ...).
        training_args: the trainer's config; its `model_init_kwargs` and `teacher_model_init_kwargs` are completed
            from `model_args`.
        model_args: the student (`model_name_or_path`), its dtype, quantization and LoRA settings.
        dataset_args: a `datasets:` mixture, used instead of `script_args.dataset_name` when it has datasets.
        teacher_model: an already loaded teacher (see `load_teacher`) to use instead of loading
            `teacher_model_name_or_path`; the trainer does not modify it, so several trainers can share it.

    The four arguments are what `recipe_args` returns for a recipe, or `trl-ltc distill`'s parser for its flags.

    Returns:
        The `TeachabilityGKDTrainer`.
    """
    from .trainer import TeachabilityGKDTrainer

    dataset_args = dataset_args if dataset_args is not None else DatasetMixtureConfig()
    if model_args.model_name_or_path is None:
        raise ValueError("Set the student with `--model_name_or_path` (a Hub id or a local directory).")
    served = training_args.teacher_server_url is not None
    if training_args.teacher_model_name_or_path is None and teacher_model is None and not served:
        raise ValueError(
            "Set the teacher with `--teacher_model_name_or_path` (a Hub id or a local directory), or serve it and "
            "set `--teacher_server_url`."
        )

    # The prompts first: a wrong column or an empty file fails here, before two models are loaded.
    with training_args.main_process_first(desc="loading the prompts"):
        train_dataset, eval_dataset = load_prompts(script_args, training_args, dataset_args)

    # As in `trl/scripts/distillation.py`: the student's quantization goes through the trainer's
    # `quantization_config`; the teacher is loaded unquantized unless `teacher_model_init_kwargs` says otherwise.
    training_args.model_init_kwargs = _init_kwargs(
        training_args.model_init_kwargs,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if served:  # scored by the server (`trl_ltc.teacher_server`): no teacher in this process
        training_args.teacher_model_init_kwargs, teacher_model = None, None
    elif teacher_model is None:
        training_args.teacher_model_init_kwargs = teacher_init_kwargs(training_args, model_args)
        teacher_model = training_args.teacher_model_name_or_path
    else:  # already loaded (with `teacher_init_kwargs`); the parent refuses init kwargs for a model object
        training_args.teacher_model_init_kwargs = None
    return TeachabilityGKDTrainer(
        model=model_args.model_name_or_path,
        teacher_model=teacher_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )


def __getattr__(name):  # the command line, now in `trl_ltc.commands.distill`
    if name in ("DESCRIPTION", "build_parser", "parse_args", "main"):
        from .commands import distill

        return getattr(distill, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from .commands.distill import main

    sys.exit(main())
