"""`trl-ltc diagnose`: measure local teachability collapse on a teacher/student pair (`trl_ltc.diagnostics`)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..diagnostics.analysis import online_replay, online_summary_lines, summarize_online
from ..diagnostics.pipeline import _load_prompts, diagnose
from ..diagnostics.records import DEFAULT_BINS, write_records
from ..prompts import PROMPT_COLUMN
from ..segmentation import SEGMENTATION_METHODS
from ..spec import SupervisionSpec
from ..teachability import TOKEN_SCORES
from ._args import CONFIG_HELP, CommandParser, missing_error



def release_spec(args) -> SupervisionSpec:
    """The `SupervisionSpec` of the rule diagnose measures (`release`, with the TA-OPD settings it also reports):
    the same validation as `TeachabilityGKDConfig`, so a diagnose setting means what the trainer's field means."""
    return SupervisionSpec(
        policy="release",
        release_top_k=args.release_top_k,
        segmentation=args.segmentation,
        segment_window=args.segment_window,
        token_score=args.token_score,
        token_keep_ratio=args.token_keep_ratio,
        token_top_k=args.token_top_k,
        token_min_keep=args.token_min_keep,
        seed=args.seed,
        online_min_segments=args.online_min_segments,
        online_patience=args.online_patience,
        online_check_tokens=args.online_check_tokens,
        release_alpha=args.release_alpha,
        release_permutations=args.release_permutations,
    )


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


