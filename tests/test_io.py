"""unipan.io (id encoding, panoptic PNG/JSON) and unipan.data.image (photo decoding)."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from unipan.data.image import exif_orientation, image_size, read_image
from unipan.io import (
    PanopticAnnotation,
    id2rgb,
    load_panoptic_json,
    panoptic_segment_stats,
    read_id_png,
    rgb2id,
    segments_from_coco,
    write_id_png,
    write_panoptic_json,
    write_panoptic_prediction,
)
from unipan.structures import DatasetMeta, SegmentInfo

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 7, "name": "road", "isthing": 0, "color": [128, 64, 128]},
]


# --- id <-> RGB ----------------------------------------------------------------------------------
def test_rgb2id_formula() -> None:
    rgb = np.array([[[1, 2, 3], [255, 255, 255]], [[0, 0, 0], [10, 0, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(rgb2id(rgb), [[1 + 2 * 256 + 3 * 65536, 256**3 - 1], [0, 10 + 65536]])
    assert rgb2id(rgb).dtype == np.int32


@settings(max_examples=30, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.integers(0, 256**3 - 1)))
def test_rgb_id_round_trip(ids: np.ndarray) -> None:
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)


def test_matches_official_panopticapi() -> None:
    utils = pytest.importorskip("panopticapi.utils")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256**3, size=(7, 9))
    np.testing.assert_array_equal(id2rgb(ids), utils.id2rgb(ids))
    rgb = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb2id(rgb), utils.rgb2id(rgb))


def test_id2rgb_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="256"):
        id2rgb(np.array([[256**3]]))
    with pytest.raises(ValueError, match="256"):
        id2rgb(np.array([[-1]]))


def test_id_png_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, size=(13, 17)).astype(np.int32)
    write_id_png(tmp_path / "sub" / "a.png", ids)
    np.testing.assert_array_equal(read_id_png(tmp_path / "sub" / "a.png"), ids)
    # readable by PIL as plain RGB, the way panopticapi reads it
    with Image.open(tmp_path / "sub" / "a.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(rgb2id(np.asarray(im)), ids)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "a.png"], "temporary file left behind"


def test_read_id_png_real_sample_matches_pil(shared_data: Path) -> None:
    png = shared_data / "panopticapi/sample_data/panoptic_examples/000000142238.png"
    with Image.open(png) as im:
        expected = rgb2id(np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(read_id_png(png), expected)


def test_truncated_png_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    write_id_png(path, np.random.default_rng(2).integers(0, 1000, size=(64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_id_png(path)


def test_read_id_png_rejects_grey(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    with pytest.raises(ValueError, match="grey.png.*8-bit RGB"):
        read_id_png(path)


# --- segment statistics ----------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 4)))
def test_segment_stats_match_naive(ids: np.ndarray) -> None:
    stats = panoptic_segment_stats(ids)
    assert set(stats) == set(np.unique(ids).tolist()) - {0}
    for seg_id, (area, (x, y, w, h)) in stats.items():
        ys, xs = np.nonzero(ids == seg_id)
        assert area == len(ys)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)


# --- JSON --------------------------------------------------------------------------------------
def _gt_dict() -> dict:
    return {
        "images": [{"id": 5, "file_name": "a.jpg", "height": 4, "width": 6}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [
            {
                "image_id": 5,
                "file_name": "a.png",
                "segments_info": [
                    {"id": 1, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]},
                    {"id": 70000, "category_id": 7, "iscrowd": 0, "area": 20, "bbox": [0, 0, 6, 4]},
                ],
            },
            {"image_id": 9, "file_name": "b.png", "segments_info": []},
        ],
        "categories": [dict(c) for c in CATEGORIES],
    }


def _write(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(d))
    return path


def test_load_panoptic_json(tmp_path: Path) -> None:
    pj = load_panoptic_json(_write(tmp_path, _gt_dict()))
    assert pj.meta.num_things == 2 and pj.meta.num_stuff == 1
    ann = pj.annotation(5)
    assert pj.annotation("5") is ann and pj.image("5")["file_name"] == "a.jpg"
    assert ann.segments[0] == SegmentInfo(1, 1, True, False, 4, (0, 0, 2, 2))
    assert ann.segments[1].isthing is False and ann.segments[1].id == 70000
    assert pj.annotation(9).segments == []
    with pytest.raises(KeyError, match="7"):
        pj.annotation(7)


def test_json_write_read_round_trip(tmp_path: Path) -> None:
    pj = load_panoptic_json(_write(tmp_path, _gt_dict()))
    out = tmp_path / "out" / "copy.json"
    write_panoptic_json(out, pj.images, pj.annotations, pj.categories)
    again = load_panoptic_json(out)
    assert again.annotations == pj.annotations and again.images == pj.images and again.meta == pj.meta
    # plain dicts are accepted too, numpy scalars included
    dicts = [a.to_coco_dict() for a in pj.annotations]
    dicts[0]["segments_info"][0]["area"] = np.int64(4)
    write_panoptic_json(out, pj.images, dicts, pj.categories)
    assert load_panoptic_json(out).annotations == pj.annotations


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (
            lambda d: d["annotations"][0]["segments_info"].append({"id": 1, "category_id": 3}),
            r"image 5, segment 1: duplicate segment id",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][1].update(category_id=42),
            r"image 5, segment 70000: unknown category 42",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(id=0),
            r"image 5, segment 0: id 0 is reserved",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(id=256**3),
            r"segment 16777216: id outside",
        ),
        (
            lambda d: d["annotations"][0]["segments_info"][0].update(id="x"),
            r"image 5, segments_info\[0\]: id",
        ),
        (lambda d: d["annotations"][0]["segments_info"][0].update(bbox=[1, 2]), r"image 5, segment 1: bbox"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(iscrowd=2), r"segment 1: iscrowd must be"),
        (lambda d: d["annotations"][0]["segments_info"][0].update(area=-3), r"segment 1: negative area"),
        (
            lambda d: d["annotations"][0]["segments_info"][0].pop("category_id"),
            r"needs 'id' and 'category_id'",
        ),
        (lambda d: d["annotations"].append(dict(d["annotations"][1])), r"image 9 has two annotations"),
        (lambda d: d["annotations"][1].update(image_id=11), r"image 11 has no entry in 'images'"),
        (lambda d: d["annotations"][1].pop("segments_info"), r"annotations\[1\] needs"),
        (lambda d: d["images"].append({"id": "5", "file_name": "c.jpg"}), r"image id '5' appears twice"),
        (lambda d: d["categories"].append(dict(CATEGORIES[0])), r"duplicate ids \[1\]"),
        (lambda d: d.pop("categories"), r"no 'categories'"),
    ],
)
def test_load_panoptic_json_errors(tmp_path: Path, mutate, pattern: str) -> None:
    d = _gt_dict()
    mutate(d)
    path = _write(tmp_path, d)
    with pytest.raises(ValueError, match=pattern) as info:
        load_panoptic_json(path)
    assert "gt.json" in str(info.value)


def test_load_panoptic_json_not_json(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="gt.json: invalid JSON at line 1"):
        load_panoptic_json(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="must be an object"):
        load_panoptic_json(path)


def test_prediction_json_with_meta(tmp_path: Path) -> None:
    d = {"annotations": [{"image_id": 5, "file_name": "a.png", "segments_info": [{"id": 3, "category_id": 7}]}]}
    pj = load_panoptic_json(_write(tmp_path, d), meta=DatasetMeta(CATEGORIES))
    seg = pj.annotation(5).segments[0]
    assert (seg.category_id, seg.isthing, seg.iscrowd, seg.area) == (7, False, False, 0)


def test_segments_from_coco_keeps_score() -> None:
    meta = DatasetMeta(CATEGORIES)
    segs = segments_from_coco([{"id": 4, "category_id": 3, "score": 0.25}], meta, "img")
    assert segs[0].score == 0.25 and segs[0].isthing


# --- predictions -------------------------------------------------------------------------------
def test_write_panoptic_prediction(tmp_path: Path) -> None:
    ids = np.zeros((5, 8), np.int32)
    ids[1:3, 2:6] = 17
    ids[4, 7] = 300
    segments = [
        SegmentInfo(17, 1, True, score=0.9),
        SegmentInfo(300, 7, False, score=0.5),
        SegmentInfo(999, 3, True),  # no pixels: dropped
    ]
    ann = write_panoptic_prediction(tmp_path / "pred", 5, "a.png", torch.from_numpy(ids), segments)
    assert isinstance(ann, PanopticAnnotation)
    assert [(s.id, s.area, s.bbox, s.score) for s in ann.segments] == [
        (17, 8, (2, 1, 4, 2), 0.9),
        (300, 1, (7, 4, 1, 1), 0.5),
    ]
    np.testing.assert_array_equal(read_id_png(tmp_path / "pred" / "a.png"), ids)


def test_write_panoptic_prediction_errors(tmp_path: Path) -> None:
    ids = np.array([[0, 4], [5, 5]], np.int32)
    with pytest.raises(ValueError, match=r"image 'x': id map holds segment ids \[5\] that have no segment info"):
        write_panoptic_prediction(tmp_path, "x", "x.png", ids, [SegmentInfo(4, 1, True)])
    with pytest.raises(ValueError, match=r"image 'x': duplicate segment ids \[4\]"):
        write_panoptic_prediction(
            tmp_path,
            "x",
            "x.png",
            ids,
            [SegmentInfo(4, 1, True), SegmentInfo(4, 3, True), SegmentInfo(5, 7, False)],
        )
    assert not (tmp_path / "x.png").exists()


def test_prediction_writer_reproduces_coco_gt(shared_data: Path, tmp_path: Path) -> None:
    """Writing the GT map back recomputes exactly the official areas and boxes."""
    root = shared_data / "panopticapi/sample_data"
    pj = load_panoptic_json(root / "panoptic_examples.json")
    for ann in pj.annotations:
        ids = read_id_png(root / "panoptic_examples" / ann.file_name)
        cleared = [SegmentInfo(s.id, s.category_id, s.isthing, s.iscrowd) for s in ann.segments]
        out = write_panoptic_prediction(tmp_path, ann.image_id, ann.file_name, ids, cleared)
        assert out.segments == ann.segments


# --- photos ------------------------------------------------------------------------------------
def _pattern(h: int = 24, w: int = 40) -> np.ndarray:
    """RGB image with four flat quadrants, so orientation survives JPEG compression."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (250, 10, 10)
    img[: h // 2, w // 2 :] = (10, 250, 10)
    img[h // 2 :, : w // 2] = (10, 10, 250)
    img[h // 2 :, w // 2 :] = (250, 250, 10)
    return img


def test_read_rgb_png_and_jpeg(tmp_path: Path) -> None:
    img = _pattern()
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.flags.writeable
    np.testing.assert_array_equal(out, img)
    with Image.open(tmp_path / "a.jpg") as im:
        decoded = np.asarray(im)
    np.testing.assert_array_equal(read_image(tmp_path / "a.jpg"), decoded)


def test_read_grey(tmp_path: Path) -> None:
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)
    Image.fromarray(grey > 100).save(tmp_path / "b.png")  # 1-bit
    np.testing.assert_array_equal(read_image(tmp_path / "b.png")[:, :, 1], np.where(grey > 100, 255, 0))


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([_pattern(), np.full((24, 40, 1), 0, np.uint8)], axis=2)
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])
    la = np.stack([np.full((3, 4), 77, np.uint8), np.zeros((3, 4), np.uint8)], axis=2)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.full((3, 4, 3), 77))


