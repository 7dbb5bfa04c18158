"""Every entry point's command line: its own defaults in --help, nothing heavy imported to print it,
fixed flags refused, bad values stopped at parse time in one line naming the flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.config import SweepConfig, parse_config
from trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "mlflow", "ray", "matplotlib")

# entry point -> text its --help must show (its own defaults, not the class defaults)
ENTRY_POINTS = {
    "sweeps/dpo_beta.py": ["(default: dpo-beta)", "(default: [0.05, 0.2, 0.8])", "(default: dpo)"],
    "sweeps/sft.py": ["(default: sft)", "(default: 0.003)", "(default: 200)"],
    "sweeps/ppo.py": ["(default: ppo)", "(default: [0.02, 0.2])", "(default: 30)"],
    "sweeps/model_size.py": ["(default: model-size)", "(default: ['tiny-pythia-1m', 'tiny-pythia-4m'])"],
    "sweeps/reward_model.py": ["(default: reward-model)", "(default: [0.0003, 0.001])"],
    "probes/build.py": ["--output", "(default: gemini-2.5-flash)", "(default: 32)"],
}
# text the --help of an entry point must not show (another entry point's defaults, or a flag it fixes)
NOT_IN_HELP = {
    "sweeps/sft.py": ["dpo-beta", "--betas", "--loss ", "--sft-steps"],
    "sweeps/ppo.py": ["dpo-beta", "--betas", "(default: dpo)", "--loss "],
}

HELP_PROBE = """
import contextlib, io, json, runpy, sys
sys.argv = [sys.argv[1], "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        if sys.argv[0].endswith("build.py"):
            runpy.run_module("probes.build", run_name="__main__")
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
print(json.dumps({"help": out.getvalue(), "code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("script", sorted(ENTRY_POINTS))
def test_help_shows_the_entry_points_own_defaults_without_heavy_imports(script):
    # wide columns: argparse would otherwise break "model-size" at its hyphen
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["help"] = " ".join(result["help"].split())  # argparse wraps lines anywhere
    assert result["code"] == 0
    assert result["heavy"] == []  # deterministic stand-in for "returns in well under 2 s"
    for text in ENTRY_POINTS[script]:
        assert text in result["help"], text
    for text in NOT_IN_HELP.get(script, []):
        assert text not in result["help"], text


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, flag", [
    (["sweeps/sft.py", "--loss", "dpo"], "--loss"),
    (["sweeps/sft.py", "--sft-steps", "10"], "--sft-steps"),
    (["sweeps/sft.py", "--betas", "0.1"], "--betas"),
    (["sweeps/ppo.py", "--loss", "dpo"], "--loss"),
    (["sweeps/dpo_beta.py", "--loss", "ppo"], "--loss"),
    (["sweeps/dpo_beta.py", "--models", "tiny-pythia-4m"], "--models"),
    (["sweeps/model_size.py", "--kl-coefs", "0.1"], "--kl-coefs"),
])
def test_a_flag_the_entry_point_fixes_is_refused_in_one_line(argv, flag):
    done = run_cli(*argv)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], done.stderr


def test_a_bad_beta_stops_before_the_warmup_with_one_line():
    done = run_cli("sweeps/dpo_beta.py", "--betas", "-1", "--max-steps", "2")
    assert done.returncode == 2
    assert "preparing" not in done.stdout and "stage 1/2" not in done.stdout  # nothing started
    assert done.stderr.strip() == "sweeps/dpo_beta.py: error: --betas must be a finite number > 0, got -1.0"


@pytest.mark.parametrize("argv, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lrs", "1e-3", "nan"], "--lrs must be a finite number > 0, got nan"),
    (["--beta", "inf"], "--beta must be a finite number > 0, got inf"),
    (["--beta", "0"], "--beta must be a finite number > 0, got 0.0"),
    (["--max-failures", "-1"], "--max-failures must be a finite number >= 0, got -1"),
    (["--warmup-steps", "0"], "--warmup-steps must be a finite number >= 1, got 0"),
    (["--sft-steps", "-1"], "--sft-steps must be a finite number >= 0, got -1"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be a finite number in [0, 0.5), got 0.5"),
    (["--label-smoothing", "0.1", "--loss", "ipo"], "--label-smoothing applies to dpo and cdpo only; loss 'ipo' takes none"),
    (["--label-smoothing", "0.1", "--losses", "dpo", "ipo"], "loss 'ipo' takes none"),
    (["--rollout-actors", "0"], "--rollout-actors must be a finite number >= 1, got 0"),
    (["--rollout-timeout-s", "nan"], "--rollout-timeout-s must be a finite number > 0, got nan"),
    (["--ppo-gamma", "1.5"], "--ppo-gamma must be a finite number in [0, 1], got 1.5"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker must be a finite number > 0"),
    (["--worker-shares", "tiny-pythia-1m=inf"], "--worker-shares: expected MODEL=SHARE with a finite value > 0"),
    (["--num-cpus", "0"], "--num-cpus must be a finite number >= 1, got 0"),
    (["--sft-recipes", "chosen", "rejected"], "--sft-recipes must be one of chosen, both; got 'rejected'"),
    (["--name", "../x"], "--name must be a plain folder name"),
    (["--name", "a/b"], "--name must be a plain folder name"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
])
def test_bad_values_are_refused_at_parse_time_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(argv, "test")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_value_in_the_yaml_file_names_the_file_and_the_flag(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text("train:\n  lr: .nan\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)], "test")
    err = capsys.readouterr().err
    assert f"{path}: --lr must be a finite number > 0, got nan" in err


def test_the_rollout_section_has_one_default_and_stable_flags():
    from rollout.actors import RolloutConfig

    config = parse_config(["--rollout-actors", "3", "--rollout-cpus-per-actor", "0.25"], "test")
    assert (config.train.rollout.num_actors, config.train.rollout.cpus_per_actor) == (3, 0.25)
    assert RolloutConfig().cpus_per_actor == TrainConfig().rollout.cpus_per_actor == 0.15
    # a recorded config (nested sections) reads back as the same config
    assert SweepConfig(**{**config.to_dict(), "train": config.train.to_dict()}) == config
    assert TrainConfig.from_dict(config.train.to_dict()) == config.train


def test_the_resolved_config_file_is_a_valid_config_file(tmp_path):
    import yaml

    config = parse_config(["--betas", "0.3", "--rollout-actors", "3", "--sft-recipe", "both"], "test")
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert parse_config(["--config", str(path)], "test") == config


def test_loss_names_live_in_the_registry():
    from trainers.config import OBJECTIVES, preference_losses
    from trainers.model.losses import PREFERENCE_LOSSES

    assert set(PREFERENCE_LOSSES) == set(preference_losses())
    assert set(OBJECTIVES) == {"sft", "ppo", *PREFERENCE_LOSSES}


def test_importing_the_plots_leaves_matplotlib_alone_and_figures_still_render(tmp_path):
    script = ("import sys\nimport probes.plots as plots\nassert 'matplotlib' not in sys.modules\n"
              "figure = plots.plot_category_curves({'a': {'chosen': [(0, -2.0), (5, -1.0)]}}, title='t')\n"
              "figure.savefig(sys.argv[1])\nprint('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no pyplot')\n")
    out = tmp_path / "curves.png"
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no pyplot" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "http://localhost:5000", "https://LOCALHOST", "http://[::1]:5000",
                                 "http://127.0.0.2:5000"])
def test_trials_off_the_head_with_a_loopback_tracking_server_are_refused(uri, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(["--trials-on-head", "false", "--tracking-uri", uri], "test")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--trials-on-head false with --tracking-uri {uri}: trial processes on other nodes " \
                             "cannot reach a loopback address" in err[0], err
    # on the head (the default) the head's own loopback server is right; any other address is left to the user
    assert parse_config(["--tracking-uri", uri], "test").tracking_uri == uri
    assert not parse_config(["--trials-on-head", "false", "--tracking-uri", "http://10.0.0.5:5000"], "test").trials_on_head
    assert not parse_config(["--trials-on-head", "false", "--tracking-uri", "http://mlflow.internal:5000"], "test").trials_on_head
