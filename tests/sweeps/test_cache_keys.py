"""Every cache key covers the contents it depends on: edit a data file (same path) or a local model
folder and the SFT warm-up key changes; the probe-set, reference log-prob and tokenizer keys follow
their inputs' contents too. Nothing here needs Ray."""
from __future__ import annotations

import json

import torch

from probes.probe_set import probe_cache_key
from sweeps.config import SweepConfig
from sweeps.stages import sft_warmup_key
from trainers.config import TrainConfig
from trainers.data.collate import TokenizedPair
from trainers.data.schema import PreferencePair
from trainers.data.tokenizer import corpus_hash
from trainers.runs.reference_logps import reference_key

PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"


def write_rows(path, chosen: str) -> None:
    rows = [{"prompt": PROMPT.replace("egg", f"egg number {i}"), "chosen": f" {chosen} {i}", "rejected": " No."}
            for i in range(40)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_the_warmup_key_changes_when_the_data_file_changes_in_place(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_rows(data, "Boil it for nine minutes.")
    config = SweepConfig(train=TrainConfig(dataset=str(data)))
    before = sft_warmup_key(config, "tiny-pythia-1m", "chosen")
    assert sft_warmup_key(config, "tiny-pythia-1m", "chosen") == before  # same content, same key
    write_rows(data, "Boil it for ten minutes.")  # same path, same size class, new content
    after = sft_warmup_key(config, "tiny-pythia-1m", "chosen")
    assert after != before
    write_rows(data, "Boil it for nine minutes.")
    assert sft_warmup_key(config, "tiny-pythia-1m", "chosen") == before  # the key follows content, not time


def test_the_warmup_key_changes_when_a_local_model_folder_changes(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 64)
    config = SweepConfig()
    before = sft_warmup_key(config, str(folder), "chosen", data_hash="fixed")
    (folder / "model.safetensors").write_bytes(b"1" * 65)
    assert sft_warmup_key(config, str(folder), "chosen", data_hash="fixed") != before
    # a built-in name is fixed by the name (and the seed) alone
    assert sft_warmup_key(config, "tiny-pythia-1m", "chosen", "fixed") == sft_warmup_key(config, "tiny-pythia-1m", "chosen", "fixed")


def test_the_probe_set_reference_and_tokenizer_keys_follow_contents():
    pairs = [PreferencePair(PROMPT, " Nine minutes.", " No.", "a.jsonl", 0)]
    edited = [PreferencePair(PROMPT, " Ten minutes.", " No.", "a.jsonl", 0)]
    assert probe_cache_key("a.jsonl:test", 8, 0, "rule", pairs) != probe_cache_key("a.jsonl:test", 8, 0, "rule", edited)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    tokens = [TokenizedPair([1, 2], [3], [4])]
    before = reference_key(model, tokens)
    assert before != reference_key(model, [TokenizedPair([1, 2], [3], [5])])
    with torch.no_grad():
        model.weight[0, 0] += 1.0
    assert reference_key(model, tokens) != before
    assert corpus_hash(["a b c"], 256) != corpus_hash(["a b d"], 256)
