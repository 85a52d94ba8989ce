"""Cityscapes gtFine -> COCO-panoptic conversion, and loading the result with CocoPanopticDataset."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from PIL import Image

from unipan.data.cityscapes import CITYSCAPES_CATEGORIES, cityscapes_categories, cityscapes_to_coco_panoptic
from unipan.data.coco_panoptic import CocoPanopticDataset
from unipan.io import read_id_png
from unipan.structures import IGNORE_LABEL, DatasetMeta

STEM = "testcity_000001_000002"
TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def _instance_ids() -> np.ndarray:
    """Road, sky, two people, a person group and a car group (crowds), ignored and void labels."""
    m = np.full((10, 14), 7, np.uint16)  # road
    m[:3] = 23  # sky
    m[0, :4] = 0  # unlabeled
    m[1, 10:] = 5  # dynamic: ignored in evaluation
    m[3:8, 1:3] = 24000
    m[4:9, 4:5] = 24001
    m[3:5, 6:9] = 24  # a group of people without instance ids
    m[6:9, 10:13] = 26  # a group of cars
    m[8:10, 0:2] = 29001  # a caravan: a thing class ignored in evaluation
    return m


def make_gtfine(root: Path, instance_ids: np.ndarray | None = None, photo_size: tuple[int, int] | None = None) -> None:
    ids = _instance_ids() if instance_ids is None else instance_ids
    gt = root / "gtFine/val/testcity"
    photos = root / "leftImg8bit/val/testcity"
    gt.mkdir(parents=True)
    photos.mkdir(parents=True)
    (gt / f"{STEM}_gtFine_instanceIds.png").write_bytes(imagecodecs.png_encode(ids))
    h, w = photo_size or ids.shape
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        photos / f"{STEM}_leftImg8bit.png"
    )


def test_categories() -> None:
    assert len(CITYSCAPES_CATEGORIES) == 19
    assert [c["id"] for c in CITYSCAPES_CATEGORIES] == sorted(TRAIN_ID)
    assert [c["name"] for c in CITYSCAPES_CATEGORIES if c["isthing"]] == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    assert [c["id"] for c in cityscapes_categories(use_train_id=True)] == list(range(19))
    meta = DatasetMeta(CITYSCAPES_CATEGORIES)
    # the all-classes space (stuff first, then things) is the train-id space
    assert all(meta.class_index(label_id) == train_id for label_id, train_id in TRAIN_ID.items())


def test_categories_match_deeplab2(shared_data: Path) -> None:
    reference = json.loads((shared_data / "deeplab2/utils/panoptic_cityscapes_categories.json").read_text())
    ours = [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in CITYSCAPES_CATEGORIES]
    assert ours == [{k: c[k] for k in ("id", "name", "isthing", "color")} for c in reference]


def test_convert_hand_made(tmp_path: Path) -> None:
    make_gtfine(tmp_path)
    json_path = cityscapes_to_coco_panoptic(tmp_path / "gtFine", tmp_path / "leftImg8bit", tmp_path / "out")
    assert json_path == tmp_path / "out/cityscapes_panoptic_val.json"
    d = json.loads(json_path.read_text())
    assert d["categories"] == CITYSCAPES_CATEGORIES
    assert d["images"] == [{"id": STEM, "width": 14, "height": 10, "file_name": f"{STEM}_leftImg8bit.png"}]
    (ann,) = d["annotations"]
    assert ann["image_id"] == STEM and ann["file_name"] == f"{STEM}_gtFine_panoptic.png"
    src = _instance_ids()
    pan = read_id_png(tmp_path / "out/cityscapes_panoptic_val" / ann["file_name"])
    kept = {7, 23, 24000, 24001, 24, 26}
    np.testing.assert_array_equal(pan, np.where(np.isin(src, list(kept)), src, 0))
    segs = {s["id"]: s for s in ann["segments_info"]}
    assert set(segs) == kept
    for seg_id, s in segs.items():
        ys, xs = np.nonzero(src == seg_id)
        assert s["area"] == len(ys)
        assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert s["category_id"] == (seg_id // 1000 if seg_id >= 1000 else seg_id)
        assert s["iscrowd"] == int(seg_id in (24, 26))


def test_convert_train_ids(tmp_path: Path) -> None:
    make_gtfine(tmp_path)
    json_path = cityscapes_to_coco_panoptic(
        tmp_path / "gtFine", tmp_path / "leftImg8bit", tmp_path / "out", use_train_id=True
    )
    assert json_path.name == "cityscapes_panoptic_val_trainId.json"
    assert (tmp_path / "out/cityscapes_panoptic_val_trainId" / f"{STEM}_gtFine_panoptic.png").is_file()
    segs = {s["id"]: s["category_id"] for s in json.loads(json_path.read_text())["annotations"][0]["segments_info"]}
    # segment ids stay label-id based; only category ids change
    assert segs == {7: 0, 23: 10, 24: 11, 26: 13, 24000: 11, 24001: 11}


def test_load_converted(tmp_path: Path) -> None:
    make_gtfine(tmp_path)
    json_path = cityscapes_to_coco_panoptic(tmp_path / "gtFine", tmp_path / "leftImg8bit", tmp_path / "out")
    ds = CocoPanopticDataset(tmp_path / "leftImg8bit/val", tmp_path / "out/cityscapes_panoptic_val", json_path)
    t = ds[0].target
    src = _instance_ids()
    assert t.instance_ids.tolist() == [24000, 24001] and t.labels.tolist() == [0, 0]
    assert torch.equal(t.crowd, torch.from_numpy(np.isin(src, [24, 26])))
    expected = np.full(src.shape, IGNORE_LABEL)
    for label_id, train_id in TRAIN_ID.items():
        expected[(src == label_id) | (src // 1000 == label_id) & (src >= 1000)] = train_id
    expected[np.isin(src, [24, 26])] = IGNORE_LABEL
    np.testing.assert_array_equal(t.sem_seg.numpy(), expected)


def test_load_official_file_name_quirk(tmp_path: Path) -> None:
    """createPanopticImgs names the photo '<id>_gtFine_leftImg8bit.png'; the loader still finds it."""
    make_gtfine(tmp_path)
    json_path = cityscapes_to_coco_panoptic(tmp_path / "gtFine", tmp_path / "leftImg8bit", tmp_path / "out")
    d = json.loads(json_path.read_text())
    d["images"][0]["file_name"] = f"{STEM}_gtFine_leftImg8bit.png"
    json_path.write_text(json.dumps(d))
    ds = CocoPanopticDataset(tmp_path / "leftImg8bit/val", tmp_path / "out/cityscapes_panoptic_val", json_path)
    assert ds.image_path(0) == tmp_path / f"leftImg8bit/val/testcity/{STEM}_leftImg8bit.png"


def test_convert_errors(tmp_path: Path) -> None:
    bad = _instance_ids()
    bad[0, 0] = 50
    make_gtfine(tmp_path / "a", bad)
    message = rf"{STEM}_gtFine_instanceIds.png: pixel value 50 has unknown Cityscapes label"
    with pytest.raises(ValueError, match=message):
        cityscapes_to_coco_panoptic(tmp_path / "a/gtFine", tmp_path / "a/leftImg8bit", tmp_path / "a/out")
    make_gtfine(tmp_path / "b", photo_size=(10, 15))
    with pytest.raises(ValueError, match=rf"image '{STEM}': photo .* is 10x15 but .* is 10x14"):
        cityscapes_to_coco_panoptic(tmp_path / "b/gtFine", tmp_path / "b/leftImg8bit", tmp_path / "b/out")
    make_gtfine(tmp_path / "c")
    (tmp_path / f"c/leftImg8bit/val/testcity/{STEM}_leftImg8bit.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"{STEM}_leftImg8bit.png"):
        cityscapes_to_coco_panoptic(tmp_path / "c/gtFine", tmp_path / "c/leftImg8bit", tmp_path / "c/out")
    with pytest.raises(FileNotFoundError, match="instanceIds"):
        cityscapes_to_coco_panoptic(tmp_path / "c/gtFine", tmp_path / "c/leftImg8bit", tmp_path / "c/out", "train")


def test_real_fixture(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "mmsegmentation/tests/data/pseudo_cityscapes_dataset"
    json_path = cityscapes_to_coco_panoptic(root / "gtFine", root / "leftImg8bit", tmp_path)
    ds = CocoPanopticDataset(root / "leftImg8bit/val", tmp_path / "cityscapes_panoptic_val", json_path)
    assert len(ds) == 1 and ds.image_ids == ["frankfurt_000000_000294"]
    sample = ds[0]
    t = sample.target
    assert sample.image.shape == (3, 128, 256)
    assert t.instance_ids.tolist() == [24000, 24001, 24002, 24003, 26000, 26001, 26002]
    assert [ds.meta.thing_dataset_id(k) for k in t.labels.tolist()] == [24] * 4 + [26] * 3
    assert not t.crowd.any()
    stem = "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine"
    with Image.open(root / f"{stem}_instanceIds.png") as im:
        src = np.asarray(im).astype(np.int64)
    assert t.masks.sum(dim=(1, 2)).tolist() == [int((src == k).sum()) for k in t.instance_ids.tolist()]
    # with no crowd here, sem_seg is the semantic labelIds file in train ids. (The fixture's
    # labelTrainIds file was downscaled on its own and differs from both at 77 pixels.)
    with Image.open(root / f"{stem}_labelIds.png") as im:
        label_ids = np.asarray(im).astype(np.int64)
    lut = np.full(256, IGNORE_LABEL)
    lut[list(TRAIN_ID)] = list(TRAIN_ID.values())
    np.testing.assert_array_equal(t.sem_seg.numpy(), lut[label_ids])
