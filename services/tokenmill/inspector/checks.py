"""Cheap quality signals for one output, and the verdict they add up to. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Severity = Literal["ok", "warn", "defect"]
Verdict = Literal["pass", "warn", "defective"]

# An answer whose word trigrams are mostly repeats is looping, not answering. Below the
# minimum length the ratio is too noisy to judge.
REPETITION_NGRAM = 3
REPETITION_MIN_WORDS = 12
REPETITION_MAX_REPEATED_FRACTION = 0.5


@dataclass(frozen=True)
class Signal:
    name: str
    severity: Severity
    detail: str = ""


def check_empty(text: str) -> Signal:
    if not text.strip():
        return Signal("empty", "defect", "the output is empty or only whitespace")
    return Signal("empty", "ok")


def check_truncated(finish_reason: str, completion_tokens: int, max_tokens: int) -> Signal:
    if finish_reason == "length":
        return Signal("truncated", "warn", f"stopped at max_tokens={max_tokens}")
    return Signal("truncated", "ok", f"{completion_tokens} of {max_tokens} tokens")


def repeated_fraction(text: str, n: int = REPETITION_NGRAM) -> float:
    """The share of word n-grams that already appeared earlier in the text."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def check_repetition(text: str) -> Signal:
    words = len(text.split())
    if words < REPETITION_MIN_WORDS:
        return Signal("repetition", "ok", f"{words} words, too short to judge")
    fraction = repeated_fraction(text)
    detail = f"{fraction:.0%} of word {REPETITION_NGRAM}-grams are repeats"
    if fraction > REPETITION_MAX_REPEATED_FRACTION:
        return Signal("repetition", "defect", detail)
    return Signal("repetition", "ok", detail)


def inspect_output(
    text: str, finish_reason: str, completion_tokens: int, max_tokens: int
) -> list[Signal]:
    return [
        check_empty(text),
        check_truncated(finish_reason, completion_tokens, max_tokens),
        check_repetition(text),
    ]


def verdict(signals: list[Signal]) -> Verdict:
    severities = {s.severity for s in signals}
    if "defect" in severities:
        return "defective"
    if "warn" in severities:
        return "warn"
    return "pass"
