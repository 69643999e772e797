"""`trl-ltc evaluate`: reverse KL to the teacher, answer accuracy and length of a checkpoint (`trl_ltc.evaluation`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation import (
    ANSWER_TYPES,
    METRICS_FILE,
    evaluate_model,
    load_eval_problems,
    load_for_evaluation,
    resolve_device_dtype,
)
from ._args import CONFIG_HELP, CommandParser, missing_error


@dataclass
class EvaluateArguments:
    """The options of `trl-ltc evaluate`; a `trl-ltc distill` recipe given to `--config` sets those it shares."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The checkpoint: a model id or directory, or a LoRA adapter directory."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model of a LoRA adapter (unset: the one its adapter_config.json names)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher the reverse KL is measured against (same vocabulary)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out problems: a .json/.jsonl/.parquet/.csv file, a directory or a `datasets` name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_test_split: str = field(
        default="train", metadata={"help": "Split of the held-out problems (a local file is the train split)."}
    )
    dataset_prompt_column: str = field(
        default="prompt", metadata={"help": "Column with the prompts, text or messages."}
    )
    dataset_prompt_as_chat: bool = field(
        default=False, metadata={"help": "Wrap text prompts into a user message (chat template)."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Text prompts become this, {prompt} replaced: '{prompt} Answer in \\boxed{}.'"},
    )
    answer_column: str = field(default="answer", metadata={"help": "Column with the reference answers."})
    answer_type: str = field(
        default="math",
        metadata={
            "help": "math (math-verify), choice (A-J letters) or statement (the lab task).",
            "choices": list(ANSWER_TYPES),
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "The quickstart's embedded teacher and student (the default --model_name_or_path) and its "
            "held-out math problems.",
            "choices": ["quickstart"],
        },
    )
    num_problems: int = field(default=64, metadata={"help": "First N problems (0: all)."})
    num_samples: int = field(
        default=1, metadata={"help": "Samples per problem; accuracy is pass@1 over them."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Completion length cap (unset: 256; with --preset quickstart: 96)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling and KL temperature."})
    batch_size: int = field(default=8, metadata={"help": "Completions sampled and scored at a time."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    device: str | None = field(default=None, metadata={"help": "torch device; unset: cuda if available, else cpu."})
    dtype: str = field(
        default="auto",
        metadata={"help": "Model dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Where the metrics JSON goes: a directory (OUTPUT_DIR/{METRICS_FILE}) or a path ending in "
            f".json (unset: MODEL_NAME_OR_PATH/{METRICS_FILE} for a local model directory, else ./{METRICS_FILE}). "
            "Not read from --config: a recipe's output_dir is its training folder."
        },
    )
    save_samples: bool = field(
        default=False, metadata={"help": "Also write every completion and its verdict next to the JSON."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})


DEPRECATED_FLAGS = {
    "--model": "--model_name_or_path",
    "--teacher": "--teacher_model_name_or_path",
    "--dataset": "--dataset_name",
    "--dataset_split": "--dataset_test_split",
    "--prompt_column": "--dataset_prompt_column",
    "--prompt_as_chat": "--dataset_prompt_as_chat",
    "--max_new_tokens": "--max_completion_length",
    "--output": "--output_dir",
    "--no_progress": "--disable_tqdm",
}


def build_parser(prog: str = "trl-ltc evaluate") -> CommandParser:
    """The parser of `trl-ltc evaluate`; `parse_command(argv)` returns its `EvaluateArguments`."""
    return CommandParser(
        [EvaluateArguments],
        aliases=DEPRECATED_FLAGS,
        config_exclude=("output_dir",),
        prog=prog,
        description="Evaluate a checkpoint (base model, full fine-tune or LoRA adapter) on held-out problems: mean "
        "per-token reverse KL(model || teacher) on its own samples (exact over the vocabulary), answer accuracy "
        "(pass@1 over --num_samples samples, checked with math-verify), mean completion length. Prints the metrics "
        "and saves them as JSON. " + CONFIG_HELP + " A `trl-ltc distill` recipe works as is (its other keys are "
        "ignored): `--config RECIPE --model_name_or_path runs/x` evaluates a trained checkpoint against the recipe's "
        "teacher on its dataset.",
    )


def parse_args(argv: list[str] | None = None) -> EvaluateArguments:
    """The `EvaluateArguments` of `argv` (and of its `--config` file), not yet checked."""
    return build_parser().parse_command(argv)


def format_metrics(metrics: dict) -> str:
    """A few human-readable lines for one model's metrics."""
    kl, accuracy = metrics["reverse_kl"], metrics["accuracy"]
    lines = []
    if kl is not None:
        lines.append(f"reverse KL         {kl:.4f} nats/token (KL(model || teacher) on the model's own samples)")
    if accuracy is not None:
        stderr = metrics.get("accuracy_stderr")
        spread = f" +- {100 * stderr:.1f}" if stderr is not None else ""
        lines.append(
            f"accuracy           {100 * accuracy:.1f}%{spread} (pass@1 over {metrics['num_samples']} sample(s) of "
            f"{metrics['num_problems']} problems; +- one standard error over problems)"
        )
    lines.append(
        f"completion length  {metrics['completion_length']:.1f} tokens ({100 * metrics['truncated_frac']:.0f}% cut at "
        f"{metrics['max_new_tokens']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc evaluate ...`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_command(argv)
    if args.preset:
        from .. import embedded

        teacher_dir, student_dir = embedded.prepare_smollm2_pair()
        args.model_name_or_path = args.model_name_or_path or student_dir
        args.teacher_model_name_or_path = args.teacher_model_name_or_path or teacher_dir
        args.dataset_name = args.dataset_name or embedded.quickstart_dataset_path("test")
    if args.max_completion_length is None:
        args.max_completion_length = 96 if args.preset else 256  # the quickstart trains on 96-token completions
    missing = [
        name
        for name in ("model_name_or_path", "teacher_model_name_or_path", "dataset_name")
        if getattr(args, name) is None
    ]
    if missing:
        missing_error(parser, missing, "or use --preset quickstart")
    for name in ("num_samples", "max_completion_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.num_problems < 0:
        parser.error(f"--num_problems must be >= 0 (0: all); got {args.num_problems}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0; got {args.temperature}")

    prompts, answers = load_eval_problems(
        args.dataset_name, args.dataset_test_split, args.dataset_config, args.dataset_prompt_column,
        args.answer_column, args.dataset_prompt_as_chat, args.num_problems or None, args.prompt_template,
    )  # fmt: skip
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, tokenizer = load_for_evaluation(args.model_name_or_path, args.base_model, dtype, device)
    teacher, _ = load_for_evaluation(args.teacher_model_name_or_path, None, dtype, device)
    metrics = evaluate_model(
        model, teacher, tokenizer, prompts, answers,
        num_samples=args.num_samples, max_new_tokens=args.max_completion_length, batch_size=args.batch_size,
        temperature=args.temperature, seed=args.seed, answer_type=args.answer_type, progress=not args.disable_tqdm,
    )  # fmt: skip
    samples = metrics.pop("samples")
    metrics.update(model=args.model_name_or_path, base_model=args.base_model, teacher=args.teacher_model_name_or_path)
    metrics.update(dataset=args.dataset_name, dataset_split=args.dataset_test_split, answer_type=args.answer_type)
    output = output_path(args.output_dir, args.model_name_or_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.save_samples:
        with open(output.with_suffix(".samples.jsonl"), "w", encoding="utf-8") as file:
            file.writelines(json.dumps(sample) + "\n" for sample in samples)
    print(f"\n{args.model_name_or_path} on {metrics['num_problems']} problems of {args.dataset_name}:")
    print(format_metrics(metrics))
    print(f"saved              {output}")
    return 0


def output_path(output_dir: str | None, model: str) -> Path:
    """Where the metrics JSON goes: `output_dir` if it ends in `.json`, else `output_dir/eval_metrics.json`; unset:
    `model/eval_metrics.json` for a local model directory, else `./eval_metrics.json`."""
    if output_dir is not None:
        path = Path(os.path.expanduser(output_dir))
        return path if path.suffix == ".json" else path / METRICS_FILE
    return _default_output(model)


def _default_output(model: str) -> Path:
    local = Path(os.path.expanduser(model))
    return local / METRICS_FILE if local.is_dir() else Path(METRICS_FILE)
