"""A short `random_release` training run on tiny models, for the interrupt-and-resume tests.

    python tests/_train_script.py OUTPUT_DIR [--kill-at-step K] [--resume]
        [--prompts N] [--supervision POLICY] [--gradient-accumulation-steps G]

Trains `MAX_STEPS` optimizer steps on generation batches of 4 prompts (`4 // G` per micro-batch, `G` micro-batches),
saving a checkpoint after every step; with `--prompts 8` an epoch is 2 steps, so checkpoint-2 is an epoch boundary.
The student samples its completions (on CPU, from the seeded global RNG, which checkpoints restore); `random_release`
draws from the trainer's `permutation_generator`. `--kill-at-step K` sends SIGKILL to the process in the middle of
step K + 1, after the forward pass of its first micro-batch (checkpoint-K is on disk, checkpoint-(K + 1) is not).
`--resume` resumes from the last complete checkpoint in `OUTPUT_DIR`. The logged entries (loss and supervision metrics
per step) are written to `OUTPUT_DIR/log.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAX_STEPS = 4


def build_trainer(output_dir: str, num_prompts: int = 4 * MAX_STEPS, **overrides):
    from datasets import Dataset
    from helpers import make_model, make_tokenizer

    from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    kwargs = dict(
        output_dir=output_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_completion_length=10,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-2,
        seed=7,
        supervision="random_release",
        segmentation="fixed",
        segment_window=2,
        release_diagnostics_steps=0,
    )
    kwargs.update(overrides)
    prompts = [f"Tom has {i} apples and eats {i % 3}. How many are left?" for i in range(num_prompts)]
    return TeachabilityGKDTrainer(
        model=make_model(vocab, seed=1),
        teacher_model=make_model(vocab, seed=2),
        args=TeachabilityGKDConfig(**kwargs),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--prompts", type=int, default=4 * MAX_STEPS)
    parser.add_argument("--supervision", default="random_release")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the same float reductions in every run
    accumulation = args.gradient_accumulation_steps
    trainer = build_trainer(
        args.output_dir,
        num_prompts=args.prompts,
        supervision=args.supervision,
        per_device_train_batch_size=4 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    if args.kill_at_step is not None:
        compute_loss = trainer.compute_loss

        def compute_loss_then_die(*a, **kw):
            loss = compute_loss(*a, **kw)
            if trainer.state.global_step == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-step: no cleanup, no Python exit handlers
            return loss

        trainer.compute_loss = compute_loss_then_die
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    with open(os.path.join(args.output_dir, "log.json"), "w") as file:
        json.dump(log, file)


if __name__ == "__main__":
    main()
