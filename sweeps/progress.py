"""Readable progress in the driver: one bar per trial (steps, loss, last probe evaluation).

Ray's own console output is switched off (verbose=0, worker logs not forwarded); this Tune
callback sees every forwarded report and is all the user watches while a sweep runs.
"""
from __future__ import annotations

from ray import tune
from tqdm.auto import tqdm

from sweeps.search import SEARCHABLE


class TrialProgress(tune.Callback):
    def __init__(self, stage: str, total_steps: int):
        self.stage, self.total_steps = stage, total_steps
        self._bars: dict[str, tqdm] = {}
        self._evals: dict[str, int] = {}

    def _bar(self, trial) -> tqdm:
        if trial.trial_id not in self._bars:
            searched = {k: v for k, v in trial.config.items() if k in SEARCHABLE}
            label = " ".join([self.stage] + [f"{k}={v}" for k, v in searched.items()])
            self._bars[trial.trial_id] = tqdm(total=self.total_steps, desc=label,
                                              position=len(self._bars), leave=True, unit="step", dynamic_ncols=True)
        return self._bars[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._bar(trial).set_postfix_str("starting workers")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        bar = self._bar(trial)
        step = int(result.get("step", 0))
        bar.update(max(0, step - bar.n))
        postfix = {}
        if "train/loss" in result:
            postfix["loss"] = f"{result['train/loss']:.3f}"
        if "logp/chosen" in result:
            self._evals[trial.trial_id] = self._evals.get(trial.trial_id, 0) + 1
            postfix["evals"] = self._evals[trial.trial_id]
            postfix["logp chosen/rejected"] = f"{result['logp/chosen']:.1f}/{result['logp/rejected']:.1f}"
        if "ppo/reward" in result:
            postfix["reward"] = f"{result['ppo/reward']:.2f}"
        if "dpo/reward_accuracy" in result:
            postfix["acc"] = f"{result['dpo/reward_accuracy']:.2f}"
        bar.set_postfix(postfix, refresh=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._bar(trial).set_postfix_str("done", refresh=True)
        self._bar(trial).close()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._bar(trial).set_postfix_str("FAILED", refresh=True)
        self._bar(trial).close()
