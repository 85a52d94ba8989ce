"""Transforms keep image, id map and the derived target in step; collate pads batches."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unipan.config import DataConfig
from unipan.data.collate import Collate, collate
from unipan.data.common import make_sample
from unipan.data.transforms import (
    IMAGENET_MEAN,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomScaleCrop,
    ResizeShortestEdge,
    build_transforms,
    resize_pair,
    shortest_edge_size,
)
from unipan.structures import IGNORE_LABEL, DatasetMeta, PanopticTarget, SegmentInfo, masks_to_boxes

META = DatasetMeta(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 2, "name": "car", "isthing": 1},
        {"id": 8, "name": "road", "isthing": 0},
        {"id": 9, "name": "sky", "isthing": 0},
    ]
)
# segment id -> (category id, crowd)
SEGMENTS = {3: (1, False), 4: (2, False), 5: (1, True), 6: (8, False), 7: (9, False), 11: (2, False)}
# the corners of the RGB cube: no blend of some of them equals another, so a pixel showing one
# exactly lies inside that segment even after bilinear/antialiased resampling
PALETTE = {
    0: (0, 0, 0),
    3: (255, 0, 0),
    4: (0, 255, 0),
    5: (0, 0, 255),
    6: (255, 255, 0),
    7: (0, 255, 255),
    11: (255, 0, 255),
}


def scene(h: int = 30, w: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A blocky id map (void, sky, road, two people, a crowd, two cars) and its palette image."""
    ids = torch.zeros((h, w), dtype=torch.int32)
    ids[2 : h // 2] = 7
    ids[h // 2 :] = 6
    ids[h // 5 : 4 * h // 5, w // 10 : w // 4] = 3
    ids[h // 2 : h - 2, w // 2 : 3 * w // 4] = 4
    ids[h // 6 : h // 3, 3 * w // 5 : 9 * w // 10] = 5
    ids[h - 5 :, w - 5 :] = 11
    return palette_image(ids), ids


def palette_image(ids: torch.Tensor) -> torch.Tensor:
    lut = torch.zeros((max(PALETTE) + 1, 3))
    for k, rgb in PALETTE.items():
        lut[k] = torch.tensor(rgb, dtype=torch.float32)
    return lut[ids.long()].permute(2, 0, 1).contiguous()


def segment_infos() -> list[SegmentInfo]:
    return [SegmentInfo(k, c, META.isthing(c), crowd) for k, (c, crowd) in SEGMENTS.items()]


def check_target(image: torch.Tensor, ids: torch.Tensor) -> PanopticTarget:
    """Derive the target and check every field against the id map and each other."""
    t = PanopticTarget.from_panoptic(ids, segment_infos(), META)
    assert t.sem_seg.shape == ids.shape == image.shape[1:]
    present = set(torch.unique(ids).tolist()) - {0}
    expected_instances = sorted(k for k in present if META.isthing(SEGMENTS[k][0]) and not SEGMENTS[k][1])
    assert sorted(t.instance_ids.tolist()) == expected_instances  # cropped-away instances are gone
    assert torch.equal(t.boxes, masks_to_boxes(t.masks))
    for k in range(len(t)):
        mask = t.masks[k]
        assert torch.equal(mask, ids == t.instance_ids[k])
        assert (t.sem_seg[mask] == META.num_stuff + t.labels[k]).all()
        x0, y0, x1, y1 = t.boxes[k].int().tolist()
        inside = torch.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        assert not (mask & ~inside).any(), "box does not enclose its mask"
        assert mask[y0].any() and mask[y1 - 1].any() and mask[:, x0].any() and mask[:, x1 - 1].any()
    crowd = ids == 5
    assert torch.equal(t.crowd, crowd)
    assert torch.equal(t.sem_seg == IGNORE_LABEL, (ids == 0) | crowd)
    return t


def check_aligned(image: torch.Tensor, ids: torch.Tensor, min_fraction: float = 0.5) -> None:
    """Where the image shows a segment's colour exactly, the id map has that segment.

    `min_fraction` of the pixels must show a pure colour (fewer after strong antialiased shrinking).
    """
    matched = 0
    for k, rgb in PALETTE.items():
        shows = (image - torch.tensor(rgb, dtype=image.dtype)[:, None, None]).abs().amax(0) < 1e-3
        assert (ids[shows] == k).all(), f"segment {k} image/map misaligned"
        matched += int(shows.sum())
    assert matched > min_fraction * ids.numel()


def centroid_offset(image: torch.Tensor, ids: torch.Tensor, k: int) -> float:
    """Distance between segment k's centroid in the id map and in the image's colour."""
    rgb = torch.tensor(PALETTE[k], dtype=image.dtype)[:, None, None]
    weight = (1 - (image - rgb).abs().amax(0) / 255).clamp(min=0) ** 8
    ys, xs = torch.meshgrid(torch.arange(ids.shape[0]), torch.arange(ids.shape[1]), indexing="ij")
    in_map = ids == k
    cy, cx = ys[in_map].float().mean(), xs[in_map].float().mean()
    wy, wx = (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()
    return float(torch.hypot(cy - wy, cx - wx))


# --- flip ----------------------------------------------------------------------------------------
def test_flip_twice_is_identity() -> None:
    image, ids = scene()
    flip = RandomHorizontalFlip(1.0)
    once = flip(image, ids)
    assert torch.equal(once[0], image.flip(-1)) and torch.equal(once[1], ids.flip(-1))
    twice = flip(*once)
    assert torch.equal(twice[0], image) and torch.equal(twice[1], ids)
    never = RandomHorizontalFlip(0.0)(image, ids)
    assert never[0] is image and never[1] is ids
    check_target(*once)
    check_aligned(*once)


def test_flip_probability_and_seed() -> None:
    image, ids = scene(4, 6)
    flip = RandomHorizontalFlip(0.5)
    torch.manual_seed(0)
    first = [not torch.equal(flip(image, ids)[1], ids) for _ in range(200)]
    torch.manual_seed(0)
    again = [not torch.equal(flip(image, ids)[1], ids) for _ in range(200)]
    assert first == again and 70 < sum(first) < 130
    with pytest.raises(ValueError, match=r"1\.5"):
        RandomHorizontalFlip(1.5)


# --- resize --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("h", "w", "short", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),
        (640, 480, 800, 1333, (1067, 800)),
        (100, 1000, 800, 1333, (133, 1333)),
        (427, 640, 800, 0, (800, 1199)),
        (30, 40, 15, 1333, (15, 20)),
        (1, 500, 1, 50, (1, 50)),
    ],
)
def test_shortest_edge_size(h: int, w: int, short: int, max_size: int, expected: tuple[int, int]) -> None:
    assert shortest_edge_size(h, w, short, max_size) == expected


def test_resize_shortest_edge_sampling() -> None:
    image, ids = scene()
    torch.manual_seed(1)
    choice = ResizeShortestEdge([15, 45, 60], 1000)
    shorts = {min(choice(image, ids)[0].shape[1:]) for _ in range(40)}
    assert shorts == {15, 45, 60}
    ranged = ResizeShortestEdge((20, 24), 1000, sample="range")
    shorts = {min(ranged(image, ids)[1].shape) for _ in range(60)}
    assert shorts == {20, 21, 22, 23, 24}
    with pytest.raises(ValueError, match="range"):
        ResizeShortestEdge([10, 20, 30], 100, sample="range")
    with pytest.raises(ValueError, match="positive"):
        ResizeShortestEdge(0, 100)


def test_resize_image_bilinear_ids_nearest() -> None:
    image, ids = scene()
    up_image, up_ids = resize_pair(image, ids, (60, 80))
    assert up_ids.dtype == torch.int32
    assert torch.equal(up_ids, ids.repeat_interleave(2, 0).repeat_interleave(2, 1))
    expected = F.interpolate(image[None], size=(60, 80), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(up_image, expected, atol=1e-4)
    down_image, down_ids = resize_pair(image, ids, (15, 20))
    assert torch.equal(down_ids, ids[1::2, 1::2])  # pixel centres of the 2x2 cells
    antialiased = F.interpolate(image[None], size=(15, 20), mode="bilinear", antialias=True)[0]
    assert torch.allclose(down_image, antialiased, atol=1e-4)
    large = torch.tensor([[256**3 - 1, 5]], dtype=torch.int32)  # no float round trip for big ids
    up = resize_pair(torch.zeros(3, 1, 2), large, (3, 4))[1]
    assert up[0].tolist() == [256**3 - 1] * 2 + [5] * 2


@pytest.mark.parametrize("size", [(97, 131), (11, 14), (30, 41)])
def test_resize_keeps_image_and_map_aligned(size: tuple[int, int]) -> None:
    image, ids = scene()
    out_image, out_ids = resize_pair(image, ids, size)
    assert set(torch.unique(out_ids).tolist()) <= set(torch.unique(ids).tolist())
    assert out_image.min() > -1e-3 and out_image.max() < 255 + 1e-3  # a convex blend of the input
    check_aligned(out_image, out_ids, min_fraction=0.3)
    scale = size[0] / ids.shape[0]
    for k in (3, 4, 6, 7):
        assert centroid_offset(out_image, out_ids, k) < 0.5 * max(1.0, scale)
    check_target(out_image, out_ids)


# --- random scale + crop -------------------------------------------------------------------------
def test_scale_crop_pads_with_void_and_mean() -> None:
    image, ids = scene()
    ids[ids == 0] = 7  # no void in the input, so every void pixel of the output is padding
    torch.manual_seed(2)
    transform = RandomScaleCrop((0.5, 2.0), crop_size=(90, 100))
    heights = []
    for _ in range(30):
        out_image, out_ids = transform(image, ids)
        assert out_image.shape == (3, 90, 100) and out_ids.shape == (90, 100)
        rows = int((out_ids != 0).any(1).sum())
        cols = int((out_ids != 0).any(0).sum())
        heights.append(rows / 30)
        assert (out_ids[:rows, :cols] != 0).all() and (out_ids[rows:] == 0).all() and (out_ids[:, cols:] == 0).all()
        pad = torch.tensor(IMAGENET_MEAN)[:, None]
        assert torch.equal(out_image[:, rows:].flatten(1), pad.expand(3, (90 - rows) * 100))
        normalized, _ = Normalize()(out_image, out_ids)
        assert normalized[:, rows:].abs().max() < 1e-5  # padding is 0 after Normalize
    assert 0.48 <= min(heights) < 0.8 and 1.6 < max(heights) <= 2.02


def test_scale_crop_drops_cropped_instances() -> None:
    image, ids = scene(60, 80)
    torch.manual_seed(3)
    transform = RandomScaleCrop((0.8, 1.25), crop_size=(16, 16))
    counts = set()
    for _ in range(40):
        out_image, out_ids = transform(image, ids)
        assert out_ids.shape == (16, 16)
        counts.add(len(check_target(out_image, out_ids)))
        check_aligned(out_image, out_ids)
    assert 0 in counts and max(counts) >= 1  # crops with and without instances


def test_scale_without_crop() -> None:
    image, ids = scene()
    torch.manual_seed(4)
    out_image, out_ids = RandomScaleCrop((2.0, 2.0))(image, ids)
    assert out_image.shape == (3, 60, 80) and torch.equal(out_ids, resize_pair(image, ids, (60, 80))[1])
    with pytest.raises(ValueError, match="scale"):
        RandomScaleCrop((2.0, 1.0))
    with pytest.raises(ValueError, match="crop"):
        RandomScaleCrop(crop_size=(0, 5))


# --- normalise, pipelines ------------------------------------------------------------------------
def test_normalize() -> None:
    image = torch.stack([torch.full((2, 3), v) for v in (10.0, 20.0, 30.0)])
    out, ids = Normalize((10.0, 10.0, 10.0), (1.0, 2.0, 4.0))(image, None)
    assert ids is None
    assert out[:, 0, 0].tolist() == [0.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="positive"):
        Normalize(std=(1.0, 0.0, 1.0))
    with pytest.raises(TypeError, match="float"):
        Normalize()(torch.zeros(3, 2, 2, dtype=torch.uint8), None)


def test_transforms_accept_no_map() -> None:
    image, _ = scene()
    out, ids = Compose(
        [
            ResizeShortestEdge(15, 100),
            RandomScaleCrop(crop_size=(8, 8)),
            RandomHorizontalFlip(1.0),
            Normalize(),
        ]
    )(image, None)
    assert ids is None and out.shape == (3, 8, 8)


def test_mismatched_sizes_rejected() -> None:
    image, ids = scene()
    with pytest.raises(ValueError, match="differ in size"):
        RandomHorizontalFlip()(image, ids[:-1])


def test_build_transforms() -> None:
    cfg = DataConfig()
    train = build_transforms(cfg, is_train=True)
    assert [type(t).__name__ for t in train.transforms] == [
        "ResizeShortestEdge",
        "RandomHorizontalFlip",
        "Normalize",
    ]
    assert train[0].short_edge == [800] and train[0].max_size == 1333
    test = build_transforms(cfg, is_train=False)
    assert [type(t).__name__ for t in test.transforms] == ["ResizeShortestEdge", "Normalize"]
    cfg = DataConfig(
        min_size_train=[16],
        max_size_train=64,
        scale_range=[0.5, 2.0],
        crop_size=[12, 20],
        flip_prob=0.0,
        min_size_test=0,
        pixel_mean=[1.0, 2.0, 3.0],
    )
    train = build_transforms(cfg, is_train=True)
    assert [type(t).__name__ for t in train.transforms] == [
        "ResizeShortestEdge",
        "RandomScaleCrop",
        "Normalize",
    ]
    assert train[1].pad_value == (1.0, 2.0, 3.0) and train[1].crop_size == (12, 20)
    # min_size_test 0 keeps the file's size, but max_size_test (1333 by default) still caps it
    assert [type(t).__name__ for t in build_transforms(cfg, is_train=False).transforms] == [
        "LimitLongestEdge",
        "Normalize",
    ]
    uncapped = dataclasses.replace(cfg, max_size_test=0)
    assert [type(t).__name__ for t in build_transforms(uncapped, is_train=False).transforms] == ["Normalize"]
    image, ids = scene()
    torch.manual_seed(5)
    out_image, out_ids = train(image, ids)
    assert out_image.shape == (3, 12, 20)
    check_target(out_image, out_ids)
    picklable = pickle.loads(pickle.dumps(train))
    torch.manual_seed(5)
    assert torch.equal(picklable(image, ids)[1], out_ids)  # same seed, same draw


@settings(max_examples=20, deadline=None)
@given(
    h=st.integers(8, 40),
    w=st.integers(8, 40),
    short=st.integers(4, 50),
    crop=st.integers(3, 30),
    seed=st.integers(0, 2**16),
)
def test_random_pipelines_keep_targets_consistent(h: int, w: int, short: int, crop: int, seed: int) -> None:
    torch.manual_seed(seed)
    image, ids = scene(h, w)
    pipeline = Compose(
        [ResizeShortestEdge(short, 60), RandomScaleCrop((0.5, 2.0), (crop, crop + 1)), RandomHorizontalFlip()]
    )
    out_image, out_ids = pipeline(image, ids)
    assert out_image.shape == (3, crop, crop + 1)
    check_target(out_image, out_ids)


# --- collate -------------------------------------------------------------------------------------
def _sample(h: int, w: int, image_id: str):
    image, ids = scene(h, w)
    return make_sample(image.permute(1, 2, 0).byte().numpy(), ids.numpy(), segment_infos(), META, image_id, Normalize())


def test_collate_pads_to_divisible_size() -> None:
    samples = [_sample(30, 40, "a"), _sample(20, 50, "b")]
    batch = collate(samples, size_divisibility=32)
    assert batch.images.shape == (2, 3, 32, 64)
    assert batch.image_sizes == [(30, 40), (20, 50)] and batch.original_sizes == [(30, 40), (20, 50)]
    assert batch.image_ids == ["a", "b"] and batch.targets[1] is samples[1].target
    assert torch.equal(batch.images[0, :, :30, :40], samples[0].image)
    assert (batch.images[0, :, 30:] == 0).all() and (batch.images[1, :, :, 50:] == 0).all()
    sem = batch.padded_sem_seg()
    assert torch.equal(sem[1, :20, :50], samples[1].target.sem_seg) and (sem[1, 20:] == IGNORE_LABEL).all()
    assert collate(samples, size_divisibility=0).images.shape == (2, 3, 30, 50)
    fn = pickle.loads(pickle.dumps(Collate(16)))
    assert fn(samples).images.shape == (2, 3, 32, 64)
    with pytest.raises(ValueError, match="empty"):
        collate([])
