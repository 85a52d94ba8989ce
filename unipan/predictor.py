"""Run a panoptic model on user images: resize in, result back at the original size.

Models never resize their inputs (the size they are given is the size they predict at); they take
a padded `Batch` and return one `PanopticResult` per image at that image's network input size.
`Predictor` does the rest, with the same test-time pipeline as evaluation
(`unipan.data.transforms.build_transforms(cfg.data, is_train=False)`: shortest edge to
`min_size_test`, longest at most `max_size_test`, then normalisation with `pixel_mean` /
`pixel_std`), zero padding to `size_divisibility` as `collate` does, and
`unipan.segments.resize_result` to map the id map back by nearest neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from unipan.config import Config
from unipan.data.transforms import build_transforms
from unipan.modeling.meta_arch import check_results, model_size_divisibility
from unipan.segments import resize_result
from unipan.structures import Batch, DatasetMeta, PanopticResult

__all__ = ["ImageInput", "Predictor"]

ImageInput = np.ndarray | str | os.PathLike[str]
"""uint8[H, W, 3] RGB array, or the path of an image file."""


def _load_image(image: ImageInput, where: str) -> np.ndarray:
    """uint8[H, W, 3] RGB from an array or a file; errors name the image."""
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(Path(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a uint8 H x W x 3 RGB array or an image path, got {type(image).__name__}")
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
        model: a PanopticModel: `model(batch)` in eval mode returns one PanopticResult per image
            at its input size (`batch.image_sizes[i]`); batches are padded to its
            `size_divisibility`.
        meta: the dataset classes the model predicts (category ids of the results).
        cfg: the resolved config; `cfg.data` gives the test-time resize, normalisation and size
            divisibility.
        device: where the model runs; results come back on the CPU.
    """

    def __init__(self, model: nn.Module, meta: DatasetMeta, cfg: Config, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.cfg = cfg
        self.transform = build_transforms(cfg.data, is_train=False)
        self.size_divisibility = model_size_divisibility(model)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        overrides: list[str] | None = None,
    ) -> Predictor:
        """Build the model of a checkpoint from the config and classes stored in it.

        Args:
            path: a unipan checkpoint (see `unipan.engine.checkpoint`).
            device: where the model runs.
            overrides: dotted `key=value` config overrides applied to the stored config (e.g.
                `data.min_size_test=640`, `model.fusion.stuff_area=2048`).

        Raises:
            FileNotFoundError: no such file.
            CheckpointError (a ValueError): naming the file when it cannot be read, is not a
                unipan checkpoint, or its weights do not fit the model its config builds.
        """
        from unipan.config import ConfigError, config_from_dict, config_to_dict
        from unipan.engine.checkpoint import CheckpointError, load_model_from_checkpoint

        loaded = load_model_from_checkpoint(path, device=device, overrides=list(overrides or ()))
        cfg = loaded.cfg
        other = [o for o in overrides or () if not o.startswith("model.")]
        if other:
            try:
                cfg = config_from_dict(config_to_dict(cfg), other)
            except ConfigError as e:
                raise CheckpointError(f"checkpoint {path}: {e}") from e
        return cls(loaded.model, loaded.meta, cfg, device=device)

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
        batch = self._batch(items)
        with torch.inference_mode():
            results = check_results(self.model(batch.to(self.device)), self.model, batch)
        out = []
        for result, image_id, original_size in zip(results, batch.image_ids, batch.original_sizes, strict=True):
            cpu = PanopticResult(
                panoptic=result.panoptic.cpu(),
                segments=result.segments,
                image_id=result.image_id or image_id,
                raw=result.raw,
            )
            out.append(resize_result(cpu, original_size))
        return out
