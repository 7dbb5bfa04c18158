"""Deterministic data order: which pairs a rank sees at a given step, without iterator state.

Because the order is a pure function of (seed, step), a run resumed from a checkpoint at step s
sees exactly the batches an uninterrupted run would have seen after s.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from trainers.data.seeds import derive_seed

T = TypeVar("T")


class ShardedBatches:
    """The training stream is the pairs, reshuffled every epoch; global batch b covers stream
    positions [b*G, (b+1)*G) with G = micro_batch_size * world_size, and rank r takes its own slice."""

    def __init__(self, items: Sequence[T], micro_batch_size: int, rank: int, world_size: int, seed: int):
        if not items:
            raise ValueError("no training pairs to draw batches from")
        self.items, self.micro, self.rank, self.world, self.seed = items, micro_batch_size, rank, world_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            random.Random(derive_seed(self.seed, epoch)).shuffle(order)
            self._orders = {epoch: order}  # only the current epoch is ever needed again
        return self._orders[epoch]

    def batch(self, index: int) -> list[T]:
        start = index * self.micro * self.world + self.rank * self.micro
        return [self.items[self._order(p // len(self.items))[p % len(self.items)]]
                for p in range(start, start + self.micro)]

    def epoch_of(self, index: int) -> float:
        return index * self.micro * self.world / len(self.items)
