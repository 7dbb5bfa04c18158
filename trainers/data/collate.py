"""Tokenization, truncation and label masking of preference pairs — in one place.

Policy (explicit, shared by training and probe scoring):
* the prompt and each response are tokenized separately, so the prompt's tokens are identical in
  the chosen and the rejected sequence and the response boundary is exact;
* every response ends with EOS (the model learns to stop; greedy decodes end there);
* a prompt longer than `max_prompt_tokens` keeps its last tokens (the oldest turns go first); a
  response longer than `max_response_tokens` keeps its first tokens; with policy 'error' either
  case is a bad row instead.
Labels are the input ids with IGNORE_INDEX on prompt and padding, as `sequence_logps` expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trainers.data.schema import DataError, LoadedData, PreferencePair
from trainers.data.pairs import load_preference_data

IGNORE_INDEX = -100  # label of a position that is not scored (prompt, padding), as in HF and PyTorch


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def encode_prompt(tokenizer, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a prompt, left-truncated; also whether it was cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:], len(ids) > max_tokens


def encode_response(tokenizer, text: str, max_tokens: int) -> tuple[list[int], bool]:
    """Token ids of a response plus EOS, right-truncated; also whether it was cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[:max_tokens], len(ids) > max_tokens


def tokenize_pair(tokenizer, pair: PreferencePair, max_prompt_tokens: int, max_response_tokens: int,
                  policy: str = "truncate") -> TokenizedPair:
    prompt_ids, prompt_cut = encode_prompt(tokenizer, pair.prompt, max_prompt_tokens)
    chosen_ids, chosen_cut = encode_response(tokenizer, pair.chosen, max_response_tokens)
    rejected_ids, rejected_cut = encode_response(tokenizer, pair.rejected, max_response_tokens)
    if policy == "error":
        for field_name, cut, limit in (("prompt", prompt_cut, max_prompt_tokens),
                                       ("chosen", chosen_cut, max_response_tokens),
                                       ("rejected", rejected_cut, max_response_tokens)):
            if cut:
                raise DataError(pair.source, pair.row, field_name, f"longer than {limit} tokens (truncation policy 'error')",
                                pair.line)
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_pairs(tokenizer, pairs: Sequence[PreferencePair], max_prompt_tokens: int, max_response_tokens: int,
                   policy: str = "truncate", skip_bad_rows: bool = False) -> tuple[list[TokenizedPair], list[DataError]]:
    """Tokenize all pairs; bad rows raise, or are returned separately when skipping."""
    kept, skipped = [], []
    for pair in pairs:
        try:
            kept.append(tokenize_pair(tokenizer, pair, max_prompt_tokens, max_response_tokens, policy))
        except DataError as error:
            if not skip_bad_rows:
                raise
            skipped.append(error)
    return kept, skipped


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids [R, T] padded with `value`, mask [R, T] 1 on real tokens), T = the longest row.

    The one padding helper: right padding for training and scoring rows, left padding (`left=True`)
    for batched generation and prompt encoding, where every row must end at the last position."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, span] = 1
    return ids, mask


def collate_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows with labels on the response tokens only."""
    input_ids, attention_mask = pad_rows([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    labels, _ = pad_rows([[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preference_batch(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows: one forward scores both (rows [:B] and [B:])."""
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_sequences(prompts, responses, pad_id)


def load_training_pairs(config, tokenizer) -> tuple[LoadedData, list[TokenizedPair], list[DataError]]:
    """The training split of `config.dataset`, parsed and tokenized under the config's policy."""
    data = load_preference_data(config.dataset, config.train_split, skip_bad_rows=config.skip_bad_rows,
                                max_rows=config.max_train_pairs, holdout_fraction=config.holdout_fraction)
    pairs, skipped = tokenize_pairs(tokenizer, data.pairs, config.max_prompt_tokens, config.max_response_tokens,
                                    config.truncation, config.skip_bad_rows)
    return data, pairs, skipped
