"""Sequence scores for PPO: a transparent rule for the built-in data, or a trained reward model.

The rule rewards an answer for using the key words of the question (an off-topic answer gets
nothing) and penalises the stock phrases of unhelpful answers (`UNHELPFUL_PHRASES`, kept beside the
built-in rejected templates they come from). The built-in rejected answers reuse the question's
nouns too, so on them the stock phrases carry the separation. It is meant for the embedded
default, where it separates chosen from rejected on ~all pairs (tests/trainers/model/test_rewards.py); on real
data use a reward model.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from trainers.data.builtin_templates import UNHELPFUL_PHRASES

STOPWORDS = frozenset("""
about above after again against also because been before being below between both could does doing down during each
from further have having here into itself just more most other ought over same should some such than that their theirs
them then there these they this those through under until very what when where which while whom will with would your
yours yourself want know need help please thanks thank really good make best tell like think something anything someone
""".split())
WORD = re.compile(r"[a-z][a-z']+")


def key_words(prompt: str) -> set[str]:
    """Content words of the last human turn."""
    last_turn = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0].lower()
    return {w for w in WORD.findall(last_turn) if len(w) >= 4 and w not in STOPWORDS}


def rule_reward(prompt: str, response: str) -> float:
    """In [-1, 1]: share of (up to 4 of) the question's key words the answer uses, minus 1 for any
    unhelpful stock phrase."""
    wanted = key_words(prompt)
    used = wanted & set(WORD.findall(response.lower()))
    coverage = min(1.0, len(used) / max(1, min(4, len(wanted))))
    unhelpful = any(phrase in response.lower() for phrase in UNHELPFUL_PHRASES)
    return coverage - (1.0 if unhelpful else 0.0)


def make_reward_fn(spec: str, tokenizer=None, device: str = "cpu", max_prompt_tokens: int = 160,
                   max_response_tokens: int = 64) -> Callable[[Sequence[str], Sequence[str]], torch.Tensor]:
    """'rule', or a reward-model folder: (prompts, responses) texts -> scores [B]."""
    if spec == "rule":
        return lambda prompts, responses: torch.tensor([rule_reward(p, r) for p, r in zip(prompts, responses)])
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
