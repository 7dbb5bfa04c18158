"""A crashed trial is retried at one level only, --max-failures times: Ray Train restarts its workers when
trials run on the head, Tune reruns the trial when they may run anywhere; the other level gets 0, so a
trial that always crashes runs max_failures + 1 times, not (max_failures + 1)²."""
from __future__ import annotations

import pytest

from sweeps.config import parse_config
from sweeps.driver import trial_context
from sweeps.retries import crash_retries
from sweeps.stages import tune_failure_config
from sweeps.trial import train_failure_config


def built_failure_configs(argv: list[str]):
    """The FailureConfigs a sweep with these flags hands to Ray Train (every trial's) and to Tune."""
    config = parse_config(argv, "test")
    context = trial_context(config, "sqlite:///unused.db", "0", "parent", "/storage", "hash")
    return train_failure_config(context), tune_failure_config(config)


@pytest.mark.parametrize("max_failures", [0, 1, 3])
def test_trials_on_the_head_are_retried_by_ray_train_only(max_failures):
    train, tune = built_failure_configs(["--max-failures", str(max_failures)])
    assert (train.max_failures, tune.max_failures) == (max_failures, 0)
    runs = (train.max_failures + 1) * (tune.max_failures + 1)  # fits of a trial that always crashes
    assert runs == max_failures + 1


@pytest.mark.parametrize("max_failures", [0, 2])
def test_trials_anywhere_are_retried_by_tune_only(max_failures):
    # a trial's own process may go with its node: only Tune can rerun it
    train, tune = built_failure_configs(["--max-failures", str(max_failures), "--trials-on-head", "false",
                                         "--tracking-uri", "http://10.0.0.5:5000"])
    assert (train.max_failures, tune.max_failures) == (0, max_failures)
    assert (train.max_failures + 1) * (tune.max_failures + 1) == max_failures + 1


def test_the_default_retries_a_crashed_trial_once():
    assert crash_retries(parse_config([], "test").max_failures, True).train == 1
