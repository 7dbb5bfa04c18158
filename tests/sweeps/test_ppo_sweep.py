"""`sweeps/ppo.py` end to end on a real local Ray and MLflow SQLite store: 2 trials (KL coefficients),
each a 2-worker Train group plus 2 rollout actors, a few steps; everything read back from MLflow.
Also the reward-model sweep whose folder PPO can take as its reward."""
from __future__ import annotations

import math

import pytest

from sweeps.summary import CATEGORIES
from infra.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.ray
MAX_STEPS, EVAL_EVERY = 4, 2


@pytest.fixture(scope="module")
def ppo_sweep(tmp_path_factory):
    import ray

    from sweeps import ppo

    root = tmp_path_factory.mktemp("ppo")
    argv = ["--name", "ppo-test", "--experiment-name", "ppo-test", "--kl-coefs", "0.02", "0.2", "--sft-steps", "2",
            "--tracking-uri", default_tracking_uri(root), "--storage-path", str(root / "runs"), "--num-cpus", "2",
            "--max-steps", str(MAX_STEPS), "--eval-every", str(EVAL_EVERY), "--checkpoint-every", "2", "--report-every", "1",
            "--micro-batch-size", "4", "--ppo-minibatches", "2", "--ppo-max-new-tokens", "8", "--num-probe-prompts", "4",
            "--greedy-max-tokens", "6", "--max-train-pairs", "100"]
    try:
        code = ppo.main(argv)
    finally:
        ray.shutdown()
    tracker = Tracker(default_tracking_uri(root))
    experiment = tracker.client.get_experiment_by_name("ppo-test")
    parent = tracker.client.search_runs([experiment.experiment_id], "attributes.run_name = 'sweep:ppo-test'")[0]
    children = tracker.child_runs(experiment.experiment_id, parent.info.run_id)
    return code, tracker, parent, [c for c in children if c.data.tags.get("stage") == "sweep"]


def test_two_finished_ppo_trials_named_by_kl_coefficient(ppo_sweep):
    code, _, parent, trials = ppo_sweep
    assert code == 0 and parent.info.status == "FINISHED"
    assert sorted(t.info.run_name for t in trials) == ["ppo_kl_coef=0.02 lr=0.0001", "ppo_kl_coef=0.2 lr=0.0001"]
    assert all(t.info.status == "FINISHED" and t.data.params["loss"] == "ppo" for t in trials)


def test_ppo_metrics_every_step_and_probe_curves_with_sample(ppo_sweep):
    _, tracker, _, trials = ppo_sweep
    for trial in trials:
        run_id = trial.info.run_id
        for key in ("ppo/reward", "ppo/kl", "ppo/clipfrac", "ppo/value_loss", "ppo/entropy", "ppo/logprob_mismatch",
                    "rollout/tokens_per_s", "rollout/weight_sync_s"):
            history = tracker.metric_history(run_id, key)
            assert [s for s, _ in history] == list(range(1, MAX_STEPS + 1)), key
            assert all(math.isfinite(v) for _, v in history), key
        # synced after every update: the actors hold the policy of each step
        assert [v for _, v in tracker.metric_history(run_id, "rollout/policy_version")] == [1, 2, 3, 4]
        assert max(v for _, v in tracker.metric_history(run_id, "ppo/logprob_mismatch")) < 1e-3
        # engine and trainer score the fixed probe responses after every sync (step 0: the start weights)
        mismatch = tracker.metric_history(run_id, "rollout/probe_mismatch_max")
        assert [s for s, _ in mismatch] == list(range(0, MAX_STEPS + 1)) and max(v for _, v in mismatch) < 1e-4
        # what --rollout-engine auto and --weight-sync auto resolved to (tiny-pythia-1m: HF actors, object store)
        assert trial.data.tags["rollout.engines_in_use"] == "hf,hf"
        assert trial.data.tags["rollout.weight_sync_in_use"] == "object-store"
        assert {"sample", "greedy"} <= set(CATEGORIES)
        for category in CATEGORIES:
            assert [s for s, _ in tracker.metric_history(run_id, f"logp/{category}")] == [0, 2, 4], category


def test_parent_summary_plots_against_the_kl_coefficient(ppo_sweep):
    _, tracker, parent, _ = ppo_sweep
    files = {a.path for d in ("summary", "figures") for a in tracker.client.list_artifacts(parent.info.run_id, d)}
    assert {"summary/sweep_summary.csv", "figures/final_delta_vs_ppo_kl_coef.png"} <= files


@pytest.fixture(scope="module")
def reward_sweep(tmp_path_factory):
    from sweeps import reward_model

    root = tmp_path_factory.mktemp("reward")
    code = reward_model.main(["--name", "rm-test", "--experiment-name", "rm-test", "--lrs", "1e-3", "3e-3",
                              "--tracking-uri", default_tracking_uri(root), "--storage-path", str(root / "runs"),
                              "--num-cpus", "2", "--max-train-pairs", "256", "--max-eval-pairs", "64", "--max-steps", "30",
                              "--eval-every", "15", "--batch-size", "8"])
    tracker = Tracker(default_tracking_uri(root))
    experiment = tracker.client.get_experiment_by_name("rm-test")
    parent = tracker.client.search_runs([experiment.experiment_id], "attributes.run_name = 'sweep:rm-test'")[0]
    return code, tracker, tracker.child_runs(experiment.experiment_id, parent.info.run_id)


def test_reward_model_sweep_logs_accuracy_and_saves_a_usable_model(reward_sweep):
    from trainers.data.pairs import load_preference_data
    from trainers.model.rewards import make_reward_fn

    code, tracker, runs = reward_sweep
    assert code == 0 and len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert [s for s, _ in tracker.metric_history(run.info.run_id, "eval/accuracy")] == [0, 15, 30]
        assert len(tracker.metric_history(run.info.run_id, "train/loss")) == 30
    best = max(runs, key=lambda r: r.data.metrics["eval/accuracy"])
    assert best.data.metrics["eval/accuracy"] > 0.7
    # the saved folder is a PPO reward: it scores held-out chosen answers above rejected ones
    score = make_reward_fn(best.data.tags["reward_model_dir"])
    pairs = load_preference_data("builtin", "test").pairs[:64]
    chosen = score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = score([p.prompt for p in pairs], [p.rejected for p in pairs])
    assert (chosen > rejected).float().mean().item() == pytest.approx(best.data.metrics["eval/accuracy"], abs=0.1)
