"""End to end on a real local Ray and a real MLflow SQLite store: a 2-trial x 2-worker DPO sweep
(after a shared SFT warm-up), read back from MLflow. One Ray start-up for the whole module.

Rank 0 of every DPO trial is killed once at step 4 (after step 3 was reported, while the last
checkpoint is step 2): Ray Train restarts the workers from that checkpoint, and the curves in
MLflow must still hold exactly one point per step."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sweeps.config import SweepConfig
from sweeps.driver import CATEGORIES, run_sweep
from infra.tracking import Tracker, default_tracking_uri
from trainers.config import TrainConfig

pytestmark = pytest.mark.ray
MAX_STEPS, EVAL_EVERY, PROBE_PROMPTS, FAULT_STEP = 4, 2, 6, 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    import os

    import ray
    from ray import tune

    from trainers.runs.train_loop import FAULT_MARKER_ENV, FAULT_STEP_ENV

    root = tmp_path_factory.mktemp("sweep")
    markers = root / "faults"
    markers.mkdir()
    # set before Ray starts: the local raylet and its workers inherit the environment
    os.environ[FAULT_STEP_ENV], os.environ[FAULT_MARKER_ENV] = str(FAULT_STEP), str(markers)
    config = SweepConfig(
        name="itest", betas=[0.1, 0.5], lrs=[1e-3], sft_steps=2, tracking_uri=default_tracking_uri(root),
        storage_path=str(root / "runs"), num_cpus=2, max_concurrent_trials=2, experiment_name="itest",
        train=TrainConfig(max_steps=MAX_STEPS, eval_every=EVAL_EVERY, checkpoint_every=2, num_probe_prompts=PROBE_PROMPTS,
                          max_train_pairs=200, greedy_max_tokens=8, micro_batch_size=4, num_workers=2,
                          report_every=1),
    )
    try:
        outcome = run_sweep(config, {"beta": tune.grid_search(config.betas), "lr": tune.grid_search(config.sweep_lrs())})
    finally:
        del os.environ[FAULT_STEP_ENV], os.environ[FAULT_MARKER_ENV]
    yield outcome, Tracker(outcome.tracking_uri), markers
    ray.shutdown()


def _children(outcome, tracker):
    parent = tracker.run(outcome.parent_run_id)
    runs = tracker.child_runs(parent.info.experiment_id, outcome.parent_run_id)
    return parent, runs


def test_one_parent_and_a_child_per_beta(sweep):
    outcome, tracker, _ = sweep
    parent, runs = _children(outcome, tracker)
    assert parent.info.run_name == "sweep:itest" and parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags["stage"] == "sweep"]
    warmups = [r for r in runs if r.data.tags["stage"] == "sft-warmup"]
    assert len(trials) == 2 and len(warmups) == 1
    assert sorted(float(r.data.params["beta"]) for r in trials) == [0.1, 0.5]
    for run in trials:
        assert run.info.status == "FINISHED"
        assert run.data.params["loss"] == "dpo" and run.data.params["probe_set_hash"] == parent.data.params["probe_set_hash"]
        assert run.data.params["init_checkpoint"] == parent.data.tags["sft_warmup_dir"]
        # the reference log-probs were computed once for the sweep, not by each trial
        assert len(list(Path(run.data.params["reference_logps_dir"]).glob("reference-logps-*.npz"))) == 1
        assert run.info.run_name == f"beta={run.data.params['beta']} lr={run.data.params['lr']}"
    assert not outcome.failed_trials


def test_the_second_trial_ran_in_the_first_trials_process(sweep):
    """Tune reuses the finished trial's process (the trials run one at a time on 2 cores): the second trial
    pays no process start, and its breakdown's start span counts from the first trial's return."""
    import json

    from sweeps.trial import TRIAL_TIMINGS_TAG

    outcome, tracker, _ = sweep
    _, runs = _children(outcome, tracker)
    first, second = sorted((json.loads(r.data.tags[TRIAL_TIMINGS_TAG]) for r in runs if r.data.tags["stage"] == "sweep"),
                           key=lambda timings: timings["started_at"])
    assert second["started_at"] > first["ended_at"]  # one at a time
    assert second["pid"] == first["pid"]
    assert first["ended_at"] <= second["process_started_at"] < second["started_at"]


def test_every_category_curve_and_one_point_per_step(sweep):
    outcome, tracker, markers = sweep
    _, runs = _children(outcome, tracker)
    # every DPO trial really was killed once (the 2-step warm-up never reaches the fault step)
    assert len([m for m in markers.iterdir() if m.name.startswith("sweep-")]) == 2
    # ... and resumed from its step-2 checkpoint, not from scratch
    assert sorted(r.data.tags.get("resumed_from_step") for r in runs if r.data.tags["stage"] == "sweep") == ["2", "2"]
    eval_steps = list(range(0, MAX_STEPS + 1, EVAL_EVERY))
    for run in runs:
        steps = MAX_STEPS if run.data.tags["stage"] == "sweep" else 2
        assert [s for s, _ in tracker.metric_history(run.info.run_id, "train/loss")] == list(range(1, steps + 1))
        if run.data.tags["stage"] != "sweep":
            continue
        for category in CATEGORIES:
            for prefix in ("logp", "logp_tok"):
                history = tracker.metric_history(run.info.run_id, f"{prefix}/{category}")
                assert [s for s, _ in history] == eval_steps, (prefix, category)
        for key in ("dpo/reward_margin", "dpo/reward_accuracy", "dpo/logp_chosen", "dpo/logp_rejected", "train/lr"):
            assert len(tracker.metric_history(run.info.run_id, key)) == MAX_STEPS, key


def test_records_gathered_from_both_ranks_and_artifacts(sweep):
    outcome, tracker, _ = sweep
    parent, runs = _children(outcome, tracker)
    run = next(r for r in runs if r.data.tags["stage"] == "sweep")
    client = tracker.client
    names = {a.path for a in client.list_artifacts(run.info.run_id, "logps")}
    assert names == {f"logps/step_{s:06d}.csv" for s in range(0, MAX_STEPS + 1, EVAL_EVERY)}
    local = client.download_artifacts(run.info.run_id, f"logps/step_{MAX_STEPS:06d}.csv")
    frame = pd.read_csv(local)
    assert sorted(frame["prompt_id"].unique()) == list(range(PROBE_PROMPTS))  # both ranks' shards
    assert set(frame["category"]) == set(CATEGORIES) and len(frame) == PROBE_PROMPTS * len(CATEGORIES)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {"figures/category_curves.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {"config/resolved_config.yaml"}
    parent_files = {a.path for d in ("summary", "figures", "probe_set") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"summary/sweep_summary.csv", "figures/category_curves.png", "figures/final_delta_vs_beta.png",
            "probe_set/probes.jsonl", "probe_set/manifest.json"} <= parent_files


def test_saved_model_reproduces_the_last_evaluation(sweep):
    """Interop: plain transformers on the saved folder gives the logged per-example numbers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.probe_set import ProbeSet
    from trainers.data.collate import encode_prompt, encode_response

    outcome, tracker, _ = sweep
    parent, runs = _children(outcome, tracker)
    run = next(r for r in runs if r.data.tags["stage"] == "sweep")
    folder = run.data.tags["checkpoint_dir"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    probe_set = ProbeSet.load(run.data.params["probe_set_dir"])
    frame = pd.read_csv(tracker.client.download_artifacts(run.info.run_id, f"logps/step_{MAX_STEPS:06d}.csv"))
    limits = int(run.data.params["max_prompt_tokens"]), int(run.data.params["max_response_tokens"])
    for _, row in frame[frame["category"].isin(["chosen", "rejected", "random"])].iterrows():
        prompt = encode_prompt(tokenizer, probe_set.prompts[row.prompt_id], limits[0])[0]
        response = encode_response(tokenizer, probe_set.responses[row.category][row.prompt_id], limits[1])[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
        expected = sum(logits[len(prompt) - 1 + t, token].item() for t, token in enumerate(response))
        assert row.logp_sum == pytest.approx(expected, abs=1e-3)


def test_entry_point_help_runs_without_ray():
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "sweeps" / "dpo_beta.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--betas" in result.stdout and "--tracking-uri" in result.stdout
