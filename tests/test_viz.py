"""Pictures: colour maps, overlays with boundaries and labels, side by side, folders, the CLI."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch

from unipan.data.synthetic import SynthOptions, generate_image, synth_meta, write_synthetic_dataset
from unipan.io import load_json, read_id_png, save_json, write_id_png
from unipan.structures import DatasetMeta, PanopticResult, SegmentInfo
from unipan.viz import (
    BOUNDARY_COLOR,
    add_viz_arguments,
    boundary_mask,
    colorize,
    overlay,
    overlay_result,
    save_png,
    side_by_side,
    visualize_folder,
    viz_main,
)

META = DatasetMeta(
    [
        {"id": 3, "name": "ball", "isthing": 1, "color": [200, 40, 40]},
        {"id": 7, "name": "box", "isthing": 1, "color": [0, 0, 0]},
        {"id": 20, "name": "floor", "isthing": 0, "color": [60, 160, 60]},
    ]
)


def _scene() -> tuple[np.ndarray, list[SegmentInfo]]:
    """A 20 x 30 map: floor, three balls, a crowd of balls, a box, and a void strip."""
    ids = np.full((20, 30), 500, dtype=np.int32)
    ids[2:6, 2:6] = 11
    ids[2:6, 6:10] = 12  # touches ball 11
    ids[10:14, 2:6] = 13
    ids[10:14, 10:16] = 14  # crowd
    ids[2:8, 20:26] = 21
    ids[:, 28:] = 0
    segments = [
        SegmentInfo(500, 20, False),
        SegmentInfo(13, 3, True),
        SegmentInfo(11, 3, True),
        SegmentInfo(12, 3, True),
        SegmentInfo(14, 3, True, iscrowd=True),
        SegmentInfo(21, 7, True),
    ]
    return ids, segments


def test_colorize_stuff_shades_void_and_crowd() -> None:
    ids, segments = _scene()
    pic = colorize(ids, segments, META)
    assert pic.dtype == np.uint8 and pic.shape == (20, 30, 3)
    assert (pic[ids == 0] == 0).all()  # void is black
    assert (pic[ids == 500] == (60, 160, 60)).all()  # stuff in its category colour
    shades = {sid: tuple(pic[ids == sid][0]) for sid in (11, 12, 13)}
    for sid, colour in shades.items():
        assert (pic[ids == sid] == colour).all()  # one flat shade per instance
    assert len(set(shades.values())) == 3  # distinct per instance
    # shades of the category colour: red dominates each of them
    assert all(c[0] > c[1] and c[0] > c[2] for c in shades.values())
    # a category's only instance keeps the category colour itself
    assert (pic[ids == 21] == (0, 0, 0)).all()
    # crowd: hatched in the category colour (two tones, both reddish)
    crowd_colours = {tuple(c) for c in pic[ids == 14]}
    assert len(crowd_colours) == 2 and (200, 40, 40) in crowd_colours


def test_colorize_is_deterministic_and_takes_tensors() -> None:
    ids, segments = _scene()
    a = colorize(ids, segments, META)
    b = colorize(torch.from_numpy(ids), list(reversed(segments)), META)
    assert np.array_equal(a, b)  # shades follow segment ids, not list order


def test_many_instances_get_distinct_shades() -> None:
    ids = np.arange(1, 41, dtype=np.int32).reshape(5, 8)
    segments = [SegmentInfo(i, 7, True) for i in range(1, 41)]  # the black category
    pic = colorize(ids, segments, META)
    colours = {tuple(pic[ids == i][0]) for i in range(1, 41)}
    assert len(colours) == 40
    assert (0, 0, 0) not in colours and (255, 255, 255) not in colours  # never void or boundary


def test_colorize_rejects_ids_without_segments() -> None:
    ids, segments = _scene()
    ids[0, 0] = 999
    with pytest.raises(ValueError, match="999"):
        colorize(ids, segments, META)
    with pytest.raises(ValueError, match="category id 42"):
        colorize(np.ones((2, 2), dtype=np.int32), [SegmentInfo(1, 42, True)], META)
    with pytest.raises(ValueError, match=">= 0"):
        colorize(np.full((2, 2), -3, dtype=np.int32), [SegmentInfo(-3, 3, True)], META)
    with pytest.raises(ValueError, match="integers"):
        colorize(np.ones((2, 2), dtype=np.float32), [], META)


def test_boundaries_drawn_exactly_where_ids_change() -> None:
    ids, segments = _scene()
    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    out = overlay(image, ids, segments, META, alpha=0.0, boundaries=True)
    edge = boundary_mask(ids)
    expected = np.zeros_like(edge)
    expected[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    expected[:-1, :] |= ids[:-1, :] != ids[1:, :]
    assert np.array_equal(edge, expected) and edge.sum() > 0
    assert (out[edge] == BOUNDARY_COLOR).all()
    assert (out[~edge] == 90).all()  # alpha 0: the image everywhere else
    # the line between the two touching balls is drawn
    assert edge[3, 5] and (out[3, 5] == BOUNDARY_COLOR).all()


def test_overlay_blends_and_leaves_void_alone() -> None:
    ids, segments = _scene()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    colours = colorize(ids, segments, META)
    full = overlay(image, ids, segments, META, alpha=1.0, boundaries=False)
    assert np.array_equal(full[ids != 0], colours[ids != 0])
    assert np.array_equal(full[ids == 0], image[ids == 0])  # void shows the image
    half = overlay(image, ids, segments, META, alpha=0.5, boundaries=False)
    expected = np.rint(0.5 * image.astype(np.float32) + 0.5 * colours.astype(np.float32))
    assert np.abs(half[ids != 0].astype(np.float32) - expected[ids != 0]).max() <= 1
    with pytest.raises(ValueError, match="differs"):
        overlay(image[:10], ids, segments, META)


def test_labels_write_names_inside_segments() -> None:
    image, panoptic, segments = generate_image(0, 1, SynthOptions(size=(128, 128)))
    meta = synth_meta()
    plain = overlay(image, panoptic, segments, meta, labels=False)
    labelled = overlay(image, panoptic, segments, meta, labels=True)
    changed = (plain != labelled).any(-1)
    assert changed.sum() > 50
    # label boxes are white text on black
    assert (labelled[changed] == 0).all(-1).any() and (labelled[changed] >= 200).all(-1).any()
    scored = [SegmentInfo(**{**vars(s), "score": 0.5}) for s in segments]
    with_scores = overlay(image, panoptic, scored, meta, labels=True)
    assert not np.array_equal(with_scores, labelled)  # "0.50" added


def test_overlay_result() -> None:
    ids, segments = _scene()
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    result = PanopticResult(panoptic=torch.from_numpy(ids), segments=segments)
    assert np.array_equal(overlay_result(image, result, META), overlay(image, ids, segments, META))


def test_side_by_side_shape_and_content() -> None:
    left = np.full((10, 12, 3), 100, dtype=np.uint8)
    right = np.full((14, 8, 3), 200, dtype=np.uint8)
    both = side_by_side(left, right)
    assert both.shape == (16 + 14, 12 + 4 + 8, 3) and both.dtype == np.uint8
    assert (both[16:26, :12] == 100).all() and (both[16:30, 16:] == 200).all()
    assert (both[:16] > 100).any()  # title text
    bare = side_by_side(left, right, titles=None)
    assert bare.shape == (14, 24, 3) and (bare[:10, :12] == 100).all()
    with pytest.raises(ValueError, match="right picture"):
        side_by_side(left, right.astype(np.float32))  # type: ignore[arg-type]


def test_save_png_round_trip(tmp_path: Path) -> None:
    pic = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    save_png(tmp_path / "a" / "pic.png", pic)
    back = np.asarray(imagecodecs.png_decode((tmp_path / "a" / "pic.png").read_bytes()))
    assert np.array_equal(back, pic)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["pic.png"]  # no temporary left
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "b.png", pic.astype(np.int64))


def _synthetic_folder(tmp_path: Path) -> Path:
    opts = SynthOptions(size=(64, 64), crowd_prob=1.0)
    return write_synthetic_dataset(tmp_path / "synth", 3, seed=2, opts=opts, split="val").parent


def test_visualize_folder_ground_truth_and_pairs(tmp_path: Path) -> None:
    root = _synthetic_folder(tmp_path)
    gt = visualize_folder(root / "images", root / "panoptic", root / "panoptic.json", tmp_path / "gt", max_images=2)
    assert [p.name for p in gt] == ["000000.png", "000001.png"]
    pic = np.asarray(imagecodecs.png_decode(gt[0].read_bytes()))
    assert pic.shape == (64, 64, 3)

    # a "prediction" folder: the ground truth with string image ids and scores, as predictors write
    doc = load_json(root / "panoptic.json")
    pred_dir = tmp_path / "pred"
    shutil.copytree(root / "panoptic", pred_dir)
    for ann in doc["annotations"]:
        ann["image_id"] = str(ann["image_id"])
        for s in ann["segments_info"]:
            s["score"] = 0.75
    save_json(tmp_path / "pred.json", {"annotations": doc["annotations"]})
    pairs = visualize_folder(
        root / "images",
        root / "panoptic",
        root / "panoptic.json",
        tmp_path / "pairs",
        pred_dir=pred_dir,
        pred_json=tmp_path / "pred.json",
        labels=True,
    )
    assert len(pairs) == 3
    pair = np.asarray(imagecodecs.png_decode(pairs[0].read_bytes()))
    assert pair.shape == (16 + 64, 64 + 4 + 64, 3)

    # a prediction missing one image is an error naming it
    save_json(tmp_path / "short.json", {"annotations": doc["annotations"][:1]})
    with pytest.raises(ValueError, match="no prediction for image 1"):
        visualize_folder(
            root / "images", root / "panoptic", root / "panoptic.json", tmp_path / "x",
            pred_dir=pred_dir, pred_json=tmp_path / "short.json",
        )  # fmt: skip
    with pytest.raises(ValueError, match="both"):
        visualize_folder(root / "images", root / "panoptic", root / "panoptic.json", tmp_path / "x", pred_dir=pred_dir)
    # a PNG id the JSON does not describe
    bad = read_id_png(pred_dir / "000000.png")
    bad[0, 0] = 12345
    write_id_png(pred_dir / "000000.png", bad)
    with pytest.raises(ValueError, match="12345"):
        visualize_folder(
            root / "images", root / "panoptic", root / "panoptic.json", tmp_path / "x",
            pred_dir=pred_dir, pred_json=tmp_path / "pred.json",
        )  # fmt: skip


def test_visualize_real_coco_sample(shared_data: Path, tmp_path: Path) -> None:
    sample = shared_data / "panopticapi" / "sample_data"
    out = visualize_folder(
        sample / "input_images",
        sample / "panoptic_examples",
        sample / "panoptic_examples.json",
        tmp_path,
        labels=True,
    )
    assert len(out) == 2
    pic = np.asarray(imagecodecs.png_decode(out[0].read_bytes()))
    assert pic.shape[2] == 3 and pic.shape[:2] in {(427, 640), (360, 640)}


def test_viz_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _synthetic_folder(tmp_path)
    parser = argparse.ArgumentParser()
    add_viz_arguments(parser)
    args = parser.parse_args(
        ["--images", str(root / "images"), "--panoptic", str(root / "panoptic"),
         "--json", str(root / "panoptic.json"), "--out", str(tmp_path / "pics"),
         "--max-images", "1", "--labels"]
    )  # fmt: skip
    assert viz_main(args) == 0
    assert "wrote 1 ground-truth overlays" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["000000.png"]
    args.json = str(tmp_path / "missing.json")
    assert viz_main(args) == 2
    assert "missing.json" in capsys.readouterr().err
