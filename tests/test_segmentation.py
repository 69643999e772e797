"""Tests for trl_ltc.segmentation: completion tokens -> sentence / line / window segments."""

from __future__ import annotations

import logging

import nltk
import numpy as np
import pytest
import torch
from helpers import CORPUS, make_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nltk.tokenize.punkt import PunktSentenceTokenizer

from trl_ltc import segmentation
from trl_ltc.segmentation import SEGMENTATION_METHODS, decode_with_offsets, segment_completions


def _punkt_tab_installed() -> bool:
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


PUNKT_TAB = _punkt_tab_installed()

# Sentences that every Punkt variant (pretrained English or default parameters) splits the same way:
# no abbreviations, each starts with an upper-case letter and ends with . ! or ?.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    " It was not amused!",
    " Let x = 3 and compute $\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}$ now.",
    " Emoji 🙂🚀 are fine too.",
    " Is that right?",
    " Yes.",
]


def _build(tokenizer, pieces, eos=False):
    """Concatenate separately encoded pieces; the expected segment of each token is its piece index, except that
    whitespace-only tokens at the start of a piece join the previous piece's segment."""
    ids, expected = [], []
    for k, piece in enumerate(pieces):
        leading = True
        for tok in tokenizer.encode(piece, add_special_tokens=False):
            if leading and tokenizer.decode([tok]).strip() == "" and k > 0:
                expected.append(k - 1)
            else:
                leading = False
                expected.append(k)
            ids.append(tok)
    if eos:
        ids.append(tokenizer.eos_token_id)
        expected.append(expected[-1])
    return ids, expected


def _pad(rows, pad_id, side="right", width=None):
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if not r:
            continue
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    return ids, mask


def _valid(seg, mask):
    return [seg[b][mask[b].bool()].tolist() for b in range(seg.shape[0])]


def _textless(tok, row):
    """Reference: a completion of special tokens and out-of-vocabulary ids only holds no text."""
    special = set(tok.all_special_ids) | {i for i, added in tok.added_tokens_decoder.items() if added.special}
    return bool(row) and all(t in special or not 0 <= t < len(tok) for t in row)


def _check_invariants(seg, mask, ids=None, tok=None):
    """Segment-id invariants; with `ids` and `tok`, rows without text must have no segment (and only those)."""
    assert seg.dtype == torch.long and seg.shape == mask.shape
    assert torch.all(seg[mask == 0] == -1)
    rows = _valid(ids, mask) if ids is not None else [None] * seg.shape[0]
    for row, row_ids in zip(_valid(seg, mask), rows):
        if not row:
            continue
        arr = np.asarray(row)
        if ids is not None and _textless(tok, row_ids):
            assert np.all(arr == -1)
            continue
        assert arr[0] == 0
        assert np.all(np.diff(arr) >= 0) and np.all(np.diff(arr) <= 1)


