"""Which update moves which category: a cheap empirical-NTK view of Ren & Sutherland's A·K·G decomposition.

To first order, a gradient step Δθ = -η ∇L changes a category's log-prob by
Δ log p_c ≈ ∇ log p_c · Δθ = -η ∇ log p_c · ∇L. The cosine between the update direction -∇L and
∇ log p_c (summed over a few probe prompts) says which categories the current training batch
pushes up (> 0) or down (< 0), and how aligned that push is, before the step is taken.

Sign convention: `grad_cos/<category>` = cos(-∇L, ∇ Σ log p_c), i.e. measured against the
*update direction*. An SFT loss on exactly the category's (prompt, response) pairs gives +1.

Full gradients of a large model cost as much as a training step per category, so by default only
the last transformer blocks and what follows them (final norm, output head) are used.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from trainers.data.collate import collate_sequences
from trainers.model.objectives import forward_logps

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def alignment_parameters(model: torch.nn.Module, last_layers: int | None = 2) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters of the last `last_layers` blocks and of every module registered after the
    blocks (final norm, untied output head); `None`: all trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if last_layers is None:
        return named
    if last_layers < 1:
        raise ValueError(f"last_layers must be >= 1 or None, got {last_layers}")
    blocks = [(i, int(m.group(1))) for i, (n, _) in enumerate(named) if (m := _BLOCK_INDEX.search(n))]
    if not blocks:
        return named  # no recognisable blocks: fall back to everything
    top = max(b for _, b in blocks)
    last_block_position = max(i for i, _ in blocks)
    keep = {i for i, b in blocks if b > top - last_layers} | set(range(last_block_position + 1, len(named)))
    return [named[i] for i in sorted(keep)]


def flat_gradient(value: Tensor, parameters: Sequence[Tensor]) -> Tensor:
    """∇ value over `parameters` as one float64 vector (zeros where a parameter does not take part).
    Uses autograd.grad, so the parameters' `.grad` (the training step's accumulator) is untouched."""
    grads = torch.autograd.grad(value, list(parameters), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                      for g, p in zip(grads, parameters)])


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b); NaN when either vector is zero (the tracker drops non-finite values)."""
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else float("nan")


def summed_logp(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Σ_n log p(responses[n] | prompts[n]) with autograd, one padded forward (empty responses count 0)."""
    rows = [(p, r) for p, r in zip(prompts, responses) if len(r) > 0]
    if not rows:
        return next(model.parameters()).sum() * 0.0
    sums, _, _ = forward_logps(model, collate_sequences([p for p, _ in rows], [r for _, r in rows], pad_id))
    return sums.sum()


@contextmanager
def _no_dropout(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def gradient_cosines(model, loss: Callable[[], Tensor], categories: Mapping[str, Callable[[], Tensor]],
                     parameters: Sequence[Tensor]) -> dict[str, float]:
    """`grad_cos/<category>`: cos(-∇ loss(), ∇ categories[c]()) over `parameters`, in eval mode (no dropout).
    `loss` and each category are closures that run their own forward with autograd on."""
    with _no_dropout(model), torch.enable_grad():
        update = -flat_gradient(loss(), parameters)
        return {f"grad_cos/{name}": cosine(update, flat_gradient(value(), parameters))
                for name, value in categories.items()}


def probe_category_cosines(model, loss: Callable[[], Tensor], prompts: Sequence[Sequence[int]],
                           responses: Mapping[str, Sequence[Sequence[int]]], pad_id: int,
                           last_layers: int | None = 2) -> dict[str, float]:
    """`gradient_cosines` with each category's summed log-prob over the same probe prompts."""
    parameters = [p for _, p in alignment_parameters(model, last_layers)]
    closures = {c: (lambda rows=rows: summed_logp(model, prompts, rows, pad_id)) for c, rows in responses.items()}
    return gradient_cosines(model, loss, closures, parameters)
