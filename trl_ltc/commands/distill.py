"""`trl-ltc distill`: train a student with `TeachabilityGKDTrainer` from a YAML recipe and/or command-line flags.

The command line of `trl_ltc.distill`; `scripts/distill.py` runs the same `main` (e.g. under `accelerate launch`).
With `--accelerate_config NAME_OR_PATH` and/or `--num_processes N`, as `trl distillation`, it runs itself under
`accelerate launch` in a subprocess:

    trl-ltc distill --accelerate_config fsdp2 --num_processes 8 --config configs/qwen3-1.7b_from_qwen3-30b-a3b.yaml
"""

from __future__ import annotations

import gc
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from trl import TrlParser

from ..distill import DATACLASS_TYPES, build_trainer, explain_bf16

DESCRIPTION = (
    "Train a student with TeachabilityGKDTrainer (on-policy distillation with teachability-aware supervision). "
    "Every field below can be set in the YAML given to --config; flags override it."
)


@dataclass
class LaunchArguments:
    """How `trl-ltc distill` is launched: in this process (default) or under `accelerate launch`."""

    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Run under `accelerate launch` with this config: one shipped with trl-ltc (single_gpu, "
            "multi_gpu, fsdp2, zero3) or the path of an accelerate config file. Command line only."
        },
    )
    num_processes: int | None = field(
        default=None,
        metadata={
            "help": "Processes `accelerate launch` starts (overrides the accelerate config's num_processes); implies "
            "running under `accelerate launch`. Command line only."
        },
    )


LAUNCH_FIELDS = tuple(LaunchArguments.__dataclass_fields__)


def build_parser(prog: str = "trl-ltc distill", launch: bool = False) -> TrlParser:
    """The `TrlParser` of `trl-ltc distill`; `parse_args_and_config(argv)` returns the four dataclasses in order
    (with `launch`, a fifth: the `LaunchArguments`, which `main` takes off the command line before parsing)."""
    return TrlParser([*DATACLASS_TYPES, *([LaunchArguments] if launch else [])], prog=prog, description=DESCRIPTION)


def shipped_accelerate_configs() -> list[str]:
    """Names of the accelerate configs shipped in `trl_ltc/resources/accelerate` (`fsdp2`, ...)."""
    folder = resources.files("trl_ltc.resources").joinpath("accelerate")
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_accelerate_config(name_or_path: str) -> str:
    """The accelerate config file of `--accelerate_config`: an existing file, else a shipped config's name."""
    if Path(name_or_path).expanduser().is_file():
        return str(Path(name_or_path).expanduser())
    candidate = resources.files("trl_ltc.resources").joinpath("accelerate", f"{name_or_path}.yaml")
    if not candidate.is_file():
        raise ValueError(
            f"--accelerate_config {name_or_path!r} is neither a file nor a config shipped with trl-ltc; shipped: "
            f"{', '.join(shipped_accelerate_configs())}."
        )
    return str(candidate)


def split_launch_args(argv: list[str]) -> tuple[LaunchArguments, list[str]]:
    """`(launch, rest)`: the `--accelerate_config` / `--num_processes` of `argv` and the other arguments, in order."""
    values, rest, index = {}, [], 0
    while index < len(argv):
        name, sep, value = argv[index].partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key in LAUNCH_FIELDS:
            if not sep:
                if index + 1 >= len(argv):
                    raise ValueError(f"Expected a value after `{name}`.")
                index += 1
                value = argv[index]
            values[key] = value
        else:
            rest.append(argv[index])
        index += 1
    if "num_processes" in values:
        try:
            values["num_processes"] = int(values["num_processes"])
        except ValueError:
            raise ValueError(f"--num_processes must be an integer; got {values['num_processes']!r}.") from None
        if values["num_processes"] < 1:
            raise ValueError(f"--num_processes must be >= 1; got {values['num_processes']}.")
    return LaunchArguments(**values), rest


def launch_command(launch: LaunchArguments, argv: list[str]) -> list[str]:
    """The `accelerate launch` command that runs `trl-ltc distill argv` with `launch`'s config and process count."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.accelerate_config is not None:
        command += ["--config_file", resolve_accelerate_config(launch.accelerate_config)]
    if launch.num_processes is not None:
        command += ["--num_processes", str(launch.num_processes)]
    return [*command, "-m", "trl_ltc.cli", "distill", *argv]


def parse_args(argv: list[str] | None = None):
    """`build_parser().parse_args_and_config(argv)`: the four dataclasses, in order (see `trl_ltc.distill.recipe_args`
    for a recipe as a dict). A refused `bf16: true` names the flags that override it (`explain_bf16`)."""
    with explain_bf16():
        return build_parser().parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc distill`: build the trainer, train, save the model (or LoRA adapter) to `output_dir`, push if asked.

    With `--accelerate_config` or `--num_processes`: run the same command under `accelerate launch` in a subprocess
    and return its exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser(launch=True).parse_args_and_config(argv)  # prints the help, launch flags included, and exits
    launch, argv = split_launch_args(argv)
    if launch.accelerate_config is not None or launch.num_processes is not None:
        command = launch_command(launch, argv)
        print("Launching: " + " ".join(command), flush=True)
        return subprocess.run(command, check=False).returncode
    script_args, training_args, model_args, dataset_args = parse_args(argv)  # joins the process group, if any
    import torch.distributed as dist

    # The process group's Python object: released last, after the trainer (see `train_and_save`).
    process_group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    train_and_save(script_args, training_args, model_args, dataset_args)
    gc.collect()  # the trainer, its DDP model and the DDP reducer's reference to the process group go now
    del process_group  # the last reference: the group's destructor runs here, without the GIL
    return 0


def train_and_save(script_args, training_args, model_args, dataset_args) -> None:
    """Build the trainer, train, save the model (or LoRA adapter) and the trainer state, push if asked, and end
    (destroy the process group) once every process is done.

    Under gloo, the destructor of a process group joins its worker threads. A worker thread may still hold the
    tensors of the last collective (`train`'s `store_flos` all_gather) after the main thread has dropped them, and
    then needs the GIL to free them. Here the DDP reducer holds a reference to the group too, and its destructor keeps
    the GIL: had it held the last reference, freeing the trainer would join the worker with the GIL held and hang
    (the process that saves nothing reaches that point about a millisecond after the all_gather). `main` holds the
    group's Python object until the trainer is gone, so the last reference goes with that object, whose destructor
    releases the GIL.
    """
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged metrics, read back by `trl-ltc compare`
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # No process destroys the process group while another one is still saving or pushing.
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
