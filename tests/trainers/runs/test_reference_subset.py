"""Shared reference log-probs of only the pairs a sweep's schedule visits: the set, its values, and
trials that stay inside it (or fail naming the pair when they would not)."""
import random

import numpy as np
import pytest
import torch

from trainers.config import TrainConfig
from trainers.data.seeds import derive_seed
from trainers.runs.policy_trainer import PolicyTrainer
from trainers.runs.reference_logps import (MissingReferenceLogps, ReferenceLogps, compute_reference_logps,
                                           load_or_compute_reference_logps, visited_pair_indices)


def _stream_prefix(num_pairs: int, seed: int, length: int) -> set[int]:
    """Independent of ShardedBatches: the first `length` positions of the per-epoch reshuffled stream."""
    out, epoch = [], 0
    while len(out) < length:
        order = list(range(num_pairs))
        random.Random(derive_seed(seed, epoch)).shuffle(order)
        out += order
        epoch += 1
    return set(out[:length])


@pytest.mark.parametrize("n, micro, world, accum, seed, steps", [(64, 4, 1, 1, 0, 3), (64, 2, 2, 2, 3, 5), (10, 4, 2, 1, 1, 4)])
def test_visited_pairs_are_the_schedules_stream_prefix(n, micro, world, accum, seed, steps):
    visited = visited_pair_indices(n, micro, world, accum, seed, steps)
    # every step covers micro x world x accum stream positions, plus one batch for the final gradient alignment
    assert set(visited.tolist()) == _stream_prefix(n, seed, (steps * accum + 1) * micro * world)
    assert list(visited) == sorted(set(visited.tolist()))


def _config(probe_dir, **overrides):
    values = dict(model="tiny-pythia-1m", max_train_pairs=64, micro_batch_size=4, max_steps=3, eval_every=3,
                  num_probe_prompts=4, greedy_max_tokens=8, probe_set_dir=probe_dir, loss="dpo", beta=0.1, lr=1e-3,
                  warmup_steps=1, num_workers=1)
    values.update(overrides)
    return TrainConfig(**values)


def _model_and_pairs(config):
    from trainers.data.collate import load_training_pairs
    from trainers.model.factory import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model, seed=config.seed)
    _, pairs, _ = load_training_pairs(config, tokenizer)
    return model, tokenizer, pairs


def test_the_subset_holds_the_full_computations_values_and_nothing_else(builtin_probe_dir, tmp_path):
    torch.set_num_threads(1)
    config = _config(builtin_probe_dir)
    model, tokenizer, pairs = _model_and_pairs(config)
    visited = visited_pair_indices(len(pairs), 4, 1, 1, config.seed, config.max_steps)
    assert 0 < len(visited) < len(pairs)  # 4 batches of 4 out of 64: a real subset
    full_chosen, full_rejected = compute_reference_logps(model, pairs, tokenizer.pad_token_id, batch_size=5)
    logps, path, computed = load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, tmp_path,
                                                            batch_size=8, indices=visited)
    assert computed
    loaded = ReferenceLogps.load(path, logps.key, len(pairs))
    chosen, rejected = loaded.pick(visited)
    # batches of other neighbours pad differently: equal up to float32 summation order
    np.testing.assert_allclose(chosen, full_chosen[visited], atol=1e-4, rtol=0)
    np.testing.assert_allclose(rejected, full_rejected[visited], atol=1e-4, rtol=0)
    outside = np.setdiff1d(np.arange(len(pairs)), visited)
    assert not loaded.holds()[outside].any() and loaded.holds()[visited].all()
    with pytest.raises(MissingReferenceLogps, match=rf"pairs \[{outside[0]}"):
        loaded.pick([int(visited[0]), int(outside[0])])
    # a longer schedule reuses what is there and adds only the missing pairs
    longer = visited_pair_indices(len(pairs), 4, 1, 1, config.seed, 6)
    extended, _, computed_again = load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, tmp_path,
                                                                  batch_size=8, indices=longer)
    assert computed_again and extended.holds()[longer].all()
    assert np.array_equal(extended.chosen[visited], loaded.chosen[visited])  # the old values kept as they were
    assert load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, tmp_path, indices=visited)[2] is False


def test_a_trial_on_the_sweeps_schedule_stays_inside_the_subset_another_fails_loudly(builtin_probe_dir, tmp_path):
    torch.set_num_threads(1)
    config = _config(builtin_probe_dir, reference_logps_dir=str(tmp_path))
    model, tokenizer, pairs = _model_and_pairs(config)
    visited = visited_pair_indices(len(pairs), config.micro_batch_size, config.num_workers, config.grad_accum_steps,
                                   config.seed, config.max_steps)
    load_or_compute_reference_logps(model, pairs, tokenizer.pad_token_id, tmp_path, batch_size=8, indices=visited)
    trainer = PolicyTrainer(config)
    trainer.prepare()
    for _ in range(config.max_steps):
        assert np.isfinite(trainer.train_step()["train/loss"])
    summary, _ = trainer.evaluate()  # the final evaluation's gradient alignment reads the next batch
    assert all(np.isfinite(v) for v in summary.values())
    # a trial with more steps than the sweep planned for asks for a pair the file lacks
    longer = PolicyTrainer(_config(builtin_probe_dir, reference_logps_dir=str(tmp_path), max_steps=40))
    longer.prepare()
    with pytest.raises(MissingReferenceLogps, match="not in the shared reference log-probs"):
        for _ in range(40):
            longer.train_step()
