"""Decoding photos to uint8 RGB, whatever their mode, bit depth or EXIF orientation.

Conventions (chosen so that annotations and pretrained-network statistics line up):

- EXIF orientation is applied, so the array is the image as a viewer shows it (as detectron2's
  `read_image`). COCO annotations were drawn on the displayed image.
- Alpha is dropped, not composited: the colour channels are kept as stored, as PIL's
  ``convert("RGB")``, detectron2 and torchvision's ``decode_image(mode=RGB)`` do. Compositing onto
  a background would invent pixel values the annotator never saw.
- 16-bit images keep their high byte (``v >> 8``), which is what PIL itself does for 16-bit RGB
  PNGs, so 16-bit grey and 16-bit colour files come out on the same scale.
- Grey images are repeated into three channels; palette, CMYK, YCbCr, LAB, HSV go through PIL's
  conversion to RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb_uint8(im: Image.Image, path: Path) -> np.ndarray:
    """PIL image of any mode -> uint8[H, W, 3] RGB under the module's conventions."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[:, :, :3])
    if mode == "L":
        return _gray_to_rgb(np.array(im, dtype=np.uint8))
    if mode == "LA":
        return _gray_to_rgb(np.asarray(im, dtype=np.uint8)[:, :, 0])
    if mode == "1":
        return _gray_to_rgb(np.asarray(im.convert("L"), dtype=np.uint8))
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # PIL opens 16-bit grey PNGs as I;16 (older versions as I, a 32-bit container)
        values = np.asarray(im).astype(np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise ValueError(
                f"{path}: {mode} image with values outside 0..65535 "
                f"({values.min()}..{values.max()}); only 8- and 16-bit images are supported"
            )
        return _gray_to_rgb((values >> 8).astype(np.uint8))
    if mode in ("P", "PA"):
        # via RGBA so a palette's transparency entry does not trigger PIL's warning; alpha dropped
        return np.ascontiguousarray(np.asarray(im.convert("RGBA"), dtype=np.uint8)[:, :, :3])
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBa", "La"):
        return np.array(im.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"{path}: unsupported image mode {mode!r} (e.g. floating-point images)")


def read_image(path: str | Path) -> np.ndarray:
    """Read a photo as uint8[H, W, 3] RGB, EXIF orientation applied.

    See the module docstring for how grey, alpha, palette and 16-bit files are converted.

    Args:
        path: any format PIL reads (JPEG, PNG, BMP, TIFF, WebP, ...).

    Returns:
        uint8[H, W, 3] RGB array, H x W as displayed (after EXIF rotation).

    Raises:
        FileNotFoundError: naming the file when it does not exist.
        ValueError: naming the file when it is not an image, is truncated or corrupt, or has an
            unsupported mode. (Truncation goes unnoticed only if a program sets PIL's global
            ``ImageFile.LOAD_TRUNCATED_IMAGES``; unipan never does.)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so truncation raises here and not later inside numpy
            oriented = ImageOps.exif_transpose(im)
            return _to_rgb_uint8(oriented, path)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors; some PNG
        # corruption surfaces as SyntaxError from PIL's chunk parser
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as `read_image` would return it, from the header only.

    Raises:
        FileNotFoundError / ValueError: naming the file, as `read_image`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    # orientations 5-8 transpose the image (rotate by 90 degrees, possibly mirrored)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1 = upright, also when absent or unreadable)."""
    try:
        with Image.open(path) as im:
            return int(im.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError):
        return 1
