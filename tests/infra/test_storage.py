"""Remote storage (`--storage-path s3://...`) against a real S3-compatible server on 127.0.0.1.

moto's threaded server speaks the S3 protocol; pyarrow (the layer Ray uses for its own checkpoints)
reaches it through the endpoint and scheme in the URI's query, with fake credentials from the
environment. Unit tests of infra.storage first, then one small DPO sweep (SFT warm-up, shared
reference log-probs, 2 DDP workers) whose every file must land in the bucket: one Ray start-up.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from infra import storage

pytest.importorskip("moto.server", reason="the S3 test server: pip install -e '.[test]'")

BUCKET = "probesweep-test"  # the bucket of the s3 fixture (tests/infra/conftest.py)
ROOT = Path(__file__).resolve().parents[2]


def _keys(fs, prefix: str) -> list[str]:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + len(prefix) + 2:] for i in infos if i.type == pyarrow.fs.FileType.File)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sample_folder(folder: Path) -> Path:
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"a": 1}))
    (folder / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    (folder / "sub" / "deeper" / "note.txt").write_text("ünïcode\n")
    return folder


# --- local paths: the plain local thing, as before -------------------------------------------------

def test_local_paths_behave_as_before(tmp_path):
    from trainers.config import TrainConfig

    folder = str(tmp_path / "runs")
    assert not storage.is_remote(folder) and not storage.is_uri(folder)
    assert storage.join(folder, "a", "b.txt") == os.path.join(folder, "a", "b.txt")
    marker = storage.join(folder, "shared", "warm", ".complete")
    assert not storage.exists(marker)
    storage.write_text(marker, "done")
    assert storage.exists(marker) and storage.read_text(marker) == "done"
    assert [p.name for p in (tmp_path / "runs" / "shared" / "warm").iterdir()] == [".complete"]  # no staging left
    assert storage.local_copy(folder) is folder and storage.local_copy(None) is None
    source = _sample_folder(tmp_path / "model")
    storage.upload_dir(source, tmp_path / "copy")
    assert _tree(tmp_path / "copy") == _tree(source)
    with storage.output_dir(folder) as directory:
        assert directory == folder
    config = TrainConfig(init_checkpoint=str(source), probe_set_dir=folder)
    assert storage.local_inputs(config) is config
    # a file:// URI is a local path too
    as_uri = (tmp_path / "model").as_uri()
    assert storage.is_uri(as_uri) and not storage.is_remote(as_uri)
    assert storage.local_copy(as_uri) == str(source) and storage.exists(storage.join(as_uri, "config.json"))


def test_join_keeps_the_query_at_the_end():
    base = "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(base, "shared", "sft-warmup-1/") == \
        "s3://bucket/runs/shared/sft-warmup-1?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("gs://bucket", "a") == "gs://bucket/a"
    assert storage.is_remote(base) and storage.is_remote("gs://bucket")


# --- against the S3 server ------------------------------------------------------------------------

def test_text_files_and_markers(s3):
    uri, fs = s3
    state = storage.join(uri("text"), "sweep", "sweep_state.json")
    assert not storage.exists(state)
    with pytest.raises(FileNotFoundError):
        storage.read_text(state)
    storage.write_text(state, json.dumps({"parent_run_id": "abc"}))
    assert storage.exists(state) and json.loads(storage.read_text(state)) == {"parent_run_id": "abc"}
    storage.write_text(state, "ünïcode")  # overwritten whole
    assert storage.read_text(state) == "ünïcode"
    assert storage.exists(storage.join(uri("text"), "sweep"))  # a "folder" that holds objects
    storage.write_text(storage.join(uri("text"), "warm", ".complete"), "")
    assert _keys(fs, "text") == ["sweep/sweep_state.json", "warm/.complete"]


def test_folder_and_file_round_trip_through_the_node_cache(s3, tmp_path):
    uri, fs = s3
    source = _sample_folder(tmp_path / "model")
    remote = uri("roundtrip/model")
    storage.upload_dir(source, remote)
    assert _keys(fs, "roundtrip/model") == ["config.json", "sub/deeper/note.txt", "sub/weights.bin"]

    cache = tmp_path / "cache"
    local = storage.local_copy(remote, cache_dir=cache)
    assert Path(local).parent == cache and _tree(Path(local)) == _tree(source)
    assert storage.local_copy(remote, cache_dir=cache) == local  # the second request reuses the copy
    assert not [p for p in cache.iterdir() if ".staging-" in p.name]

    # one file keeps its name (readers such as np.load look at the suffix)
    single = storage.local_copy(storage.join(remote, "sub", "weights.bin"), cache_dir=cache)
    assert Path(single).name == "weights.bin" and Path(single).read_bytes() == (source / "sub" / "weights.bin").read_bytes()

    # what is there changed (another file): a fresh copy, the old one untouched
    storage.write_text(storage.join(remote, "extra.txt"), "new")
    again = storage.local_copy(remote, cache_dir=cache)
    assert again != local and (Path(again) / "extra.txt").read_text() == "new" and not (Path(local) / "extra.txt").exists()

    with pytest.raises(FileNotFoundError):
        storage.local_copy(uri("roundtrip/nothing-here"), cache_dir=cache)


def test_output_dir_uploads_only_a_finished_folder(s3):
    uri, fs = s3
    with storage.output_dir(uri("out/final")) as directory:
        assert Path(directory).is_dir()
        (Path(directory) / "model.bin").write_bytes(b"weights")
    assert _keys(fs, "out/final") == ["model.bin"]
    with pytest.raises(RuntimeError), storage.output_dir(uri("out/failed")) as directory:
        (Path(directory) / "model.bin").write_bytes(b"half")
        raise RuntimeError("the save failed")
    assert _keys(fs, "out/failed") == []


def test_local_inputs_fetch_remote_folders_only(s3, tmp_path):
    from trainers.config import TrainConfig

    uri, _ = s3
    storage.upload_dir(_sample_folder(tmp_path / "warm"), uri("inputs/warm"))
    config = TrainConfig(init_checkpoint=uri("inputs/warm"), probe_set_dir=str(tmp_path), reward="rule")
    local = storage.local_inputs(config)
    assert local is not config and local.probe_set_dir == str(tmp_path) and local.reward == "rule"
    assert Path(local.init_checkpoint).is_dir() and (Path(local.init_checkpoint) / "config.json").is_file()
    assert config.init_checkpoint == uri("inputs/warm")  # the original keeps the URI (what MLflow records)


COPY_SCRIPT = textwrap.dedent("""
    import sys, time
    import pyarrow.fs
    from infra import storage

    uri, cache, log, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    download = pyarrow.fs.copy_files

    def counted(*args, **kwargs):  # every real download leaves a line, and takes a while
        with open(log, "a") as handle:
            handle.write("download\\n")
        time.sleep(1.0)
        return download(*args, **kwargs)

    pyarrow.fs.copy_files = counted
    time.sleep(max(0.0, start - time.time()))  # every process asks at the same moment
    print(storage.local_copy(uri, cache_dir=cache))
