"""Resumable, distributed training order: iteration i's images are a pure function of i.

All ranks read one global stream of dataset indices: epoch e is a permutation of range(N) drawn
from (seed, e), epochs concatenated. Iteration i takes stream positions [i G, (i + 1) G) for the
global batch G; rank r takes its contiguous slice of B = G / world_size positions. So

- the order after a resume at iteration k equals the uninterrupted order (start at position k G);
- 1 process with batch G sees exactly the images that W processes with batch G / W see together,
  which is what makes a distributed run comparable to a single-process one;
- each epoch is reshuffled deterministically, like DistributedSampler.set_epoch.

Random augmentation is tied to the stream position too: `SeededDataset` seeds the global RNGs
from (seed, position) around each `__getitem__` and restores them afterwards, so a sample's
transform does not depend on workers, ranks or resumes, and loading never shifts the training's
own random stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from unipan.engine.checkpoint import preserve_rng_state
from unipan.structures import Sample


def derive_seed(*words: int) -> int:
    """A 63-bit seed from integers, well spread (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(w) & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """int64[n]: the order of epoch `epoch` (a pure function of n, seed, epoch)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(n).astype(np.int64)


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of global stream position `position`."""
    return derive_seed(seed, 0x5EED, position)


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite batch sampler: yields, per iteration, this rank's [(dataset_index, sample_seed)].

    Args:
        dataset_size: N, number of items in the dataset.
        batch_size_per_rank: B, images per iteration on this rank.
        world_size: number of ranks W (global batch G = B W).
        rank: this rank.
        seed: the run's seed; the order is a pure function of (seed, iteration, W, rank, B, N).
        start_iter: first iteration to produce (the resume point).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size_per_rank: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        start_iter: int = 0,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("the training dataset is empty")
        if batch_size_per_rank <= 0:
            raise ValueError(f"batch size per rank must be > 0, got {batch_size_per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.n = dataset_size
        self.batch = batch_size_per_rank
        self.world = world_size
        self.rank = rank
        self.seed = seed
        self.start_iter = start_iter
        self._cached_epoch = -1
        self._cached_perm = np.zeros(0, dtype=np.int64)

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._cached_epoch:
            self._cached_perm = epoch_permutation(self.n, self.seed, epoch)
            self._cached_epoch = epoch
        return int(self._cached_perm[offset])

    def indices_at(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (dataset_index, sample_seed) pairs of iteration `iteration`."""
        first = (iteration * self.world + self.rank) * self.batch
        return [(self._index_at(p), sample_seed(self.seed, p)) for p in range(first, first + self.batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.indices_at(iteration)
            iteration += 1

    def __len__(self) -> int:
        # DataLoader asks for a length only to report it; the stream is endless
        raise TypeError("IterationBatchSampler is infinite")


class SeededDataset(Dataset[Sample]):
    """Wraps a dataset so that item (index, seed) is loaded with the global RNGs seeded by seed.

    The python, numpy and torch RNGs are restored afterwards, so the caller's random stream is
    untouched whether loading runs in the main process or a worker.
    """

    def __init__(self, dataset: Dataset[Sample]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        with preserve_rng_state():
            random.seed(seed)
            np.random.seed(seed & 0xFFFFFFFF)
            torch.manual_seed(seed)
            return self.dataset[index]
