"""Rule paraphrases: a meaning-preserving rephrasing from a fixed table of equivalents.

Part of the built-in data set (its tokenizer covers these paraphrases), and the probe builder's
offline stand-in for an LLM. Deterministic in (text, seed), so every process gets the same text.
"""
from __future__ import annotations

import random
import re

# groups of interchangeable phrases (each swaps to another of its group), matched longest first
_EQUIVALENTS: tuple[tuple[str, ...], ...] = (
    ("Sure!", "Of course!", "Certainly!"),
    ("Good question.", "Great question.", "That is a good question."),
    ("Happy to help.", "Glad to help.", "I am happy to help."),
    ("do not", "don't"), ("does not", "doesn't"), ("cannot", "can't"), ("is not", "isn't"),
    ("would not", "wouldn't"), ("will not", "won't"), ("it is", "it's"), ("that is", "that's"),
    ("I am", "I'm"), ("I would", "I'd"), ("I have", "I've"), ("you will", "you'll"), ("let us", "let's"),
    ("often", "frequently"), ("usually", "normally", "typically"), ("really", "truly"),
    ("honestly", "frankly"), ("probably", "likely"), ("eventually", "in the end"), ("maybe", "perhaps"),
    ("a few", "several"), ("make sure", "be sure"), ("carefully", "with care"), ("gently", "softly"),
    ("slowly", "at a slow pace"), ("gradually", "bit by bit"), ("step by step", "one step at a time"),
    ("simple", "basic"), ("mistakes", "errors"), ("choose", "pick"), ("enough", "sufficient"),
    ("large", "big"), ("plenty of", "lots of"), ("advice", "guidance"), ("problems", "issues"),
    ("soon", "shortly"), ("afterwards", "after that"), ("everyone", "everybody"), ("anyone", "anybody"),
    ("someone", "somebody"), ("nobody", "no one"), ("lovely", "wonderful"), ("exciting", "thrilling"),
    ("silly", "foolish"), ("boring", "dull"), ("embarrassing", "awkward"), ("anyway", "in any case"),
    ("I guess", "I suppose"), ("at once", "at the same time"), ("right now", "at the moment"),
    ("figure it out", "work it out"), ("stop bothering me", "quit bothering me"), ("a short", "a brief"),
    ("weekly", "every week"), ("twice a week", "two times a week"), ("once a year", "every year"),
    ("start with", "begin with"), ("Start the", "Begin the"), ("start early", "begin early"),
    ("rarely", "seldom"), ("aloud", "out loud"), ("right after", "just after"), ("near the end", "towards the end"),
)
# one-way swaps: the reverse direction would be wrong in some contexts ("daily money")
_ONE_WAY: dict[str, tuple[str, ...]] = {
    "every day": ("daily",), "each week": ("every week", "weekly"), "a bit": ("a little", "somewhat"),
    "check the": ("look at the", "inspect the"), "then": ("after that",), "small": ("little",),
}
_ALTERNATIVES: dict[str, tuple[str, ...]] = {
    phrase.lower(): tuple(other for other in group if other != phrase) for group in _EQUIVALENTS for phrase in group
}
_ALTERNATIVES.update(_ONE_WAY)
_PHRASE_RE = re.compile(
    r"(?<![\w'])(" + "|".join(re.escape(p) for p in sorted(_ALTERNATIVES, key=len, reverse=True)) + r")(?![\w'])",
    re.IGNORECASE,
)
_CONDITION_RE = re.compile(r"^(?P<main>[^,]+?),? (?P<word>if|because|when) (?P<cond>[^,]+)\.$")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_KEEP_CAPITALISED = ("I ", "I'", "Python", "English")
# steps of a list are split into sentences only when each starts with one of these (an instruction)
_IMPERATIVES = frozenset("""
    accept add adjust apply arrive ask avoid bake batch be begin block book break bring build buy call carry
    check clean clear compare cook copy cut decide dim do draft drive dry eat end explain feed film find finish
    fix focus fold follow freeze get give go group handle ignore increase keep learn lean leave let limit list
    look loosen lower make match measure mention mix move note offer open pack pay pick plan plant play practise
    practice praise prepare preheat protect pull put read record reduce rehearse remove repeat repot rest review
    reward rinse run scrub season select set share shoot slow soften solve sort sow speak spend split start
    stay stir stop stretch study tackle take talk teach tell test tighten time track train treat trim try turn
    use wait warm watch water wear weigh wipe work write
""".split())
_STEP_WORDS = ((), (), ("First,", "Then,", "Finally,"), ("First,", "Then,", "Next,", "Finally,"))


