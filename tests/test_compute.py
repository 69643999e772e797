"""Compute accounting (DESIGN.md formula 12): every counter against hand-counted tokens on a tiny run, cumulative,
unchanged by a resume; online truncation against offline release; the `max_flops` budget."""

from __future__ import annotations

import json

import pytest
import torch
from _train_script import build_trainer

from trl_ltc.compute import COMPUTE_FILE, COMPUTE_METRICS, ComputeCallback

NAMES = COMPUTE_METRICS


def _params(model) -> int:
    """Parameters a token's forward multiplies, counted by name: the tiny models have an untied head, so everything
    but the input embedding matrix."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)


def _record_batches(trainer) -> list[dict]:
    """Each generation batch's prompt and completion token counts, as the trainer built it."""
    batches = []
    generate = trainer._generate_and_score_completions

    def recorded(inputs):
        output = generate(inputs)
        prompt, completion = int(output["prompt_mask"].sum()), int(output["completion_mask"].sum())
        batches.append({"step": trainer.state.global_step + 1, "prompt": prompt, "completion": completion})
        return output

    trainer._generate_and_score_completions = recorded
    return batches


def _compute_logs(trainer) -> dict[int, dict]:
    return {
        log["step"]: {name: log[name] for name in NAMES}
        for log in trainer.state.log_history
        if "loss" in log and "compute/flops" in log
    }


def _expected(batches, up_to_step: int, student: int, teacher: int, policy: str) -> dict:
    """Hand count: generation (student no-grad over prompt + completion), the loss's teacher forward and student
    training forward, and for `random_release` one more no-grad scoring pass of both models."""
    done = [b for b in batches if b["step"] <= up_to_step]
    completion = sum(b["completion"] for b in done)
    sequence = sum(b["prompt"] + b["completion"] for b in done)
    passes = 2 if policy == "random_release" else 1  # teacher scoring passes over each batch
    student_no_grad = sequence * (2 if policy == "random_release" else 1)  # generation (+ the scoring pass)
    return {
        "compute/generated_tokens": completion,
        "compute/teacher_tokens": passes * completion,
        "compute/trained_tokens": completion,
        "compute/flops": 2 * student * student_no_grad + 2 * teacher * passes * sequence + 6 * student * sequence,
    }


@pytest.mark.parametrize("policy", ["random_release", "full"])
def test_counters_match_hand_counts_and_are_cumulative(tmp_path, policy):
    trainer = build_trainer(str(tmp_path), max_steps=2, save_strategy="no", supervision=policy)
    batches = _record_batches(trainer)
    trainer.train()
    student, teacher = _params(trainer.model), _params(trainer.teacher_model)
    logs = _compute_logs(trainer)
    assert sorted(logs) == [1, 2] and {b["step"] for b in batches} == {1, 2}
    for step in (1, 2):
        assert logs[step] == pytest.approx(_expected(batches, step, student, teacher, policy), rel=0, abs=0.5), step
    assert logs[2]["compute/generated_tokens"] > logs[1]["compute/generated_tokens"] > 0  # cumulative
    # The same totals as the trainer's rollout metric (generated tokens per step, summed).
    generated = [log["rollout/generated_tokens"] for log in trainer.state.log_history if "loss" in log]
    assert logs[2]["compute/generated_tokens"] == pytest.approx(sum(generated))


def test_lora_training_costs_four_times_the_base_plus_the_adapters(tmp_path):
    from peft import LoraConfig

    from trl_ltc.compute import forward_parameters, training_flops_per_token

    trainer = build_trainer(str(tmp_path), max_steps=1, save_strategy="no", supervision="full")
    base = _params(trainer.model)
    assert forward_parameters(trainer.model) == (base, base)
    assert training_flops_per_token(base, base) == 6 * base
    from peft import get_peft_model

    lora = get_peft_model(trainer.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() for name, p in lora.named_parameters() if "lora_" in name)
    assert forward_parameters(lora) == (base + adapters, adapters)
    assert training_flops_per_token(*forward_parameters(lora)) == 4 * (base + adapters) + 2 * adapters


