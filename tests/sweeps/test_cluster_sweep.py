"""A sweep on a multi-node Ray cluster logging to an MLflow tracking server, both real and on loopback.

`ray.cluster_utils.Cluster` runs a head and two worker nodes on this machine; only the worker nodes
declare the custom resource `trainer` that `--worker-resources trainer=1` asks for, two slots each,
so each trial's two training workers fill one worker node and the two trials spread over both. An
`mlflow server` (SQLite backend, artifacts served through it) takes every run, as on a cluster's head.

Mid-sweep the test kills the worker node of one trial (no graceful shutdown: its raylet and
workers die) and adds a fresh node, as the autoscaler would. The trial processes sit on the head,
so only the killed trial's workers are lost: Ray Train restarts them from the last checkpoint on a
live worker node (the fresh one, or the other trial's once that trial has finished), and the trial's
MLflow curves still hold exactly one point per step. One cluster and one server for
the whole module.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra.tracking import Tracker

pytestmark = pytest.mark.ray
ENTRY = Path(__file__).resolve().parents[2] / "sweeps" / "dpo_beta.py"
MAX_STEPS, EVAL_EVERY, CHECKPOINT_EVERY, KILL_AFTER_STEP = 16, 4, 4, 6
WORKER_NODE = {"num_cpus": 2, "resources": {"trainer": 2}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str, payload: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode() if payload is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _trials(tracker: Tracker, name: str) -> list:
    experiment = tracker.client.get_experiment_by_name(name)
    if experiment is None:
        return []
    parents = tracker.client.search_runs([experiment.experiment_id], f"attributes.run_name = 'sweep:{name}'")
    if not parents:
        return []
    runs = tracker.child_runs(experiment.experiment_id, parents[0].info.run_id)
    return sorted((r for r in runs if r.data.tags.get("stage") == "sweep"), key=lambda r: r.info.run_name)


def _last_step(tracker: Tracker, run_id: str) -> int:
    return max((s for s, _ in tracker.metric_history(run_id, "train/loss")), default=0)


@pytest.fixture(scope="module")
def node_loss_sweep(mlflow_server, tmp_path_factory):
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("cluster")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    command = [sys.executable, str(ENTRY), "--name", "ctest", "--experiment-name", "ctest", "--betas", "0.1", "0.5",
               "--lr", "1e-3", "--sft-steps", "0", "--tracking-uri", mlflow_server,
               "--storage-path", str(root / "runs"), "--worker-resources", "trainer=1", "--cpus-per-worker", "0.5",
               "--max-concurrent-trials", "2", "--max-failures", "2", "--max-steps", str(MAX_STEPS),
               "--eval-every", str(EVAL_EVERY), "--checkpoint-every", str(CHECKPOINT_EVERY), "--report-every", "1",
               "--num-probe-prompts", "4", "--max-train-pairs", "200", "--greedy-max-tokens", "8",
               "--micro-batch-size", "4", "--num-workers", "2"]
    log = (root / "driver.log").open("w")
    # the cluster's address as `ray job submit` hands it to a job's driver (`--address` does the same)
    driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": cluster.address})
    tracker = Tracker(mlflow_server)
    before, victim, killed_node, replacement = {}, None, None, None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(1)
            trials = _trials(tracker, "ctest")
            if len(trials) == 2 and all(_last_step(tracker, t.info.run_id) >= KILL_AFTER_STEP for t in trials):
                before = {t.info.run_id: t.data.tags.get("ray_nodes", "") for t in trials}
                victim = trials[0]
                killed_node = before[victim.info.run_id].split(",")[0]
                node = next(n for n in workers if n.node_id == killed_node)
                cluster.remove_node(node, allow_graceful=False)
                replacement = cluster.add_node(**WORKER_NODE)  # the autoscaler's job on a real cluster
                break
        driver.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
        cluster.shutdown()
    yield {"returncode": driver.returncode, "log": (root / "driver.log").read_text(), "before": before,
           "victim": victim.info.run_id if victim else None, "killed_node": killed_node,
           "replacement": replacement.node_id if replacement else None,
           "worker_nodes": {n.node_id for n in workers}, "tracker": tracker}


def test_server_unreachable_fails_before_training(tmp_path):
    result = subprocess.run([sys.executable, str(ENTRY), "--tracking-uri", f"http://127.0.0.1:{_free_port()}",
                             "--storage-path", str(tmp_path / "runs"), "--max-steps", "2"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert result.returncode != 0
    assert "is not reachable" in result.stderr and "127.0.0.1" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint_*"))


def test_sweep_survives_the_loss_of_a_worker_node(node_loss_sweep):
    result = node_loss_sweep
    assert result["victim"] is not None, "the sweep ended before both trials reached the kill step:\n" + result["log"][-3000:]
    assert result["returncode"] == 0, result["log"][-3000:]


def test_trials_spread_over_the_worker_nodes(node_loss_sweep):
    result = node_loss_sweep
    placements = [set(nodes.split(",")) for nodes in result["before"].values()]
    assert len(placements) == 2 and all(len(p) == 1 for p in placements), placements  # each trial packed on one node
    assert placements[0] != placements[1]
    assert placements[0] | placements[1] == result["worker_nodes"]  # both worker nodes, never the head


def test_runs_read_back_over_http_from_the_server(node_loss_sweep, mlflow_server):
    experiment = _get_json(f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ctest")["experiment"]
    runs = _get_json(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [experiment["experiment_id"]], "max_results": 50})["runs"]
    names = {r["info"]["run_name"]: r for r in runs}
    assert set(names) == {"sweep:ctest", "beta=0.1 lr=0.001", "beta=0.5 lr=0.001"}
    assert all(r["info"]["status"] == "FINISHED" for r in runs)
    # artifacts go through the server (no shared disk needed): the trial's figure is listed and downloadable
    tracker = node_loss_sweep["tracker"]
    trial_id = names["beta=0.1 lr=0.001"]["info"]["run_id"]
    listed = [a.path for a in tracker.client.list_artifacts(trial_id, "figures")]
    assert listed == ["figures/category_curves.png"]
    figure = Path(tracker.client.download_artifacts(trial_id, "figures/category_curves.png"))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_lost_trial_resumed_from_its_checkpoint_with_complete_curves(node_loss_sweep):
    result, tracker = node_loss_sweep, node_loss_sweep["tracker"]
    for trial in _trials(tracker, "ctest"):
        run_id, tags = trial.info.run_id, trial.data.tags
        if run_id == result["victim"]:
            resumed = int(tags["resumed_from_step"])
            assert resumed >= CHECKPOINT_EVERY and resumed % CHECKPOINT_EVERY == 0
            # restarted on live worker nodes, one id per rank. Which ones is Ray's choice: the new node has room,
            # and so does the other trial's node once that trial has finished (its workers gone) before the
            # restart is placed, so asserting the new node only held when the other trial was still running
            nodes = tags["ray_nodes"].split(",")
            live = (result["worker_nodes"] - {result["killed_node"]}) | {result["replacement"]}
            assert len(nodes) == 2 and set(nodes) <= live, (nodes, live)
        else:
            assert "resumed_from_step" not in tags
            assert tags["ray_nodes"] == result["before"][run_id]  # the other trial never moved
        losses = [s for s, _ in tracker.metric_history(run_id, "train/loss")]
        assert losses == list(range(1, MAX_STEPS + 1))  # every step once: nothing lost, nothing repeated
        for category in ("chosen", "rejected", "greedy"):
            assert [s for s, _ in tracker.metric_history(run_id, f"logp/{category}")] == list(range(0, MAX_STEPS + 1, EVAL_EVERY))
