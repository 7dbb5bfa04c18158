"""The sweep's probe set never holds a training prompt; a given probe set that does is warned about."""
import json

import pytest

from probes.probe_set import ProbeSet
from sweeps.driver import check_training_data, prepare_probe_set, split_description
from trainers.config import TrainConfig


@pytest.fixture
def data_file(tmp_path):
    rows = [{"prompt": f"\n\nHuman: how do I fix problem {i}?\n\nAssistant:", "chosen": f" Check part {i} first.",
             "rejected": " I cannot say."} for i in range(120)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_probe_set_built_from_a_local_file_holds_no_training_prompt(tmp_path, data_file):
    train = TrainConfig(dataset=str(data_file), holdout_fraction=0.3, num_probe_prompts=8)
    num_pairs, training_prompts = check_training_data(train)
    probe_set, _ = prepare_probe_set(train, str(tmp_path / "runs"), training_prompts)
    assert 0 < len(probe_set.prompts) <= 8 and num_pairs < 120
    assert not set(probe_set.prompts) & training_prompts
    assert "--holdout-fraction" in split_description(train)


def test_a_given_probe_set_that_overlaps_training_is_warned_about(tmp_path, data_file, capsys):
    train = TrainConfig(dataset=str(data_file), holdout_fraction=0.3, num_probe_prompts=8)
    _, training_prompts = check_training_data(train)
    built, _ = prepare_probe_set(train, str(tmp_path / "runs"), training_prompts)
    leaked = ProbeSet((next(iter(training_prompts)),) + built.prompts[1:],
                      {c: r for c, r in built.responses.items()}, built.generators, built.source)
    leaked.save(tmp_path / "given")
    capsys.readouterr()
    prepare_probe_set(TrainConfig(dataset=str(data_file), holdout_fraction=0.3, num_probe_prompts=8,
                                  probe_set_dir=str(tmp_path / "given")), str(tmp_path / "runs"), training_prompts)
    assert "1 of its scored prompts are also training prompts" in capsys.readouterr().err


def test_no_held_out_prompt_left_is_one_line_error(tmp_path, data_file):
    train = TrainConfig(dataset=str(data_file), holdout_fraction=0.3, num_probe_prompts=8)
    everything = {json.loads(line)["prompt"] for line in data_file.read_text().splitlines()}
    with pytest.raises(SystemExit, match="--holdout-fraction"):
        prepare_probe_set(train, str(tmp_path / "runs"), everything)
