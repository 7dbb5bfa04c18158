"""Reward model: Bradley-Terry loss by hand, where the score is read, save/load, and a short training run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from trainers.data.collate import load_training_pairs
from trainers.model.reward_model import (
    META_FILE,
    RewardModel,
    bradley_terry_loss,
    load_reward_model,
    reward_loss,
)
from trainers.runs.reward_training import RewardModelConfig, train_reward_model


def scores(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-x)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: these models are tiny, and on a busy 2-core machine two
    threads made a forward up to 100x slower (measured: 7 ms vs 0.5-0.8 s per short sequence)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- Bradley-Terry loss

def test_bradley_terry_hand_computed():
    out = bradley_terry_loss(scores(2.0, 0.5, -1.0), scores(1.0, 0.5, 1.0))
    # margins 1, 0, -2: -log sigma(1) = log(1 + e^-1) = 0.3133, -log sigma(0) = log 2 = 0.6931,
    # -log sigma(-2) = log(1 + e^2) = 2.1269; mean 1.0444
    assert out.loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3)
    assert out.loss.item() == pytest.approx(1.044446, abs=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)     # the tie is a miss
    assert out.margin.item() == pytest.approx(-1 / 3)      # (1 + 0 - 2) / 3


def test_bradley_terry_matches_independent_computation():
    generator = torch.Generator().manual_seed(0)
    chosen = (torch.randn(64, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    rejected = torch.randn(64, generator=generator, dtype=torch.float64) * 3
    out = bradley_terry_loss(chosen, rejected)
    margins = [c - r for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert out.loss.item() == pytest.approx(sum(neg_log_sigmoid(m) for m in margins) / 64)
    assert out.accuracy.item() == pytest.approx(sum(m > 0 for m in margins) / 64)
    assert out.margin.item() == pytest.approx(sum(margins) / 64)
    out.loss.backward()
    # d/dc of -log sigma(c - r) / B is -(1 - sigma(c - r)) / B: always pushes the chosen score up
    expected = [-(1 - 1 / (1 + math.exp(-m))) / 64 for m in margins]
    assert chosen.grad.tolist() == pytest.approx(expected)
    assert not out.accuracy.requires_grad and not out.margin.requires_grad


def test_bradley_terry_extremes_and_shapes():
    out = bradley_terry_loss(scores(1000.0, -1000.0), scores(-1000.0, 1000.0))
    assert out.loss.item() == pytest.approx(2000.0 / 2)    # log(1 + e^-2000) = 0, log(1 + e^2000) = 2000
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(scores(1.0, 2.0), scores(1.0))
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = RewardModel.from_causal_lm("tiny-pythia-1m", seed=3)
    return model.eval(), tokenizer


TEXTS = ["\n\nHuman: How do I water basil?\n\nAssistant: At the base, every morning.",
         "\n\nHuman: Hi\n\nAssistant: Hello!",
         "\n\nHuman: What is the best way to give my lentil soup more flavour using the garlic?\n\nAssistant: "
         "Soften the garlic in a little oil over low heat first."]


def pad_rows(rows: list[list[int]], pad_id: int, side: str, extra: int = 0):
    width = max(len(r) for r in rows) + extra
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, span], attention_mask[i, span] = torch.tensor(row), 1
    return input_ids, attention_mask


def test_score_is_read_at_the_last_real_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    with torch.no_grad():
        # independent: each sequence alone, no padding, the head on the backbone's last hidden state
        alone = torch.stack([model.head(model.backbone(input_ids=torch.tensor([row])).last_hidden_state[0, -1])[0]
                             for row in rows])
        assert torch.equal(alone, torch.stack([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))[0]
                                               for r in rows]))
        for side in ("right", "left"):
            input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, side, extra=3)
            torch.testing.assert_close(model(input_ids, attention_mask), alone, rtol=1e-5, atol=1e-5)
            # what sits in the padding does not matter either
            noisy = torch.where(attention_mask.bool(), input_ids, torch.randint_like(input_ids, 5, 500))
            torch.testing.assert_close(model(noisy, attention_mask), alone, rtol=1e-5, atol=1e-5)
        # ... while the last real token does: change it and the score moves
        changed = [row[:-1] + [tokenizer("!")["input_ids"][0]] for row in rows]
        input_ids, attention_mask = pad_rows(changed, tokenizer.pad_token_id, "right")
        assert (model(input_ids, attention_mask) - alone).abs().min() > 1e-4


def test_rows_without_tokens_are_rejected(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(ValueError, match="real token"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_save_load_round_trip(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path, tokenizer, extra={"note": "test"})
    loaded, loaded_tokenizer = load_reward_model(tmp_path)
    loaded.eval()
    rows = [loaded_tokenizer(text)["input_ids"] for text in TEXTS]
    assert rows == [tokenizer(text)["input_ids"] for text in TEXTS]
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, "right")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, attention_mask), model(input_ids, attention_mask))
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["note"] == "test" and meta["hidden_size"] == model.config.hidden_size
    assert (tmp_path / "config.json").is_file()   # a plain save_pretrained folder of the backbone


def test_load_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_FILE):
        RewardModel.from_pretrained(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match="unsupported format"):
        RewardModel.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="--max-steps must be"):
        RewardModelConfig(max_steps=0)
    with pytest.raises(ValueError, match="--lr must be"):
        RewardModelConfig(lr=0.0)


# ----------------------------------------------------------------------------- training

def test_short_training_run_learns_the_preferences(tmp_path):
    """Chosen answers in the built-in data are specific and helpful, rejected ones are not: a 1M
    model separates held-out pairs within a few steps (measured, seed 0: 0.52 at step 0, 0.85 after
    one step, 1.0 from step 4 on)."""
    config = RewardModelConfig(model="tiny-pythia-1m", max_train_pairs=300, max_eval_pairs=100, max_prompt_tokens=48,
                               max_steps=10, eval_every=5, batch_size=16, lr=1e-3, seed=0)
    steps: list[int] = []
    result = train_reward_model(config, output_dir=tmp_path / "rm", log=lambda step, metrics: steps.append(step))
    accuracies = result.accuracies
    assert list(accuracies) == [0, 5, 10] and steps == list(range(11))
    assert result.train_pairs == 300 and result.eval_pairs == 100
    assert 0.3 <= accuracies[0] <= 0.7              # a random head ranks at chance
    assert accuracies[10] >= 0.9                    # far above chance
    assert result.evaluations[-1]["eval/loss"] < 0.5 * result.evaluations[0]["eval/loss"]
    # the saved folder scores exactly as the trained model does
    loaded, tokenizer = load_reward_model(tmp_path / "rm")
    _, pairs, _ = load_training_pairs(config, tokenizer)
    with torch.no_grad():
        assert reward_loss(loaded.eval(), pairs[:8], tokenizer.pad_token_id)[1] == \
            reward_loss(result.model.eval(), pairs[:8], tokenizer.pad_token_id)[1]
    assert json.loads((tmp_path / "rm" / META_FILE).read_text())["training_config"]["max_steps"] == 10
