"""The one seed derivation: independent random streams (an epoch's order, a step's samples, an actor's
share of a request) from one run seed, as plain integer arithmetic so every process derives the same."""
from __future__ import annotations

SEED_STRIDE = 1_000_003  # a prime above any step, epoch or actor count: streams of different seeds never meet


def derive_seed(seed: int, stream: int) -> int:
    """The seed of stream `stream` of a run seeded `seed` (seed * SEED_STRIDE + stream)."""
    return seed * SEED_STRIDE + stream


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """One seed per rank from a seed every rank shares (seed * world_size + rank)."""
    return seed * world_size + rank
