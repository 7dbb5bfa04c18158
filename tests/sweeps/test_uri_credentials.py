"""Credentials in a URI are refused when the config is made, in one line that names the flag and where
credentials belong, and the secret itself appears nowhere in what the command prints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.uri_credentials import credentials_in
from sweeps.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzz"


@pytest.mark.parametrize("argv, flag, where", [
    (["--storage-path", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"], "--storage-path", "AWS_SECRET_ACCESS_KEY"),
    (["--storage-path", f"s3://AKIAEXAMPLE:{SECRET}/with/slash@bucket/runs"], "--storage-path", "AWS_SECRET_ACCESS_KEY"),
    (["--storage-path", f"s3://bucket/runs?endpoint_override=h:9000&secret_key={SECRET}"], "--storage-path", "~/.aws/credentials"),
    (["--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:5000"], "--tracking-uri", "MLFLOW_TRACKING_PASSWORD"),
    (["--tracking-uri", f"postgresql://mlflow:{SECRET}@db.internal/mlflow"], "--tracking-uri", "MLFLOW_TRACKING_USERNAME"),
    (["--init-checkpoint", f"gs://user:{SECRET}@bucket/warmup"], "--init-checkpoint", "GOOGLE_APPLICATION_CREDENTIALS"),
    (["--reward", f"s3://bucket/rm?access_key=AKIA&session_token={SECRET}"], "--reward", "environment"),
])
def test_a_uri_with_credentials_is_refused_without_echoing_the_secret(argv, flag, where, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(argv, "test")
    assert stop.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and f"{flag}: the URI carries credentials" in err and where in err, err
    assert SECRET not in captured.err + captured.out


def test_a_yaml_file_with_a_secret_in_a_uri_is_refused_without_echoing_it(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"storage_path: s3://AKIAEXAMPLE:{SECRET}@bucket/runs\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)], "test")
    captured = capsys.readouterr()
    assert "--storage-path: the URI carries credentials" in captured.err
    assert SECRET not in captured.err + captured.out


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http",
                                 "http://127.0.0.1:5000", "http://[::1]:5000", "sqlite:///runs/mlflow.db",
                                 "file:///data/runs", "databricks", "hh.jsonl", "Anthropic/hh-rlhf:helpful-base"])
def test_uris_without_credentials_pass(uri):
    assert credentials_in(uri) is None
    parse_config(["--storage-path", uri, "--tracking-uri", uri], "test")


@pytest.mark.parametrize("script", ["sweeps/dpo_beta.py", "sweeps/reward_model.py"])
def test_the_entry_points_refuse_a_secret_in_a_uri_before_anything_starts(script):
    done = subprocess.run([sys.executable, script, "--storage-path", f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs",
                           "--tracking-uri", f"http://alice:{SECRET}@127.0.0.1:5000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert SECRET not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "the URI carries credentials" in done.stderr, done.stderr
