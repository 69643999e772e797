"""`token_signals` against a naive computation from full logits."""

import pytest
import torch
from helpers import make_model, padded_copy

from trl_ltc.signals import OutputHead, signals_from_hidden, token_signals
from trl_ltc.teachability import teachability_features

VOCAB = 97


def _batch(seed=0, batch=3, length=11, left_pad=(2, 0, 4)):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length, dtype=torch.long)
    for b, pad in enumerate(left_pad):
        attention_mask[b, :pad] = 0
        completion_mask[b, pad + 3 : length - b] = 1  # 3 prompt tokens, ragged completion ends
    return input_ids, attention_mask, completion_mask


def _naive(student, teacher, input_ids, attention_mask, completion_mask, k, temperature):
    """Full `(B, L, V)` logits in float64, straight from the formulas."""
    s = student(input_ids=input_ids, attention_mask=attention_mask).logits.double() / temperature
    with torch.no_grad():
        t = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.double() / temperature
    s_logp, t_logp = s.log_softmax(-1), t.log_softmax(-1)
    B, L = input_ids.shape
    student_lp = torch.zeros(B, L, dtype=torch.float64)
    teacher_lp = torch.zeros(B, L, dtype=torch.float64)
    margins = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        for pos in range(1, L):
            if not completion_mask[b, pos]:
                continue
            y = input_ids[b, pos]
            student_lp[b, pos] = s_logp[b, pos - 1, y]
            teacher_lp[b, pos] = t_logp[b, pos - 1, y]
            support = s[b, pos - 1].argsort(descending=True)[:k]
            best = sorted((max(t_logp[b, pos - 1, v].item(), torch.log(torch.tensor(1e-12)).item()) for v in support))
            margins[b, pos] = best[-1] - best[-2]
    return student_lp, teacher_lp, margins, s, t


@pytest.mark.parametrize("chunk_size", [None, 4, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_signals_match_full_logits(chunk_size, temperature):
    student, teacher = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2, hidden_size=32)
    ids, attn, cmask = _batch()
    got = token_signals(student, teacher, ids, attn, cmask, top_k=5, temperature=temperature, chunk_size=chunk_size)
    s_lp, t_lp, margins, _, _ = _naive(student, teacher, ids, attn, cmask, 5, temperature)
    torch.testing.assert_close(got.student_logprobs.double(), s_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.teacher_logprobs.double(), t_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.margins.double(), margins, atol=1e-4, rtol=1e-4)
    assert (got.student_logprobs[cmask == 0] == 0).all() and (got.margins[cmask == 0] == 0).all()
    assert got.student_logprobs.shape == ids.shape


def test_gradient_matches_full_logits():
    student, teacher = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2)
    ids, attn, cmask = _batch(seed=3)
    coeff = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0))

    got = token_signals(student, teacher, ids, attn, cmask, top_k=None, chunk_size=5)
    (got.student_logprobs * coeff).sum().backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    s_lp, *_ = _naive(student, teacher, ids, attn, cmask, 2, 1.0)
    (s_lp * coeff.double()).sum().backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert got.margins is None


def test_bf16_models():
    student = make_model(VOCAB, seed=1, dtype=torch.bfloat16)
    teacher = make_model(VOCAB, seed=2, dtype=torch.bfloat16)
    ids, attn, cmask = _batch(seed=4)
    got = token_signals(student, teacher, ids, attn, cmask, top_k=4, chunk_size=6)
    assert got.student_logprobs.dtype == torch.float32
    s_lp, t_lp, margins, _, _ = _naive(student, teacher, ids, attn, cmask, 4, 1.0)
    # bf16 logits are rounded differently by the chunked projection and the model's own head: loose tolerance.
    torch.testing.assert_close(got.student_logprobs.double(), s_lp, atol=0.1, rtol=0.05)
    torch.testing.assert_close(got.teacher_logprobs.double(), t_lp, atol=0.1, rtol=0.05)
    assert torch.isfinite(got.margins).all() and (got.margins >= 0).all()


def test_features_match_teachability_features_on_full_logits():
    student, teacher = make_model(VOCAB, seed=5), make_model(VOCAB, seed=6)
    ids, attn, cmask = _batch(seed=5)
    got = token_signals(student, teacher, ids, attn, cmask, top_k=None, temperature=0.8, chunk_size=3, feature_k=6)
    _, _, _, s, t = _naive(student, teacher, ids, attn, cmask, 2, 1.0)
    want = teachability_features(s[:, :-1].detach(), t[:, :-1], k=6, temperature=0.8)
    valid = cmask[:, 1:].bool()
    for field in ("compatibility", "disagreement", "student_entropy"):
        g = getattr(got.features, field)[:, 1:]
        torch.testing.assert_close(g[valid].double(), getattr(want, field)[valid].double(), atol=1e-4, rtol=1e-4)
        assert (g[~valid] == 0).all()


def test_all_masked_batch_is_a_differentiable_zero():
    student, teacher = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2)
    ids, attn, cmask = _batch()
    got = token_signals(student, teacher, ids, attn, torch.zeros_like(cmask), top_k=3, feature_k=4)
    assert all((x == 0).all() and x.shape == ids.shape for x in got.features)
    loss = got.student_logprobs.sum()
    loss.backward()
    assert loss.item() == 0
    assert all(p.grad is None or (p.grad == 0).all() for p in student.parameters())


