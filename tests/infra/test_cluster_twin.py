"""The loopback twin of cluster.yaml, offline: Ray accepts it, it differs from cluster.yaml only where
it must, and a renamed variable in cluster.yaml stops it instead of drifting. (The launcher run
itself is tests/infra/test_launcher_loopback.py.)"""
from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from infra.cluster_twin import (COMMAND_LISTS, TWIN_VARIABLES, LoopbackTarget, assigned_variables, loopback_twin,
                                set_variable)

ROOT = Path(__file__).resolve().parents[2]
TARGET = LoopbackTarget(ssh_user="probesweep-head", ssh_private_key="/keys/id", repo="file:///src/probesweep",
                        ref="0123abc")


def cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_assigns_each_twin_variable_once_with_its_cloud_value():
    commands = [c for key in COMMAND_LISTS for c in cluster_yaml().get(key) or []]
    assigned = [(name, value) for c in commands for name, value in assigned_variables(c).items() if name in TWIN_VARIABLES]
    assert sorted(name for name, _ in assigned) == sorted(TWIN_VARIABLES)
    values = dict(assigned)
    assert values["PROBESWEEP_EXTRAS"] == "gpu,deepspeed" and values["MLFLOW_ARTIFACTS"].startswith("s3://")


def test_ray_accepts_the_twin_and_makes_one_local_head():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(loopback_twin(cluster_yaml(), TARGET))
    validate_config(prepared)
    assert prepared["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert list(prepared["available_node_types"]) == [prepared["head_node_type"]]
    assert prepared["auth"] == {"ssh_user": "probesweep-head", "ssh_private_key": "/keys/id"}


def test_the_twin_differs_from_cluster_yaml_only_in_provider_auth_name_node_types_and_variables():
    original = cluster_yaml()
    twin = loopback_twin(original, TARGET)
    replaced = {"provider", "auth", "cluster_name", "max_workers", "available_node_types", "head_node_type"}
    assert {k: v for k, v in twin.items() if k not in replaced | set(COMMAND_LISTS)} == \
           {k: v for k, v in original.items() if k not in replaced | set(COMMAND_LISTS)}
    changed = 0
    for key in COMMAND_LISTS:
        assert len(twin.get(key) or []) == len(original.get(key) or [])
        for theirs, ours in zip(original.get(key) or [], twin.get(key) or []):
            restored = ours
            for name, value in assigned_variables(theirs).items():
                restored, _ = set_variable(restored, name, value)
            assert restored == theirs  # putting cluster.yaml's values back gives its command, character for character
            changed += ours != theirs
    assert changed == 3  # the clone (repo, ref), the install (extras), MLflow's start (artifacts)
    values = {n: v for key in COMMAND_LISTS for c in twin.get(key) or [] for n, v in assigned_variables(c).items()}
    assert values["PROBESWEEP_REPO"] == "file:///src/probesweep" and values["PROBESWEEP_EXTRAS"] == "deepspeed"
    assert "0.0.0.0" not in yaml.safe_dump(twin)


def test_a_renamed_variable_stops_the_twin():
    config = cluster_yaml()
    config["setup_commands"] = [c.replace("PROBESWEEP_EXTRAS=", "EXTRAS=") for c in config["setup_commands"]]
    with pytest.raises(ValueError, match="no command assigns PROBESWEEP_EXTRAS"):
        loopback_twin(config, TARGET)


@pytest.mark.parametrize("value", ["a b", "x;rm -rf ~", "`id`", "'q'", ""])
def test_a_value_the_shell_would_interpret_is_refused(value):
    with pytest.raises(ValueError, match="PROBESWEEP_REF"):
        loopback_twin(cluster_yaml(), replace(TARGET, ref=value))


def test_the_cli_writes_a_twin_of_this_checkout(tmp_path):
    out = tmp_path / "twin.yaml"
    subprocess.run([sys.executable, str(ROOT / "infra" / "cluster_twin.py"), "--ssh-user", "someone", "--ssh-key",
                    str(tmp_path / "key"), "--out", str(out)], check=True, capture_output=True, text=True, timeout=120)
    twin = yaml.safe_load(out.read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    clone = next(c for c in twin["setup_commands"] if "PROBESWEEP_REPO=" in c)
    assert assigned_variables(clone) == {"PROBESWEEP_REPO": ROOT.as_uri(), "PROBESWEEP_REF": head}


def test_share_venv_makes_the_packages_and_their_scripts_usable_but_not_the_editable_project(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site_packages = next(Path(p) for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
    shared = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "infra" / "cluster_twin.py"), "share-venv",
                             str(site_packages)], check=True, capture_output=True, text=True, timeout=120).stdout
    assert "ray" in shared.split() and "mlflow" in shared.split()
    version = subprocess.run([str(venv / "bin" / "ray"), "--version"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
    assert version.returncode == 0 and "2.60" in version.stdout, version.stderr[-2000:]
    assert (venv / "bin" / "ray").read_text().startswith(f"#!{venv / 'bin' / 'python'}\n")
    # the project itself comes from pip install -e of the head's clone, not from the shared folder's editable install
    project = subprocess.run([str(venv / "bin" / "python"), "-c", "import sweeps"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert project.returncode != 0 and "No module named 'sweeps'" in project.stderr
