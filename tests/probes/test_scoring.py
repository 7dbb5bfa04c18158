"""Probe scoring: the three batched implementations against a slow one-example-at-a-time reference."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from probes.scoring import ScoreResult, score_concatenated, score_per_category, score_shared_prompt

VOCAB, PAD = 128, 0
METHODS = [score_shared_prompt, score_per_category, score_concatenated]


def tiny_neox(attn_implementation: str = "sdpa", dropout: float = 0.0) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        rotary_pct=0.5, max_position_embeddings=128, hidden_dropout=dropout, attention_dropout=dropout,
        attn_implementation=attn_implementation,
    )
    return GPTNeoXForCausalLM(config).eval()


def probe_tokens(seed: int = 0) -> tuple[list[list[int]], list[list[list[int]]]]:
    """7 prompts of 1..12 tokens, 4 responses each of 0..9 tokens, with empty and 1-token ones."""
    rng = random.Random(seed)
    prompt_lengths = [1, 5, 12, 3, 9, 7, 2]
    response_lengths = [[0, 1, 4, 9], [3, 3, 1, 0], [9, 2, 5, 1], [6, 0, 0, 2], [1, 8, 2, 7], [4, 4, 4, 4], [2, 9, 1, 0]]
    prompts = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in prompt_lengths]
    responses = [[[rng.randrange(1, VOCAB) for _ in range(n)] for n in row] for row in response_lengths]
    return prompts, responses


def slow_reference(model, prompts, responses) -> tuple[np.ndarray, np.ndarray]:
    """One (prompt, response) at a time, no padding: sum of log_softmax(logits[t])[token t+1] over the response."""
    sums = np.zeros((len(prompts), len(responses[0])))
    counts = np.zeros_like(sums, dtype=np.int64)
    with torch.no_grad():
        for n, prompt in enumerate(prompts):
            for k, response in enumerate(responses[n]):
                if not response:
                    continue
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
                logp = torch.log_softmax(logits, dim=-1)
                for j, token in enumerate(response):
                    sums[n, k] += logp[len(prompt) + j - 1, token].item()
                counts[n, k] = len(response)
    return sums, counts


def assert_matches(result: ScoreResult, sums: np.ndarray, counts: np.ndarray, atol: float) -> None:
    assert result.sums.shape == result.means.shape == result.counts.shape == sums.shape
    assert result.sums.dtype == np.float64 and np.issubdtype(result.counts.dtype, np.integer)
    np.testing.assert_array_equal(result.counts, counts)
    np.testing.assert_allclose(result.sums, sums, rtol=0, atol=atol)
    np.testing.assert_allclose(result.means, np.where(counts > 0, sums / np.maximum(counts, 1), 0.0), rtol=0, atol=atol)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_float32_matches_slow_reference(method, attn_implementation):
    model = tiny_neox(attn_implementation)
    prompts, responses = probe_tokens()
    sums, counts = slow_reference(model, prompts, responses)
    assert_matches(method(model, prompts, responses, pad_id=PAD, prompts_per_batch=3), sums, counts, atol=1e-4)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_float64_matches_slow_reference(method):
    model = tiny_neox().double()
    prompts, responses = probe_tokens(seed=1)
    sums, counts = slow_reference(model, prompts, responses)
    assert_matches(method(model, prompts, responses, pad_id=PAD, prompts_per_batch=2), sums, counts, atol=1e-8)


@pytest.mark.parametrize("prompts_per_batch,rows_per_forward", [(1, 1), (3, 5), (7, 32), (100, 3)])
def test_shared_prompt_batching_and_chunking_do_not_change_numbers(prompts_per_batch, rows_per_forward):
    model = tiny_neox().double()
    prompts, responses = probe_tokens(seed=2)
    sums, counts = slow_reference(model, prompts, responses)
    result = score_shared_prompt(model, prompts, responses, pad_id=PAD, prompts_per_batch=prompts_per_batch,
                                 rows_per_forward=rows_per_forward)
    assert_matches(result, sums, counts, atol=1e-8)


def test_all_responses_empty_or_single_token():
    model = tiny_neox().double()
    prompts = [[5, 6, 7], [9]]
    responses = [[[], [3]], [[4], []]]
    sums, counts = slow_reference(model, prompts, responses)
    for method in METHODS:
        assert_matches(method(model, prompts, responses, pad_id=PAD), sums, counts, atol=1e-8)


def test_pad_id_that_is_a_real_token():
    """Padding is masked, so the pad id may collide with ids inside prompts and responses."""
    model = tiny_neox().double()
    prompts = [[PAD, 3, PAD], [7]]
    responses = [[[PAD, PAD], [1]], [[PAD], [2, PAD, 4]]]
    sums, counts = slow_reference(model, prompts, responses)
    for method in METHODS:
        assert_matches(method(model, prompts, responses, pad_id=PAD, prompts_per_batch=2), sums, counts, atol=1e-8)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_train_mode_is_restored_and_dropout_off_while_scoring(method):
    model = tiny_neox(dropout=0.5).double()
    prompts, responses = probe_tokens()
    sums, counts = slow_reference(model, prompts, responses)  # model is in eval mode here
    model.train()
    result = method(model, prompts, responses, pad_id=PAD, prompts_per_batch=4)
    assert model.training
    assert_matches(result, sums, counts, atol=1e-8)
    model.eval()
    method(model, prompts, responses, pad_id=PAD)
    assert not model.training


def _tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128))


def _tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_llama], ids=["gpt2-absolute-positions", "llama-gqa"])
def test_other_causal_lm_architectures(build):
    torch.manual_seed(0)
    model = build().double().eval()
    prompts, responses = probe_tokens(seed=3)
    sums, counts = slow_reference(model, prompts, responses)
    for method in METHODS:
        assert_matches(method(model, prompts, responses, pad_id=PAD, prompts_per_batch=3), sums, counts, atol=1e-8)


def test_input_errors():
    model = tiny_neox()
    with pytest.raises(ValueError, match="same number of responses"):
        score_shared_prompt(model, [[1], [2]], [[[1]], [[1], [2]]], pad_id=PAD)
    with pytest.raises(ValueError, match="responses for"):
        score_per_category(model, [[1], [2]], [[[1]]], pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        score_concatenated(model, [[]], [[[1]]], pad_id=PAD)
    with pytest.raises(ValueError, match="prompts_per_batch"):
        score_shared_prompt(model, [[1]], [[[1]]], pad_id=PAD, prompts_per_batch=0)


def test_no_prompts_gives_empty_result():
    result = score_shared_prompt(tiny_neox(), [], [], pad_id=PAD)
    assert result.sums.shape == (0, 0)
