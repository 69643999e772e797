"""A teacher behind an OpenAI-compatible server: the trainer sends each completion, the server returns the teacher's
log-probs of its tokens.

The signals need less than the teacher's distribution: the sampled-token advantage needs `log pT(y_t)`, the margins
and TA-OPD features the teacher's log-probs on the student's top-K. `TeacherServer.score` asks the server's
completions endpoint to score prompt + completion as a prompt (no new tokens are of use) and returns, per completion
token, `log pT(y_t)` and the teacher's top-n log-probs (`trl_ltc.signals.TeacherTopLogprobs`). Two dialects:

- `"token_ids"` (vLLM, `vllm serve`): token-id prompts, several per request, with `prompt_logprobs=n`; the answer is
  keyed by token id and always holds the prompt token itself, so every value is exact.
- `"echo"` (llama.cpp's `python -m llama_cpp.server`): one text prompt per request with `echo=true, logprobs=n`;
  the server tokenizes the text again and keys its top log-probs by token *strings*. The answer is mapped back to the
  trainer's token ids: a string several ids decode to (special tokens, partial UTF-8 characters) is dropped from the
  top-n. Where the server splits the text into other tokens than the trainer's (a completion whose sampled tokens
  are not the tokenizer's own split of its text, e.g. " ten" + "th" for " tenth"), the tokens of the differing span
  and the first token after it are left unscored: they get no supervision and are counted in
  `teacher_server/unscored_frac`; after that the server's scores condition on its own split of the same text (see
  `docs/teacher_server.md` for the measured difference).

The server's log-probs are at temperature 1 (`TeachabilityGKDConfig` refuses another training temperature). Every
request is retried `max_retries` times with exponential backoff; a request that still fails raises
`TeacherServerError` naming the URL and the cause, before any update of the step (never partial scores).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import torch

from .release import LOG_PROB_FLOOR

if TYPE_CHECKING:
    from .served_teacher import ServedTeacherBlocks

__all__ = ["RowScores", "TeacherServer", "TeacherServerError", "check_server_config"]

logger = logging.getLogger(__name__)

PROBE = "Teacher server probe: 12 + 30 = 42. Ünïcödé, tabs\tand\nnew lines."
_ROWS_PER_REQUEST = 8  # token-id prompts per request (dialect "token_ids")


class TeacherServerError(RuntimeError):
    """The teacher server could not be used: unreachable, too slow, a malformed answer or another model."""


class RowScores(NamedTuple):
    """The teacher's scores of one completion, one entry per completion token."""

    logprobs: list[float]
    """`log pT(y_t)` of each completion token (floored at `log(1e-12)`)."""
    top: list[list[tuple[int, float]]]
    """The teacher's top-n `(token id, log-prob)` at each completion token, best first."""
    scored: list[bool]
    """Whether each completion token was scored (dialect `"echo"`: not where the server split the text otherwise)."""


def check_server_config(args) -> None:
    """The `teacher_server_*` fields of a `TeachabilityGKDConfig`, checked when `teacher_server_url` is set."""
    if args.loss_type == "parent":
        raise ValueError(
            "`loss_type='parent'` needs the teacher's full distribution at every position, which a teacher server "
            "does not return (only its top-n log-probs). Use `loss_type='advantage'` with `teacher_server_url`, or "
            "a local `teacher_model` with `loss_type='parent'`."
        )
    if args.temperature != 1.0:
        raise ValueError(
            f"`temperature={args.temperature}`: a teacher server returns log-probs at temperature 1, so training with "
            "`teacher_server_url` needs `temperature=1.0`."
        )
    if args.teacher_server_top_logprobs < 2:
        raise ValueError(f"`teacher_server_top_logprobs` must be >= 2; got {args.teacher_server_top_logprobs}.")
    if args.supervision == "token_teachability" and args.token_top_k > args.teacher_server_top_logprobs:
        raise ValueError(
            f"`token_top_k={args.token_top_k}` is larger than `teacher_server_top_logprobs="
            f"{args.teacher_server_top_logprobs}`: the TA-OPD features take the teacher's top-`token_top_k` tokens, "
            "and the server returns only its top-n. Raise `teacher_server_top_logprobs` or lower `token_top_k`."
        )
    if not args.teacher_server_timeout > 0:
        raise ValueError(f"`teacher_server_timeout` must be > 0 seconds; got {args.teacher_server_timeout}.")
    if args.teacher_server_max_retries < 0:
        raise ValueError(f"`teacher_server_max_retries` must be >= 0; got {args.teacher_server_max_retries}.")
    if args.teacher_server_concurrency < 1:
        raise ValueError(f"`teacher_server_concurrency` must be >= 1; got {args.teacher_server_concurrency}.")


