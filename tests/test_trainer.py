"""`TeachabilityGKDTrainer` end to end on tiny random models (CPU)."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import make_model, make_tokenizer, padded_copy

from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer
from trl_ltc.config import SUPERVISIONS
from trl_ltc.segmentation import segment_completions
from trl_ltc.release import NULL_SEED_OFFSET
from trl_ltc.signals import SignalsError, token_signals
from trl_ltc.supervision import kept_fractions, supervision_weights
from trl_ltc.trainer import global_permutation

METRICS = (
    "release/accepted_frac",
    "release/accepted_frac_null",
    "release/kept_token_frac",
    "release/release_position",
    "release/bic_gain",
    "release/num_segments",
    "margin/prefix_mean",
    "margin/suffix_mean",
    "advantage/mean",
    "advantage/std",
    "rollout/generated_tokens",
)
TEACHABILITY_METRICS = (
    "teachability/kept_token_frac",
    "teachability/compatibility_mean",
    "teachability/disagreement_mean",
    "teachability/kept_compatibility_mean",
    "teachability/kept_position",
)


def _prompts(n=8):
    return Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": f"Tom has {i} apples. How many are left?"}] for i in range(n)]}
    )


def _config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_completion_length=16,
        report_to="none",
        logging_steps=1,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        save_strategy="no",
        segmentation="fixed",
        segment_window=3,
        fixed_prefix_length=5,
        release_diagnostics_steps=0,
    )
    kwargs.update(overrides)
    return TeachabilityGKDConfig(**kwargs)


def _trainer(tmp_path, tokenizer, student=None, teacher=None, teacher_processing_class=None, **overrides):
    vocab = len(tokenizer)
    return TeachabilityGKDTrainer(
        model=student if student is not None else make_model(vocab, seed=1),
        teacher_model=teacher if teacher is not None else make_model(vocab, seed=2),
        args=_config(tmp_path, **overrides),
        train_dataset=_prompts(),
        processing_class=tokenizer,
        teacher_processing_class=teacher_processing_class,
    )


@pytest.mark.parametrize("policy", SUPERVISIONS)
def test_every_policy_trains_two_steps(tmp_path, tokenizer, policy):
    trainer = _trainer(tmp_path, tokenizer, supervision=policy, token_keep_ratio=0.3)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2
    for log in logs:
        assert math.isfinite(log["loss"])
        for name in METRICS + (TEACHABILITY_METRICS if policy == "token_teachability" else ()):
            assert name in log, name
            if name == "margin/suffix_mean" and log["release/kept_token_frac"] == 1:
                assert log[name] is None  # nothing released: no mean to report
            else:
                assert math.isfinite(log[name]), name
        assert 0 < log["release/kept_token_frac"] <= 1
    if policy == "full":
        assert all(log["release/kept_token_frac"] == 1 for log in logs)


@pytest.mark.parametrize("policy", ["release", "token_teachability"])
def test_release_diagnostics_are_written_during_training(tmp_path, tokenizer, policy):
    trainer = _trainer(tmp_path, tokenizer, release_diagnostics_steps=1, supervision=policy, token_keep_ratio=0.2)
    trainer.train()
    for name in ("release.png", "margin_curve.png", "release_records.jsonl"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = trainer.release_diagnostics.records
    # only the last step is kept: its two micro-batches of two trajectories
    assert len(records) == 4 and {r["step"] for r in records} == {1}
    if policy == "token_teachability":  # the records mark TA-OPD's tokens: the ones this policy trains on
        assert (tmp_path / "teachability.png").stat().st_size > 0
        assert all(sum(r["teachability_kept"]) == r["kept_tokens"] > 0 for r in records)
    else:
        assert not (tmp_path / "teachability.png").exists() and "teachability_kept" not in records[0]


def test_release_diagnostics_are_capped_and_logged_to_the_image_trackers(tmp_path, tokenizer):
    from test_diagnostics import _fake_trackers

    tensorboard, _ = _fake_trackers()
    writer = tensorboard.tb_writer
    trainer = _trainer(
        tmp_path, tokenizer, release_diagnostics_steps=2, release_diagnostics_max_records=3, save_strategy="steps",
        save_steps=1,
    )  # fmt: skip
    # Where `report_to="tensorboard"` puts it (before the trainer's own callbacks), with a recording writer: it
    # closes its writer at the end of training before the diagnostics would log the final plots again.
    trainer.callback_handler.callbacks.insert(1, tensorboard)
    trainer.train()
    assert [r["step"] for r in trainer.release_diagnostics.records] == [1, 1, 1]  # 8 trajectories made, 3 kept
    lines = (tmp_path / "release_records.jsonl").read_text().splitlines()
    assert len(lines) == 3
    images = [(args[0], args[2]) for name, args, _ in writer.calls if name == "add_image"]
    assert images == [(f"release_diagnostics/{name}", step) for step in (1, 2) for name in ("release", "margin_curve")]


def _fixed_batch(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    V, pad = len(tokenizer), tokenizer.pad_token_id
    prompt_ids = torch.randint(3, V, (4, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_ids[1, :2], prompt_mask[1, :2] = pad, 0
    completion_ids = torch.randint(3, V, (4, 12), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    for b, length in enumerate((12, 7, 10, 0)):  # ragged, and one empty completion
        completion_ids[b, length:], completion_mask[b, length:] = pad, 0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }


def _naive_logprobs(model, inputs, temperature=1.0):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, P - 1 : -1].double() / temperature
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)


@pytest.mark.parametrize("policy", SUPERVISIONS)
def test_loss_gradient_is_the_weighted_advantage_gradient(tmp_path, tokenizer, policy):
    trainer = _trainer(tmp_path, tokenizer, supervision=policy, token_keep_ratio=0.3, temperature=0.9)
    model = trainer.model.train()
    inputs = _fixed_batch(tokenizer)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = trainer.last_supervision.weights.double()
    model.zero_grad()

    mask = inputs["completion_mask"].double()
    student_lp = _naive_logprobs(model, inputs, 0.9)
    with torch.no_grad():
        teacher_lp = _naive_logprobs(trainer.teacher_model, inputs, 0.9)
    advantage = (teacher_lp - student_lp).detach()
    naive = -(weights * advantage * student_lp * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.double(), naive, atol=1e-5, rtol=1e-4)
    naive.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(got[name].double(), param.grad.double(), atol=1e-6, rtol=1e-4, msg=name)
    if policy == "full":
        # The score-function gradient of the per-token reverse-KL estimator sum(log pS - log pT) / N.
        model.zero_grad()
        student_lp = _naive_logprobs(model, inputs, 0.9)
        ((student_lp - teacher_lp).detach() * student_lp * mask).sum().div(mask.sum()).backward()
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name].double(), param.grad.double(), atol=1e-6, rtol=1e-4, msg=name)
    assert (weights[inputs["completion_mask"] == 0] == 0).all()


def test_parent_loss_type_weights_the_parent_divergence(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, supervision="fixed_prefix", loss_type="parent", beta=1.0)
    model = trainer.model.train()
    inputs = _fixed_batch(tokenizer, seed=1)
    loss = trainer.compute_loss(model, inputs)
    weights = trainer.last_supervision.weights.double()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    P = inputs["prompt_ids"].shape[1]
    with torch.no_grad():
        s = model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1].double().log_softmax(-1)
        t = trainer.teacher_model(input_ids=ids, attention_mask=attn).logits[:, P - 1 : -1].double().log_softmax(-1)
    reverse_kl = (s.exp() * (s - t)).sum(-1)
    mask = inputs["completion_mask"].double()
    torch.testing.assert_close(loss.double(), (weights * reverse_kl * mask).sum() / mask.sum(), atol=1e-5, rtol=1e-4)


def _fixed_completions(trainer):
    """Make generation deterministic: each prompt gets a completion derived from its own token ids."""

    def generate(prompt_ids, images, multimodal_fields, has_tool_images=False):
        V = len(trainer.processing_class)
        return [[(7 * sum(ids) + 13 * i) % (V - 3) + 3 for i in range(3 + sum(ids) % 9)] for ids in prompt_ids]

    trainer._generate_single_turn = generate


def test_gradient_accumulation_equivalence(tmp_path, tokenizer):
    V = len(tokenizer)
    student, teacher = make_model(V, seed=1), make_model(V, seed=2)
    params = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        trainer = _trainer(
            tmp_path / f"{batch}x{accumulation}",
            tokenizer,
            student=copy.deepcopy(student),
            teacher=teacher,
            supervision="release",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        _fixed_completions(trainer)
        trainer.train()
        params[(batch, accumulation)] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    reference = params[(4, 1)]
    moved = any(not torch.equal(reference[n], p) for n, p in student.named_parameters())
    assert moved
    for key in ((2, 2), (1, 4)):
        for name, value in params[key].items():
            torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-5, msg=f"{key} {name}")


def test_lora_trains_only_adapters(tmp_path, tokenizer):
    from peft import LoraConfig

    V = len(tokenizer)
    base = make_model(V, seed=1)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer = TeachabilityGKDTrainer(
        model=base,
        teacher_model=make_model(V, seed=1),  # the base model itself as the teacher
        args=_config(tmp_path, supervision="release", learning_rate=1e-2),
        train_dataset=_prompts(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    lora_moved = False
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad
            lora_moved |= bool((param.detach() != 0).any()) and "lora_B" in name
        else:
            assert not param.requires_grad
            base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(param.detach(), before[base_name], msg=name)
    assert lora_moved


def test_random_release_is_reproducible(tmp_path, tokenizer):
    runs = []
    for run in range(2):
        trainer = _trainer(tmp_path / str(run), tokenizer, supervision="random_release", release_seed=123)
        model = trainer.model.train()
        trainer.compute_loss(model, _fixed_batch(tokenizer, seed=2))
        runs.append(trainer.last_supervision.weights)
    torch.testing.assert_close(runs[0], runs[1])


def test_random_release_permutes_across_the_micro_batches_of_a_step(tmp_path, tokenizer):
    """Batch 1 x 4 accumulation steps: the 4 trajectories of a step swap release fractions across micro-batches."""
    seed, V = 5, len(tokenizer)
    trainer = _trainer(
        tmp_path, tokenizer, supervision="random_release", loss_type="advantage", release_seed=seed,
        per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=1, segment_window=2,
    )  # fmt: skip
    _fixed_completions(trainer)
    generated, micro_batches = [], []
    generate, compute_loss = trainer._generate_and_score_completions, trainer.compute_loss

    def recording_generate(inputs):
        generated.append(generate(inputs))
        return generated[-1]

    def recording_compute_loss(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        micro_batches.append((inputs, trainer.last_supervision.weights))
        return loss

    trainer._generate_and_score_completions, trainer.compute_loss = recording_generate, recording_compute_loss
    trainer.train()
    (batch,) = generated
    assert len(micro_batches) == 4 and batch["completion_ids"].shape[0] == 4

    # The rule's fractions, computed here from the generation batch with the models as they were before the step.
    completion_mask = batch["completion_mask"]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], completion_mask], 1)
    signal_mask = torch.cat([torch.zeros_like(batch["prompt_mask"]), completion_mask], 1)
    with torch.no_grad():
        signals = token_signals(
            make_model(V, seed=1), make_model(V, seed=2), ids, attention_mask, signal_mask,
            top_k=trainer.args.release_top_k, temperature=trainer.args.temperature,
        )  # fmt: skip
    segment_ids = segment_completions(batch["completion_ids"], completion_mask, tokenizer, "fixed", 2)
    margins = signals.margins[:, batch["prompt_ids"].shape[1] :]
    rule = supervision_weights("release", completion_mask, segment_ids=segment_ids, margins=margins)
    fractions, eligible = kept_fractions(rule.weights, completion_mask, segment_ids)
    assert eligible.all() and len(set(fractions.tolist())) > 1  # distinct fractions: the permutation is visible

    applied = batch["random_release_fraction"]
    expected = fractions[torch.randperm(4, generator=torch.Generator().manual_seed(seed))]
    torch.testing.assert_close(applied, expected)
    assert sorted(applied.tolist()) == pytest.approx(sorted(fractions.tolist()))
    assert not torch.allclose(applied, fractions)  # rows received other micro-batches' fractions

    # Each micro-batch (one trajectory, after the parent's shuffle: matched by completion ids) keeps
    # ceil(fraction * its own length) tokens, mass preserved.
    rows = [tuple(row.tolist()) for row in batch["completion_ids"]]
    seen = []
    for inputs, weights in micro_batches:
        b = rows.index(tuple(inputs["completion_ids"][0].tolist()))
        seen.append(b)
        length = int(completion_mask[b].sum())
        assert inputs["random_release_fraction"].tolist() == [applied[b].item()]
        assert int((weights[0] > 0).sum()) == math.ceil(expected[b].item() * length - 1e-6)
        assert weights[0].sum().item() == pytest.approx(length)
    assert sorted(seen) == [0, 1, 2, 3]


def test_random_release_permutation_is_seeded(tmp_path, tokenizer):
    fractions = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    eligible = torch.ones(10, dtype=torch.bool)
    draws = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        trainer = _trainer(tmp_path / name, tokenizer, supervision="random_release", release_seed=seed)
        draws[name] = [global_permutation(trainer.accelerator, fractions, eligible, trainer.permutation_generator)]
        draws[name].append(global_permutation(trainer.accelerator, fractions, eligible, trainer.permutation_generator))
    for first, second in zip(draws["a"], draws["b"]):
        assert torch.equal(first, second)
    assert not torch.equal(draws["a"][0], draws["c"][0]) and not torch.equal(draws["a"][0], draws["a"][1])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5))  # seeded by `release_seed` alone
    assert torch.equal(draws["a"][0], fractions[order])


def test_release_generators_are_checkpointed(tmp_path, tokenizer, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, supervision="random_release")
    generators = (trainer.release_generator, trainer.permutation_generator, trainer.null_generator)
    for generator in generators:
        torch.randperm(5, generator=generator)
    saved = [generator.get_state() for generator in generators]
    trainer._save_rng_state(str(tmp_path))
    for generator in generators:
        torch.randperm(5, generator=generator)
        assert not any(torch.equal(generator.get_state(), state) for state in saved)
    trainer._load_rng_state(str(tmp_path))
    for generator, state in zip(generators, saved):
        assert torch.equal(generator.get_state(), state)

    # A process without a file of its own (a resume on more processes) still restores process 0's permutation state.
    for generator in generators:
        torch.randperm(5, generator=generator)
    drawn = trainer.release_generator.get_state()
    monkeypatch.setattr(TeachabilityGKDConfig, "process_index", property(lambda self: 1))
    trainer._load_rng_state(str(tmp_path))
    assert torch.equal(trainer.permutation_generator.get_state(), saved[1])
    assert torch.equal(trainer.release_generator.get_state(), drawn)  # per-process: left as it was

    # Checkpoints of older versions hold the release generator's state alone, or no null generator state.
    monkeypatch.undo()
    torch.save({"release": saved[0], "permutation": saved[1]}, tmp_path / "release_rng_state_0.pth")
    torch.randperm(5, generator=trainer.null_generator)
    null_state = trainer.null_generator.get_state()
    trainer._load_rng_state(str(tmp_path))
    assert torch.equal(trainer.permutation_generator.get_state(), saved[1])
    assert torch.equal(trainer.null_generator.get_state(), null_state)  # left as it was
    torch.save(saved[0], tmp_path / "release_rng_state_0.pth")
    torch.randperm(5, generator=trainer.release_generator)
    trainer._load_rng_state(str(tmp_path))
    assert torch.equal(trainer.release_generator.get_state(), saved[0])


def test_null_metric_does_not_disturb_the_release_draws(tmp_path, tokenizer, monkeypatch):
    """`release/accepted_frac_null` draws from its own generator: the weights and their draws are those of a run
    without it."""
    import trl_ltc.trainer as trainer_module

    runs = {}
    for name in ("with", "without"):
        if name == "without":  # the stats as they were before the null metric
            stats = trainer_module.supervision_stats
            monkeypatch.setattr(
                trainer_module, "supervision_stats", lambda *a, null_generator=None, **k: stats(*a, **k)
            )
        trainer = _trainer(tmp_path / name, tokenizer, supervision="random_release", max_steps=1, release_seed=3)
        trainer.train()
        runs[name] = trainer
    with_null, without = runs["with"], runs["without"]
    for attribute in ("release_generator", "permutation_generator"):
        assert torch.equal(getattr(with_null, attribute).get_state(), getattr(without, attribute).get_state())
    fresh = torch.Generator().manual_seed(3 + NULL_SEED_OFFSET)
    assert not torch.equal(with_null.null_generator.get_state(), fresh.get_state())  # it was drawn from
    assert torch.equal(without.null_generator.get_state(), fresh.get_state())
    logs = [next(log for log in t.state.log_history if "loss" in log) for t in (with_null, without)]
    assert "release/accepted_frac_null" in logs[0] and "release/accepted_frac_null" not in logs[1]
    for key in ("loss", "release/kept_token_frac", "release/release_position", "release/accepted_frac"):
        assert logs[0][key] == logs[1][key], key
    assert 0 <= logs[0]["release/accepted_frac_null"] <= 1
    for a, b in zip(with_null.model.parameters(), without.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("score", ["teachability", "tip", "entropy", "divergence", "random"])
def test_token_teachability_scores_train(tmp_path, tokenizer, score):
    trainer = _trainer(tmp_path, tokenizer, supervision="token_teachability", token_score=score, token_keep_ratio=0.2)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    for log in logs:
        # ceil(0.2 N) kept out of N, plus at least one per trajectory
        assert 0.2 <= log["teachability/kept_token_frac"] <= 0.5
        assert log["teachability/kept_token_frac"] == log["release/kept_token_frac"]


def test_full_supervision_with_the_parent_loss_is_trl_distillation_trainer(tmp_path, tokenizer):
    """Same samples, losses and gradients as `trl.DistillationTrainer`, over three epochs (one step each): the
    epoch-indexed sampler keeps the parent's prompt order."""
    from trl import DistillationConfig, DistillationTrainer

    V = len(tokenizer)
    config = _config(tmp_path / "ours", supervision="full", loss_type="parent", max_steps=3, learning_rate=1e-2)
    shared = (
        "max_steps per_device_train_batch_size gradient_accumulation_steps max_completion_length report_to "
        "logging_steps bf16 use_cpu gradient_checkpointing learning_rate save_strategy"
    ).split()
    parent_config = DistillationConfig(str(tmp_path / "parent"), **{name: getattr(config, name) for name in shared})
    logs = []
    for trainer_class, args in ((DistillationTrainer, parent_config), (TeachabilityGKDTrainer, config)):
        trainer = trainer_class(
            model=make_model(V, seed=1), teacher_model=make_model(V, seed=2), args=args, train_dataset=_prompts(4),
            processing_class=tokenizer,
        )  # fmt: skip
        trainer.train()
        logs.append([log for log in trainer.state.log_history if "loss" in log])
    parent, ours = logs
    assert len(parent) == len(ours) == 3 and [log["epoch"] for log in ours] == [1, 2, 3]
    for p, o in zip(parent, ours):
        exact = [name for name in p if name.startswith("completions/")] + ["loss", "grad_norm", "num_tokens"]
        assert {n: o[n] for n in exact} == {n: p[n] for n in exact}
        assert o["entropy"] == pytest.approx(p["entropy"], rel=1e-6)  # ours comes from the signals pass