""")


def test_concurrent_local_copy_downloads_once_per_node(s3, tmp_path):
    uri, _ = s3
    source = _sample_folder(tmp_path / "model")
    remote = uri("concurrent/model")
    storage.upload_dir(source, remote)
    cache, log = tmp_path / "cache", tmp_path / "downloads.log"
    start = time.time() + 4.0
    processes = [subprocess.Popen([sys.executable, "-c", COPY_SCRIPT, remote, str(cache), str(log), str(start)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and _tree(Path(paths.pop())) == _tree(source)
    assert log.read_text().count("download") == 1
    assert not [p for p in cache.iterdir() if ".staging-" in p.name]


# --- one sweep end to end, every file in the bucket -----------------------------------------------

@pytest.fixture(scope="module")
def s3_sweep(s3, tmp_path_factory):
    import ray
    from ray import tune

    from sweeps.config import SweepConfig
    from sweeps.driver import run_sweep
    from infra.tracking import Tracker
    from trainers.config import TrainConfig

    uri, fs = s3
    root = tmp_path_factory.mktemp("s3-sweep")
    workdir = root / "cwd"
    workdir.mkdir()
    config = SweepConfig(
        name="s3sweep", betas=[0.1], sft_steps=4, tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        storage_path=uri("runs"), num_cpus=2, max_concurrent_trials=1, experiment_name="s3sweep",
        train=TrainConfig(max_steps=4, eval_every=2, checkpoint_every=2, num_probe_prompts=4, max_train_pairs=64,
                          greedy_max_tokens=8, micro_batch_size=4, num_workers=2, report_every=2),
    )
    previous = os.getcwd()
    os.chdir(workdir)  # where the default ./probesweep_runs would appear
    try:
        outcome = run_sweep(config, {"beta": tune.grid_search(config.betas)})
    finally:
        os.chdir(previous)
    yield config, outcome, Tracker(outcome.tracking_uri), workdir
    ray.shutdown()


@pytest.mark.ray
def test_sweep_on_s3_puts_every_file_in_the_bucket(s3, s3_sweep):
    from transformers import AutoModelForCausalLM

    from sweeps.driver import open_parent_run
    from probes.probe_set import ProbeSet

    uri, fs = s3
    config, outcome, tracker, workdir = s3_sweep
    assert not outcome.failed_trials
    assert not (workdir / "probesweep_runs").exists() and list(workdir.iterdir()) == []
    keys = _keys(fs, "runs")

    # the SFT warm-up: the model rank 0 uploaded, and the driver's marker after the stage
    warmups = {k.split("/")[1] for k in keys if k.startswith("shared/sft-warmup-")}
    assert len(warmups) == 1
    warmup = warmups.pop()
    assert {f"shared/{warmup}/.complete", f"shared/{warmup}/config.json", f"shared/{warmup}/tokenizer.json"} <= set(keys)
    assert any(k.startswith(f"shared/{warmup}/model") for k in keys)
    # the reference log-probs, computed once by the Ray task
    assert len([k for k in keys if k.startswith("shared/reference_logps/reference-logps-")]) == 1
    # the published probe set, the sweep state (--resume), Tune's experiment state and Ray Train's checkpoints
    assert any(k.startswith("probe_sets/build-") and k.endswith("/.complete") for k in keys)
    assert "s3sweep/sweep_state.json" in keys
    assert any(k.startswith("s3sweep-sweep/") and k.endswith("tuner.pkl") for k in keys)
    assert [k for k in keys if k.startswith("s3sweep/train/sweep-") and k.endswith("/train_state.pt")]

    parent = tracker.run(outcome.parent_run_id)
    runs = tracker.child_runs(parent.info.experiment_id, outcome.parent_run_id)
    trial = next(r for r in runs if r.data.tags["stage"] == "sweep")
    assert trial.info.status == "FINISHED"
    assert trial.data.params["init_checkpoint"] == parent.data.tags["sft_warmup_dir"] == storage.join(uri("runs"), "shared", warmup)
    assert trial.data.params["reference_logps_dir"] == storage.join(uri("runs"), "shared", "reference_logps")
    assert trial.data.params["probe_set_dir"].startswith(f"s3://{BUCKET}/runs/probe_sets/build-")
    # the final model: on S3, named by the MLflow tag, and loadable from this node's copy
    final = trial.data.tags["checkpoint_dir"]
    assert final.startswith(f"s3://{BUCKET}/runs/s3sweep/models/sweep-") and storage.exists(storage.join(final, "config.json"))
    AutoModelForCausalLM.from_pretrained(storage.local_copy(final))
    assert len(ProbeSet.load(storage.local_copy(trial.data.params["probe_set_dir"])).prompts) == 4

    # --resume finds the sweep through sweep_state.json on S3
    resumed = open_parent_run(tracker, replace(config, resume=True), config.storage_path, None, "", 0)
    tracker.client.set_terminated(outcome.parent_run_id)  # resuming reopened it
    assert resumed == (parent.info.experiment_id, outcome.parent_run_id)
