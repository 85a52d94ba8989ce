"""Synthetic panoptic data: textured stuff regions and shaded shapes, deterministic from a seed.

The embedded default dataset of the demo, the tests and the benchmarks. Every image is a pure
function of (seed, split, index, options), so any DataLoader worker or process can make any image,
and different splits never share an image.

What an image holds:

- stuff (2-4 classes per image): large amorphous regions (the argmax of smooth random fields with a
  per-class vertical prior, so sky tends to be above and road below) filled with a texture that
  tells the class: sky = smooth vertical gradient with clouds, grass = green vertical streaky
  noise, water = wavy horizontal stripes, wall = bricks with mortar, road = grey speckle.
- things (5 shape classes: disc, square, triangle, ring, star): several instances at scales from
  under 32^2 pixels to over 96^2 (at 256 x 256), colours drawn from one palette shared by all
  classes (colour does not tell the class, the shape does), shaded with a dark outline, placed
  free, overlapping (occlusion: later instances lie on top) or touching an instance of their own
  class.
- optionally a crowd segment (a cluster of tiny shapes of one class, `iscrowd=1`), a void border
  band and void pixels along the outlines of things.

On disk it is a COCO-panoptic folder (`write_synthetic_dataset`), so it goes through the same
loader as real data; `SyntheticPanoptic` gives the same images in memory.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unipan.io import atomic_write_bytes, load_json, save_json, write_id_png
from unipan.meta import VOID_ID, DatasetMeta, SegmentInfo

if TYPE_CHECKING:
    from unipan.data.common import Transform
    from unipan.structures import Sample

# The generator and the writer (`unipan data synth`) are numpy only, so that writing a dataset does
# not pay for importing torch; `SyntheticPanoptic.__getitem__` imports the torch side when called.

# Things first, then stuff, as COCO lists them; ids are non-contiguous on purpose (1..5 and
# 101..105) so that code mixing dataset ids with contiguous indices fails on this data.
SYNTH_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 130, 255], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [255, 200, 0], "supercategory": "shape"},
    {"id": 4, "name": "ring", "isthing": 1, "color": [170, 60, 255], "supercategory": "shape"},
    {"id": 5, "name": "star", "isthing": 1, "color": [255, 110, 20], "supercategory": "shape"},
    {"id": 101, "name": "sky", "isthing": 0, "color": [135, 190, 235], "supercategory": "background"},
    {"id": 102, "name": "grass", "isthing": 0, "color": [70, 160, 60], "supercategory": "background"},
    {"id": 103, "name": "water", "isthing": 0, "color": [30, 80, 150], "supercategory": "background"},
    {"id": 104, "name": "wall", "isthing": 0, "color": [160, 80, 60], "supercategory": "background"},
    {"id": 105, "name": "road", "isthing": 0, "color": [110, 110, 115], "supercategory": "background"},
]

SYNTH_VERSION = 1
"""Version of the generator's drawing code, written into each dataset's JSON `info`. Bump it when
the same (seed, split, index, options) would draw a different image, so that cached copies on disk
can be told apart from fresh ones."""

_STUFF_KINDS: list[str] = [c["name"] for c in SYNTH_CATEGORIES if not c["isthing"]]

# One palette for every thing class. Saturated or extreme colours, away from the stuff colours'
# typical values, so that things stand out from the background while colour says nothing about
# the shape.
_THING_PALETTE = np.array(
    [
        [230, 45, 45],  # red
        [250, 150, 25],  # orange
        [245, 225, 50],  # yellow
        [215, 55, 205],  # magenta
        [125, 65, 215],  # violet
        [245, 245, 245],  # white
        [28, 28, 34],  # black
        [50, 225, 225],  # cyan
        [255, 140, 180],  # pink
    ],
    dtype=np.float32,
)

# Vertical prior of each stuff kind on the layout field: positive = prefers the top of the image.
_STUFF_VERTICAL_PRIOR = {"sky": 1.4, "grass": -0.4, "water": -0.7, "wall": 0.2, "road": -1.0}

# Shapes whose details (points, holes) vanish below this extent, in pixels.
_SHAPE_MIN_EXTENT = {"ring": 16.0, "star": 16.0}


@dataclass
class SynthOptions:
    """Difficulty knobs of the synthetic generator. Every image depends on all of them."""

    # image size (height, width) in pixels; 128 x 128 for tests, 256 x 256 for the demo
    size: tuple[int, int] = (128, 128)
    # thing instances tried per image, drawn uniformly from [min_instances, max_instances]; fewer
    # are placed when a crowded image has no room left
    min_instances: int = 2
    max_instances: int = 6
    # probability that an instance is placed overlapping an earlier one (it lies on top)
    occlusion: float = 0.3
    # probability that an instance is placed touching an earlier instance of its own class
    touching: float = 0.2
    # fraction of its own area an instance must keep visible after occlusion and image-border
    # truncation; placements that break this are re-drawn
    min_visible: float = 0.45
    # smallest and largest thing extent (circumscribed diameter): min in pixels, max as a fraction
    # of the image's short side; extents are drawn log-uniformly in between
    min_thing_size: float = 14.0
    max_thing_frac: float = 0.6
    # probability that an image's first thing is drawn from the top of the size range (extent at
    # least 0.45 of the short side), so that large objects (COCO: area >= 96^2 at 256 x 256) occur;
    # log-uniform sizes alone make them rare, as small shapes fit where large ones do not
    large_prob: float = 0.35
    # stuff classes per image, drawn uniformly from [min_stuff, max_stuff]
    min_stuff: int = 2
    max_stuff: int = 4
    # smallest share of the image a stuff class must cover before things are placed (smaller ones
    # are merged into their neighbours)
    min_stuff_frac: float = 0.06
    # strength of the stuff texture patterns (1 = default; 0 = flat colours, so that only colour
    # tells the stuff classes apart)
    texture: float = 1.0
    # per-image jitter of each stuff class's base colour (0..255 scale, uniform +-); larger values
    # make colour a weaker cue, so that texture has to tell the stuff classes apart
    stuff_color_jitter: float = 15.0
    # standard deviation of the per-pixel noise (uniform) added to the whole image (0..255 scale)
    noise: float = 4.0
    # probability that an image has a crowd segment (a cluster of tiny shapes of one class)
    crowd_prob: float = 0.1
    # width in pixels of a void band (id 0, painted dark) around the image border; 0 = none
    void_border: int = 0
    # probability that an image has its things' one-pixel outlines marked void (as COCO's
    # unlabelled object borders)
    void_outline: float = 0.0

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        problems: list[str] = []
        if len(self.size) != 2 or min(self.size) < 32:
            problems.append(f"size must be (H, W) with both sides >= 32, got {self.size}")
        if not 0 <= self.min_instances <= self.max_instances:
            problems.append(f"need 0 <= min_instances <= max_instances, got {self.min_instances}, {self.max_instances}")
        if not 1 <= self.min_stuff <= self.max_stuff <= len(_STUFF_KINDS):
            problems.append(
                f"need 1 <= min_stuff <= max_stuff <= {len(_STUFF_KINDS)}, got {self.min_stuff}, {self.max_stuff}"
            )
        for name in ("occlusion", "touching", "crowd_prob", "void_outline", "min_visible", "large_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {v}")
        if not 0.0 <= self.min_stuff_frac < 0.5:
            problems.append(f"min_stuff_frac must lie in [0, 0.5), got {self.min_stuff_frac}")
        if self.min_thing_size < 6:
            problems.append(f"min_thing_size must be >= 6 pixels, got {self.min_thing_size}")
        if not 0.0 < self.max_thing_frac <= 1.0:
            problems.append(f"max_thing_frac must lie in (0, 1], got {self.max_thing_frac}")
        elif self.max_thing_frac * min(self.size) < self.min_thing_size:
            problems.append(
                f"max_thing_frac * short side ({self.max_thing_frac * min(self.size):.1f} px) is below "
                f"min_thing_size ({self.min_thing_size} px)"
            )
        if min(self.noise, self.texture, self.stuff_color_jitter) < 0:
            problems.append(
                f"noise, texture and stuff_color_jitter must be >= 0, got {self.noise}, {self.texture}, "
                f"{self.stuff_color_jitter}"
            )
        if not 0 <= 2 * self.void_border < min(self.size) - 16:
            problems.append(f"void_border {self.void_border} leaves no image inside for size {self.size}")
        if problems:
            raise ValueError("bad SynthOptions: " + "; ".join(problems))


@dataclass
class SynthInstance:
    """How one thing (or the crowd cluster) was drawn; kept for tests and debugging.

    Attributes:
        segment_id: its id in the panoptic map.
        category_id: dataset category id.
        shape: shape name, or "crowd" for the crowd segment (whose members are drawn with their
            category's shape).
        center: (x, y) in pixels (the cluster centre for a crowd).
        extent: circumscribed diameter in pixels (the cluster diameter for a crowd).
        amodal_area: pixels of the whole shape, before occlusion and image-border truncation.
        iscrowd: whether this is the crowd segment.
        placement: "free", "occluding" (laid over an earlier instance), "touching" (beside an
            earlier instance of its class) or "crowd".
        occludes: segment ids of the earlier instances (or crowd) it covers pixels of.
    """

    segment_id: int
    category_id: int
    shape: str
    center: tuple[float, float]
    extent: float
    amodal_area: int
    iscrowd: bool = False
    placement: str = "free"
    occludes: list[int] = field(default_factory=list)


@dataclass
class SynthScene:
    """One generated image with its ground truth.

    Attributes:
        image: uint8[H, W, 3] RGB.
        panoptic: int32[H, W] segment ids, 0 = void.
        segments: one per id in `panoptic` (area and bbox exact), stuff first, then things in
            drawing order (later ones on top).
        instances: how each thing and the crowd were drawn, in drawing order.
    """

    image: np.ndarray
    panoptic: np.ndarray
    segments: list[SegmentInfo]
    instances: list[SynthInstance] = field(default_factory=list)


def synth_meta() -> DatasetMeta:
    """The class information of the synthetic dataset (5 things, 5 stuff)."""
    return DatasetMeta(SYNTH_CATEGORIES, name="synthetic")


def image_seed_sequence(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The random stream of one image: a function of (seed, split, index) only.

    The split enters through a stable hash (crc32, not Python's salted `hash`), so "train" and "val"
    images differ for the same seed and index, on every machine and in every process.
    """
    if index < 0:
        raise ValueError(f"image index must be >= 0, got {index}")
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(split.encode("utf-8")), int(index)])


