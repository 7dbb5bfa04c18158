"""Sequence scores for PPO: transparent rules for the built-in data, or a trained reward model.

`rule` rewards an answer for using the key words of the question (an off-topic answer gets
nothing) and penalises the stock phrases of unhelpful answers (`UNHELPFUL_PHRASES`, kept beside the
built-in rejected templates they come from). The built-in rejected answers reuse the question's
nouns too, so on them the stock phrases carry the separation. Both rules are meant for the embedded
default, where they separate chosen from rejected on ~all pairs (tests/trainers/model/test_rewards.py);
on real data use a reward model.

`rule` is sparse for a small policy: a key word counts only when copied exactly from the prompt, so
on samples of the 60-step SFT warm-up of tiny-pythia-1m it was 0 on ~89% of them (mean 0.03) and
PPO had next to nothing to follow. `dense-rule` averages that coverage with a second, graded term
the policy can climb step by step: how many distinct words of the built-in helpful answers'
vocabulary the answer uses (up to `HELPFUL_WORDS_WANTED`), i.e. how much it sounds like a helpful
answer of this data set (on the same samples: non-zero on ~all, spread ~0.2). Like any rule it can
be gamed (helpful words strung together score well); the KL penalty is what keeps that in check.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from trainers.data.builtin_templates import TOPICS, UNHELPFUL_PHRASES

STOPWORDS = frozenset("""
about above after again against also because been before being below between both could does doing down during each
from further have having here into itself just more most other ought over same should some such than that their theirs
them then there these they this those through under until very what when where which while whom will with would your
yours yourself want know need help please thanks thank really good make best tell like think something anything someone
""".split())
WORD = re.compile(r"[a-z][a-z']+")
HELPFUL_WORDS_WANTED = 6  # distinct helpful-vocabulary words for full credit (a built-in chosen answer has ~10)


def key_words(prompt: str) -> set[str]:
    """Content words of the last human turn."""
    last_turn = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0].lower()
    return {w for w in WORD.findall(last_turn) if len(w) >= 4 and w not in STOPWORDS}


def content_words(text: str) -> list[str]:
    """Words of 4+ letters that are not stop words, in order (repeats kept)."""
    return [w for w in WORD.findall(text.lower()) if len(w) >= 4 and w not in STOPWORDS]


def _helpful_vocabulary() -> frozenset[str]:
    words = set()
    for topic in TOPICS:
        for text in topic.answers + topic.a + topic.b:
            words.update(content_words(text))
    return frozenset(words)


HELPFUL_VOCABULARY = _helpful_vocabulary()  # content words of the built-in helpful answers and their slot fillers


def key_word_coverage(prompt: str, response: str) -> float:
    """In [0, 1]: share of (up to 4 of) the question's key words the answer uses."""
    wanted = key_words(prompt)
    used = wanted & set(WORD.findall(response.lower()))
    return min(1.0, len(used) / max(1, min(4, len(wanted))))


def is_unhelpful(response: str) -> bool:
    return any(phrase in response.lower() for phrase in UNHELPFUL_PHRASES)


def helpful_register(response: str) -> float:
    """In [0, 1]: distinct helpful-vocabulary words the answer uses, over HELPFUL_WORDS_WANTED (capped).

    Distinct words, so repeating one does not pay; a count, not a share, so stopping early does not pay either."""
    used = {w for w in content_words(response) if w in HELPFUL_VOCABULARY}
    return min(1.0, len(used) / HELPFUL_WORDS_WANTED)


def rule_reward(prompt: str, response: str) -> float:
    """In [-1, 1]: share of (up to 4 of) the question's key words the answer uses, minus 1 for any
    unhelpful stock phrase."""
    return key_word_coverage(prompt, response) - (1.0 if is_unhelpful(response) else 0.0)


def dense_rule_reward(prompt: str, response: str) -> float:
    """In [-1, 1]: the mean of key-word coverage and the helpful register, minus 1 for any unhelpful stock phrase."""
    score = (key_word_coverage(prompt, response) + helpful_register(response)) / 2
    return score - (1.0 if is_unhelpful(response) else 0.0)


RULES = {"rule": rule_reward, "dense-rule": dense_rule_reward}


def make_reward_fn(spec: str, tokenizer=None, device: str = "cpu", max_prompt_tokens: int = 160,
                   max_response_tokens: int = 64) -> Callable[[Sequence[str], Sequence[str]], torch.Tensor]:
    """'rule', 'dense-rule', or a reward-model folder: (prompts, responses) texts -> scores [B]."""
    if spec in RULES:
        rule = RULES[spec]
        return lambda prompts, responses: torch.tensor([rule(p, r) for p, r in zip(prompts, responses)])
    from trainers.data.collate import collate_sequences, encode_prompt, encode_response
    from trainers.model.reward_model import load_reward_model

    model, reward_tokenizer = load_reward_model(spec)
    model.to(device).eval()
    tokenizer = reward_tokenizer or tokenizer

    def score(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        # encoded as in training (prompt and response separately, EOS, truncation): the score is read there
        prompt_ids = [encode_prompt(tokenizer, p, max_prompt_tokens)[0] for p in prompts]
        response_ids = [encode_response(tokenizer, r, max_response_tokens)[0] for r in responses]
        batch = collate_sequences(prompt_ids, response_ids, tokenizer.pad_token_id)
        with torch.no_grad():
            return model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()

    return score
