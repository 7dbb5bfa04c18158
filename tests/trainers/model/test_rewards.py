"""The built-in rule rewards: hand-made cases and how well they separate the built-in pairs."""
import pytest

from trainers.data.pairs import load_preference_data
from trainers.model.rewards import dense_rule_reward, helpful_register, key_words, make_reward_fn, rule_reward

PROMPT = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: How should I water my tomato plants in summer?\n\nAssistant:"


def test_key_words_come_from_the_last_human_turn():
    assert key_words(PROMPT) == {"water", "tomato", "plants", "summer"}


@pytest.mark.parametrize("response, expected", [
    (" Water the tomato plants deeply each summer morning.", 1.0),       # 4 of 4 key words
    (" Give tomato roots a deep soak.", 0.25),                            # 1 of 4
    (" I'm sorry, but I can't help with tomato questions.", 0.25 - 1.0),  # unhelpful stock phrase
    (" Octopuses have three hearts.", 0.0),
])
def test_rule_reward_hand_cases(response, expected):
    assert rule_reward(PROMPT, response) == pytest.approx(expected)


def test_rule_reward_prefers_chosen_on_the_builtin_pairs():
    pairs = load_preference_data("builtin", "train", max_rows=500).pairs
    score = make_reward_fn("rule")
    chosen = score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = score([p.prompt for p in pairs], [p.rejected for p in pairs])
    accuracy = (chosen > rejected).float().mean().item()
    assert accuracy > 0.95, accuracy


def test_every_rejected_template_carries_a_stock_phrase():
    from trainers.data.builtin_templates import REJECTED, UNHELPFUL_PHRASES

    missing = [t for t in REJECTED if not any(p in t.lower() for p in UNHELPFUL_PHRASES)]
    assert missing == []
    unused = [p for p in UNHELPFUL_PHRASES if not any(p in t.lower() for t in REJECTED)]
    assert unused == []                                    # each phrase still comes from a template


# hand-counted: soften, garlic, simmer, gently and heat are words of the built-in cooking answers
@pytest.mark.parametrize("response, expected", [
    (" Soften the garlic, simmer gently.", 4 / 6),                         # 4 distinct helpful words of 6 wanted
    (" Soften the garlic.", 2 / 6),                                       # stopping early earns less
    (" Simmer simmer simmer simmer.", 1 / 6),                             # a repeat counts once
    (" Soften the garlic, simmer gently over low heat with a little lentil soup.", 1.0),  # 8 distinct: capped
    (" Octopuses glow purple.", 0.0),                                    # none of them
])
def test_helpful_register_hand_cases(response, expected):
    assert helpful_register(response) == pytest.approx(expected)


@pytest.mark.parametrize("response, expected", [
    (" Water the tomato plants gently.", (3 / 4 + 4 / 6) / 2),            # 3 of 4 key words; 4 helpful words
    (" Soften the garlic, simmer gently.", (0.0 + 4 / 6) / 2),             # no key word, still graded
    (" I'm sorry, but soften the garlic and simmer gently.", (0.0 + 4 / 6) / 2 - 1.0),
    (" Octopuses glow purple.", 0.0),                                    # none of them
])
def test_dense_rule_hand_cases(response, expected):
    assert dense_rule_reward(PROMPT, response) == pytest.approx(expected)
    assert make_reward_fn("dense-rule")([PROMPT], [response]).item() == pytest.approx(expected)


def test_dense_rule_prefers_chosen_on_the_builtin_pairs():
    pairs = load_preference_data("builtin", "train", max_rows=500).pairs
    score = make_reward_fn("dense-rule")
    chosen = score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = score([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert (chosen > rejected).float().mean().item() > 0.95
