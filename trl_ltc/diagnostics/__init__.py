"""Diagnostics of local teachability collapse: per-trajectory records, the paper's plots and a case-study page.

"Prefix Teach, Suffix Fade" (arXiv 2605.13643) argues from pictures; this module draws them for any
teacher/student pair, from the same functions the trainer uses (`token_signals`, `segment_completions`,
`supervision_weights("release", ...)`), so what is plotted is what training would do.

`trl-ltc diagnose` (`trl_ltc.commands.diagnose`, running `diagnose`) samples student completions, scores them and
writes into `--output_dir`:

- `records.jsonl`: One line per trajectory (`trajectory_records`, schema below).
- `margin_curve.png`: Mean *normalised* teacher margin against the relative position in the completion, above the mean
  advantage `A_t` with its dispersion on the same axis (paper Figures 1-2).
- `release.png`: BIC gain histogram; pre- vs post-change mean segment score of accepted trajectories (under the
  diagonal = downward); release positions as a fraction of the completion length (paper Figure 3).
- `support_sweep.png`: Normalised margin curves for each K of `--top_k_sweep` (paper Figure 5).
- `teachability.png`: The two papers' views of the same rollouts: density of the tokens TA-OPD keeps
  (`token_teachability`, arXiv 2605.26844) against the relative position, overlaid with the density of the release
  positions of accepted trajectories; and the share of TA-OPD's tokens that fall in the release rule's kept prefix,
  against the share of all tokens that do (what an unrelated selection would give).
- `cases.html`: A self-contained page with a few trajectories: kept prefix and released suffix, segment boundaries and
  scores, and an inline SVG chart of the segment scores with the change point (paper Figure 6).
- `summary.md`: Key numbers in a small table, the accepted fraction against its null (below), and the replay of the
  online release rule (below).

## Null model of the change point

With a few segments the BIC rule prefers a downward drop often even on scores that have none (on iid scores about
half of the 2-segment and a sixth of the 10-segment trajectories). `null_acceptance` runs the same rule on each
record's segment scores shuffled within the trajectory (`trl_ltc.release.null_change_point`, seeded with the run's
`seed` plus `trl_ltc.release.NULL_SEED_OFFSET`): every record of `trl-ltc diagnose` gets `accepted_null`, and
`summary.md` sets the accepted fraction against the null's. A local teachability collapse is only shown where the
first clearly exceeds the second and the margin curve falls.

## Online release replay

`online_replay` replays `trl_ltc.release.online_release` (formula 9 of the design) on the records' segment
scores: what `rollout_truncation="online"` would have decided while generating these completions. Every record
gets `online_stop_segment`, `online_release_segment`, `online_stopped` (stopped before its last segment),
`online_agrees` (online and offline release points equal), `online_generated_tokens` (tokens generated when it
stopped: the block of `check_tokens` tokens in which segment `online_stop_segment` started ends, capped at the
completion length; the whole completion when not stopped) and `online_saved_tokens` (the rest of the completion).
`trl-ltc diagnose --replay records.jsonl` replays recorded rollouts (`records.jsonl`, or the trainer's
`release_records.jsonl` of an offline `release` run) without loading any model.

During training, `ReleaseDiagnosticsCallback` keeps the records of the last steps and writes
`release.png` and `margin_curve.png` (and the records, `release_records.jsonl`) into the trainer's output
directory at each save and at the end.

## Definitions

*Relative position* of completion token `i` (0-based) of a completion of `n` tokens: `(i + 0.5) / n`, in
`(0, 1)`; curves average tokens in `bins` equal-width position bins (20 by default).

*Normalised margin*: `M_t / mean_s M_s`, the teacher margin (formula 4 of the design) divided by the mean margin
of its own trajectory, so 1 is the trajectory's average and trajectories of different sharpness share one scale.
Curves first average each trajectory's normalised margins inside a bin, then average those bin means over the
trajectories (each trajectory weighs the same); trajectories whose mean margin is 0 are left out.

## Record schema (`records.jsonl` and `trajectory_records`)

Token lists run over the completion tokens (`completion_mask != 0`) in order; segment lists over segments.

- `index`, `prompt_id`, `step`, `prompt`: where the trajectory comes from (`None` when unknown).
- `completion_ids` (list of int), `completion_length` (int).
- `num_segments`; `segment_token_spans` (`[start, end)` token indices); `segment_scores` (the scores the
  change point was computed on: `log(1 + mean margin)` for the release rule); `segment_margin_mean`;
  `segment_advantage_mean`, `segment_advantage_std` (population std of `A_t` over the segment's tokens).
- `release_segment` (segments kept: `tau` when accepted, else `num_segments`), `accepted`, `bic_gain`.
- `accepted_null` (only from `trl-ltc diagnose`): whether the same rule accepts a drop on the record's segment
  scores shuffled (`null_acceptance`).
- `kept_tokens`, `kept_fraction`: supervised tokens with non-zero weight, and their fraction of the supervised
  tokens (the trainer's `release/release_position`).
- `token_margins`, `token_advantages`: per-token `M_t` and `A_t`.
- `segment_texts` (only with a tokenizer): each segment's decoded text; they concatenate to the completion's
  decoded text (special tokens skipped).
- `teachability_kept` (only when TA-OPD weights are given, as `trl-ltc diagnose` does): per token, 1 if
  `supervision="token_teachability"` keeps it, else 0.

*Release fraction* of a record: the tokens of its first `release_segment` segments as a fraction of its completion
length (1 when not accepted); with `supervision="release"` it is the kept fraction.

## Modules

- `records`: `trajectory_records`, `write_records` (light: no plotting; the trainer imports it).
- `analysis`: position curves, `summarize`, `null_acceptance`, `online_replay`, `write_summary`.
- `plots`: the PNG figures (matplotlib, imported when a plot is drawn).
- `cases`: the case-study page `cases.html`.
- `pipeline`: `diagnose`, the whole measurement on a teacher/student pair.
- `callback`: `ReleaseDiagnosticsCallback`, the same records and plots during training.

Every public name is importable from `trl_ltc.diagnostics`; each is loaded on first use, so that importing the
trainer does not load the analysis, plots or case-page modules.
"""

