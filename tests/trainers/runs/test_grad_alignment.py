"""Gradient alignment between a training batch's update and each category's log-prob: known cases and an
independent computation (per-parameter .grad from .backward(), cosine in numpy)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from trainers.data.collate import collate_sequences
from trainers.model.losses import sft_loss
from trainers.model.objectives import forward_logps
from trainers.runs.grad_alignment import alignment_parameters, probe_category_cosines

PAD = 0
HEAD = ("embed_out.", "lm_head.")  # the output head's name differs between transformers versions


def tiny_model(layers: int = 3) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=48, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout=0.1, attention_dropout=0.1, tie_word_embeddings=False))


def tokens(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 48, (n,), generator=g).tolist() for n in lengths]


PROMPTS = tokens(1, [4, 6, 3])
CHOSEN = tokens(2, [5, 2, 7])
OTHER = tokens(3, [3, 6, 4])


def sft_closure(model, prompts, responses):
    return lambda: sft_loss(*forward_logps(model, collate_sequences(prompts, responses, PAD))[::2])


def test_a_category_equal_to_the_sft_targets_is_plus_one_with_the_update():
    model = tiny_model()
    cos = probe_category_cosines(model, sft_closure(model, PROMPTS, CHOSEN), PROMPTS,
                                 {"chosen": CHOSEN, "other": OTHER}, PAD, last_layers=None)
    assert cos["grad_cos/chosen"] == pytest.approx(1.0, abs=1e-6)
    assert abs(cos["grad_cos/other"]) < 0.9  # unrelated responses are not aligned
    # training AWAY from the targets (the negated loss) points the other way
    negated = sft_closure(model, PROMPTS, CHOSEN)
    flipped = probe_category_cosines(model, lambda: -negated(), PROMPTS, {"chosen": CHOSEN}, PAD, last_layers=1)
    assert flipped["grad_cos/chosen"] == pytest.approx(-1.0, abs=1e-6)
    assert model.training  # the caller's mode is restored (dropout was off while measuring)
    assert all(p.grad is None for p in model.parameters())  # the training step's accumulator is untouched


def test_matches_backward_and_numpy_on_a_parameter_subset():
    model = tiny_model()
    names = [n for n, _ in alignment_parameters(model, last_layers=1)]
    cos = probe_category_cosines(model, sft_closure(model, PROMPTS, OTHER), PROMPTS, {"chosen": CHOSEN}, PAD,
                                 last_layers=1)

    def grads(objective_sign: float, responses) -> np.ndarray:
        clone = copy.deepcopy(model).eval()
        sums, _, counts = forward_logps(clone, collate_sequences(PROMPTS, responses, PAD))
        value = -sums.sum() / counts.sum() if objective_sign < 0 else sums.sum()
        value.backward()
        parameters = dict(clone.named_parameters())
        return np.concatenate([parameters[n].grad.double().numpy().ravel() for n in names])

    update, category = -grads(-1, OTHER), grads(+1, CHOSEN)
    expected = update @ category / (np.linalg.norm(update) * np.linalg.norm(category))
    assert cos["grad_cos/chosen"] == pytest.approx(expected, abs=1e-6)


def test_last_layers_select_the_top_blocks_and_the_head():
    names = [n for n, _ in alignment_parameters(tiny_model(3), last_layers=1)]
    assert names and all(n.startswith(("gpt_neox.layers.2.", "gpt_neox.final_layer_norm.", *HEAD)) for n in names)
    assert any(n.startswith(HEAD) for n in names) and any(".layers.2." in n for n in names)
    two = [n for n, _ in alignment_parameters(tiny_model(3), last_layers=2)]
    assert any(".layers.1." in n for n in two) and not any(".layers.0." in n or "embed_in" in n for n in two)
    with pytest.raises(ValueError, match="last_layers"):
        alignment_parameters(tiny_model(1), last_layers=0)
