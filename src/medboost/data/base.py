"""The data-module base of every task (MedMNIST classification, segmentation, vision-language): three named datasets
served as seeded loaders, with one policy for shuffling, worker seeding and sample indices.

Exact resume: epoch ``k`` of a run resumed from a checkpoint sees the same batches, augmentations and worker seeds as
epoch ``k`` of an uninterrupted run, for any ``num_workers``. The training order is a function of ``(seed, epoch)``
(:class:`~medboost.data.sampling.EpochSeededSampler`), each epoch's worker processes are seeded from the sampler's
generator, and the training task reseeds the main process's generator at every epoch start. Training workers are
therefore not persistent: a persistent worker carries its generator over from the previous epoch, where a resumed run
starts a fresh one. And an iterator starts its workers at its first batch, not when it is made: Lightning makes a
resumed run's first iterator before it restores the epoch (see :class:`StartAtFirstBatchLoader`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medboost.data.sampling import EpochSeededSampler, WithIndex
from medboost.data.splits import SPLITS
from medboost.errors import ConfigError, DataError

__all__ = ["SplitDataModule", "StartAtFirstBatchLoader", "seed_worker"]

D = TypeVar("D", bound=Dataset)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a DataLoader worker from the torch seed the loader gave it.

    medboost's transforms use torch only (already seeded per worker by the loader's generator); this keeps user
    transforms that draw from NumPy or ``random`` reproducible as well.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class StartAtFirstBatchLoader(DataLoader):
    """A DataLoader whose iterator starts (seeds and forks its workers, prefetches sample indices) at its first batch
    rather than when it is made.

    A resumed Lightning run makes its first training iterator while it sets up the optimiser (to estimate the
    number of steps), before it restores the epoch and calls ``set_epoch``; a multi-process iterator started then
    would replay epoch 0's order and worker seeds in the resumed epoch.
    """

    def __iter__(self) -> Iterator:
        return _StartOnFirstNext(super().__iter__)


class _StartOnFirstNext:
    def __init__(self, start: Callable[[], Iterator]):
        self._start = start
        self._iterator: Iterator | None = None

    def __iter__(self) -> _StartOnFirstNext:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)


class SplitDataModule(L.LightningDataModule, ABC, Generic[D]):
    """``train``, ``val`` and ``test`` datasets as loaders that yield each sample with its index.

    Subclasses build the datasets (:meth:`build_datasets`, run once by :meth:`setup`), name their data in errors
    (:attr:`source`) and extend :meth:`record`. Training batches are shuffled by ``(seed, epoch)``; evaluation batches
    come in order, :attr:`eval_batch_size` at a time. The index lets distributed evaluation drop the samples that a
    distributed sampler repeats to even out the processes, so every sample counts exactly once.
    """

    def __init__(
        self, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False, drop_last: bool = False
    ):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.drop_last = drop_last  # training only: evaluation always scores every sample
        self.datasets: dict[str, D] = {}

    @abstractmethod
    def build_datasets(self) -> dict[str, D]:
        """The ``train``, ``val`` and ``test`` datasets (called once, by :meth:`setup`)."""

    @property
    def source(self) -> str:
        """The data, as error messages name it."""
        return type(self).__name__

    @property
    def eval_batch_size(self) -> int:
        return self.batch_size

    def setup(self, stage: str | None = None) -> None:
        # Lightning calls setup for every stage (fit, then test); the datasets are built once.
        if not self.datasets:
            self.datasets = self.build_datasets()

    def dataset(self, split: str) -> D:
        if not self.datasets:
            raise DataError(f"{self.source}: call setup() before asking for the {split} split")
        if split not in self.datasets:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.datasets[split]

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """How samples become a batch (None: torch's default collation); data with text samples override it."""
        return None

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split)
        sampler = EpochSeededSampler(len(dataset), self.seed) if train else None
        return StartAtFirstBatchLoader(
            WithIndex(dataset),
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            # Worker base seeds come from this generator: the sampler's is reseeded by (seed, epoch).
            generator=sampler.generator if sampler else torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            worker_init_fn=seed_worker,
            # Evaluation draws no random numbers, so its workers may live on; training workers must not (see above).
            persistent_workers=self.num_workers > 0 and not train,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last and train,
            collate_fn=self.collate_fn(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def record(self) -> dict[str, Any]:
        """What a result record should say about the data (subclasses add theirs; call after ``setup``)."""
        return {"n_samples": {s: len(d) for s, d in self.datasets.items()}, "seed": self.seed}
