"""The synthetic panoptic dataset: determinism, exact annotations, variety, files on disk."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch

from unipan.data.synthetic import (
    SYNTH_CATEGORIES,
    SyntheticPanoptic,
    SynthOptions,
    add_synth_arguments,
    generate_image,
    generate_scene,
    image_name,
    size_class,
    synth_main,
    synth_meta,
    write_synthetic_dataset,
)
from unipan.io import load_json, read_id_png, segments_from_coco
from unipan.structures import IGNORE_LABEL, VOID_ID, Sample, SegmentInfo

SMALL = SynthOptions(size=(96, 96))


def _adjacent_pairs(panoptic: np.ndarray) -> set[tuple[int, int]]:
    """Unordered pairs of distinct ids that meet 4-adjacently in an id map."""
    pairs: set[tuple[int, int]] = set()
    for a, b in ((panoptic[:, :-1], panoptic[:, 1:]), (panoptic[:-1, :], panoptic[1:, :])):
        differ = a != b
        for u, v in zip(a[differ].tolist(), b[differ].tolist(), strict=True):
            pairs.add((min(u, v), max(u, v)))
    return pairs


# --- determinism -----------------------------------------------------------------------------------
def test_same_seed_same_bytes_independent_of_order() -> None:
    first = generate_image(7, 3, SMALL)
    generate_image(7, 5, SMALL)  # generating another image in between must not matter
    again = generate_image(7, 3, SMALL)
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1].tobytes() == again[1].tobytes()
    assert first[2] == again[2]
    assert first[0].dtype == np.uint8 and first[0].shape == (96, 96, 3)
    assert first[1].dtype == np.int32 and first[1].shape == (96, 96)


@pytest.mark.parametrize(
    "other",
    [
        dict(seed=8, index=3, split="train"),
        dict(seed=7, index=4, split="train"),
        dict(seed=7, index=3, split="val"),
    ],
)
def test_seed_index_and_split_change_the_image(other: dict) -> None:
    base, _, _ = generate_image(7, 3, SMALL, split="train")
    changed, _, _ = generate_image(other["seed"], other["index"], SMALL, split=other["split"])
    assert np.mean(base != changed) > 0.5


def test_options_change_the_image() -> None:
    a, _, _ = generate_image(0, 0, SMALL)
    b, _, _ = generate_image(0, 0, replace(SMALL, noise=12.0))
    assert a.shape == b.shape and not np.array_equal(a, b)


# --- exact annotations -----------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [SynthOptions(), SynthOptions(size=(80, 112), crowd_prob=1.0, void_outline=1.0)])
def test_segments_match_the_map_exactly(opts: SynthOptions) -> None:
    meta = synth_meta()
    for index in range(6):
        image, panoptic, segments = generate_image(1, index, opts)
        assert image.shape[:2] == panoptic.shape == opts.size
        ids = [s.id for s in segments]
        assert len(set(ids)) == len(ids) and all(0 < i < 256**3 for i in ids)
        assert set(np.unique(panoptic).tolist()) - {VOID_ID} == set(ids)
        for seg in segments:
            mask = panoptic == seg.id
            ys, xs = np.nonzero(mask)
            assert seg.area == mask.sum() > 0
            assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert seg.isthing == meta.isthing(seg.category_id)
            assert not (seg.iscrowd and not seg.isthing)
        # one segment per stuff class, as COCO-panoptic requires
        stuff = [s.category_id for s in segments if not s.isthing]
        assert len(stuff) == len(set(stuff)) and opts.min_stuff <= len(stuff) <= opts.max_stuff


def test_categories_have_non_contiguous_ids_and_meta_maps_them() -> None:
    meta = synth_meta()
    assert meta.num_things >= 5 and meta.num_stuff >= 4
    assert meta.thing_dataset_ids == [1, 2, 3, 4, 5]
    assert meta.stuff_dataset_ids == [101, 102, 103, 104, 105]
    assert meta.class_index(101) == 0 and meta.class_index(1) == meta.num_stuff
    assert meta.to_coco_categories() == [dict(c) for c in SYNTH_CATEGORIES]


# --- variety -------------------------------------------------------------------------------------------
def test_all_classes_and_size_classes_appear() -> None:
    opts = SynthOptions(size=(256, 256), max_instances=8)
    categories: Counter[int] = Counter()
    sizes: Counter[str] = Counter()
    per_image_stuff = []
    for index in range(10):
        _, _, segments = generate_image(2, index, opts)
        categories.update(s.category_id for s in segments)
        sizes.update(size_class(s.area) for s in segments if s.isthing and not s.iscrowd)
        per_image_stuff.append(sum(not s.isthing for s in segments))
    meta = synth_meta()
    assert {c.id for c in meta.stuff_categories} <= set(categories)
    assert {c.id for c in meta.thing_categories} <= set(categories)
    assert sizes["small"] > 0 and sizes["medium"] > 0 and sizes["large"] > 0, sizes
    assert min(per_image_stuff) >= 2 and max(per_image_stuff) >= 3


def test_occlusion_and_touching_instances_of_one_class_occur() -> None:
    occlusions = touching_twins = 0
    for index in range(12):
        scene = generate_scene(3, index, SynthOptions())
        area = {s.id: s.area for s in scene.segments}
        pairs = _adjacent_pairs(scene.panoptic)
        category = {s.id: s.category_id for s in scene.segments if s.isthing and not s.iscrowd}
        for inst in scene.instances:
            for hidden in inst.occludes:
                if hidden not in area:
                    continue
                # the occluded instance lost pixels, and what hides it borders what is left of it
                hidden_inst = next(i for i in scene.instances if i.segment_id == hidden)
                assert area[hidden] < hidden_inst.amodal_area
                assert (min(hidden, inst.segment_id), max(hidden, inst.segment_id)) in pairs
                occlusions += 1
        touching_twins += sum(1 for u, v in pairs if u in category and v in category and category[u] == category[v])
    assert occlusions >= 3
    assert touching_twins >= 2


def test_things_are_at_least_the_minimum_size_and_mostly_visible() -> None:
    opts = SynthOptions()
    for index in range(8):
        scene = generate_scene(4, index, opts)
        area = {s.id: s.area for s in scene.segments}
        for inst in scene.instances:
            if inst.iscrowd:
                continue
            assert inst.extent >= opts.min_thing_size - 1e-6
            assert area[inst.segment_id] >= opts.min_visible * inst.amodal_area - 1


def test_crowd_and_void_when_enabled() -> None:
    opts = SynthOptions(crowd_prob=1.0, void_border=3, void_outline=1.0)
    for index in range(4):
        image, panoptic, segments = generate_image(5, index, opts)
        crowd = [s for s in segments if s.iscrowd]
        assert len(crowd) == 1 and crowd[0].isthing
        assert (panoptic[:3] == VOID_ID).all() and (panoptic[-3:] == VOID_ID).all()
        assert (panoptic[:, :3] == VOID_ID).all() and (panoptic[:, -3:] == VOID_ID).all()
        assert (panoptic[3:-3, 3:-3] == VOID_ID).any()  # outlines
        # with void outlines, no thing pixel touches a pixel of another segment
        thing_ids = {s.id for s in segments if s.isthing}
        for u, v in _adjacent_pairs(panoptic):
            if u != VOID_ID and v != VOID_ID:
                assert u not in thing_ids and v not in thing_ids
        assert image[:3].mean() < 60  # the void band is a dark frame


def test_no_crowd_and_no_void_when_disabled() -> None:
    opts = SynthOptions(crowd_prob=0.0, void_border=0, void_outline=0.0)
    for index in range(4):
        _, panoptic, segments = generate_image(5, index, opts)
        assert not any(s.iscrowd for s in segments)
        assert (panoptic != VOID_ID).all()


def _stuff_patch_features(seed: int, n: int, opts: SynthOptions) -> tuple[np.ndarray, np.ndarray]:
    """Grey-level texture statistics of the 8 x 8 patches lying wholly in one stuff segment.

    Features (no colour): mean absolute vertical and horizontal differences and the standard
    deviation of the patch's grey levels. Returns (features float[N, 3], category ids int[N]).
    """
    feats, labels = [], []
    h, w = opts.size
    for index in range(n):
        image, panoptic, segments = generate_image(seed, index, opts)
        grey = image.astype(np.float32).mean(-1).reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
        ids = panoptic.reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
        pure = (ids == ids[:, :, :1, :1]).all(axis=(2, 3))
        stats = np.stack(
            [
                np.abs(np.diff(grey, axis=2)).mean(axis=(2, 3)),
                np.abs(np.diff(grey, axis=3)).mean(axis=(2, 3)),
                grey.std(axis=(2, 3)),
            ],
            axis=-1,
        )
        category = {s.id: s.category_id for s in segments if not s.isthing}
        for (r, c), first in zip(np.argwhere(pure).tolist(), ids[:, :, 0, 0][pure].tolist(), strict=True):
            if first in category:
                feats.append(stats[r, c])
                labels.append(category[first])
    return np.asarray(feats), np.asarray(labels)


def _nearest_centroid_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray
) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    classes = sorted(set(train_y.tolist()))
    centroids = np.stack([((train_x - mu) / sd)[train_y == c].mean(0) for c in classes])
    distances = ((((test_x - mu) / sd)[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((np.asarray(classes)[distances.argmin(1)] == test_y).mean())


@pytest.mark.parametrize(("texture", "told"), [(1.0, True), (0.0, False)])
def test_texture_alone_tells_stuff_apart(texture: float, told: bool) -> None:
    """Learnability: grey-level texture statistics of small patches name the stuff class (and
    with the textures switched off they cannot: the test can fail)."""
    opts = SynthOptions(max_instances=2, texture=texture)
    train_x, train_y = _stuff_patch_features(6, 10, opts)
    test_x, test_y = _stuff_patch_features(16, 6, opts)
    assert len(set(train_y.tolist())) >= 4
    accuracy = _nearest_centroid_accuracy(train_x, train_y, test_x, test_y)
    assert (accuracy > 0.8) if told else (accuracy < 0.5), accuracy


def test_colour_does_not_tell_the_thing_class() -> None:
    # the mean colour of an instance says little about its class (5 classes: chance 0.2)
    colours, cats = [], []
    for index in range(40):
        image, panoptic, segments = generate_image(7, index, SynthOptions())
        for seg in segments:
            if seg.isthing and not seg.iscrowd:
                colours.append(image[panoptic == seg.id].astype(np.float32).mean(0))
                cats.append(seg.category_id)
    colours_a, cats_a = np.asarray(colours), np.asarray(cats)
    half = len(cats_a) // 2
    thing_classes = sorted(set(cats_a[:half]))
    centroids = np.stack([colours_a[:half][cats_a[:half] == c].mean(0) for c in thing_classes])
    nearest = np.asarray(thing_classes)[((colours_a[half:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert (nearest == cats_a[half:]).mean() < 0.4


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="min_instances"):
        SynthOptions(min_instances=5, max_instances=2)
    with pytest.raises(ValueError, match="occlusion"):
        SynthOptions(occlusion=1.5)
    with pytest.raises(ValueError, match="size"):
        SynthOptions(size=(16, 16))
    with pytest.raises(ValueError, match="void_border"):
        SynthOptions(void_border=60)
    with pytest.raises(ValueError, match="min_stuff"):
        SynthOptions(min_stuff=0)
    with pytest.raises(ValueError, match="index"):
        generate_image(0, -1)


# --- the in-memory dataset -----------------------------------------------------------------------------
def test_dataset_samples_carry_consistent_targets() -> None:
    ds = SyntheticPanoptic(3, seed=9, opts=SMALL, split="val", cache=True)
    assert len(ds) == 3 and ds.meta == synth_meta()
    sample = ds[1]
    assert isinstance(sample, Sample)
    image, panoptic, segments, image_id = ds.load_raw(1)
    assert image_id == sample.image_id == "1"
    assert torch.equal(sample.image, torch.from_numpy(image).permute(2, 0, 1).float())
    target = sample.target
    assert torch.equal(target.panoptic, torch.from_numpy(panoptic))
    for seg in segments:
        k = ds.meta.class_index(seg.category_id)
        if seg.iscrowd:
            assert (target.sem_seg[target.panoptic == seg.id] == IGNORE_LABEL).all()
        else:
            assert (target.sem_seg[target.panoptic == seg.id] == k).all()
    n_instances = sum(s.isthing and not s.iscrowd for s in segments)
    assert len(target) == n_instances and target.masks.shape == (n_instances, 96, 96)
    # the cache hands out copies of the segments: editing one does not change the next read
    segments[0].area = -1
    assert ds.load_raw(1)[2][0].area > 0
    assert np.array_equal(ds.load_raw(-1)[1], generate_image(9, 2, SMALL, split="val")[1])
    with pytest.raises(IndexError, match="3 images"):
        ds.load_raw(3)


def test_dataset_applies_the_transform() -> None:
    def hflip(image: torch.Tensor, panoptic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return image.flip(-1), panoptic.flip(-1)

    plain = SyntheticPanoptic(1, seed=1, opts=SMALL)[0]
    flipped = SyntheticPanoptic(1, seed=1, opts=SMALL, transform=hflip)[0]
    assert torch.equal(flipped.image, plain.image.flip(-1))
    assert torch.equal(flipped.target.sem_seg, plain.target.sem_seg.flip(-1))


def test_dataset_works_with_a_dataloader() -> None:
    ds = SyntheticPanoptic(4, seed=2, opts=SMALL)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)
    ids = [s.image_id for batch in loader for s in batch]
    assert ids == ["0", "1", "2", "3"]


# --- files on disk ---------------------------------------------------------------------------------
def _read_written(json_path: Path) -> list[tuple[np.ndarray, np.ndarray, list[SegmentInfo], str]]:
    doc = load_json(json_path)
    root = json_path.parent
    files = {im["id"]: im for im in doc["images"]}
    meta = synth_meta()
    out = []
    for ann in doc["annotations"]:
        info = files[ann["image_id"]]
        image = np.asarray(imagecodecs.png_decode((root / "images" / info["file_name"]).read_bytes()))
        assert image.shape == (info["height"], info["width"], 3)
        panoptic = read_id_png(root / "panoptic" / ann["file_name"])
        segments = segments_from_coco(ann["segments_info"], meta, ann["image_id"])
        assert info["file_name"] == ann["file_name"] == f"{image_name(ann['image_id'])}.png"
        out.append((image, panoptic, segments, str(ann["image_id"])))
    return out


def test_written_folder_matches_the_in_memory_dataset(tmp_path: Path) -> None:
    opts = SynthOptions(size=(64, 80), crowd_prob=0.5, void_outline=0.5)
    json_path = write_synthetic_dataset(tmp_path / "synth", 3, seed=4, opts=opts, split="val")
    assert json_path == tmp_path / "synth" / "val" / "panoptic.json"
    doc = load_json(json_path)
    assert doc["categories"] == SYNTH_CATEGORIES
    assert [im["id"] for im in doc["images"]] == [0, 1, 2]
    assert not list(json_path.parent.rglob("*.tmp"))  # atomic writes leave nothing behind
    ds = SyntheticPanoptic(3, seed=4, opts=opts, split="val")
    written = _read_written(json_path)
    assert len(written) == 3
    for i, (image, panoptic, segments, image_id) in enumerate(written):
        m_image, m_panoptic, m_segments, m_id = ds.load_raw(i)
        assert image_id == m_id
        assert np.array_equal(image, m_image)  # PNG is lossless
        assert np.array_equal(panoptic, m_panoptic)
        assert segments == m_segments


def test_written_folder_loads_through_the_coco_loader(tmp_path: Path) -> None:
    coco = pytest.importorskip("unipan.data.coco_panoptic")
    opts = SynthOptions(size=(64, 64), crowd_prob=1.0)
    json_path = write_synthetic_dataset(tmp_path, 2, seed=3, opts=opts, split="train")
    root = json_path.parent
    loaded = coco.CocoPanopticDataset(root / "images", root / "panoptic", json_path)
    memory = SyntheticPanoptic(2, seed=3, opts=opts)
    assert loaded.meta == memory.meta
    for i in range(2):
        a, b = loaded[i], memory[i]
        assert a.image_id == b.image_id
        assert torch.equal(a.image, b.image)
        assert torch.equal(a.target.panoptic, b.target.panoptic)
        assert torch.equal(a.target.sem_seg, b.target.sem_seg)
        assert torch.equal(a.target.masks, b.target.masks)
        assert torch.equal(a.target.crowd, b.target.crowd)


def test_splits_share_no_image(tmp_path: Path) -> None:
    train = write_synthetic_dataset(tmp_path, 3, seed=0, opts=SMALL, split="train").parent
    val = write_synthetic_dataset(tmp_path, 3, seed=0, opts=SMALL, split="val").parent
    train_bytes = {p.read_bytes() for p in (train / "images").iterdir()}
    val_bytes = {p.read_bytes() for p in (val / "images").iterdir()}
    assert len(train_bytes) == 3 and not train_bytes & val_bytes


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    args = parser.parse_args(
        [
            "--n",
            "2",
            "--size",
            "64",
            "48",
            "--seed",
            "3",
            "--out",
            str(tmp_path),
            "--split",
            "val",
            "--max-instances",
            "3",
            "--crowd-prob",
            "1",
            "--void-border",
            "2",
        ]
    )
    assert synth_main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "val") in out and "segments per class" in out
    doc = load_json(tmp_path / "val" / "panoptic.json")
    assert [(im["height"], im["width"]) for im in doc["images"]] == [(64, 48), (64, 48)]
    assert all(any(s["iscrowd"] for s in a["segments_info"]) for a in doc["annotations"])
    assert doc["info"]["options"]["void_border"] == 2

    bad = parser.parse_args(["--out", str(tmp_path / "bad"), "--occlusion", "2"])
    assert synth_main(bad) == 2
    assert "occlusion" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
