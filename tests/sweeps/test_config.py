import pytest

from sweeps.config import SweepConfig, parse_config
from trainers.config import TrainConfig


def test_defaults_are_the_embedded_default():
    config = parse_config([], "test")
    assert config == SweepConfig()
    assert config.train.model == "tiny-pythia-1m" and config.train.dataset == "builtin"
    assert len(config.betas) >= 3


def test_flags_override_every_kind_of_field():
    config = parse_config(["--betas", "0.1", "0.3", "--lrs", "1e-4", "--model", "tiny-pythia-4m", "--max-steps", "7",
                           "--eval-every", "3", "--tracking-uri", "http://127.0.0.1:5000", "--experiment-name", "x",
                           "--storage-path", "/tmp/s", "--address", "auto", "--skip-bad-rows", "true",
                           "--max-train-pairs", "12"], "test")
    assert config.betas == [0.1, 0.3] and config.lrs == [1e-4]
    assert config.train.model == "tiny-pythia-4m" and config.train.max_steps == 7 and config.train.eval_every == 3
    assert config.tracking_uri == "http://127.0.0.1:5000" and config.experiment_name == "x"
    assert config.storage_path == "/tmp/s" and config.address == "auto"
    assert config.train.skip_bad_rows is True and config.train.max_train_pairs == 12


def test_bare_boolean_flag_means_true():
    assert parse_config(["--resume"], "test").resume is True
    assert parse_config(["--resume", "false"], "test").resume is False


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("betas: [0.5]\nmax_steps: 11\ntrain:\n  lr: 0.002\n  seed: 3\n")
    config = parse_config(["--config", str(path), "--seed", "4"], "test")
    assert config.betas == [0.5]
    assert config.train.max_steps == 11 and config.train.lr == 0.002
    assert config.train.seed == 4  # the flag wins over the file


def test_unknown_yaml_key_is_rejected(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("betaz: [0.5]\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)], "test")
    assert "betaz" in capsys.readouterr().err


def test_invalid_values_are_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--loss", "rlhf"], "test")
    assert "--loss: invalid choice: 'rlhf'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--loss must be one of"):
        TrainConfig(loss="rlhf")
    with pytest.raises(ValueError, match="--beta must be a finite number > 0, got 0.0"):
        TrainConfig(beta=0.0)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"model": "x", "nope": 1})


def test_help_lists_the_documented_flags(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], "the help text")
    out = capsys.readouterr().out
    for flag in ("--betas", "--lrs", "--model", "--dataset", "--max-steps", "--eval-every", "--tracking-uri",
                 "--experiment-name", "--storage-path", "--address", "--config"):
        assert flag in out