PADDED_CASES = [(policy, {}) for policy in SUPERVISIONS] + [
    ("release", {"loss_type": "parent"}),
    ("release", {"rollout_truncation": "online", "online_check_tokens": 4}),
]


@pytest.mark.parametrize("policy, overrides", PADDED_CASES)
def test_a_padded_teacher_trains_exactly_like_the_unpadded_one(tmp_path, tokenizer, policy, overrides):
    """One tokenizer, the teacher's embeddings and head padded with 16 rows: the same samples, signals, losses,
    gradients and metrics as with the unpadded teacher (both distributions over the 400 shared ids)."""
    V = len(tokenizer)
    teacher = make_model(V, seed=2)
    padded = padded_copy(teacher)
    logs = {}
    for name, model in (("plain", teacher), ("padded", padded)):
        trainer = _trainer(
            tmp_path / name, tokenizer, teacher=model, supervision=policy, token_keep_ratio=0.3,
            teacher_processing_class=tokenizer, **overrides,
        )  # fmt: skip
        assert trainer.vocab_size == V
        trainer.train()
        # the padded teacher's extra rows are parameters, so only the flops estimate may differ
        logs[name] = [{k: v for k, v in log.items() if "time" not in k and k != "compute/flops"}
                      for log in trainer.state.log_history[:-1]]  # fmt: skip
    assert padded.config.vocab_size == V + 16  # the parent was shown the student's size only while it was built
    assert len(logs["padded"]) == 2 and logs["padded"] == logs["plain"]


