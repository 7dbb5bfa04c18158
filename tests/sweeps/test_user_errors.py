"""User mistakes the driver finds before any trial starts end in one line and a non-zero exit: a bad data
row (file, 1-based line, field), limits past the model's context (the flags and the limit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.driver import context_length, context_length_problem
from trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_prompt_and_response_limits_past_the_context_length_are_refused_naming_the_flags():
    assert context_length("tiny-pythia-1m") == 1024
    assert context_length_problem(TrainConfig(max_prompt_tokens=960, max_response_tokens=64), ["tiny-pythia-1m"]) is None
    problem = context_length_problem(TrainConfig(max_prompt_tokens=1000, max_response_tokens=64),
                                     ["tiny-pythia-1m", "tiny-pythia-4m"])
    assert problem == ("--max-prompt-tokens (1000) + --max-response-tokens (64) = 1064 tokens exceed the context "
                       "length of tiny-pythia-1m (1024); lower them to 1024 in all")


def test_a_local_model_folder_is_checked_against_its_own_config(tmp_path):
    folder = tmp_path / "small-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 128, "n_embd": 32,
                                                     "n_layer": 1, "n_head": 2, "vocab_size": 100}))
    assert context_length(str(folder)) == 128
    problem = context_length_problem(TrainConfig(), [str(folder)])  # defaults 160 + 64
    assert problem is not None and "= 224 tokens exceed the context length" in problem and "(128)" in problem


def run_sweep_cli(tmp_path, *argv):
    return subprocess.run([sys.executable, str(ROOT / "sweeps/dpo_beta.py"), "--storage-path", str(tmp_path / "runs"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--sft-steps", "0",
                           "--max-steps", "2", "--num-cpus", "2", *argv],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_bad_data_row_stops_the_sweep_in_one_line_without_a_traceback(tmp_path):
    prompt = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    good = json.dumps({"chosen": prompt + " Nine minutes.", "rejected": prompt + " No."})
    bad = json.dumps({"chosen": prompt + " Nine minutes.", "rejected": prompt + " "})
    (tmp_path / "hh.jsonl").write_text("\n".join([good] * 5 + ["", bad, good]) + "\n")
    done = run_sweep_cli(tmp_path, "--dataset", str(tmp_path / "hh.jsonl"))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: hh.jsonl, line 7, field 'rejected': empty response"
    assert "stage 1/2" not in done.stdout  # nothing trained


def test_limits_past_the_context_length_stop_the_sweep_before_training(tmp_path):
    done = run_sweep_cli(tmp_path, "--max-prompt-tokens", "1000")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: --max-prompt-tokens (1000) + --max-response-tokens (64) = 1064 tokens exceed the context length")


def test_a_missing_or_unreadable_data_file_is_refused_before_start_naming_the_flag(tmp_path):
    from sweeps.config import SweepConfig
    from sweeps.driver import check_before_start, data_file_problem

    storage = str(tmp_path / "runs")
    missing = tmp_path / "nowhere" / "hh.jsonl"
    with pytest.raises(SystemExit) as stopped:
        check_before_start(SweepConfig(train=TrainConfig(dataset=str(missing))), storage, {})
    assert str(stopped.value) == f"error: --dataset {missing}: no such file (relative to {Path.cwd()}); check the path"
    folder = tmp_path / "looks_like_a_file.jsonl"  # exists, but open() fails (also as root, unlike chmod 000)
    folder.mkdir()
    assert data_file_problem(str(folder)) == (f"--dataset {folder}: cannot be read (Is a directory); "
                                              "check the path and its permissions")
    good = tmp_path / "good.jsonl"
    good.write_text("{}\n")
    assert data_file_problem(str(good)) is None
    assert data_file_problem("builtin") is None and data_file_problem("Anthropic/hh-rlhf:helpful-base") is None
    if os.geteuid() != 0:  # permission bits bind everyone but root
        good.chmod(0)
        assert "cannot be read (Permission denied)" in data_file_problem(str(good))


def test_a_missing_data_file_stops_the_sweep_in_one_line_before_anything_starts(tmp_path):
    done = run_sweep_cli(tmp_path, "--dataset", "path/that/does/not/exist.jsonl")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --dataset path/that/does/not/exist.jsonl: no such file (relative to {os.path.realpath(tmp_path)}); check the path"]
    assert "preparing tokenizer" not in done.stdout and not (tmp_path / "mlflow.db").exists()