# --- smooth random fields ----------------------------------------------------------------------
def _resize_linear(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """float32[k, gh, gw] grid nodes spanning the image -> float32[k, h, w] by linear interpolation.

    Separable: along x on the small grid (a gather), then along y one node interval at a time
    (contiguous slices, broadcasting). No matrix products: BLAS threads stall when other processes
    share the cores.
    """
    k, gh, gw = grid.shape
    x = (np.arange(w, dtype=np.float32) + 0.5) * np.float32((gw - 1) / w)
    lx = np.minimum(x.astype(np.int64), gw - 2)
    fx = x - lx
    rows = grid[:, :, lx] * (1 - fx) + grid[:, :, lx + 1] * fx  # k, gh, w
    y = (np.arange(h, dtype=np.float32) + 0.5) * np.float32((gh - 1) / h)
    ly = np.minimum(y.astype(np.int64), gh - 2)
    fy = (y - ly)[:, None]
    out = np.empty((k, h, w), dtype=np.float32)
    starts = np.searchsorted(ly, np.arange(gh - 1))
    stops = np.searchsorted(ly, np.arange(gh - 1), side="right")
    for g in range(gh - 1):
        a, b = int(starts[g]), int(stops[g])
        if a < b:
            out[:, a:b] = rows[:, g, None, :] * (1 - fy[a:b]) + rows[:, g + 1, None, :] * fy[a:b]
    return out


def _smooth_field(
    rng: np.random.Generator, k: int, h: int, w: int, octaves: tuple[tuple[int, float], ...]
) -> np.ndarray:
    """float32[k, h, w]: sums of linearly upsampled Gaussian grids (cells per side, amplitude).

    The octaves are summed at a quarter of the resolution and upsampled once: the finest octave
    still spans several low-resolution pixels per cell, and it is the full-resolution work that
    costs.
    """
    hs, ws = max(2, -(-h // 4)), max(2, -(-w // 4))
    low = np.zeros((k, hs, ws), dtype=np.float32)
    for cells, amplitude in octaves:
        gh = max(2, round(cells * h / max(h, w)) + 1)
        gw = max(2, round(cells * w / max(h, w)) + 1)
        grid = rng.standard_normal((k, gh, gw), dtype=np.float32) * np.float32(amplitude)
        low += _resize_linear(grid, hs, ws)
    return _resize_linear(low, h, w)


# --- stuff textures ------------------------------------------------------------------------------
# Each returns float32[h, w, 3] on the 0..255 scale; `amp` scales the pattern's contrast and `jitter`
# is the per-image spread (+-) of its base colour.
def _jitter(rng: np.random.Generator, base: tuple[float, float, float], spread: float) -> np.ndarray:
    return np.asarray(base, dtype=np.float32) + rng.uniform(-spread, spread, 3).astype(np.float32)


def _texture_sky(rng: np.random.Generator, h: int, w: int, amp: float, jitter: float) -> np.ndarray:
    # blue most of the time, overcast grey-blue otherwise; always smooth
    top = _jitter(rng, (70, 125, 205) if rng.random() < 0.7 else (125, 140, 165), jitter)
    bottom = np.clip(top + np.array([70, 55, 30], dtype=np.float32), 0, 255)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = top * (1 - t) + bottom * t + np.zeros((1, w, 1), dtype=np.float32)
    clouds = np.clip(_smooth_field(rng, 1, h, w, ((4, 1.0), (9, 0.5)))[0] - 0.3, 0, None)
    return img + (amp * 45.0) * clouds[..., None]


def _texture_grass(rng: np.random.Generator, h: int, w: int, amp: float, jitter: float) -> np.ndarray:
    base = _jitter(rng, (65, 140, 50), jitter)
    noise = rng.standard_normal((h + 3, w), dtype=np.float32)
    # averaging a few rows turns white noise into short vertical blades
    blades = (noise[:-3] + noise[1:-2] + noise[2:-1] + noise[3:]) * 0.5
    patches = _smooth_field(rng, 1, h, w, ((6, 1.0),))[0]
    return (
        base
        + (amp * blades)[..., None] * np.array([10, 26, 9], dtype=np.float32)
        + (amp * patches)[..., None] * np.array([8, 14, 4], dtype=np.float32)
    )


def _texture_water(rng: np.random.Generator, h: int, w: int, amp: float, jitter: float) -> np.ndarray:
    base = _jitter(rng, (30, 85, 140), jitter)
    period = rng.uniform(5.0, 9.0)
    wobble = rng.uniform(1.0, 3.0)
    x_period = rng.uniform(18.0, 40.0)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    phase = 2 * np.pi * (y + wobble * np.sin(2 * np.pi * x / x_period + rng.uniform(0, 6.3))) / period
    wave = np.sin(phase + rng.uniform(0, 6.3)).astype(np.float32)
    crest = np.clip(wave - 0.75, 0, None) * 4.0  # bright thin crests on top of the stripes
    return base + (amp * wave)[..., None] * np.array([10, 20, 26], dtype=np.float32) + (amp * 35.0 * crest)[..., None]


def _texture_wall(rng: np.random.Generator, h: int, w: int, amp: float, jitter: float) -> np.ndarray:
    base = _jitter(rng, (160, 75, 55), jitter)
    mortar = _jitter(rng, (190, 185, 175), 2 * jitter / 3)
    brick_h = int(rng.integers(7, 11))
    brick_w = int(rng.integers(14, 22))
    y = np.arange(h)[:, None] + int(rng.integers(0, brick_h))
    x = np.arange(w)[None, :] + int(rng.integers(0, brick_w))
    row = y // brick_h
    x_shifted = x + (row % 2) * (brick_w // 2)  # stretcher bond: every other row offset by half
    col = x_shifted // brick_w
    brick_tint = rng.normal(0, 12, (int(row.max()) + 1, int(col.max()) + 1)).astype(np.float32)
    img = base + (amp * brick_tint[row, col])[..., None] + (5 * amp) * rng.standard_normal((h, w, 1), dtype=np.float32)
    is_mortar = (y % brick_h == 0) | (x_shifted % brick_w == 0)
    mortar_mix = min(1.0, amp)
    img[is_mortar] = img[is_mortar] * (1 - mortar_mix) + mortar * mortar_mix
    return img


def _texture_road(rng: np.random.Generator, h: int, w: int, amp: float, jitter: float) -> np.ndarray:
    grey = 107.0 + rng.uniform(-jitter, jitter)
    base = np.array([grey, grey, grey + 4], dtype=np.float32)
    speckle = rng.standard_normal((h, w), dtype=np.float32) * 14.0
    u = rng.random((h, w), dtype=np.float32)
    speckle += np.where(u < 0.03, 55.0, 0.0) + np.where(u > 0.97, -45.0, 0.0)  # grit
    return base + (amp * speckle)[..., None]


_TEXTURES = {
    "sky": _texture_sky,
    "grass": _texture_grass,
    "water": _texture_water,
    "wall": _texture_wall,
    "road": _texture_road,
}


# --- shapes --------------------------------------------------------------------------------------
@dataclass
class _Shape:
    shape: str
    cx: float
    cy: float
    radius: float  # circumscribed radius
    angle: float
    inner: float  # ring hole / star valley radius as a fraction of `radius`
    aspect: float  # square: width / height


def _random_shape(rng: np.random.Generator, shape: str, cx: float, cy: float, extent: float) -> _Shape:
    extent = max(extent, _SHAPE_MIN_EXTENT.get(shape, 0.0))
    inner = {"ring": rng.uniform(0.45, 0.65), "star": rng.uniform(0.42, 0.55)}.get(shape, 0.0)
    aspect = float(np.exp(rng.uniform(-0.25, 0.25))) if shape == "square" else 1.0
    return _Shape(shape, cx, cy, extent / 2.0, float(rng.uniform(0, 2 * np.pi)), float(inner), aspect)


def _rasterize(s: _Shape) -> tuple[int, int, np.ndarray]:
    """The shape's pixels on its own (unclipped) bounding grid.

    Returns:
        (y0, x0, mask): mask is bool[h, w] whose [0, 0] pixel is image pixel (y0, x0); it may
        extend past the image, which `_clip` handles. Pixel (y, x) is inside when its centre
        (x + 0.5, y + 0.5) is.
    """
    r = s.radius
    x0, x1 = math.floor(s.cx - r), math.ceil(s.cx + r)
    y0, y1 = math.floor(s.cy - r), math.ceil(s.cy + r)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - s.cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - s.cy)[:, None]
    if s.shape in ("disc", "ring"):
        d2 = dx * dx + dy * dy
        mask = d2 <= r * r
        if s.shape == "ring":
            mask &= d2 >= (s.inner * r) ** 2
        return y0, x0, mask
    c, sn = math.cos(s.angle), math.sin(s.angle)
    u = dx * c + dy * sn  # coordinates in the shape's rotated frame
    v = -dx * sn + dy * c
    if s.shape == "square":
        half = r / math.sqrt(2.0)
        hw, hh = half * math.sqrt(s.aspect), half / math.sqrt(s.aspect)
        scale = min(1.0, r / math.hypot(hw, hh))  # keep the corners within the circumscribed circle
        return y0, x0, (np.abs(u) <= hw * scale) & (np.abs(v) <= hh * scale)
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    if s.shape == "triangle":
        # regular n-gon: inside when the distance along the nearest edge normal is within the apothem
        n = 3
        sector = 2 * np.pi / n
        alpha = np.mod(phi, sector) - sector / 2
        return y0, x0, rho * np.cos(alpha) <= r * math.cos(np.pi / n)
    if s.shape == "star":
        # fold the angle into [0, 36 deg]; the edge runs from the tip (r, 0) to the valley
        # (inner * r, 36 deg); inside when on the centre's side of that edge
        n = 5
        sector = 2 * np.pi / n
        a = np.mod(phi, sector)
        beta = np.minimum(a, sector - a)
        px, py = rho * np.cos(beta), rho * np.sin(beta)
        qx, qy = s.inner * r * math.cos(sector / 2), s.inner * r * math.sin(sector / 2)
        ex, ey = qx - r, qy
        cross = ex * py - ey * (px - r)
        return y0, x0, cross >= 0  # the centre (0, 0) gives cross = ey * r > 0
    raise ValueError(f"unknown shape {s.shape!r}")


def _clip(y0: int, x0: int, mask: np.ndarray, h: int, w: int) -> tuple[int, int, np.ndarray]:
    """Cut a bounding-grid mask to the image; the result may be empty."""
    mh, mw = mask.shape
    cy0, cx0 = max(0, -y0), max(0, -x0)
    cy1, cx1 = min(mh, h - y0), min(mw, w - x0)
    if cy1 <= cy0 or cx1 <= cx0:
        return max(y0, 0), max(x0, 0), np.zeros((0, 0), dtype=bool)
    return y0 + cy0, x0 + cx0, mask[cy0:cy1, cx0:cx1]


def _inner_outline(mask: np.ndarray) -> np.ndarray:
    """bool[h, w]: pixels of `mask` with a 4-neighbour outside it (or outside the grid)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _paint_thing(
    rng: np.random.Generator,
    img: np.ndarray,
    y0: int,
    x0: int,
    mask: np.ndarray,
    s: _Shape,
    color: np.ndarray,
) -> None:
    """Paint a clipped shape mask: base colour, a linear shading ramp, noise, dark outline."""
    h, w = mask.shape
    light = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(15, 35)
    xs = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5 - s.cx)[None, :]
    ys = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5 - s.cy)[:, None]
    ramp = (xs * math.cos(light) + ys * math.sin(light)) / max(s.radius, 1.0)
    patch = color + (strength * ramp)[..., None] + 5.0 * rng.standard_normal((h, w, 3), dtype=np.float32)
    outline = _inner_outline(mask)
    patch[outline] *= 0.5
    region = img[y0 : y0 + h, x0 : x0 + w]
    region[mask] = patch[mask]


# --- the generator -------------------------------------------------------------------------------
@dataclass
class _Placed:
    info: SynthInstance
    shape: _Shape
    color_index: int
    occludes: list[int] = field(default_factory=list)  # drawing-order indices


def _distinct_ids(rng: np.random.Generator, n: int) -> list[int]:
    """N distinct random segment ids in [1, 256^3), like COCO's colour-derived ids (all 3 channels)."""
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        for v in rng.integers(1, 256**3, size=n - len(ids)).tolist():
            if v not in seen:
                seen.add(v)
                ids.append(v)
    return ids


def _argmax0(stack: np.ndarray, rows: list[int]) -> np.ndarray:
    """int64[H, W]: position in `rows` of the largest of stack[rows] per pixel (first on ties).

    A running comparison: several times faster than np.argmax over a leading axis of a few rows.
    """
    best = stack[rows[0]].copy()
    label = np.zeros(best.shape, dtype=np.int64)
    for j, row in enumerate(rows[1:], start=1):
        better = stack[row] > best
        np.copyto(best, stack[row], where=better)
        label[better] = j
    return label


def _stuff_layout(rng: np.random.Generator, opts: SynthOptions) -> tuple[list[int], np.ndarray]:
    """Choose the image's stuff kinds and split the image among them.

    Returns:
        (kinds, label): kinds are stuff positions in `_STUFF_KINDS`; label is int64[H, W] indexing
        `kinds`.
    """
    h, w = opts.size
    n_stuff = int(rng.integers(opts.min_stuff, opts.max_stuff + 1))
    kinds = sorted(rng.choice(len(_STUFF_KINDS), size=n_stuff, replace=False).tolist())
    fieldk = _smooth_field(rng, n_stuff, h, w, ((2, 1.0), (5, 0.45), (11, 0.15)))
    ramp = np.linspace(1.0, -1.0, h, dtype=np.float32)[:, None]  # +1 at the top row
    for j, kind in enumerate(kinds):
        fieldk[j] += _STUFF_VERTICAL_PRIOR[_STUFF_KINDS[kind]] * ramp
    active = list(range(n_stuff))
    while True:
        label = _argmax0(fieldk, active)
        share = np.bincount(label.ravel(), minlength=len(active)) / float(h * w)
        smallest = int(np.argmin(share))
        if len(active) == 1 or share[smallest] >= opts.min_stuff_frac:
            break
        del active[smallest]  # too small to learn from: its neighbours take its pixels
    return [kinds[j] for j in active], label


def generate_scene(  # noqa: C901 - one scene in order: layout, place, occlude, compose
    seed: int, index: int, opts: SynthOptions | None = None, split: str = "train"
) -> SynthScene:
    """Generate one image, its panoptic ground truth and how each thing was drawn.

    Deterministic in (seed, split, index, opts) and independent of any other image.

    Args:
        seed: dataset seed.
        index: image index within the split (>= 0).
        opts: difficulty knobs; defaults to `SynthOptions()`.
        split: split name; different splits give different images.
    """
    opts = opts or SynthOptions()
    rng = np.random.default_rng(image_seed_sequence(seed, split, index))
    h, w = opts.size
    amp = opts.texture

    # stuff: layout, then one texture per present kind
    kinds, stuff_label = _stuff_layout(rng, opts)
    img = np.empty((h, w, 3), dtype=np.float32)
    for j, kind in enumerate(kinds):
        name = _STUFF_KINDS[kind]
        region = stuff_label == j
        np.copyto(img, _TEXTURES[name](rng, h, w, amp, opts.stuff_color_jitter), where=region[..., None])

    # things: `owner` holds the drawing-order index of the instance on top of each pixel (-1 none)
    owner = np.full((h, w), -1, dtype=np.int32)
    placed: list[_Placed] = []
    visible: list[int] = []
    thing_cats = [c for c in SYNTH_CATEGORIES if c["isthing"]]
    short = min(h, w)
    max_extent = opts.max_thing_frac * short

    def try_place(
        s: _Shape, must_touch: int | None, must_overlap: int | None
    ) -> tuple[int, int, np.ndarray, int] | None:
        """(y0, x0, clipped mask, amodal area) if the shape fits the visibility rules, else None."""
        gy0, gx0, grid = _rasterize(s)
        amodal = int(grid.sum())
        y0, x0, mask = _clip(gy0, gx0, grid, h, w)
        area = int(mask.sum())
        if area == 0 or area < opts.min_visible * amodal:
            return None
        under = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask]
        covered = np.bincount(under + 1, minlength=len(placed) + 1)[1:]
        for k, lost in enumerate(covered.tolist()):
            if lost and visible[k] - lost < opts.min_visible * placed[k].info.amodal_area:
                return None
        if must_overlap is not None and covered[must_overlap] == 0:
            return None
        if must_overlap is None and must_touch is None and covered.sum() > 0:
            return None  # a free placement keeps clear of everything drawn so far
        if must_touch is not None and covered[must_touch] == 0:
            # no overlap: accept only if some pixel of the neighbour lies 4-adjacent to the mask
            ring = _inner_outline(~np.pad(mask, 1, constant_values=False))
            ys, xs = np.nonzero(ring)
            ys, xs = ys + y0 - 1, xs + x0 - 1
            inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
            if not np.any(owner[ys[inside], xs[inside]] == must_touch):
                return None
        return y0, x0, mask, amodal

    def commit(
        s: _Shape,
        cat: dict[str, Any],
        y0: int,
        x0: int,
        mask: np.ndarray,
        placement: str,
        color_index: int,
        amodal: int,
        iscrowd: bool = False,
    ) -> None:
        region = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
        under = region[mask]
        occludes = []
        for k, lost in enumerate(np.bincount(under + 1, minlength=len(placed) + 1)[1:].tolist()):
            visible[k] -= lost
            if lost:
                occludes.append(k)
        region[mask] = len(placed)
        info = SynthInstance(0, int(cat["id"]), s.shape, (s.cx, s.cy), 2 * s.radius, amodal, iscrowd, placement)
        placed.append(_Placed(info, s, color_index, occludes))
        visible.append(int(mask.sum()))

    # the crowd goes first so that instances may lie over it
    if rng.random() < opts.crowd_prob:
        cat = thing_cats[int(rng.integers(len(thing_cats)))]
        ccx, ccy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
        spread = 4.0 + rng.uniform(0.04, 0.07) * short  # std of member positions: a dense cluster
        crowd = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(9, 17))):
            member = _random_shape(
                rng, cat["name"], ccx + rng.normal(0, spread), ccy + rng.normal(0, spread), rng.uniform(6, 11)
            )
            member.radius = min(member.radius, 5.5)  # crowd members stay tiny, rings and stars too
            gy0, gx0, grid = _rasterize(member)
            y0, x0, mask = _clip(gy0, gx0, grid, h, w)
            if mask.size == 0 or not mask.any():
                continue
            ci = int(rng.integers(len(_THING_PALETTE)))
            _paint_thing(rng, img, y0, x0, mask, member, _THING_PALETTE[ci] + rng.uniform(-15, 15, 3))
            crowd[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] |= mask
        if crowd.any():
            ys, xs = np.nonzero(crowd)
            y0, x0 = int(ys.min()), int(xs.min())
            box = crowd[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1]
            s = _Shape("crowd", ccx, ccy, spread * 2, 0.0, 0.0, 1.0)
            commit(s, cat, y0, x0, box, "crowd", -1, int(box.sum()), iscrowd=True)

    def propose(mode: str, cat: dict[str, Any], extent: float, anchor: _Placed | None) -> _Shape:
        """A shape of `cat` at a random position that suits the placement mode."""
        if anchor is None:
            # centres keep a margin of 0.3 extent (up to a third of the image) from the borders:
            # truncated shapes still occur, large ones still fit
            mx, my = min(0.3 * extent, w / 3), min(0.3 * extent, h / 3)
            return _random_shape(rng, cat["name"], rng.uniform(mx, w - mx), rng.uniform(my, h - my), extent)
        if mode == "touching":
            # centre distance at which two shapes of this kind just meet, roughly: their mean radii
            reach = {"disc": 0.97, "ring": 0.97, "square": 0.85, "triangle": 0.7, "star": 0.72}[cat["name"]]
            dist = reach * (anchor.shape.radius + extent / 2) * rng.uniform(0.88, 1.0)
        else:
            dist = (anchor.shape.radius + extent / 2) * rng.uniform(0.35, 0.8)
        theta = rng.uniform(0, 2 * np.pi)
        cx = anchor.shape.cx + dist * math.cos(theta)
        cy = anchor.shape.cy + dist * math.sin(theta)
        return _random_shape(rng, cat["name"], cx, cy, extent)

    n_target = int(rng.integers(opts.min_instances, opts.max_instances + 1))
    n_things = 0
    for _attempt in range(4 * n_target):
        if n_things >= n_target:
            break
        singles = [k for k, p in enumerate(placed) if not p.info.iscrowd]
        roll = rng.random()
        mode = "free"
        if singles and roll < opts.touching:
            mode = "touching"
        elif singles and roll < opts.touching + opts.occlusion:
            mode = "occluding"
        anchor = None if mode == "free" else singles[int(rng.integers(len(singles)))]
        if mode == "touching":
            cat = next(c for c in thing_cats if c["id"] == placed[anchor].info.category_id)  # type: ignore[index]
            extent = placed[anchor].info.extent * rng.uniform(0.75, 1.25)  # type: ignore[index]
            extent = float(np.clip(extent, opts.min_thing_size, max_extent))
        else:
            cat = thing_cats[int(rng.integers(len(thing_cats)))]
            extent = float(np.exp(rng.uniform(math.log(opts.min_thing_size), math.log(max_extent))))
            if not placed and rng.random() < opts.large_prob:
                extent = float(rng.uniform(min(0.45 * short, max_extent), max_extent))
        # the same class and size at several positions: redrawing the size after a failure would
        # favour small shapes, which fit more often
        for _position in range(4):
            s = propose(mode, cat, extent, None if anchor is None else placed[anchor])
            fit = try_place(s, anchor if mode == "touching" else None, anchor if mode == "occluding" else None)
            if fit is not None:
                break
        if fit is None:
            continue
        y0, x0, mask, amodal = fit
        ci = int(rng.integers(len(_THING_PALETTE)))
        if mode == "touching" and ci == placed[anchor].color_index:  # type: ignore[index]
            # a touching twin gets another colour, so the seam between them can be seen
            ci = (ci + 1 + int(rng.integers(len(_THING_PALETTE) - 1))) % len(_THING_PALETTE)
        color = _THING_PALETTE[ci] + rng.uniform(-15, 15, 3).astype(np.float32)
        _paint_thing(rng, img, y0, x0, mask, s, color)
        commit(s, cat, y0, x0, mask, mode, ci, amodal)
        n_things += 1

    # `compact` numbers the segments 1..K (stuff, then things in drawing order), 0 = void; ids are
    # assigned at the end through a lookup table
    n_segments = len(kinds) + len(placed)
    compact = (stuff_label + 1).astype(np.int32)
    on_top = owner >= 0
    compact[on_top] = len(kinds) + 1 + owner[on_top]

    if opts.void_outline > 0 and rng.random() < opts.void_outline and placed:
        # void where a thing meets anything else, as in COCO's unlabelled object borders
        padded = np.pad(owner, 1, mode="edge")
        centre = padded[1:-1, 1:-1]
        edge = (
            (centre != padded[:-2, 1:-1])
            | (centre != padded[2:, 1:-1])
            | (centre != padded[1:-1, :-2])
            | (centre != padded[1:-1, 2:])
        )
        compact[edge & on_top] = VOID_ID

    if opts.noise > 0:
        # uniform noise of the requested standard deviation: a third of the cost of Gaussian draws,
        # and the network cannot tell the difference at this amplitude
        half_width = np.float32(opts.noise * math.sqrt(3.0))
        img += (2 * half_width) * rng.random(img.shape, dtype=np.float32) - half_width
    if opts.void_border > 0:
        b = opts.void_border
        frame = np.ones((h, w), dtype=bool)
        frame[b:-b, b:-b] = False
        compact[frame] = VOID_ID
        img[frame] = rng.uniform(15, 40) + 3.0 * rng.standard_normal((int(frame.sum()), 3), dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    ids = _distinct_ids(rng, n_segments)
    panoptic = np.asarray([VOID_ID, *ids], dtype=np.int32)[compact]
    category_ids = [_stuff_category_id(kind) for kind in kinds] + [p.info.category_id for p in placed]
    crowd_flags = [False] * len(kinds) + [p.info.iscrowd for p in placed]
    for p, sid in zip(placed, ids[len(kinds) :], strict=True):
        p.info.segment_id = sid
    for p in placed:
        p.info.occludes = [placed[k].info.segment_id for k in p.occludes]
    areas, bboxes = _label_stats(compact, n_segments + 1)
    segments: list[SegmentInfo] = []
    for k, (area, (bx, by, bw, bh)) in enumerate(zip(areas[1:].tolist(), bboxes[1:].tolist(), strict=True)):
        if area == 0:
            continue  # every pixel of it was covered or voided
        segments.append(
            SegmentInfo(
                id=ids[k],
                category_id=category_ids[k],
                isthing=k >= len(kinds),
                iscrowd=crowd_flags[k],
                area=area,
                bbox=(bx, by, bw, bh),
            )
        )
    return SynthScene(image=image, panoptic=panoptic, segments=segments, instances=[p.info for p in placed])


def _label_stats(labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel count and COCO bbox of every label of a label map (numpy `unipan.segments.label_stats`).

    Args:
        labels: int[H, W] with values in 0..bins-1.
        bins: number of labels.

    Returns:
        areas int64[bins] and bboxes int64[bins, 4] as (x, y, w, h), x + w one past the last
        column; zeros for labels without pixels.
    """
    h, w = labels.shape
    flat = labels.astype(np.int64).reshape(-1)
    areas = np.bincount(flat, minlength=bins)
    # which rows and which columns each label touches: bincounts of (label, row) and (label, column)
    rows = np.bincount(flat * h + np.repeat(np.arange(h), w), minlength=bins * h).reshape(bins, h) > 0
    cols = np.bincount(flat * w + np.tile(np.arange(w), h), minlength=bins * w).reshape(bins, w) > 0
    y0 = rows.argmax(axis=1)
    y1 = h - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - cols[:, ::-1].argmax(axis=1)
    bboxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).astype(np.int64)
    bboxes[areas == 0] = 0
    return areas, bboxes


def _stuff_category_id(kind: int) -> int:
    name = _STUFF_KINDS[kind]
    return int(next(c["id"] for c in SYNTH_CATEGORIES if c["name"] == name))


def generate_image(
    seed: int, index: int, opts: SynthOptions | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo]]:
    """One synthetic image and its ground truth.

    Args:
        seed: dataset seed.
        index: image index within the split (>= 0).
        opts: difficulty knobs; defaults to `SynthOptions()`.
        split: split name; different splits give different images.

    Returns:
        (image, panoptic, segments): image uint8[H, W, 3] RGB; panoptic int32[H, W] segment ids
        (0 = void); segments with `area`, `bbox` and `iscrowd` exact for the map. Deterministic
        in (seed, split, index, opts).
    """
    scene = generate_scene(seed, index, opts, split)
    return scene.image, scene.panoptic, scene.segments


def image_name(index: int) -> str:
    """File stem of image `index` on disk, zero-padded like COCO's.

    The image id, in memory and in the JSON, is the index itself: `str(index)` in memory, as the
    COCO-panoptic loader gives it.
    """
    return f"{index:06d}"


class SyntheticPanoptic:
    """The synthetic dataset in memory: image i is generated when asked for (optionally cached).

    Safe with DataLoader workers: an item depends on (seed, split, i, opts) only. A map-style
    dataset (`__len__` and `__getitem__`, all a DataLoader needs); not a subclass of torch's
    `Dataset`, so that this module, and with it `unipan data synth`, never imports torch.
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        opts: SynthOptions | None = None,
        transform: Transform | None = None,
        split: str = "train",
        cache: bool = False,
    ) -> None:
        """Make the dataset.

        Args:
            n: number of images.
            seed: dataset seed.
            opts: difficulty knobs; defaults to `SynthOptions()`.
            transform: applied to (image, panoptic) before the target is built.
            split: split name; different splits give different images.
            cache: keep generated (image, panoptic, segments) in memory (per process).
        """
        if n < 0:
            raise ValueError(f"number of images must be >= 0, got {n}")
        self.n = n
        self.seed = seed
        self.opts = opts or SynthOptions()
        self.transform = transform
        self.split = split
        self.meta: DatasetMeta = synth_meta()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, list[SegmentInfo]]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo], str]:
        """(image uint8[H, W, 3], panoptic int32[H, W], segments, image id str(i)) of image i."""
        if not -self.n <= i < self.n:
            raise IndexError(f"synthetic {self.split} set has {self.n} images, asked for index {i}")
        i %= self.n
        if self._cache is not None and i in self._cache:
            image, panoptic, segments = self._cache[i]
        else:
            image, panoptic, segments = generate_image(self.seed, i, self.opts, self.split)
            if self._cache is not None:
                self._cache[i] = (image, panoptic, segments)
        return image, panoptic, [SegmentInfo(**vars(s)) for s in segments], str(i)

    def original_panoptic(self, i: int) -> tuple[np.ndarray, list[SegmentInfo]]:
        """Image i's id map and segments, untransformed (`unipan.data.common.HasOriginalPanoptic`)."""
        _, panoptic, segments, _ = self.load_raw(i)
        return panoptic, segments

    def __getitem__(self, i: int) -> Sample:
        from unipan.data.common import make_sample  # torch: only when a Sample is asked for

        image, panoptic, segments, image_id = self.load_raw(i)
        return make_sample(image, panoptic, segments, self.meta, image_id, self.transform)


