"""Builders shared by the model tests (imported as `helpers`: conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

from dataclasses import replace

import torch

from unipan.data.collate import collate
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.data.transforms import Normalize
from unipan.structures import Batch, DatasetMeta, PanopticTarget


def synth_batch(n: int, size: tuple[int, int] = (64, 64), seed: int = 0, **opts: object) -> tuple[Batch, DatasetMeta]:
    """A collated batch of `n` synthetic images (normalised) and their metadata."""
    ds = SyntheticPanoptic(n, seed=seed, opts=SynthOptions(size=size, **opts), transform=Normalize())  # type: ignore[arg-type]
    return collate([ds[i] for i in range(n)]), ds.meta


def stuff_only(batch: Batch, meta: DatasetMeta, index: int) -> Batch:
    """`batch` with image `index`'s things relabelled as void: a target with zero instances."""
    assert batch.targets is not None
    t = batch.targets[index]
    keep = [s for s in t.segments if not s.isthing]
    kept_ids = torch.tensor([s.id for s in keep], dtype=torch.int32)
    panoptic = torch.where(torch.isin(t.panoptic, kept_ids), t.panoptic, torch.zeros_like(t.panoptic))
    empty = PanopticTarget.from_panoptic(panoptic, keep, meta, image_id=t.image_id)
    assert len(empty) == 0
    targets = list(batch.targets)
    targets[index] = empty
    return replace(batch, targets=targets)
