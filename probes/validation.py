"""Checks on a written probe before it may enter a probe set.

A reply is rejected when it is empty (or the service blocked it), a refusal (an apology or AI
disclaimer at its start, or declining the task in its first sentence), a copy of its source (up to
case, whitespace and wrapping quotes), longer than max_words x length_slack words, or shaped like a
transcript (speaker labels such as "Human:" / "Assistant:"). A rejected reply is asked
for again with another seed and temperature; what is still rejected after the last attempt is a
failure of that probe.

A refusal is only a defect when the source was not one itself: the paraphrase of a rejected answer
"I'm sorry, I can't do that" may well start with "I'm sorry".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EMPTY, BLOCKED, REFUSAL, IDENTICAL, TOO_LONG, TURN_MARKER, UNAVAILABLE = (
    "empty", "blocked", "refusal", "identical", "too_long", "turn_marker", "unavailable")

_APOSTROPHE = "['\u2019]"
# an apology or AI disclaimer opening the reply ...
_REFUSAL_OPENER = re.compile(
    rf"^\W*(i{_APOSTROPHE}m\s+(so\s+)?sorry|i\s+am\s+(so\s+)?sorry|sorry\b|(my\s+)?apologies\b|i\s+apologi[sz]e"
    r"|as\s+an\s+ai\b|as\s+a\s+(large\s+)?language\s+model\b)",
    re.IGNORECASE)
# ... or declining the task in the first sentence ("I can't help with that", "I won't rewrite this")
_DECLINE = re.compile(
    rf"\b(i|we)\s+(can{_APOSTROPHE}?t|cannot|can\s+not|won{_APOSTROPHE}t|will\s+not|(am|{_APOSTROPHE}m)\s+(unable|not\s+able)\s+to"
    r"|must\s+decline|have\s+to\s+decline|refuse)\b[^.!?\n]{0,40}?\b(help|assist|comply|provide|fulfil+|do\s+th(at|is)"
    r"|rewrite|rephrase|paraphrase|answer|respond|write|create|generate|continue|complete|engage|support)\b"
    r"|\bi\s+must\s+decline\b",
    re.IGNORECASE)
_SPEAKER = re.compile(r"\b(human|assistant)\s*:", re.IGNORECASE)              # anywhere
_LINE_SPEAKER = re.compile(r"^\s*(user|ai|h|a)\s*:", re.IGNORECASE | re.MULTILINE)  # at a line start


@dataclass(frozen=True)
class ValidationRules:
    max_words: int = 50
    length_slack: float = 1.5     # a reply may have up to max_words * length_slack words

    @property
    def word_limit(self) -> int:
        return int(self.max_words * self.length_slack)


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form, without wrapping quotes: what 'identical' compares."""
    text = " ".join(text.split()).casefold()
    return text.strip("\"'\u201c\u201d\u2018\u2019 ")


def is_refusal(text: str) -> bool:
    """An apology / AI disclaimer at the start, or declining the task in the first sentence."""
    text = text.strip()
    first_sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return bool(_REFUSAL_OPENER.match(text) or _DECLINE.search(first_sentence))


def has_turn_marker(text: str) -> bool:
    """Speaker labels: 'Human:' / 'Assistant:' anywhere, or a line starting with 'User:' / 'AI:' / 'H:' / 'A:'."""
    return bool(_SPEAKER.search(text) or _LINE_SPEAKER.search(text))


def reject_reason(text: str, source: str, rules: ValidationRules) -> str | None:
    """Why `text` cannot be used as a probe written from `source` (None: it can)."""
    if not text.strip():
        return EMPTY
    if is_refusal(text) and not is_refusal(source):
        return REFUSAL
    if source.strip() and normalise(text) == normalise(source):
        return IDENTICAL
    if len(text.split()) > rules.word_limit:
        return TOO_LONG
    if has_turn_marker(text):
        return TURN_MARKER
    return None
