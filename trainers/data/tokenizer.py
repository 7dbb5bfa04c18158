"""The project's own byte-level BPE tokenizer, trained on the built-in corpus.

No model hub is reachable, so the tiny built-in models need a tokenizer the project can build
itself. Training is deterministic for a given corpus and vocabulary size, and the result is cached
on disk keyed by a hash of both, so every worker of every trial loads the same files.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from infra import storage

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 2048


def corpus_hash(texts: Iterable[str], vocab_size: int) -> str:
    digest = hashlib.sha256(f"vocab={vocab_size}\n".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def train_bpe_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a GPT-NeoX-style byte-level BPE; EOS doubles as BOS and pad, as in Pythia."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def builtin_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Load the built-in tokenizer from the cache, training it first if it is not there."""
    from trainers.data.builtin import builtin_corpus

    texts = builtin_corpus()
    key = corpus_hash(texts, vocab_size)
    directory = (cache_dir or storage.cache_root() / "tokenizers") / f"builtin-{key}"
    if not (directory / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(texts, vocab_size)
        directory.parent.mkdir(parents=True, exist_ok=True)
        # write beside, then rename: concurrent workers never see a half-written tokenizer
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".staging-"))
        tokenizer.save_pretrained(staging)
        storage.publish_dir(staging, directory)  # a process that lost the race drops its identical copy
    return PreTrainedTokenizerFast.from_pretrained(directory)
