"""Online release (DESIGN.md formula 9): the replay function and the generation loop that applies it."""

from __future__ import annotations

import pytest
import torch

from trl_ltc.release import OnlineRelease, bic_change_point, online_release

# --------------------------------------------------------------------------------------------- online_release


def loop_online_release(scores: torch.Tensor, num_segments: torch.Tensor, min_segments=3, patience=2):
    """Reference: one trajectory at a time, the change point on every prefix of its segment scores."""
    stops, releases = [], []
    for row, n in zip(scores, num_segments.tolist()):
        for prefix in range(min_segments, n):
            cp = bic_change_point(row[None, :prefix], torch.tensor([prefix]))
            tau = int(cp.release_segment)
            if bool(cp.accepted) and prefix - tau >= patience:
                stops.append(prefix)
                releases.append(tau)
                break
        else:
            stops.append(n)
            releases.append(int(bic_change_point(row[None, :n], torch.tensor([n])).release_segment))
    return stops, releases


def _check(scores, num_segments, **kwargs):
    result = online_release(scores, num_segments, **kwargs)
    assert isinstance(result, OnlineRelease)
    assert result.stop_segment.dtype == result.release_segment.dtype == torch.long
    stops, releases = loop_online_release(scores, num_segments, **kwargs)
    assert result.stop_segment.tolist() == stops
    assert result.release_segment.tolist() == releases
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_online_release_equals_a_loop_over_prefixes(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    batch, width = 12, int(torch.randint(1, 24, (1,), generator=g))
    scores = torch.rand(batch, width, generator=g, dtype=dtype)
    # late drops of random size and position, and some rows quantised to produce ties
    drop_at = torch.randint(0, width + 1, (batch, 1), generator=g)
    scores = scores - (torch.arange(width) >= drop_at) * torch.rand(batch, 1, generator=g, dtype=dtype) * 3
    scores[::3] = scores[::3].mul(2).round()
    num_segments = torch.randint(0, width + 1, (batch,), generator=g)
    for min_segments, patience in ((3, 2), (1, 1), (2, 3), (5, 1)):
        _check(scores, num_segments, min_segments=min_segments, patience=patience)


def test_online_release_constructed_cases():
    rows = [
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # a drop that appears only late
        [2.0, 2.0, 2.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # a drop that is later undone
        [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # fewer than min_segments (n = 2)
        [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0, 1.0, 1.0],  # no drop at all
        [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0, 0.0],  # the drop is too late for patience
    ]
    scores = torch.tensor(rows)
    num_segments = torch.tensor([10, 10, 2, 10, 10])
    result = _check(scores, num_segments)
    offline = bic_change_point(scores, num_segments)
    # late drop: stopped two segments after it, at the offline release point
    assert (result.stop_segment[0], result.release_segment[0]) == (8, 6) and offline.release_segment[0] == 6
    # undone drop: stopped at the drop the offline rule never sees
    assert (result.stop_segment[1], result.release_segment[1]) == (5, 3) and not offline.accepted[1]
    # too short to stop: the offline rule on all segments
    assert result.stop_segment[2] == 2 and result.release_segment[2] == offline.release_segment[2]
    assert (result.stop_segment[3], result.release_segment[3]) == (10, 10)
    # a drop in the last two segments: never stopped, offline release at the drop
    assert (result.stop_segment[4], result.release_segment[4]) == (10, 8)


def test_online_release_degenerate_shapes_and_errors():
    empty = online_release(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    assert empty.stop_segment.tolist() == [0, 0, 0] and empty.release_segment.tolist() == [0, 0, 0]
    none = online_release(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    assert none.stop_segment.shape == (0,)
    with pytest.raises(ValueError, match="min_segments and patience"):
        online_release(torch.zeros(1, 4), torch.tensor([4]), patience=0)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        online_release(torch.zeros(4), torch.tensor([4]))


# --------------------------------------------------------------------------------------------- configuration


def _config(tmp_path, **overrides):
    from trl_ltc import TeachabilityGKDConfig

    kwargs = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, save_strategy="no")
    return TeachabilityGKDConfig(**{**kwargs, **overrides})


def test_config_defaults_and_online_fields(tmp_path):
    config = _config(tmp_path)
    assert (config.rollout_truncation, config.online_min_segments, config.online_patience) == ("none", 3, 2)
    online = _config(tmp_path, rollout_truncation="online", online_check_tokens=4)
    assert online.online_check_tokens == 4


def test_distill_command_line_sets_the_online_fields():
    from trl_ltc.distill import build_parser

    argv = "--rollout_truncation online --online_min_segments 4 --online_patience 1 --online_check_tokens 8"
    _, args, _, _ = build_parser().parse_args_and_config([*argv.split(), "--use_cpu", "--output_dir", "x"])
    fields = (args.rollout_truncation, args.online_min_segments, args.online_patience, args.online_check_tokens)
    assert fields == ("online", 4, 1, 8) and args.supervision == "release"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"rollout_truncation": "early"}, "`rollout_truncation`"),
        ({"rollout_truncation": "online", "supervision": "full"}, "needs `supervision='release'`"),
        ({"rollout_truncation": "online", "online_min_segments": 0}, "`online_min_segments`"),
        ({"rollout_truncation": "online", "online_patience": 0}, "`online_patience`"),
        ({"rollout_truncation": "online", "online_check_tokens": 0}, "`online_check_tokens`"),
    ],
)
def test_config_errors_name_the_online_fields(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


# --------------------------------------------------------------------------------------------- generation loop


def _prompts(tokenizer, batch=8, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    ids[::2, :2], mask[::2, :2] = tokenizer.pad_token_id, 0  # left padding on every other row
    return ids, mask


def _generate(tokenizer, student, teacher, ids, mask, do_sample=True, max_new_tokens=40, **kwargs):
    from transformers import GenerationConfig

    from trl_ltc.online import TransformersBlocks, generate_online

    eos = [tokenizer.eos_token_id]
    config = GenerationConfig(
        do_sample=do_sample, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
    )
    options = dict(check_tokens=4, segmentation="fixed", segment_window=3, min_segments=3, patience=2)
    options.update(kwargs)
    return generate_online(
        TransformersBlocks(student, config, 5), teacher, tokenizer, ids, mask, max_new_tokens=max_new_tokens,
        eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, **options,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models(tokenizer):
    from helpers import make_model

    return make_model(len(tokenizer), seed=1), make_model(len(tokenizer), seed=2)


def test_generation_loop_stops_exactly_where_online_release_says(tokenizer, models):
    """Offline signals on everything the loop generated give the same stops, at the same segments."""
    from trl.trainer.utils import pad

    from trl_ltc.release import segment_scores
    from trl_ltc.segmentation import segment_completions
    from trl_ltc.signals import token_signals

    student, teacher = models
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(0)
    rollout = _generate(tokenizer, student, teacher, ids, mask)
    assert 0 < int(rollout.stopped.sum()) < len(rollout.stopped)  # both kinds of rows are exercised

    generated = [torch.tensor(g) for g in rollout.generated_ids]
    completion = pad(generated, padding_value=tokenizer.pad_token_id)
    completion_mask = pad([torch.ones_like(g) for g in generated], padding_value=0)
    signals = token_signals(
        student, teacher, torch.cat([ids, completion], 1), torch.cat([mask, completion_mask], 1),
        torch.cat([torch.zeros_like(mask), completion_mask], 1), top_k=5,
    )  # fmt: skip
    segment_ids = segment_completions(completion, completion_mask, tokenizer, "fixed", 3)
    scores, num_segments = segment_scores(signals.margins[:, ids.shape[1] :], segment_ids)
    expected = online_release(scores, num_segments)

    assert rollout.stopped.tolist() == (expected.stop_segment < num_segments).tolist()
    assert rollout.stop_segment.tolist() == expected.stop_segment.tolist()
    assert rollout.release_segment.tolist() == expected.release_segment.tolist()
    for b, (kept, full) in enumerate(zip(rollout.completion_ids, rollout.generated_ids)):
        if rollout.stopped[b]:  # the kept prefix is segments 0..tau-1; the tokens after it are dropped
            assert kept == full[: 3 * int(rollout.release_segment[b])]
            # stopped in the block where segment `stop_segment` started
            first_token = 3 * int(rollout.stop_segment[b])
            assert first_token < len(full) <= first_token + 4
        else:
            assert kept == full
    assert (rollout.bic_gain[rollout.stopped] > 0).all() and (rollout.bic_gain[~rollout.stopped] == 0).all()
    assert rollout.teacher_time > 0


# Bound on |cached - recomputed| for the teacher's scores in fp32 on CPU: the block forward through the KV cache and
# the full forward of the loss sum in different orders (observed: at most 5e-7 on these models).
SCORE_ATOL = 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generation_loop_returns_the_teacher_scores_of_the_kept_tokens(tokenizer, models, temperature):
    """`log pT(y_t)` and the margin computed block by block equal a full forward over the kept completions."""
    from trl.trainer.utils import pad

    from trl_ltc.signals import token_signals

    student, teacher = models
    ids, mask = _prompts(tokenizer, seed=3)
    torch.manual_seed(1)
    rollout = _generate(tokenizer, student, teacher, ids, mask, temperature=temperature)
    assert rollout.stopped.any() and not rollout.stopped.all()
    kept = [torch.tensor(c, dtype=torch.long) for c in rollout.completion_ids]
    completion = pad(kept, padding_value=tokenizer.pad_token_id)
    completion_mask = pad([torch.ones_like(c) for c in kept], padding_value=0)
    width = completion.shape[1]
    assert rollout.teacher_logprobs.shape == rollout.margins.shape and rollout.teacher_logprobs.shape[1] >= width
    signals = token_signals(
        student, teacher, torch.cat([ids, completion], 1), torch.cat([mask, completion_mask], 1),
        torch.cat([torch.zeros_like(mask), completion_mask], 1), top_k=5, temperature=temperature,
    )  # fmt: skip
    on = completion_mask.bool()
    pairs = (rollout.teacher_logprobs, signals.teacher_logprobs), (rollout.margins, signals.margins)
    for cached, recomputed in pairs:
        recomputed = recomputed[:, ids.shape[1] :]
        torch.testing.assert_close(cached[:, :width][on], recomputed[on], atol=SCORE_ATOL, rtol=0)
        assert (cached[:, :width][~on] == 0).all() and (cached[:, width:] == 0).all()  # the dropped suffix, padding
    assert (rollout.teacher_logprobs[on] < 0).all()


def test_generation_loop_names_a_non_finite_teacher(tokenizer, models):
    import copy

    from trl_ltc.signals import SignalsError

    student, teacher = models
    broken = copy.deepcopy(teacher)
    with torch.no_grad():
        broken.get_output_embeddings().weight[5] = float("nan")
    ids, mask = _prompts(tokenizer, batch=2)
    with pytest.raises(SignalsError, match="The teacher model produced non-finite logits"):
        _generate(tokenizer, student, broken, ids, mask, max_new_tokens=8)


def test_generation_loop_continues_blocks_like_one_generate_call(tokenizer, models):
    """Greedy: the blocks (KV caches continued, stopped rows dropped) generate the tokens of one generate call."""
    from transformers import GenerationConfig

    student, teacher = models
    ids, mask = _prompts(tokenizer, seed=1)
    eos = [tokenizer.eos_token_id]
    config = GenerationConfig(
        do_sample=False, max_new_tokens=30, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
    )
    reference = student.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
    never = _generate(tokenizer, student, teacher, ids, mask, do_sample=False, max_new_tokens=30, min_segments=99)
    online = _generate(
        tokenizer, student, teacher, ids, mask, do_sample=False, max_new_tokens=30, min_segments=2, patience=1
    )
    assert not never.stopped.any() and online.stopped.any()
    for b in range(ids.shape[0]):
        row = reference[b].tolist()
        assert never.completion_ids[b] == row[: len(never.completion_ids[b])]
        assert len(never.completion_ids[b]) == 30 or never.completion_ids[b][-1] in eos
        assert online.generated_ids[b] == row[: len(online.generated_ids[b])]


# --------------------------------------------------------------------------------------------- supervision


def test_stopped_trajectories_keep_every_token():
    from trl_ltc.supervision import supervision_weights

    # Both rows drop sharply after two segments; the first was stopped online, so its batch row is the kept prefix.
    margins = torch.tensor([[5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    segment_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    loss_mask = torch.ones(2, 8)
    offline = supervision_weights("release", loss_mask, segment_ids=segment_ids, margins=margins)
    online = supervision_weights(
        "release", loss_mask, segment_ids=segment_ids, margins=margins,
        online_stopped=torch.tensor([True, False]), online_bic_gain=torch.tensor([7.5, 0.0]),
    )  # fmt: skip
    assert offline.change_point.release_segment.tolist() == [2, 2]
    assert torch.equal(online.weights[0], loss_mask[0]) and torch.equal(online.weights[1], offline.weights[1])
    assert online.change_point.release_segment.tolist() == [4, 2]
    assert online.change_point.accepted.tolist() == [True, True]
    assert online.change_point.bic_gain[0] == 7.5
    assert online.change_point.bic_gain[1] == offline.change_point.bic_gain[1]


# --------------------------------------------------------------------------------------------- trainer


ROLLOUT_METRICS = (
    "rollout/generated_tokens", "rollout/truncated_frac", "rollout/saved_tokens_frac", "rollout/teacher_scoring_time"
)  # fmt: skip


def test_online_truncation_trains_and_drops_the_released_tokens(tmp_path, tokenizer, models):
    import math

    from datasets import Dataset

    from trl_ltc import TeachabilityGKDTrainer

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tom has {i} apples."}] for i in range(8)]})
    args = _config(
        tmp_path, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_completion_length=16,
        logging_steps=1, learning_rate=1e-3, segmentation="fixed", segment_window=2, release_diagnostics_steps=0,
        rollout_truncation="online", online_min_segments=2, online_patience=1, online_check_tokens=3,
    )  # fmt: skip
    student, teacher = (copy_model(m) for m in models)
    trainer = TeachabilityGKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=prompts, processing_class=tokenizer
    )
    rollouts = []
    generate = trainer._generate_online
    trainer._generate_online = lambda prompt_ids: rollouts.append(generate(prompt_ids)) or rollouts[-1]
    calls = _TeacherCalls(trainer)
    trainer.train()
    assert calls.loss == 0 and calls.other > 0  # one teacher pass per token: while generating, none in the loss

    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert math.isfinite(log["loss"])
        for name in ROLLOUT_METRICS + ("release/accepted_frac", "release/kept_token_frac"):
            assert math.isfinite(log[name]), name
    rollout = rollouts[-1]
    assert rollout.stopped.any(), "the settings are chosen so that some trajectories stop"
    generated = sum(map(len, rollout.generated_ids))
    assert logs[-1]["rollout/generated_tokens"] == generated
    assert logs[-1]["rollout/truncated_frac"] == rollout.stopped.float().mean().item()
    stopped_at = [len(g) for g, s in zip(rollout.generated_ids, rollout.stopped) if s]
    expected_saved = sum(16 - n for n in stopped_at) / (16 * len(stopped_at) + generated - sum(stopped_at))
    assert logs[-1]["rollout/saved_tokens_frac"] == pytest.approx(expected_saved)

    # The batch of the last step holds the kept prefixes only; stopped rows are weighted 1 on every kept token.
    batch_rows = {}
    for inputs in trainer._buffered_inputs:
        for ids, mask, stop in zip(inputs["completion_ids"], inputs["completion_mask"], inputs["online_stopped"]):
            batch_rows.setdefault(tuple(ids[mask.bool()].tolist()), []).append(bool(stop))
    expected_rows = {}
    for kept, stop in zip(rollout.completion_ids, rollout.stopped.tolist()):
        expected_rows.setdefault(tuple(kept), []).append(stop)
    assert {k: sorted(v) for k, v in batch_rows.items()} == {k: sorted(v) for k, v in expected_rows.items()}
    last = trainer._buffered_inputs[-1]
    weights, mask = trainer.last_supervision.weights, last["completion_mask"].float()
    stopped = last["online_stopped"].bool()
    assert torch.equal(weights[stopped], mask[stopped])
    assert trainer.last_supervision.change_point.accepted[stopped].all()


def copy_model(model):
    import copy

    return copy.deepcopy(model).train()


def _online_trainer(tmp_path, tokenizer, models, **overrides):
    from datasets import Dataset

    from trl_ltc import TeachabilityGKDTrainer

    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tom has {i} apples."}] for i in range(8)]})
    options = dict(
        max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_completion_length=16,
        logging_steps=1, learning_rate=1e-3, segmentation="fixed", segment_window=2, release_diagnostics_steps=0,
        rollout_truncation="online", online_min_segments=2, online_patience=1, online_check_tokens=3,
    )  # fmt: skip
    args = _config(tmp_path, **{**options, **overrides})
    student, teacher = (copy_model(m) for m in models)
    return TeachabilityGKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=prompts, processing_class=tokenizer
    )


class _TeacherCalls:
    """Counts the teacher backbone's forward calls, split into those inside `compute_loss` and the others."""

    def __init__(self, trainer):
        self.loss = self.other = 0
        self.in_loss = False
        trainer.teacher_model.base_model.register_forward_hook(self._count)
        compute_loss = trainer.compute_loss

        def counting_compute_loss(*args, **kwargs):
            self.in_loss = True
            try:
                return compute_loss(*args, **kwargs)
            finally:
                self.in_loss = False

        trainer.compute_loss = counting_compute_loss

    def _count(self, *_):
        if self.in_loss:
            self.loss += 1
        else:
            self.other += 1


def test_online_loss_uses_the_cached_teacher_scores(tmp_path, tokenizer, models, monkeypatch):
    """On one online batch the loss from the rollout's teacher scores equals the loss that runs the teacher again:
    the teacher's log-probs, margins, loss, gradient, weights and metrics; the cached path calls no teacher forward."""
    import trl_ltc.trainer

    trainer = _online_trainer(tmp_path, tokenizer, models)
    calls = _TeacherCalls(trainer)
    signals, recorded = [], trl_ltc.trainer.signals_from_hidden
    monkeypatch.setattr(
        trl_ltc.trainer, "signals_from_hidden", lambda *a, **k: signals.append(recorded(*a, **k)) or signals[-1]
    )
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([{"prompt": row["prompt"]} for row in trainer.train_dataset])
    assert batch["online_stopped"].any() and not batch["online_stopped"].all()
    assert batch["online_teacher_logprobs"].shape == batch["online_margins"].shape == batch["completion_ids"].shape
    recomputed_batch = {k: v for k, v in batch.items() if k not in ("online_teacher_logprobs", "online_margins")}
    assert calls.loss == 0 and calls.other > 0  # the teacher scored the blocks while generating

    results, null_state = [], trainer.null_generator.get_state()
    for inputs in (batch, recomputed_batch):
        trainer.model.zero_grad()
        trainer.null_generator.set_state(null_state)  # the same shuffles for `release/accepted_frac_null`
        metrics = trainer._metrics["train"]
        before = {name: len(values) for name, values in metrics.items()}
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        logged = {n: v[before.get(n, 0) :] for n, v in metrics.items() if not n.startswith("rollout/")}
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((loss.detach(), signals[-1], trainer.last_supervision, logged, grads))
    assert calls.loss == 1  # only the second pass ran the teacher

    (loss, cached, weights, logged, grads), (loss_ref, ref, weights_ref, logged_ref, grads_ref) = results
    on = batch["completion_mask"].bool()
    torch.testing.assert_close(cached.teacher_logprobs[on], ref.teacher_logprobs[on], atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(cached.margins[on], ref.margins[on], atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(cached.student_logprobs, ref.student_logprobs)
    torch.testing.assert_close(loss, loss_ref, atol=SCORE_ATOL, rtol=1e-4)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(weights.weights, weights_ref.weights)
    assert torch.equal(weights.change_point.release_segment, weights_ref.change_point.release_segment)
    assert logged.keys() == logged_ref.keys() and "margin/prefix_mean" in logged and "advantage/mean" in logged
    for name in logged:
        assert logged[name] == pytest.approx(logged_ref[name], abs=SCORE_ATOL, rel=1e-4, nan_ok=True), name


def test_online_truncation_rejects_unsupported_setups(tmp_path, tokenizer, models):
    from datasets import Dataset

    from trl_ltc import TeachabilityGKDTrainer

    prompts = Dataset.from_dict({"prompt": ["Tom has 3 apples."] * 4})
    args = _config(tmp_path, rollout_truncation="online", max_steps=1)
    with pytest.raises(ValueError, match="does not support tool calling"):
        TeachabilityGKDTrainer(
            model=copy_model(models[0]), teacher_model=copy_model(models[1]), args=args, train_dataset=prompts,
            processing_class=tokenizer, tools=[lambda x: x],
        )  # fmt: skip


# --------------------------------------------------------------------------------------------- diagnose replay


def _record(scores, spans, accepted, release, index=0):
    return {
        "index": index, "prompt_id": None, "step": None, "num_segments": len(scores), "segment_scores": scores,
        "segment_token_spans": spans, "completion_length": spans[-1][1] if spans else 0, "accepted": accepted,
        "release_segment": release,
    }  # fmt: skip


def _records():
    late = [1.0] * 6 + [0.0] * 4  # stopped at 8 segments, released at 6: agrees with the offline rule
    undone = [2.0, 2.0, 2.0, 0.0, 0.0] + [2.0] * 5  # stopped at 5 segments, released at 3: the offline rule keeps all
    flat = [1.0, 1.1, 0.9, 1.0, 1.05]
    spans = lambda n: [[5 * i, 5 * i + 5] for i in range(n)]  # noqa: E731 - five tokens per segment
    return [
        _record(late, spans(10), True, 6, 0),
        _record(undone, spans(10), False, 10, 1),
        _record(flat, spans(5), False, 5, 2),
    ]


def test_online_replay_fields():
    from trl_ltc.diagnostics import online_replay, summarize_online

    records = _records()
    exact, blocks = online_replay(records), online_replay(records, check_tokens=16)
    assert [(o["online_stop_segment"], o["online_release_segment"]) for o in exact] == [(8, 6), (5, 3), (5, 5)]
    assert [o["online_stopped"] for o in exact] == [True, True, False]
    assert [o["online_agrees"] for o in exact] == [True, False, True]
    # segment 8 starts at token 40: generated 41 tokens (check_tokens=1) or up to the end of the block, 48
    assert [o["online_generated_tokens"] for o in exact] == [41, 26, 25]
    assert [o["online_generated_tokens"] for o in blocks] == [48, 32, 25]
    assert [o["online_saved_tokens"] for o in blocks] == [2, 18, 0]
    numbers = summarize_online(records, blocks)
    assert numbers["stopped_fraction"] == pytest.approx(2 / 3)
    assert numbers["agreement"] == pytest.approx(2 / 3) and numbers["agreement_stopped"] == 0.5
    assert numbers["saved_tokens_fraction"] == pytest.approx(20 / 125)
    assert online_replay([]) == []


def test_diagnose_replay_command(tmp_path, capsys):
    import json

    from trl_ltc import cli
    from trl_ltc.diagnostics import write_records

    write_records(_records(), tmp_path / "records.jsonl")
    out = tmp_path / "replay"
    argv = ["diagnose", "--replay", str(tmp_path / "records.jsonl"), "--online_check_tokens", "16"]
    assert cli.main([*argv, "--output_dir", str(out)]) == 0
    lines = [json.loads(line) for line in (out / "online_replay.jsonl").read_text().splitlines()]
    assert [line["online_saved_tokens"] for line in lines] == [2, 18, 0] and lines[1]["index"] == 1
    summary = (out / "online_replay.md").read_text()
    assert "| Tokens saved (fraction of the completion tokens) | 0.160 |" in summary
    assert "| Online release point = offline release point (all trajectories) | 0.667 |" in summary
    assert "online_replay.md" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["diagnose", "--replay", "x.jsonl", "--online_patience", "0"])


# --------------------------------------------------------------------------------------------- vLLM blocks


class _FakeVLLMGeneration:
    """TRL's `VLLMGeneration.generate` contract (token-id prompts in, completions up to EOS out), greedy, on CPU."""

    def __init__(self, model, tokenizer, max_completion_length):
        self.model, self.tokenizer, self.max_completion_length = model, tokenizer, max_completion_length

    def generate(self, prompts, images, num_generations, profiler=None):
        from transformers import GenerationConfig

        eos = self.tokenizer.eos_token_id
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_completion_length, eos_token_id=eos)
        completions = []
        for prompt in prompts:
            out = self.model.generate(input_ids=torch.tensor([prompt]), generation_config=config)[0, len(prompt) :]
            ids = out.tolist()
            completions.append(ids[: ids.index(eos) + 1] if eos in ids else ids)
        return prompts, completions, None, None


def test_vllm_blocks_make_the_decisions_of_transformers_blocks(tokenizer, models):
    """The vLLM block generator (here on a CPU stand-in with vLLM's interface) continues sequences like generate."""
    from trl_ltc.online import VLLMBlocks, generate_online

    student, teacher = models
    ids, mask = _prompts(tokenizer, batch=4, seed=1)
    options = dict(check_tokens=4, segmentation="fixed", segment_window=3, min_segments=2, patience=1)
    reference = _generate(tokenizer, student, teacher, ids, mask, do_sample=False, max_new_tokens=24, **options)
    fake = _FakeVLLMGeneration(student, tokenizer, max_completion_length=24)
    rollout = generate_online(
        VLLMBlocks(fake, student, 5, tokenizer.pad_token_id), teacher, tokenizer, ids, mask, max_new_tokens=24,
        eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, **options,
    )  # fmt: skip
    assert fake.max_completion_length == 24  # restored after each block
    assert rollout.generated_ids == reference.generated_ids and rollout.completion_ids == reference.completion_ids
    assert torch.equal(rollout.stopped, reference.stopped) and reference.stopped.any()
    assert torch.equal(rollout.release_segment, reference.release_segment)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM generation needs a CUDA GPU")
def test_online_truncation_with_vllm_colocate(tmp_path, tokenizer, models):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from datasets import Dataset

    from trl_ltc import TeachabilityGKDTrainer

    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"
    for model, path in zip(models, (student_dir, teacher_dir)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    prompts = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tom has {i} apples."}] for i in range(8)]})
    args = _config(
        tmp_path / "out", use_cpu=False, max_steps=2, per_device_train_batch_size=4, max_completion_length=24,
        logging_steps=1, segmentation="fixed", segment_window=2, rollout_truncation="online", online_min_segments=2,
        online_patience=1, online_check_tokens=4, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2,
        release_diagnostics_steps=0,
    )  # fmt: skip
    trainer = TeachabilityGKDTrainer(
        model=str(student_dir), teacher_model=str(teacher_dir), args=args, train_dataset=prompts,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all("rollout/truncated_frac" in log for log in logs)


def test_online_parent_loss_runs_the_teacher_and_counts_its_time(tmp_path, tokenizer, models):
    """`loss_type="parent"` needs the teacher's distribution: one teacher forward per micro-batch, timed into
    `rollout/teacher_scoring_time` on top of the scoring while generating."""
    import math

    trainer = _online_trainer(tmp_path, tokenizer, models, loss_type="parent", max_steps=1)
    rollouts, generate = [], trainer._generate_online
    trainer._generate_online = lambda prompt_ids: rollouts.append(generate(prompt_ids)) or rollouts[-1]
    calls = _TeacherCalls(trainer)
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "loss" in log]
    assert math.isfinite(log["loss"])
    assert calls.loss == 2  # gradient_accumulation_steps micro-batches
    assert log["rollout/teacher_scoring_time"] > rollouts[0].teacher_time > 0
