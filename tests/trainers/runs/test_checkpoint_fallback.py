"""Resuming from the newest readable checkpoint a trial kept: real checkpoint files in a Ray Train run
folder (checkpoint_<timestamp> folders), the latest one cut short."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from ray.train import Checkpoint

from trainers.config import TrainConfig
from trainers.runs.checkpoint_fallback import earlier_checkpoints, restore_newest_readable
from trainers.runs.policy_trainer import STATE_FILE, CheckpointError, PolicyTrainer

NAMES = ("checkpoint_2026-11-30_10-00-00.000100", "checkpoint_2026-11-30_10-00-05.000200",
         "checkpoint_2026-11-30_10-00-10.000300")


def _config(probe_dir) -> TrainConfig:
    return TrainConfig(model="tiny-pythia-1m", max_train_pairs=32, micro_batch_size=4, max_steps=3, eval_every=3,
                       num_probe_prompts=2, greedy_max_tokens=4, probe_set_dir=probe_dir, loss="dpo", beta=0.1,
                       lr=1e-3, warmup_steps=1, num_workers=1)


@pytest.fixture(scope="module")
def saved(builtin_probe_dir, tmp_path_factory):
    """A run folder as Ray Train keeps it (--checkpoints-to-keep 3): checkpoints after steps 1, 2 and 3,
    and each step's weights."""
    torch.set_num_threads(1)
    trainer = PolicyTrainer(_config(builtin_probe_dir))
    trainer.prepare()
    run = tmp_path_factory.mktemp("trial-run")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Train's own file beside the folders
    weights = {}
    for name in NAMES:
        trainer.train_step()
        trainer.save_checkpoint(run / name)
        weights[trainer.step] = {k: v.clone() for k, v in trainer.language_model().state_dict().items()}
    return run, weights


def _copy(run, tmp_path, names=NAMES):
    copy = tmp_path / "run"
    copy.mkdir()
    for name in names:
        shutil.copytree(run / name, copy / name)
    return copy


def _cut_short(folder):
    data = (folder / STATE_FILE).read_bytes()
    (folder / STATE_FILE).write_bytes(data[: len(data) // 2])  # as a failed upload or a full disk leaves it


def test_earlier_checkpoints_are_the_older_siblings_newest_first(saved, tmp_path):
    run = _copy(saved[0], tmp_path)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "not_a_checkpoint").mkdir()
    earlier = earlier_checkpoints(Checkpoint.from_directory(str(run / NAMES[2])))
    assert [c.path for c in earlier] == [str(run / NAMES[1]), str(run / NAMES[0])]
    # a folder named after the latest was never handed over by Train (a crash mid-upload): never tried
    assert [c.path for c in earlier_checkpoints(Checkpoint.from_directory(str(run / NAMES[1])))] == [str(run / NAMES[0])]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_kept_one(saved, builtin_probe_dir, tmp_path, caplog):
    run = _copy(saved[0], tmp_path, NAMES[:2])
    _cut_short(run / NAMES[1])
    trainer = PolicyTrainer(_config(builtin_probe_dir))
    with caplog.at_level(logging.WARNING, logger="trainers.runs.policy_trainer"):
        used = restore_newest_readable(trainer, Checkpoint.from_directory(str(run / NAMES[1])))
    assert used == str(run / NAMES[0]) and trainer.step == 1
    restored = trainer.language_model().state_dict()
    assert all(torch.equal(restored[k], v) for k, v in saved[1][1].items())  # step 1's weights, not step 2's
    assert str(run / NAMES[1] / STATE_FILE) in caplog.text and "unreadable checkpoint" in caplog.text


def test_a_readable_latest_checkpoint_is_used_without_a_warning(saved, builtin_probe_dir, tmp_path, caplog):
    run = _copy(saved[0], tmp_path)
    trainer = PolicyTrainer(_config(builtin_probe_dir))
    with caplog.at_level(logging.WARNING, logger="trainers.runs.policy_trainer"):
        used = restore_newest_readable(trainer, Checkpoint.from_directory(str(run / NAMES[2])))
    assert used == str(run / NAMES[2]) and trainer.step == 3 and "checkpoint" not in caplog.text


def test_no_readable_kept_checkpoint_fails_once_naming_every_file(saved, builtin_probe_dir, tmp_path):
    run = _copy(saved[0], tmp_path, NAMES[:2])
    for name in NAMES[:2]:
        _cut_short(run / name)
    with pytest.raises(CheckpointError) as caught:
        restore_newest_readable(PolicyTrainer(_config(builtin_probe_dir)), Checkpoint.from_directory(str(run / NAMES[1])))
    assert all(str(run / name / STATE_FILE) in str(caught.value) for name in NAMES[:2])
