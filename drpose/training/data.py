"""Deterministic data order and per-sample randomness for training.

The global stream of samples is an endless sequence of epochs, each a permutation of the dataset drawn
from (seed, epoch). Optimizer step ``s`` takes positions ``[s * G, (s + 1) * G)`` of that stream
(G = micro-batch x accumulation x world size); micro-step ``a`` on rank ``r`` takes its own contiguous
slice. Noise of a sample is drawn from (seed, step, stream position), and the gradient plan of a
micro-step from (seed, step, micro-step), so that:

* a resumed run continues exactly like an uninterrupted one (nothing but the step needs restoring);
* 1 process with micro-batch 2 and 2 processes with micro-batch 1 see the same samples with the same
  noise and plans, i.e. the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpose.data.dataset import DrPoseDataset

_MIX = 0x9E3779B1  # odd constant: spreads (seed, step, position) into distinct generator seeds


def seeded_generator(*parts: int) -> torch.Generator:
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass(frozen=True)
class BatchLayout:
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def positions(self, step: int, micro_step: int, rank: int) -> list[int]:
        """Stream positions of the samples that ``rank`` trains on at (step, micro_step)."""
        start = step * self.global_batch + (micro_step * self.world_size + rank) * self.micro_batch
        return list(range(start, start + self.micro_batch))


class SampleStream:
    """Maps stream positions to dataset indices through per-epoch permutations."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("the training dataset is empty")
        self.size = size
        self.seed = seed
        self._epochs: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._epochs:
            self._epochs = {epoch: torch.randperm(self.size, generator=seeded_generator(self.seed, epoch))}
        return int(self._epochs[epoch][offset])


def collate(dataset: DrPoseDataset, indices: list[int]) -> dict:
    items = [dataset[i] for i in indices]
    return {
        "ids": [item["id"] for item in items],
        "images": torch.stack([item["image"] for item in items]),
        "joints": torch.stack([item["joints"] for item in items]),
    }


def sample_noise(shape_per_sample: tuple[int, ...], seed: int, step: int, positions: list[int]) -> torch.Tensor:
    """Initial noise rows (2 * B * V, c, h, w) in the multi-view layout for per-sample shape (2, V, c, h, w), each
    sample's part drawn from (seed, step, its position)."""
    per_sample = [torch.randn(shape_per_sample, generator=seeded_generator(seed, step, p)) for p in positions]
    return torch.stack(per_sample, dim=1).reshape(-1, *shape_per_sample[2:])
