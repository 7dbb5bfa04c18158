"""Threads follow the CPU share: the rule (a real Train worker applying it: tests/trainers/runs/test_train_loop_threads.py)."""
from __future__ import annotations

import pytest

from infra.cpu_threads import threads_for_cpus


@pytest.mark.parametrize("cpus, threads", [(0.01, 1), (0.3, 1), (1.0, 1), (1.5, 1), (2.0, 2), (2.9999999999, 3), (4.0, 4), (7.9, 7)])
def test_threads_are_the_floor_of_the_share_at_least_one(cpus, threads):
    assert threads_for_cpus(cpus) == threads


@pytest.mark.parametrize("cpus", [0, -1.0, float("nan")])
def test_a_share_that_is_not_positive_is_refused(cpus):
    with pytest.raises(ValueError, match="must be positive"):
        threads_for_cpus(cpus)
