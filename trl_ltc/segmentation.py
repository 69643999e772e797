"""Completion tokens to sentence segments.

[`segment_completions`] splits every completion of a batch into segments (sentences, lines or fixed windows)
and labels each completion token with the index of its segment.

Token-to-segment rule
---------------------
The text of a completion is decoded from its generated ids (never re-encoded: the ids a model samples need not be
the tokenizer's canonical encoding of that text). Every character of the decoded text is *owned* by exactly one
token: for byte-level BPE tokenizers the token holding the first byte of the character's UTF-8 encoding (or the first
byte of the ill-formed byte run that decodes to a U+FFFD replacement character); for other tokenizers the token whose
incremental decode produced it.

* A token belongs to the segment containing the first non-whitespace character it owns.
* A token that owns no non-whitespace character -- whitespace-only tokens, special tokens such as EOS (they
  contribute no text, as with `skip_special_tokens=True`), ids outside the vocabulary, and the trailing bytes of a
  multi-byte character whose first byte came in an earlier token -- joins the segment of the previous token
  (segment 0 if there is none).
* Segment ids are then renumbered to be contiguous: they start at 0 on the first completion token, never decrease
  and never skip a value (a sentence in which no token starts is merged into the segment before it).
* Positions where `completion_mask` is 0 get `-1` and are ignored entirely (left or right padding, or holes, are
  all fine). A completion with no valid token has no segment.
* An *empty* completion -- one whose valid tokens are all special tokens (e.g. EOS sampled first) or ids outside the
  vocabulary, so that it holds no text -- has no segment either: all its tokens get `-1`, with every method (for
  `"fixed"` only when a tokenizer is given). The release rule then keeps none of its tokens.

Segment boundaries per method
-----------------------------
`"nltk"`
    Start offsets of NLTK Punkt sentence spans (`span_tokenize`) of the decoded text. NLTK's pretrained English
    parameters are used when the `punkt_tab` data is installed (the sentences are then exactly those of
    `nltk.sent_tokenize`); otherwise, offline and without any download attempt, a `PunktSentenceTokenizer()` with
    default (untrained) parameters. Which one is in use is logged once.
`"newline"`
    A segment ends at each line break (`"\\n"`): the segment of a character is the number of `"\\n"` before it
    (blank lines produce no segment of their own, by the renumbering above).
`"fixed"`
    Consecutive windows of `window` completion tokens (counted over valid tokens only); no decoding.
"""

from __future__ import annotations

import codecs
import functools
import logging
import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["SEGMENTATION_METHODS", "decode_with_offsets", "segment_completions"]

SEGMENTATION_METHODS = ("nltk", "newline", "fixed")


# ----------------------------------------------------------------------------------------------------------------
# Sentence splitters
# ----------------------------------------------------------------------------------------------------------------


