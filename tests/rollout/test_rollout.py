"""The generation interface on the HF engine, and the rollout actor pool on a real local Ray:
request splitting, sampling log-probs, weight sync (values and version tags), dead and slow actors."""
from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest
import torch

from rollout.actors import RolloutConfig, RolloutError, RolloutPool, resolve_engine
from rollout.hf_engine import HFEngine, generate
from rollout.interface import RolloutBatch, SamplingParams
from trainers.model.factory import load_model_and_tokenizer

MODEL = "tiny-pythia-1m"
PROMPTS = ["\n\nHuman: How do I boil an egg?\n\nAssistant:", "\n\nHuman: What is a good way to learn chess?\n\nAssistant:",
           "\n\nHuman: Why is the sky blue?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:", "\n\nHuman: Tell me a joke.\n\nAssistant:"]


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = load_model_and_tokenizer(MODEL, seed=0)
    return HFEngine(model, tokenizer, batch_size=2)


def _ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def test_sampling_params_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_greedy_matches_the_plain_generate_function(engine):
    ids = _ids(engine.tokenizer)
    batch = engine.generate(ids, SamplingParams(max_new_tokens=12, temperature=0))
    plain = generate(engine.model, engine.tokenizer, ids, max_new_tokens=12, batch_size=5)
    assert batch.token_ids == plain.token_ids and batch.texts == plain.texts
    assert batch.prompt_ids == ids and batch.engine == "hf" and batch.policy_version == 0


def test_sampling_logprobs_are_the_models_logprobs_of_the_sampled_tokens(engine):
    ids = _ids(engine.tokenizer)
    batch = engine.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=7))
    assert [len(lp) for lp in batch.logprobs] == [len(t) for t in batch.token_ids]
    scored = engine.score(ids, batch.token_ids)  # an independent full forward over prompt + response
    for engine_lp, full_lp in zip(batch.logprobs, scored):
        assert engine_lp == pytest.approx(full_lp, abs=1e-4)
    again = engine.generate(ids, SamplingParams(max_new_tokens=10, temperature=1.3, top_p=0.9, seed=7))
    assert again.token_ids == batch.token_ids  # seeded sampling repeats


def test_score_is_a_slow_manual_gather(engine):
    tokenizer, model = engine.tokenizer, engine.model
    prompt, response = _ids(tokenizer)[0], tokenizer(" Put it in boiling water.")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
    expected = [logits[len(prompt) - 1 + t, token].item() for t, token in enumerate(response)]
    assert engine.score([prompt], [response])[0] == pytest.approx(expected, abs=1e-5)


def test_concat_refuses_mixed_policy_versions():
    part = RolloutBatch([[1]], [[2]], ["a"], [[-0.1]], policy_version=1, engine="hf")
    other = RolloutBatch([[3]], [[4]], ["b"], [[-0.2]], policy_version=2, engine="hf")
    assert RolloutBatch.concat([part, part]).token_ids == [[2], [2]]
    with pytest.raises(ValueError, match="different policy versions"):
        RolloutBatch.concat([part, other])


def test_auto_engine_is_hf_where_vllm_cannot_run_the_model():
    assert resolve_engine("hf", "tiny-pythia-2m") == "hf" and resolve_engine("vllm") == "vllm"
    if not torch.cuda.is_available():
        # tiny-pythia-1m's head size (24) is not one vLLM's CPU attention takes: HF, with or without vllm
        assert resolve_engine("auto", "tiny-pythia-1m") == "hf"
    if importlib.util.find_spec("vllm") is None:
        assert resolve_engine("auto", "tiny-pythia-2m") == "hf"
    with pytest.raises(ValueError, match="auto, hf or vllm"):
        resolve_engine("tgi")


@pytest.mark.ray
def test_a_sync_that_did_not_land_is_named(pool):
    """Each actor reports (version, tensors, sum) of what it loaded; anything else than what the trainer
    sent is an error naming the actor."""
    model, _ = load_model_and_tokenizer(MODEL, seed=0)
    other, _ = load_model_and_tokenizer(MODEL, seed=5)
    pool.sync_weights(model.state_dict(), 7)
    pool.verify_received(model.state_dict(), 7)  # what was sent is what they hold
    with pytest.raises(RolloutError, match=r"rollout actor 0 did not load version 7"):
        pool.verify_received(other.state_dict(), 7)
    with pytest.raises(RolloutError, match=r"did not load version 8"):
        pool.verify_received(model.state_dict(), 8)
    part = dict(list(model.state_dict().items())[:-1])
    with pytest.raises(RolloutError, match="did not load"):
        pool.verify_received(part, 7)
    assert pool.engine_names() == ["hf", "hf"]


