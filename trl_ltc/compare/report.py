"""The comparison's report: the results table with paired differences (`results.md`), `results.csv` and
`results.png`."""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .spec import (
    DIAGNOSE_DIR,
    MEDIAN_RELEASE,
    REFERENCE_LABELS,
    REFERENCES,
    SUMMARY_METRICS,
    Comparison,
    Policy,
    release_settings,
)


@dataclass(frozen=True)
class Column:
    """A metric column: where its value is, how it is shown, and which mean is best (`"min"`, `"max"` or `None`)."""

    key: str
    header: str
    scale: float = 1.0
    digits: int = 1
    better: str | None = None
    eval_set: str | None = None  # a per-set metric of `result["eval"]`; else a top-level one
    training: bool = False  # only trained runs have it (no value on the reference rows)

    def value(self, result: dict):
        if self.eval_set is None:
            return result.get(self.key)
        return (result.get("eval") or {}).get(self.eval_set, {}).get(self.key)

    @property
    def title(self) -> str:
        return self.header + {"min": " ↓", "max": " ↑"}.get(self.better, "")


METRICS = (
    Column("reverse_kl", "held-out reverse KL", digits=4, better="min"),
    Column("reverse_kl_prefix", "reverse KL on the release prefix", digits=4, better="min"),
    Column("accuracy", "accuracy (%)", scale=100.0, better="max"),
    Column("accuracy_greedy", "greedy accuracy (%)", scale=100.0, better="max"),
    Column("completion_length", "completion length"),
    Column("kept_token_frac", "kept tokens (%)", scale=100.0, training=True),
    Column("tokens_trained", "tokens trained (k)", scale=1e-3, training=True),
    Column("flops", "compute (TFLOP)", scale=1e-12, digits=2, training=True),
    Column("seconds_per_step", "s/step", training=True),
)


def table_columns(results: list[dict], set_names: list[str]) -> list[Column]:
    """The table's metric columns, those that some run has; with several evaluation sets, one accuracy column per
    set (and one greedy accuracy column per set that has it) before the averages."""
    columns = []
    for column in METRICS:
        if column.key in ("reverse_kl_prefix", "accuracy_greedy", "tokens_trained", "flops") and all(
            column.value(r) is None for r in results
        ):
            continue
        if column.key in ("accuracy", "accuracy_greedy") and len(set_names) > 1:
            kind = "" if column.key == "accuracy" else " greedy"
            per_set = [Column(column.key, f"{n}{kind} (%)", 100.0, 1, "max", eval_set=n) for n in set_names]
            columns += [c for c in per_set if any(c.value(r) is not None for r in results)]
            column = Column(column.key, f"average{kind} accuracy (%)", 100.0, 1, "max")
        columns.append(column)
    return columns


