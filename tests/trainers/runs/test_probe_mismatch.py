"""After every weight sync the trainer scores fixed probe responses with every rollout engine and with
itself (`rollout/probe_mismatch_*`), once per sync. Runs on the in-process pool, without Ray: a sync that
landed gives float noise, an engine holding other weights gives a large gap."""
from __future__ import annotations

import pytest
import torch

from rollout.actors import RolloutError
from rollout.local_pool import LocalRolloutPool
from rollout.weight_sync import weight_sync_for
from trainers.config import RolloutSettings, TrainConfig
from trainers.model.factory import load_model_and_tokenizer

KEYS = ("rollout/probe_mismatch_mean", "rollout/probe_mismatch_p95", "rollout/probe_mismatch_max",
        "rollout/probe_mismatch_outside_ratio_band")


def _config(probe_dir, **overrides) -> TrainConfig:
    values = dict(model="tiny-pythia-1m", loss="dpo", max_train_pairs=16, micro_batch_size=4, num_probe_prompts=2,
                  greedy_max_tokens=4, probe_set_dir=probe_dir, lr=1e-2, num_workers=1, probe_decodes="actors", seed=3,
                  warmup_steps=1, rollout=RolloutSettings(mismatch_prompts=3))
    values.update(overrides)
    return TrainConfig(**values)


def test_a_landed_sync_gives_float_noise_and_a_stale_engine_a_gap(builtin_probe_dir):
    from trainers.runs.policy_trainer import PolicyTrainer

    torch.set_num_threads(1)
    config = _config(builtin_probe_dir)
    pool = LocalRolloutPool.from_pretrained(config.model, num_engines=2, seed=config.seed, batch_size=4)
    trainer = PolicyTrainer(config, pool=pool)
    trainer.prepare()
    assert trainer.rollout_in_use() == {"engines": "hf,hf", "weight_sync": "in-process"}
    trainer.train_step()
    summary, _ = trainer.evaluate()  # the decodes sync to step 1 first, then the mismatch is measured
    assert all(key in summary for key in KEYS)
    assert summary["rollout/probe_mismatch_max"] < 1e-5 and summary["rollout/probe_mismatch_outside_ratio_band"] == 0
    again, _ = trainer.evaluate()  # no new sync: nothing new to report
    assert not any(key in again for key in KEYS)

    # engine 1 keeps other weights although it claims this version (a sync that did not land)
    stale, _ = load_model_and_tokenizer(config.model, seed=99)
    pool.engines[1].load_weights(stale.state_dict(), trainer.step)
    gap = trainer.probe_mismatch()
    assert gap["rollout/probe_mismatch_max"] > 0.1 and gap["rollout/probe_mismatch_outside_ratio_band"] > 0.1
    # only half the rows (engine 1's) disagree: the mean is half of engine 1's own mean gap
    alone = LocalRolloutPool([pool.engines[1]])
    trainer.pool = alone
    assert gap["rollout/probe_mismatch_mean"] == pytest.approx(trainer.probe_mismatch()["rollout/probe_mismatch_mean"] / 2,
                                                               rel=1e-4)


def test_ppo_logs_the_mismatch_at_every_sync(builtin_probe_dir):
    from trainers.runs.ppo_trainer import PPOTrainer

    torch.set_num_threads(1)
    config = _config(builtin_probe_dir, loss="ppo", max_train_pairs=32, micro_batch_size=4, ppo_minibatches=1,
                     ppo_max_new_tokens=4, lr=1e-3, rollout=RolloutSettings(num_actors=1, sync_every=2, mismatch_prompts=2))
    pool = LocalRolloutPool.from_pretrained(config.model, num_engines=1, seed=config.seed, batch_size=4)
    trainer = PPOTrainer(config, pool=pool)
    trainer.prepare()
    first, _ = trainer.evaluate()  # step 0: the start weights' sync, as the training loop evaluates first
    assert first["rollout/probe_mismatch_max"] < 1e-5
    history = [trainer.train_step() for _ in range(4)]
    synced = ["rollout/probe_mismatch_mean" in step for step in history]
    assert synced == [False, True, False, True]  # sync every 2 updates
    assert all(step["rollout/probe_mismatch_max"] < 1e-5 for step in history[1::2])


def test_broadcast_needs_ray_actors(builtin_probe_dir):
    pool = LocalRolloutPool.from_pretrained("tiny-pythia-1m", num_engines=1, batch_size=4)
    sync, way = weight_sync_for(pool, "auto")
    assert way == "in-process" and sync == pool.sync_weights
    with pytest.raises(RolloutError, match="needs Ray rollout actors"):
        weight_sync_for(pool, "broadcast")
    with pytest.raises(ValueError, match="auto, broadcast or object-store"):
        weight_sync_for(pool, "nccl")
