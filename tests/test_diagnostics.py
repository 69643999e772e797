"""`trl-ltc diagnose`, the trajectory records and `ReleaseDiagnosticsCallback` on tiny random models (CPU)."""

import importlib.util
import json
import math
import sys
import types
import warnings
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import torch
from helpers import make_model, make_tokenizer, padded_copy

from trl_ltc import cli, diagnostics
from trl_ltc.commands import diagnose as diagnose_command
from trl_ltc.diagnostics import (
    ReleaseDiagnosticsCallback,
    margin_curve,
    null_acceptance,
    plot_release,
    plot_teachability,
    release_cut,
    release_fraction,
    summarize,
    trajectory_records,
    visible_text,
    write_cases_html,
    write_summary,
)
from trl_ltc.generation import tokenize_prompts
from trl_ltc.release import (
    NULL_SEED_OFFSET,
    bic_change_point,
    null_change_point,
    release_weights,
    segment_scores,
    teacher_margin,
)
from trl_ltc.segmentation import segment_completions
from trl_ltc.supervision import supervision_weights
from trl_ltc.teachability import TeachabilityFeatures, score_tokens, teachability_features, token_budget_weights

FILES = (
    "records.jsonl",
    "margin_curve.png",
    "release.png",
    "support_sweep.png",
    "teachability.png",
    "cases.html",
    "summary.md",
)
# Prompts of one token length under the test tokenizer's chat template: batches carry no left padding, so a plain
# unpadded forward pass reproduces the command's signals.
PROMPTS = [[{"role": "user", "content": f"Tom has {i} apples. How many are left?"}] for i in (0, 3, 4, 6, 8, 9)]
TOP_K, WINDOW = 10, 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Tiny student/teacher saved to disk with the test tokenizer, and a prompt file."""
    root = tmp_path_factory.mktemp("pair")
    tokenizer = make_tokenizer()
    for name, seed in (("student", 1), ("teacher", 2)):
        make_model(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": prompt, "id": f"p{i}"}) + "\n" for i, prompt in enumerate(PROMPTS))
    return root


@pytest.fixture(scope="module")
def run(pair):
    """One `trl-ltc diagnose` run through the top-level CLI."""
    out = pair / "out"
    options = {
        "--student": pair / "student",
        "--teacher": pair / "teacher",
        "--dataset": pair / "prompts.jsonl",
        "--num_prompts": 6,
        "--max_completion_length": 24,
        "--batch_size": 3,
        "--top_k": TOP_K,
        "--top_k_sweep": "2,10",
        "--segmentation": "fixed",
        "--segment_window": WINDOW,
        "--num_cases": 6,
        "--output_dir": out,
    }
    argv = ["diagnose", *(str(x) for option in options.items() for x in option), "--no_progress"]
    assert cli.main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return SimpleNamespace(out=out, records=records, tokenizer=make_tokenizer())


def test_command_writes_every_file(run):
    for name in FILES:
        assert (run.out / name).stat().st_size > 0, name
    assert len(run.records) == len(PROMPTS)
    assert [r["prompt_id"] for r in run.records] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["prompt"] for r in run.records] == PROMPTS


def test_records_equal_release_math_recomputed_from_the_models(run, pair):
    """Margins from full logits, segments, scores, change point and kept fraction, recomputed independently."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(pair / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher").eval()
    prompt_ids = tokenize_prompts(run.tokenizer, PROMPTS)
    assert len({len(ids) for ids in prompt_ids}) == 1, "the test prompts must have one token length"
    for record, prompt in zip(run.records, prompt_ids):
        completion = torch.tensor(record["completion_ids"])
        n, p = completion.numel(), len(prompt)
        assert n == record["completion_length"] > 0
        ids = torch.tensor(prompt + record["completion_ids"])[None]
        with torch.no_grad():
            s_logits = student(ids).logits[0, p - 1 : p - 1 + n]
            t_logits = teacher(ids).logits[0, p - 1 : p - 1 + n]
        margins = teacher_margin(s_logits, t_logits, TOP_K)
        advantages = (t_logits.log_softmax(-1) - s_logits.log_softmax(-1)).gather(-1, completion[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(record["token_margins"]), margins, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(record["token_advantages"]), advantages, atol=1e-4, rtol=1e-4)

        mask = torch.ones(1, n, dtype=torch.long)
        segment_ids = segment_completions(completion[None], mask, run.tokenizer, "fixed", WINDOW)
        starts = [int((segment_ids[0] == i).nonzero().min()) for i in range(int(segment_ids.max()) + 1)]
        assert [s for s, _ in record["segment_token_spans"]] == starts
        scores, num_segments = segment_scores(margins[None], segment_ids)
        change = bic_change_point(scores, num_segments)
        assert record["num_segments"] == int(num_segments)
        torch.testing.assert_close(torch.tensor(record["segment_scores"]), scores[0], atol=1e-4, rtol=1e-4)
        assert record["accepted"] == bool(change.accepted)
        assert record["release_segment"] == int(change.release_segment)
        assert record["bic_gain"] == pytest.approx(float(change.bic_gain), abs=1e-3)
        kept = release_weights(segment_ids, mask.float(), change) > 0
        assert record["kept_fraction"] == pytest.approx(float(kept.float().mean()))

        # The record's own margins give exactly its numbers through release.py.
        own_scores, _ = segment_scores(torch.tensor(record["token_margins"])[None], segment_ids)
        own = bic_change_point(own_scores, num_segments)
        assert record["segment_scores"] == own_scores[0].tolist()
        assert (record["release_segment"], record["accepted"]) == (int(own.release_segment), bool(own.accepted))
        assert record["bic_gain"] == float(own.bic_gain)
        assert record["segment_texts"] and "".join(record["segment_texts"]) == run.tokenizer.decode(
            record["completion_ids"], skip_special_tokens=True
        )


def test_teachability_kept_equals_ta_opd_on_full_logits(run, pair):
    """TA-OPD's kept tokens per scoring batch (--batch_size 3), recomputed from full logits of the saved models."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(pair / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher").eval()
    prompt_ids = tokenize_prompts(run.tokenizer, PROMPTS)
    for start in range(0, len(PROMPTS), 3):
        batch = run.records[start : start + 3]
        width = max(r["completion_length"] for r in batch)
        fields = {name: torch.zeros(len(batch), width) for name in TeachabilityFeatures._fields}
        mask = torch.zeros(len(batch), width)
        for b, (record, prompt) in enumerate(zip(batch, prompt_ids[start : start + 3])):
            n, p = record["completion_length"], len(prompt)
            ids = torch.tensor(prompt + record["completion_ids"])[None]
            with torch.no_grad():
                features = teachability_features(
                    student(ids).logits[0, p - 1 : p - 1 + n], teacher(ids).logits[0, p - 1 : p - 1 + n], k=16
                )
            for name in fields:
                fields[name][b, :n] = getattr(features, name)
            mask[b, :n] = 1
        weights = token_budget_weights(score_tokens(TeachabilityFeatures(**fields), mask, "teachability"), mask, 0.05)
        expected = (weights > 0).int()
        assert int(expected.sum()) >= math.ceil(mask.sum().item() * 0.05)
        for b, record in enumerate(batch):
            assert record["teachability_kept"] == expected[b, : record["completion_length"]].tolist()
            assert sum(record["teachability_kept"]) >= 1  # token_min_keep = 1


class _Completions(HTMLParser):
    """Text of each `.completion` element, split into kept and released parts, and the page's whole text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.all_text, self._stack, self._current = {}, [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "completion" in classes:
            self._current = int(attrs["data-index"])
            self.parts[self._current] = {"kept": "", "released": ""}
        self._stack.append((tag, classes, "completion" in classes))

    def handle_endtag(self, tag):
        _, _, closes_completion = self._stack.pop()
        if closes_completion:
            self._current = None

    def handle_data(self, data):
        self.all_text.append(data)
        if self._current is not None:
            kind = next(k for k in ("kept", "released") for _, c, _ in reversed(self._stack) if k in c)
            self.parts[self._current][kind] += data


def test_a_padded_teacher_gives_the_records_of_the_unpadded_one(pair, tmp_path):
    """One tokenizer, the teacher's head padded with 16 rows: the same samples, margins, advantages, TA-OPD picks."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(pair / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(pair / "teacher").eval()
    options = dict(
        top_k=TOP_K, top_k_sweep=(2, TOP_K), segmentation="fixed", segment_window=WINDOW, max_completion_length=16,
        batch_size=3, num_cases=2, progress=False, token_keep_ratio=0.2,
    )  # fmt: skip
    records = {}
    for name, model in (("plain", teacher), ("padded", padded_copy(teacher))):
        diagnostics.diagnose(student, model, make_tokenizer(), PROMPTS[:3], tmp_path / name, **options)
        records[name] = (tmp_path / name / "records.jsonl").read_text()
    assert records["padded"] == records["plain"]
    assert '"token_margins"' in records["plain"] and '"teachability_kept"' in records["plain"]


def test_html_shows_each_completion_once_split_at_the_change_point(run):
    page = (run.out / "cases.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert not any(ref in page for ref in ("src=", "href=", "url(", "@import")), "the page must be self-contained"
    parser = _Completions()
    parser.feed(page)
    parser.close()
    text = "".join(parser.all_text)
    assert sorted(parser.parts) == [r["index"] for r in run.records]  # num_cases covers every trajectory here
    for record in run.records:
        decoded = visible_text(run.tokenizer.decode(record["completion_ids"], skip_special_tokens=True))
        parts = parser.parts[record["index"]]
        assert parts["kept"] + parts["released"] == decoded
        kept_segments = record["segment_texts"][: record["release_segment"]]
        assert parts["kept"] == visible_text("".join(kept_segments))
        assert bool(parts["released"]) <= record["accepted"]
        if len(decoded) >= 8:
            assert text.count(decoded) == 1


def test_html_escapes_text(tmp_path):
    record = _hand_records(texts=True)[0]
    record["segment_texts"] = ['<b>x</b> & "q"', "</span><script>alert(1)</script>", "\x01\x85ok"]
    record["prompt"] = "<i>prompt</i>"
    page = write_cases_html([record], tmp_path / "c.html").read_text()
    assert "<script>" not in page and "<b>x</b>" not in page and "<i>prompt</i>" not in page
    parser = _Completions()
    parser.feed(page)
    assert "".join(parser.parts[0].values()) == visible_text("".join(record["segment_texts"]))
    assert visible_text("\x01\x85ok\n\t") == "\u2401\\x85ok\n\t"


def _assert_png(path, min_bytes=10_000):
    from matplotlib.image import imread

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes, path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert float(image[..., :3].std()) > 0.01, f"{path} is blank"


@pytest.mark.parametrize("name", ["margin_curve.png", "release.png", "support_sweep.png", "teachability.png"])
def test_pngs_are_valid(run, name):
    _assert_png(run.out / name)


def test_summary_table(run):
    summary = (run.out / "summary.md").read_text()
    accepted = sum(r["accepted"] for r in run.records)
    assert f"| Trajectories | {len(PROMPTS)} |" in summary
    assert f"| Accepted fraction (one-drop summary preferred by BIC) | {accepted / len(PROMPTS):.3f} |" in summary
    mean_kept = np.mean([r["kept_fraction"] for r in run.records])
    assert f"| Mean kept fraction of the completion (all trajectories) | {mean_kept:.3f} |" in summary


def test_records_carry_the_online_release_replay(run):
    replayed = diagnostics.online_replay(run.records, check_tokens=16)
    for record, fields in zip(run.records, replayed):
        assert {k: record[k] for k in fields} == fields
    summary = (run.out / "summary.md").read_text()
    assert "## Online release replay (formula 9)" in summary
    assert "online_min_segments=3, online_patience=2, online_check_tokens=16." in summary


def test_records_and_summary_carry_the_shuffled_null(run):
    nulls = [r["accepted_null"] for r in run.records]
    assert all(isinstance(value, bool) for value in nulls)
    # seeded with the run's seed (0): the records' own scores give the same answers again
    assert null_acceptance(run.records, seed=0) == nulls
    width = max(r["num_segments"] for r in run.records)
    scores = torch.tensor([r["segment_scores"] + [0.0] * (width - r["num_segments"]) for r in run.records])
    num_segments = torch.tensor([r["num_segments"] for r in run.records])
    generator = torch.Generator().manual_seed(NULL_SEED_OFFSET)
    assert null_change_point(scores.double(), num_segments, generator).accepted.tolist() == nulls

    numbers = summarize(run.records)
    assert numbers["accepted_frac_null"] == pytest.approx(np.mean(nulls))
    summary = (run.out / "summary.md").read_text()
    row = "| Accepted fraction under the null (segment scores shuffled per trajectory) |"
    assert f"{row} {np.mean(nulls):.3f} |" in summary
    assert f"Accepted fraction {numbers['accepted_fraction']:.3f} vs {np.mean(nulls):.3f} under the null" in summary


def test_null_acceptance_is_seeded_and_rarely_accepts_a_shuffled_drop(tmp_path):
    g = torch.Generator().manual_seed(0)
    records = []
    for n in (0, 1, 2, 20):  # 50 records each; a clear drop half way through, small noise
        drop = torch.tensor([1.0] * (n // 2) + [0.0] * (n - n // 2))
        records += [
            {"num_segments": n, "segment_scores": (drop + 0.05 * torch.randn(n, generator=g)).tolist()}
            for _ in range(50)
        ]
    first = null_acceptance(records, seed=3)
    assert first == null_acceptance(records, seed=3) and first != null_acceptance(records, seed=4)
    assert not any(first[:100])  # fewer than two segments: never accepted
    assert np.mean(first[150:]) < 0.3  # the drop of 20 segments, shuffled, is rarely taken for one
    assert null_acceptance([], seed=3) == []

    # summarize and summary.md report the null only for records that carry it
    sharp, flat, empty = _hand_records()
    assert "accepted_frac_null" not in summarize([sharp, flat, empty])
    assert "under the null" not in write_summary([sharp, flat, empty], tmp_path / "plain.md").read_text()
    for record, value in zip((sharp, flat, empty), (False, True, False)):
        record["accepted_null"] = value
    assert summarize([sharp, flat, empty])["accepted_frac_null"] == pytest.approx(1 / 3)
    summary = write_summary([sharp, flat, empty], tmp_path / "summary.md").read_text()
    assert "Accepted fraction 0.333 vs 0.333 under the null" in summary


def test_cases_page_renders_in_chromium(run, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "render_cases", Path(__file__).parents[1] / "scripts" / "render_cases.py"
    )
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    if render.find_browser() is None:
        pytest.skip("no Chromium-family browser installed (apt-get install chromium)")
    png = render.screenshot(run.out / "cases.html", tmp_path / "cases.png", width=1000, height=900)
    _assert_png(png)


# ----------------------------------------------------------------------------------------------- records by hand


def _hand_batch():
    """Row 0: 6 segments of 2 tokens, sharp then flat margins (accepted at 3); row 1: flat; row 2: empty."""
    width = 12
    completion_mask = torch.zeros(3, width, dtype=torch.long)
    completion_mask[:2] = 1
    segment_ids = torch.where(completion_mask.bool(), torch.arange(width) // 2, -1)
    margins = torch.tensor([[3.0] * 6 + [0.1] * 6, [1.0] * width, [0.0] * width]) * completion_mask
    advantages = torch.arange(3 * width, dtype=torch.float32).reshape(3, width) % 5 * completion_mask
    completion_ids = torch.randint(3, 300, (3, width), generator=torch.Generator().manual_seed(0))
    return completion_ids, completion_mask, segment_ids, margins, advantages


def _hand_records(texts=False, step=None, teachability_weights=None):
    completion_ids, completion_mask, segment_ids, margins, advantages = _hand_batch()
    loss_mask = completion_mask.float()
    supervision = supervision_weights(
        "release", loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages
    )
    return trajectory_records(
        completion_ids,
        completion_mask,
        loss_mask,
        segment_ids,
        supervision,
        margins,
        advantages,
        tokenizer=make_tokenizer() if texts else None,
        prompt_ids=["a", "b", "c"],
        step=step,
        teachability_weights=teachability_weights,
    )


def test_release_plot_takes_online_stopped_trajectories(tmp_path):
    """A trajectory stopped by online release is accepted but holds only its kept prefix (no released segment): the
    before/after panel leaves it out instead of averaging an empty suffix."""
    records = _hand_records()
    assert records[0]["accepted"] and 0 < records[0]["release_segment"] < records[0]["num_segments"]
    stopped = dict(records[0], index=3, release_segment=records[0]["num_segments"])  # as an online-stopped row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would be a RuntimeWarning
        _assert_png(plot_release([*records, stopped], tmp_path / "release.png"))
        _assert_png(plot_release([stopped], tmp_path / "stopped_only.png"), min_bytes=5_000)


def test_trajectory_records_by_hand():
    completion_ids, _, _, _, advantages = _hand_batch()
    sharp, flat, empty = _hand_records(texts=True, step=7)
    assert (sharp["accepted"], sharp["release_segment"], sharp["num_segments"]) == (True, 3, 6)
    assert sharp["kept_fraction"] == 0.5 and sharp["kept_tokens"] == 6 and sharp["bic_gain"] > 0
    assert sharp["segment_token_spans"] == [[2 * i, 2 * i + 2] for i in range(6)]
    assert sharp["segment_scores"] == pytest.approx([math.log(4.0)] * 3 + [math.log(1.1)] * 3)
    assert sharp["segment_margin_mean"] == pytest.approx([3.0] * 3 + [0.1] * 3)
    a = advantages[0].double().reshape(6, 2)
    assert sharp["segment_advantage_mean"] == pytest.approx(a.mean(1).tolist())
    assert sharp["segment_advantage_std"] == pytest.approx(a.std(1, unbiased=False).tolist())
    assert sharp["completion_ids"] == completion_ids[0].tolist() and sharp["step"] == 7 and sharp["prompt_id"] == "a"
    assert "".join(sharp["segment_texts"]) == make_tokenizer().decode(completion_ids[0], skip_special_tokens=True)
    assert (flat["accepted"], flat["release_segment"], flat["kept_fraction"], flat["bic_gain"]) == (False, 6, 1.0, 0.0)
    assert empty["completion_length"] == empty["num_segments"] == 0 and empty["segment_scores"] == []
    assert (empty["accepted"], empty["kept_fraction"], empty["segment_texts"]) == (False, 0.0, [])
    json.dumps([sharp, flat, empty])  # plain Python values


def test_trajectory_records_rejects_bad_inputs():
    completion_ids, completion_mask, segment_ids, margins, advantages = _hand_batch()
    loss_mask = completion_mask.float()
    no_change_point = supervision_weights("full", loss_mask)
    with pytest.raises(ValueError, match="change point"):
        trajectory_records(
            completion_ids, completion_mask, loss_mask, segment_ids, no_change_point, margins, advantages
        )
    supervision = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins)
    with pytest.raises(ValueError, match="advantages"):
        trajectory_records(completion_ids, completion_mask, loss_mask, segment_ids, supervision, margins)
    with pytest.raises(ValueError, match="one shape"):
        trajectory_records(
            completion_ids[:, :5], completion_mask, loss_mask, segment_ids, supervision, margins, advantages
        )


def test_margin_curve_normalises_per_trajectory():
    curve = margin_curve([[2.0, 2.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0]], bins=2)
    # [2, 2, 0, 0] has mean 1; [5, 5, 5, 5] becomes all 1; the all-zero trajectory is left out.
    np.testing.assert_allclose(curve["mean"], [1.5, 0.5])
    np.testing.assert_allclose(curve["count"], [2, 2])
    np.testing.assert_allclose(curve["position"], [0.25, 0.75])


def test_teachability_summary_by_hand(tmp_path):
    """Row 0 keeps tokens 0..5 under release (accepted at segment 3), row 1 keeps all 12, row 2 is empty."""
    weights = torch.zeros(3, 12)
    weights[0, [0, 7]] = 1.0
    weights[1, 5] = 1.0
    weights[2, 3] = 1.0  # outside the completion: never counted
    sharp, flat, empty = _hand_records(teachability_weights=weights)
    assert sharp["teachability_kept"] == [1] + [0] * 6 + [1] + [0] * 4
    assert flat["teachability_kept"] == [0] * 5 + [1] + [0] * 6 and empty["teachability_kept"] == []
    assert [release_cut(r) for r in (sharp, flat, empty)] == [6, 12, 0]
    assert [release_fraction(r) for r in (sharp, flat, empty)] == [0.5, 1.0, 1.0]

    numbers = summarize([sharp, flat, empty])
    assert numbers["teachability_kept_fraction"] == pytest.approx(3 / 24)
    assert numbers["teachability_kept_position_mean"] == pytest.approx((0.5 / 12 + 7.5 / 12 + 5.5 / 12) / 3)
    assert numbers["teachability_in_release_prefix"] == pytest.approx(2 / 3)  # tokens 0 (row 0) and 5 (row 1)
    assert numbers["release_prefix_token_fraction"] == pytest.approx((6 + 12) / 24)
    summary = write_summary([sharp, flat, empty], tmp_path / "summary.md").read_text()
    assert "| TA-OPD: share of the kept tokens inside the release prefix | 0.667 |" in summary
    assert "TA-OPD" not in write_summary(_hand_records(), tmp_path / "plain.md").read_text()
    assert "teachability_kept_fraction" not in summarize(_hand_records())
    _assert_png(plot_teachability([sharp, flat, empty], tmp_path / "teachability.png"))
    _assert_png(plot_teachability(_hand_records(), tmp_path / "empty.png"), min_bytes=5_000)  # nothing to show


# ----------------------------------------------------------------------------------------------- callback


def test_callback_writes_plots_at_save_and_train_end(tmp_path, monkeypatch):
    callback = ReleaseDiagnosticsCallback(max_steps_kept=2)
    for step in (1, 2, 2, 3):
        callback.add(_hand_records(), step=step)
    assert sorted({r["step"] for r in callback.records}) == [2, 3] and len(callback.records) == 9

    written = []
    monkeypatch.setattr(callback, "write", lambda output_dir: written.append(output_dir) or {})
    main = SimpleNamespace(is_world_process_zero=True, global_step=3)
    other = SimpleNamespace(is_world_process_zero=False, global_step=3)
    callback.on_save(SimpleNamespace(output_dir="a"), main, None)
    callback.on_save(SimpleNamespace(output_dir="b"), other, None)  # only the main process writes
    callback.on_train_end(SimpleNamespace(output_dir="c"), other, None)
    assert written == ["a"]
    monkeypatch.undo()

    callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), main, None)
    for name in ("release.png", "margin_curve.png"):
        _assert_png(tmp_path / name)
    lines = (tmp_path / "release_records.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2] * 6 + [3] * 3
    assert not (tmp_path / "teachability.png").exists()  # release records only

    weights = torch.zeros(3, 12)
    weights[:2, 0] = 1.0
    callback.add(_hand_records(teachability_weights=weights), step=4)
    callback.write(tmp_path / "ta")
    _assert_png(tmp_path / "ta" / "teachability.png")
    assert json.loads((tmp_path / "ta" / "release_records.jsonl").read_text().splitlines()[-3])[
        "teachability_kept"
    ] == [1] + [0] * 11


def test_callback_keeps_at_most_max_records_trajectories_oldest_first(tmp_path):
    callback = ReleaseDiagnosticsCallback(max_steps_kept=10, max_records=4)  # 3 trajectories a step
    for step in (1, 2, 3):
        callback.add(_hand_records(), step=step)
    assert [r["step"] for r in callback.records] == [2, 3, 3, 3]
    assert [r["prompt_id"] for r in callback.records] == ["c", "a", "b", "c"]  # the oldest trajectories went first
    callback.write(tmp_path)
    lines = (tmp_path / "release_records.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 3, 3, 3]
    callback.add(_hand_records(), step=4)
    callback.add(_hand_records(), step=4)  # two micro-batches of one step: the step's own oldest are dropped
    assert [r["step"] for r in callback.records] == [4] * 4
    assert len(ReleaseDiagnosticsCallback(max_records=None)._steps) == 0
    with pytest.raises(ValueError, match="max_records"):
        ReleaseDiagnosticsCallback(max_records=0)


class _Recorder:
    """A stand-in for a tracker's writer or module: records every call."""

    def __init__(self, **attributes):
        self.calls = []
        self.__dict__.update(attributes)

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def _fake_trackers():
    from transformers.integrations import TensorBoardCallback, WandbCallback

    tensorboard, wandb = object.__new__(TensorBoardCallback), object.__new__(WandbCallback)
    tensorboard.tb_writer, tensorboard.logging_dir = _Recorder(), None
    wandb._wandb = _Recorder(run=object(), Image=lambda path: ("image", path))
    return tensorboard, wandb


def test_callback_logs_its_plots_to_the_image_trackers(tmp_path):
    tensorboard, wandb = _fake_trackers()
    callback = ReleaseDiagnosticsCallback(trackers=[object(), tensorboard, wandb])
    callback.add(_hand_records(), step=7)
    state = SimpleNamespace(is_world_process_zero=True, global_step=7)
    callback.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    tags = ["release_diagnostics/release", "release_diagnostics/margin_curve"]
    calls = tensorboard.tb_writer.calls
    images = [(args[0], args[1].shape, args[2], kwargs) for name, args, kwargs in calls if name == "add_image"]
    expected = [(tag, 7, {"dataformats": "HWC"}) for tag in tags]
    assert [(tag, step, kwargs) for tag, _, step, kwargs in images] == expected
    assert all(shape[2] == 3 and shape[0] > 100 for _, shape, _, _ in images)
    ((name, (logged,), _),) = wandb._wandb.calls
    assert name == "log" and logged == {
        "release_diagnostics/release": ("image", str(tmp_path / "release.png")),
        "release_diagnostics/margin_curve": ("image", str(tmp_path / "margin_curve.png")),
        "train/global_step": 7,
    }
    # A closed writer (after training ended) or a finished wandb run is skipped; untracked runs log nothing.
    tensorboard.tb_writer, wandb._wandb.run = None, None
    assert callback.log_images({"release.png": tmp_path / "release.png"}, 8) == []
    assert ReleaseDiagnosticsCallback().log_images({"release.png": tmp_path / "release.png"}, 8) == []


def test_callback_without_records_writes_nothing(tmp_path):
    callback = ReleaseDiagnosticsCallback()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    callback.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- command line


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["diagnose", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--student",
        "--teacher",
        "--dataset",
        "--num_prompts",
        "--top_k",
        "--top_k_sweep",
        "--segmentation",
        "--max_completion_length",
        "--batch_size",
        "--temperature",
        "--seed",
        "--output_dir",
        "--preset",
        "--token_top_k",
        "--token_score",
        "--token_keep_ratio",
        "--token_min_keep",
    ):
        assert option in out


def test_missing_models_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnose_command.main(["--dataset", "x.jsonl"])
    assert exit_info.value.code == 2
    assert "--student" in capsys.readouterr().err


def test_preset_quickstart_uses_the_embedded_pair(pair, monkeypatch, tmp_path):
    fake = types.ModuleType("trl_ltc.embedded")
    fake.prepare_smollm2_pair = lambda: (str(pair / "teacher"), str(pair / "student"))
    fake.quickstart_dataset_path = lambda: str(pair / "prompts.jsonl")
    monkeypatch.setitem(sys.modules, "trl_ltc.embedded", fake)
    seen = {}

    def fake_diagnose(student, teacher, tokenizer, prompts, output_dir, **kwargs):
        seen.update(student=student.name_or_path, teacher=teacher.name_or_path, prompts=list(prompts), **kwargs)
        return {}

    monkeypatch.setattr(diagnose_command, "diagnose", fake_diagnose)
    assert diagnose_command.main(["--preset", "quickstart", "--num_prompts", "2", "--output_dir", str(tmp_path)]) == 0
    assert (seen["student"], seen["teacher"]) == (str(pair / "student"), str(pair / "teacher"))
    assert seen["prompts"] == PROMPTS[:2] and seen["prompt_ids"] == ["p0", "p1"]


def test_importing_the_trainer_loads_neither_plots_nor_analysis():
    import subprocess

    code = (
        "import sys, trl_ltc.trainer; "
        "print(sorted(m for m in sys.modules if m.startswith('trl_ltc.diagnostics.')), 'matplotlib' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["['trl_ltc.diagnostics.callback',", "'trl_ltc.diagnostics.records']", "False"]