class TeacherServer:
    """A client of an OpenAI-compatible completions server that serves the teacher.

    Args:
        url: the server's base URL, e.g. `"http://localhost:8000"` (a trailing `/v1` is accepted).
        tokenizer: the trainer's tokenizer (the teacher's must be the same).
        model: the model name the server must serve; by default its only model.
        top_logprobs: n, the teacher's top-n log-probs asked per position; more than the tokenizer's vocabulary is
            lowered to it (a vLLM server's engine dies on a top-n above its vocabulary).
        timeout: seconds one request may take.
        max_retries: retries of a failed request, with backoff 0.5 s, 1 s, 2 s, ...
        concurrency: requests in flight at once.

    Construction checks the server (`check`): its model, its tokenizer against ours on a probe string, and one round
    trip of scores; each failure raises `TeacherServerError` naming the URL.
    """

    def __init__(self, url, tokenizer, model=None, top_logprobs=20, timeout=120.0, max_retries=3, concurrency=4):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.tokenizer = tokenizer
        self.top_logprobs, self.timeout, self.max_retries = top_logprobs, timeout, max_retries
        if top_logprobs > len(tokenizer):
            # vLLM's engine dies on a top-n above its vocabulary (`selected index k out of range`, then every later
            # request is refused); the whole vocabulary is the most a server can return anyway.
            logger.warning(
                "`teacher_server_top_logprobs=%d` is more than the %d tokens of the vocabulary: asking for %d.",
                top_logprobs, len(tokenizer), len(tokenizer),
            )  # fmt: skip
            self.top_logprobs = len(tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-server")
        self.model, self.dialect = self._served_model(model)
        self._strings = _token_strings(tokenizer) if self.dialect == "echo" else None
        self.check()

    @classmethod
    def from_config(cls, args, tokenizer) -> TeacherServer:
        return cls(
            args.teacher_server_url, tokenizer, model=args.teacher_server_model,
            top_logprobs=args.teacher_server_top_logprobs, timeout=args.teacher_server_timeout,
            max_retries=args.teacher_server_max_retries, concurrency=args.teacher_server_concurrency,
        )  # fmt: skip

    @classmethod
    def for_trainer(cls, trainer) -> TeacherServer:
        """The server of `trainer.args.teacher_server_url`, checked against the trainer's tokenizer."""
        if trainer._is_vlm:
            raise ValueError(
                "`teacher_server_url` scores text completions: a vision-language student is not supported."
            )
        server = cls.from_config(trainer.args, trainer._tokenizer)
        if trainer.spec.online and server.dialect != "token_ids":
            raise ValueError(
                f"`rollout_truncation='online'` decides on the teacher's scores of every new token, and the teacher "
                f"server at {server.url} takes text prompts (llama.cpp), which leave the tokens it splits otherwise "
                "unscored. Serve the teacher with vLLM (token-id prompts), or set `rollout_truncation='none'`."
            )
        return server

    def blocks(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, vocab_size: int) -> ServedTeacherBlocks:
        """The block scorer of an online rollout of these (left-padded) prompts."""
        from .served_teacher import ServedTeacherBlocks

        return ServedTeacherBlocks(self, prompt_ids, prompt_mask, vocab_size)

    # --- transport ---------------------------------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> dict:
        """One JSON request, retried on connection errors, timeouts, 5xx answers and malformed JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:300]
                cause = f"HTTP {error.code} {error.reason}: {detail}"
                if error.code < 500:  # the request itself is wrong: retrying does not help
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                slow = isinstance(reason, TimeoutError) or "timed out" in str(reason)
                cause = f"no answer within {self.timeout:g} s" if slow else f"unreachable ({reason})"
            except json.JSONDecodeError as error:
                cause = f"the answer is not JSON ({error})"
            if attempt < self.max_retries:
                time.sleep(0.5 * 2**attempt)
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        raise TeacherServerError(f"Teacher server {self.url}{path}: {cause} ({tries}).")

    def _served_model(self, model: str | None) -> tuple[str, str]:
        answer = self._request("/v1/models")
        try:
            served = [(entry["id"], entry.get("owned_by")) for entry in answer["data"]]
        except (KeyError, TypeError) as error:
            malformed = f"Teacher server {self.url}/v1/models: malformed answer {answer!r:.200}."
            raise TeacherServerError(malformed) from error
        names = [name for name, _ in served]
        if model is None and len(served) != 1:
            raise TeacherServerError(
                f"Teacher server {self.url} serves {len(served)} models ({names}); set `teacher_server_model` to one."
            )
        if model is not None and model not in names:
            raise TeacherServerError(
                f"Teacher server {self.url} serves {names}, not `teacher_server_model={model!r}`: point "
                "`teacher_server_url` at the server of the teacher, or fix the name."
            )
        name = model if model is not None else names[0]
        owner = dict(served)[name]
        return name, "token_ids" if owner == "vllm" else "echo"

    # --- checks ------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """The server tokenizes a probe string as our tokenizer does, and scores one sequence with finite values."""
        ids = self.tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        theirs = self._tokenize(PROBE)
        if theirs is not None and theirs[-len(ids) :] != ids:
            raise TeacherServerError(
                f"The teacher server at {self.url} tokenizes {PROBE!r} as {theirs} and the trainer's tokenizer as "
                f"{ids}: the teacher must share the student's tokenizer."
            )
        prompt = _probe_prompt(self.tokenizer)
        [row] = self.score([prompt], [ids])
        if not all(row.scored):
            raise TeacherServerError(
                f"The teacher server at {self.url} scored {sum(row.scored)} of the {len(ids)} tokens of a probe "
                "completion: its answer does not line up with the trainer's token ids."
            )

    def _tokenize(self, text: str) -> list[int] | None:
        """The server's tokenization of `text` (vLLM `/tokenize`, llama.cpp `/extras/tokenize`), or None."""
        path, body = ("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        if self.dialect == "echo":
            path, body = "/extras/tokenize", {"input": text}
        try:
            answer = self._request(path, body)
        except TeacherServerError as error:
            if "HTTP 404" in str(error):
                return None
            raise
        return answer.get("tokens")

    # --- scoring -----------------------------------------------------------------------------------------------
    def score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[RowScores]:
        """The teacher's scores of each completion after its prompt (token ids), requests run concurrently."""
        if self.dialect == "token_ids":
            starts = range(0, len(prompts), _ROWS_PER_REQUEST)
            batches = [(prompts[i : i + _ROWS_PER_REQUEST], completions[i : i + _ROWS_PER_REQUEST]) for i in starts]
            return [row for rows in self._pool.map(lambda b: self._score_token_ids(*b), batches) for row in rows]
        return list(self._pool.map(self._score_echo, prompts, completions))

    def _completion(self, body: dict) -> dict:
        body = {"model": self.model, "max_tokens": 1, "temperature": 1.0, **body}
        return self._request("/v1/completions", body)

    def _malformed(self, what: str) -> TeacherServerError:
        return TeacherServerError(f"Teacher server {self.url}/v1/completions: malformed answer ({what}).")

    def _score_token_ids(self, prompts, completions) -> list[RowScores]:
        sequences = [p + c for p, c in zip(prompts, completions)]
        answer = self._completion({"prompt": sequences, "prompt_logprobs": self.top_logprobs})
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            rows = []
            for prompt, completion, choice in zip(prompts, completions, choices, strict=True):
                entries = choice["prompt_logprobs"][len(prompt) :]
                if len(entries) != len(completion):
                    raise ValueError(f"{len(entries)} prompt log-probs for {len(completion)} completion tokens")
                logprobs = [_floored(entry[str(token)]["logprob"]) for token, entry in zip(completion, entries)]
                n = self.top_logprobs
                top = [_top(((int(i), e["logprob"]) for i, e in entry.items() if e.get("rank", 1) <= n), n)
                       for entry in entries]  # fmt: skip
                rows.append(RowScores(logprobs, top, [True] * len(completion)))
        except (KeyError, TypeError, ValueError) as error:
            raise self._malformed(f"{type(error).__name__}: {error}") from error
        return rows

    def _score_echo(self, prompt: list[int], completion: list[int]) -> RowScores:
        ids = prompt + completion
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        answer = self._completion({"prompt": text, "echo": True, "logprobs": self.top_logprobs})
        try:
            logprobs = answer["choices"][0]["logprobs"]
            tokens, values, tops = logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]
            usage = answer.get("usage") or {}
            generated = int(usage.get("completion_tokens", 0))
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise self._malformed(f"{type(error).__name__}: {error}") from error
        entries = list(zip(tokens, values, tops, strict=True))[: len(tokens) - generated]
        return self._align_echo(ids, len(prompt), entries, usage.get("prompt_tokens"))

    def _align_echo(self, ids: list[int], prompt_length: int, entries: list, server_length: int | None) -> RowScores:
        """Map echoed entries (token string, log-prob, top strings) back to our completion tokens.

        llama.cpp's server echoes each token with the distribution it was drawn from when the sequence starts with
        the model's BOS (a ChatML prompt starts with it), which it drops from the echo with every later occurrence;
        or when the server adds a BOS of its own (then every token is echoed). Without a BOS its echo is shifted by
        one token, which is refused. The entries are matched to our tokens by their strings (longest matching runs);
        where the server split the text into other tokens, those tokens and the first one after them are unscored.
        """
        strings = self._strings
        bos = None if server_length == len(ids) + 1 else ids[0]  # the server added a BOS: every token is echoed
        if bos is not None and server_length == len(ids) and len(entries) == len(ids):
            raise TeacherServerError(
                f"The teacher server at {self.url} echoes log-probs shifted by one token: its model adds no BOS token "
                f"and the sequences do not start with one (the first token is {strings.text[ids[0]]!r}). llama.cpp's "
                "echo is aligned only when a sequence starts with the model's BOS; use a chat template that starts "
                "with it, or a vLLM server."
            )
        positions = [p for p in range(0 if bos is None else 1, len(ids)) if ids[p] != bos]
        matcher = difflib.SequenceMatcher(
            None, [strings.text[ids[p]] for p in positions], [entry[0] for entry in entries], autojunk=False
        )
        completion = len(ids) - prompt_length
        logprobs, top, scored = [0.0] * completion, [[] for _ in range(completion)], [False] * completion
        for ours, theirs, size in matcher.get_matching_blocks():
            # The first token after a differing span was drawn from a context that ends in other tokens: not scored.
            skip = 0 if ours == theirs == 0 else 1
            pairs = zip(positions[ours + skip : ours + size], entries[theirs + skip : theirs + size])
            for position, (_, value, top_strings) in pairs:
                if position < prompt_length:
                    continue
                if value is None or top_strings is None:
                    raise self._malformed(f"no log-probs for completion token {position - prompt_length}")
                t = position - prompt_length
                mapped = ((strings.ids.get(s), v) for s, v in top_strings.items())
                top[t] = _top(((i, v) for i, v in mapped if i is not None), self.top_logprobs)
                logprobs[t], scored[t] = _floored(value), True
        return RowScores(logprobs, top, scored)


class _Strings(NamedTuple):
    text: list[str]  # the string llama.cpp echoes for each token id
    ids: dict[str, int]  # string -> the one id that echoes it (strings of several ids are left out)


def _token_strings(tokenizer) -> _Strings:
    """How llama.cpp's server renders each token id in an echo: its bytes decoded as UTF-8 with invalid bytes dropped,
    special tokens as the empty string."""
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)
    }
    text = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            text.append("")
            continue
        piece = tokenizer.convert_ids_to_tokens(token_id)
        raw = _byte_level_bytes(piece)
        text.append(raw.decode("utf-8", errors="ignore") if raw is not None else tokenizer.decode([token_id]))
    owners: dict[str, list[int]] = {}
    for token_id, string in enumerate(text):
        owners.setdefault(string, []).append(token_id)
    return _Strings(text, {s: ids[0] for s, ids in owners.items() if len(ids) == 1})


@functools.cache
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_bytes(piece: str) -> bytes | None:
    """The bytes of a byte-level BPE token (GPT-2 alphabet), or None for another kind of token."""
    decoder = _byte_decoder()
    if not all(c in decoder for c in piece):
        return None
    return bytes(decoder[c] for c in piece)


def _probe_prompt(tokenizer) -> list[int]:
    """A chat prompt when the tokenizer has a chat template (it starts as the trainer's prompts do), else one token."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "What is 12 + 30?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer("Probe:", add_special_tokens=False)["input_ids"]


def _floored(value) -> float:
    value = float(value)
    if math.isnan(value):
        raise ValueError("a log-prob is NaN")
    return max(value, LOG_PROB_FLOOR)


def _top(pairs, n: int) -> list[tuple[int, float]]:
    return sorted(((int(i), _floored(v)) for i, v in pairs), key=lambda p: -p[1])[:n]
