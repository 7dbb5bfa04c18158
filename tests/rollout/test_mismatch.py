"""rollout.mismatch against numpy on hand-made log-probs."""
import math

import numpy as np
import pytest

from rollout.mismatch import probe_mismatch


def test_metrics_match_numpy():
    engine = [[-1.0, -2.0, -0.5], [-3.0], [-0.2, -0.1]]
    trainer = [[-1.0, -2.2, -0.4], [-2.0], [-0.2, -0.05]]
    delta = np.array([0.0, 0.2, -0.1, -1.0, 0.0, -0.05])
    metrics = probe_mismatch(engine, trainer)
    assert metrics["rollout/probe_mismatch_mean"] == pytest.approx(np.abs(delta).mean())
    assert metrics["rollout/probe_mismatch_p95"] == pytest.approx(np.quantile(np.abs(delta), 0.95))
    assert metrics["rollout/probe_mismatch_max"] == pytest.approx(1.0)
    # exp(0.2)=1.22 and exp(-1)=0.37 are outside [0.9, 1.1]; exp(-0.1)=0.905 and exp(-0.05) are inside
    assert metrics["rollout/probe_mismatch_outside_ratio_band"] == pytest.approx(2 / 6)
    assert math.exp(-0.1) > 0.9


def test_identical_scores_give_zero_and_mismatched_shapes_are_refused():
    same = [[-1.0, -2.0], [-0.3]]
    assert set(probe_mismatch(same, same).values()) == {0.0}
    with pytest.raises(ValueError, match="response 1"):
        probe_mismatch(same, [[-1.0, -2.0], [-0.3, -0.4]])
    with pytest.raises(ValueError):
        probe_mismatch([[]], [[]])
