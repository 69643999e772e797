"""Edge cases and faults: every bad input gets a clear error or a defined fallback, nothing silently goes NaN, and
training survives interruption (README, "Edge cases and errors")."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _train_script import build_trainer
from datasets import Dataset
from helpers import make_model, make_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from test_trainer import _config, _fixed_batch, _fixed_completions, _prompts, _trainer

from trl_ltc import TeachabilityGKDTrainer
from trl_ltc.config import SEGMENTATIONS, SUPERVISIONS, TOKEN_SCORES
from trl_ltc.prompts import truncate_prompt_ids
from trl_ltc.segmentation import segment_completions
from trl_ltc.signals import SignalsError, token_signals
from trl_ltc.supervision import supervision_weights
from trl_ltc.teachability import TeachabilityFeatures
from trl_ltc.trainer import last_complete_checkpoint

TESTS = Path(__file__).resolve().parent
SEGMENT_POLICIES = ("release", "random_release", "adv_std_release")  # the policies that read segments
PREFIX_POLICIES = ("fixed_prefix", *SEGMENT_POLICIES)  # the policies that keep a prefix of each trajectory


def _logged(trainer):
    """The metrics `compute_loss` recorded, one value each."""
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _assert_finite_metrics(metrics):
    for name, value in metrics.items():
        if name == "margin/suffix_mean" and metrics["release/kept_token_frac"] == 1:
            continue  # nothing released: no mean (logged as None)
        assert math.isfinite(value), (name, value)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0, equal_nan=True, msg=name)


# ------------------------------------------------------------------------------------------------ inputs and states


def _batch_with_empty_completions(tokenizer):
    """`_fixed_batch` with row 2 an empty completion (EOS sampled first) and row 3 without any completion token."""
    inputs = _fixed_batch(tokenizer)
    inputs["completion_ids"][2] = tokenizer.pad_token_id
    inputs["completion_ids"][2, 0] = tokenizer.eos_token_id
    inputs["completion_mask"][2] = 0
    inputs["completion_mask"][2, 0] = 1
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return inputs


@pytest.mark.parametrize("policy", SUPERVISIONS)
def test_empty_completion_has_no_segment_zero_weight_and_finite_loss(tmp_path, tokenizer, policy):
    trainer = _trainer(tmp_path, tokenizer, supervision=policy, segmentation="nltk", token_keep_ratio=0.3)
    model = trainer.model.train()
    inputs = _batch_with_empty_completions(tokenizer)
    segments = segment_completions(inputs["completion_ids"], inputs["completion_mask"], tokenizer)
    assert (segments[2:] == -1).all() and (segments[:2, 0] == 0).all()  # no segment; the others have theirs

    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    supervision = trainer.last_supervision
    assert supervision.num_segments[2:].tolist() == [0, 0] and not supervision.change_point.accepted[2:].any()
    assert (supervision.weights[3] == 0).all()
    if policy in SEGMENT_POLICIES:
        assert (supervision.weights[2] == 0).all()  # nothing to release from: nothing kept
    else:  # `full`, `fixed_prefix`, `token_teachability` read no segments: the EOS token is one more token
        assert supervision.weights[2, 0] > 0 or policy == "token_teachability"
    metrics = _logged(trainer)
    _assert_finite_metrics(metrics)
    # accepted_frac is over all four trajectories: the two empty ones count as not accepted
    accepted = supervision.change_point.accepted.float().sum().item()
    assert metrics["release/accepted_frac"] == pytest.approx(accepted / 4)
    assert metrics["release/num_segments"] == pytest.approx(supervision.num_segments.float().mean().item())


def test_no_sentence_boundary_is_one_segment_never_accepted_fully_supervised(tokenizer):
    texts = ["no punctuation here just words and more words", "x = 3 + 4 \\cdot y and so on", "東京は日本の首都です"]
    rows = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    segments = segment_completions(ids, mask, tokenizer, "nltk")
    assert (segments[mask > 0] == 0).all()
    margins = torch.linspace(20, 0, width).expand(len(rows), width) * mask  # a falling margin: no boundary to cut at
    advantages = -torch.linspace(0, 5, width).expand(len(rows), width) * mask
    for policy in SEGMENT_POLICIES:
        sup = supervision_weights(
            policy, mask, segment_ids=segments, margins=margins, advantages=advantages, generator=torch.Generator()
        )
        assert sup.num_segments.tolist() == [1, 1, 1] and not sup.change_point.accepted.any()
        assert torch.equal(sup.weights, mask), policy


def test_two_segments_follow_the_rule_one_never_releases():
    mask = torch.ones(3, 8)
    segment_ids = torch.tensor([[0] * 4 + [1] * 4, [0] * 4 + [1] * 4, [0] * 8])
    margins = torch.tensor([[9.0] * 4 + [0.0] * 4, [0.0] * 4 + [9.0] * 4, [9.0] * 4 + [0.0] * 4])
    sup = supervision_weights("release", mask, segment_ids=segment_ids, margins=margins)
    assert sup.num_segments.tolist() == [2, 2, 1]
    assert sup.change_point.accepted.tolist() == [True, False, False]  # n = 2: a drop is accepted, a rise is not
    torch.testing.assert_close(sup.weights[0], torch.tensor([2.0] * 4 + [0.0] * 4))
    assert torch.equal(sup.weights[1:], mask[1:])


def _generate_some_truncated(trainer, max_length):
    """Fixed completions: every other completion of a generation batch stops at the length limit without EOS."""
    eos, vocab = trainer._tokenizer.eos_token_id, len(trainer._tokenizer)

    def generate(prompt_ids, images, multimodal_fields, has_tool_images=False):
        out = []
        for i, ids in enumerate(prompt_ids):
            body = [(7 * sum(ids) + 13 * j) % (vocab - 3) + 3 for j in range(max_length)]
            out.append(body if i % 2 == 0 else body[: 2 + sum(ids) % 5] + [eos])
        return out

    trainer._generate_single_turn = generate


def test_truncated_completions_train_and_are_reported(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=2, max_completion_length=12)
    _generate_some_truncated(trainer, 12)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert log["completions/clipped_ratio"] == 0.5  # the parent's metric: completions cut at the limit
        assert math.isfinite(log["loss"]) and 0 < log["release/kept_token_frac"] <= 1


def test_fully_masked_batches_give_zero_loss_zero_gradient_one_warning_and_training_goes_on(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=2)
    model = trainer.model.train()
    inputs = _fixed_batch(tokenizer)
    inputs["completion_mask"].zero_()
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
            assert loss.item() == 0.0
    assert [str(w.message) for w in caught if "no supervised completion tokens" in str(w.message)] == [
        "A batch has no supervised completion tokens: its loss is 0 and it does not update the model."
    ]
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
    model.zero_grad()

    # In training: every micro-batch fully masked (e.g. every completion is a tool output); two steps go by.
    trainer = _trainer(tmp_path / "train", tokenizer, max_steps=2)
    generate_and_score = trainer._generate_and_score_completions

    def fully_masked(batch):
        out = generate_and_score(batch)
        out["completion_mask"] = torch.zeros_like(out["completion_mask"])
        out["num_items_in_batch"] = out["completion_mask"].sum()
        return out

    trainer._generate_and_score_completions = fully_masked
    before = _params(trainer.model)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["loss"] for log in logs] == [0.0, 0.0] and trainer.state.global_step == 2
    _assert_unchanged(trainer.model, before)


def _masked_teacher(vocab):
    teacher = make_model(vocab, seed=2)
    bias = torch.zeros(vocab)
    bias[::2] = -math.inf  # half of the vocabulary masked, sampled tokens included
    teacher.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return teacher


def _one_hot_teacher(vocab):
    teacher = make_model(vocab, seed=2)
    bias = torch.zeros(vocab)
    bias[5] = 1e4  # every position puts all its mass on token 5
    teacher.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return teacher


@pytest.mark.parametrize("policy", SUPERVISIONS)
@pytest.mark.parametrize("make_teacher", [_masked_teacher, _one_hot_teacher])
def test_masked_and_one_hot_teachers_stay_finite(tmp_path, tokenizer, policy, make_teacher):
    vocab = len(tokenizer)
    trainer = _trainer(tmp_path, tokenizer, teacher=make_teacher(vocab), supervision=policy, token_keep_ratio=0.3)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, _fixed_batch(tokenizer))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    sup = trainer.last_supervision
    assert torch.isfinite(sup.weights).all() and torch.isfinite(sup.segment_scores).all()
    assert torch.isfinite(sup.change_point.bic_gain).all()
    _assert_finite_metrics(_logged(trainer))


def test_parent_divergence_on_a_masked_teacher_is_a_clear_error(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, teacher=_masked_teacher(len(tokenizer)), loss_type="parent")
    with pytest.raises(FloatingPointError, match=r"optimizer step 1 .*loss_type='advantage'"):
        trainer.compute_loss(trainer.model.train(), _fixed_batch(tokenizer))


def test_a_non_finite_loss_from_finite_logits_is_caught_before_backward(tmp_path, tokenizer, monkeypatch):
    import trl_ltc.trainer as trainer_module

    def infinite_weights(*args, **kwargs):
        sup = supervision_weights(*args, **kwargs)
        return sup._replace(weights=sup.weights * math.inf)

    monkeypatch.setattr(trainer_module, "supervision_weights", infinite_weights)
    trainer = _trainer(tmp_path, tokenizer)
    with pytest.raises(FloatingPointError, match=r"The loss is (nan|inf|-inf) at optimizer step 1"):
        trainer.compute_loss(trainer.model.train(), _fixed_batch(tokenizer))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_student_logits_stop_before_the_update(tmp_path, tokenizer, value):
    vocab = len(tokenizer)
    student = make_model(vocab, seed=1)
    with torch.no_grad():
        student.lm_head.weight[7] = value
    before = _params(student)
    # Sampling from the student hits the NaN/inf first.
    trainer = _trainer(tmp_path, tokenizer, student=student)
    with pytest.raises(SignalsError, match=r"student model .* sampling .* optimizer step 1 \(global_step=0\)"):
        trainer.train()
    _assert_unchanged(trainer.model, before)
    # Completions from elsewhere (vLLM server, fixed): the per-token signals catch it, before any backward.
    trainer = _trainer(tmp_path, tokenizer, student=student)
    _fixed_completions(trainer)
    with pytest.raises(SignalsError, match=r"student model .*learning rate.* optimizer step 1 \(global_step=0\)"):
        trainer.train()
    _assert_unchanged(trainer.model, before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"supervision": "prefix"}, "`supervision` must be one of " + ", ".join(map(repr, SUPERVISIONS))),
        ({"segmentation": "spacy"}, "`segmentation` must be one of " + ", ".join(map(repr, SEGMENTATIONS))),
        ({"token_score": "loss"}, "`token_score` must be one of " + ", ".join(map(repr, TOKEN_SCORES))),
        ({"release_top_k": 1}, "`release_top_k` must be >= 2"),
        ({"supervision": "fixed_prefix", "fixed_prefix_length": -3}, "`fixed_prefix_length` must be a positive"),
        ({"max_prompt_length": 0}, "`max_prompt_length` must be >= 1"),
        ({"release_diagnostics_max_records": 0}, "`release_diagnostics_max_records` must be >= 1"),
    ],
)
def test_config_errors_name_the_field_and_the_allowed_values(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        _config(tmp_path, **overrides)
    assert message in str(error.value)


def test_beta_without_the_parent_loss_warns_once_naming_both_fields(tmp_path, tokenizer):
    def beta_warnings(**overrides):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = _config(tmp_path, **overrides)
            TeachabilityGKDTrainer(
                model=make_model(len(tokenizer), seed=1), teacher_model=make_model(len(tokenizer), seed=2),
                args=config, train_dataset=_prompts(), processing_class=tokenizer,
            )  # fmt: skip
        return [str(w.message) for w in caught if "beta" in str(w.message)]

    (message,) = beta_warnings(beta=0.5)  # once: from the config, not again from the trainer
    assert "`beta=0.5` has no effect with `loss_type='advantage'`" in message and "loss_type='parent'" in message
    assert beta_warnings(beta=0.5, loss_type="parent") == [] and beta_warnings() == []


def test_top_k_above_the_vocabulary_fails_before_the_models_load(tmp_path, tokenizer, monkeypatch):
    import trl.trainer.distillation_trainer as parent

    def never(*args, **kwargs):
        raise AssertionError("the parent trainer was built")

    monkeypatch.setattr(parent.DistillationTrainer, "__init__", never)
    vocab = len(tokenizer)
    with pytest.raises(ValueError, match=rf"`release_top_k` must be in \[2, {vocab}\].*got {vocab + 1}"):
        _trainer(tmp_path, tokenizer, release_top_k=vocab + 1)


@pytest.mark.parametrize(
    "dataset, match",
    [
        (Dataset.from_dict({"question": ["What is 2 + 2?"]}), r"'train_dataset' has no 'prompt' column.*question"),
        (Dataset.from_dict({"prompt": []}), r"'train_dataset' is empty"),
    ],
)
def test_dataset_errors_come_before_the_models_load(tmp_path, dataset, match):
    args = _config(tmp_path)
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another error
    with pytest.raises(ValueError, match=match):
        TeachabilityGKDTrainer(model=missing, teacher_model=missing, args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match=r"eval_dataset\['math'\]. is empty"):
        TeachabilityGKDTrainer(
            model=missing, teacher_model=missing, args=args, train_dataset=_prompts(),
            eval_dataset={"math": Dataset.from_dict({"prompt": []})},
        )  # fmt: skip


def test_long_prompts_are_truncated_from_the_left_with_one_warning(tmp_path, tokenizer, caplog):
    assert truncate_prompt_ids([[1, 2, 3], [4, 5, 6, 7, 8]], 4) == ([[1, 2, 3], [5, 6, 7, 8]], 1)
    trainer = _trainer(tmp_path, tokenizer, max_prompt_length=9)
    full = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
        for p in _prompts()["prompt"]
    ]
    assert min(map(len, full)) > 9
    _fixed_completions(trainer)
    generate, seen = trainer._generate_single_turn, []

    def recording(prompt_ids, *args, **kwargs):
        seen.extend(prompt_ids)
        return generate(prompt_ids, *args, **kwargs)

    trainer._generate_single_turn = recording
    with caplog.at_level(logging.WARNING, logger="trl_ltc.prompts"):
        trainer.train()
    assert seen and all(len(ids) == 9 and any(ids == f[-9:] for f in full) for ids in seen)
    assert all(ids[-3:] == full[0][-3:] for ids in seen)  # the generation prompt is kept
    warned = [r.getMessage() for r in caplog.records if "max_prompt_length" in r.getMessage()]
    assert len(warned) == 1 and "truncated from the left" in warned[0]


TEXTS = [
    "東京は日本の首都です。富士山は高い。それは本当ですか？",
    "Привет, мир! Как дела? Всё хорошо.",
    "مرحبا بالعالم. كيف حالك؟",
    "नमस्ते दुनिया। यह एक परीक्षण है।",
    "def f(x):\n    return {k: v for k, v in x.items() if v}  # comment.\n\nprint(f({'a': 1}))",
    (
        "We have $\\int_0^1 x^2\\,dx = \\frac{1}{3}$. Hence $\\sum_{n\\ge1} 2^{-n} = 1$.\n"
        "\\begin{align} a &= b \\end{align}"
    ),
    "Emoji 🙂🚀👨‍👩‍👧 everywhere!!! 🎉 Done… ok?",
    "\n\n   \t ",
    "...!!!???",
]


@pytest.mark.parametrize("method", SEGMENTATIONS)
def test_any_script_code_latex_or_emoji_is_segmented_without_gaps(tokenizer, method):
    rows = [tokenizer.encode(text) + [tokenizer.eos_token_id] for text in TEXTS]
    rows.append(tokenizer.encode(TEXTS[0])[1:-1])  # cut inside multi-byte characters, no EOS
    width = max(map(len, rows)) + 2
    for side in ("left", "right"):
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[b, cols], mask[b, cols] = torch.tensor(row), 1
        segments = segment_completions(ids, mask, tokenizer, method, window=4)
        assert (segments[mask == 0] == -1).all()
        for b in range(len(rows)):
            row = segments[b][mask[b] > 0]
            assert row[0] == 0 and (row >= 0).all() and set(row.diff().tolist()) <= {0, 1}, (method, TEXTS[b:b + 1])


def _padded(rows, pad_id, side):
    width = max(len(prompt) + len(completion) for prompt, completion in rows) + 1
    ids = torch.full((len(rows), width), pad_id)
    attention, completion_mask = torch.zeros(2, len(rows), width, dtype=torch.long)
    for b, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        start = 0 if side == "right" else width - len(seq)
        ids[b, start : start + len(seq)] = torch.tensor(seq)
        attention[b, start : start + len(seq)] = 1
        completion_mask[b, start + len(prompt) : start + len(seq)] = 1
    return ids, attention, completion_mask


def test_left_and_right_padding_give_identical_signals_and_weights(tokenizer):
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    # float64 models: the two layouts differ only by round-off (shifted rotary positions), far below any tie
    student, teacher = make_model(vocab, seed=1, dtype=torch.float64), make_model(vocab, seed=2, dtype=torch.float64)
    rows = [
        (tokenizer.encode("Tom has 3 apples."), tokenizer.encode(" He eats one. Two are left! Done.") + [eos]),
        (tokenizer.encode("Q:"), tokenizer.encode(" Let x = 3. Then 2x + 1 = 7, so the answer is 7.") + [eos]),
        (tokenizer.encode("Say hi"), [eos]),
    ]
    results = {}
    for side in ("left", "right"):
        ids, attention, completion_mask = _padded(rows, tokenizer.pad_token_id, side)
        with torch.no_grad():
            signals = token_signals(student, teacher, ids, attention, completion_mask, top_k=5, feature_k=8)
        segments = segment_completions(ids, completion_mask, tokenizer)
        valid = completion_mask.bool()
        weights = {
            policy: supervision_weights(
                policy, completion_mask, segment_ids=segments, margins=signals.margins,
                advantages=signals.advantages, features=signals.features, fixed_prefix_length=4,
                generator=torch.Generator().manual_seed(0), token_keep_ratio=0.3,
            ).weights[valid]
            for policy in SUPERVISIONS
        }  # fmt: skip
        values = [signals.student_logprobs, signals.teacher_logprobs, signals.margins, *signals.features]
        results[side] = ([x[valid] for x in values], segments[valid], weights)
    (left_values, left_segments, left_weights), (right_values, right_segments, right_weights) = results.values()
    for left, right in zip(left_values, right_values):
        torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)
    assert torch.equal(left_segments, right_segments)
    for policy in SUPERVISIONS:
        torch.testing.assert_close(left_weights[policy], right_weights[policy], msg=policy)


def test_tokenizer_padding_side_does_not_change_training(tmp_path, tokenizer):
    losses = {}
    for side in ("left", "right"):
        tok = make_tokenizer()
        tok.padding_side = side
        trainer = _trainer(tmp_path / side, tok, max_steps=1)
        _fixed_completions(trainer)
        trainer.train()
        losses[side] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses["left"] == losses["right"]


# ------------------------------------------------------------------------------------------------------------ faults


def _launch(output_dir, *flags):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, str(TESTS / "_train_script.py"), str(output_dir), *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=180):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    """SIGKILL mid-step 3; the resumed run's steps 3 and 4 equal an uninterrupted run's, random_release included."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    runs = [_launch(whole), _launch(killed, "--kill-at-step", "2")]
    (code, output), (killed_code, killed_output) = map(_finish, runs)
    assert code == 0, output[-3000:]
    assert killed_code == -signal.SIGKILL, killed_output[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # A later checkpoint whose writing was cut short (weights only, no trainer state) must not be resumed from.
    partial = killed / "checkpoint-3"
    partial.mkdir()
    shutil.copy(killed / "checkpoint-2" / "model.safetensors", partial)
    code, output = _finish(_launch(killed, "--resume"))
    assert code == 0, output[-3000:]
    assert "Skipping" in output and "checkpoint-3" in output

    expected = {entry["step"]: entry for entry in json.loads((whole / "log.json").read_text())}
    resumed = {entry["step"]: entry for entry in json.loads((killed / "log.json").read_text())}
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for name in (
            "loss", "grad_norm", "release/kept_token_frac", "release/release_position", "advantage/mean",
            "release/accepted_frac_null",  # the null metric's generator resumes too
        ):  # fmt: skip
            assert resumed[step][name] == expected[step][name], (step, name)
    assert len({expected[step]["release/kept_token_frac"] for step in expected}) > 1  # the permutation did vary


@pytest.mark.parametrize("policy", ["full", "random_release"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_at_an_epoch_boundary_and_mid_epoch_is_exact(tmp_path, policy, accumulation):
    """8 prompts in generation batches of 4: an epoch is 2 steps. Resuming (in a fresh process) from checkpoint-2, an
    epoch boundary, and from checkpoint-3, mid-way through the second epoch, gives every later step of an
    uninterrupted run exactly: the second epoch's shuffle order must not restart from the first epoch's."""
    flags = ("--prompts", "8", "--supervision", policy, "--gradient-accumulation-steps", str(accumulation))
    whole = tmp_path / "whole"
    code, output = _finish(_launch(whole, *flags))
    assert code == 0, output[-3000:]
    runs = {}
    for step in (2, 3):
        shutil.copytree(whole / f"checkpoint-{step}", tmp_path / f"from-{step}" / f"checkpoint-{step}")
        runs[step] = _launch(tmp_path / f"from-{step}", *flags, "--resume")
    for step, process in runs.items():
        code, output = _finish(process)
        assert code == 0, output[-3000:]
    expected = {entry["step"]: entry for entry in json.loads((whole / "log.json").read_text())}
    assert sorted(expected) == [1, 2, 3, 4]
    names = sorted(set(expected[4]) - {"step_time"})
    assert {"loss", "grad_norm", "release/kept_token_frac", "release/release_position", "epoch"} <= set(names)
    for start in runs:
        resumed = {entry["step"]: entry for entry in json.loads((tmp_path / f"from-{start}" / "log.json").read_text())}
        for step in range(start + 1, 5):
            assert {n: resumed[step].get(n) for n in names} == {n: expected[step][n] for n in names}, (start, step)


def test_keyboard_interrupt_mid_step_leaves_the_last_checkpoint_intact(tmp_path):
    from safetensors.torch import load_file

    trainer = build_trainer(str(tmp_path), max_steps=3)
    compute_loss = trainer.compute_loss

    def interrupted(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        if trainer.state.global_step == 1:
            raise KeyboardInterrupt
        return loss

    trainer.compute_loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert last_complete_checkpoint(str(tmp_path)) == str(checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == dict(trainer.model.named_parameters()).keys()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "release_rng_state_0.pth"):
        torch.load(checkpoint / name, weights_only=False)

    resumed = build_trainer(str(tmp_path), max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_last_complete_checkpoint_skips_interrupted_writes(tmp_path, caplog):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    for step in (2, 10, 11):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 1')  # cut mid-write
    (tmp_path / "checkpoint-x").mkdir()
    with caplog.at_level(logging.WARNING, logger="trl_ltc.resume"):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert sum("Skipping" in r.getMessage() for r in caplog.records) == 2


# -------------------------------------------------------------------------------------------------------------- fuzz


@st.composite
def supervision_batches(draw):
    """Ragged batches: padding on either side, loss-mask holes, empty completions, any segmentation and signals."""
    batch, width = draw(st.integers(1, 5)), draw(st.integers(1, 14))
    completion_mask = torch.zeros(batch, width)
    segment_ids = torch.full((batch, width), -1, dtype=torch.long)
    for b in range(batch):
        length = draw(st.integers(0, width))
        start = 0 if draw(st.booleans()) else width - length
        completion_mask[b, start : start + length] = 1
        if length and draw(st.integers(0, 5)) != 0:  # one row in six: an empty completion (no segment)
            breaks = draw(st.lists(st.booleans(), min_size=length - 1, max_size=length - 1))
            segment_ids[b, start : start + length] = torch.tensor([0] + breaks).cumsum(0)
    holes = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * width, max_size=batch * width)))
    loss_mask = completion_mask * ~(holes.reshape(batch, width) & draw(st.booleans()))  # e.g. tool outputs
    values = st.floats(0.0, 30.0) | st.sampled_from([0.0, 1e-30, 27.631021, 1e6])
    margins = torch.tensor(draw(st.lists(values, min_size=batch * width, max_size=batch * width)))
    margins = margins.reshape(batch, width)
    advantages = -margins.flip(-1)
    features = TeachabilityFeatures(*(margins.remainder(1.0 + k) for k in range(3)))
    return loss_mask, segment_ids, margins, advantages, features


def _kept_is_a_prefix(kept, loss_mask):
    order = kept[loss_mask > 0]
    return bool((order[1:] <= order[:-1]).all())  # once dropped, never kept again


@settings(max_examples=150, deadline=None)
@given(
    data=supervision_batches(),
    prefix=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    score=st.sampled_from(TOKEN_SCORES),
    ratio=st.floats(0.01, 1.0),
)
def test_fuzz_supervision_weights(data, prefix, seed, score, ratio):
    loss_mask, segment_ids, margins, advantages, features = data
    for policy in SUPERVISIONS:
        weights = supervision_weights(
            policy, loss_mask, segment_ids=segment_ids, margins=margins, advantages=advantages, features=features,
            fixed_prefix_length=prefix, generator=torch.Generator().manual_seed(seed), token_score=score,
            token_keep_ratio=ratio,
        ).weights  # fmt: skip
        assert weights.shape == loss_mask.shape and torch.isfinite(weights).all() and (weights >= 0).all(), policy
        assert (weights[loss_mask == 0] == 0).all(), policy
        if policy == "full":
            assert torch.equal(weights, loss_mask)
        elif policy == "token_teachability" and (weights > 0).any():  # one batch budget, rescaled to its mass
            assert weights.sum().item() == pytest.approx(loss_mask.sum().item(), rel=1e-5)
        for b in range(loss_mask.shape[0]) if policy in PREFIX_POLICIES else ():
            kept = weights[b] > 0
            assert _kept_is_a_prefix(kept, loss_mask[b]), (policy, b)
            if kept.any():
                assert weights[b].sum().item() == pytest.approx(loss_mask[b].sum().item(), rel=1e-5), (policy, b)
            if policy in SEGMENT_POLICIES and not (segment_ids[b][loss_mask[b] > 0] >= 0).any():
                assert not kept.any(), (policy, b)  # no segment (empty completion): nothing kept
