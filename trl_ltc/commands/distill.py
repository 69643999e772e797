"""`trl-ltc distill`: train a student with `TeachabilityGKDTrainer` from a YAML recipe and/or command-line flags.

The command line of `trl_ltc.distill`; `scripts/distill.py` runs the same `main` (e.g. under `accelerate launch`).
"""

from __future__ import annotations

from trl import TrlParser

from ..distill import DATACLASS_TYPES, build_trainer

DESCRIPTION = (
    "Train a student with TeachabilityGKDTrainer (on-policy distillation with teachability-aware supervision). "
    "Every field below can be set in the YAML given to --config; flags override it."
)


def build_parser(prog: str = "trl-ltc distill") -> TrlParser:
    """The `TrlParser` of `trl-ltc distill`; `parse_args_and_config(argv)` returns the four dataclasses in order."""
    return TrlParser(DATACLASS_TYPES, prog=prog, description=DESCRIPTION)


def parse_args(argv: list[str] | None = None):
    """`build_parser().parse_args_and_config(argv)`: the four dataclasses, in order.

    GPU recipes set `bf16: true`; on a machine without a bf16-capable GPU transformers refuses it with a message that
    does not say how to override a recipe, so the error here names the flags that do.
    """
    try:
        return build_parser().parse_args_and_config(argv)
    except ValueError as error:
        if "support bf16" not in str(error):  # transformers: "Your setup doesn't support bf16/gpu."
            raise
        raise ValueError(
            f"{error} To run a GPU recipe (`bf16: true`) on this machine, pass `--bf16 false --use_cpu true` (flags "
            "override the recipe), or set `bf16: false` and `use_cpu: true` in the YAML."
        ) from error


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc distill`: build the trainer, train, save the model (or LoRA adapter) to `output_dir`, push if asked."""
    trainer, (script_args, training_args, _, _) = build_trainer(argv)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the logged metrics, read back by `trl-ltc compare`
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
    return 0
