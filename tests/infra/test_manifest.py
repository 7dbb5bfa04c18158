"""The reproducibility manifest: versions from the installed metadata, the commit from a real git repository."""
from __future__ import annotations

import json
import subprocess
from importlib import metadata

import pytest

from infra.manifest import NOT_INSTALLED, UNKNOWN, build_manifest, package_versions, project_commit


def test_versions_come_from_the_installed_distributions():
    versions = package_versions(("torch", "mlflow", "surely-not-a-package-xyz"))
    assert versions["torch"] == metadata.version("torch") and versions["mlflow"] == metadata.version("mlflow")
    assert versions["surely-not-a-package-xyz"] == NOT_INSTALLED
    assert set(package_versions()) == {"torch", "transformers", "ray", "mlflow", "vllm", "deepspeed"}


def git(directory, *args):
    return subprocess.run(["git", *args], cwd=directory, check=True, capture_output=True, text=True).stdout.strip()


def test_commit_of_a_repository_clean_dirty_and_outside(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    git(repo, "add", "a.txt")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert project_commit(repo) == head
    (repo / "a.txt").write_text("2")
    assert project_commit(repo) == f"{head}+dirty"
    (repo / "b.txt").write_text("untracked files do not make it dirty")
    (repo / "a.txt").write_text("1")
    assert project_commit(repo) == head
    outside = tmp_path / "plain"
    outside.mkdir()
    assert project_commit(outside) == UNKNOWN


def test_manifest_is_json_with_every_part(tmp_path):
    manifest = build_manifest(data_hash="d1", data_source="bytes of the file d.jsonl", probe_set_hash="p1",
                              sampling={"greedy_max_tokens": 48, "temperature": 1.0},
                              dtypes={"training": "float32", "scoring": "float32"}, devices={"training": "cpu"},
                              commit="abc", versions={"torch": "2.13.0"})
    assert json.loads(json.dumps(manifest)) == manifest
    assert manifest == {"commit": "abc", "versions": {"torch": "2.13.0"}, "data_hash": "d1",
                        "data_source": "bytes of the file d.jsonl", "probe_set_hash": "p1",
                        "sampling": {"greedy_max_tokens": 48, "temperature": 1.0},
                        "dtypes": {"training": "float32", "scoring": "float32"}, "devices": {"training": "cpu"}}
    defaults = build_manifest()
    assert defaults["data_hash"] == defaults["data_source"] == defaults["probe_set_hash"] == UNKNOWN
    assert defaults["versions"]["torch"] == metadata.version("torch")


def test_logged_on_a_real_run_as_json_and_flat_params(tmp_path):
    from infra.tracking import Tracker, default_tracking_uri

    tracker = Tracker(default_tracking_uri(tmp_path))
    run_id = tracker.start_run(tracker.experiment_id("m"), "trial")
    manifest = build_manifest(data_hash="d1", probe_set_hash="p1", commit="abc", versions={"torch": "2.13.0"},
                              devices={"training": "cpu"}, data_source="bytes of the file d.jsonl")
    tracker.log_manifest(run_id, manifest)
    params = tracker.run(run_id).data.params
    assert params["manifest.commit"] == "abc" and params["manifest.versions.torch"] == "2.13.0"
    assert (params["manifest.data_hash"], params["manifest.data_source"]) == ("d1", "bytes of the file d.jsonl")
    assert params["manifest.devices.training"] == "cpu"
    path = tracker.download_artifact(run_id, "manifest.json", tmp_path / "dl")
    assert json.loads(path.read_text()) == manifest


@pytest.mark.parametrize("name", ["torch", "mlflow"])
def test_version_strings_are_plain(name):
    assert package_versions((name,))[name][0].isdigit()


def test_file_and_row_hashes_against_hashlib(tmp_path):
    import hashlib

    from infra.manifest import file_sha256, rows_sha256

    data = bytes(range(256)) * 9000  # more than one read chunk
    (tmp_path / "a.bin").write_bytes(data)
    assert file_sha256(tmp_path / "a.bin", chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    rows = [{"prompt": "p", "chosen": "é", "rejected": "r"}, {"prompt": "q", "chosen": "c", "rejected": "s"}]
    lines = '{"chosen":"é","prompt":"p","rejected":"r"}\n{"chosen":"c","prompt":"q","rejected":"s"}\n'
    assert rows_sha256(rows) == hashlib.sha256(lines.encode("utf-8")).hexdigest()
    assert rows_sha256(rows[::-1]) != rows_sha256(rows) != rows_sha256(rows[:1])
