"""The paper's plots of trajectory records (matplotlib's object API with the Agg canvas: headless, no pyplot
state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .analysis import advantage_curve, margin_curve, release_fraction, teachability_positions
from .records import DEFAULT_BINS


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_margin_curve(records: Sequence[dict], path, bins: int = DEFAULT_BINS, top_k: int | None = None) -> Path:
    """`margin_curve.png`: normalised teacher margin (top) and advantage (bottom) vs relative position."""
    curve = margin_curve([r["token_margins"] for r in records], bins)
    adv = advantage_curve([r["token_advantages"] for r in records], bins)
    figure = _figure(8, 6.5)
    top, bottom = figure.subplots(2, 1, sharex=True)
    k = f", K={top_k}" if top_k else ""
    figure.suptitle(f"Teacher margin vs. advantage along the completion ({len(records)} trajectories{k})")
    x = curve["position"]
    if np.isfinite(curve["mean"]).any():
        band = 1.96 * np.nan_to_num(curve["sem"])
        top.fill_between(x, curve["mean"] - band, curve["mean"] + band, color="tab:blue", alpha=0.2, label="95% CI")
        top.plot(x, curve["mean"], "o-", color="tab:blue", label="mean normalised margin")
        top.axhline(1.0, color="0.5", lw=0.8, ls="--", label="trajectory average (= 1)")
        top.legend(loc="best", fontsize=8)
    else:
        _empty(top, "no trajectory with a positive mean margin")
    top.set_ylabel("normalised margin\nM_t / mean margin of its trajectory")
    top.set_title("Teacher margin on the student's top-K (local teachability)", fontsize=10)
    top.grid(alpha=0.3)
    if np.isfinite(adv["mean"]).any():
        bottom.fill_between(
            x,
            adv["mean"] - adv["std"],
            adv["mean"] + adv["std"],
            color="tab:orange",
            alpha=0.2,
            label="mean ± std (tokens)",
        )
        bottom.plot(x, adv["mean"], "o-", color="tab:orange", label="mean A_t")
        bottom.plot(x, adv["abs_mean"], "s--", color="tab:red", ms=3, label="mean |A_t|")
        bottom.axhline(0.0, color="0.5", lw=0.8)
        bottom.legend(loc="best", fontsize=8)
    else:
        _empty(bottom, "no completion tokens")
    bottom.set_ylabel("advantage\nA_t = log pT(y_t) - log pS(y_t)")
    bottom.set_xlabel("relative position in the completion (token index + 0.5) / length")
    bottom.set_title("Sampled-token advantage stays non-zero", fontsize=10)
    bottom.set_xlim(0, 1)
    bottom.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_release(records: Sequence[dict], path) -> Path:
    """`release.png`: BIC gain histogram, pre- vs post-change segment scores, release positions."""
    from matplotlib.ticker import MaxNLocator

    accepted = [r for r in records if r["accepted"]]
    figure = _figure(14, 4.6)
    gain_ax, drop_ax, position_ax = figure.subplots(1, 3)
    figure.suptitle(f"Change points: {len(accepted)} of {len(records)} trajectories accepted")

    eligible = [r for r in records if r["num_segments"] >= 2]
    if accepted:
        # With 2 segments the one-drop model fits exactly (RSS 0), so the gain is set by the BIC's 1e-12 floor.
        groups = [
            [r["bic_gain"] for r in accepted if r["num_segments"] > 2],
            [r["bic_gain"] for r in accepted if r["num_segments"] == 2],
        ]
        labels = [f">= 3 segments ({len(groups[0])})", f"2 segments, exact fit ({len(groups[1])})"]
        gain_ax.hist(
            groups,
            bins=min(20, max(5, len(accepted))),
            stacked=True,
            color=["tab:green", "tab:olive"],
            edgecolor="white",
            label=labels,
        )
        gain_ax.legend(
            title=f"accepted; {len(eligible) - len(accepted)} with >= 2 segments not", fontsize=8, title_fontsize=8
        )
    else:
        _empty(gain_ax, f"no accepted change point\n({len(eligible)} trajectories with >= 2 segments)")
    gain_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    gain_ax.set_xlabel("BIC gain = BIC(no change) - BIC(one drop)")
    gain_ax.set_ylabel("trajectories")
    gain_ax.set_title("When is a one-drop summary preferred?", fontsize=10)

    # A trajectory stopped by online release holds only its kept prefix: no released segments to compare with.
    with_suffix = [r for r in accepted if 0 < r["release_segment"] < r["num_segments"]]
    if with_suffix:
        pre = [float(np.mean(r["segment_scores"][: r["release_segment"]])) for r in with_suffix]
        post = [float(np.mean(r["segment_scores"][r["release_segment"] :])) for r in with_suffix]
        drop_ax.scatter(pre, post, s=18, color="tab:purple", alpha=0.7, label="accepted trajectory")
        low, high = min(pre + post), max(pre + post)
        pad = 0.05 * (high - low or 1.0)
        drop_ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.4", ls="--", lw=1, label="no change")
        drop_ax.set_xlim(low - pad, high + pad)
        drop_ax.set_ylim(low - pad, high + pad)
        drop_ax.legend(loc="upper left", fontsize=8)
    else:
        _empty(drop_ax, "no accepted change point with a released suffix")
    drop_ax.set_xlabel("mean segment score before the change")
    drop_ax.set_ylabel("mean segment score after the change")
    drop_ax.set_title("Accepted changes are downward (below the diagonal)", fontsize=10)

    if accepted:
        position_ax.hist(
            [r["kept_fraction"] for r in accepted], bins=np.linspace(0, 1, 11), color="tab:blue", edgecolor="white"
        )
    else:
        _empty(position_ax, "no accepted change point")
    position_ax.set_xlim(0, 1)
    position_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    position_ax.set_xlabel("release position (kept fraction of the completion)")
    position_ax.set_ylabel("accepted trajectories")
    position_ax.set_title("Where supervision stops varies per sample", fontsize=10)
    for ax in (gain_ax, drop_ax, position_ax):
        ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_teachability(records: Sequence[dict], path, bins: int = DEFAULT_BINS) -> Path:
    """`teachability.png`: where TA-OPD's kept tokens sit against where the release rule stops supervising."""
    tokens = teachability_positions(records)
    kept = tokens["kept"]
    accepted = [release_fraction(r) for r in records if r["accepted"]]
    figure = _figure(12, 4.6)
    density_ax, share_ax = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    figure.suptitle("Token teachability (TA-OPD) and the release rule on the same rollouts")
    edges = np.linspace(0, 1, bins + 1)
    if kept.any():
        density_ax.hist(tokens["position"], bins=edges, density=True, histtype="step", color="0.5", ls="--", lw=1.2,
                        label=f"all completion tokens ({len(kept)})")  # fmt: skip
        density_ax.hist(tokens["position"][kept], bins=edges, density=True, histtype="step", color="tab:red", lw=2,
                        label=f"tokens TA-OPD keeps ({int(kept.sum())})")  # fmt: skip
    if accepted:
        density_ax.hist(accepted, bins=edges, density=True, color="tab:blue", alpha=0.35,
                        label=f"release positions (accepted, {len(accepted)})")  # fmt: skip
    if kept.any() or accepted:
        density_ax.legend(fontsize=8)
    else:
        _empty(density_ax, "no TA-OPD tokens and no accepted change point")
    density_ax.set_xlim(0, 1)
    density_ax.set_xlabel("relative position in the completion")
    density_ax.set_ylabel("density")
    density_ax.set_title("Do the teachable tokens sit where release keeps supervising?", fontsize=10)

    if kept.any():
        shares = [float(tokens["in_prefix"].mean()), float(tokens["in_prefix"][kept].mean())]
        bars = share_ax.bar(["all tokens", "TA-OPD kept"], shares, color=["0.6", "tab:red"])
        share_ax.bar_label(bars, labels=[f"{v:.0%}" for v in shares], fontsize=9)
        share_ax.set_ylim(0, 1.1)
    else:
        _empty(share_ax, "no TA-OPD tokens")
    share_ax.set_ylabel("share inside the release prefix")
    share_ax.set_title("Inside the kept prefix", fontsize=10)
    for ax in (density_ax, share_ax):
        ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)


def plot_support_sweep(margins_by_k: dict[int, Sequence[Sequence[float]]], path, bins: int = DEFAULT_BINS) -> Path:
    """`support_sweep.png`: one normalised margin curve per support size K (`{K: per-trajectory margins}`)."""
    figure = _figure(8, 4.8)
    ax = figure.subplots()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    for i, (k, margins) in enumerate(sorted(margins_by_k.items())):
        curve = margin_curve(margins, bins)
        ax.plot(curve["position"], curve["mean"], "o-", ms=3, color=colors[i % len(colors)], label=f"K = {k}")
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("relative position in the completion (token index + 0.5) / length")
    ax.set_ylabel("normalised margin\nM_t / mean margin of its trajectory")
    ax.set_title("Teacher margin over the student's top-K, for each K", fontsize=11)
    ax.legend(title="support size", fontsize=8)
    ax.grid(alpha=0.3)
    figure.savefig(path)
    return Path(path)
