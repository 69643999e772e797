"""`trl-ltc evaluate`: reverse KL to the teacher, answer accuracy and length of a checkpoint (`trl_ltc.evaluation`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..evaluation import (
    ANSWER_TYPES,
    METRICS_FILE,
    evaluate_model,
    load_eval_problems,
    load_for_evaluation,
    resolve_device_dtype,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ltc evaluate",
        description="Evaluate a checkpoint (base model, full fine-tune or LoRA adapter) on held-out problems: mean "
        "per-token reverse KL(model || teacher) on its own samples (exact over the vocabulary), answer accuracy "
        "(pass@1 over --num_samples samples, checked with math-verify), mean completion length. Prints the metrics "
        "and saves them as JSON.",
    )
    add = parser.add_argument
    add("--model", help="The checkpoint: a model id or directory, or a LoRA adapter directory.")
    add("--base_model", help="Base model of a LoRA adapter (default: the one its adapter_config.json names).")
    add("--teacher", help="The teacher the reverse KL is measured against (same vocabulary).")
    add("--dataset", help="Held-out problems: a .json/.jsonl/.parquet/.csv file, a directory or a `datasets` name.")
    add("--dataset_config", help="Dataset configuration name.")
    add("--dataset_split", default="train", help="Split (default: train; a local file is the train split).")
    add("--prompt_column", default="prompt", help="Column with the prompts, text or messages (default: prompt).")
    add("--prompt_as_chat", action="store_true", help="Wrap text prompts into a user message (chat template).")
    add("--prompt_template", help="Text prompts become this, {prompt} replaced: '{prompt} Answer in \\boxed{}.'")
    add("--answer_column", default="answer", help="Column with the reference answers (default: answer).")
    add("--answer_type", choices=ANSWER_TYPES, default="math", help="math (math-verify) or choice (A-J letters).")
    add(
        "--preset",
        choices=["quickstart"],
        help="The quickstart's embedded teacher and student (the default --model) and its held-out math problems.",
    )
    add("--num_problems", type=int, default=64, help="First N problems (default: 64; 0: all).")
    add("--num_samples", type=int, default=1, help="Samples per problem; accuracy is pass@1 over them (default: 1).")
    add("--max_new_tokens", type=int, help="Completion length cap (default: 256; with --preset quickstart: 96).")
    add("--temperature", type=float, default=1.0, help="Sampling and KL temperature (default: 1.0).")
    add("--batch_size", type=int, default=8, help="Completions sampled and scored at a time (default: 8).")
    add("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    add("--device", help="torch device (default: cuda if available, else cpu).")
    add("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="Model dtype.")
    add("--output", help=f"Where the metrics JSON goes (default: MODEL/{METRICS_FILE} for a local MODEL directory).")
    add("--save_samples", action="store_true", help="Also write every completion and its verdict next to the JSON.")
    add("--no_progress", action="store_true", help="Hide progress bars.")
    return parser


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
    args = parser.parse_args(argv)
    if args.preset:
        from .. import embedded

        teacher_dir, student_dir = embedded.prepare_smollm2_pair()
        args.model = args.model or student_dir
        args.teacher = args.teacher or teacher_dir
        args.dataset = args.dataset or embedded.quickstart_dataset_path("test")
    if args.max_new_tokens is None:
        args.max_new_tokens = 96 if args.preset else 256  # the quickstart trains on 96-token completions
    missing = [f"--{name}" for name in ("model", "teacher", "dataset") if getattr(args, name) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --preset quickstart)")
    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.num_problems < 0:
        parser.error(f"--num_problems must be >= 0 (0: all); got {args.num_problems}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0; got {args.temperature}")

    prompts, answers = load_eval_problems(
        args.dataset, args.dataset_split, args.dataset_config, args.prompt_column, args.answer_column,
        args.prompt_as_chat, args.num_problems or None, args.prompt_template,
    )  # fmt: skip
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model, tokenizer = load_for_evaluation(args.model, args.base_model, dtype, device)
    teacher, _ = load_for_evaluation(args.teacher, None, dtype, device)
    metrics = evaluate_model(
        model, teacher, tokenizer, prompts, answers,
        num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        temperature=args.temperature, seed=args.seed, answer_type=args.answer_type, progress=not args.no_progress,
    )  # fmt: skip
    samples = metrics.pop("samples")
    metrics.update(model=args.model, base_model=args.base_model, teacher=args.teacher, dataset=args.dataset)
    metrics.update(dataset_split=args.dataset_split, answer_type=args.answer_type)
    output = Path(args.output) if args.output else _default_output(args.model)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(metrics, indent=2) + "\n")
    if args.save_samples:
        with open(output.with_suffix(".samples.jsonl"), "w", encoding="utf-8") as file:
            file.writelines(json.dumps(sample) + "\n" for sample in samples)
    print(f"\n{args.model} on {metrics['num_problems']} problems of {args.dataset}:")
    print(format_metrics(metrics))
    print(f"saved              {output}")
    return 0


def _default_output(model: str) -> Path:
    local = Path(os.path.expanduser(model))
    return local / METRICS_FILE if local.is_dir() else Path(METRICS_FILE)