def aggregate(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """`(mean, sample standard deviation (n - 1), n)` of the non-missing values; std is `None` below two values."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def _cell(mean, std, scale: float, digits: int, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean * scale:{'+' if signed else ''}.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if std is not None else text


def results_table(results: list[dict], references: dict, policies: list[str], set_names: list[str]) -> str:
    """The markdown table: reference rows, then one row per policy with mean ± std over its seeds; for the quality
    metrics (reverse KL: lowest, accuracy: highest) the best policy mean, as displayed, is bold."""
    columns = table_columns(results, set_names)
    header = ["policy", "seeds", *(column.title for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in REFERENCES:
        if name in references:
            cells = ["–" if c.training else _cell(c.value(references[name]), None, c.scale, c.digits) for c in columns]
            lines.append(f"| {REFERENCE_LABELS[name]} | – | " + " | ".join(cells) + " |")
    stats = {
        policy: [aggregate([c.value(r) for r in results if r["policy"] == policy]) for c in columns]
        for policy in policies
    }
    best = {}
    for j, column in enumerate(columns):
        shown = [round(s[j][0] * column.scale, column.digits) for s in stats.values() if s[j][0] is not None]
        if column.better and shown:
            best[j] = min(shown) if column.better == "min" else max(shown)
    for policy in policies:
        n_seeds = len({r["seed"] for r in results if r["policy"] == policy})
        cells = []
        for j, column in enumerate(columns):
            mean, std, _ = stats[policy][j]
            text = _cell(mean, std, column.scale, column.digits)
            if j in best and mean is not None and round(mean * column.scale, column.digits) == best[j]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {policy} | {n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: list[dict], policies: list[str], baseline: str, set_names: list[str] = ()) -> str:
    """Markdown table of each policy minus `baseline` on the same seed (mean ± std over seeds): the same seed means
    the same prompts and order, so the seed-to-seed spread of the difference is the noise to judge it against. Quality
    columns only: reverse KL (and on the release prefix), accuracy (per set when there are several, greedy too)."""
    by = {(r["policy"], r["seed"]): r for r in results}
    columns = [
        c for c in table_columns(results, list(set_names) or ["accuracy"])
        if c.better and not (len(set_names) > 1 and c.eval_set is None and c.key.startswith("accuracy"))
    ]  # fmt: skip
    titles = [f"Δ {c.header.replace('(%)', '(points)')}" for c in columns]
    lines = [f"| policy − {baseline} | seeds | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(columns)]
    for policy in policies:
        if policy == baseline:
            continue
        seeds = sorted(seed for (p, seed) in by if p == policy and (baseline, seed) in by)
        cells = []
        for column in columns:
            pairs = [(column.value(by[(policy, s)]), column.value(by[(baseline, s)])) for s in seeds]
            mean, std, _ = aggregate([a - b for a, b in pairs if a is not None and b is not None])
            cells.append(_cell(mean, std, column.scale, column.digits, signed=True))
        lines.append(f"| {policy} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _baseline(policies: list[Policy]) -> str | None:
    for policy in policies:
        if policy.fields == {"supervision": "full"}:
            return policy.name
    return None


def collapse_markdown(collapse: dict, comparison: Comparison) -> list[str]:
    """The collapse diagnostics section of results.md: is there a downward change point to find at all?"""

    def number(key, digits=3):
        value = collapse.get(key)
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    release = release_settings(comparison.distill)
    return [
        "## Collapse diagnostics of the untrained student",
        "",
        f"`trl-ltc diagnose` on {collapse.get('trajectories')} of the student's own rollouts of training prompts "
        f"(K={release['top_k']}, segmentation `{release['segmentation']}`): {number('num_segments_mean', 1)} segments "
        f"and {number('completion_length_mean', 1)} tokens per completion on average.",
        "",
        "| accepted drop (paper) | accepted on shuffled segments (null) | accepted, calibrated (p <= 0.05) | "
        "online stops, paper / calibrated | margin before / after the change | median release position (tokens) |",
        "|---|---|---|---|---|---|",
        f"| {number('accepted_fraction')} | {number('accepted_frac_null')} | {number('accepted_frac_calibrated')} | "
        f"{number('online_stopped_frac')} / {number('online_stopped_frac_calibrated')} | "
        f"{number('margin_before_change')} / {number('margin_after_change')} | {collapse[MEDIAN_RELEASE]} |",
        "",
        "Local teachability collapse is only shown where the accepted fraction clearly exceeds the null's (the same "
        "BIC rule on the same segment scores shuffled within each trajectory) and the margin curve falls "
        f"(`{DIAGNOSE_DIR}/margin_curve.png`, `{DIAGNOSE_DIR}/summary.md`). `fixed_prefix` at `median_release` keeps "
        "that many tokens of every completion.",
    ]


def results_markdown(
    results: list[dict], references: dict, comparison: Comparison, collapse: dict | None = None
) -> str:
    policies = [p.name for p in comparison.policies]
    set_names = [s.name for s in comparison.evaluation.sets]
    d, ev = comparison.distill, comparison.evaluation
    batch = d.get("per_device_train_batch_size", 8) * d.get("gradient_accumulation_steps", 1)
    sets = "; ".join(
        f"{s.name}: {s.num_problems or 'all'} problems x {s.num_samples} sample(s) ({s.answer_type})" for s in ev.sets
    )
    stderr = [Column("accuracy_stderr", "", eval_set=n).value(r) for r in results for n in set_names]
    stderr = [v for v in stderr if v is not None]
    lines = [
        "# Supervision policies compared",
        "",
        f"Student `{comparison.student}`, teacher `{comparison.teacher}`; {d.get('max_steps')} steps x {batch} "
        f"prompts "
        f"x <= {d.get('max_completion_length')} tokens per run (`loss_type: {d.get('loss_type', 'advantage')}`, "
        f"LoRA: {bool(d.get('use_peft'))}); seeds {', '.join(map(str, comparison.seeds))}. Evaluation: {sets}; "
        f"<= {ev.max_new_tokens} new tokens at temperature {ev.temperature}, evaluation seed {ev.seed}.",
        "",
        results_table(results, references, policies, set_names),
        "",
        "Mean ± sample standard deviation over seeds (one trained student per seed); **bold**: the best policy mean "
        "(lowest reverse KL, highest accuracy). Held-out reverse KL: mean per-token KL(student || teacher) in nats on "
        "the student's own samples of the held-out problems, exact over the vocabulary. Accuracy: pass@1 estimated "
        "from the samples per problem at the evaluation temperature (greedy: one greedy completion per problem); "
        "final answers checked with math-verify (`math`), as a choice letter (`choice`) or as the text of the last "
        "`answer:` line (`statement`). Reverse KL on the release prefix: the same KL on the tokens "
        "`supervision: release` keeps of each sample. Kept tokens: supervised completion tokens / completion tokens "
        "during training; tokens trained: their sum over the run. s/step: training wall time per optimizer step.",
    ]
    if stderr:
        lines += [
            "",
            f"Evaluation noise: one run's accuracy has a standard error over problems of about "
            f"{100 * statistics.fmean(stderr):.1f} points.",
        ]
    baseline = _baseline(comparison.policies)
    if baseline is not None and len(policies) > 1:
        lines += [
            "",
            f"## Paired differences against `{baseline}` (same seed, mean ± std over seeds)",
            "",
            paired_differences(results, policies, baseline, set_names),
        ]
    if collapse is not None:
        lines += ["", *collapse_markdown(collapse, comparison)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "kind", "policy", "seed", "supervision", "fields", "reverse_kl", "reverse_kl_prefix", "accuracy",
    "accuracy_greedy", "accuracy_stderr", "completion_length", "truncated_frac", "kept_token_frac", "tokens_trained",
    "generated_tokens", "teacher_tokens", "trained_tokens", "flops", "accuracy_at_full_compute",
    "delta_at_equal_compute", "flops_to_target_gain", "seconds_per_step", "steps", "train_seconds", "eval_seconds",
]  # fmt: skip
COMPUTE_FIELDS = ("generated_tokens", "teacher_tokens", "trained_tokens", "flops")
CURVE_FIELDS = [
    "policy", "seed", "step", *COMPUTE_FIELDS, "wall_seconds", "accuracy", "accuracy_greedy", "reverse_kl",
    "reverse_kl_prefix", "completion_length", "truncated_frac",
]  # fmt: skip
NOT_REACHED = "not reached"


PER_SET_FIELDS = ("reverse_kl", "reverse_kl_prefix", "accuracy", "accuracy_greedy", "completion_length")


def write_csv(
    results: list[dict], references: dict, set_names: list[str], path: Path, matched: dict | None = None
) -> Path:
    per_set = [f"{n}/{k}" for n in set_names for k in PER_SET_FIELDS]
    per_set = per_set if len(set_names) > 1 else []
    rows = []
    for name in REFERENCES:
        if name in references:
            rows.append({"kind": "reference", "policy": REFERENCE_LABELS[name], **_flat(references[name], set_names)})
    for r in results:
        rows.append({
            "kind": "run", "policy": r["policy"], "seed": r["seed"], "supervision": r["fields"].get("supervision"),
            "fields": json.dumps(r["fields"]), "steps": r.get("steps"), "train_seconds": r.get("train_seconds"),
            "eval_seconds": r.get("eval_seconds"), "kept_token_frac": r.get("kept_token_frac"),
            "tokens_trained": r.get("tokens_trained"),
            "seconds_per_step": r.get("seconds_per_step"), **_flat(r, set_names),
            **{k: r.get(k) for k in COMPUTE_FIELDS}, **(matched or {}).get((r["policy"], r["seed"]), {}),
        })  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS + per_set, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _flat(result: dict, set_names: list[str]) -> dict:
    row = {k: result.get(k) for k in SUMMARY_METRICS}
    stderr = [Column("accuracy_stderr", "", eval_set=n).value(result) for n in set_names]
    row["accuracy_stderr"] = stderr[0] if len(stderr) == 1 else None
    for n in set_names:
        for k in PER_SET_FIELDS:
            row[f"{n}/{k}"] = Column(k, "", eval_set=n).value(result)
    return row


def plot_results(results: list[dict], references: dict, policies: list[str], path: Path) -> Path:
    """One panel per metric: policies on x, one dot per seed, the mean ± std as a bar, references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in METRICS if c.key != "seconds_per_step"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, column in zip(axes[0], panels):
        scale = column.scale
        for i, policy in enumerate(policies):
            values = [column.value(r) for r in results if r["policy"] == policy and column.value(r) is not None]
            if not values:
                continue
            mean, std, _ = aggregate(values)
            color = "tab:red" if policy.startswith("release") else "tab:blue"
            ax.bar(i, mean * scale, width=0.6, color=color, alpha=0.25)
            if std is not None:
                ax.errorbar(i, mean * scale, yerr=std * scale, color=color, capsize=3)
            jitter = [(j - (len(values) - 1) / 2) * 0.08 for j in range(len(values))]
            ax.scatter([i + dx for dx in jitter], [v * scale for v in values], color=color, s=14, zorder=3)
        for name, style in (("student", "--"), ("teacher", ":")):
            value = None if column.training else column.value(references.get(name, {}))
            if value is not None:
                ax.axhline(value * scale, linestyle=style, color="gray", label=REFERENCE_LABELS[name])
        arrow = {"min": " (lower is better)", "max": " (higher is better)"}.get(column.better, "")
        ax.set_title(column.header + arrow, fontsize=10)
        ax.set_xticks(list(range(len(policies))))
        ax.set_xticklabels(policies, rotation=60, ha="right", fontsize=8)
        _legend(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Curves: quality against compute
# ---------------------------------------------------------------------------------------------------------------


def curves_of(results: list[dict], start: dict | None) -> dict[tuple[str, int], list[dict]]:
    """`{(policy, seed): points}`, each curve from step 0 (the untrained student, `start`) to its last step."""
    return {
        (r["policy"], r["seed"]): ([start] if start is not None else []) + list(r["curve"])
        for r in results
        if r.get("curve")
    }


def value_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of a curve `[(x, y), ...]` (x non-decreasing) at `x`; None beyond its last point."""
    if not points or x > points[-1][0] or x < points[0][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def first_reaching(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest x at which the curve, linearly interpolated, reaches `target` (y >= target); None if never."""
    if points and points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 >= target > y0:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def _xy(points: list[dict], metric: str) -> list[tuple[float, float]]:
    return [(p["flops"], p[metric]) for p in points if p.get("flops") is not None and p.get(metric) is not None]


def matched_compute(
    results: list[dict], baseline: str | None, start: dict | None, target_gain: float = 0.9, metric: str = "accuracy"
) -> dict[tuple[str, int], dict]:
    """Per (policy, seed), against the baseline run of the same seed, along the curves (`metric` on the curve sets):

    - `accuracy_at_full_compute`: the policy's accuracy at the baseline's final flops, interpolated along its curve;
      `"not reached"` when its curve ends before that compute.
    - `flops_to_target_gain`: the flops at which its curve first reaches the untrained student's accuracy plus
      `target_gain` of the baseline's final gain over it; `"not reached"` when it never does. Blank when the baseline
      gained nothing.
    - `delta_at_equal_compute`: its accuracy minus the baseline's, both interpolated at the smaller of the two final
      flops (the most compute both spent), so that every run has a paired difference at equal compute. Not for the
      baseline itself.
    """
    curves = curves_of(results, start)
    out = {}
    for (policy, seed), points in curves.items():
        base = curves.get((baseline, seed))
        if base is None or start is None:
            continue
        xy, base_xy = _xy(points, metric), _xy(base, metric)
        final_flops, final_value = base[-1].get("flops"), base[-1].get(metric)
        row = {}
        if final_flops is not None and xy:
            at = value_at(xy, final_flops)
            row["accuracy_at_full_compute"] = NOT_REACHED if at is None else at
            common = min(xy[-1][0], final_flops)
            ours, theirs = value_at(xy, common), value_at(base_xy, common)
            if policy != baseline and ours is not None and theirs is not None:
                row["delta_at_equal_compute"] = ours - theirs
        gain = None if final_value is None or start.get(metric) is None else final_value - start[metric]
        if gain is not None and gain > 0 and xy:
            reached = first_reaching(xy, start[metric] + target_gain * gain)
            row["flops_to_target_gain"] = NOT_REACHED if reached is None else reached
        out[(policy, seed)] = row
    return out


def write_curves_csv(results: list[dict], start: dict | None, set_names: list[str], path: Path) -> Path:
    per_set = [f"{n}/{k}" for n in set_names for k in PER_SET_FIELDS] if len(set_names) > 1 else []
    rows = []
    for (policy, seed), points in curves_of(results, start).items():
        for point in points:
            row = {"policy": policy, "seed": seed, **{k: point.get(k) for k in CURVE_FIELDS[2:]}}
            for n in set_names if per_set else []:
                for k in PER_SET_FIELDS:
                    row[f"{n}/{k}"] = (point.get("eval") or {}).get(n, {}).get(k)
            rows.append(row)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CURVE_FIELDS + per_set, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_curves(
    results: list[dict], start: dict | None, policies: list[str], path: Path, metric: str = "accuracy"
) -> Path:
    """Accuracy against compute: per policy one thin line per seed and a thick line through the mean over seeds at
    each checkpoint (mean flops, mean accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = curves_of(results, start)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.get_cmap("tab10")
    for i, policy in enumerate(policies):
        seeds = [points for (p, _), points in curves.items() if p == policy]
        if not seeds:
            continue
        color = colors(i % 10)
        for points in seeds:
            xs = [p["flops"] for p in points if p.get(metric) is not None]
            ys = [100 * p[metric] for p in points if p.get(metric) is not None]
            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8, marker=".", markersize=3)
        length = min(len(points) for points in seeds)
        mean_x = [statistics.fmean(points[j]["flops"] for points in seeds) for j in range(length)]
        mean_y = [
            100 * statistics.fmean(points[j][metric] for points in seeds if points[j].get(metric) is not None)
            if any(points[j].get(metric) is not None for points in seeds) else math.nan
            for j in range(length)
        ]  # fmt: skip
        ax.plot(mean_x, mean_y, color=color, linewidth=2, marker="o", markersize=4, label=f"{policy} ({len(seeds)})")
    ax.set_xlabel("compute (estimated FLOPs: generation + teacher scoring + training)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title("Quality against compute (mean over seeds; thin lines: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, path)


def matched_markdown(matched: dict, policies: list[str], baseline: str, target_gain: float) -> list[str]:
    """The matched-compute section of results.md: mean ± std over seeds, and how many seeds got there."""

    def summary(key: str, scale: float, digits: int) -> str:
        values = [row.get(key) for (p, _), row in matched.items() if p == policy and key in row]
        reached = [v for v in values if v != NOT_REACHED]
        if not values:
            return "–"
        mean, std, n = aggregate(reached)
        text = _cell(mean, std, scale, digits) if n else NOT_REACHED
        return text if n == len(values) else f"{text} ({n}/{len(values)} seeds)"

    header = (
        f"| policy | accuracy (%) at `{baseline}`'s final compute | Δ vs `{baseline}` at equal compute (points) | "
        f"compute to reach {100 * target_gain:.0f}% of `{baseline}`'s accuracy gain (TFLOP) |"
    )
    lines = [
        f"## Matched compute (against `{baseline}` on the same seed, along the curves)",
        "",
        header,
        "|---|---|---|---|",
    ]
    for policy in policies:
        lines.append(f"| {policy} | {summary('accuracy_at_full_compute', 100.0, 1)} | "
                     f"{summary('delta_at_equal_compute', 100.0, 1)} | "
                     f"{summary('flops_to_target_gain', 1e-12, 2)} |")  # fmt: skip
    note = (
        f"Along each run's curve (its checkpoints on the curve sets, linearly interpolated in flops): its accuracy at "
        f'the compute where `{baseline}` of the same seed ended ("{NOT_REACHED}": the run ended with less compute); '
        f"its accuracy minus `{baseline}`'s, both at the smaller of their two final computes (paired, mean ± std over "
        f"seeds); and the compute at which it first reached the untrained student's accuracy plus "
        f"{100 * target_gain:.0f}% of `{baseline}`'s final gain over it. Curves: `curves.csv`, `curves.png`."
    )
    lines += ["", note]
    return lines


def write_results(
    results: list[dict],
    references: dict,
    comparison: Comparison,
    collapse: dict | None = None,
    curve_start: dict | None = None,
) -> dict[str, Path]:
    out = comparison.output_dir
    policies = [p.name for p in comparison.policies]
    set_names = [s.name for s in comparison.evaluation.sets]
    baseline = _baseline(comparison.policies)
    curves = comparison.curves
    matched = {}
    if curves is not None and baseline is not None:
        matched = matched_compute(results, baseline, curve_start, curves.target_gain)
    markdown = results_markdown(results, references, comparison, collapse)
    if matched:
        markdown += "\n" + "\n".join(matched_markdown(matched, policies, baseline, curves.target_gain)) + "\n"
    (out / "results.md").write_text(markdown)
    files = {
        "results.csv": write_csv(results, references, set_names, out / "results.csv", matched),
        "results.md": out / "results.md",
        "results.png": plot_results(results, references, policies, out / "results.png"),
    }
    if curves is not None:
        curve_names = [s.name for s in comparison.curve_sets]
        files["curves.csv"] = write_curves_csv(results, curve_start, curve_names, out / "curves.csv")
        files["curves.png"] = plot_curves(results, curve_start, policies, out / "curves.png")
    return files


def _legend(ax) -> None:
    """A small legend, where the axes have labelled lines."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig, path):
    """Write `fig` to `path` (120 dpi, tight layout) and close it; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