def _metaspace_tokenizer():
    """A Llama-style (Metaspace + byte fallback) BPE tokenizer: exercises the non-byte-level path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator([c for c in CORPUS if "🙂" not in c and "東" not in c] * 4, trainer=trainer)
    import json

    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    return _metaspace_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# nltk method
# ---------------------------------------------------------------------------------------------------------------


def test_known_sentences_right_padding(tokenizer):
    ids, expected = _build(tokenizer, SENTENCES, eos=True)
    x, m = _pad([ids], tokenizer.pad_token_id, width=len(ids) + 5)
    seg = segment_completions(x, m, tokenizer)
    _check_invariants(seg, m)
    assert _valid(seg, m)[0] == expected
    assert seg[0, len(ids) :].tolist() == [-1] * 5


def test_left_and_right_padding_agree(tokenizer):
    rows = [
        _build(tokenizer, SENTENCES[:3])[0],
        _build(tokenizer, SENTENCES[2:], eos=True)[0],
        [],
        _build(tokenizer, ["No punctuation here at all"])[0],
    ]
    out = {}
    for side in ("left", "right"):
        x, m = _pad(rows, tokenizer.pad_token_id, side=side, width=80)
        seg = segment_completions(x, m, tokenizer)
        _check_invariants(seg, m)
        out[side] = _valid(seg, m)
    assert out["left"] == out["right"]
    assert out["left"][0] == _build(tokenizer, SENTENCES[:3])[1]
    assert out["left"][2] == []
    assert set(out["left"][3]) == {0}


def test_mask_holes_ignore_ids(tokenizer):
    """Ids under mask 0 are ignored entirely, wherever they are."""
    ids, expected = _build(tokenizer, SENTENCES[:2])
    junk = tokenizer.encode(". Zzz. Yyy.")
    row = ids[:3] + junk + ids[3:] + junk
    x = torch.tensor([row])
    m = torch.tensor([[1] * 3 + [0] * len(junk) + [1] * (len(ids) - 3) + [0] * len(junk)])
    seg = segment_completions(x, m, tokenizer)
    _check_invariants(seg, m)
    assert _valid(seg, m)[0] == expected


def test_segments_match_independent_punkt(tokenizer):
    text_pieces = [
        "Dr. Smith paid $3.50 for 2 apples. Then he left at 5 p.m. sharp.",
        " The quick brown fox jumps over the lazy dog. It was not amused!",
        "\n\nHow many apples does Tom have? Tom has 12 apples. He gives away 5, so 7 remain.",
        " 東京は日本の首都です。富士山は高い。 Emoji test 🙂🚀 done. Another sentence follows here.",
    ]
    ids = tokenizer.encode("".join(text_pieces)) + [tokenizer.eos_token_id]
    x, m = _pad([ids], tokenizer.pad_token_id)
    seg = segment_completions(x, m, tokenizer)[0]
    _check_invariants(seg[None], m)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if PUNKT_TAB:
        sentences = nltk.sent_tokenize(text)
    else:
        sentences = [text[s:e] for s, e in PunktSentenceTokenizer().span_tokenize(text)]
    assert len(sentences) > 5
    got = [
        tokenizer.decode(torch.tensor(ids)[seg == s].tolist(), skip_special_tokens=True)
        for s in range(int(seg.max()) + 1)
    ]
    assert [g.strip() for g in got] == [s.strip() for s in sentences]


def test_nltk_text_equals_tokenizer_decode(tokenizer):
    ids = tokenizer.encode("".join(CORPUS)) + [tokenizer.eos_token_id, 1, tokenizer.pad_token_id]
    text, start, end = decode_with_offsets(ids, tokenizer)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert start[0] == 0 and end[-1] == len(text) and np.array_equal(start[1:], end[:-1])


def test_special_and_whitespace_tokens_join_previous(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, _ = _build(tokenizer, ["It works."])
    b, _ = _build(tokenizer, ["Next one!"])
    space = tokenizer.encode(" ")
    nl = tokenizer.encode("\n\n")
    row = [eos] + a + [eos] + space + nl + [pad] + b + [eos, eos]
    x, m = _pad([row], pad)
    seg = _valid(segment_completions(x, m, tokenizer), m)[0]
    n_lead = 1 + len(a) + 1 + len(space) + len(nl) + 1
    assert seg == [0] * n_lead + [1] * (len(b) + 2)


def test_only_special_tokens_no_segment(tokenizer):
    """An empty completion (EOS first, or only special tokens / ids outside the vocabulary) has no segment."""
    eos = tokenizer.eos_token_id
    rows = [[eos, eos, 1], [eos], [eos, len(tokenizer) + 3], tokenizer.encode("Hi.") + [eos], tokenizer.encode(" ")]
    x, m = _pad(rows, tokenizer.pad_token_id, width=5)
    expected = [[-1] * 5, [-1] * 5, [-1] * 5, [0] * len(rows[3]) + [-1] * (5 - len(rows[3])), [0] + [-1] * 4]
    for method in SEGMENTATION_METHODS:
        assert segment_completions(x, m, tokenizer, method=method).tolist() == expected, method
        if torch.cuda.is_available():
            got = segment_completions(x.cuda(), m.cuda(), tokenizer, method=method)
            assert got.cpu().tolist() == expected, method
    # without a tokenizer, `fixed` cannot tell special tokens: plain windows
    assert segment_completions(x, m, None, method="fixed").tolist()[0] == [0, 0, 0, -1, -1]


def test_no_punctuation_single_segment(tokenizer):
    for text in ["no punctuation here just words and more words", "東京は日本の首都です", "x = 3 + 4 \\cdot y"]:
        ids = tokenizer.encode(text)
        x, m = _pad([ids], tokenizer.pad_token_id)
        assert set(segment_completions(x, m, tokenizer)[0].tolist()) == {0}


def test_empty_completion_all_minus_one(tokenizer):
    x = torch.full((3, 6), tokenizer.pad_token_id)
    m = torch.zeros_like(x)
    m[1, 2:4] = 1
    x[1, 2:4] = torch.tensor(tokenizer.encode("Hi.")[:2])
    for method in SEGMENTATION_METHODS:
        seg = segment_completions(x, m, tokenizer, method=method)
        assert seg[0].tolist() == [-1] * 6 and seg[2].tolist() == [-1] * 6
        assert seg[1].tolist() == [-1, -1, 0, 0, -1, -1]
    x0 = torch.zeros((0, 4), dtype=torch.long)
    assert segment_completions(x0, x0, tokenizer).shape == (0, 4)


def test_split_multibyte_characters(tokenizer):
    """Emoji / CJK split over several byte tokens stay together, owned by the token holding their first byte."""
    emoji = tokenizer.encode("🙂")
    assert len(emoji) > 1  # the tiny vocab splits it into byte tokens
    a, _ = _build(tokenizer, ["Done."])
    b = tokenizer.encode(" ")
    c, _ = _build(tokenizer, [" is next."])
    row = a + b + emoji + c
    x, m = _pad([row], tokenizer.pad_token_id)
    seg = _valid(segment_completions(x, m, tokenizer), m)[0]
    assert seg == [0] * (len(a) + len(b)) + [1] * (len(emoji) + len(c))
    text, start, end = decode_with_offsets(row, tokenizer)
    assert text == "Done. 🙂 is next."
    # the first emoji token owns the emoji, the continuation tokens own nothing
    k = len(a) + len(b)
    assert text[start[k] : end[k]] == "🙂" and all(start[i] == end[i] for i in range(k + 1, k + len(emoji)))


def test_truncated_and_invalid_utf8_never_crash(tokenizer):
    emoji = tokenizer.encode("🙂🚀")
    cjk = tokenizer.encode("東京")
    a = tokenizer.encode("Start. ")
    rows = [
        emoji[1:],  # starts with continuation bytes
        a + emoji[:-1],  # truncated at the end
        a + emoji[:1] + a + emoji[2:] + cjk[::-1],  # interleaved garbage
        emoji[:1] * 5,
    ]
    x, m = _pad(rows, tokenizer.pad_token_id, side="left")
    seg = segment_completions(x, m, tokenizer)
    _check_invariants(seg, m)
    for r in rows:
        text, start, end = decode_with_offsets(r, tokenizer)
        assert text == tokenizer.decode(r, skip_special_tokens=True)
        assert end[-1] == len(text)


def test_larger_vocab(tokenizer):
    big = make_tokenizer(2000)
    ids, expected = _build(big, SENTENCES, eos=True)
    x, m = _pad([ids], big.pad_token_id, side="left", width=len(ids) + 3)
    seg = segment_completions(x, m, big)
    _check_invariants(seg, m)
    assert _valid(seg, m)[0] == expected


def test_out_of_vocab_ids_contribute_nothing(tokenizer):
    ids, expected = _build(tokenizer, ["It works.", " Next one!"])
    n_a = len(tokenizer.encode("It works."))
    row = ids[:n_a] + [len(tokenizer) + 7, -3] + ids[n_a:]
    x, m = _pad([row], tokenizer.pad_token_id)
    seg = _valid(segment_completions(x, m, tokenizer), m)[0]
    assert seg == expected[:n_a] + [0, 0] + expected[n_a:]
    assert decode_with_offsets(row, tokenizer)[0] == "It works. Next one!"


def test_added_tokens_decode_like_tokenizer():
    tok = make_tokenizer()
    tok.add_tokens(["<think>", "héllo wörld", ".\nNext"])
    tok.add_special_tokens({"additional_special_tokens": ["<sp>"]})
    ids = tok.encode("a<think>b héllo wörld<sp> c.\nNext line")
    text, _, _ = decode_with_offsets(ids, tok)
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_newline_method_hand_checked():
    tok = make_tokenizer()
    tok.add_tokens([".\nNext"])  # one token holding a line break in the middle
    special = tok.convert_tokens_to_ids(".\nNext")
    first = tok.encode("First line")
    second = tok.encode(" line\n\n\n")
    third = tok.encode("Third. Still third")
    row = first + [special] + second + third + [tok.eos_token_id]
    x, m = _pad([row], tok.pad_token_id, side="left", width=len(row) + 2)
    seg = segment_completions(x, m, tok, method="newline")
    _check_invariants(seg, m)
    # '.\nNext' starts with '.', which is on the first line; ' line\n\n\n' is on the second; blank lines vanish
    assert _valid(seg, m)[0] == [0] * (len(first) + 1) + [1] * len(second) + [2] * (len(third) + 1)
    assert seg[0, :2].tolist() == [-1, -1]


def test_newline_method_leading_blank_lines(tokenizer):
    row = tokenizer.encode("\n\nA\nB")
    x, m = _pad([row], tokenizer.pad_token_id)
    seg = _valid(segment_completions(x, m, tokenizer, method="newline"), m)[0]
    text, start, _ = decode_with_offsets(row, tokenizer)
    a_tok = int(np.searchsorted(start, text.index("A"), side="right") - 1)
    b_tok = int(np.searchsorted(start, text.index("B"), side="right") - 1)
    assert seg[a_tok] == 0 and seg[b_tok] == 1 and seg[-1] == 1 and max(seg) == 1


def test_fixed_method_hand_checked():
    x = torch.arange(14).reshape(2, 7)
    m = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    seg = segment_completions(x, m, None, method="fixed", window=3)
    assert seg.tolist() == [[-1, -1, 0, 0, 0, 1, 1], [0, 0, 0, 1, -1, -1, -1]]
    seg = segment_completions(x, m.bool(), None, method="fixed", window=1)
    assert seg.tolist() == [[-1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 3, -1, -1, -1]]
    seg = segment_completions(x, m, None, method="fixed", window=100)
    assert seg.tolist() == [[-1, -1, 0, 0, 0, 0, 0], [0, 0, 0, 0, -1, -1, -1]]


@pytest.mark.parametrize("window", [1, 2, 5])
def test_fixed_torch_path_matches_numpy(window):
    """The device (torch) implementation of `fixed` equals the CPU (numpy) one."""
    g = torch.Generator().manual_seed(window)
    m = torch.rand((5, 23), generator=g) < 0.6
    x = torch.zeros_like(m, dtype=torch.long)
    expected = segment_completions(x, m, None, method="fixed", window=window)
    assert torch.equal(segmentation._fixed_segments_torch(m, window), expected)
    if torch.cuda.is_available():
        seg = segment_completions(x.cuda(), m.cuda(), None, method="fixed", window=window)
        assert seg.device.type == "cuda" and torch.equal(seg.cpu(), expected)


def test_invalid_arguments(tokenizer):
    x = torch.zeros((1, 3), dtype=torch.long)
    m = torch.ones_like(x)
    with pytest.raises(ValueError, match="method") as err:
        segment_completions(x, m, tokenizer, method="spacy")
    assert all(name in str(err.value) for name in SEGMENTATION_METHODS)
    for bad in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="window"):
            segment_completions(x, m, tokenizer, method="fixed", window=bad)
    with pytest.raises(ValueError):
        segment_completions(x, m[0], tokenizer)


def test_result_on_input_device_and_dtype(tokenizer):
    ids, _ = _build(tokenizer, SENTENCES[:2])
    x, m = _pad([ids], tokenizer.pad_token_id)
    for method in SEGMENTATION_METHODS:
        seg = segment_completions(x.int(), m.bool(), tokenizer, method=method)
        assert seg.device == x.device and seg.dtype == torch.long
        if torch.cuda.is_available():
            seg_cuda = segment_completions(x.cuda(), m.cuda(), tokenizer, method=method)
            assert seg_cuda.device.type == "cuda" and torch.equal(seg_cuda.cpu(), seg)


def test_punkt_choice_logged_once_and_never_downloads(tokenizer, monkeypatch, caplog):
    def no_download(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", no_download)
    segmentation._punkt_tokenizer.cache_clear()
    ids, _ = _build(tokenizer, SENTENCES)
    x, m = _pad([ids], tokenizer.pad_token_id)
    with caplog.at_level(logging.INFO, logger="trl_ltc.segmentation"):
        segment_completions(x, m, tokenizer)
        segment_completions(x, m, tokenizer)
    records = [r for r in caplog.records if r.name == "trl_ltc.segmentation"]
    assert len(records) == 1
    assert ("pretrained" in records[0].getMessage()) == PUNKT_TAB
    assert isinstance(segmentation._punkt_tokenizer(), PunktSentenceTokenizer)


@pytest.fixture
def fake_punkt_tab(tmp_path, monkeypatch):
    """A tiny installed `punkt_tab` English model (abbreviations only), so the pretrained branch runs offline."""
    lang_dir = tmp_path / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True)
    (lang_dir / "abbrev_types.txt").write_text("dr\nmr\np.m\n", encoding="utf-8")
    for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
        (lang_dir / name).write_text("", encoding="utf-8")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)] + list(nltk.data.path))
    from nltk import tokenize as nltk_tokenize

    nltk_tokenize._get_punkt_tokenizer.cache_clear()
    segmentation._punkt_tokenizer.cache_clear()
    yield
    nltk_tokenize._get_punkt_tokenizer.cache_clear()
    segmentation._punkt_tokenizer.cache_clear()


def test_pretrained_branch_matches_sent_tokenize(tokenizer, fake_punkt_tab, caplog):
    text = "Dr. Smith paid $3.50 for 2 apples. Then he left at 5 p.m. sharp. Mr. Lee stayed.\n\nOk!"
    ids = tokenizer.encode(text)
    x, m = _pad([ids], tokenizer.pad_token_id)
    with caplog.at_level(logging.INFO, logger="trl_ltc.segmentation"):
        seg = segment_completions(x, m, tokenizer)[0]
    assert any("pretrained" in r.getMessage() for r in caplog.records if r.name == "trl_ltc.segmentation")
    sentences = nltk.sent_tokenize(tokenizer.decode(ids, skip_special_tokens=True))
    assert len(sentences) == 4  # the abbreviations are known: no split after Dr. / p.m. / Mr.
    got = [tokenizer.decode(torch.tensor(ids)[seg == s].tolist()) for s in range(int(seg.max()) + 1)]
    assert [g.strip() for g in got] == sentences


# ---------------------------------------------------------------------------------------------------------------
# Non-byte-level (SentencePiece-style) tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_metaspace_tokenizer_generic_path(metaspace_tokenizer):
    tok = metaspace_tokenizer
    assert not segmentation._is_byte_level(tok)
    pieces = ["The quick brown fox jumps over the lazy dog.", "It was not amused!", "Emoji 🙂 done.", "Is that right?"]
    ids, expected = _build(tok, pieces, eos=True)
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))  # byte fallback exercised
    text, start, end = decode_with_offsets(ids, tok)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert start[0] == 0 and end[-1] == len(text) and np.array_equal(start[1:], end[:-1])
    for side in ("left", "right"):
        x, m = _pad([ids], tok.pad_token_id, side=side, width=len(ids) + 4)
        seg = segment_completions(x, m, tok)
        _check_invariants(seg, m)
        assert _valid(seg, m)[0] == expected
    x, m = _pad([ids], tok.pad_token_id)
    assert segment_completions(x, m, tok, method="newline")[0].tolist() == [0] * len(ids)


# ---------------------------------------------------------------------------------------------------------------
# Fuzz
# ---------------------------------------------------------------------------------------------------------------

_FUZZ_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def _batches(draw, vocab_size):
    rows = draw(st.lists(st.lists(st.integers(0, vocab_size - 1), min_size=0, max_size=40), min_size=1, max_size=4))
    holes = draw(st.lists(st.lists(st.booleans(), min_size=0, max_size=40), min_size=len(rows), max_size=len(rows)))
    return rows, holes


def _fuzz(tok, rows, holes, method):
    width = max(len(r) for r in rows) + 2
    results = {}
    for side in ("left", "right"):
        x, m = _pad(rows, tok.pad_token_id, side=side, width=width)
        seg = segment_completions(x, m, tok, method=method)
        _check_invariants(seg, m, x, tok)
        results[side] = _valid(seg, m)
    assert results["left"] == results["right"]
    # random holes in the mask: valid tokens still follow the invariants
    x, m = _pad(rows, tok.pad_token_id, width=width)
    for b, h in enumerate(holes):
        for i, drop in enumerate(h[: len(rows[b])]):
            if drop:
                m[b, i] = 0
    _check_invariants(segment_completions(x, m, tok, method=method), m, x, tok)


def _reference_segments(tok, text, method):
    """Independent reference for text that the tokenizer encodes itself: ownership from the encoder's char offsets."""
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    assert tok.decode(enc["input_ids"]) == text
    if method == "nltk":
        if PUNKT_TAB:
            starts = [s for s, _ in nltk.tokenize._get_punkt_tokenizer("english").span_tokenize(text)]
        else:
            starts = [s for s, _ in PunktSentenceTokenizer().span_tokenize(text)]
    else:
        starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    owned, raw = set(), []
    for s, e in enc["offset_mapping"]:
        chars = [c for c in range(s, e) if c not in owned]
        owned.update(chars)
        first = next((c for c in chars if not text[c].isspace()), None)
        if first is None:
            raw.append(raw[-1] if raw else None)
        else:
            raw.append(max(0, max((k for k, st_ in enumerate(starts) if st_ <= first), default=0)))
    first_valid = next((r for r in raw if r is not None), 0)
    raw = [first_valid if r is None else r for r in raw]
    seg = [0]
    for prev, cur in zip(raw, raw[1:]):
        seg.append(seg[-1] + (cur != prev))
    return enc["input_ids"], seg


