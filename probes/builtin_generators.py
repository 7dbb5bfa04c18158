"""Rule-based probe generators: paraphrases, variants and non-responses without an LLM.

The seed study had an LLM write paraphrases and variants; offline (and in tests) the built-in data
needs a local stand-in that is deterministic and keeps the meaning. Paraphrases swap phrases from a
fixed table of equivalents (contractions, synonyms, openers) and move conditional clauses to the
front; variants of built-in prompts are the synthetic data's own second helpful answer.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence

from trainers.data.builtin_templates import NONRESPONSE_SENTENCES
from trainers.data.paraphrase import other_paraphrase, paraphrase


@lru_cache(maxsize=4)
def _builtin_variants(seed: int) -> dict[str, str]:
    from trainers.data.builtin import synthetic_examples

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
            out.append(variant if variant is not None and variant != answer else other_paraphrase(answer, seed))
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
