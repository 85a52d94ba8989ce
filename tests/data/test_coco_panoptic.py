"""CocoPanopticDataset on a hand-made fixture, on real COCO samples, and on bad input."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unipan.data.coco_panoptic import CocoPanopticDataset
from unipan.data.collate import Collate
from unipan.data.transforms import Compose, Normalize, RandomHorizontalFlip, ResizeShortestEdge
from unipan.io import (
    load_panoptic_json,
    read_id_png,
    write_id_png,
    write_panoptic_json,
    write_panoptic_prediction,
)
from unipan.structures import IGNORE_LABEL, Sample, masks_to_boxes

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 7, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    {"id": 9, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
]
# class index: stuff first (road 0, sky 1), then things (person 2, car 3); thing index person 0, car 1
PERSON, CAR, CROWD, ROAD, SKY = 5, 6, 7, 700, 256 * 256 * 2 + 9  # segment ids (SKY exercises blue)
H, W = 12, 16


def _id_map() -> np.ndarray:
    ids = np.zeros((H, W), np.int32)  # row 0 stays void
    ids[1:6] = SKY
    ids[6:] = ROAD
    ids[3:9, 2:5] = PERSON
    ids[7:11, 8:14] = CAR
    ids[2:5, 10:15] = CROWD
    return ids


def _segments(ids: np.ndarray) -> list[dict]:
    cats = {PERSON: (1, 0), CAR: (3, 0), CROWD: (1, 1), ROAD: (7, 0), SKY: (9, 0)}
    out = []
    for seg_id, (cat, crowd) in cats.items():
        ys, xs = np.nonzero(ids == seg_id)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        out.append({"id": seg_id, "category_id": cat, "iscrowd": crowd, "area": len(ys), "bbox": bbox})
    return out


def _photo(ids: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(ids.sum()) % 1000)
    return rng.integers(0, 256, size=(*ids.shape, 3), dtype=np.uint8)


def make_fixture(root: Path, edit=None) -> tuple[Path, Path, Path]:
    """Two images: 'a' (RGB PNG) and 'b' (grey PNG, mirrored map). `edit(json_dict)` may break it."""
    images, panoptic = root / "images", root / "panoptic"
    images.mkdir(parents=True, exist_ok=True)
    panoptic.mkdir(exist_ok=True)
    ids_a, ids_b = _id_map(), _id_map()[:, ::-1].copy()
    Image.fromarray(_photo(ids_a)).save(images / "a.png")
    Image.fromarray(_photo(ids_b)[:, :, 0], mode="L").save(images / "b.png")
    write_id_png(panoptic / "a.png", ids_a)
    write_id_png(panoptic / "b.png", ids_b)
    d = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "annotations": [
            {"image_id": 1, "file_name": "a.png", "segments_info": _segments(ids_a)},
            {"image_id": 2, "file_name": "b.png", "segments_info": _segments(ids_b)},
        ],
        "categories": [dict(c) for c in CATEGORIES],
    }
    if edit is not None:
        edit(d)
    json_path = root / "gt.json"
    json_path.write_text(json.dumps(d))
    return images, panoptic, json_path


def test_fixture_targets(tmp_path: Path) -> None:
    ds = CocoPanopticDataset(*make_fixture(tmp_path))
    assert len(ds) == 2 and ds.image_ids == ["1", "2"]
    assert (ds.meta.num_stuff, ds.meta.num_things) == (2, 2)
    ids = _id_map()
    sample = ds[0]
    assert sample.image_id == "1" and sample.original_size == (H, W)
    assert sample.image.dtype == torch.float32 and sample.image.shape == (3, H, W)
    np.testing.assert_array_equal(sample.image.permute(1, 2, 0).numpy(), _photo(ids))
    t = sample.target
    np.testing.assert_array_equal(t.panoptic.numpy(), ids)
    expected_sem = np.full((H, W), IGNORE_LABEL)
    expected_sem[ids == ROAD] = 0
    expected_sem[ids == SKY] = 1
    expected_sem[ids == PERSON] = 2
    expected_sem[ids == CAR] = 3  # crowd and void stay IGNORE_LABEL
    np.testing.assert_array_equal(t.sem_seg.numpy(), expected_sem)
    assert t.labels.tolist() == [0, 1] and t.instance_ids.tolist() == [PERSON, CAR]
    np.testing.assert_array_equal(t.masks.numpy(), np.stack([ids == PERSON, ids == CAR]))
    assert t.boxes.tolist() == [[2, 3, 5, 9], [8, 7, 14, 11]]
    np.testing.assert_array_equal(t.crowd.numpy(), ids == CROWD)
    # the grey photo came out as three equal channels
    grey = ds[1].image
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert ds[1].target.boxes.tolist() == [[11, 3, 14, 9], [2, 7, 8, 11]]


def test_load_raw(tmp_path: Path) -> None:
    ds = CocoPanopticDataset(*make_fixture(tmp_path))
    image, ids, segments, image_id = ds.load_raw(1)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, _id_map()[:, ::-1])
    assert image_id == "2" and {s.id for s in segments} == {PERSON, CAR, CROWD, ROAD, SKY}
    assert [s.iscrowd for s in segments] == [False, False, True, False, False]
    with pytest.raises(IndexError):
        ds.load_raw(2)


def test_transform_and_dataloader(tmp_path: Path) -> None:
    transform = Compose([ResizeShortestEdge(24, 100), RandomHorizontalFlip(1.0), Normalize()])
    ds = CocoPanopticDataset(*make_fixture(tmp_path), transform=transform)
    ds = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=pickle.loads(pickle.dumps(Collate(32))))
    batch = next(iter(loader))
    assert batch.images.shape == (2, 3, 32, 32)
    assert batch.image_sizes == [(24, 32), (24, 32)] and batch.original_sizes == [(H, W), (H, W)]
    assert batch.image_ids == ["1", "2"]
    # image 2 is image 1's map mirrored, so after the flip its target equals image 1's unflipped
    plain = CocoPanopticDataset(*make_fixture(tmp_path / "p"), transform=ResizeShortestEdge(24, 100))
    assert torch.equal(batch.targets[1].panoptic, plain[0].target.panoptic)
    for t in batch.targets:
        assert len(t) == 2 and torch.equal(t.boxes, masks_to_boxes(t.masks))
    sem = batch.padded_sem_seg()
    assert (sem[:, 24:] == IGNORE_LABEL).all()


def test_photo_in_subfolder(tmp_path: Path) -> None:
    images, panoptic, json_path = make_fixture(tmp_path)
    (images / "city").mkdir()
    (images / "a.png").rename(images / "city" / "a.png")
    ds = CocoPanopticDataset(images, panoptic, json_path)
    assert ds.image_path(0) == images / "city" / "a.png"
    assert ds[0].target.labels.tolist() == [0, 1]


def test_unannotated_images_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    extra = {"id": 3, "file_name": "c.png", "height": H, "width": W}
    with caplog.at_level("WARNING"):
        ds = CocoPanopticDataset(*make_fixture(tmp_path, lambda d: d["images"].append(extra)))
    assert len(ds) == 2 and "1 images have no annotation" in caplog.text


# --- bad input ---------------------------------------------------------------------------------
def _segs(d: dict, k: int = 0) -> list[dict]:
    return d["annotations"][k]["segments_info"]


def test_png_id_missing_from_json(tmp_path: Path) -> None:
    paths = make_fixture(tmp_path, lambda d: _segs(d).pop(0))
    ds = CocoPanopticDataset(*paths, validate=False)  # even without validation: no target without it
    with pytest.raises(ValueError, match=rf"image '1': segment ids \[{PERSON}\] of panoptic PNG .*a.png are missing"):
        ds[0]


def test_json_segment_missing_from_png(tmp_path: Path) -> None:
    extra = {"id": 4242, "category_id": 3, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]}
    paths = make_fixture(tmp_path, lambda d: _segs(d, 1).append(extra))
    ds = CocoPanopticDataset(*paths)
    with pytest.raises(ValueError, match=r"image '2': JSON segments \[4242\] do not appear in panoptic PNG .*b.png"):
        ds[1]
    lenient = CocoPanopticDataset(*paths, validate=False)
    assert 4242 not in {s.id for s in lenient[1].target.segments}


def test_duplicate_segment_ids(tmp_path: Path) -> None:
    paths = make_fixture(tmp_path, lambda d: _segs(d, 1).append(dict(_segs(d, 1)[1])))
    with pytest.raises(ValueError, match=rf"gt.json: image 2, segment {CAR}: duplicate segment id"):
        CocoPanopticDataset(*paths)


def test_unknown_category(tmp_path: Path) -> None:
    paths = make_fixture(tmp_path, lambda d: _segs(d)[3].update(category_id=99))
    with pytest.raises(ValueError, match=rf"gt.json: image 1, segment {ROAD}: unknown category 99"):
        CocoPanopticDataset(*paths)


def test_photo_and_png_sizes_differ(tmp_path: Path) -> None:
    images, panoptic, json_path = make_fixture(tmp_path)
    Image.fromarray(np.zeros((H, W + 1, 3), np.uint8)).save(images / "b.png")
    ds = CocoPanopticDataset(images, panoptic, json_path)
    with pytest.raises(ValueError, match=r"image '2': photo .*b.png is 12x17 but panoptic PNG .*b.png is 12x16"):
        ds[1]


def test_exif_rotated_photo_against_unrotated_png(tmp_path: Path) -> None:
    images, panoptic, json_path = make_fixture(tmp_path, lambda d: d["images"][0].update(file_name="a.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_photo(_id_map())).save(images / "a.jpg", exif=exif)
    ds = CocoPanopticDataset(images, panoptic, json_path)
    with pytest.raises(ValueError, match=r"16x12 but panoptic PNG .* is 12x16 .*EXIF rotation"):
        ds[0]


def test_json_size_and_area_disagree_with_png(tmp_path: Path) -> None:
    ds = CocoPanopticDataset(*make_fixture(tmp_path / "s", lambda d: d["images"][1].update(height=13)))
    with pytest.raises(ValueError, match=r"image '2': the JSON says 13x16 but panoptic PNG .* is 12x16"):
        ds[1]
    ds = CocoPanopticDataset(*make_fixture(tmp_path / "a", lambda d: _segs(d)[1].update(area=3)))
    with pytest.raises(ValueError, match=rf"image '1', segment {CAR}: JSON area 3 but the panoptic PNG .* has 24"):
        ds[0]


def test_truncated_files(tmp_path: Path) -> None:
    images, panoptic, json_path = make_fixture(tmp_path)
    data = (panoptic / "a.png").read_bytes()
    (panoptic / "a.png").write_bytes(data[: len(data) // 2])
    ds = CocoPanopticDataset(images, panoptic, json_path)
    with pytest.raises(ValueError, match=r"image '1': .*panoptic.a.png: cannot decode PNG"):
        ds[0]
    data = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"images.b.png: cannot read image"):
        ds[1]


def test_missing_files(tmp_path: Path) -> None:
    images, panoptic, json_path = make_fixture(tmp_path)
    (images / "a.png").unlink()
    (panoptic / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 files missing:\n  image 1: photo a.png not found") as info:
        CocoPanopticDataset(images, panoptic, json_path)
    assert "image 2: panoptic PNG" in str(info.value)
    ds = CocoPanopticDataset(images, panoptic, json_path, validate=False)
    with pytest.raises(FileNotFoundError, match="image 1: photo a.png not found"):
        ds[0]
    with pytest.raises(FileNotFoundError, match=r"image '2': panoptic PNG .*b.png not found"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="images folder"):
        CocoPanopticDataset(tmp_path / "nowhere", panoptic, json_path)


# --- real COCO samples -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_samples(shared_data: Path) -> tuple[CocoPanopticDataset, list[Sample]]:
    """The two panopticapi sample images, loaded once (decoding them is the slow part)."""
    root = shared_data / "panopticapi/sample_data"
    ds = CocoPanopticDataset(root / "input_images", root / "panoptic_examples", root / "panoptic_examples.json")
    return ds, [ds[i] for i in range(len(ds))]


def test_real_panopticapi_samples(shared_data: Path, coco_samples) -> None:
    root = shared_data / "panopticapi/sample_data"
    ds, samples = coco_samples
    assert len(ds) == 2 and ds.meta.num_things == 80 and ds.meta.num_stuff == 53
    raw = json.loads((root / "panoptic_examples.json").read_text())
    sizes = {142238: (427, 640), 439180: (360, 640)}
    crowd_counts = {142238: 1, 439180: 2}
    for sample, ann in zip(samples, raw["annotations"], strict=True):
        t = sample.target
        assert sample.image_id == str(ann["image_id"]) and t.image_size == sizes[ann["image_id"]]
        segs = ann["segments_info"]
        things = [s for s in segs if ds.meta.isthing(s["category_id"]) and not s["iscrowd"]]
        assert sum(s["iscrowd"] for s in segs) == crowd_counts[ann["image_id"]]
        assert len(t) == len(things)
        assert t.labels.tolist() == [ds.meta.thing_index(s["category_id"]) for s in things]
        assert t.masks.sum(dim=(1, 2)).tolist() == [s["area"] for s in things]
        assert [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in t.boxes.int().tolist()] == [s["bbox"] for s in things]
        assert int(t.crowd.sum()) == sum(s["area"] for s in segs if s["iscrowd"])
        # every non-crowd segment's pixels carry its class; the rest is ignore
        per_class = Counter()
        for s in segs:
            if not s["iscrowd"]:
                per_class[ds.meta.class_index(s["category_id"])] += s["area"]
        values, counts = torch.unique(t.sem_seg, return_counts=True)
        got = dict(zip(values.tolist(), counts.tolist(), strict=True))
        void = int((t.panoptic == 0).sum())
        assert got.pop(IGNORE_LABEL) == void + int(t.crowd.sum())
        assert got == dict(per_class)


def test_real_samples_pq_oracle(shared_data: Path, tmp_path: Path, coco_samples) -> None:
    """Targets written back as a prediction score PQ = 1 with the official panopticapi."""
    evaluation = pytest.importorskip("panopticapi.evaluation")
    root = shared_data / "panopticapi/sample_data"
    pj = load_panoptic_json(root / "panoptic_examples.json")
    pairs = []
    for sample, ann in zip(coco_samples[1], pj.annotations, strict=True):
        t = sample.target
        pred = write_panoptic_prediction(tmp_path, ann.image_id, ann.file_name, t.panoptic, t.segments)
        pairs.append((json.loads(json.dumps(ann.to_coco_dict())), pred.to_coco_dict()))
    categories = {c["id"]: c for c in pj.categories}
    stat = evaluation.pq_compute_single_core(0, pairs, str(root / "panoptic_examples"), str(tmp_path), categories)
    result, _ = stat.pq_average(categories, isthing=None)
    evaluated = {s.category_id for a in pj.annotations for s in a.segments if not s.iscrowd}
    assert result["pq"] == pytest.approx(1.0) and result["n"] == len(evaluated) == 8


def test_real_transformers_coco(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "transformers/COCO"
    segments = json.loads((root / "coco_panoptic_annotations.txt").read_text())
    categories = json.loads((shared_data / "panopticapi/panoptic_coco_categories.json").read_text())
    json_path = tmp_path / "gt.json"
    write_panoptic_json(
        json_path,
        [{"id": 39769, "file_name": "000000039769.png", "height": 480, "width": 640}],
        [{"image_id": 39769, "file_name": "000000039769.png", "segments_info": segments}],
        categories,
    )
    ds = CocoPanopticDataset(root, root / "coco_panoptic", json_path)
    t = ds[0].target
    # class_labels upstream: [17, 17, 63, 75, 75, 93]; blanket (93) is stuff, the rest things
    assert [ds.meta.thing_dataset_id(k) for k in t.labels.tolist()] == [17, 17, 63, 75, 75]
    assert t.masks.sum(dim=(1, 2)).tolist() == [53306, 59627, 174579, 4068, 2118]
    assert int((t.sem_seg == ds.meta.class_index(93)).sum()) == 2750
    ids = read_id_png(root / "coco_panoptic" / "000000039769.png")
    assert int((ids == 0).sum()) == int((t.sem_seg == IGNORE_LABEL).sum())
    resized = CocoPanopticDataset(
        root,
        root / "coco_panoptic",
        json_path,
        transform=Compose([ResizeShortestEdge(800, 1333), Normalize()]),
    )[0]
    assert resized.image.shape == (3, 800, 1067) and len(resized.target) == 5
    assert torch.equal(resized.target.boxes, masks_to_boxes(resized.target.masks))
