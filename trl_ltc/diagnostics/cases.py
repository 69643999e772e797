"""The case-study page `cases.html`: a few trajectories with their kept prefix, released suffix, segments and
an inline SVG chart of the segment scores.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible_text(text: str) -> str:
    """`text` as the case page shows it: control characters that HTML cannot carry, other than tab and newline,
    become visible stand-ins (C0 and DEL their Unicode Control Picture, e.g. U+0001 -> "␁"; C1 controls `\\x85`).
    Every other character is kept as is, so the page's text is the decoded completion for ordinary text."""

    def stand_in(match: re.Match) -> str:
        code = ord(match.group())
        if code < 0x20:
            return chr(0x2400 + code)
        return "\u2421" if code == 0x7F else f"\\x{code:02x}"

    return _CONTROL.sub(stand_in, text)


def select_cases(records: Sequence[dict], num_cases: int) -> list[dict]:
    """Up to `num_cases` records, accepted ones with the largest BIC gain first, then not-accepted ones with the
    most segments (at least `num_cases // 3` of them when both kinds exist); shown in their original order."""
    accepted = sorted((r for r in records if r["accepted"]), key=lambda r: -r["bic_gain"])
    others = sorted((r for r in records if not r["accepted"]), key=lambda r: -r["num_segments"])
    n_others = min(len(others), max(num_cases // 3, num_cases - len(accepted)))
    chosen = accepted[: num_cases - n_others] + others[:n_others]
    return sorted(chosen, key=lambda r: r["index"])


def _segment_svg(record: dict, width: int = 420, height: int = 150) -> str:
    """Inline SVG bar chart of the segment scores, kept vs released, with the change point marked."""
    scores = record["segment_scores"]
    n, tau = len(scores), record["release_segment"]
    left, right, top, bottom = 42, 10, 20, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="segment scores">'
        )
    ]
    if n == 0:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="axis">no segments</text>')
        return "".join(parts) + "</svg>"
    high = max(max(scores), 1e-9)

    def y(value: float) -> float:
        return top + plot_h * (1 - max(value, 0.0) / high)

    step = plot_w / n
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="frame"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="frame"/>')
    for value, label in ((0.0, "0"), (high, f"{high:.2f}")):
        parts.append(f'<text x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end" class="axis">{label}</text>')
    for i, score in enumerate(scores):
        kind = "kept" if i < tau else "released"
        x0 = left + i * step + 0.12 * step
        parts.append(
            f'<rect x="{x0:.1f}" y="{y(score):.1f}" width="{0.76 * step:.1f}" height="{top + plot_h - y(score):.1f}" '
            f'class="bar {kind}"><title>segment {i}: score {score:.3f}</title></rect>'
        )
    label_every = max(1, math.ceil(n / 12))
    for i in range(0, n, label_every):
        parts.append(
            f'<text x="{left + (i + 0.5) * step:.1f}" y="{top + plot_h + 13}" text-anchor="middle" '
            f'class="axis">{i}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 3}" text-anchor="middle" class="axis">'
        "segment (score = log(1 + mean margin))</text>"
    )
    if record["accepted"] and 0 < tau < n:
        for lo, hi in ((0, tau), (tau, n)):
            mean = float(np.mean(scores[lo:hi]))
            parts.append(
                f'<line x1="{left + lo * step:.1f}" y1="{y(mean):.1f}" x2="{left + hi * step:.1f}" '
                f'y2="{y(mean):.1f}" class="mean"/>'
            )
        x_cut = left + tau * step
        parts.append(f'<line x1="{x_cut:.1f}" y1="{top - 12}" x2="{x_cut:.1f}" y2="{top + plot_h}" class="cut"/>')
        anchor, dx = ("end", -4) if x_cut > left + 0.6 * plot_w else ("start", 4)  # keep the label inside the chart
        parts.append(
            f'<text x="{x_cut + dx:.1f}" y="{top - 5}" text-anchor="{anchor}" class="cut-label">change point</text>'
        )
    return "".join(parts) + "</svg>"


