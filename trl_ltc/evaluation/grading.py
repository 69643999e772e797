"""Answer checking: math-verify for math answers, the chosen letter for multiple choice, an `answer:` line for
statements.
"""

from __future__ import annotations

import re
import threading

ANSWER_TYPES = ("math", "choice", "statement")


# Multiple choice: the letter of "answer is (C)" / "Answer: C" / "\boxed{C}" (the last such statement wins), else the
# last parenthesised letter "(C)". A bare capital letter elsewhere is not taken: "A train leaves..." is no answer.
_CHOICE_PATTERNS = (
    re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}"),
    re.compile(r"[Aa]nswer\s*(?:is|:)?\s*(?:option|choice)?\s*[:\-]?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])"),
    re.compile(r"\(([A-J])\)"),
)


def choice_letter(text: str) -> str | None:
    """The chosen option letter (`A`-`J`) of a multiple-choice completion, or `None`.

    The first of these that occurs decides, and within it the last occurrence: a `\\boxed{C}` answer; an "answer is C",
    "Answer: (C)" or "answer: **C**" statement; a parenthesised letter "(C)".
    """
    for pattern in _CHOICE_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


# `answer_type="statement"`: the rest of the line after the last "answer:".
_STATEMENT = re.compile(r"answer:([^\n]*)")


def _timeout() -> int | None:
    # math-verify bounds parsing and comparison with SIGALRM, which exists only in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def answer_is_correct(completion: str, answer, answer_type: str = "math") -> bool:
    """Whether the final answer of `completion` equals the reference `answer`.

    `answer_type="math"`: `math-verify` extracts the completion's final answer (a `\\boxed{}` or `$...$` answer or an
    "answer is ..." statement first, else the last number or expression) and checks it against `answer` (a number or
    a LaTeX expression, with or without `$`) mathematically: `12`, `12.0`, `$12$`, `1,200` = `1200`, `3/4` = `0.75`.
    `answer_type="choice"`: the option letter of `choice_letter(completion)` equals `answer` (a letter, any case).
    `answer_type="statement"`: the text after the last `answer:` on its line equals `answer` exactly (after stripping
    spaces); nothing else of the completion is parsed (the lab bench's task, `trl_ltc.lab`).
    """
    if answer_type == "choice":
        letter = choice_letter(completion)
        return letter is not None and letter.upper() == str(answer).strip().upper()
    if answer_type == "statement":
        found = _STATEMENT.findall(completion)
        return bool(found) and found[-1].strip() == str(answer).strip()
    if answer_type != "math":
        raise ValueError(f"`answer_type` must be one of {', '.join(map(repr, ANSWER_TYPES))}; got {answer_type!r}.")
    from math_verify import parse, verify

    gold_text = str(answer).strip()
    timeout = _timeout()
    delimited = gold_text if ("$" in gold_text or "\\boxed" in gold_text) else f"${gold_text}$"
    gold = parse(delimited, parsing_timeout=timeout) or parse(gold_text, parsing_timeout=timeout) or [gold_text]
    prediction = parse(completion, parsing_timeout=timeout)
    if not prediction:
        return False
    return bool(verify(gold, prediction, timeout_seconds=timeout))