def test_the_in_process_pool_splits_and_seeds_as_the_actors_do(engine):
    """Engine i gets the i-th contiguous share and the stream derive_seed(i, seed), as actor i would."""
    from rollout.local_pool import LocalRolloutPool
    from trainers.data.seeds import derive_seed

    ids = _ids(engine.tokenizer)
    pool = LocalRolloutPool.from_pretrained(MODEL, num_engines=2, batch_size=2)
    params = SamplingParams(max_new_tokens=6, seed=4)
    batch = pool.generate(ids, params)
    first = engine.generate(ids[:2], SamplingParams(max_new_tokens=6, seed=derive_seed(0, 4)))
    second = engine.generate(ids[2:], SamplingParams(max_new_tokens=6, seed=derive_seed(1, 4)))
    assert batch.token_ids == first.token_ids + second.token_ids and batch.info["actors"] == 2
    assert pool.versions() == [0, 0]
    with pytest.raises(ValueError, match="no prompts"):
        pool.generate([], params)


@pytest.fixture(scope="module")
def pool(local_ray):
    pool = RolloutPool(RolloutConfig(model=MODEL, num_actors=2, cpus_per_actor=0.5, batch_size=4, timeout_s=120))
    yield pool
    pool.shutdown()


@pytest.mark.ray
def test_pool_spreads_requests_and_keeps_their_order(pool, engine):
    ids = _ids(engine.tokenizer)
    batch = pool.generate(ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert batch.info["actors"] == 2 and batch.prompt_ids == ids
    local = engine.generate(ids, SamplingParams(max_new_tokens=8, temperature=0))
    assert batch.token_ids == local.token_ids  # same weights (seed 0), same greedy continuations


@pytest.mark.ray
def test_weight_sync_gives_the_actors_the_trainers_logprobs(pool):
    trainer_model, tokenizer = load_model_and_tokenizer(MODEL, seed=0)
    optimizer = torch.optim.AdamW(trainer_model.parameters(), lr=1e-2)
    ids = _ids(tokenizer)
    response = [tokenizer(" Put the egg in boiling water for nine minutes.")["input_ids"]] * len(ids)
    trainer_engine = HFEngine(trainer_model, tokenizer)
    before = pool.score(ids, response)
    for version in (1, 2):  # two real updates, each followed by a sync
        trainer_model.train()
        loss = trainer_model(torch.tensor([ids[0] + response[0]]), labels=torch.tensor([ids[0] + response[0]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds = pool.sync_weights(trainer_model.state_dict(), version)
        assert seconds > 0 and pool.versions() == [version, version]
        expected = trainer_engine.score(ids, response)
        for actor in (0, 1):
            for got, want in zip(pool.score(ids, response, actor=actor), expected):
                assert got == pytest.approx(want, abs=1e-5)
    assert abs(sum(before[0]) - sum(expected[0])) > 0.1  # the sync really changed the actors' weights
    batch = pool.generate(ids, SamplingParams(max_new_tokens=4, seed=1))
    assert batch.policy_version == 2


@pytest.mark.ray
def test_wrong_weights_are_refused(pool):
    with pytest.raises(RolloutError, match="weights do not fit"):
        pool.sync_weights({"not.a.weight": torch.zeros(2)}, 9)


@pytest.mark.ray
def test_a_slow_or_dead_actor_is_an_error_not_a_hang(pool):
    slow = RolloutPool(RolloutConfig(**{**pool.config.to_dict(), "timeout_s": 0.01}), actors=pool.actors)
    with pytest.raises(RolloutError, match="within"):
        slow.generate([[1, 2, 3]] * 2, SamplingParams(max_new_tokens=256))
    import ray

    doomed = RolloutPool(RolloutConfig(model=MODEL, num_actors=1, cpus_per_actor=0.1, timeout_s=60))
    doomed.versions()
    ray.kill(doomed.actors[0])
    with pytest.raises(RolloutError, match="died"):
        doomed.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))


@pytest.mark.ray
def test_an_actor_lost_with_its_node_restarts_and_the_next_sync_updates_it(pool):
    import ray

    model, _ = load_model_and_tokenizer(MODEL, seed=0)
    revived = RolloutPool(RolloutConfig(model=MODEL, num_actors=1, cpus_per_actor=0.1, timeout_s=120))
    revived.sync_weights(model.state_dict(), 3)
    pid = ray.get(revived.actors[0].__ray_call__.remote(lambda actor: os.getpid()))
    os.kill(pid, signal.SIGKILL)  # what a lost node does to it (at once: no later call reaches the old process)
    deadline = time.monotonic() + 120
    while True:  # calls fail while it restarts, then it answers with its start weights
        try:
            versions = revived.versions()
            break
        except RolloutError:
            assert time.monotonic() < deadline, "the actor did not come back"
            time.sleep(0.5)
    assert versions == [0]  # a fresh process with the start weights
    revived.sync_weights(model.state_dict(), 4)  # what a restarted trainer does first
    assert revived.versions() == [4]
    assert revived.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4)).policy_version == 4
    revived.shutdown()