from importlib import import_module

__all__ = [
    "ReleaseDiagnosticsCallback",
    "diagnose",
    "margin_curve",
    "null_acceptance",
    "online_replay",
    "plot_margin_curve",
    "plot_release",
    "plot_support_sweep",
    "summarize",
    "summarize_online",
    "trajectory_records",
    "visible_text",
    "write_cases_html",
    "write_records",
    "write_summary",
]

# name -> submodule of every name of the former single module (private helpers included), loaded on first use
_LAZY = {
    "DEFAULT_BINS": "records",
    "trajectory_records": "records",
    "completion_text": "records",
    "write_records": "records",
    "_finite": "records",
    "_TOKEN_ARRAYS": "records",
    "_compact": "records",
    "_position_bins": "analysis",
    "normalised_margins": "analysis",
    "margin_curve": "analysis",
    "advantage_curve": "analysis",
    "release_cut": "analysis",
    "_before_after": "analysis",
    "release_fraction": "analysis",
    "teachability_positions": "analysis",
    "summarize": "analysis",
    "_null_summary": "analysis",
    "null_acceptance": "analysis",
    "_teachability_summary": "analysis",
    "online_replay": "analysis",
    "summarize_online": "analysis",
    "_ONLINE_ROWS": "analysis",
    "online_summary_lines": "analysis",
    "_SUMMARY_ROWS": "analysis",
    "null_summary_line": "analysis",
    "write_summary": "analysis",
    "_figure": "plots",
    "_empty": "plots",
    "plot_margin_curve": "plots",
    "plot_release": "plots",
    "plot_teachability": "plots",
    "plot_support_sweep": "plots",
    "_CONTROL": "cases",
    "visible_text": "cases",
    "select_cases": "cases",
    "_segment_svg": "cases",
    "_prompt_text": "cases",
    "_fmt": "cases",
    "_case_html": "cases",
    "_CHART_NOTE": "cases",
    "_CSS": "cases",
    "write_cases_html": "cases",
    "diagnose": "pipeline",
    "_trimmed": "pipeline",
    "_load_prompts": "pipeline",
    "ReleaseDiagnosticsCallback": "callback",
}
_COMMAND = ("build_parser", "main")  # the command line, now in `trl_ltc.commands.diagnose`


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _COMMAND:
        value = getattr(import_module("trl_ltc.commands.diagnose"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return value


def __dir__():
    return sorted({*globals(), *_LAZY, *_COMMAND})