def _prompt_text(prompt) -> str:
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _case_html(record: dict) -> str:
    esc = html.escape
    tau, n = record["release_segment"], record["num_segments"]
    status = (
        f"accepted: supervision stops after segment {tau - 1} (keeps {tau} of {n})"
        if record["accepted"]
        else f"not accepted: all {n} segments kept"
    )
    texts = record.get("segment_texts") or [""] * n
    spans = []
    for i, (text, score) in enumerate(zip(texts, record["segment_scores"])):
        kind = "kept" if i < tau else "released"
        cut = " cut" if record["accepted"] and i == tau else ""
        spans.append(
            f'<span class="seg {kind}{cut}" data-label="{i} · {score:.2f}" '
            f'title="segment {i}: score {score:.3f}, {kind}">{esc(visible_text(text))}</span>'
        )
    rows = []
    for i, (span, score, margin, a_mean, a_std) in enumerate(
        zip(
            record["segment_token_spans"],
            record["segment_scores"],
            record["segment_margin_mean"],
            record["segment_advantage_mean"],
            record["segment_advantage_std"],
        )
    ):
        kind = "kept" if i < tau else "released"
        rows.append(
            f'<tr class="{kind}"><td>{i}</td><td>{span[0]}–{span[1]}</td><td>{_fmt(score)}</td><td>{_fmt(margin)}</td>'
            f"<td>{_fmt(a_mean)}</td><td>{_fmt(a_std)}</td><td>{kind}</td></tr>"
        )
    prompt = _prompt_text(record.get("prompt"))
    prompt_html = f'<div class="prompt"><b>Prompt</b><pre>{esc(visible_text(prompt))}</pre></div>' if prompt else ""
    prompt_id = record.get("prompt_id")
    ident = f"trajectory {record['index']}" + (f" · prompt {esc(str(prompt_id))}" if prompt_id is not None else "")
    return (
        f'<section class="case {"accepted" if record["accepted"] else "rejected"}" id="case-{record["index"]}">'
        f"<h2>{ident} · {esc(status)}</h2>"
        f'<p class="facts">{record["completion_length"]} tokens · {n} segments · '
        f'BIC gain {_fmt(record["bic_gain"], 2)}'
        f" · kept fraction {_fmt(record['kept_fraction'], 2)}</p>"
        f"{prompt_html}"
        f'<div class="body"><div class="chart">{_segment_svg(record)}{_CHART_NOTE}</div>'
        f'<div class="completion" data-index="{record["index"]}">{"".join(spans)}</div></div>'
        "<details><summary>segment table</summary><table><thead><tr><th>segment</th><th>tokens</th><th>score</th>"
        "<th>mean margin</th><th>mean A</th><th>std A</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></details></section>"
    )


_CHART_NOTE = (
    '<p class="chart-note"><span class="key kept"></span>kept <span class="key released"></span>released '
    '<span class="key mean"></span>mean before / after the change</p>'
)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px;
       padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 15px; margin: 0 0 4px; }
.meta, .facts { color: #555; margin: 2px 0 8px; }
.legend span { padding: 2px 6px; margin-right: 8px; border-radius: 3px; }
.case { border: 1px solid #ddd; border-radius: 6px; padding: 12px 14px; margin: 16px 0; }
.case.accepted { border-left: 4px solid #c62828; }
.prompt pre { white-space: pre-wrap; margin: 2px 0 8px; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace;
              color: #444; background: #f6f6f6; padding: 6px 8px; border-radius: 4px; }
.body { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.chart { flex: 0 0 auto; }
.completion { flex: 1 1 420px; min-width: 300px; white-space: pre-wrap; overflow-wrap: anywhere;
              font: 13px/1.9 ui-monospace, Menlo, Consolas, monospace; }
.completion:empty::before { content: "(empty completion)"; color: #888; font-style: italic; }
.seg { border-left: 2px solid #9aa; padding: 1px 2px 1px 3px; }
.seg::before { content: attr(data-label); font: 9px/1 system-ui, sans-serif; color: #456; background: #eef2f5;
               border-radius: 2px; padding: 0 3px; margin-right: 3px; vertical-align: super; white-space: nowrap; }
.kept, .legend .kept { background: #e3f4e6; }
.released, .legend .released { background: #f1f1f1; color: #8a8a8a; }
.seg.cut { border-left: 3px solid #c62828; }
.seg.cut::before { content: "✂ released · " attr(data-label); color: #fff; background: #c62828; }
svg .frame { stroke: #888; stroke-width: 1; }
svg .axis { font: 10px system-ui, sans-serif; fill: #555; }
svg .bar.kept { fill: #4caf50; }
svg .bar.released { fill: #b0b0b0; }
svg .mean { stroke: #1565c0; stroke-width: 1.5; stroke-dasharray: 4 2; }
svg .cut { stroke: #c62828; stroke-width: 2; }
svg .cut-label { font: 10px system-ui, sans-serif; fill: #c62828; }
table { border-collapse: collapse; margin-top: 6px; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
tr.released td { color: #888; }
.chart-note { font-size: 11px; color: #555; margin: 0; }
.key { display: inline-block; width: 10px; height: 10px; margin: 0 3px 0 8px; vertical-align: -1px; }
.key.kept { background: #4caf50; } .key.released { background: #b0b0b0; }
.key.mean { height: 0; border-top: 2px dashed #1565c0; width: 14px; vertical-align: 3px; }
details summary { cursor: pointer; color: #555; margin-top: 6px; }
"""


def write_cases_html(
    records: Sequence[dict], path, num_cases: int = 8, title: str = "Release cases", meta: str = ""
) -> Path:
    """Write `cases.html`: a self-contained page (inline CSS and SVG, no external assets) of selected trajectories.

    Each case shows its completion split into segments (a label before each with its index and score), the kept
    prefix on green and the released suffix in grey from the change point (red marker) on, and an SVG bar chart
    of the segment scores with the change point and the left/right means. Text is HTML-escaped and shown through
    `visible_text`, so stripping the tags of a `.completion` element and un-escaping gives the completion.
    """
    cases = select_cases(records, num_cases)
    legend = (
        '<p class="legend"><span class="kept">kept prefix (supervised)</span>'
        '<span class="released">released suffix (not supervised)</span>'
        "labels: segment index · score log(1 + mean teacher margin)</p>"
    )
    body = "".join(_case_html(r) for r in cases) or "<p>No trajectories.</p>"
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(meta)} Showing {len(cases)} of '
        f"{len(records)} trajectories.</p>{legend}{body}</body></html>\n"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
