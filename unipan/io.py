"""COCO-panoptic files: id <-> RGB encoding, panoptic PNGs, JSON, atomic writes.

A panoptic PNG stores segment id ``R + 256 G + 256^2 B`` per pixel, exactly as panopticapi.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# io's file helpers live in the torch-free `unipan.files`; re-exported here, where they always were
from unipan.files import atomic_write as atomic_write
from unipan.files import atomic_write_bytes as atomic_write_bytes
from unipan.files import atomic_write_text as atomic_write_text
from unipan.files import load_json as load_json
from unipan.files import save_json as save_json
from unipan.files import torch_load_failure as torch_load_failure
from unipan.meta import VOID_ID, DatasetMeta, SegmentInfo

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported inside the functions that need it (segment statistics of predictions), so that
# reading and writing PNGs and JSON (`unipan pq`, `unipan viz`, `unipan data synth`) never loads it

try:  # imagecodecs wraps spng, the fastest PNG decoder reachable from PyPI here
    import imagecodecs

    _HAVE_IMAGECODECS = True
except ImportError:  # pragma: no cover - imagecodecs is a declared dependency
    _HAVE_IMAGECODECS = False


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] (or any int dtype) -> int32[H, W] segment ids (R + 256 G + 256^2 B)."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an H x W x 3 colour image, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int32, copy=False)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """int[H, W] segment ids -> uint8[H, W, 3] colour image (inverse of rgb2id)."""
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("segment ids must lie in [0, 256^3)")
    ids = ids.astype(np.uint32, copy=False)
    out = np.empty((*ids.shape, 3), dtype=np.uint8)
    out[..., 0] = ids & 255
    out[..., 1] = (ids >> 8) & 255
    out[..., 2] = (ids >> 16) & 255
    return out


def decode_png(data: bytes, path: str | os.PathLike[str] = "<bytes>") -> np.ndarray:
    """Decode PNG bytes to a numpy array (H x W or H x W x C, uint8 or uint16).

    Raises:
        ValueError: naming `path` when the data is not a readable PNG (truncated, corrupt).
    """
    try:
        if _HAVE_IMAGECODECS:
            return np.asarray(imagecodecs.png_decode(data))
        from PIL import Image  # pragma: no cover

        with Image.open(_bytes_io(data)) as im:  # pragma: no cover
            return np.asarray(im)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode PNG ({type(e).__name__}: {e})") from e


def _bytes_io(data: bytes) -> Any:  # pragma: no cover - only without imagecodecs
    import io

    return io.BytesIO(data)


def read_id_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a COCO-panoptic PNG -> int32[H, W] segment ids (0 = void).

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: naming the file when it is not an RGB(A) 8-bit PNG or cannot be decoded.
    """
    path = Path(path)
    data = path.read_bytes()
    arr = decode_png(data, path)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"{path}: a panoptic PNG must be 8-bit RGB, got shape {arr.shape} dtype {arr.dtype}")
    return rgb2id(arr)


def encode_id_png(ids: np.ndarray) -> bytes:
    """int[H, W] segment ids -> PNG bytes (RGB)."""
    rgb = id2rgb(ids)
    if _HAVE_IMAGECODECS:
        return bytes(imagecodecs.png_encode(rgb))
    import io  # pragma: no cover

    from PIL import Image  # pragma: no cover

    buf = io.BytesIO()  # pragma: no cover
    Image.fromarray(rgb).save(buf, format="PNG")  # pragma: no cover
    return buf.getvalue()  # pragma: no cover


def write_id_png(path: str | os.PathLike[str], ids: np.ndarray) -> None:
    """Write segment ids as a COCO-panoptic PNG, atomically."""
    atomic_write_bytes(path, encode_id_png(np.asarray(ids)))


# --- COCO-panoptic JSON ----------------------------------------------------------------------
MAX_SEGMENT_ID = 256**3 - 1
"""Largest id an RGB panoptic PNG can hold."""