def _encode_rgb_png(image: np.ndarray) -> bytes:
    """uint8[H, W, 3] -> PNG bytes (lossless)."""
    try:
        import imagecodecs

        return bytes(imagecodecs.png_encode(image))
    except ImportError:  # pragma: no cover - imagecodecs is a declared dependency
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()


def write_synthetic_dataset(
    out: str | Path, n: int, seed: int = 0, opts: SynthOptions | None = None, split: str = "train"
) -> Path:
    """Write `n` synthetic images of one split as a COCO-panoptic folder.

    Layout: `out/<split>/images/<name>.png` (lossless RGB), `out/<split>/panoptic/<name>.png`
    (RGB-encoded ids) and `out/<split>/panoptic.json` (images, annotations, categories), where
    name = `image_name(index)` and the JSON image id is the index. Every file is written atomically
    and the JSON last, so a folder with a JSON is complete.

    Returns:
        The path of the JSON file.
    """
    opts = opts or SynthOptions()
    if n < 0:
        raise ValueError(f"number of images must be >= 0, got {n}")
    root = Path(out) / split
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(n):
        image, panoptic, segments = generate_image(seed, index, opts, split)
        name = image_name(index)
        atomic_write_bytes(root / "images" / f"{name}.png", _encode_rgb_png(image))
        write_id_png(root / "panoptic" / f"{name}.png", panoptic)
        images.append({"id": index, "file_name": f"{name}.png", "height": opts.size[0], "width": opts.size[1]})
        annotations.append(
            {
                "image_id": index,
                "file_name": f"{name}.png",
                "segments_info": [s.to_coco_dict() for s in segments],
            }
        )
    doc = {
        "info": {
            "description": "unipan synthetic panoptic dataset",
            "generator_version": SYNTH_VERSION,
            "seed": seed,
            "split": split,
            "options": {f.name: getattr(opts, f.name) for f in fields(opts)},
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in SYNTH_CATEGORIES],
    }
    json_path = root / "panoptic.json"
    save_json(json_path, doc)
    return json_path


# --- command line --------------------------------------------------------------------------------
_KNOB_HELP = {
    "min_instances": "fewest thing instances tried per image",
    "max_instances": "most thing instances tried per image",
    "occlusion": "probability that an instance overlaps an earlier one",
    "touching": "probability that an instance touches an earlier one of its class",
    "min_visible": "fraction of an instance that must stay visible",
    "min_thing_size": "smallest thing extent in pixels",
    "max_thing_frac": "largest thing extent as a fraction of the short side",
    "large_prob": "probability that an image's first thing is drawn large",
    "min_stuff": "fewest stuff classes per image",
    "max_stuff": "most stuff classes per image",
    "min_stuff_frac": "smallest image share of a stuff class",
    "texture": "strength of the stuff texture patterns (1 = default, 0 = flat)",
    "stuff_color_jitter": "per-image jitter of the stuff base colours (0..255 scale)",
    "noise": "std of the per-pixel noise (0..255 scale)",
    "crowd_prob": "probability of a crowd segment per image",
    "void_border": "width of the void border band in pixels (0 = none)",
    "void_outline": "probability that an image's thing outlines are void",
}


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `unipan data synth`: --n --size H W --seed --out --split and the knobs."""
    defaults = SynthOptions()
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=list(defaults.size),
        help="image height and width (default 128 128; the demo uses 256 256)",
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--out", type=str, default="data/synthetic", help="output folder")
    parser.add_argument("--split", type=str, default="train", help="split name: folder and seed (default train)")
    for f in fields(SynthOptions):
        if f.name == "size":
            continue
        value = getattr(defaults, f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(value),
            default=value,
            help=f"{_KNOB_HELP[f.name]} (default {value})",
        )


def options_from_args(args: argparse.Namespace) -> SynthOptions:
    """The SynthOptions named by parsed `add_synth_arguments` arguments."""
    knobs = {f.name: getattr(args, f.name) for f in fields(SynthOptions) if f.name != "size"}
    return SynthOptions(size=(args.size[0], args.size[1]), **knobs)


def synth_main(args: argparse.Namespace) -> int:
    """`unipan data synth`: write the dataset, print where and a summary; returns the exit code."""
    try:
        opts = options_from_args(args)
        if args.n < 0:
            raise ValueError(f"--n must be >= 0, got {args.n}")
    except ValueError as e:
        print(f"unipan data synth: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    json_path = write_synthetic_dataset(args.out, args.n, args.seed, opts, args.split)
    elapsed = time.perf_counter() - start
    meta = synth_meta()
    per_class: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    crowd = void_images = 0
    doc = load_json(json_path)
    h, w = opts.size
    for ann in doc["annotations"]:
        covered = 0
        for s in ann["segments_info"]:
            covered += s["area"]
            per_class[meta.category(s["category_id"]).name] += 1
            if s["iscrowd"]:
                crowd += 1
            elif meta.isthing(s["category_id"]):
                sizes[size_class(s["area"])] += 1
        void_images += covered < h * w
    print(f"wrote {args.n} {opts.size[0]}x{opts.size[1]} images to {json_path.parent} in {elapsed:.1f} s")
    print(f"  json: {json_path}")
    print("  segments per class: " + ", ".join(f"{c.name} {per_class[c.name]}" for c in meta.categories))
    print(
        f"  thing sizes: small {sizes['small']}, medium {sizes['medium']}, large {sizes['large']}; "
        f"crowd segments {crowd}; images with void pixels {void_images}"
    )
    return 0


def size_class(area: int) -> str:
    """COCO's object size class of an area in pixels: small < 32^2 <= medium < 96^2 <= large."""
    return "small" if area < 32**2 else "medium" if area < 96**2 else "large"


def main(argv: list[str] | None = None) -> int:
    """`python -m unipan.data.synthetic ...` (the same as `unipan data synth ...`)."""
    parser = argparse.ArgumentParser(prog="unipan data synth", description=__doc__.splitlines()[0])
    add_synth_arguments(parser)
    return synth_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
