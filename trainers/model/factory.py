"""Model factory: a causal LM and its tokenizer from a hub name, a local path, or a built-in size.

The built-in sizes are Pythia-architecture (GPT-NeoX) models, random-initialised from a seed, with
the project's own tokenizer, so every entry point runs on a laptop with no model hub. A real name
(`EleutherAI/pythia-410m`) or a saved folder goes through `from_pretrained` unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerBase

from trainers.data.tokenizer import DEFAULT_VOCAB_SIZE, builtin_tokenizer
from trainers.model.pretrained import PRETRAINED_MODELS, resolve_model_path


@dataclass(frozen=True)
class TinyPythiaSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int


# names give the rough parameter count with the 2,048-token built-in vocabulary
TINY_PYTHIA_SIZES: dict[str, TinyPythiaSize] = {  # smallest first
    # vLLM's CPU attention takes head_dim 32 or 64 only: 2m (32), 4m (32) and 16m-hd64 run there; 1m (24)
    # and 16m (48) do not
    "tiny-pythia-1m": TinyPythiaSize(hidden_size=96, num_hidden_layers=4, num_attention_heads=4),
    "tiny-pythia-2m": TinyPythiaSize(hidden_size=128, num_hidden_layers=6, num_attention_heads=4),
    "tiny-pythia-4m": TinyPythiaSize(hidden_size=192, num_hidden_layers=6, num_attention_heads=6),
    "tiny-pythia-16m": TinyPythiaSize(hidden_size=384, num_hidden_layers=8, num_attention_heads=8),
    "tiny-pythia-16m-hd64": TinyPythiaSize(hidden_size=384, num_hidden_layers=8, num_attention_heads=6),
}


def tiny_pythia_config(name: str, vocab_size: int = DEFAULT_VOCAB_SIZE, max_positions: int = 1024) -> GPTNeoXConfig:
    size = TINY_PYTHIA_SIZES[name]
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=4 * size.hidden_size,
        max_position_embeddings=max_positions,
        rotary_pct=0.25,  # as in Pythia
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _check_name(name_or_path: str) -> None:
    """Fail fast on a name that is neither built in, a local folder, nor shaped like a hub id."""
    if name_or_path not in TINY_PYTHIA_SIZES and not Path(name_or_path).exists() and "/" not in name_or_path:
        raise ValueError(
            f"unknown model {name_or_path!r}: use one of {sorted([*TINY_PYTHIA_SIZES, *PRETRAINED_MODELS])}, "
            "a Hugging Face name such as 'EleutherAI/pythia-410m', or a local folder"
        )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    name_or_path = resolve_model_path(name_or_path)  # smollm2-135m: its folder in the cache, built once
    _check_name(name_or_path)
    if name_or_path in TINY_PYTHIA_SIZES:
        return builtin_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:  # Pythia ships without one; its EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Return (causal LM, tokenizer). Built-in names are initialised from `seed`."""
    name_or_path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    if name_or_path in TINY_PYTHIA_SIZES:
        config = tiny_pythia_config(name_or_path, vocab_size=len(tokenizer))
        config.eos_token_id = config.bos_token_id = config.pad_token_id = tokenizer.eos_token_id
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
        torch.random.set_rng_state(generator_state)
        model = model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def head_dim(name_or_path: str) -> int:
    """The attention head size of a model name or folder, without building it (vLLM's CPU kernels take
    only a few sizes)."""
    if name_or_path in TINY_PYTHIA_SIZES:
        size = TINY_PYTHIA_SIZES[name_or_path]
        return size.hidden_size // size.num_attention_heads
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