@dataclass
class PanopticAnnotation:
    """One entry of a COCO-panoptic `annotations` list: an image's PNG and its segments.

    Attributes:
        image_id: the image's id as the JSON has it (int for COCO, str for Cityscapes).
        file_name: the panoptic PNG's name, relative to the panoptic folder.
        segments: the image's segments, crowd included, in JSON order.
    """

    image_id: str | int
    file_name: str
    segments: list[SegmentInfo]

    def to_coco_dict(self) -> dict[str, Any]:
        """The `annotations` entry as panopticapi writes and reads it."""
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "segments_info": [s.to_coco_dict() for s in self.segments],
        }


@dataclass
class PanopticJson:
    """A parsed, validated COCO-panoptic JSON file.

    Image ids are looked up by their string form, so ``142238`` and ``"142238"`` find the same
    image (COCO uses ints, Cityscapes strings); the loader rejects files where two ids collide
    that way. The lookups are built at construction: do not mutate the lists afterwards.

    Attributes:
        images: the `images` entries (dicts with at least `id` and `file_name`); empty for
            prediction files, which have none.
        annotations: one per annotated image, in file order.
        categories: the `categories` entries as in the file.
        meta: class information built from `categories`.
    """

    images: list[dict[str, Any]]
    annotations: list[PanopticAnnotation]
    categories: list[dict[str, Any]]
    meta: DatasetMeta
    _image_by_id: dict[str, dict[str, Any]] = field(init=False, repr=False, compare=False)
    _annotation_by_id: dict[str, PanopticAnnotation] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._image_by_id = {str(im["id"]): im for im in self.images}
        self._annotation_by_id = {str(a.image_id): a for a in self.annotations}

    def image(self, image_id: str | int) -> dict[str, Any]:
        """The `images` entry of `image_id` (KeyError naming the id when absent)."""
        try:
            return self._image_by_id[str(image_id)]
        except KeyError:
            raise KeyError(f"no images entry for image {image_id!r}") from None

    def annotation(self, image_id: str | int) -> PanopticAnnotation:
        """The annotation of `image_id` (KeyError naming the id when absent)."""
        try:
            return self._annotation_by_id[str(image_id)]
        except KeyError:
            raise KeyError(f"no annotation for image {image_id!r}") from None

    def has_image(self, image_id: str | int) -> bool:
        return str(image_id) in self._image_by_id

    def has_annotation(self, image_id: str | int) -> bool:
        return str(image_id) in self._annotation_by_id

    def to_coco_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "annotations": [a.to_coco_dict() for a in self.annotations],
            "categories": self.categories,
        }


