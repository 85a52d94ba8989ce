"""Run a panoptic model on user images: resize in, result back at the original size.

Models never resize their inputs (DESIGN.md); they take a padded `Batch` and return one
`PanopticResult` per image at that image's network input size. `Predictor` does the rest, with
the same test-time pipeline as evaluation (`unipan.data.transforms.build_transforms(cfg.data,
is_train=False)`: shortest edge to `min_size_test`, longest at most `max_size_test`, then
normalisation with `pixel_mean` / `pixel_std`), zero padding to `size_divisibility` as `collate`
does, and `resize_result` to map the id map back by nearest neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unipan.config import Config, config_from_dict
from unipan.data.transforms import build_transforms
from unipan.fusion.heuristic import segment_stats
from unipan.structures import Batch, DatasetMeta, PanopticResult, SegmentInfo

__all__ = ["ImageInput", "Predictor", "crop_result", "resize_result"]

ImageInput = np.ndarray | str | os.PathLike[str]
"""uint8[H, W, 3] RGB array, or the path of an image file."""


def _nearest_source_index(out_len: int, in_len: int) -> Tensor:
    """Source index of each output position, sampling at pixel centres (PIL / "nearest-exact").

    The data pipeline resizes id maps on the same half-pixel grid, so a result mapped back lands
    on the pixels the image came from.
    """
    centres = (torch.arange(out_len, dtype=torch.float64) + 0.5) * (in_len / out_len)
    return centres.floor().long().clamp_(0, in_len - 1)


def _with_stats(result: PanopticResult, panoptic: Tensor) -> PanopticResult:
    """`result` with a new id map; segments that vanished are dropped, area/bbox recomputed."""
    areas, bboxes = segment_stats(panoptic, [s.id for s in result.segments])
    segments = [
        SegmentInfo(
            id=s.id,
            category_id=s.category_id,
            isthing=s.isthing,
            iscrowd=s.iscrowd,
            area=int(area),
            bbox=(int(b[0]), int(b[1]), int(b[2]), int(b[3])),
            score=s.score,
        )
        for s, area, b in zip(result.segments, areas.tolist(), bboxes.tolist(), strict=True)
        if area > 0
    ]
    return PanopticResult(panoptic=panoptic, segments=segments, image_id=result.image_id, raw=result.raw)


def resize_result(result: PanopticResult, size: tuple[int, int]) -> PanopticResult:
    """Resize a panoptic result to `size` = (H, W) by nearest neighbour on the id map.

    Pixels sample the source at their centres (``nearest-exact``), ids are copied exactly (no
    float round trip). Segments with no pixel left are dropped; `area` and `bbox` of the rest are
    recomputed. `raw` is kept as it is (at the network input size).

    Args:
        result: the result at its current size; every non-zero id of its map must be listed in
            its segments.
        size: output (H, W), both >= 1.

    Returns:
        A new PanopticResult with panoptic IntTensor[H, W].

    Raises:
        ValueError: for a bad size, or ids of the map without a segment.
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"image {result.image_id!r}: cannot resize a result to {size}")
    panoptic = result.panoptic
    if panoptic.dim() != 2:
        raise ValueError(
            f"image {result.image_id!r}: panoptic must be IntTensor[H, W], got {tuple(panoptic.shape)}"
        )
    h, w = panoptic.shape
    if (h, w) != (out_h, out_w):
        if h == 0 or w == 0:
            raise ValueError(f"image {result.image_id!r}: cannot resize an empty {h} x {w} result")
        rows = _nearest_source_index(out_h, h).to(panoptic.device)
        cols = _nearest_source_index(out_w, w).to(panoptic.device)
        panoptic = panoptic.index_select(0, rows).index_select(1, cols)
    try:
        return _with_stats(result, panoptic)
    except ValueError as e:
        raise ValueError(f"image {result.image_id!r}: {e}") from None


def crop_result(result: PanopticResult, size: tuple[int, int]) -> PanopticResult:
    """The top-left (h, w) of a result (drops batch padding); segments re-counted as in `resize_result`."""
    h, w = int(size[0]), int(size[1])
    try:
        return _with_stats(result, result.panoptic[:h, :w].contiguous())
    except ValueError as e:
        raise ValueError(f"image {result.image_id!r}: {e}") from None