def test_a_padded_student_never_samples_its_padded_rows(tmp_path, tokenizer):
    V = len(tokenizer)
    student = padded_copy(make_model(V, seed=1))
    with torch.no_grad():
        student.lm_head.weight[V:] = 4 * student.lm_head.weight[:16]  # padded rows that would often be sampled
    trainer = _trainer(tmp_path, tokenizer, student=student, supervision="token_teachability", token_keep_ratio=0.3)
    generate, sampled = trainer._generate_single_turn, []

    def recording(*args, **kwargs):
        completions = generate(*args, **kwargs)
        sampled.extend(token for row in completions for token in row)
        return completions

    trainer._generate_single_turn = recording
    trainer.train()
    assert len(sampled) > 50 and max(sampled) < V
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def _padded_tokenizer(tokenizer, extra):
    other = copy.deepcopy(tokenizer)
    other.add_tokens([f"<extra_{i}>" for i in range(extra)])
    return other


def test_vocabulary_guards(tmp_path, tokenizer):
    V = len(tokenizer)
    # A head smaller than the tokenizer: the ids from V - 8 on have no teacher row.
    smaller = rf"{V} tokens.*vocab_size {V} and the teacher {V - 8}.*teacher's output head is id {V - 8}"
    with pytest.raises(ValueError, match=smaller):
        _trainer(tmp_path, tokenizer, teacher=make_model(V - 8, seed=2))
    larger = rf"{V + 4} tokens.*student has vocab_size {V}.*student's output head is id {V}"
    with pytest.raises(ValueError, match=larger):
        _trainer(tmp_path, _padded_tokenizer(tokenizer, 4), student=make_model(V), teacher=make_model(V + 16))
    # Different tokenizers, even with padded heads: both sizes and the first differing token.
    other = make_tokenizer(vocab_size=V, corpus_seed=1)
    with pytest.raises(ValueError, match=rf"vocab_size {V} .*vocab_size {V + 16} .*first differing token is id \d+: "):
        _trainer(tmp_path, tokenizer, teacher=make_model(V + 16, seed=2), teacher_processing_class=other)
    # The teacher's tokenizer has tokens the student's has not: not the same tokenizer.
    with pytest.raises(ValueError, match=rf"first differing token is id {V}: None \(student\) vs '<extra_0>'"):
        _trainer(tmp_path, tokenizer, teacher=make_model(V + 16, seed=2),
                 teacher_processing_class=_padded_tokenizer(tokenizer, 1))  # fmt: skip