_FRAGMENTS = [piece for line in CORPUS for piece in line.replace("\n", " ").split(" ") if piece] + [
    "🙂",
    "東京。",
    "Yes.",
    "Why?",
    "$x^2$.",
    "\u00a0",
    "\u3000",
]


@_FUZZ_SETTINGS
@given(
    words=st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=30),
    seps=st.lists(st.sampled_from([" ", " ", " ", "\n", "\n\n", "  ", "", "\t"]), min_size=30, max_size=30),
    method=st.sampled_from(["nltk", "newline"]),
    side=st.sampled_from(["left", "right"]),
)
def test_fuzz_against_reference(tokenizer, words, seps, method, side):
    text = "".join(w + sep for w, sep in zip(words, seps))
    ids, expected = _reference_segments(tokenizer, text, method)
    x, m = _pad([ids], tokenizer.pad_token_id, side=side, width=len(ids) + 2)
    assert _valid(segment_completions(x, m, tokenizer, method=method), m)[0] == expected


@_FUZZ_SETTINGS
@given(data=_batches(400), method=st.sampled_from(["nltk", "newline"]))
def test_fuzz_byte_level(tokenizer, data, method):
    rows, holes = data
    _fuzz(tokenizer, rows, holes, method)
    for r in rows:
        text, start, end = decode_with_offsets(r, tokenizer)
        assert text == tokenizer.decode(r, skip_special_tokens=True)
        if r:
            assert start[0] == 0 and end[-1] == len(text) and np.array_equal(start[1:], end[:-1])


@_FUZZ_SETTINGS
@given(data=_batches(300), method=st.sampled_from(["nltk", "newline"]))
def test_fuzz_generic(metaspace_tokenizer, data, method):
    rows, holes = data
    _fuzz(metaspace_tokenizer, rows, holes, method)
    for r in rows:
        text, start, end = decode_with_offsets(r, metaspace_tokenizer)
        if r:
            assert start[0] == 0 and end[-1] == len(text) and np.array_equal(start[1:], end[:-1])


@_FUZZ_SETTINGS
@given(data=_batches(400), window=st.integers(1, 9))
def test_fuzz_fixed(tokenizer, data, window):
    rows, holes = data
    width = max(len(r) for r in rows) + 1
    x, m = _pad(rows, tokenizer.pad_token_id, side="left", width=width)
    seg = segment_completions(x, m, tokenizer, method="fixed", window=window)
    _check_invariants(seg, m, x, tokenizer)
    for b, r in enumerate(rows):
        expected = [-1] * len(r) if _textless(tokenizer, r) else [i // window for i in range(len(r))]
        assert _valid(seg, m)[b] == expected
