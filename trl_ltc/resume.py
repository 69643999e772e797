"""Exact resume and the run's own random draws: the sampler order, the release generators, the last checkpoint."""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import RepeatSampler

from .release import NULL_SEED_OFFSET
from .supervision import permute_release_fractions

__all__ = [
    "EpochRepeatSampler",
    "global_permutation",
    "last_complete_checkpoint",
    "load_release_generators",
    "release_generators",
    "save_release_generators",
]

logger = logging.getLogger(__name__)


class EpochRepeatSampler(RepeatSampler):
    """`trl`'s `RepeatSampler` whose order in epoch `e` depends only on `e` (`set_epoch`), so resume is exact.

    `RepeatSampler` shuffles with its own generator, seeded once when it is built; each epoch draws the next
    permutation from it. That generator is not part of a checkpoint: a run resumed at epoch `e` builds a new sampler
    and its first epoch draws permutation 0 again, so every resumed epoch after the first replays epoch 0's order
    (other prompts, so other samples and losses) while an uninterrupted run moves on to permutation `e`. Transformers
    restores the global RNG and skips the batches already trained in the resumed epoch, and calls
    `set_epoch(epoch)` on the sampler before each epoch; here `set_epoch(e)` puts the generator in the state it has
    after `e` permutations, so both runs draw the same order and an uninterrupted run keeps the parent's order. The
    generator states at the start of each epoch are cached (one `randperm` per new epoch, none on a repeated call).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_states = [self.generator.get_state()] if self.shuffle else []

    @classmethod
    def like(cls, sampler: RepeatSampler) -> EpochRepeatSampler:
        """The same sampler as `sampler` (the one the parent built), with the epoch-indexed order."""
        return cls(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle:
            return
        while len(self._epoch_states) <= epoch:
            self.generator.set_state(self._epoch_states[-1])
            torch.randperm(self.num_samples, generator=self.generator)  # what `__iter__` draws once per epoch
            self._epoch_states.append(self.generator.get_state())
        self.generator.set_state(self._epoch_states[epoch])


def release_generators(seed: int, process_index: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """The trainer's three generators, seeded from `release_seed`: `(release, permutation, null)`.

    - `release`: per-process draws (`token_score="random"`, and `random_release` on batches that did not come from
      generation), seeded `seed + process_index`.
    - `permutation`: the global `random_release` permutation, seeded `seed`: the same draws on every process.
    - `null`: the shuffles of `release/accepted_frac_null`, per process and apart from the draws that shape the
      weights, seeded `seed + NULL_SEED_OFFSET + process_index`.
    """
    return (
        torch.Generator().manual_seed(seed + process_index),
        torch.Generator().manual_seed(seed),
        torch.Generator().manual_seed(seed + NULL_SEED_OFFSET + process_index),
    )


def _release_rng_file(directory: str, process_index: int) -> str:
    return os.path.join(directory, f"release_rng_state_{process_index}.pth")


def _release_rng_states(directory: str, process_index: int) -> dict | None:
    if not os.path.isfile(path := _release_rng_file(directory, process_index)):
        return None
    states = torch.load(path)
    return {"release": states} if isinstance(states, torch.Tensor) else states  # older checkpoints: one tensor


def save_release_generators(output_dir: str, process_index: int, **generators: torch.Generator) -> None:
    """Write the states of `generators` (by name) into the checkpoint folder `output_dir`, one file per process."""
    states = {name: generator.get_state() for name, generator in generators.items()}
    torch.save(states, _release_rng_file(output_dir, process_index))


def load_release_generators(
    checkpoint: str,
    process_index: int,
    release: torch.Generator,
    permutation: torch.Generator,
    null: torch.Generator,
) -> None:
    """Restore the generators `save_release_generators` wrote into `checkpoint`, where it has them.

    `release` and `null` are per process; older checkpoints carry no `null` state (or only the `release` one).
    Every process restores process 0's `permutation` state, so they keep drawing the same permutations (also when the
    run resumes on another number of processes).
    """
    if (states := _release_rng_states(checkpoint, process_index)) is not None:
        release.set_state(states["release"])
        if "null" in states:
            null.set_state(states["null"])
    if (states := _release_rng_states(checkpoint, 0)) is not None and "permutation" in states:
        permutation.set_state(states["permutation"])


def global_permutation(
    accelerator,
    fractions: torch.Tensor,
    eligible: torch.Tensor,
    generator: torch.Generator,
    permute=permute_release_fractions,
) -> torch.Tensor:
    """Permute per-row `fractions` `[B]` across the rows of all processes; returns this process's rows `[B]`.

    The rows of every process (their counts may differ) are gathered in process order, permuted with `permute`
    (`permute_release_fractions`; `generator` must be in the same state on every process, so that all draw the same
    permutation), and each process keeps the slice of its own rows.
    """
    local = torch.stack([fractions.double(), eligible.double()], -1).to(accelerator.device)
    counts = accelerator.gather(torch.tensor([local.shape[0]], device=accelerator.device)).tolist()
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0))
    width = max(counts)
    rows = torch.cat([gathered[i * width : i * width + n] for i, n in enumerate(counts)])
    permuted = permute(rows[:, 0], rows[:, 1] > 0, generator)
    start = sum(counts[: accelerator.process_index])
    return permuted[start : start + local.shape[0]].to(fractions.device)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N whose `trainer_state.json` reads back.

    The trainer writes `trainer_state.json` after the weights, optimizer, scheduler and RNG states, so a folder
    without it (or with a truncated one) is a checkpoint whose writing was interrupted; such folders are skipped with
    a warning. `None` when there is no complete checkpoint.
    """
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, "trainer_state.json")) as file:
                json.load(file)
        except (OSError, ValueError):
            logger.warning("Skipping %s: it has no readable trainer_state.json (its writing was interrupted).", path)
            continue
        return path
    return None
