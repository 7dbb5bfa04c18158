"""A local data file's held-out split: deterministic, by prompt, disjoint from training, sized by the flag."""
import json

import pytest

from trainers.config import TrainConfig
from trainers.data.pairs import is_held_out, load_preference_data


def write_pairs(path, n, repeats=1):
    rows = [{"prompt": f"\n\nHuman: question number {i}?\n\nAssistant:", "chosen": f" answer {i} ({r})",
             "rejected": f" no ({r})"} for i in range(n) for r in range(repeats)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_train_and_held_out_parts_partition_a_local_file_by_prompt(tmp_path):
    rows = write_pairs(tmp_path / "pairs.jsonl", 400, repeats=2)  # each prompt twice: both rows go to one side
    train = load_preference_data(str(tmp_path / "pairs.jsonl"), "train", holdout_fraction=0.25).pairs
    held = load_preference_data(str(tmp_path / "pairs.jsonl"), "test", holdout_fraction=0.25).pairs
    assert len(train) + len(held) == len(rows)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert 0.17 < len(held) / len(rows) < 0.33  # a hash split: about the fraction, not exactly
    # deterministic, and the same answer the rule gives row by row
    assert held == load_preference_data(str(tmp_path / "pairs.jsonl"), "test", holdout_fraction=0.25).pairs
    assert all(is_held_out(p.prompt, 0.25) for p in held) and not any(is_held_out(p.prompt, 0.25) for p in train)


def test_a_larger_fraction_only_adds_held_out_prompts(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 300)
    small = {p.prompt for p in load_preference_data(str(tmp_path / "pairs.jsonl"), "test", holdout_fraction=0.1).pairs}
    large = {p.prompt for p in load_preference_data(str(tmp_path / "pairs.jsonl"), "test", holdout_fraction=0.3).pairs}
    assert small < large


def test_max_rows_counts_rows_of_the_split(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 200)
    train = load_preference_data(str(tmp_path / "pairs.jsonl"), "train", max_rows=50, holdout_fraction=0.5).pairs
    assert len(train) == 50 and not any(is_held_out(p.prompt, 0.5) for p in train)


def test_builtin_splits_do_not_share_prompts():
    train = {p.prompt for p in load_preference_data("builtin", "train").pairs}
    assert not train & {p.prompt for p in load_preference_data("builtin", "test").pairs}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_holdout_fraction_outside_the_open_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match="holdout"):
        TrainConfig(holdout_fraction=fraction)