def test_sharp_then_flat_teacher_margins():
    """Constructed heads: the teacher is sharp on the first positions and uniform later -> margins fall to 0."""
    V, H = 8, 8
    head = OutputHead(torch.eye(V, H))
    hidden = torch.zeros(1, 6, H)
    hidden[0, :, 0] = 5.0  # the student prefers token 0, then 1
    hidden[0, :, 1] = 4.0
    teacher_hidden = torch.zeros(1, 6, H)
    teacher_hidden[0, :3, 1] = 6.0  # sharp on token 1 early, uniform (zero logits) late
    got = signals_from_hidden(hidden, teacher_hidden, torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6), head, head, 2)
    torch.testing.assert_close(got.margins[0], torch.tensor([6.0, 6.0, 6.0, 0.0, 0.0, 0.0]))


def test_signal_errors():
    head = OutputHead(torch.randn(10, 4))
    hidden = torch.randn(1, 3, 4)
    ids, mask = torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3)
    with pytest.raises(ValueError, match="top_k"):
        signals_from_hidden(hidden, hidden, ids, mask, head, head, top_k=11)
    with pytest.raises(ValueError, match="Token id 9 has no row in the teacher's output head: .* 10 rows .* 9"):
        signals_from_hidden(hidden, hidden, ids + 9, mask, head, OutputHead(torch.randn(9, 4)), top_k=2)
    bad = hidden.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="teacher"):
        signals_from_hidden(hidden, bad, ids, mask, head, head, top_k=2)
    with pytest.raises(FloatingPointError, match="student"):
        signals_from_hidden(bad, hidden, ids, mask, head, head, top_k=2)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_padded_heads_give_the_signals_of_the_shared_vocabulary(chunk_size):
    """One tokenizer, heads padded to different sizes: every signal (log-probs, margins, TA-OPD features, entropy,
    gradient) equals the one of the unpadded pair, both distributions taken over the shared ids."""
    student, teacher = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2)
    ids, attn, cmask = _batch(seed=6)
    options = dict(top_k=5, temperature=0.8, chunk_size=chunk_size, feature_k=6)
    want = token_signals(student, teacher, ids, attn, cmask, **options)
    want.student_logprobs.sum().backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    for pair in ((student, padded_copy(teacher)), (padded_copy(student), teacher)):
        pair[0].zero_grad()
        got = token_signals(*pair, ids, attn, cmask, **options)
        for name in ("student_logprobs", "teacher_logprobs", "margins", "student_entropy"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for field, a, b in zip(got.features._fields, got.features, want.features):
            assert torch.equal(a, b), field
        got.student_logprobs.sum().backward()
        for name, param in pair[0].named_parameters():
            rows = param.shape[0] if param.shape == grads[name].shape else VOCAB  # the padded matrices: shared rows
            torch.testing.assert_close(param.grad[:rows], grads[name], rtol=1e-5, atol=1e-7, msg=name)
            assert (param.grad[rows:] == 0).all(), name  # the padded rows get no gradient


def test_cached_teacher_scores_replace_the_teacher_projection():
    """With `teacher_scores` the teacher's hidden states are not read; the student's signals and gradient are those of
    the full computation, and the teacher's are the given scores (0 outside the mask)."""
    from trl_ltc.signals import TeacherScores, last_hidden_state

    student, teacher = make_model(VOCAB, seed=1), make_model(VOCAB, seed=2, hidden_size=32)
    ids, attn, cmask = _batch()
    hidden = last_hidden_state(student, ids, attn)[:, :-1]
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, ids, attn)[:, :-1]
    args = ids[:, 1:], cmask[:, 1:], OutputHead.of(student), OutputHead.of(teacher)
    full = signals_from_hidden(hidden, teacher_hidden, *args, top_k=5, temperature=0.7, chunk_size=4)
    scores = TeacherScores(full.teacher_logprobs + 7.0, full.margins + 3.0)  # anything outside the mask is ignored
    cached = signals_from_hidden(hidden, None, *args, top_k=5, temperature=0.7, chunk_size=4, teacher_scores=scores)
    on = cmask[:, 1:].bool()
    torch.testing.assert_close(cached.teacher_logprobs, torch.where(on, scores.logprobs, 0.0))
    torch.testing.assert_close(cached.margins, torch.where(on, scores.margins, 0.0))
    torch.testing.assert_close(cached.student_entropy, full.student_entropy)
    (grad,) = torch.autograd.grad(cached.student_logprobs.sum(), hidden, retain_graph=True)
    (full_grad,) = torch.autograd.grad(full.student_logprobs.sum(), hidden)
    torch.testing.assert_close(cached.student_logprobs, full.student_logprobs)
    torch.testing.assert_close(grad, full_grad)
    with pytest.raises(ValueError, match="TA-OPD features"):
        signals_from_hidden(hidden, None, *args, top_k=5, feature_k=4, teacher_scores=scores)
