"""Sampling helpers shared by every task: epoch-seeded shuffling and sample indices for exact distributed metrics."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """Shuffles with ``seed + epoch``: the order of epoch ``k`` does not depend on how many epochs ran before in this
    process, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would. Lightning calls
    ``set_epoch`` on samplers that have it (and wraps this one for distributed training)."""

    def __init__(self, length: int, seed: int = 0):
        self.length = length
        self.seed = seed
        self.epoch = 0
        # Give this to the DataLoader too: its per-iterator worker base seed is then drawn from (seed, epoch) rather
        # than from the global RNG, whose position differs between a fresh and a resumed run.
        self.generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self._epoch_seed() + 1)

    def _epoch_seed(self) -> int:
        return self.seed * 100_003 + self.epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self._epoch_seed())
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class WithIndex(Dataset):
    """Adds each sample's index: distributed evaluation pads uneven splits with repeated samples, and metrics drop
    the repeats by index so that every sample counts exactly once."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)
