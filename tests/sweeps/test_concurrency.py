"""Default concurrency: trials run at once only as far as their busy threads fit the cores."""
from dataclasses import replace

import pytest

from sweeps.config import SweepConfig
from sweeps.search import concurrent_trials, threads_per_trial


def _config(workers: int, share: float, asked: int = 3, **train) -> SweepConfig:
    config = SweepConfig(max_concurrent_trials=asked)
    return replace(config, train=replace(config.train, num_workers=workers, cpus_per_worker=share, **train))


@pytest.mark.parametrize("workers, share, cores, expected", [
    (2, 0.3, 2, 1),    # two 1-thread workers fill 2 cores: one trial at a time, not 3 packed by fractional shares
    (1, 0.3, 2, 2),
    (1, 0.3, 16, 3),   # never more than asked
    (2, 2.0, 8, 2),    # 2 workers x 2 threads per trial
    (2, 2.0, 2, 1),    # at least one, even when a trial alone oversubscribes
])
def test_concurrency_follows_cores_and_threads_per_trial(workers, share, cores, expected):
    assert concurrent_trials(_config(workers, share), cores) == expected


def test_rollout_actors_count_and_gpu_trials_are_left_as_asked():
    ppo = _config(1, 0.3, loss="ppo")
    assert threads_per_trial(ppo) == 1 + ppo.train.rollout.num_actors
    assert concurrent_trials(_config(2, 0.3, use_gpu=True), 2) == 3
