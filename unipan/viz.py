"""Pictures of panoptic segmentations: colour maps, overlays, ground truth | prediction pairs.

Colours come from the dataset's categories: a stuff segment takes its category colour; the
instances of a thing category take distinct shades of it (lighter and darker, in the order of
their segment ids, so a picture is the same every time it is drawn); crowd segments are hatched;
void is black. `unipan viz` draws every image of a COCO-panoptic folder.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from unipan.data.image import read_image
from unipan.io import atomic_write_bytes, load_panoptic_json, read_id_png
from unipan.meta import VOID_ID, DatasetMeta, SegmentInfo

if TYPE_CHECKING:  # `unipan viz` draws PNG folders without torch; tensors come only from callers that use it
    from torch import Tensor

    from unipan.structures import PanopticResult

BOUNDARY_COLOR = (255, 255, 255)
"""Colour of the one-pixel lines drawn where the segment id changes."""

_TITLE_HEIGHT = 16
_GAP = 4


def _ids_array(panoptic: np.ndarray | Tensor) -> np.ndarray:
    """int64[H, W] segment ids from a numpy array or tensor of any integer dtype."""
    # a tensor exists only if the caller imported torch: never import it here for a numpy map
    if not isinstance(panoptic, np.ndarray) and "torch" in sys.modules:
        import torch

        if isinstance(panoptic, torch.Tensor):
            panoptic = panoptic.detach().cpu().numpy()
    ids = np.asarray(panoptic)
    if ids.ndim != 2:
        raise ValueError(f"a panoptic id map must be H x W, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"a panoptic id map must hold integers, got dtype {ids.dtype}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"a panoptic id map must hold ids >= 0, found {int(ids.min())}")
    return ids.astype(np.int64, copy=False)


def _shade(color: tuple[int, int, int], k: int, n: int) -> tuple[int, int, int]:
    """Shade k of n of a colour: n distinct lightness levels around it (k = 0 is the darkest).

    One instance keeps the category colour itself. Lightness spans [0.25, 0.8] so that every shade
    stays distinct from black (void) and from white (boundaries); the hue turns a little from shade to
    shade so that very many instances still get distinct colours after rounding to 8 bits.
    """
    if n <= 1:
        return color
    hue, _, sat = colorsys.rgb_to_hls(*(c / 255.0 for c in color))
    lightness = 0.25 + 0.55 * k / (n - 1)
    hue = (hue + 0.015 * ((k % 5) - 2)) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, lightness, max(sat, 0.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def segment_colors(segments: Sequence[SegmentInfo], meta: DatasetMeta) -> dict[int, tuple[int, int, int]]:
    """Colour of each segment id: category colour for stuff and crowd, per-instance shades for things.

    Raises:
        ValueError: naming the segment whose category is unknown to `meta`.
    """
    colors: dict[int, tuple[int, int, int]] = {}
    instances: dict[int, list[int]] = {}
    for seg in segments:
        if seg.category_id not in meta:
            raise ValueError(f"segment {seg.id}: category id {seg.category_id} is not in {meta!r}")
        if meta.isthing(seg.category_id) and not seg.iscrowd:
            instances.setdefault(seg.category_id, []).append(seg.id)
        else:
            colors[seg.id] = meta.color(seg.category_id)
    for category_id, seg_ids in instances.items():
        ordered = sorted(seg_ids)
        for k, seg_id in enumerate(ordered):
            colors[seg_id] = _shade(meta.color(category_id), k, len(ordered))
    return colors


def colorize(panoptic: np.ndarray | Tensor, segments: Sequence[SegmentInfo], meta: DatasetMeta) -> np.ndarray:
    """Colour picture of a panoptic id map.

    Args:
        panoptic: int[H, W] (array or tensor) segment ids, 0 = void.
        segments: the segments of the map.
        meta: class information (category colours, thing/stuff).

    Returns:
        uint8[H, W, 3]: stuff in its category colour, each thing instance in its own shade of its
        category colour, crowd segments hatched in their category colour, void black.

    Raises:
        ValueError: when the map holds ids that no segment describes, or a category is unknown.
    """
    ids = _ids_array(panoptic)
    colors = segment_colors(segments, meta)
    present = np.unique(ids)
    missing = [int(v) for v in present if v != VOID_ID and int(v) not in colors]
    if missing:
        raise ValueError(f"panoptic ids {missing[:10]} have no segment info")
    values = [VOID_ID, *(int(v) for v in present if v != VOID_ID)]
    palette = np.array([(0, 0, 0)] + [colors[v] for v in values[1:]], dtype=np.uint8)
    compact = np.searchsorted(np.asarray(values), ids)  # values are sorted: VOID_ID is the smallest id
    out = palette[compact]
    crowd = [s.id for s in segments if s.iscrowd]
    if crowd:
        h, w = ids.shape
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = ((yy + xx) // 3) % 2 == 0
        hatch = np.isin(ids, crowd) & stripes
        out[hatch] = (out[hatch] // 2).astype(np.uint8)
    return out


def boundary_mask(panoptic: np.ndarray | Tensor) -> np.ndarray:
    """bool[H, W]: pixels whose right or lower neighbour has another segment id (1-pixel lines)."""
    ids = _ids_array(panoptic)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _label_anchor(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of `mask` farthest from its border: inside the segment even for a ring."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    dist = ndimage.distance_transform_edt(crop)
    cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x0 + cx - 1), int(y0 + cy - 1)


def _draw_labels(
    picture: np.ndarray,
    ids: np.ndarray,
    segments: Sequence[SegmentInfo],
    meta: DatasetMeta,
    show_scores: bool,
) -> np.ndarray:
    """Write each present segment's category name (and score) at its innermost pixel."""
    im = Image.fromarray(picture)
    draw = ImageDraw.Draw(im)
    font = _font()
    present = set(np.unique(ids).tolist())
    h, w = ids.shape
    for seg in segments:
        if seg.id not in present or seg.id == VOID_ID:
            continue
        text = meta.category(seg.category_id).name
        if seg.iscrowd:
            text += " (crowd)"
        if show_scores:
            text += f" {seg.score:.2f}"
        x, y = _label_anchor(ids == seg.id)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        # centred on the anchor, kept inside the picture
        tx = min(max(0, x - tw // 2), max(0, w - tw - 2))
        ty = min(max(0, y - th // 2), max(0, h - th - 2))
        draw.rectangle((tx - 1, ty - 1, tx + tw + 1, ty + th + 1), fill=(0, 0, 0))
        draw.text((tx - left, ty - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(im).copy()


def overlay(
    image: np.ndarray,
    panoptic: np.ndarray | Tensor,
    segments: Sequence[SegmentInfo],
    meta: DatasetMeta,
    alpha: float = 0.5,
    boundaries: bool = True,
    labels: bool = False,
    show_scores: bool | None = None,
) -> np.ndarray:
    """A panoptic segmentation laid over its image.

    Args:
        image: uint8[H, W, 3] RGB.
        panoptic: int[H, W] segment ids, 0 = void (void pixels show the image unchanged).
        segments: the segments of the map (ground truth, or a prediction with scores).
        meta: class information.
        alpha: weight of the segment colours (0 = image only, 1 = colours only).
        boundaries: draw 1-pixel lines in `BOUNDARY_COLOR` where the id changes.
        labels: write each segment's category name at its innermost pixel.
        show_scores: add the score to each label; None = when some segment's score is not 1
            (predictions; ground truth scores are all 1).

    Returns:
        uint8[H, W, 3].
    """
    ids = _ids_array(panoptic)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 H x W x 3, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != ids.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from panoptic size {ids.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    colors = colorize(ids, segments, meta).astype(np.float32)
    out = image.astype(np.float32)
    labelled = ids != VOID_ID
    out[labelled] = (1.0 - alpha) * out[labelled] + alpha * colors[labelled]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if boundaries:
        out[boundary_mask(ids)] = BOUNDARY_COLOR
    if labels:
        if show_scores is None:
            show_scores = any(s.score != 1.0 for s in segments)
        out = _draw_labels(out, ids, segments, meta, show_scores)
    return out


def overlay_result(image: np.ndarray, result: PanopticResult, meta: DatasetMeta, **kwargs: Any) -> np.ndarray:
    """`overlay` of a `PanopticResult` over its image (same keyword arguments)."""
    return overlay(image, result.panoptic, result.segments, meta, **kwargs)


def side_by_side(
    left: np.ndarray, right: np.ndarray, titles: tuple[str, str] | None = ("ground truth", "prediction")
) -> np.ndarray:
    """Two pictures next to each other, with a title strip above each.

    Args:
        left, right: uint8[H, W, 3] pictures (heights may differ; the shorter one is padded).
        titles: text above each picture, or None for no title strip.

    Returns:
        uint8[T + max(Hl, Hr), Wl + 4 + Wr, 3] with T = 16 when titles are given, else 0; the gap
        and the padding are dark grey.
    """
    for name, pic in (("left", left), ("right", right)):
        if pic.ndim != 3 or pic.shape[2] != 3 or pic.dtype != np.uint8:
            raise ValueError(f"{name} picture must be uint8 H x W x 3, got shape {pic.shape} dtype {pic.dtype}")
    top = _TITLE_HEIGHT if titles is not None else 0
    h = max(left.shape[0], right.shape[0])
    wl, wr = left.shape[1], right.shape[1]
    out = np.full((top + h, wl + _GAP + wr, 3), 40, dtype=np.uint8)
    out[top : top + left.shape[0], :wl] = left
    out[top : top + right.shape[0], wl + _GAP :] = right
    if titles is not None:
        im = Image.fromarray(out)
        draw = ImageDraw.Draw(im)
        font = _font()
        for text, x0, width in ((titles[0], 0, wl), (titles[1], wl + _GAP, wr)):
            left_px, top_px, right_px, bottom_px = draw.textbbox((0, 0), text, font=font)
            tx = x0 + max(0, (width - (right_px - left_px)) // 2)
            ty = max(0, (_TITLE_HEIGHT - (bottom_px - top_px)) // 2)
            draw.text((tx - left_px, ty - top_px), text, fill=(235, 235, 235), font=font)
        out = np.asarray(im).copy()
    return out


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write a uint8[H, W, 3] (or [H, W]) picture as PNG, atomically."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"{path}: a picture must be uint8 H x W (x 3), got shape {image.shape} dtype {image.dtype}")
    try:
        import imagecodecs

        data = bytes(imagecodecs.png_encode(image))
    except ImportError:  # pragma: no cover - imagecodecs is a declared dependency
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        data = buf.getvalue()
    atomic_write_bytes(path, data)


# --- folders -------------------------------------------------------------------------------------
def visualize_folder(
    images_dir: str | os.PathLike[str],
    panoptic_dir: str | os.PathLike[str],
    json_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    pred_dir: str | os.PathLike[str] | None = None,
    pred_json: str | os.PathLike[str] | None = None,
    max_images: int | None = None,
    labels: bool = False,
) -> list[Path]:
    """Draw the images of a COCO-panoptic folder: GT overlay, or GT | prediction side by side.

    Args:
        images_dir: folder of the images (file names from the JSON's `images`).
        panoptic_dir: folder of the ground-truth panoptic PNGs.
        json_path: ground-truth COCO-panoptic JSON (its `categories` give names and colours).
        out_dir: where the pictures go, one `<image file stem>.png` per image.
        pred_dir, pred_json: a prediction in COCO-panoptic format (PNG folder and JSON); both or
            neither. Predictions are matched to images by id (``139`` and ``"139"`` match) and
            drawn with the ground truth's categories.
        max_images: draw at most this many images (in JSON order); None = all.
        labels: write category names (and prediction scores, when the JSON has them).

    Returns:
        The paths written, in JSON order.

    Raises:
        ValueError: naming the file or image when an input is missing, malformed or mismatched.
        FileNotFoundError: when an image or PNG named by a JSON is missing.
    """
    if (pred_dir is None) != (pred_json is None):
        raise ValueError("give both pred_dir and pred_json, or neither")
    if max_images is not None and max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    gt = load_panoptic_json(json_path)
    meta = gt.meta
    pred = None if pred_json is None else load_panoptic_json(pred_json, meta=meta)
    if pred is not None and pred.meta != meta:
        raise ValueError(f"{pred_json}: its categories differ from those of {json_path}")
    written: list[Path] = []
    for ann in gt.annotations:
        if max_images is not None and len(written) >= max_images:
            break
        if not gt.has_image(ann.image_id):
            raise ValueError(f"{json_path}: image {ann.image_id!r} has an annotation but no 'images' entry")
        image_file = gt.image(ann.image_id)["file_name"]
        image = read_image(Path(images_dir) / image_file)
        gt_ids = read_id_png(Path(panoptic_dir) / ann.file_name)
        where = f"{json_path}, image {ann.image_id!r}"
        if gt_ids.shape != image.shape[:2]:
            raise ValueError(f"{where}: image {image.shape[:2]} and panoptic PNG {gt_ids.shape} differ in size")
        try:
            picture = overlay(image, gt_ids, ann.segments, meta, labels=labels)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if pred is not None:
            if not pred.has_annotation(ann.image_id):
                raise ValueError(f"{pred_json}: no prediction for image {ann.image_id!r}")
            pred_ann = pred.annotation(ann.image_id)
            pred_ids = read_id_png(Path(pred_dir) / pred_ann.file_name)  # type: ignore[arg-type]
            pred_where = f"{pred_json}, image {ann.image_id!r}"
            if pred_ids.shape != image.shape[:2]:
                raise ValueError(
                    f"{pred_where}: prediction PNG {pred_ids.shape} and image {image.shape[:2]} differ in size"
                )
            try:
                pred_picture = overlay(image, pred_ids, pred_ann.segments, meta, labels=labels)
            except ValueError as e:
                raise ValueError(f"{pred_where}: {e}") from e
            picture = side_by_side(picture, pred_picture)
        out_path = Path(out_dir) / f"{Path(image_file).stem}.png"
        save_png(out_path, picture)
        written.append(out_path)
    return written


def add_viz_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `unipan viz`."""
    parser.add_argument("--images", required=True, help="folder of the images")
    parser.add_argument("--panoptic", required=True, help="folder of the ground-truth panoptic PNGs")
    parser.add_argument("--json", required=True, help="ground-truth COCO-panoptic JSON")
    parser.add_argument("--out", required=True, help="folder for the pictures")
    parser.add_argument("--pred-dir", default=None, help="folder of predicted panoptic PNGs (with --pred-json)")
    parser.add_argument("--pred-json", default=None, help="predicted COCO-panoptic JSON (with --pred-dir)")
    parser.add_argument("--max-images", type=int, default=None, help="draw at most this many images")
    parser.add_argument("--labels", action="store_true", help="write category names on the segments")


def viz_main(args: argparse.Namespace) -> int:
    """`unipan viz`: draw a COCO-panoptic folder; prints where the pictures went; returns the exit code."""
    try:
        paths = visualize_folder(
            args.images,
            args.panoptic,
            args.json,
            args.out,
            pred_dir=args.pred_dir,
            pred_json=args.pred_json,
            max_images=args.max_images,
            labels=args.labels,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"unipan viz: {e}", file=sys.stderr)
        return 2
    kind = "ground truth | prediction pairs" if args.pred_dir else "ground-truth overlays"
    print(f"wrote {len(paths)} {kind} to {args.out}")
    return 0