def _as_int(value: Any, what: str) -> int:
    """Strict int conversion: accepts ints and integral floats, rejects bools, strings, 1.5."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if float(value) != int(value):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def segments_from_coco(
    segments_info: list[dict[str, Any]],
    meta: DatasetMeta,
    image_id: str | int,
) -> list[SegmentInfo]:
    """Parse and check one image's COCO `segments_info` list.

    `isthing` comes from `meta`; `iscrowd`, `area`, `bbox` default to 0 when absent (prediction
    files omit them) and an optional `score` is kept.

    Raises:
        ValueError: naming the image and segment for a missing or non-integer id, an id outside
            [1, 256^3), a duplicate id, an unknown category, a bad iscrowd/area/bbox.
    """
    if not isinstance(segments_info, list):
        kind = type(segments_info).__name__
        raise ValueError(f"image {image_id!r}: segments_info must be a list, got {kind}")
    out: list[SegmentInfo] = []
    seen: set[int] = set()
    for k, seg in enumerate(segments_info):
        where = f"image {image_id!r}, segments_info[{k}]"
        if not isinstance(seg, dict):
            raise ValueError(f"{where}: expected a dict, got {type(seg).__name__}")
        if "id" not in seg or "category_id" not in seg:
            raise ValueError(f"{where}: needs 'id' and 'category_id', has {sorted(seg)}")
        seg_id = _as_int(seg["id"], f"{where}: id")
        where = f"image {image_id!r}, segment {seg_id}"
        if seg_id == VOID_ID:
            raise ValueError(f"{where}: id 0 is reserved for void pixels")
        if not 0 < seg_id <= MAX_SEGMENT_ID:
            raise ValueError(f"{where}: id outside [1, 256^3) cannot be stored in a panoptic PNG")
        if seg_id in seen:
            raise ValueError(f"{where}: duplicate segment id")
        seen.add(seg_id)
        category_id = _as_int(seg["category_id"], f"{where}: category_id")
        if category_id not in meta:
            raise ValueError(f"{where}: unknown category {category_id} (not in the categories list)")
        iscrowd = _as_int(seg.get("iscrowd", 0), f"{where}: iscrowd")
        if iscrowd not in (0, 1):
            raise ValueError(f"{where}: iscrowd must be 0 or 1, got {iscrowd}")
        area = _as_int(seg.get("area", 0), f"{where}: area")
        if area < 0:
            raise ValueError(f"{where}: negative area {area}")
        bbox_raw = seg.get("bbox", (0, 0, 0, 0))
        if not isinstance(bbox_raw, list | tuple) or len(bbox_raw) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {bbox_raw!r}")
        try:
            bbox = tuple(round(float(v)) for v in bbox_raw)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: bbox must hold 4 numbers, got {bbox_raw!r}") from None
        score = float(seg.get("score", 1.0))
        out.append(
            SegmentInfo(
                id=seg_id,
                category_id=category_id,
                isthing=meta.isthing(category_id),
                iscrowd=bool(iscrowd),
                area=area,
                bbox=bbox,  # type: ignore[arg-type]
                score=score,
            )
        )
    return out


def load_panoptic_json(path: str | os.PathLike[str], meta: DatasetMeta | None = None) -> PanopticJson:  # noqa: C901
    """Read and validate a COCO-panoptic JSON (ground truth, or predictions with `meta`).

    Args:
        path: the JSON file.
        meta: class information to use when the file has no `categories` (prediction files);
            ignored when it has them.

    Raises:
        ValueError: naming the file (and image, segment) for any structural problem: not a
            dict, missing keys, duplicate image ids, an annotation whose image is not in
            `images`, duplicate segment ids, unknown categories, bad categories.
    """
    path = Path(path)
    d = load_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a COCO-panoptic JSON must be an object, got {type(d).__name__}")
    if "annotations" not in d or not isinstance(d["annotations"], list):
        raise ValueError(f"{path}: needs an 'annotations' list")
    categories = d.get("categories")
    if categories is None:
        if meta is None:
            raise ValueError(f"{path}: has no 'categories' list and no DatasetMeta was given")
        categories = meta.to_coco_categories()
    if not isinstance(categories, list) or not all(isinstance(c, dict) for c in categories):
        raise ValueError(f"{path}: 'categories' must be a list of objects")
    try:
        file_meta = DatasetMeta(categories, name=path.stem)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e

    images = d.get("images", [])
    if not isinstance(images, list):
        raise ValueError(f"{path}: 'images' must be a list")
    image_keys: set[str] = set()
    for k, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{path}: images[{k}] needs 'id' and 'file_name', got {im!r}"[:300])
        key = str(im["id"])
        if key in image_keys:
            raise ValueError(f"{path}: image id {im['id']!r} appears twice in 'images'")
        image_keys.add(key)

    annotations: list[PanopticAnnotation] = []
    ann_keys: set[str] = set()
    for k, ann in enumerate(d["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= set(ann):
            keys = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
            raise ValueError(f"{path}: annotations[{k}] needs image_id, file_name, segments_info; has {keys}")
        image_id = ann["image_id"]
        key = str(image_id)
        if key in ann_keys:
            raise ValueError(f"{path}: image {image_id!r} has two annotations")
        ann_keys.add(key)
        if images and key not in image_keys:
            raise ValueError(f"{path}: annotation of image {image_id!r} has no entry in 'images'")
        try:
            segments = segments_from_coco(ann["segments_info"], file_meta, image_id)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        annotations.append(PanopticAnnotation(image_id=image_id, file_name=str(ann["file_name"]), segments=segments))
    return PanopticJson(images=images, annotations=annotations, categories=categories, meta=file_meta)


def _json_default(obj: Any) -> Any:
    """Let numpy scalars and arrays through json.dumps (areas and ids often come from numpy)."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_panoptic_json(
    path: str | os.PathLike[str],
    images: list[dict[str, Any]],
    annotations: list[PanopticAnnotation] | list[dict[str, Any]],
    categories: list[dict[str, Any]],
    indent: int | None = None,
) -> None:
    """Write a COCO-panoptic JSON (`images`, `annotations`, `categories`) atomically."""
    anns = [a.to_coco_dict() if isinstance(a, PanopticAnnotation) else a for a in annotations]
    obj = {"images": images, "annotations": anns, "categories": categories}
    atomic_write_text(path, json.dumps(obj, indent=indent, default=_json_default))


