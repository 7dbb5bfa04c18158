"""The training run without Ray: reproducibility, learning signal, evaluation records, and state
files that are planted, cut short or corrupt."""
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import TrainConfig
from trainers.runs.policy_trainer import (MODEL_COMPLETE_FILE, STATE_FILE, CheckpointError, PolicyTrainer,
                                          model_is_complete)


def _config(probe_dir, **overrides):
    values = dict(model="tiny-pythia-1m", max_train_pairs=64, micro_batch_size=4, max_steps=3, eval_every=3,
                  num_probe_prompts=4, greedy_max_tokens=8, probe_set_dir=probe_dir, loss="dpo", beta=0.1, lr=1e-3,
                  warmup_steps=1, num_workers=1)
    values.update(overrides)
    return TrainConfig(**values)


def _run(config):
    torch.set_num_threads(1)
    trainer = PolicyTrainer(config)
    trainer.prepare()
    history = [trainer.train_step() for _ in range(config.max_steps)]
    summary, records = trainer.evaluate()
    return trainer, history, summary, records


def test_same_seed_same_curves_other_seed_differs(builtin_probe_dir):
    _, first, first_eval, _ = _run(_config(builtin_probe_dir, seed=0))
    _, second, second_eval, _ = _run(_config(builtin_probe_dir, seed=0))
    _, third, _, _ = _run(_config(builtin_probe_dir, seed=1))
    for a, b in zip(first, second):
        for key in ("train/loss", "dpo/reward_margin", "dpo/logp_chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)
    for key, value in first_eval.items():
        assert value == pytest.approx(second_eval[key], abs=1e-5), key
    assert abs(first[-1]["train/loss"] - third[-1]["train/loss"]) > 1e-6


def test_grad_cos_prompts_zero_turns_the_alignment_off(builtin_probe_dir):
    trainer = PolicyTrainer(_config(builtin_probe_dir, grad_cos_prompts=0, max_steps=1))
    trainer.prepare()
    summary, _ = trainer.evaluate()
    assert "logp/chosen" in summary and not any(key.startswith("grad_cos/") for key in summary)


def test_dpo_starts_at_log2_and_every_parameter_moves(builtin_probe_dir):
    trainer, history, summary, records = _run(_config(builtin_probe_dir))
    # policy == reference at the first step, so the sigmoid DPO loss is exactly log 2
    assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    reference = dict(trainer.reference_model.named_parameters())
    for name, parameter in trainer.model.named_parameters():
        assert not torch.equal(parameter, reference[name]), f"{name} did not change"
    categories = {r["category"] for r in records}
    assert categories == {"chosen", "rejected", "paraphrase_chosen", "paraphrase_rejected", "variant", "random",
                          "nonresponse", "greedy", "sample"}
    assert len(records) == 4 * len(categories)
    assert all(r["num_tokens"] > 0 and r["logp_sum"] < 0 for r in records)
    assert set(summary) == {f"{p}/{c}" for p in ("logp", "logp_tok", "argmax_logp", "entropy", "peak_gap")
                            for c in categories} | {f"grad_cos/{c}" for c in trainer.probes.categories}
    assert all(-1 <= summary[f"grad_cos/{c}"] <= 1 for c in trainer.probes.categories)
    for r in records:  # the per-token values add up to the summed log-prob (probes.token_views reads them)
        assert len(r["token_ids"]) == len(r["token_texts"]) == len(r["token_logps"]) == r["num_tokens"]
        assert sum(r["token_logps"]) == pytest.approx(r["logp_sum"], abs=1e-4)
        assert r["peak_gap"] <= 1e-6 and r["entropy"] >= 0 and r["argmax_logp"] <= 1e-6


def test_sft_lowers_its_loss(builtin_probe_dir):
    trainer, history, _, _ = _run(_config(builtin_probe_dir, loss="sft", max_steps=6, lr=3e-3))
    assert trainer.reference_model is None
    assert history[-1]["train/loss"] < history[0]["train/loss"]


def test_grad_accumulation_equals_the_whole_batch(builtin_probe_dir):
    # DPO's loss is a per-pair mean, so 2 micro-batches of 2 must give the step of 1 batch of 4 (same pairs)
    _, whole, _, _ = _run(_config(builtin_probe_dir, max_steps=2, micro_batch_size=4, grad_accum_steps=1))
    _, split, _, _ = _run(_config(builtin_probe_dir, max_steps=2, micro_batch_size=2, grad_accum_steps=2))
    for key in ("train/loss", "train/grad_norm"):
        assert whole[1][key] == pytest.approx(split[1][key], rel=1e-4, abs=1e-7), key
    # the margin is beta x a difference of four float32 log-prob sums of ~100 nats, each summed in another
    # order (other padding) in the two runs: ~1e-5 nats apart each, so its floor is absolute, not relative
    # (0.005 +- 2e-6 measured on one CPU); a wrong accumulation moves it by the size of the margin itself
    beta = 0.1
    assert whole[1]["dpo/reward_margin"] == pytest.approx(split[1]["dpo/reward_margin"], rel=1e-4, abs=beta * 4e-5)


def _shared_reference(config, directory):
    from trainers.data.collate import load_training_pairs
    from trainers.model.factory import load_model_and_tokenizer
    from trainers.runs.reference_logps import load_or_compute_reference_logps

    model, tokenizer = load_model_and_tokenizer(config.model, seed=config.seed)
    _, pairs, _ = load_training_pairs(config, tokenizer)
    return load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, directory, batch_size=5)


