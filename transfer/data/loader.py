"""The training loader: an epoch's order that depends only on the seed and the epoch, and a start part-way.

A plain shuffling ``DataLoader`` draws each epoch's order (and its workers' base seed) from the global torch RNG
when the epoch's iterator is made, the same stream the augmentation and MixUp/CutMix draw from, so a run resumed
inside an epoch cannot get that epoch's order back, and Lightning restarts the epoch's iterator from its first
batch (it only counts the batches as done). :class:`ResumableLoader` shuffles as ``DistributedSampler`` does,
with a permutation seeded by ``seed + epoch`` (Lightning calls ``set_epoch`` before every epoch), and
:meth:`ResumableLoader.start_at` makes the next iterator skip the batches an epoch had already trained on
(their indices only: no image is read for them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

# Added to the seed for the workers' base seeds, so they are not the permutation's stream.
_WORKER_STREAM = 1 << 32


class EpochSampler(RandomSampler):
    """A random permutation per epoch from ``seed + epoch`` (``set_epoch``), independent of the global RNG.

    Args:
        data_source: the dataset.
        seed: the run's seed (``torch.initial_seed()`` after ``seed_everything``).
        workers: the loader's generator, reseeded per epoch too: it draws the workers' base seed.
    """

    def __init__(self, data_source: Sized, seed: int, workers: torch.Generator) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed, self.epoch, self.workers = int(seed), 0, workers
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order for the next iteration."""
        self.epoch = int(epoch)
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)
        self.workers.manual_seed(self.seed + _WORKER_STREAM + self.epoch)

    def __iter__(self) -> Iterator[int]:
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)  # the same order however often the epoch is iterated
        return super().__iter__()


class _Skipping:
    """The loader's batch sampler, less the batches :meth:`ResumableLoader.start_at` asked to skip (once), and cut
    to :attr:`ResumableLoader.max_batches`."""

    def __init__(self, base: Any, loader: ResumableLoader) -> None:
        self.base, self.loader = base, loader

    def __len__(self) -> int:
        limit = self.loader.max_batches
        return len(self.base) if limit is None else min(len(self.base), limit)

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader.skip = self.loader.skip, 0
        batches = iter(self.base)
        for _ in range(skip):
            next(batches, None)
        yield from batches if self.loader.max_batches is None else islice(batches, self.loader.max_batches)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose shuffling is :class:`EpochSampler`'s and whose next epoch can start part-way.

    Takes ``DataLoader``'s arguments. With ``shuffle=True`` (and no ``sampler``) it shuffles with an
    :class:`EpochSampler` seeded by ``seed`` (default: ``torch.initial_seed()``, which ``seed_everything`` sets).
    Lightning can still swap in a ``DistributedSampler`` under DDP (same per-epoch rule).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool | None = None,
        sampler: Any = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if shuffle and sampler is None:
            workers = kwargs.pop("generator", None) or torch.Generator()
            sampler = EpochSampler(dataset, torch.initial_seed() if seed is None else seed, workers)  # type: ignore[arg-type]
            kwargs["generator"] = workers
            shuffle = None
        super().__init__(dataset, shuffle=shuffle, sampler=sampler, **kwargs)
        self.skip = 0
        # At most this many batches per iteration (None: all). A budgeted run sets it on its validation loader
        # after Lightning has counted that loader's batches (transfer/training/budget.py).
        self.max_batches: int | None = None

    @property
    def _index_sampler(self) -> Any:
        # DataLoader's iterators take their batches of indices from here (each epoch, persistent workers too)
        return _Skipping(super()._index_sampler, self)

    def start_at(self, epoch: int, batches: int) -> None:
        """Make the next iterator give epoch ``epoch``'s order from its batch number ``batches`` on."""
        samplers: list[Any] = [self.sampler, getattr(self.batch_sampler, "sampler", None)]
        for sampler in samplers:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        self.skip = int(batches)

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves for a resumable loader: the epoch. The position inside it is Lightning's own batch
        progress, which :class:`transfer.training.resume.RunState` hands to :meth:`start_at` on resume."""
        return {"epoch": int(getattr(self.sampler, "epoch", 0))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to do here: the epoch and position come from the restored loops (see :meth:`state_dict`)."""