def test_guards(tmp_path, tokenizer):
    V = len(tokenizer)
    other = make_tokenizer(vocab_size=V, corpus_seed=1)
    with pytest.raises(ValueError, match="first differing token is id"):
        TeachabilityGKDTrainer(
            model=make_model(V, seed=1),
            teacher_model=make_model(V, seed=2),
            args=_config(tmp_path),
            train_dataset=_prompts(),
            processing_class=tokenizer,
            teacher_processing_class=other,
        )
    with pytest.raises(ValueError) as missing:
        TeachabilityGKDTrainer(model=make_model(V), args=_config(tmp_path), train_dataset=_prompts(),
                               processing_class=tokenizer)  # fmt: skip
    message = str(missing.value)
    assert "needs `teacher_model`; got None" in message and "model object, or a Hub id or local path" in message
    assert "`teacher_model_init_kwargs`" in message and "`teacher_server_url`" in message
    assert "remote" not in message
    with pytest.raises(ValueError, match="release_top_k"):
        _trainer(tmp_path, tokenizer, release_top_k=V + 1)
    with pytest.raises(TypeError, match="TeachabilityGKDConfig"):
        from trl import DistillationConfig

        TeachabilityGKDTrainer(model=make_model(V), teacher_model=make_model(V), train_dataset=_prompts(),
                               args=DistillationConfig(str(tmp_path), use_cpu=True), processing_class=tokenizer)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"supervision": "prefix"}, "supervision"),
        ({"segmentation": "spacy"}, "segmentation"),
        ({"loss_type": "jsd"}, "loss_type"),
        ({"release_top_k": 1}, "release_top_k"),
        ({"supervision": "fixed_prefix", "fixed_prefix_length": 0}, "fixed_prefix_length"),
        ({"supervision": "fixed_prefix", "fixed_prefix_length": None}, "fixed_prefix_length"),
        ({"segment_window": 0}, "segment_window"),
        ({"token_keep_ratio": 0.0}, "token_keep_ratio"),
        ({"token_score": "loss"}, "token_score"),
        ({"token_top_k": 0}, "token_top_k"),
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(tmp_path, **overrides)


