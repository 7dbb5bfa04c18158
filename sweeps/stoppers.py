"""Tune stoppers on the learning dynamics: end a trial once a category has been squeezed.

Under DPO the chosen response's log-prob usually peaks early and then falls while the reward
margin still grows (Ren & Sutherland's squeezing effect). A sweep that only cares about the
regime before that fall can stop each trial once `logp/chosen` lies a set number of nats below
its own peak, instead of training every trial to `max_steps`.
"""
from __future__ import annotations

from ray.tune import Stopper

from probes.diagnostics import fall_from_peak


class FallFromPeakStopper(Stopper):
    """Stop a trial when `metric` (default `logp/chosen`) is `drop` or more below its highest value so far.

    The running curve is kept per trial in the driver; a resumed driver starts the curves afresh.
    Results without the metric (training-only reports) are ignored.
    """

    def __init__(self, drop: float, metric: str = "logp/chosen"):
        if not drop > 0:
            raise ValueError(f"drop must be > 0 nats, got {drop}")
        self.drop, self.metric = float(drop), metric
        self._curves: dict[str, list[tuple[int, float]]] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        value = result.get(self.metric)
        if value is None:
            return False
        curve = self._curves.setdefault(trial_id, [])
        curve.append((int(result.get("step", len(curve))), float(value)))
        return fall_from_peak(curve) >= self.drop

    def stop_all(self) -> bool:
        return False
