"""`trl_ltc.evaluation`: the chunked reverse KL equals a naive full-logits float64 computation."""

import pytest
import torch
from helpers import make_model, padded_copy
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import pad

from trl_ltc.evaluation import heldout_reverse_kl, reverse_kl
from trl_ltc.generation import Rollouts, tokenize_prompts

# fp32 chunks against a float64 reference: relative 1e-5, or 1e-6 nats where the KL itself is tiny.
TOL = {"rel": 1e-5, "abs": 1e-6}
PROMPTS = [
    [{"role": "user", "content": "Tom has 12 apples and gives away 5. How many are left?"}],
    [{"role": "user", "content": "Let x = 3."}],
    [{"role": "user", "content": "First, add the numbers. Then divide by two."}],
]


def _rollouts(tokenizer, lengths=(5, 2, 7), seed=0) -> Rollouts:
    """Left-padded prompts of different lengths and right-padded random completions of `lengths` tokens."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.tensor(ids) for ids in tokenize_prompts(tokenizer, PROMPTS)]
    completions = [torch.randint(len(tokenizer), (n,), generator=generator) for n in lengths]
    ones = lambda rows: [torch.ones_like(row) for row in rows]
    return Rollouts(
        pad(prompts, padding_value=tokenizer.pad_token_id, padding_side="left"),
        pad(ones(prompts), padding_value=0, padding_side="left"),
        pad(completions, padding_value=tokenizer.pad_token_id, padding_side="right"),
        pad(ones(completions), padding_value=0, padding_side="right"),
    )


def _naive_reverse_kl(student, teacher, rollouts: Rollouts, temperature=1.0) -> float:
    """Full `(B, L, V)` logits of both models in float64, KL(pS || pT) averaged over the completion tokens."""
    with torch.no_grad():
        logits = [
            model(input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask).logits[:, :-1].double()
            for model in (student, teacher)
        ]
    logp_s, logp_t = (torch.log_softmax(z / temperature, dim=-1) for z in logits)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    mask = rollouts.full_completion_mask[:, 1:].bool()
    return float(kl[mask].mean())


@pytest.fixture(scope="module")
def models(tokenizer):
    vocab = len(tokenizer)
    return make_model(vocab, seed=1), make_model(vocab, seed=2)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 5, 1000])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_reverse_kl_matches_naive(tokenizer, models, chunk_size, batch_size):
    student, teacher = models
    rollouts = _rollouts(tokenizer)  # 14 completion tokens: 3 and 5 do not divide them, nor 2 the 3 rows
    expected = _naive_reverse_kl(student, teacher, rollouts)
    actual = reverse_kl(student, teacher, rollouts, chunk_size=chunk_size, batch_size=batch_size)
    assert expected > 0.01
    assert actual == pytest.approx(expected, **TOL)


def test_reverse_kl_temperature(tokenizer, models):
    student, teacher = models
    rollouts = _rollouts(tokenizer)
    expected = _naive_reverse_kl(student, teacher, rollouts, temperature=2.0)
    assert reverse_kl(student, teacher, rollouts, chunk_size=4, temperature=2.0) == pytest.approx(expected, **TOL)


def test_reverse_kl_peft_student(tokenizer, models):
    base, teacher = models
    # Non-zero LoRA weights (`init_lora_weights=False`) so that the adapter changes the student's distribution.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    student = get_peft_model(make_model(len(tokenizer), seed=1), config)
    rollouts = _rollouts(tokenizer)
    expected = _naive_reverse_kl(student, teacher, rollouts)
    assert expected != pytest.approx(_naive_reverse_kl(base, teacher, rollouts), rel=1e-3)
    assert reverse_kl(student, teacher, rollouts, chunk_size=3) == pytest.approx(expected, **TOL)
    # The other way round: a PEFT model as the teacher.
    assert reverse_kl(teacher, student, rollouts, chunk_size=3) == pytest.approx(
        _naive_reverse_kl(teacher, student, rollouts), **TOL
    )


def test_reverse_kl_of_a_model_with_itself_is_zero(tokenizer, models):
    student, _ = models
    assert reverse_kl(student, student, _rollouts(tokenizer), chunk_size=3) == pytest.approx(0.0, abs=1e-6)


def test_reverse_kl_restores_modes_and_checks_vocabularies(tokenizer, models):
    student, teacher = models
    student.train()
    try:
        reverse_kl(student, teacher, _rollouts(tokenizer))
        assert student.training and not teacher.training
    finally:
        student.eval()
    with pytest.raises(ValueError, match=r"token id \d+, but the two output heads share only ids below 300"):
        reverse_kl(student, make_model(300), _rollouts(tokenizer))  # a teacher smaller than the tokenizer
    with pytest.raises(ValueError, match="no completion tokens"):
        reverse_kl(student, teacher, _rollouts(tokenizer, lengths=(0, 0, 0)))


def test_heldout_reverse_kl_is_seeded_and_leaves_the_rng_alone(tokenizer, models):
    student, teacher = models
    kwargs = {"max_new_tokens": 6, "batch_size": 2, "seed": 3, "progress": False}
    torch.manual_seed(123)
    first = heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, **kwargs)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = heldout_reverse_kl(student, teacher, tokenizer, PROMPTS, **kwargs)
    assert first == second and first > 0
    assert torch.equal(torch.rand(1), after_first)  # the global RNG was restored
    assert heldout_reverse_kl(student, student, tokenizer, PROMPTS, **kwargs) == pytest.approx(0.0, abs=1e-6)


def test_padded_heads_give_the_kl_of_the_shared_vocabulary(tokenizer, models):
    """One tokenizer, heads padded to different sizes: the KL over the shared ids, as for the unpadded pair; a padded
    student's padded rows are never sampled."""
    student, teacher = models
    V, rollouts = len(tokenizer), _rollouts(tokenizer)
    expected = reverse_kl(student, teacher, rollouts, chunk_size=3)
    assert reverse_kl(student, padded_copy(teacher), rollouts, chunk_size=3) == expected
    padded = padded_copy(student)
    assert reverse_kl(padded, teacher, rollouts, chunk_size=3) == expected
    with torch.no_grad():
        padded.lm_head.weight[V:] = 4 * padded.lm_head.weight[:16]  # padded rows that would often be sampled
    kwargs = {"max_new_tokens": 12, "batch_size": 3, "seed": 3, "progress": False}
    assert heldout_reverse_kl(padded, teacher, tokenizer, PROMPTS * 4, **kwargs) > 0