def test_read_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.fromarray(_pattern()).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), _pattern())


def test_read_16_bit(tmp_path: Path) -> None:
    grey16 = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(imagecodecs.png_encode(grey16))
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[:, :, 0], grey16 >> 8)
    rgb16 = np.stack([grey16, 65535 - grey16, np.full_like(grey16, 257 * 9)], axis=2)
    (tmp_path / "c16.png").write_bytes(imagecodecs.png_encode(rgb16))
    np.testing.assert_array_equal(read_image(tmp_path / "c16.png"), (rgb16 >> 8).astype(np.uint8))


def test_read_cmyk_jpeg(tmp_path: Path) -> None:
    Image.fromarray(_pattern()).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (24, 40, 3) and np.median(np.abs(out.astype(int) - _pattern())) < 6


@pytest.mark.parametrize(
    ("orientation", "rot90_k", "mirror"), [(3, 2, False), (6, -1, False), (8, 1, False), (2, 0, True)]
)
def test_read_exif_rotated_jpeg(tmp_path: Path, orientation: int, rot90_k: int, mirror: bool) -> None:
    raw = _pattern()  # 24 x 40 as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "r.jpg"
    Image.fromarray(raw).save(path, quality=95, exif=exif)
    assert exif_orientation(path) == orientation
    with Image.open(path) as im:
        stored = np.asarray(im)  # the decoded pixels before orientation, as stored
    expected = np.rot90(stored[:, ::-1] if mirror else stored, rot90_k)  # as a viewer shows it
    out = read_image(path)
    assert out.shape == expected.shape
    assert image_size(path) == expected.shape[:2]
    np.testing.assert_array_equal(out, expected)
    # the quadrant colours moved with the rotation: the displayed top-left is the stored corner
    corner = {3: (-1, -1), 6: (-1, 0), 8: (0, -1), 2: (0, -1)}[orientation]
    assert np.abs(out[0, 0].astype(int) - raw[corner]).max() < 12


def test_truncated_images_error_names_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    for name in ("t.jpg", "t.png"):
        path = tmp_path / name
        Image.fromarray(noise).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=name):
            read_image(path)


def test_not_an_image_and_missing(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_text("hello")
    with pytest.raises(ValueError, match=r"x.jpg: cannot read image"):
        read_image(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        read_image(tmp_path / "nope.jpg")


# --- file-system faults: one error naming the file ---------------------------------------------------
def test_atomic_write_names_the_destination_when_the_disk_is_full(tmp_path: Path) -> None:
    import errno

    from unipan.files import atomic_write

    target = tmp_path / "result.json"
    target.write_text("old")

    def full(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="No space left on device") as info:
        atomic_write(target, full)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)  # not the temporary file
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_check_writable_folder(tmp_path: Path) -> None:
    from unipan.files import check_writable_folder

    assert check_writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match=r"output folder .*f cannot be written: exists and is not a folder"):
        check_writable_folder(tmp_path / "f")
    with pytest.raises(OSError, match=r"--out .*f/sub cannot be written: not a directory"):
        check_writable_folder(tmp_path / "f" / "sub", "--out")
