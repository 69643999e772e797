"""`trl-ltc distill`: train a student with `TeachabilityGKDTrainer` from a YAML recipe and/or command-line flags.

The command line of `trl_ltc.distill`; `scripts/distill.py` runs the same `main` (e.g. under `accelerate launch`).
"""

from __future__ import annotations

from trl import TrlParser

from ..distill import DATACLASS_TYPES, build_trainer, explain_bf16

DESCRIPTION = (
    "Train a student with TeachabilityGKDTrainer (on-policy distillation with teachability-aware supervision). "
    "Every field below can be set in the YAML given to --config; flags override it."
)


def build_parser(prog: str = "trl-ltc distill") -> TrlParser:
    """The `TrlParser` of `trl-ltc distill`; `parse_args_and_config(argv)` returns the four dataclasses in order."""
    return TrlParser(DATACLASS_TYPES, prog=prog, description=DESCRIPTION)


def parse_args(argv: list[str] | None = None):
    """`build_parser().parse_args_and_config(argv)`: the four dataclasses, in order (see `trl_ltc.distill.recipe_args`
    for a recipe as a dict). A refused `bf16: true` names the flags that override it (`explain_bf16`)."""
    with explain_bf16():
        return build_parser().parse_args_and_config(argv)


def main(argv: list[str] | None = None) -> int:
    """`trl-ltc distill`: build the trainer, train, save the model (or LoRA adapter) to `output_dir`, push if asked."""
    script_args, training_args, model_args, dataset_args = parse_args(argv)
    trainer = build_trainer(script_args, training_args, model_args, dataset_args)
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
