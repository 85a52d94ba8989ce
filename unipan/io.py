"""COCO-panoptic files: id <-> RGB encoding, panoptic PNGs, JSON, atomic writes.

A panoptic PNG stores segment id ``R + 256 G + 256^2 B`` per pixel, exactly as panopticapi.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:  # the fastest PNG decoder reachable from PyPI here (see NOTES: 2.2 ms per 480x640 image)
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
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
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

        with Image.open(_BytesIO(data)) as im:  # pragma: no cover
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - every decoder error means the same to the user
        raise ValueError(f"{path}: cannot decode PNG ({type(e).__name__}: {e})") from e


def _BytesIO(data: bytes) -> Any:  # pragma: no cover - only without imagecodecs
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
        raise ValueError(
            f"{path}: a panoptic PNG must be 8-bit RGB, got shape {arr.shape} dtype {arr.dtype}"
        )
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


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`.

    A reader never sees a half-written file, and a kill mid-write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a parse error names the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def save_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))
