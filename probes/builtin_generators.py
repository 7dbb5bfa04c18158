"""Rule-based probe generators: paraphrases, variants and non-responses without an LLM.

The seed study had an LLM write paraphrases and variants; offline (and in tests) the built-in data
needs a local stand-in that is deterministic and keeps the meaning. Paraphrases swap phrases from a
fixed table of equivalents (contractions, synonyms, openers) and move conditional clauses to the
front; variants of built-in prompts are the synthetic data's own second helpful answer.
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Sequence

NONRESPONSE_SENTENCES: tuple[str, ...] = (
    "The train to the coast leaves at noon on Sundays.",
    "Penguins can drink sea water because a gland removes the salt.",
    "The library on Elm Street closes early on public holidays.",
    "Copper turns green when it reacts with air and water over many years.",
    "My grandmother kept a blue umbrella by the front door for forty years.",
    "The tallest tree in the park was planted by a sailor in 1890.",
    "Honey found in ancient tombs was still edible after thousands of years.",
    "The museum's new wing displays clocks from the eighteenth century.",
    "A group of flamingos is sometimes called a flamboyance.",
    "The ferry was delayed because of fog in the harbour this morning.",
    "Saturn would float in a bathtub large enough to hold it.",
    "The bakery on the corner painted its shutters bright yellow last spring.",
    "Lightning strikes the Empire State Building about twenty times a year.",
    "Our street gets a new set of lamp posts next autumn.",
    "The violin in the shop window once belonged to a touring orchestra.",
    "Bananas are berries, but strawberries are not.",
    "The old lighthouse was turned into a small hotel with four rooms.",
    "A snail can sleep for three years in dry weather.",
    "The parade route was changed to pass the town hall.",
    "Venus spins in the opposite direction to most other planets.",
    "Someone left a red bicycle leaning against the fountain all week.",
    "The first postage stamp showed the profile of a young queen.",
    "Owls cannot move their eyes, so they turn their whole heads.",
    "The choir rehearses in the church hall every Thursday evening.",
    "Mount Everest grows a few millimetres taller every year.",
    "The café by the river serves soup in bowls made of bread.",
    "Wombats leave droppings shaped almost like little cubes.",
    "A storm in 1987 knocked down millions of trees in one night.",
    "The school bell was replaced by a recording of a trumpet.",
    "Sea otters hold hands while they sleep so they do not drift apart.",
    "The bridge was painted grey because the red paint ran out.",
    "There are more possible games of chess than atoms in the known universe.",
    "My neighbour's parrot can whistle the first bars of a famous symphony.",
    "The desert bloomed with purple flowers after the rare spring rain.",
    "A day on Mercury lasts longer than its year.",
    "The market sells fresh figs only during the last weeks of summer.",
    "The statue in the square faces east toward the old harbour.",
    "Butterflies taste with sensors on their feet.",
    "The power went out on our block for an hour last Tuesday.",
    "The oldest known pair of trousers is about three thousand years old.",
    "A hummingbird's heart can beat more than a thousand times a minute.",
    "The town council voted to rename the main square after a poet.",
    "Glass frogs have skin so clear that you can see their hearts beating.",
    "The night bus stops outside the cinema every twenty minutes.",
    "Some cheeses are aged in caves for more than a year.",
    "The kite festival drew visitors from twelve different countries.",
    "Jellyfish have been drifting through the oceans for over five hundred million years.",
    "The antique map in the hallway shows a sea monster near Iceland.",
    "A cloud can weigh as much as a hundred elephants.",
    "The circus tent was stored in a barn over the winter.",
    "Koalas sleep for up to twenty hours a day.",
    "The old radio still picks up a station that plays only jazz.",
    "The moon moves about four centimetres farther from Earth each year.",
    "The castle's well is said to be deeper than the hill is tall.",
    "Crows can recognise the faces of individual people.",
    "The marathon route passes seven bridges across the river.",
    "A teaspoon of neutron star would weigh billions of tonnes.",
    "The hotel lobby has a piano that nobody is allowed to play.",
    "Sloths can hold their breath longer than dolphins can.",
    "The harbour cranes were painted in stripes for a festival.",
    "The first umbrellas were made to give shade from the sun.",
    "A bolt of lightning is several times hotter than the surface of the sun.",
    "The gallery hung the portrait upside down for almost two months.",
    "Ostriches have the largest eyes of any land animal.",
)

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


def _other_paraphrase(text: str, seed: int, tries: int = 8) -> str:
    """A paraphrase of `text` that differs from `paraphrase(text, seed)` if one of a few seeds gives one."""
    taken = paraphrase(text, seed)
    candidates = [paraphrase(text, seed + 7919 * k) for k in range(1, tries + 1)]
    return next((c for c in candidates if c != taken), candidates[0])


@lru_cache(maxsize=4)
def _builtin_variants(seed: int) -> dict[str, str]:
    from trainers.synthetic import synthetic_examples

    return {example.prompt: example.variant for example in synthetic_examples(seed=seed)}


class RuleBasedGenerator:
    """The local ProbeGenerator: table paraphrases, built-in variants, fixed non-response sentences."""

    name = "builtin-rules"

    def __init__(self, data_seed: int = 0):
        self.data_seed = data_seed  # the seed the built-in data was generated with (variant lookup)

    def paraphrases(self, texts: Sequence[str], seed: int) -> list[str]:
        return [paraphrase(text, seed) for text in texts]

    def variants(self, prompts: Sequence[str], chosen: Sequence[str], seed: int) -> list[str]:
        """Another helpful answer per prompt: the built-in data's variant for a built-in prompt.

        Other data has no second answer to look up, so the fallback is another paraphrase of the
        chosen answer, kept different from `paraphrase_chosen` (same seed) where the rules allow.
        It is a weaker stand-in than an LLM- or model-written variant.
        """
        known = _builtin_variants(self.data_seed)
        out = []
        for prompt, answer in zip(prompts, chosen, strict=True):
            variant = known.get(prompt)
            out.append(variant if variant is not None and variant != answer else _other_paraphrase(answer, seed))
        return out

    def nonresponses(self, n: int, seed: int) -> list[str]:
        """`n` sentences that answer nothing; without repeats until all sentences were used."""
        rng = random.Random(seed)
        out: list[str] = []
        while len(out) < n:
            batch = list(NONRESPONSE_SENTENCES)
            rng.shuffle(batch)
            out += batch[: n - len(out)]
        return [" " + sentence for sentence in out]
