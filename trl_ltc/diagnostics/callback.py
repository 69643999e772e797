"""`ReleaseDiagnosticsCallback`: keep the trajectory records of the last training steps and plot them at saves
and at the end of training.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from .records import DEFAULT_BINS, _compact, write_records

logger = logging.getLogger(__name__)


class ReleaseDiagnosticsCallback(TrainerCallback):
    """Keep the trajectory records of the last `max_steps_kept` training steps; plot them at saves and at the end.

    The trainer hands over each micro-batch's records (`trajectory_records`) with `add`. At most
    `max_records` trajectories are kept, the oldest dropped first, so memory and `release_records.jsonl` stay
    bounded however large the batches (about 30 bytes per completion token in the file). On `on_save` and
    `on_train_end` the main process (`state.is_world_process_zero`) writes `release.png` and
    `margin_curve.png` (and the records as `release_records.jsonl`; `teachability.png` too when the records
    carry `teachability_kept`, as with `supervision="token_teachability"`) into `args.output_dir`, or into
    `args.output_dir/subdir` when `subdir` is given, and logs the plots to the image-capable trackers among
    `trackers` (`log_images`). Each process keeps only its own records, so the plots show the main process's
    share of the batches.

    Args:
        max_steps_kept: how many of the most recent distinct steps are kept.
        subdir: optional sub-directory of the output directory for the files.
        bins: relative-position bins of the margin curve.
        max_records: how many trajectories are kept at most (`None`: no limit).
        trackers: the trainer's callbacks (a live list is fine); its `WandbCallback` and `TensorBoardCallback`
            (those of `report_to="wandb"` / `"tensorboard"`) receive the plots as images.
    """

    @classmethod
    def attach(cls, trainer) -> ReleaseDiagnosticsCallback | None:
        """The callback configured by the trainer's `release_diagnostics_steps` / `release_diagnostics_max_records`,
        added to its callbacks and logging to its trackers; `None` when `release_diagnostics_steps` is 0."""
        args = trainer.args
        if args.release_diagnostics_steps <= 0:
            return None
        callback = cls(
            max_steps_kept=args.release_diagnostics_steps,
            max_records=args.release_diagnostics_max_records,
            trackers=trainer.callback_handler.callbacks,
        )
        trainer.add_callback(callback)
        return callback

    def __init__(
        self,
        max_steps_kept: int = 20,
        subdir: str | None = None,
        bins: int = DEFAULT_BINS,
        max_records: int | None = 256,
        trackers: Sequence = (),
    ):
        if max_steps_kept < 1:
            raise ValueError(f"max_steps_kept must be >= 1; got {max_steps_kept}.")
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be >= 1 or None; got {max_records}.")
        self.max_steps_kept = max_steps_kept
        self.max_records = max_records
        self.subdir = subdir
        self.bins = bins
        self.trackers = trackers
        self._steps: OrderedDict[int, list[dict]] = OrderedDict()

    def add(self, records: Sequence[dict], step: int) -> None:
        """Add one micro-batch's records for training step `step` (several micro-batches may share a step)."""
        self._steps.setdefault(int(step), []).extend(_compact(dict(r, step=int(step))) for r in records)
        while len(self._steps) > self.max_steps_kept:
            self._steps.popitem(last=False)
        excess = sum(map(len, self._steps.values())) - (self.max_records or math.inf)
        while excess > 0:  # drop the oldest trajectories
            oldest = next(iter(self._steps.values()))
            dropped = min(excess, len(oldest))
            del oldest[:dropped]
            excess -= dropped
            if not oldest:
                self._steps.popitem(last=False)

    @property
    def records(self) -> list[dict]:
        """The kept records, oldest step first."""
        return [r for records in self._steps.values() for r in records]

    def write(self, output_dir) -> dict[str, Path]:
        """Write the plots (and records) of the kept records into `output_dir`; nothing when there are none."""
        from .plots import plot_margin_curve, plot_release, plot_teachability

        records = self.records
        if not records:
            logger.info("ReleaseDiagnosticsCallback: no records yet, nothing written.")
            return {}
        directory = Path(output_dir) / self.subdir if self.subdir else Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        files = {
            "release.png": plot_release(records, directory / "release.png"),
            "margin_curve.png": plot_margin_curve(records, directory / "margin_curve.png", self.bins),
            "release_records.jsonl": write_records(records, directory / "release_records.jsonl"),
        }
        if any("teachability_kept" in r for r in records):
            files["teachability.png"] = plot_teachability(records, directory / "teachability.png", self.bins)
        return files

    def log_images(self, files: dict[str, Path], step: int) -> list[str]:
        """Log the `.png` files among `files` to the image-capable trackers among `self.trackers`, tagged
        `release_diagnostics/<name>` at training step `step`; returns the names of the trackers logged to.

        `WandbCallback`: `wandb.log` of `wandb.Image`s with `train/global_step` (when its run is active).
        `TensorBoardCallback`: `SummaryWriter.add_image` (while its writer is open; it closes at the end of
        training, before this callback's `on_train_end`, so the last save's plots are the last ones logged there).
        """
        from transformers.integrations import TensorBoardCallback, WandbCallback

        images = {f"release_diagnostics/{Path(n).stem}": path for n, path in files.items() if n.endswith(".png")}
        logged = []
        for tracker in self.trackers if images else ():
            if isinstance(tracker, WandbCallback) and getattr(tracker._wandb, "run", None) is not None:
                wandb = tracker._wandb
                wandb.log({**{tag: wandb.Image(str(path)) for tag, path in images.items()}, "train/global_step": step})
                logged.append("wandb")
            elif isinstance(tracker, TensorBoardCallback) and tracker.tb_writer is not None:
                import matplotlib.image

                for tag, path in images.items():
                    pixels = matplotlib.image.imread(path)[..., :3]  # float RGB in [0, 1], height x width x 3
                    tracker.tb_writer.add_image(tag, pixels, step, dataformats="HWC")
                tracker.tb_writer.flush()
                logged.append("tensorboard")
        return logged

    def _maybe_write(self, args, state) -> None:
        if state.is_world_process_zero and args.output_dir:
            self.log_images(self.write(args.output_dir), state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._maybe_write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._maybe_write(args, state)