def _id_tensor(ids: np.ndarray) -> Tensor:
    """An integer id map as a tensor for `unipan.segments` (int32 and int64 shared, else int64)."""
    import torch

    if ids.dtype not in (np.int32, np.int64):
        ids = ids.astype(np.int64)  # torch lacks most ops on unsigned maps (uint16/uint32 PNG ids)
    return torch.from_numpy(np.ascontiguousarray(ids))


def panoptic_segment_stats(ids: np.ndarray) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """Area and COCO bbox of every non-void segment of an id map (`unipan.segments.segment_stats`).

    Args:
        ids: int[H, W] segment ids.

    Returns:
        {segment id: (area in pixels, (x, y, w, h))}, in increasing id order; void (0) left out.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"expected an H x W id map, got shape {ids.shape}")
    import torch

    from unipan.segments import segment_stats

    id_map = _id_tensor(ids)
    present = [i for i in torch.unique(id_map).tolist() if i != VOID_ID]
    areas, bboxes = segment_stats(id_map, present)
    return {
        seg_id: (area, (bbox[0], bbox[1], bbox[2], bbox[3]))
        for seg_id, area, bbox in zip(present, areas.tolist(), bboxes.tolist(), strict=True)
    }


def write_panoptic_prediction(
    out_dir: str | os.PathLike[str],
    image_id: str | int,
    file_name: str,
    panoptic: np.ndarray | Tensor,
    segments: list[SegmentInfo],
) -> PanopticAnnotation:
    """Write one image's panoptic PNG atomically and return its annotation with area/bbox filled.

    Segments without pixels are dropped, because panopticapi rejects JSON segments missing from
    the PNG.

    Args:
        out_dir: the panoptic PNG folder.
        image_id: the image's id, as the ground-truth JSON has it.
        file_name: PNG name inside `out_dir`.
        panoptic: int[H, W] segment ids (numpy array or IntTensor), 0 = void.
        segments: one entry per id present in `panoptic` (extra entries are dropped).

    Raises:
        ValueError: naming the image and segments when ids of the map have no segment, or when
            segment ids repeat.
    """
    from torch import Tensor

    from unipan.segments import segment_stats

    ids = panoptic.detach().cpu().numpy() if isinstance(panoptic, Tensor) else np.asarray(panoptic)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"image {image_id!r}: panoptic must be an integer H x W map, got {ids.dtype} {ids.shape}")
    seg_ids = [s.id for s in segments]
    if len(set(seg_ids)) != len(seg_ids):
        dup = sorted({i for i in seg_ids if seg_ids.count(i) > 1})
        raise ValueError(f"image {image_id!r}: duplicate segment ids {dup}")
    listed = [s for s in segments if s.id != VOID_ID]  # a void entry owns no pixels: dropped
    try:
        areas, bboxes = segment_stats(_id_tensor(ids), [s.id for s in listed])
    except ValueError as e:
        raise ValueError(f"image {image_id!r}: {e}") from None
    kept = [
        SegmentInfo(
            id=s.id,
            category_id=s.category_id,
            isthing=s.isthing,
            iscrowd=s.iscrowd,
            area=area,
            bbox=(bbox[0], bbox[1], bbox[2], bbox[3]),
            score=s.score,
        )
        for s, area, bbox in zip(listed, areas.tolist(), bboxes.tolist(), strict=True)
        if area > 0
    ]
    write_id_png(Path(out_dir) / file_name, ids)
    return PanopticAnnotation(image_id=image_id, file_name=file_name, segments=kept)