def _match_case(replacement: str, original: str) -> str:
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return _lower_first(replacement)


def _lower_first(text: str) -> str:
    return text if text.startswith(_KEEP_CAPITALISED) else text[0].lower() + text[1:]


def _swap_phrases(text: str, rng: random.Random) -> str:
    matches = list(_PHRASE_RE.finditer(text))
    if not matches:
        return text
    chosen = [rng.random() < 0.8 for _ in matches]
    if not any(chosen):
        chosen[rng.randrange(len(matches))] = True
    pieces, last = [], 0
    for match, swap in zip(matches, chosen):
        if swap:
            phrase = match.group(0)
            pieces += [text[last:match.start()], _match_case(rng.choice(_ALTERNATIVES[phrase.lower()]), phrase)]
            last = match.end()
    return "".join(pieces) + text[last:]


def _split_steps(sentence: str) -> str:
    """'Do A, do B, and do C.' -> 'First, do A. Then, do B. Finally, do C.' (order kept); else unchanged."""
    if not sentence.endswith("."):
        return sentence
    parts = sentence[:-1].split(", ")
    if len(parts) < 2 or not parts[-1].startswith("and "):
        return sentence
    steps = parts[:-1] + [parts[-1][len("and "):]]
    if len(steps) > 4 or any(step.split(" ", 1)[0].lower() not in _IMPERATIVES or " " not in step for step in steps):
        return sentence
    if len(steps) == 2:
        return f"{steps[0]}. Also, {_lower_first(steps[1])}."
    words = _STEP_WORDS[len(steps) - 1]
    return " ".join(f"{word} {_lower_first(step)}." for word, step in zip(words, steps))


def _front_condition(sentence: str) -> str:
    """'Do X if Y.' -> 'If Y, do X.' (the same meaning, clauses reordered); else unchanged."""
    match = _CONDITION_RE.match(sentence)
    if not match:
        return sentence
    main, word, condition = match.group("main", "word", "cond")
    return f"{word.capitalize()} {condition}, {_lower_first(main)}."


def _rephrase(body: str, rng: random.Random, chance: float) -> str:
    sentences = _SENTENCE_END_RE.split(body)
    sentences = [_split_steps(s) if rng.random() < chance else s for s in sentences]
    sentences = [_front_condition(s) if rng.random() < chance else s for s in sentences]
    return _swap_phrases(" ".join(sentences), rng)


def paraphrase(text: str, seed: int) -> str:
    """A meaning-preserving rephrasing of `text`, deterministic in (text, seed); keeps leading space."""
    rng = random.Random(f"{seed}\x00{text}")  # str seeds hash with sha512: stable across processes
    body = text.lstrip()
    leading = text[: len(text) - len(body)]
    if not body:
        return text
    result = _rephrase(body, rng, 0.7)
    if result == body:  # the random pass changed nothing: apply every rule that fits
        result = _rephrase(body, rng, 1.0)
    if result == body:  # no rule fits: still say it differently
        result = "Put simply, " + _lower_first(body)
    return leading + result


def other_paraphrase(text: str, seed: int, tries: int = 8) -> str:
    """A paraphrase of `text` that differs from `paraphrase(text, seed)` if one of a few seeds gives one."""
    taken = paraphrase(text, seed)
    candidates = [paraphrase(text, seed + 7919 * k) for k in range(1, tries + 1)]
    return next((c for c in candidates if c != taken), candidates[0])