def test_resume_continues_the_same_totals(tmp_path):
    uninterrupted = build_trainer(str(tmp_path / "a"), max_steps=3)
    uninterrupted.train()
    expected = _compute_logs(uninterrupted)

    first = build_trainer(str(tmp_path / "b"), max_steps=2)
    first.train()
    stored = json.loads((tmp_path / "b" / "checkpoint-2" / COMPUTE_FILE).read_text())
    assert {name: stored[name] for name in NAMES} == pytest.approx(_compute_logs(first)[2], abs=0.5)
    assert _compute_logs(first) == {s: expected[s] for s in (1, 2)}  # the same run so far

    resumed = build_trainer(str(tmp_path / "b"), max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert _compute_logs(resumed)[3] == expected[3]
    # A fresh train() without resume starts from zero again.
    again = build_trainer(str(tmp_path / "c"), max_steps=1, save_strategy="no")
    again.train()
    assert _compute_logs(again)[1] == expected[1]


def test_max_flops_stops_the_run_at_the_first_step_that_reaches_it(tmp_path):
    reference = build_trainer(str(tmp_path / "ref"), max_steps=4, save_strategy="no")
    reference.train()
    flops = [log["compute/flops"] for _, log in sorted(_compute_logs(reference).items())]
    budget = (flops[1] + flops[2]) / 2  # reached during step 3
    budgeted = build_trainer(str(tmp_path / "budget"), max_steps=4, save_strategy="no", max_flops=budget)
    budgeted.train()
    assert budgeted.state.global_step == 3
    logs = _compute_logs(budgeted)
    assert logs[3]["compute/flops"] == flops[2] >= budget > logs[2]["compute/flops"]
    exact = build_trainer(str(tmp_path / "exact"), max_steps=4, save_strategy="no", max_flops=flops[1])
    exact.train()
    assert exact.state.global_step == 2  # reaching the budget exactly stops too


@pytest.mark.parametrize("value", [0, -1.0, "1e12", True])
def test_bad_max_flops_names_the_field(value):
    with pytest.raises(ValueError, match="max_flops"):
        ComputeCallback.__init__(ComputeCallback.__new__(ComputeCallback), _FakeTrainer(), value)


class _FakeTrainer:
    model = teacher_model = None


@pytest.mark.parametrize("loss_type", ["advantage", "parent"])
def test_online_truncation_generates_no_more_than_offline_release(tmp_path, loss_type):
    """Greedy rollouts: the online blocks generate prefixes of the offline completions (the same first step)."""
    common = {
        "max_steps": 1, "save_strategy": "no", "supervision": "release", "max_completion_length": 16,
        "generation_kwargs": {"do_sample": False}, "segmentation": "fixed", "segment_window": 2, "loss_type": loss_type,
    }  # fmt: skip
    offline = build_trainer(str(tmp_path / "offline"), **common)
    offline.train()
    online = build_trainer(
        str(tmp_path / "online"), rollout_truncation="online", online_min_segments=2, online_patience=1,
        online_check_tokens=2, **common,
    )  # fmt: skip
    rollouts = []
    generate = online._generate_online
    online._generate_online = lambda prompt_ids: rollouts.append(generate(prompt_ids)) or rollouts[-1]
    online.train()
    off, on = _compute_logs(offline)[1], _compute_logs(online)[1]
    assert on["compute/generated_tokens"] <= off["compute/generated_tokens"]
    assert on["compute/generated_tokens"] == sum(len(ids) for r in rollouts for ids in r.generated_ids)
    assert on["compute/trained_tokens"] == sum(len(ids) for r in rollouts for ids in r.completion_ids)
    if loss_type == "advantage":  # the teacher scores each generated token once while generating, not again
        assert on["compute/teacher_tokens"] == on["compute/generated_tokens"]
        if any(r.stopped.any() for r in rollouts):
            assert on["compute/flops"] < off["compute/flops"]
    else:  # the parent's divergence needs the teacher's distribution: a second forward over the kept completions
        assert on["compute/teacher_tokens"] == on["compute/generated_tokens"] + on["compute/trained_tokens"]


def test_counting_skips_evaluation_and_counts_online_blocks():
    """The rollout tally: offline from the masks, online from the rollout's own block counts."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(model=SimpleNamespace(training=True))
    counter = ComputeCallback.__new__(ComputeCallback)
    counter.trainer, counter.local = trainer, dict.fromkeys(
        ("generated_tokens", "teacher_tokens", "trained_tokens", "student_forward_tokens", "teacher_forward_tokens",
         "trained_forward_tokens"), 0)  # fmt: skip
    batch = {"prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]), "completion_mask": torch.tensor([[1, 1, 0]] * 2)}
    counter.rollout(batch)
    assert counter.local["generated_tokens"] == 4 and counter.local["student_forward_tokens"] == 9
    rollout = SimpleNamespace(generated_ids=[[1, 2, 3], [4]], teacher_positions=7, teacher_forward_tokens=12)
    counter.rollout(batch, rollout)
    assert counter.local["generated_tokens"] == 8 and counter.local["teacher_tokens"] == 7
    assert counter.local["teacher_forward_tokens"] == 12 and counter.local["student_forward_tokens"] == 9 + 9
    trainer.model.training = False
    counter.rollout(batch)
    counter.forward(True, torch.ones(2, 5), 2)
    assert counter.local["generated_tokens"] == 8 and counter.local["teacher_tokens"] == 7


@pytest.mark.parametrize("online", [False, True])
def test_a_served_teacher_counts_the_positions_it_was_sent(tmp_path, tokenizer, online):
    """Offline, the server scores each batch once: the same counters as a local teacher's loss forward (flops once its
    parameter count is given). Online, a server has no cache: every block sends the completion so far again."""
    from helpers import make_model
    from test_teacher_server import FakeServer, V, _config, _prompts

    from trl_ltc import TeachabilityGKDTrainer
    from trl_ltc.served_teacher import ServedTeacherBlocks, _unpadded

    teacher = make_model(V, seed=2).eval()
    server = FakeServer(teacher)
    extra = {"rollout_truncation": "online", "online_check_tokens": 4, "online_min_segments": 1,
             "online_patience": 1, "max_completion_length": 16} if online else {}  # fmt: skip
    sent = []
    score_block = ServedTeacherBlocks.score_block

    def recorded(self, ids, mask, new, valid, support):
        sent.append(sum(map(len, _unpadded(ids[:, self.width :], mask[:, self.width :]))))
        return score_block(self, ids, mask, new, valid, support)

    logs = {}
    try:
        for name in ("local", "served"):
            served = name == "served"
            config = _config(tmp_path / name, supervision="release", teacher_server_url=server.url if served else None,
                             teacher_server_top_logprobs=V, **extra)  # fmt: skip
            trainer = TeachabilityGKDTrainer(model=make_model(V, seed=1), teacher_model=None if served else teacher,
                                             args=config, train_dataset=_prompts(), processing_class=tokenizer)  # fmt: skip
            if served:
                trainer.compute.set_teacher_params(_params(teacher))
                ServedTeacherBlocks.score_block = recorded
            try:
                trainer.train()
            finally:
                ServedTeacherBlocks.score_block = score_block
            logs[name] = _compute_logs(trainer)[2]
    finally:
        server.close()
    local, served = logs["local"], logs["served"]
    assert served["compute/generated_tokens"] == local["compute/generated_tokens"]
    assert served["compute/trained_tokens"] == local["compute/trained_tokens"]
    if online:
        assert served["compute/teacher_tokens"] == sum(sent) > local["compute/teacher_tokens"]
        assert local["compute/teacher_tokens"] == local["compute/generated_tokens"]
    else:
        assert not sent
        assert served["compute/teacher_tokens"] == local["compute/teacher_tokens"]
        assert served["compute/flops"] == pytest.approx(local["compute/flops"])
