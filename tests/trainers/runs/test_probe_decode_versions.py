"""Probe decodes from rollout actors (--probe-decodes actors) come from the policy being evaluated: an
actor that restarted since the last sync (start weights, an older version) makes the evaluation fail
loudly instead of scoring decodes of the start weights. Runs on the in-process pool, without Ray."""
from __future__ import annotations

import pytest
import torch

from rollout.hf_engine import HFEngine
from rollout.local_pool import LocalRolloutPool
from trainers.config import TrainConfig


def test_decodes_from_a_restarted_actor_are_refused(builtin_probe_dir):
    from trainers.runs.policy_trainer import PolicyTrainer

    torch.set_num_threads(1)
    config = TrainConfig(model="tiny-pythia-1m", loss="dpo", max_train_pairs=16, micro_batch_size=4, num_probe_prompts=2,
                         greedy_max_tokens=4, probe_set_dir=builtin_probe_dir, lr=1e-3, num_workers=1,
                         probe_decodes="actors", seed=3)
    pool = LocalRolloutPool.from_pretrained(config.model, num_engines=1, seed=config.seed, batch_size=4)
    trainer = PolicyTrainer(config, pool=pool)
    trainer.prepare()
    trainer.train_step()
    summary, _ = trainer.evaluate()  # synced to step 1 first: accepted
    assert pool.versions() == [1] and "logp/greedy" in summary
    # the actor is lost and comes back with its start weights (what Ray's max_restarts gives)
    pool.engines[0] = HFEngine.from_pretrained(config.model, seed=config.seed, batch_size=4)
    assert pool.versions() != [1]
    with pytest.raises(RuntimeError, match=r"probe decodes came from policy version .*, expected 1"):
        trainer.evaluate()