def _punkt_tab_available(language: str = "english") -> bool:
    """Whether NLTK's `punkt_tab` model for `language` is installed (never downloads anything)."""
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{language}/")
    except (LookupError, ValueError, OSError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _punkt_tokenizer():
    """The cached Punkt sentence tokenizer: NLTK's pretrained English model if installed, else default parameters."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    if _punkt_tab_available("english"):
        try:
            from nltk.tokenize.punkt import PunktTokenizer

            tokenizer = PunktTokenizer("english")
        except Exception as exc:  # a broken / refused data file: degrade gracefully, as if it were not installed
            logger.warning(
                "NLTK punkt_tab data found but could not be loaded (%r); "
                "falling back to PunktSentenceTokenizer() with default parameters.",
                exc,
            )
        else:
            logger.info("Using NLTK's pretrained English Punkt model (punkt_tab).")
            return tokenizer
    else:
        logger.warning(
            "NLTK punkt_tab data is not installed; using PunktSentenceTokenizer() with default "
            "(untrained) parameters for sentence splitting. Install it with nltk.download('punkt_tab') for "
            "abbreviation-aware English sentence splitting."
        )
    return PunktSentenceTokenizer()


def _nltk_starts(text: str, codepoints: np.ndarray) -> np.ndarray:
    spans = _punkt_tokenizer().span_tokenize(text)
    return np.fromiter((start for start, _ in spans), dtype=np.int64)


def _newline_starts(text: str, codepoints: np.ndarray) -> np.ndarray:
    breaks = np.flatnonzero(codepoints == 10)
    starts = np.empty(len(breaks) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = breaks + 1
    return starts


_SPLITTERS: dict[str, Callable[[str, np.ndarray], np.ndarray]] = {"nltk": _nltk_starts, "newline": _newline_starts}


# ----------------------------------------------------------------------------------------------------------------
# Decoding with per-token character offsets
# ----------------------------------------------------------------------------------------------------------------

# Whitespace as `str.isspace` / `re`'s `\s` see it; every such code point is <= U+3000.
_WS_LIMIT = 0x3001
_WS_TABLE = np.zeros(_WS_LIMIT + 1, dtype=bool)
_WS_TABLE[[cp for cp in range(_WS_LIMIT) if chr(cp).isspace()]] = True


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}

# Recording variant of errors="replace": same output, but remembers the byte ranges of ill-formed subsequences.
_decode_errors = threading.local()


def _record_replace(exc: UnicodeDecodeError):
    _decode_errors.ranges.append((exc.start, exc.end))
    return "\ufffd", exc.end


codecs.register_error("trl_ltc_record_replace", _record_replace)


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            ids.update(int(i) for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        except Exception:  # pragma: no cover - very old / exotic backends
            pass
    return ids


class _ByteLevelAligner:
    """Per-tokenizer id -> bytes table for byte-level BPE tokenizers (decoded exactly like `decoders.ByteLevel`)."""

    def __init__(self, tokenizer):
        backend = tokenizer.backend_tokenizer
        vocab = backend.get_vocab(with_added_tokens=True)
        size = max(max(vocab.values(), default=-1) + 1, len(tokenizer))
        table: list[bytes] = [b""] * (size + 1)  # last entry: out-of-vocabulary ids
        for token, idx in vocab.items():
            try:
                table[idx] = bytes(_UNICODE_TO_BYTE[c] for c in token)
            except KeyError:  # like tokenizers' ByteLevel decoder: a token outside the table is taken as UTF-8
                table[idx] = token.encode("utf-8")
        for idx in _special_ids(tokenizer):
            if 0 <= idx < size:
                table[idx] = b""
        self.size = size
        self.table = table
        self.nbytes = np.fromiter(map(len, table), dtype=np.int64, count=len(table))

    def index(self, ids: np.ndarray) -> np.ndarray:
        ids = ids.astype(np.int64, copy=False)
        return np.where((ids >= 0) & (ids < self.size), ids, self.size)

    def align(self, idx: np.ndarray):
        """`idx` from [`index`] -> (text, first char index owned by each token, one past its last)."""
        table = self.table
        data = b"".join([table[i] for i in idx.tolist()])
        _decode_errors.ranges = []
        text = data.decode("utf-8", errors="trl_ltc_record_replace")
        byte_end = np.cumsum(self.nbytes[idx])
        if len(text) == len(data):  # one byte per char (e.g. ASCII): byte offsets are char offsets
            return text, byte_end - self.nbytes[idx], byte_end
        arr = np.frombuffer(data, dtype=np.uint8)
        is_start = (arr & 0xC0) != 0x80
        for start, end in _decode_errors.ranges:
            is_start[start] = True
            is_start[start + 1 : end] = False
        char_end = np.cumsum(is_start)  # number of chars starting at byte <= i
        # chars owned by token t: those starting in [byte_start, byte_end) -> char range [n(<start), n(<end))
        tok_cend = np.where(byte_end > 0, char_end[np.maximum(byte_end - 1, 0)], 0)
        tok_cstart = np.empty_like(tok_cend)
        tok_cstart[0] = 0
        tok_cstart[1:] = tok_cend[:-1]
        return text, tok_cstart, tok_cend


class _GenericAligner:
    """Incremental detokenization for tokenizers that are not byte-level (SentencePiece / Metaspace, WordPiece...).

    Each token's text is `decode(window + [token])[len(decode(window)):]` over a short window of previous tokens
    (vLLM-style incremental detokenization), which keeps context-dependent decoders (leading-space stripping, byte
    fallback) right while staying linear in the sequence length (about 1.5 decodes of a few tokens per token). A
    token whose decode ends in an incomplete character (U+FFFD) yields no text yet; the character is attributed to
    the first token of the run that completes it. The concatenated text is not guaranteed to equal
    `tokenizer.decode` for every decoder (it does for Metaspace / byte-fallback ones).
    """

    max_window = 3  # the context window is re-based (one extra decode) once it holds more tokens than this
    context = 1  # previous tokens kept as context when re-basing

    def __init__(self, tokenizer):
        self.size = len(tokenizer)
        self.special = _special_ids(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def index(self, ids: np.ndarray) -> np.ndarray:
        return ids.astype(np.int64, copy=False)

    def align(self, idx: np.ndarray):
        ids = idx.tolist()
        pieces = self._pieces_incremental(ids)
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        tok_cend = np.cumsum(lengths)
        return "".join(pieces), tok_cend - lengths, tok_cend

    def _pieces_incremental(self, ids: list[int]) -> list[str]:
        decode, special, size = self._decode, self.special, self.size
        pieces = [""] * len(ids)
        kept: list[int] = []  # positions (into ids) of the tokens that are decoded
        prefix = read = 0  # indices into `kept`
        prefix_text = ""
        for pos, tok in enumerate(ids):
            if tok in special or not 0 <= tok < size:
                continue
            kept.append(pos)
            window = [ids[p] for p in kept[prefix:]]
            new_text = decode(window)
            if new_text == prefix_text:  # the token adds no text: it owns nothing, move on
                read = len(kept)
            elif len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                pieces[kept[read]] = new_text[len(prefix_text) :]
                read = len(kept)
                prefix_text = new_text
            else:  # incomplete character: wait for the tokens that complete it
                continue
            if read - prefix > self.max_window:  # re-base the context window
                prefix = read - self.context
                prefix_text = decode([ids[p] for p in kept[prefix:]])
        if read < len(kept):  # flush a trailing incomplete character
            new_text = decode([ids[p] for p in kept[prefix:]])
            pieces[kept[read]] = new_text[len(prefix_text) :]
        return pieces


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover
        return False
    return isinstance(backend.decoder, decoders.ByteLevel)


_ALIGNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ALIGNERS_LOCK = threading.Lock()


_SPECIAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _textless_ids(tokenizer) -> tuple[int, np.ndarray]:
    """`(vocabulary size, sorted special ids)` of `tokenizer`, cached per tokenizer."""
    size = len(tokenizer)
    try:
        cached = _SPECIAL.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == size:
        return cached
    result = (size, np.array(sorted(_special_ids(tokenizer)), dtype=np.int64))
    try:
        with _ALIGNERS_LOCK:
            _SPECIAL[tokenizer] = result
    except TypeError:
        pass
    return result


def _empty_rows(ids: np.ndarray, valid: np.ndarray, tokenizer) -> np.ndarray:
    """`[B]` bool: rows with valid tokens that are all special tokens or ids outside the vocabulary (no text)."""
    size, special = _textless_ids(tokenizer)
    textless = np.isin(ids, special) | (ids < 0) | (ids >= size)
    return valid.any(axis=1) & ~(valid & ~textless).any(axis=1)


def _get_aligner(tokenizer):
    key_len = len(tokenizer)
    try:
        cached = _ALIGNERS.get(tokenizer)
    except TypeError:  # unhashable / not weak-referenceable: no caching
        cached = None
    if cached is not None and cached[0] == key_len:
        return cached[1]
    aligner = _ByteLevelAligner(tokenizer) if _is_byte_level(tokenizer) else _GenericAligner(tokenizer)
    try:
        with _ALIGNERS_LOCK:
            _ALIGNERS[tokenizer] = (key_len, aligner)
    except TypeError:
        pass
    return aligner


def decode_with_offsets(token_ids, tokenizer) -> tuple[str, np.ndarray, np.ndarray]:
    """Decode `token_ids` (1-D, all valid) and return `(text, char_start, char_end)`.

    `text` is the decoded text with special tokens skipped (for byte-level BPE tokenizers it equals
    `tokenizer.decode(token_ids, skip_special_tokens=True)`); token `i` owns the characters
    `text[char_start[i]:char_end[i]]` (see the module docstring). The ranges tile `text` in order.
    """
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return "", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    aligner = _get_aligner(tokenizer)
    return aligner.align(aligner.index(ids))


# ----------------------------------------------------------------------------------------------------------------
# Token -> segment assignment
# ----------------------------------------------------------------------------------------------------------------


def _assign(text: str, tok_cstart: np.ndarray, tok_cend: np.ndarray, splitter) -> np.ndarray:
    n_tok = len(tok_cstart)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_ws = _WS_TABLE[np.minimum(codepoints, _WS_LIMIT)]
    nonws = np.flatnonzero(~is_ws)
    if nonws.size == 0:
        return np.zeros(n_tok, dtype=np.int64)
    # first non-whitespace char owned by each token (if any)
    j = np.searchsorted(nonws, tok_cstart, side="left")
    jc = np.minimum(j, nonws.size - 1)
    first = nonws[jc]
    has = (j < nonws.size) & (first < tok_cend)
    if not has.any():
        return np.zeros(n_tok, dtype=np.int64)
    starts = splitter(text, codepoints)
    raw = np.searchsorted(starts, first, side="right") - 1
    raw = np.where(has, np.maximum(raw, 0), -1)
    raw = np.maximum.accumulate(raw)  # join the previous token's segment
    raw[raw < 0] = raw[int(np.argmax(has))]  # leading tokens without text join the first segment
    seg = np.empty(n_tok, dtype=np.int64)
    seg[0] = 0
    np.cumsum(raw[1:] != raw[:-1], out=seg[1:])
    return seg


def _fixed_segments_torch(completion_mask: torch.Tensor, window: int) -> torch.Tensor:
    valid = completion_mask != 0
    rank = valid.long().cumsum_(dim=1).sub_(1)  # index of each valid token among its row's valid tokens
    if window > 1:
        rank.div_(window, rounding_mode="floor")
    return rank.masked_fill_(~valid, -1)


def segment_completions(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    tokenizer,
    method: str = "nltk",
    window: int = 64,
) -> torch.Tensor:
    """Label each completion token with the index of its segment (sentence, line or fixed window).

    Args:
        completion_ids: `[B, T]` generated token ids.
        completion_mask: `[B, T]`; nonzero on completion tokens. Padding may be on either side.
        tokenizer: the tokenizer that produced `completion_ids` (optional for `method="fixed"`, where it only
            serves to recognise empty completions).
        method: `"nltk"` (Punkt sentences, default), `"newline"` (lines) or `"fixed"` (token windows).
        window: window length in tokens for `method="fixed"` (>= 1).

    Returns:
        `LongTensor[B, T]` on `completion_ids.device`: segment ids `0..n_b-1` on completion tokens (contiguous,
        non-decreasing, starting at 0), `-1` where `completion_mask` is 0 and on every token of an empty
        completion (only special tokens, e.g. EOS first: no text, no segment).

    A token belongs to the segment containing the first non-whitespace character of its decoded text; tokens adding
    only whitespace or no text at all (EOS and other special tokens, trailing bytes of a multi-byte character split
    across byte-level tokens) join the segment of the previous token. See the module docstring for details.
    """
    if method not in SEGMENTATION_METHODS:
        raise ValueError(f"Unknown segmentation method={method!r}; expected one of {SEGMENTATION_METHODS}.")
    if method == "fixed" and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be an integer >= 1 for method='fixed', got window={window!r}.")
    if completion_ids.dim() != 2 or completion_ids.shape != completion_mask.shape:
        raise ValueError(
            "completion_ids and completion_mask must be 2-D tensors of the same shape, got "
            f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}."
        )
    device = completion_ids.device

    if method == "fixed":
        if device.type == "cpu":  # numpy: no intra-op thread pool round trips for this tiny op
            valid_np = completion_mask.detach().cpu().numpy() != 0
            rank_np = np.cumsum(valid_np, axis=1, dtype=np.int64)
            rank_np -= 1  # index of each valid token among its row's valid tokens
            if window > 1:
                rank_np //= int(window)
            np.copyto(rank_np, -1, where=~valid_np)
            if tokenizer is not None:
                rank_np[_empty_rows(completion_ids.detach().numpy(), valid_np, tokenizer)] = -1
            return torch.from_numpy(rank_np)
        segments = _fixed_segments_torch(completion_mask.to(device=device), int(window))
        if tokenizer is not None:  # the same test as `_empty_rows`, on the device (no host sync)
            size, special = _textless_ids(tokenizer)
            textless = torch.isin(completion_ids, torch.from_numpy(special).to(device))
            textless |= (completion_ids < 0) | (completion_ids >= size)
            valid = segments >= 0
            empty = valid.any(dim=1) & ~(valid & ~textless).any(dim=1)
            segments.masked_fill_(empty[:, None], -1)
        return segments

    if tokenizer is None:
        raise ValueError(f"A tokenizer is required for method={method!r}.")
    ids_np = completion_ids.detach().cpu().numpy()
    valid_np = completion_mask.detach().cpu().numpy() != 0
    out = np.full(ids_np.shape, -1, dtype=np.int64)
    if valid_np.any():
        aligner = _get_aligner(tokenizer)
        splitter = _SPLITTERS[method]
        idx_all = aligner.index(ids_np)
        for b in range(ids_np.shape[0]):
            cols = np.flatnonzero(valid_np[b])
            if cols.size == 0:
                continue
            text, tok_cstart, tok_cend = aligner.align(idx_all[b, cols])
            out[b, cols] = _assign(text, tok_cstart, tok_cend, splitter)
        out[_empty_rows(ids_np, valid_np, tokenizer)] = -1
    return torch.from_numpy(out).to(device)
