"""The fall-from-peak stopper on hand-made result streams (the stream Tune passes it, one dict per report)."""
import pytest

from sweeps.stoppers import FallFromPeakStopper


def test_stops_once_the_metric_has_fallen_far_enough_below_its_own_peak():
    stopper = FallFromPeakStopper(drop=3.0)
    stream = [{"step": 0, "logp/chosen": -40.0}, {"step": 5, "train/loss": 0.6},  # no metric: ignored
              {"step": 10, "logp/chosen": -36.0}, {"step": 20, "logp/chosen": -38.5},
              {"step": 30, "logp/chosen": -39.0}]
    assert [stopper("a", r) for r in stream] == [False, False, False, False, True]
    # another trial's curve is its own: -39 is not below ITS peak
    assert stopper("b", {"step": 0, "logp/chosen": -39.0}) is False
    assert stopper.stop_all() is False


def test_other_metric_and_bad_drop():
    stopper = FallFromPeakStopper(drop=0.5, metric="logp/rejected")
    assert stopper("t", {"logp/rejected": -10.0, "logp/chosen": -99.0}) is False
    assert stopper("t", {"logp/rejected": -10.6}) is True
    with pytest.raises(ValueError, match="drop must be > 0"):
        FallFromPeakStopper(drop=0)
