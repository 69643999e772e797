"""`trl-ltc quickstart`: distil SmolLM2-135M-Instruct into a noisy copy of itself on CPU (`trl_ltc.quickstart`)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import embedded
from ..quickstart import METRICS_FILE, format_summary, heldout_prompts, recipe_path
from ..reporting import mean_train_metrics, show_progress_logs
from ._args import CommandParser


@dataclass
class QuickstartArguments:
    """The options of `trl-ltc quickstart`; every other `--field value` goes to `trl-ltc distill`."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the adapter and the metrics go (unset: the recipe's, runs/quickstart)."}
    )
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (unset: the recipe's)."})
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the teacher and the student are built and kept (unset: $TRL_LTC_CACHE, else "
            "$HF_HOME/trl-ltc)."
        },
    )
    eval_prompts: int = field(
        default=32,
        metadata={
            "help": "Held-out problems on which the reverse KL is measured before and after training (0: skip)."
        },
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Problems sampled and scored at a time."})
    teacher_server: bool = field(
        default=False,
        metadata={
            "help": "Serve the teacher's GGUF file with llama.cpp's server (the `server` extra) for the run and train "
            "against it (`teacher_server_url`, with loss_type='advantage'); the held-out KL still loads the teacher."
        },
    )


def build_parser(prog: str = "trl-ltc quickstart") -> CommandParser:
    """The parser of `trl-ltc quickstart`; `parse_command(argv, passthrough=True)` returns its
    `QuickstartArguments` and the flags passed through to `trl-ltc distill`."""
    return CommandParser(
        [QuickstartArguments],
        prog=prog,
        description="Distil SmolLM2-135M-Instruct into a noisy copy of itself with the release rule and LoRA, on CPU, "
        "and report the held-out teacher-student reverse KL before and after.",
        epilog="Any other `--field value` is passed to `trl-ltc distill` (see `trl-ltc distill --help`) and overrides "
        f"the recipe. `--config RECIPE.yaml`: the `trl-ltc distill` recipe to run instead of {recipe_path()} (the "
        "teacher, the student and the prompts are still the quickstart's); its output_dir and max_steps are used, "
        "while --cache_dir, --eval_prompts and --eval_batch_size are flags only.",
        # not `trl-ltc distill` fields
        config_exclude=("cache_dir", "eval_prompts", "eval_batch_size", "teacher_server"),
        allow_abbrev=False,  # never mistake a pass-through flag for an abbreviation of ours
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = _config_path(argv)
    args, passthrough = build_parser().parse_command(argv, passthrough=True)
    show_progress_logs()
    start = time.perf_counter()

    print(f"Preparing the teacher and the student in {embedded.cache_root(args.cache_dir)} ...", flush=True)
    teacher_dir, student_dir = embedded.prepare_smollm2_pair(args.cache_dir)
    with contextlib.ExitStack() as stack:
        server = None
        if args.teacher_server:
            from ..llama_server import local_llama_server

            gguf = embedded.teacher_gguf(args.cache_dir)
            print(f"Starting llama.cpp's server for {gguf.name} ...", flush=True)
            server = stack.enter_context(local_llama_server(gguf))
        if _vllm_on_cpu(passthrough):  # vLLM's CPU build (docs/vllm.md): 1 GiB of KV cache, the fp32 student in fp32
            from ..vllm_compat import colocated_engine_dtype

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            stack.enter_context(colocated_engine_dtype("float32"))
        return _run(args, teacher_dir, student_dir, recipe, passthrough, server, start)


def _vllm_on_cpu(passthrough: list[str]) -> bool:
    """Whether `--use_vllm` is passed through switched on (`--use_vllm`, `--use_vllm true`, `--use_vllm=true`; the
    last one given counts, as in argparse) on a machine without a GPU."""
    import torch

    value = None
    for index, arg in enumerate(passthrough):
        if arg == "--use_vllm":
            following = passthrough[index + 1 : index + 2]
            value = following[0] if following and not following[0].startswith("-") else "true"
        elif arg.startswith("--use_vllm="):
            value = arg.split("=", 1)[1]
    return value is not None and value.lower() not in ("false", "f", "no", "n", "0") and not torch.cuda.is_available()


def _run(args, teacher_dir, student_dir, recipe, passthrough, server, start) -> int:
    distill_argv = _distill_argv(args, teacher_dir, student_dir, recipe, server) + passthrough
    print("Running the equivalent of: trl-ltc distill " + " ".join(distill_argv), flush=True)

    from ..distill import build_trainer, recipe_args

    trainer = build_trainer(*recipe_args(_recipe(args, teacher_dir, student_dir, recipe, server), passthrough))
    config = trainer.args
    prompts = heldout_prompts(args.eval_prompts)

    @functools.cache
    def teacher():  # a served teacher is loaded here for the measurement only
        if trainer.teacher_model is not None:
            return trainer.accelerator.unwrap_model(trainer.teacher_model)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="float32").eval()

    def evaluate(when: str) -> float | None:
        if not prompts:
            return None
        from ..evaluation import heldout_reverse_kl

        print(f"Held-out reverse KL {when} training ({len(prompts)} problems) ...", flush=True)
        return heldout_reverse_kl(
            trainer.accelerator.unwrap_model(trainer.model),
            teacher(),
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
        "teacher": teacher_dir if server is None else f"{teacher_dir} (served at {server})",
        "student": student_dir,
        "distill_argv": distill_argv,
        "log_history": trainer.state.log_history,
    }
    path = Path(config.output_dir) / METRICS_FILE
    path.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(format_summary(metrics, config, metrics_path=str(path)), flush=True)
    return 0


def _recipe(
    args: QuickstartArguments, teacher_dir: str, student_dir: str, recipe: str | None = None, server: str | None = None
) -> dict:
    """The quickstart's `trl-ltc distill` recipe: `recipe` (default `configs/quickstart.yaml`) with the embedded pair
    (the teacher served at `server`, when given), the bundled prompts and `--output_dir`/`--max_steps` when given (the
    pass-through flags go over it and win)."""
    fields = yaml.safe_load(Path(recipe or recipe_path()).read_text(encoding="utf-8"))
    fields |= {"model_name_or_path": student_dir, "dataset_name": embedded.quickstart_dataset_path("train")}
    if server is None:
        fields["teacher_model_name_or_path"] = teacher_dir
    else:  # a server returns top-n log-probs, not the distribution the `parent` loss needs
        fields |= {"teacher_server_url": server, "loss_type": "advantage"}
        fields.pop("beta", None)
    given = {flag: getattr(args, flag) for flag in ("output_dir", "max_steps")}
    return fields | {flag: value for flag, value in given.items() if value is not None}


def _config_path(argv: list[str]) -> str | None:
    """The value of `--config` in `argv`, if any."""
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return argv[argv.index("--config") + 1]
    return None


def _distill_argv(
    args: QuickstartArguments, teacher_dir: str, student_dir: str, recipe: str | None = None, server: str | None = None
) -> list[str]:
    """The `trl-ltc distill` arguments equivalent to `_recipe` (printed, and kept in the metrics file)."""
    teacher = ["--teacher_model_name_or_path", teacher_dir]
    if server is not None:
        teacher = ["--teacher_server_url", server, "--loss_type", "advantage"]
    argv = [
        "--config", recipe or recipe_path(),
        "--model_name_or_path", student_dir,
        *teacher,
        "--dataset_name", embedded.quickstart_dataset_path("train"),
    ]  # fmt: skip
    for flag in ("output_dir", "max_steps"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv
