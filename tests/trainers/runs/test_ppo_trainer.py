"""PPO on one worker against a real rollout actor pool (local Ray): metrics, version tags, weight sync,
and the reward rising on the built-in rule."""
from __future__ import annotations

import math

import pytest
import torch

from rollout.interface import SamplingParams
from trainers.config import RolloutSettings, TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ppo_run(builtin_probe_dir):
    import ray

    from sweeps.trial import rollout_pool
    from trainers.runs.ppo_trainer import PPOTrainer

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = TrainConfig(model="tiny-pythia-1m", loss="ppo", max_train_pairs=128, micro_batch_size=8, ppo_minibatches=2,
                         ppo_max_new_tokens=8, num_probe_prompts=4, greedy_max_tokens=6, probe_set_dir=builtin_probe_dir,
                         lr=3e-3, warmup_steps=1, num_workers=1, rollout=RolloutSettings(num_actors=2, cpus_per_actor=0.5, sync_every=2),
                         max_steps=6)
    pool = rollout_pool(config)
    trainer = PPOTrainer(config, pool=pool)
    trainer.prepare()
    history = [trainer.train_step() for _ in range(config.max_steps)]
    summary, records = trainer.evaluate()
    yield trainer, pool, history, summary, records
    pool.shutdown()
    ray.shutdown()


def test_every_ppo_metric_is_logged_and_finite(ppo_run):
    _, _, history, _, _ = ppo_run
    for key in ("ppo/reward", "ppo/kl", "ppo/clipfrac", "ppo/value_loss", "ppo/entropy", "ppo/logprob_mismatch",
                "rollout/tokens_per_s", "rollout/weight_sync_s", "train/loss"):
        assert all(math.isfinite(step[key]) for step in history), key
    assert all(0 <= step["ppo/clipfrac"] <= 1 for step in history)
    mismatch = [step["ppo/logprob_mismatch"] for step in history]
    # after a sync the actors sample with the trainer's weights: their log-probs agree up to float noise;
    # one update later (sync every 2) they are a version behind, and the mismatch shows it
    assert all(m < 1e-4 for m in mismatch[0::2]), mismatch
    assert all(m > 1e-3 for m in mismatch[1::2]), mismatch


def test_weights_are_synced_every_second_update_and_versions_recorded(ppo_run):
    trainer, pool, history, _, _ = ppo_run
    assert [step["rollout/policy_version"] for step in history] == [0, 2, 2, 4, 4, 6]
    assert pool.versions() == [6, 6]
    prompts = [trainer.pairs[i].prompt_ids for i in range(3)]
    responses = [trainer.pairs[i].chosen_ids for i in range(3)]
    from rollout.hf_engine import HFEngine

    expected = HFEngine(trainer.language_model(), trainer.tokenizer).score(prompts, responses)
    for got, want in zip(pool.score(prompts, responses), expected):
        assert got == pytest.approx(want, abs=1e-5)
    assert pool.generate(prompts, SamplingParams(max_new_tokens=2)).policy_version == 6


def test_probe_evaluation_has_greedy_and_sample_from_the_actors(ppo_run):
    _, _, _, summary, records = ppo_run
    assert {"logp/greedy", "logp/sample", "logp/chosen"} <= set(summary)
    assert {r["category"] for r in records} >= {"greedy", "sample"}
    assert all(r["response"] for r in records if r["category"] == "sample")


def test_dpo_trainer_can_take_its_probe_decodes_from_the_actors(ppo_run, builtin_probe_dir):
    """probe_decodes=actors: the DPO trainer syncs its weights to the actors, whose greedy decodes
    are then the ones the trainer would have made itself."""
    from trainers.runs.evaluation import policy_decodes
    from trainers.runs.policy_trainer import PolicyTrainer

    _, pool, _, _, _ = ppo_run  # runs last: it loads other weights into the shared pool
    config = TrainConfig(model="tiny-pythia-1m", loss="dpo", max_train_pairs=32, micro_batch_size=4, num_probe_prompts=4,
                         greedy_max_tokens=6, probe_set_dir=builtin_probe_dir, lr=1e-3, num_workers=1,
                         probe_decodes="actors", seed=3)
    trainer = PolicyTrainer(config, pool=pool)
    trainer.prepare()
    trainer.train_step()
    summary, records = trainer.evaluate()
    assert pool.versions() == [1, 1] and {"logp/greedy", "logp/sample"} <= set(summary)
    prompts = [trainer.probes.prompt_ids[i] for i in trainer.probe_prompts]
    local = policy_decodes(trainer.language_model(), trainer.tokenizer, prompts, max_new_tokens=6, sample_seed=0)
    greedy_texts = [r["response"] for r in sorted(records, key=lambda r: r["prompt_id"]) if r["category"] == "greedy"]
    assert greedy_texts == local["greedy"][1]
