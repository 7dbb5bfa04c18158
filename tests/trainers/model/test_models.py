import torch

from trainers.model.factory import TINY_PYTHIA_SIZES, count_parameters, load_model_and_tokenizer
from trainers.data.builtin import builtin_corpus
from trainers.data.tokenizer import train_bpe_tokenizer


def test_tokenizer_training_is_deterministic():
    texts = builtin_corpus()[:2000]
    first, second = train_bpe_tokenizer(texts, 512), train_bpe_tokenizer(texts, 512)
    assert first.get_vocab() == second.get_vocab()
    sample = texts[3]
    assert first(sample)["input_ids"] == second(sample)["input_ids"]
    assert first.decode(first(sample)["input_ids"]) == sample  # byte-level: lossless


def test_builtin_tokenizer_is_cached_and_round_trips():
    _, tokenizer = load_model_and_tokenizer("tiny-pythia-1m")
    _, again = load_model_and_tokenizer("tiny-pythia-1m")
    assert tokenizer.get_vocab() == again.get_vocab()
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    text = "\n\nHuman: How do I water basil?\n\nAssistant: Water it at the base every morning."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_sizes_grow_and_init_follows_the_seed():
    counts = []
    for name in TINY_PYTHIA_SIZES:
        model, tokenizer = load_model_and_tokenizer(name, seed=1)
        assert model.config.model_type == "gpt_neox"
        assert model.config.vocab_size == len(tokenizer)
        counts.append(count_parameters(model))
    assert counts == sorted(counts) and counts[0] < 1.5e6 and counts[-1] > 10e6
    a, _ = load_model_and_tokenizer("tiny-pythia-1m", seed=1)
    b, _ = load_model_and_tokenizer("tiny-pythia-1m", seed=1)
    c, _ = load_model_and_tokenizer("tiny-pythia-1m", seed=2)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_saved_model_loads_back_through_from_pretrained(tmp_path):
    model, tokenizer = load_model_and_tokenizer("tiny-pythia-1m", seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_unknown_model_name_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown model 'pythia-huge'"):
        load_model_and_tokenizer("pythia-huge")