def _int_list(value) -> list[int]:
    """`release_top_k_sweep`: comma-separated integers (a flag) or a list of integers (YAML)."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        values = [int(v) for v in parts if str(v).strip()]
    except (TypeError, ValueError):
        raise ValueError(f"expected comma-separated integers, got {value!r}") from None
    if any(v < 2 for v in values):
        raise ValueError(f"every K must be >= 2, got {value!r}")
    return values


@dataclass
class DiagnoseArguments:
    """The options of `trl-ltc diagnose`; a `trl-ltc distill` recipe given to `--config` sets those it shares."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The student: a model id or local path (its tokenizer is used)."}
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher: a model id or local path (same vocabulary as the student)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a local .json/.jsonl/.parquet/.csv file, a `save_to_disk` directory or a `datasets` "
            "name, with a prompt column (text or conversational messages)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name (hub datasets)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Dataset split the prompts are read from."})
    dataset_prompt_column: str = field(
        default=PROMPT_COLUMN, metadata={"help": "Column of the dataset that holds the prompts (as in distill)."}
    )
    dataset_prompt_as_chat: bool = field(
        default=False,
        metadata={
            "help": "Wrap each text prompt into one user message so that the tokenizer's chat template is applied "
            "(as in distill)."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "Use the quickstart's embedded SmolLM2 teacher/student and prompts (explicit "
            "--model_name_or_path/--teacher_model_name_or_path/--dataset_name still win).",
            "choices": ["quickstart"],
        },
    )
    num_prompts: int = field(default=64, metadata={"help": "Number of prompts (the first N)."})
    release_top_k: int = field(
        default=10, metadata={"help": "K: the student's top-K support of the teacher margin (>= 2)."}
    )
    release_top_k_sweep: str = field(
        default="2,5,10,20", metadata={"help": "Comma-separated K values for support_sweep.png."}
    )
    segmentation: str = field(
        default="nltk",
        metadata={
            "help": "Segments: NLTK sentences, lines, or fixed token windows.",
            "choices": list(SEGMENTATION_METHODS),
        },
    )
    segment_window: int = field(default=64, metadata={"help": "Tokens per segment with --segmentation fixed."})
    token_top_k: int = field(default=16, metadata={"help": "K of the TA-OPD token features."})
    token_score: str = field(
        default="teachability",
        metadata={"help": "TA-OPD token score for teachability.png.", "choices": list(TOKEN_SCORES)},
    )
    token_keep_ratio: float = field(
        default=0.05, metadata={"help": "Share of each scoring batch's tokens TA-OPD keeps, in (0, 1]."}
    )
    token_min_keep: int = field(default=1, metadata={"help": "TA-OPD tokens kept per trajectory at least."})
    max_completion_length: int = field(default=256, metadata={"help": "Maximum sampled tokens per prompt."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation/scoring batch."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling and scoring temperature."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    num_cases: int = field(default=8, metadata={"help": "Trajectories shown in cases.html."})
    bins: int = field(default=DEFAULT_BINS, metadata={"help": "Relative-position bins of the curves."})
    device: str | None = field(default=None, metadata={"help": "torch device; unset: cuda if available, else cpu."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype (auto: bfloat16 on CUDA if supported, else float32).",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    online_min_segments: int = field(
        default=3, metadata={"help": "Online release replay: complete segments needed before a stop."}
    )
    online_patience: int = field(
        default=2, metadata={"help": "Online release replay: complete segments after the drop before a stop."}
    )
    online_check_tokens: int = field(
        default=16,
        metadata={"help": "Online release replay: generated tokens between two decisions, for the saved tokens."},
    )
    release_alpha: float = field(
        default=0.05,
        metadata={
            "help": "Level of the calibrated change point reported next to the paper's rule and its null "
            "(accepted_frac_calibrated; with --replay, the calibrated online rule)."
        },
    )
    release_permutations: int = field(
        default=199, metadata={"help": "Shuffles per trajectory of the calibrated change point."}
    )
    replay: str | None = field(
        default=None,
        metadata={
            "help": "Replay the online release rule on recorded trajectories (records.jsonl, or release_records.jsonl "
            "of a training run) instead of sampling: writes online_replay.jsonl and online_replay.md into "
            "--output_dir; no model is loaded.",
            "metavar": "RECORDS_JSONL",
        },
    )
    output_dir: str = field(
        default="out/diagnose",
        metadata={"help": "Where the files are written (not read from --config: a recipe's is its training folder)."},
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})


DEPRECATED_FLAGS = {
    "--student": "--model_name_or_path",
    "--teacher": "--teacher_model_name_or_path",
    "--dataset": "--dataset_name",
    "--dataset_split": "--dataset_train_split",
    "--top_k": "--release_top_k",
    "--top_k_sweep": "--release_top_k_sweep",
    "--no_progress": "--disable_tqdm",
}


def build_parser(prog: str = "trl-ltc diagnose") -> CommandParser:
    """The parser of `trl-ltc diagnose`; `parse_command(argv)` returns its `DiagnoseArguments`."""
    return CommandParser(
        [DiagnoseArguments],
        aliases=DEPRECATED_FLAGS,
        config_exclude=("output_dir",),
        prog=prog,
        description="Measure local teachability collapse on a teacher/student pair: sample student completions, "
        "score them with the teacher exactly as TeachabilityGKDTrainer does (release rule and TA-OPD token "
        "teachability), and write records.jsonl, margin_curve.png, release.png, support_sweep.png, "
        "teachability.png, cases.html and summary.md. " + CONFIG_HELP + " A `trl-ltc distill` recipe works as is: "
        "its student, teacher, prompts and release settings are read, its other keys ignored (its `top_k` is the "
        "sampling top-k, not --release_top_k).",
    )


def parse_args(argv: list[str] | None = None) -> DiagnoseArguments:
    """The `DiagnoseArguments` of `argv` (and of its `--config` file), not yet checked."""
    return build_parser().parse_command(argv)


# `_preset`'s keys -> the options they fill in.
PRESET_FIELDS = {"student": "model_name_or_path", "teacher": "teacher_model_name_or_path", "dataset": "dataset_name"}


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc diagnose ...`; returns the exit status."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = build_parser()
    args = parser.parse_command(argv)
    try:
        top_k_sweep = _int_list(args.release_top_k_sweep)
    except ValueError as error:
        parser.error(f"argument --release_top_k_sweep: {error}")
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
            if getattr(args, PRESET_FIELDS[key]) is None:
                setattr(args, PRESET_FIELDS[key], value)
    missing = [name for name in PRESET_FIELDS.values() if getattr(args, name) is None]
    if missing:
        missing_error(parser, missing, "or use --preset quickstart")
    for name in ("num_prompts", "batch_size", "max_completion_length", "segment_window", "num_cases", "bins"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    try:  # the release and TA-OPD settings are checked once, by the spec the trainer uses
        release_spec(args)
    except ValueError as error:
        parser.error(str(error))
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0; got {args.temperature}")

    from ..evaluation import resolve_device_dtype

    device, dtype = resolve_device_dtype(args.device, args.dtype)

    dataset = _load_dataset(args)
    n = min(args.num_prompts, len(dataset))
    if n == 0:
        parser.error(f"the dataset {args.dataset_name!r} has no prompts")
    subset = dataset.select(range(n))
    prompt_ids = subset["id"] if "id" in subset.column_names else list(range(n))

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    student = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=dtype).to(device)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model_name_or_path, dtype=dtype).to(device)
    settings = {
        "student": args.model_name_or_path,
        "teacher": args.teacher_model_name_or_path,
        "dataset": args.dataset_name,
        "num_prompts": n,
        "top_k": args.release_top_k,
        "top_k_sweep": ",".join(map(str, top_k_sweep)),
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
        top_k=args.release_top_k,
        top_k_sweep=top_k_sweep or [args.release_top_k],
        segmentation=args.segmentation,
        segment_window=args.segment_window,
        max_completion_length=args.max_completion_length,
        batch_size=args.batch_size,
        temperature=args.temperature,
        seed=args.seed,
        num_cases=args.num_cases,
        bins=args.bins,
        progress=not args.disable_tqdm,
        settings=settings,
        token_top_k=args.token_top_k,
        token_score=args.token_score,
        token_keep_ratio=args.token_keep_ratio,
        token_min_keep=args.token_min_keep,
        online_min_segments=args.online_min_segments,
        online_patience=args.online_patience,
        online_check_tokens=args.online_check_tokens,
        release_alpha=args.release_alpha,
        release_permutations=args.release_permutations,
    )
    print(f"Wrote {', '.join(files)} to {os.path.abspath(args.output_dir)}")
    return 0


def _load_dataset(args: DiagnoseArguments):
    """The prompts of `args`, checked, in a `prompt` column (`dataset_prompt_column`, `dataset_prompt_as_chat`)."""
    if args.dataset_prompt_column == PROMPT_COLUMN and not args.dataset_prompt_as_chat:
        return _load_prompts(args.dataset_name, args.dataset_config, args.dataset_train_split)
    from ..prompts import load_prompt_dataset, prepare_prompt_dataset

    dataset = load_prompt_dataset(args.dataset_name, config=args.dataset_config, split=args.dataset_train_split)
    return prepare_prompt_dataset(dataset, args.dataset_name, args.dataset_prompt_column, args.dataset_prompt_as_chat)


def _replay_main(args) -> int:
    """`trl-ltc diagnose --replay records.jsonl`: the online release replay of recorded trajectories."""
    path = Path(args.replay)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    replayed = online_replay(records, args.online_min_segments, args.online_patience, args.online_check_tokens)
    calibrated = online_replay(records, args.online_min_segments, args.online_patience, args.online_check_tokens,
                               args.release_alpha, args.release_permutations, args.seed)  # fmt: skip
    for fields, fields_calibrated in zip(replayed, calibrated):
        fields["online_stopped_calibrated"] = fields_calibrated["online_stopped"]
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
    stopped = sum(r["online_stopped"] for r in calibrated) / max(len(calibrated), 1)
    lines.append(f"Calibrated online rule (release_alpha={args.release_alpha}): stopped {stopped:.3f} of them.")
    (output_dir / "online_replay.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"Wrote online_replay.jsonl, online_replay.md to {os.path.abspath(output_dir)}")
    return 0
