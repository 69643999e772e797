"""`diagnose`: sample student completions, score them with the teacher as the trainer does, write the records,
plots, case page and summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .analysis import (
    calibrated_acceptance,
    null_acceptance,
    online_replay,
    online_summary_lines,
    summarize_online,
    write_summary,
)
from .cases import write_cases_html
from .plots import plot_margin_curve, plot_release, plot_support_sweep, plot_teachability
from .records import DEFAULT_BINS, trajectory_records, write_records


@torch.no_grad()
def diagnose(
    student,
    teacher,
    tokenizer,
    prompts: Sequence,
    output_dir,
    *,
    prompt_ids: Sequence | None = None,
    top_k: int = 10,
    top_k_sweep: Sequence[int] = (2, 5, 10, 20),
    segmentation: str = "nltk",
    segment_window: int = 64,
    max_completion_length: int = 256,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 0,
    num_cases: int = 8,
    bins: int = DEFAULT_BINS,
    progress: bool = True,
    settings: dict | None = None,
    token_top_k: int = 16,
    token_score: str = "teachability",
    token_keep_ratio: float = 0.05,
    token_min_keep: int = 1,
    online_min_segments: int = 3,
    online_patience: int = 2,
    online_check_tokens: int = 16,
    release_alpha: float = 0.05,
    release_permutations: int | None = None,
) -> dict[str, Path]:
    """Sample, score and segment completions of `prompts` and write every diagnostics file into `output_dir`.

    Uses the trainer's functions throughout: `sample_completions` (completions cut after the first EOS, which is
    kept), `token_signals` at `temperature` with the margin over the student's top-`top_k`,
    `segment_completions`, and `supervision_weights("release", ...)` for the change point and the weights.
    Margins for each K of `top_k_sweep` are computed the same way (`support_sweep.png`). The TA-OPD features
    (`token_top_k`) come from the same pass, and `supervision_weights("token_teachability", ...)` selects the
    tokens over each scoring batch of `batch_size` trajectories, as training does over a per-device batch
    (`teachability.png`); `token_score="random"` draws from a generator seeded with `seed`. Every record gets
    `accepted_null` from `null_acceptance` with the same `seed` (module docstring) and `accepted_calibrated` from
    `calibrated_acceptance` at `release_alpha` (formula 10), and `online_stopped_calibrated`, the calibrated online
    rule's stop (the paper's online rule gives `online_*`). The online
    release rule is replayed on the records with `online_min_segments`, `online_patience` and
    `online_check_tokens` (`online_replay`; fields in `records.jsonl`, overall numbers in `summary.md`).

    Returns `{file name: path}` of the files written.
    """
    from tqdm.auto import tqdm

    from ..generation import sample_completions
    from ..segmentation import segment_completions
    from ..signals import shared_vocab_size, token_signals
    from ..spec import check_top_k
    from ..supervision import supervision_weights
    from ..teachability import TeachabilityFeatures

    vocab = shared_vocab_size(student, teacher)  # the token ids both output heads have (they may be padded)
    for k in (top_k, *top_k_sweep):
        check_top_k("release_top_k", k, vocab)
    check_top_k("token_top_k", token_top_k, vocab, minimum=1)
    generator = torch.Generator().manual_seed(seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    prompts = list(prompts)
    prompt_ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
    student.eval()
    teacher.eval()
    rollouts = sample_completions(
        student, tokenizer, prompts, max_completion_length, batch_size, temperature, seed=seed, progress=progress,
        vocab_size=vocab,
    )
    sweep = sorted(set(top_k_sweep))
    records, sweep_margins = [], {k: [] for k in sweep}
    for start in tqdm(range(0, len(prompts), batch_size), desc="Scoring", disable=not progress):
        rows = slice(start, start + batch_size)
        prompt_ids_b, prompt_mask, completion_ids, completion_mask = _trimmed(rollouts, rows)
        batch = (
            torch.cat([prompt_ids_b, completion_ids], 1).to(student.device),  # input_ids
            torch.cat([prompt_mask, completion_mask], 1).to(student.device),  # attention_mask
            torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).to(student.device),  # completion mask
        )
        main = token_signals(student, teacher, *batch, top_k=top_k, temperature=temperature, feature_k=token_top_k)
        completion = slice(prompt_ids_b.shape[1], None)
        margins, advantages = (x[:, completion].cpu() for x in (main.margins, main.advantages))
        features = TeachabilityFeatures._make(x[:, completion].cpu() for x in main.features)
        loss_mask = completion_mask.float()
        segment_ids = segment_completions(completion_ids, completion_mask, tokenizer, segmentation, segment_window)
        supervision = supervision_weights(
            "release", loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages
        )
        token_teachability = supervision_weights(
            "token_teachability",
            loss_mask,
            features=features,
            generator=generator,
            token_score=token_score,
            token_keep_ratio=token_keep_ratio,
            token_min_keep=token_min_keep,
        )
        records += trajectory_records(
            completion_ids,
            completion_mask,
            loss_mask,
            segment_ids,
            supervision,
            margins,
            advantages,
            tokenizer=tokenizer,
            prompt_ids=prompt_ids[rows],
            prompts=prompts[rows],
            start_index=start,
            teachability_weights=token_teachability.weights,
        )
        valid = completion_mask.bool()
        for k in sweep:
            if k == top_k:
                k_margins = margins
            else:
                k_signals = token_signals(student, teacher, *batch, top_k=k, temperature=temperature)
                k_margins = k_signals.margins[:, completion].cpu()
            sweep_margins[k] += [k_margins[b][valid[b]].tolist() for b in range(valid.shape[0])]

    meta = (
        f"K={top_k}, segmentation={segmentation}, temperature={temperature}, "
        f"max_completion_length={max_completion_length}, seed={seed}."
    )
    for record, accepted_null in zip(records, null_acceptance(records, seed)):
        record["accepted_null"] = accepted_null
    for record, accepted in zip(records, calibrated_acceptance(records, release_alpha, release_permutations, seed)):
        record["accepted_calibrated"] = accepted
    replayed = online_replay(records, online_min_segments, online_patience, online_check_tokens)
    calibrated = online_replay(records, online_min_segments, online_patience, online_check_tokens,
                               release_alpha, release_permutations, seed)  # fmt: skip
    for record, fields, fields_calibrated in zip(records, replayed, calibrated):
        record.update(fields, online_stopped_calibrated=fields_calibrated["online_stopped"])
    stopped_calibrated = sum(r["online_stopped"] for r in calibrated) / max(len(calibrated), 1)
    online = online_summary_lines(
        summarize_online(records, replayed),
        f"online_min_segments={online_min_segments}, online_patience={online_patience}, "
        f"online_check_tokens={online_check_tokens}.",
    ) + [f"Calibrated online rule (release_alpha={release_alpha}): stopped {stopped_calibrated:.3f} of them."]
    files = {
        "records.jsonl": write_records(records, output_dir / "records.jsonl"),
        "margin_curve.png": plot_margin_curve(records, output_dir / "margin_curve.png", bins, top_k),
        "release.png": plot_release(records, output_dir / "release.png"),
        "support_sweep.png": plot_support_sweep(sweep_margins, output_dir / "support_sweep.png", bins),
        "teachability.png": plot_teachability(records, output_dir / "teachability.png", bins),
        "cases.html": write_cases_html(records, output_dir / "cases.html", num_cases, meta=meta),
        "summary.md": write_summary(records, output_dir / "summary.md", settings, online),
    }
    return files


def _trimmed(rollouts, rows: slice):
    """Rows of `rollouts` without the columns that are padding for every one of them."""
    prompt_ids, prompt_mask = rollouts.prompt_ids[rows], rollouts.prompt_mask[rows]
    completion_ids, completion_mask = rollouts.completion_ids[rows], rollouts.completion_mask[rows]
    first = int(prompt_mask.any(0).int().argmax()) if prompt_mask.any() else prompt_mask.shape[1]
    last = int(completion_mask.any(0).nonzero().max()) + 1 if completion_mask.any() else 0
    return prompt_ids[:, first:], prompt_mask[:, first:], completion_ids[:, :last], completion_mask[:, :last]


def _load_prompts(name_or_path: str, config: str | None, split: str):
    """The prompt dataset (`trl_ltc.prompts`: local file, `save_to_disk` directory or `datasets` name), checked."""
    from ..prompts import load_prompt_dataset, validate_prompt_dataset

    dataset = load_prompt_dataset(name_or_path, config=config, split=split)
    validate_prompt_dataset(dataset, name_or_path)
    return dataset
