import pytest

from trainers.data.batches import ShardedBatches
from trainers.data.collate import collate_preference_batch, tokenize_pair, tokenize_pairs
from trainers.data.schema import DataError, PreferencePair
from trainers.model.logprobs import IGNORE_INDEX
from trainers.model.factory import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-pythia-1m")


def _pair(prompt="\n\nHuman: How do I boil an egg?\n\nAssistant:", chosen=" Boil it for nine minutes.", rejected=" No."):
    return PreferencePair(prompt, chosen, rejected, source="data.jsonl", row=4)


def test_prompt_shared_and_eos_appended(tokenizer):
    pair = tokenize_pair(tokenizer, _pair(), 64, 32)
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids[:-1]) == _pair().prompt + _pair().chosen


def test_labels_mask_prompt_and_padding(tokenizer):
    pairs = [tokenize_pair(tokenizer, _pair(), 64, 32), tokenize_pair(tokenizer, _pair(chosen=" Ten minutes in water, then cool it."), 64, 32)]
    batch = collate_preference_batch(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4
    for row, (pair, response) in enumerate([(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]):
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == response
        assert (labels[: len(pair.prompt_ids)] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum().item() == len(pair.prompt_ids) + len(response)


def test_truncation_policy(tokenizer):
    long_prompt = "\n\nHuman: " + "tell me more " * 50 + "\n\nAssistant:"
    pair = tokenize_pair(tokenizer, _pair(prompt=long_prompt, chosen=" word" * 40), 16, 8)
    assert len(pair.prompt_ids) == 16 and len(pair.chosen_ids) == 8
    # the end of the prompt (the question being answered) is what is kept
    assert tokenizer.decode(pair.prompt_ids).endswith("\n\nAssistant:")
    with pytest.raises(DataError) as error:
        tokenize_pair(tokenizer, _pair(chosen=" word" * 40), 64, 8, policy="error")
    assert "data.jsonl" in str(error.value) and "row 4" in str(error.value) and "'chosen'" in str(error.value)
    kept, skipped = tokenize_pairs(tokenizer, [_pair(), _pair(rejected=" no" * 40)], 64, 16, "error", skip_bad_rows=True)
    assert len(kept) == 1 and len(skipped) == 1 and skipped[0].field == "rejected"


def test_sharded_batches_cover_every_pair_once_per_epoch():
    items = list(range(40))
    seen = []
    for rank in range(2):
        batches = ShardedBatches(items, micro_batch_size=4, rank=rank, world_size=2, seed=7)
        for index in range(5):  # 5 global batches of 8 = one epoch
            seen.extend(batches.batch(index))
    assert sorted(seen) == items
    again = ShardedBatches(items, 4, 1, 2, seed=7)
    assert again.batch(3) == ShardedBatches(items, 4, 1, 2, seed=7).batch(3)
    assert ShardedBatches(items, 4, 0, 2, seed=7).batch(5) != ShardedBatches(items, 4, 0, 2, seed=7).batch(0)
