"""Cityscapes -> COCO-panoptic, as cityscapesscripts' createPanopticImgs does it.

gtFine ``*_instanceIds.png`` (16-bit) holds per pixel either a label id (stuff, and thing
regions without instance annotation: "groups" such as a crowd of cars) or
``label_id * 1000 + k`` for instance k of a thing class. The conversion:

- segment id = the instanceIds value itself (so thing instances keep labelId*1000+k);
- category id = the label id, or its train id with ``use_train_id``;
- a thing-class value below 1000 (no instance id) is a crowd segment; stuff is never crowd;
- labels with ``ignoreInEval`` (void classes, parking, caravan, ...) become void (0).

After conversion `CocoPanopticDataset` reads the result like any COCO-panoptic folder. Its
all-classes space (stuff first, then things, each in list order) equals the Cityscapes train
ids 0..18, because the 11 stuff classes precede the 8 thing classes in label-id order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from unipan.data.image import image_size
from unipan.io import decode_png, panoptic_segment_stats, write_id_png, write_panoptic_json


class _Label(NamedTuple):
    name: str
    label_id: int
    train_id: int
    category: str
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


# The Cityscapes label definitions (cityscapesscripts helpers/labels.py); license plate (-1)
# never appears in instanceIds files and is left out.
_LABELS: tuple[_Label, ...] = (
    _Label("unlabeled", 0, 255, "void", False, True, (0, 0, 0)),
    _Label("ego vehicle", 1, 255, "void", False, True, (0, 0, 0)),
    _Label("rectification border", 2, 255, "void", False, True, (0, 0, 0)),
    _Label("out of roi", 3, 255, "void", False, True, (0, 0, 0)),
    _Label("static", 4, 255, "void", False, True, (0, 0, 0)),
    _Label("dynamic", 5, 255, "void", False, True, (111, 74, 0)),
    _Label("ground", 6, 255, "void", False, True, (81, 0, 81)),
    _Label("road", 7, 0, "flat", False, False, (128, 64, 128)),
    _Label("sidewalk", 8, 1, "flat", False, False, (244, 35, 232)),
    _Label("parking", 9, 255, "flat", False, True, (250, 170, 160)),
    _Label("rail track", 10, 255, "flat", False, True, (230, 150, 140)),
    _Label("building", 11, 2, "construction", False, False, (70, 70, 70)),
    _Label("wall", 12, 3, "construction", False, False, (102, 102, 156)),
    _Label("fence", 13, 4, "construction", False, False, (190, 153, 153)),
    _Label("guard rail", 14, 255, "construction", False, True, (180, 165, 180)),
    _Label("bridge", 15, 255, "construction", False, True, (150, 100, 100)),
    _Label("tunnel", 16, 255, "construction", False, True, (150, 120, 90)),
    _Label("pole", 17, 5, "object", False, False, (153, 153, 153)),
    _Label("polegroup", 18, 255, "object", False, True, (153, 153, 153)),
    _Label("traffic light", 19, 6, "object", False, False, (250, 170, 30)),
    _Label("traffic sign", 20, 7, "object", False, False, (220, 220, 0)),
    _Label("vegetation", 21, 8, "nature", False, False, (107, 142, 35)),
    _Label("terrain", 22, 9, "nature", False, False, (152, 251, 152)),
    _Label("sky", 23, 10, "sky", False, False, (70, 130, 180)),
    _Label("person", 24, 11, "human", True, False, (220, 20, 60)),
    _Label("rider", 25, 12, "human", True, False, (255, 0, 0)),
    _Label("car", 26, 13, "vehicle", True, False, (0, 0, 142)),
    _Label("truck", 27, 14, "vehicle", True, False, (0, 0, 70)),
    _Label("bus", 28, 15, "vehicle", True, False, (0, 60, 100)),
    _Label("caravan", 29, 255, "vehicle", True, True, (0, 0, 90)),
    _Label("trailer", 30, 255, "vehicle", True, True, (0, 0, 110)),
    _Label("train", 31, 16, "vehicle", True, False, (0, 80, 100)),
    _Label("motorcycle", 32, 17, "vehicle", True, False, (0, 0, 230)),
    _Label("bicycle", 33, 18, "vehicle", True, False, (119, 11, 32)),
)
_LABEL_BY_ID = {lab.label_id: lab for lab in _LABELS}

INSTANCE_ID_OFFSET = 1000
"""instanceIds encode thing instance k of label id L as L * 1000 + k."""


def cityscapes_categories(use_train_id: bool = False) -> list[dict[str, Any]]:
    """The 19 evaluated Cityscapes classes as createPanopticImgs lists them.

    Args:
        use_train_id: category id = train id (0..18) instead of label id. Note that
            `DatasetMeta` reserves category id 0 (road's train id) for void, so only the
            label-id list can be loaded as a dataset's categories.

    Returns:
        dicts with id, name, color [r, g, b], supercategory, isthing (0/1), in label-id order.
    """
    return [
        {
            "id": lab.train_id if use_train_id else lab.label_id,
            "name": lab.name,
            "color": list(lab.color),
            "supercategory": lab.category,
            "isthing": int(lab.has_instances),
        }
        for lab in _LABELS
        if not lab.ignore_in_eval
    ]


CITYSCAPES_CATEGORIES: list[dict[str, Any]] = cityscapes_categories()
"""The 19 Cityscapes classes (id = label id): 11 stuff (road .. sky), 8 things (person .. bicycle)."""

_GT_SUFFIX = "_gtFine_instanceIds.png"


def _read_instance_ids(path: Path) -> np.ndarray:
    arr = decode_png(path.read_bytes(), path)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{path}: an instanceIds PNG must be a single-channel integer image, "
            f"got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int32)


def _convert_one(instance_ids: np.ndarray, path: Path, use_train_id: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """InstanceIds map -> (panoptic id map int32[H, W], segments_info dicts)."""
    panoptic = np.zeros(instance_ids.shape, dtype=np.int32)
    kept: list[tuple[int, int, bool]] = []  # (segment id, category id, crowd)
    for value in np.unique(instance_ids).tolist():
        is_instance = value >= INSTANCE_ID_OFFSET
        label_id = value // INSTANCE_ID_OFFSET if is_instance else value
        label = _LABEL_BY_ID.get(label_id)
        if label is None:
            raise ValueError(f"{path}: pixel value {value} has unknown Cityscapes label id {label_id}")
        if label.ignore_in_eval:
            continue
        # a stuff value with an instance part would stay one non-crowd segment, as in the script
        crowd = label.has_instances and not is_instance
        panoptic[instance_ids == value] = value
        kept.append((value, label.train_id if use_train_id else label.label_id, crowd))
    stats = panoptic_segment_stats(panoptic)
    segments = [
        {
            "id": seg_id,
            "category_id": category_id,
            "area": stats[seg_id][0],
            "bbox": list(stats[seg_id][1]),
            "iscrowd": int(crowd),
        }
        for seg_id, category_id, crowd in kept
    ]
    return panoptic, segments


def cityscapes_to_coco_panoptic(
    gtfine_dir: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    split: str = "val",
    use_train_id: bool = False,
) -> Path:
    """Convert gtFine instanceIds of one split to COCO-panoptic PNGs and JSON.

    Output, as createPanopticImgs names it: ``out_dir/cityscapes_panoptic_<split>[_trainId].json``
    and the PNG folder ``out_dir/cityscapes_panoptic_<split>[_trainId]/`` with
    ``<city>_<seq>_<frame>_gtFine_panoptic.png``. Image ids are ``<city>_<seq>_<frame>``. Unlike
    createPanopticImgs, the `images` entry's file_name is the photo's real name
    (``..._leftImg8bit.png``, not ``..._gtFine_leftImg8bit.png``); `CocoPanopticDataset` reads
    both.

    Args:
        gtfine_dir: the ``gtFine`` folder (holding ``<split>/<city>/*_gtFine_instanceIds.png``).
        images_dir: the ``leftImg8bit`` folder (holding ``<split>/<city>/*_leftImg8bit.png``);
            every photo must exist and match its annotation's size.
        out_dir: where the JSON and PNG folder go (created if needed).
        split: "train", "val" or "test" folder name.
        use_train_id: category ids are train ids 0..18 (for training code that wants them;
            such a JSON cannot be loaded as a dataset, see `cityscapes_categories`).

    Returns:
        The JSON path.

    Raises:
        FileNotFoundError: when no instanceIds file is found, or a photo is missing.
        ValueError: naming the file for unreadable PNGs, unknown label ids, size differences.
    """
    gtfine_dir, images_dir, out_dir = Path(gtfine_dir), Path(images_dir), Path(out_dir)
    gt_files = sorted((gtfine_dir / split).glob(f"*/*{_GT_SUFFIX}"))
    if not gt_files:
        raise FileNotFoundError(f"no */*{_GT_SUFFIX} files in {gtfine_dir / split}")
    base = f"cityscapes_panoptic_{split}{'_trainId' if use_train_id else ''}"
    png_dir = out_dir / base
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for gt_path in gt_files:
        image_id = gt_path.name[: -len(_GT_SUFFIX)]
        city = gt_path.parent.name
        photo_name = f"{image_id}_leftImg8bit.png"
        photo = images_dir / split / city / photo_name
        instance_ids = _read_instance_ids(gt_path)
        h, w = instance_ids.shape
        photo_size = image_size(photo)  # FileNotFoundError names the photo
        if photo_size != (h, w):
            raise ValueError(
                f"image {image_id!r}: photo {photo} is {photo_size[0]}x{photo_size[1]} but {gt_path} is {h}x{w}"
            )
        panoptic, segments = _convert_one(instance_ids, gt_path, use_train_id)
        png_name = f"{image_id}_gtFine_panoptic.png"
        write_id_png(png_dir / png_name, panoptic)
        images.append({"id": image_id, "width": w, "height": h, "file_name": photo_name})
        annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segments})
    json_path = out_dir / f"{base}.json"
    write_panoptic_json(json_path, images, annotations, cityscapes_categories(use_train_id))
    return json_path
