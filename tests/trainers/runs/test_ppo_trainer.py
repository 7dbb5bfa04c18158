"""PPO on one worker without Ray, through the in-process rollout pool (metrics, version tags, weight
sync, probe decodes, the reward rising on the built-in rule), and once through the Ray actor pool."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rollout.interface import SamplingParams
from rollout.local_pool import LocalRolloutPool
from trainers.config import RolloutSettings, TrainConfig

ROOT = Path(__file__).resolve().parents[3]


def _ppo_config(probe_dir, **overrides) -> TrainConfig:
    values = dict(model="tiny-pythia-1m", loss="ppo", max_train_pairs=128, micro_batch_size=8, ppo_minibatches=2,
                  ppo_max_new_tokens=8, num_probe_prompts=4, greedy_max_tokens=6, probe_set_dir=probe_dir, lr=3e-3,
                  warmup_steps=1, num_workers=1, rollout=RolloutSettings(num_actors=2, cpus_per_actor=0.5, sync_every=2), max_steps=6)
    values.update(overrides)
    return TrainConfig(**values)


def _local_pool(config: TrainConfig, engines: int = 2) -> LocalRolloutPool:
    return LocalRolloutPool.from_pretrained(config.model, num_engines=engines, seed=config.seed,
                                            batch_size=config.micro_batch_size)


@pytest.fixture(scope="module")
def ppo_run(builtin_probe_dir):
    from trainers.runs.ppo_trainer import PPOTrainer

    torch.set_num_threads(1)
    config = _ppo_config(builtin_probe_dir)
    pool = _local_pool(config)
    trainer = PPOTrainer(config, pool=pool)
    trainer.prepare()
    history = [trainer.train_step() for _ in range(config.max_steps)]
    summary, records = trainer.evaluate()
    return trainer, pool, history, summary, records


def test_every_ppo_metric_is_logged_and_finite(ppo_run):
    _, _, history, _, _ = ppo_run
    for key in ("ppo/reward", "ppo/kl", "ppo/clipfrac", "ppo/value_loss", "ppo/entropy", "ppo/logprob_mismatch",
                "rollout/tokens_per_s", "rollout/weight_sync_s", "train/loss"):
        assert all(math.isfinite(step[key]) for step in history), key
    assert all(0 <= step["ppo/clipfrac"] <= 1 for step in history)
    mismatch = [step["ppo/logprob_mismatch"] for step in history]
    # after a sync the engines sample with the trainer's weights: their log-probs agree up to float noise;
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
    for engine in (0, 1):
        for got, want in zip(pool.score(prompts, responses, actor=engine), expected):
            assert got == pytest.approx(want, abs=1e-5)
    assert pool.generate(prompts, SamplingParams(max_new_tokens=2)).policy_version == 6


def test_the_engines_hold_copies_not_the_trainers_tensors(ppo_run):
    trainer, pool, _, _, _ = ppo_run
    live = {t.data_ptr() for t in trainer.language_model().parameters()}
    assert not live & {t.data_ptr() for engine in pool.engines for t in engine.model.parameters()}


def test_probe_evaluation_has_greedy_and_sample_from_the_pool(ppo_run):
    _, _, _, summary, records = ppo_run
    assert {"logp/greedy", "logp/sample", "logp/chosen"} <= set(summary)
    assert {r["category"] for r in records} >= {"greedy", "sample"}
    assert all(r["response"] for r in records if r["category"] == "sample")


def test_a_seeded_request_leaves_the_callers_random_stream_alone(ppo_run):
    trainer, pool, _, _, _ = ppo_run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pool.generate([trainer.pairs[0].prompt_ids], SamplingParams(max_new_tokens=3, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_dpo_trainer_can_take_its_probe_decodes_from_the_pool(ppo_run, builtin_probe_dir):
    """probe_decodes=actors: the DPO trainer syncs its weights to the pool, whose greedy decodes are
    then the ones the trainer would have made itself."""
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


def test_ppo_runs_in_a_process_that_never_imports_ray(builtin_probe_dir):
    """The default pool (no pool given): one step in a fresh interpreter, with Ray not even imported."""
    script = (
        "import sys, math, torch\n"
        "torch.set_num_threads(1)\n"
        "from trainers.runs.ppo_trainer import PPOTrainer\n"
        "from trainers.config import TrainConfig\n"
        f"config = TrainConfig(model='tiny-pythia-1m', loss='ppo', max_train_pairs=16, micro_batch_size=4,"
        f" ppo_minibatches=2, ppo_max_new_tokens=4, num_probe_prompts=2, greedy_max_tokens=4,"
        f" probe_set_dir={builtin_probe_dir!r}, num_workers=1, max_steps=1)\n"
        "trainer = PPOTrainer(config)\n"
        "trainer.prepare()\n"
        "metrics = trainer.train_step()\n"
        "assert math.isfinite(metrics['ppo/reward']) and metrics['rollout/policy_version'] == 1, metrics\n"
        "assert type(trainer.pool).__name__ == 'LocalRolloutPool'\n"
        "print('ray imported:', 'ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray imported: False" in done.stdout


@pytest.mark.ray
def test_the_ray_actor_pool_gives_the_in_process_pools_rollouts(local_ray, builtin_probe_dir):
    """The actor path: PPO steps through two Ray actors, whose rollouts (split and seeded alike) are the
    ones two in-process engines with the same weights make."""
    from rollout.actors import RolloutConfig, RolloutPool
    from trainers.runs.ppo_trainer import PPOTrainer

    torch.set_num_threads(1)
    config = _ppo_config(builtin_probe_dir, max_steps=2)
    actors = RolloutPool(RolloutConfig(model=config.model, num_actors=2, cpus_per_actor=0.5,
                                       batch_size=config.micro_batch_size, seed=config.seed, timeout_s=120))
    try:
        trainer = PPOTrainer(config, pool=actors)
        trainer.prepare()
        history = [trainer.train_step() for _ in range(config.max_steps)]
        assert [step["rollout/policy_version"] for step in history] == [0, 2]
        assert actors.versions() == [2, 2] and history[0]["ppo/logprob_mismatch"] < 1e-4
        local = _local_pool(config)
        local.sync_weights(trainer.language_model().state_dict(), 2)
        prompts = [trainer.pairs[i].prompt_ids for i in range(5)]
        for params in (SamplingParams(max_new_tokens=6, temperature=0), SamplingParams(max_new_tokens=6, seed=11)):
            remote, here = actors.generate(prompts, params), local.generate(prompts, params)
            assert remote.info["actors"] == here.info["actors"] == 2
            assert remote.token_ids == here.token_ids and remote.policy_version == here.policy_version == 2
            for got, want in zip(remote.logprobs, here.logprobs):
                assert got == pytest.approx(want, abs=1e-5)
    finally:
        actors.shutdown()
