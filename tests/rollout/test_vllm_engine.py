"""The vLLM engine against the HF engine on the same weights. Runs only where CUDA and vllm are
present (the `gpu` extra on a GPU machine); skipped with the reason otherwise — vLLM is never faked."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("vllm")),
                                reason="needs CUDA and vllm (pip install -e '.[gpu]' on a GPU machine)")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from rollout.hf_engine import HFEngine
    from rollout.vllm_engine import VLLMEngine
    from trainers.model.factory import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("model")
    model, tokenizer = load_model_and_tokenizer("tiny-pythia-4m", seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return HFEngine(model, tokenizer, device="cuda"), VLLMEngine(str(folder), gpu_memory_utilization=0.2), model


def test_same_greedy_tokens_and_logprobs_as_hf(engines):
    from rollout.interface import SamplingParams

    hf, vllm_engine, _ = engines
    prompts = [hf.tokenizer(t)["input_ids"] for t in ("\n\nHuman: How do I boil an egg?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:")]
    ours, theirs = hf.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0)), \
        vllm_engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    assert theirs.token_ids == ours.token_ids
    for a, b in zip(theirs.logprobs, ours.logprobs):
        assert a == pytest.approx(b, abs=1e-3)


def test_cpu_state_dict_sync_changes_the_running_engine(engines):
    hf, vllm_engine, model = engines
    prompt, response = [hf.tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"]], [hf.tokenizer(" Hello there.")["input_ids"]]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    vllm_engine.load_weights({k: v.cpu() for k, v in model.state_dict().items()}, version=3)
    assert vllm_engine.version == 3
    assert vllm_engine.score(prompt, response)[0] == pytest.approx(hf.score(prompt, response)[0], abs=1e-3)