def test_non_finite_teacher_logits_stop_before_the_update(tmp_path, tokenizer):
    V = len(tokenizer)
    teacher = make_model(V, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight[5, 0] = float("nan")
    trainer = _trainer(tmp_path, tokenizer, teacher=teacher)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(SignalsError, match=r"teacher model .* optimizer step 1 \(global_step=0\)"):
        trainer.train()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_the_spec_and_the_model_card_name_the_trainer(tmp_path, tokenizer):
    from trl_ltc.spec import SupervisionSpec

    trainer = _trainer(tmp_path, tokenizer, supervision="random_release", release_seed=7)
    assert trainer.spec == SupervisionSpec.from_config(trainer.args)
    assert trainer.spec.policy == "random_release" and trainer.spec.seed == 7
    assert trainer._name == "TeachabilityGKD" and {"trl", "distillation", "trl-ltc"} <= set(trainer._tag_names)
    trainer.create_model_card(model_name="tiny-student")
    card = (tmp_path / "README.md").read_text()
    assert "This model was trained with TeachabilityGKD, a method introduced in [Prefix Teach, Suffix Fade" in card
    assert "https://huggingface.co/papers/2605.13643" in card and "Cite TeachabilityGKD as" in card
    assert "trained with Distillation" not in card and "trl-ltc" in card