def _load_image(image: ImageInput, where: str) -> np.ndarray:
    """uint8[H, W, 3] RGB from an array or a file; errors name the image."""
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(Path(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"{where}: expected a uint8 H x W x 3 RGB array or an image path, got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected an H x W x 3 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: expected a uint8 array (0..255), got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{where}: empty image of shape {image.shape}")
    return image


def _read_image_file(path: Path) -> np.ndarray:
    from unipan.data.image import read_image

    return read_image(path)


class Predictor:
    """Wraps a model for user images of any size.

    Args:
        model: `model(batch)` in eval mode returns one PanopticResult per image at its input size
            (`batch.image_sizes[i]`; a result at the padded batch size is cropped).
        meta: the dataset classes the model predicts (category ids of the results).
        cfg: the resolved config; `cfg.data` gives the test-time resize, normalisation and size
            divisibility.
        device: where the model runs; results come back on the CPU.
    """

    def __init__(
        self, model: nn.Module, meta: DatasetMeta, cfg: Config, device: str | torch.device = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.cfg = cfg
        self.transform = build_transforms(cfg.data, is_train=False)
        self.size_divisibility = int(cfg.data.size_divisibility)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        overrides: list[str] | None = None,
    ) -> Predictor:
        """Build the model of a checkpoint from the config and classes stored in it.

        Args:
            path: a checkpoint with keys "config" (the resolved config as a dict), "meta" (the
                COCO `categories` list) and "model" (state dict).
            device: where the model runs.
            overrides: dotted `key=value` config overrides applied to the stored config (e.g.
                `data.min_size_test=640`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: naming the file when it cannot be read, lacks a key, or its weights do
                not fit the model its config builds.
        """
        from omegaconf import OmegaConf

        from unipan.modeling.registry import build_model

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
        missing = [k for k in ("config", "meta", "model") if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {path} lacks {missing} (needs 'config', 'meta' and 'model')")
        try:
            stored = OmegaConf.create(ckpt["config"])
            if overrides:
                stored = OmegaConf.merge(stored, OmegaConf.from_dotlist(list(overrides)))
            cfg = config_from_dict(OmegaConf.to_container(stored))  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - omegaconf raises several types for one cause
            raise ValueError(f"checkpoint {path}: bad stored config or overrides {overrides}: {e}") from e
        meta = DatasetMeta(ckpt["meta"], name=path.stem)
        model = build_model(cfg, meta)
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path}: weights do not fit model {cfg.model.name!r}: {e}") from e
        return cls(model, meta, cfg, device=device)

    # --- single images ----------------------------------------------------------------------------
    def __call__(self, image: ImageInput, image_id: str = "") -> PanopticResult:
        """Panoptic result of one image at its original size.

        Args:
            image: uint8[H, W, 3] RGB array, or an image path (EXIF orientation applied).
            image_id: stored in the result (default: the file stem for paths, else "").

        Returns:
            PanopticResult with panoptic IntTensor[H, W] on the CPU.
        """
        if not image_id and isinstance(image, (str, os.PathLike)):
            image_id = Path(image).stem
        return next(self.predict_many([(image, image_id)], batch_size=1))

    # --- many images --------------------------------------------------------------------------------
    def predict_many(
        self, images: Iterable[ImageInput | tuple[ImageInput, str]], batch_size: int = 1
    ) -> Iterator[PanopticResult]:
        """Results of many images, in order, running `batch_size` images per forward pass.

        Args:
            images: arrays or paths, or (image, image_id) pairs. Ids default to the file stem for
                paths and to the position in `images` for arrays.
            batch_size: images per batch (padded to the largest, then to size_divisibility).

        Yields:
            One PanopticResult per image at its original size, on the CPU.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[tuple[np.ndarray, str]] = []
        for index, item in enumerate(images):
            image, image_id = item if isinstance(item, tuple) else (item, "")
            if not image_id:
                image_id = Path(image).stem if isinstance(image, (str, os.PathLike)) else str(index)
            pending.append((_load_image(image, f"image {image_id!r}"), image_id))
            if len(pending) == batch_size:
                yield from self._run(pending)
                pending = []
        if pending:
            yield from self._run(pending)

    def _prepare(self, image: np.ndarray) -> Tensor:
        """uint8[H, W, 3] -> normalised FloatTensor[3, h, w] at the network input size."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        prepared, _ = self.transform(tensor, None)
        return prepared

    def _batch(self, items: list[tuple[np.ndarray, str]]) -> Batch:
        tensors = [self._prepare(image) for image, _ in items]
        sizes = [(int(t.shape[1]), int(t.shape[2])) for t in tensors]
        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        div = self.size_divisibility
        if div > 0:
            max_h, max_w = -(-max_h // div) * div, -(-max_w // div) * div
        # zero is the pixel mean after normalisation, what `collate` pads training batches with
        images = torch.zeros((len(items), 3, max_h, max_w), dtype=torch.float32)
        for i, t in enumerate(tensors):
            images[i, :, : t.shape[1], : t.shape[2]] = t
        return Batch(
            images=images,
            image_sizes=sizes,
            image_ids=[image_id for _, image_id in items],
            targets=None,
            original_sizes=[(int(image.shape[0]), int(image.shape[1])) for image, _ in items],
        )

    def _run(self, items: list[tuple[np.ndarray, str]]) -> list[PanopticResult]:
        batch = self._batch(items).to(self.device)
        with torch.inference_mode():
            results = self.model(batch)
        if not isinstance(results, (list, tuple)) or len(results) != len(batch):
            got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
            raise ValueError(f"model returned {got} for a batch of {len(batch)} images {batch.image_ids}")
        padded = (int(batch.images.shape[2]), int(batch.images.shape[3]))
        out = []
        for result, image_id, input_size, original_size in zip(
            results, batch.image_ids, batch.image_sizes, batch.original_sizes, strict=True
        ):
            if not isinstance(result, PanopticResult):
                raise TypeError(
                    f"image {image_id!r}: model returned {type(result).__name__}, not a PanopticResult"
                )
            cpu = PanopticResult(
                panoptic=result.panoptic.cpu(),
                segments=result.segments,
                image_id=result.image_id or image_id,
                raw=result.raw,
            )
            size = cpu.image_size
            if size == padded and size != input_size:
                cpu = crop_result(cpu, input_size)
            elif size != input_size:
                raise ValueError(
                    f"image {image_id!r}: model returned a {size[0]} x {size[1]} result, expected its "
                    f"input size {input_size[0]} x {input_size[1]} (or the padded batch size "
                    f"{padded[0]} x {padded[1]})"
                )
            out.append(resize_result(cpu, original_size))
        return out
