"""`trl-ltc diagnose`: measure local teachability collapse on a teacher/student pair (`trl_ltc.diagnostics`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..diagnostics.analysis import online_replay, online_summary_lines, summarize_online
from ..diagnostics.pipeline import _load_prompts, diagnose
from ..diagnostics.records import DEFAULT_BINS, write_records
from ..segmentation import SEGMENTATION_METHODS
from ..teachability import TOKEN_SCORES


def _preset(name: str) -> dict:
    """Resolve `--preset`. PRESET HOOK: `quickstart` needs `trl_ltc.embedded.prepare_smollm2_pair()` returning
    `(teacher_dir, student_dir)` and `trl_ltc.embedded.quickstart_dataset_path()` (imported lazily)."""
    from importlib import import_module

    if name != "quickstart":
        raise ValueError(f"Unknown preset {name!r}; available: quickstart.")
    try:
        embedded = import_module("trl_ltc.embedded")
        teacher_dir, student_dir = embedded.prepare_smollm2_pair()
        dataset = embedded.quickstart_dataset_path()
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            f"--preset quickstart needs the embedded SmolLM2 pair (trl_ltc.embedded), unavailable here: {error}"
        ) from error
    return {"student": str(student_dir), "teacher": str(teacher_dir), "dataset": str(dataset)}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"every K must be >= 2, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ltc diagnose",
        description="Measure local teachability collapse on a teacher/student pair: sample student completions, "
        "score them with the teacher exactly as TeachabilityGKDTrainer does (release rule and TA-OPD token "
        "teachability), and write records.jsonl, margin_curve.png, release.png, support_sweep.png, "
        "teachability.png, cases.html and summary.md.",
    )
    add = parser.add_argument
    add("--student", help="Student model id or local path (its tokenizer is used).")
    add("--teacher", help="Teacher model id or local path (same vocabulary as the student).")
    add(
        "--dataset",
        help="Prompts: a local .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory or a `datasets` name, "
        "with a 'prompt' column (text or conversational messages).",
    )
    add("--dataset_config", default=None, help="Dataset configuration name (hub datasets).")
    add("--dataset_split", default="train", help="Dataset split (default: train).")
    add(
        "--preset",
        choices=["quickstart"],
        help="Use the quickstart's embedded SmolLM2 teacher/student and prompts "
        "(explicit --student/--teacher/--dataset still win).",
    )
    add("--num_prompts", type=int, default=64, help="Number of prompts (the first N; default: 64).")
    add("--top_k", type=int, default=10, help="K: the student's top-K support of the teacher margin (default: 10).")
    add(
        "--top_k_sweep",
        type=_int_list,
        default=[2, 5, 10, 20],
        help="Comma-separated K values for support_sweep.png (default: 2,5,10,20).",
    )
    add(
        "--segmentation",
        choices=SEGMENTATION_METHODS,
        default="nltk",
        help="Segments: NLTK sentences (default), lines, or fixed token windows.",
    )
    add("--segment_window", type=int, default=64, help="Tokens per segment with --segmentation fixed (default: 64).")
    add("--token_top_k", type=int, default=16, help="K of the TA-OPD token features (default: 16).")
    add(
        "--token_score",
        choices=TOKEN_SCORES,
        default="teachability",
        help="TA-OPD token score for teachability.png (default: teachability).",
    )
    add(
        "--token_keep_ratio",
        type=float,
        default=0.05,
        help="Share of each scoring batch's tokens TA-OPD keeps, in (0, 1] (default: 0.05).",
    )
    add("--token_min_keep", type=int, default=1, help="TA-OPD tokens kept per trajectory at least (default: 1).")
    add("--max_completion_length", type=int, default=256, help="Maximum sampled tokens per prompt (default: 256).")
    add("--batch_size", type=int, default=8, help="Prompts per generation/scoring batch (default: 8).")
    add("--temperature", type=float, default=1.0, help="Sampling and scoring temperature (default: 1.0).")
    add("--seed", type=int, default=0, help="Sampling seed (default: 0).")
    add("--num_cases", type=int, default=8, help="Trajectories shown in cases.html (default: 8).")
    add("--bins", type=int, default=DEFAULT_BINS, help="Relative-position bins of the curves (default: 20).")
    add("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    add(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Model dtype (default: bfloat16 on CUDA if supported, else float32).",
    )
    add(
        "--online_min_segments",
        type=int,
        default=3,
        help="Online release replay: complete segments needed before a stop (default: 3).",
    )
    add(
        "--online_patience",
        type=int,
        default=2,
        help="Online release replay: complete segments after the drop before a stop (default: 2).",
    )
    add(
        "--online_check_tokens",
        type=int,
        default=16,
        help="Online release replay: generated tokens between two decisions, for the saved tokens (default: 16).",
    )
    add(
        "--replay",
        metavar="RECORDS_JSONL",
        help="Replay the online release rule on recorded trajectories (records.jsonl, or release_records.jsonl "
        "of a training run) instead of sampling: writes online_replay.jsonl and online_replay.md into "
        "--output_dir; no model is loaded.",
    )
    add("--output_dir", default="out/diagnose", help="Where the files are written (default: out/diagnose).")
    add("--no_progress", action="store_true", help="Hide progress bars.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc diagnose ...`; returns the exit status."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("online_min_segments", "online_patience", "online_check_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.replay:
        return _replay_main(args)
    if args.preset:
        try:
            preset = _preset(args.preset)
        except RuntimeError as error:  # the embedded pair could not be prepared; the message says why
            parser.exit(1, f"trl-ltc diagnose: error: {error}\n")
        for key, value in preset.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    missing = [f"--{name}" for name in ("student", "teacher", "dataset") if getattr(args, name) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)} (or use --preset quickstart)")
    for name in ("num_prompts", "batch_size", "max_completion_length", "segment_window", "num_cases", "bins"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.top_k < 2:
        parser.error(f"--top_k must be >= 2; got {args.top_k}")
    if args.token_top_k < 1 or args.token_min_keep < 0:
        parser.error(
            f"--token_top_k must be >= 1 and --token_min_keep >= 0; got {args.token_top_k}, {args.token_min_keep}"
        )
    if not 0 < args.token_keep_ratio <= 1:
        parser.error(f"--token_keep_ratio must be in (0, 1]; got {args.token_keep_ratio}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0; got {args.temperature}")

    from ..evaluation import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)

    dataset = _load_prompts(args.dataset, args.dataset_config, args.dataset_split)
    n = min(args.num_prompts, len(dataset))
    if n == 0:
        parser.error(f"the dataset {args.dataset!r} has no prompts")
    subset = dataset.select(range(n))
    prompt_ids = subset["id"] if "id" in subset.column_names else list(range(n))

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(device)
    settings = {
        "student": args.student,
        "teacher": args.teacher,
        "dataset": args.dataset,
        "num_prompts": n,
        "top_k": args.top_k,
        "top_k_sweep": ",".join(map(str, args.top_k_sweep)),
        "segmentation": args.segmentation if args.segmentation != "fixed" else f"fixed ({args.segment_window})",
        "max_completion_length": args.max_completion_length,
        "temperature": args.temperature,
        "seed": args.seed,
        "TA-OPD": f"score={args.token_score}, K={args.token_top_k}, keep_ratio={args.token_keep_ratio}, "
        f"min_keep={args.token_min_keep}, batch={args.batch_size}",
    }
    files = diagnose(
        student,
        teacher,
        tokenizer,
        subset["prompt"],
        args.output_dir,
        prompt_ids=prompt_ids,
        top_k=args.top_k,
        top_k_sweep=args.top_k_sweep or [args.top_k],
        segmentation=args.segmentation,
        segment_window=args.segment_window,
        max_completion_length=args.max_completion_length,
        batch_size=args.batch_size,
        temperature=args.temperature,
        seed=args.seed,
        num_cases=args.num_cases,
        bins=args.bins,
        progress=not args.no_progress,
        settings=settings,
        token_top_k=args.token_top_k,
        token_score=args.token_score,
        token_keep_ratio=args.token_keep_ratio,
        token_min_keep=args.token_min_keep,
        online_min_segments=args.online_min_segments,
        online_patience=args.online_patience,
        online_check_tokens=args.online_check_tokens,
    )
    print(f"Wrote {', '.join(files)} to {os.path.abspath(args.output_dir)}")
    return 0


def _replay_main(args) -> int:
    """`trl-ltc diagnose --replay records.jsonl`: the online release replay of recorded trajectories."""
    path = Path(args.replay)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    replayed = online_replay(records, args.online_min_segments, args.online_patience, args.online_check_tokens)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    keys = ("index", "prompt_id", "step", "num_segments", "completion_length", "release_segment", "accepted")
    write_records(
        [{**{k: r.get(k) for k in keys}, **o} for r, o in zip(records, replayed)], output_dir / "online_replay.jsonl"
    )
    settings = (
        f"{len(records)} trajectories of `{path}`; online_min_segments={args.online_min_segments}, "
        f"online_patience={args.online_patience}, online_check_tokens={args.online_check_tokens}."
    )
    lines = online_summary_lines(summarize_online(records, replayed), settings)
    (output_dir / "online_replay.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"Wrote online_replay.jsonl, online_replay.md to {os.path.abspath(output_dir)}")
    return 0
