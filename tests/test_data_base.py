"""The data-module base every task uses: validated loader settings, clear split errors, and loaders whose every epoch
is a function of (seed, epoch) alone, so that a resumed run equals an uninterrupted one with worker processes too."""

from __future__ import annotations

import pytest
import torch
from synthetic_data import write_npz
from test_classification_pipeline import StopAfterFirstEpoch, _last_state, _overrides
from torch.utils.data import Dataset

from medboost.data.base import SplitDataModule
from medboost.data.splits import SPLITS
from medboost.engine.config import load_config
from medboost.errors import ConfigError, DataError
from medboost.pipelines.classification import train_classifier


def test_resume_with_two_workers_equals_an_uninterrupted_run(tmp_path):
    # Augmentation runs in the workers: a persistent worker would carry its generator over from epoch 0, where a
    # resumed run starts a fresh one seeded for epoch 1.
    data = tmp_path / "data"
    write_npz(data, "breastmnist")
    values = {"data.num_workers": 2, "data.augment": True, "trainer.limit_train_batches": 2}
    straight = load_config(None, _overrides(data, tmp_path / "a", epochs=2, **values))
    train_classifier(straight, make_plots=False)
    resumed = load_config(None, _overrides(data, tmp_path / "b", epochs=2, **values))
    train_classifier(resumed, make_plots=False, callbacks=[StopAfterFirstEpoch()])
    assert train_classifier(resumed, make_plots=False)["resumed_from"]
    a, b = _last_state(straight.run_dir), _last_state(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class Noisy(Dataset):
    """Sample ``i`` is ``i`` plus noise from the torch generator of the process that loads it, as augmentation is."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (index + torch.rand(()),)


class NoisyModule(SplitDataModule[Noisy]):
    def build_datasets(self) -> dict[str, Noisy]:
        return {split: Noisy() for split in SPLITS}


def served(batches) -> list[tuple[list[float], list[int]]]:
    return [(values.tolist(), index.tolist()) for values, index in batches]


def test_an_iterator_made_before_set_epoch_serves_that_epoch_with_workers():
    # What Lightning does when it resumes: it makes the first training iterator, then restores and sets the epoch.
    dm = NoisyModule(batch_size=4, num_workers=2, seed=1)
    dm.setup()
    early = dm.train_dataloader()
    made_early = iter(early)
    early.sampler.set_epoch(1)
    fresh = dm.train_dataloader()
    fresh.sampler.set_epoch(1)
    epoch1 = served(fresh)
    assert served(made_early) == epoch1  # same order, same worker noise
    assert served(dm.train_dataloader()) != epoch1
    evaluation = dm.val_dataloader()
    assert [i for _, i in served(evaluation)] == [[0, 1, 2, 3], [4, 5, 6, 7]] and evaluation.persistent_workers


def test_loader_settings_and_split_errors():
    with pytest.raises(ConfigError, match="batch_size must be >= 1 and num_workers >= 0"):
        NoisyModule(batch_size=0)
    dm = NoisyModule(batch_size=2, seed=5)
    with pytest.raises(DataError, match="NoisyModule: call setup"):
        dm.dataset("train")
    dm.setup()
    with pytest.raises(DataError, match="unknown split 'dev'"):
        dm.dataset("dev")
    assert dm.record() == {"n_samples": {"train": 8, "val": 8, "test": 8}, "seed": 5}