def test_shared_reference_logps_give_the_same_run(builtin_probe_dir, tmp_path):
    config = _config(builtin_probe_dir, max_steps=3)
    _, per_step, per_step_eval, _ = _run(config)
    logps, path, computed = _shared_reference(config, tmp_path)
    assert computed and path.exists() and len(logps.chosen) == 64
    assert _shared_reference(config, tmp_path)[2] is False  # the second request loads the file
    trainer, shared, shared_eval, _ = _run(_config(builtin_probe_dir, max_steps=3, reference_logps_dir=str(tmp_path)))
    assert trainer.reference_model is None  # no second model in memory
    for a, b in zip(per_step, shared):
        for key in ("train/loss", "dpo/reward_margin", "dpo/reward_accuracy", "dpo/logp_chosen", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for key, value in per_step_eval.items():
        assert value == pytest.approx(shared_eval[key], abs=1e-4), key


def test_shared_reference_logps_refuse_other_data(builtin_probe_dir, tmp_path):
    from trainers.runs.reference_logps import ReferenceLogps

    _shared_reference(_config(builtin_probe_dir, max_train_pairs=64), tmp_path)
    # a different data slice gives a different key: no file for it, a clear error
    with pytest.raises(FileNotFoundError):
        _run(_config(builtin_probe_dir, max_train_pairs=32, reference_logps_dir=str(tmp_path)))
    stored = next(tmp_path.glob("reference-logps-*.npz"))
    with pytest.raises(ValueError, match="computed for key"):
        ReferenceLogps.load(stored, "another-key", 64)


# --- files from shared storage that are planted, cut short or corrupt: refused without running code,
# recomputed, or skipped for the previous checkpoint, each time naming the file ----------------------

def _small(probe_dir, **overrides):
    return _config(probe_dir, **{"max_train_pairs": 32, "max_steps": 2, "eval_every": 2, "num_probe_prompts": 2,
                                 "greedy_max_tokens": 4, **overrides})


class _Planted:
    """Unpickling this (as weights_only=False would) creates the marker file: code ran from the checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def trained(builtin_probe_dir, tmp_path_factory):
    """A trainer two steps in, and its checkpoints after step 1 and step 2."""
    torch.set_num_threads(1)
    trainer = PolicyTrainer(_small(builtin_probe_dir))
    trainer.prepare()
    folders = []
    for _ in range(2):
        trainer.train_step()
        folder = tmp_path_factory.mktemp(f"checkpoint-{trainer.step}")
        trainer.save_checkpoint(folder)
        folders.append(folder)
    return trainer, folders


def _fresh(builtin_probe_dir) -> PolicyTrainer:
    return PolicyTrainer(_small(builtin_probe_dir))


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.language_model().state_dict().items()}


def test_a_checkpoint_loads_with_weights_only(trained, builtin_probe_dir):
    trainer, folders = trained
    restored = _fresh(builtin_probe_dir)
    restored.load_checkpoint(folders[-1])
    assert restored.step == 2
    expected = _weights(trainer)
    assert all(torch.equal(v, expected[k]) for k, v in _weights(restored).items())
    assert restored.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]
    assert not list(Path(folders[-1]).glob(".*"))  # the atomic write left no temporary beside the state


def test_a_planted_pickle_is_refused_and_runs_nothing(trained, builtin_probe_dir, tmp_path):
    trainer, _ = trained
    marker = tmp_path / "code-ran"
    state = {**trainer.state_dict(), "step": _Planted(str(marker))}
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match=rf"{tmp_path / STATE_FILE}: refused"):
        _fresh(builtin_probe_dir).load_checkpoint(tmp_path)
    assert not marker.exists()
    # the same file through plain pickle really would have run it: the test's payload is live
    torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert marker.exists()


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous(trained, builtin_probe_dir, tmp_path, caplog):
    _, (first, second) = trained
    broken = tmp_path / "checkpoint-2"
    broken.mkdir()
    data = (Path(second) / STATE_FILE).read_bytes()
    (broken / STATE_FILE).write_bytes(data[: len(data) // 2])         # cut short, as a failed copy leaves it
    restored = _fresh(builtin_probe_dir)
    with caplog.at_level(logging.WARNING, logger="trainers.runs.policy_trainer"):
        used = restored.load_latest_readable_checkpoint([broken, first])
    assert used == first and restored.step == 1
    assert str(broken / STATE_FILE) in caplog.text and "unreadable checkpoint" in caplog.text


def test_no_readable_checkpoint_fails_once_naming_every_file(builtin_probe_dir, tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
        (folder / STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError) as caught:
        _fresh(builtin_probe_dir).load_latest_readable_checkpoint(folders)
    assert all(str(folder / STATE_FILE) in str(caught.value) for folder in folders)


def test_a_final_model_is_marked_complete_last(trained, tmp_path):
    trainer, _ = trained
    (tmp_path / MODEL_COMPLETE_FILE).write_text("from an earlier save")
    written = []
    real_save = trainer.tokenizer.save_pretrained

    def save(directory, **kwargs):
        written.append(model_is_complete(directory))  # not complete while files are still being written
        return real_save(directory, **kwargs)

    trainer.tokenizer.save_pretrained = save
    try:
        trainer.save_pretrained(str(tmp_path))
    finally:
        del trainer.tokenizer.save_pretrained
    assert written == [False] and model_is_complete(tmp_path)
    assert (tmp_path / "config.json").is_file()


# --- reference log-probs ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty", "not a zip"])
def test_a_damaged_reference_file_is_recomputed_with_a_warning(builtin_probe_dir, tmp_path, caplog, damage):
    config = _small(builtin_probe_dir)
    first, path, computed = _shared_reference(config, tmp_path)
    assert computed
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "not a zip": b"garbage" * 50}[damage])
    with caplog.at_level(logging.WARNING, logger="trainers.runs.reference_logps"):
        again, same_path, recomputed = _shared_reference(config, tmp_path)
    assert same_path == path and recomputed
    assert str(path) in caplog.text
    np.testing.assert_array_equal(again.chosen, first.chosen)
    np.testing.assert_array_equal(again.rejected, first.rejected)
    assert _shared_reference(config, tmp_path)[2] is False                     # the rewritten file loads
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]    # no temporary left beside it


def test_a_worker_names_a_damaged_reference_file(builtin_probe_dir, tmp_path):
    from trainers.runs.reference_logps import UnreadableReferenceLogps

    config = _small(builtin_probe_dir)
    _, path, _ = _shared_reference(config, tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UnreadableReferenceLogps, match=rf"{path}: unreadable reference log-prob file"):
        PolicyTrainer(_small(builtin_probe_dir, reference_logps_dir=str(tmp_path)))
    assert os.path.getsize(path) == 100  # a worker reports; the driver's next request recomputes
