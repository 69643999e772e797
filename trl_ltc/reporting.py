"""Small helpers shared by the commands and the comparison runner: progress logs, durations, mean training metrics."""

from __future__ import annotations

import logging
import math
import statistics


def show_progress_logs() -> None:
    """Show trl-ltc's INFO messages (download, conversion) on stderr."""
    logger = logging.getLogger("trl_ltc")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[trl-ltc] %(message)s"))
        logger.addHandler(handler)


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


def format_duration(seconds: float) -> str:
    """`seconds` as `1m05s` (or `42s` under a minute)."""
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
