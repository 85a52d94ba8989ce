"""The contract every panoptic model keeps, written once.

`PanopticModel.forward(batch)` owns the skeleton that each model would otherwise rewrite: the
batch is checked, training requires targets and returns the model's weighted losses, evaluation
fuses each image's `RawPrediction` with the fusion the builder bound and attaches it to the
`PanopticResult`. A model fills in two methods:

- `losses(batch) -> dict[str, Tensor]`: named, already weighted scalar losses (their sum is the
  total loss), the same keys every iteration;
- `raw_predictions(batch) -> list[RawPrediction]`: one per image, at its input size.

`check_losses` and `check_results` are the output checks that the trainer, the evaluator and the
predictor all call, so every consumer of a model enforces the same contract.

The pattern is detectron2's `DenseDetector` (a template `forward`), without its registries; the
fusion is a part passed in, like DETR's post-processors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from unipan.structures import IGNORE_LABEL, Batch, DatasetMeta, PanopticResult, RawPrediction

__all__ = [
    "Fusion",
    "PanopticModel",
    "check_batch",
    "check_losses",
    "check_results",
    "check_sem_seg",
    "model_size_divisibility",
]


class Fusion(Protocol):
    """A fusion with its settings bound: `fuse(raw, meta, image_id=..., original_size=...)`.

    The builder binds one with `functools.partial` (e.g. `partial(heuristic_fusion,
    **asdict(settings))`); any fusion whose inputs a model's `RawPrediction` carries will do.
    It returns a PanopticResult at the input size of `raw`. `original_size` is the (H, W) of the
    image file the input was resized from: area thresholds of a fusion (the stuff area, ...) are
    in its pixels, as in the reference implementations (`unipan.segments.area_at_input_size`).
    """

    def __call__(
        self,
        raw: RawPrediction,
        meta: DatasetMeta,
        *,
        image_id: str = "",
        original_size: tuple[int, int] | None = None,
    ) -> PanopticResult: ...


def check_batch(batch: Batch, size_divisibility: int) -> None:
    """Raise ValueError naming the problem when `batch` breaks the Batch contract (shapes only).

    Args:
        batch: the batch to check.
        size_divisibility: padded sides must be multiples of it.
    """
    images = batch.images
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"Batch.images must be FloatTensor[B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    b, _, hp, wp = images.shape
    if hp % size_divisibility or wp % size_divisibility:
        raise ValueError(f"Batch.images is {hp}x{wp}, not padded to a multiple of {size_divisibility}")
    if len(batch.image_sizes) != b or len(batch.image_ids) != b:
        raise ValueError(
            f"Batch has {b} images but {len(batch.image_sizes)} image_sizes and {len(batch.image_ids)} image_ids"
        )
    for image_id, (h, w) in zip(batch.image_ids, batch.image_sizes, strict=True):
        if not (0 < h <= hp and 0 < w <= wp):
            raise ValueError(f"image {image_id!r}: size {h}x{w} does not fit the padded batch {hp}x{wp}")
    if batch.targets is None:
        return
    if len(batch.targets) != b:
        raise ValueError(f"Batch has {b} images but {len(batch.targets)} targets")
    for image_id, size, t in zip(batch.image_ids, batch.image_sizes, batch.targets, strict=True):
        if tuple(t.sem_seg.shape) != tuple(size):
            raise ValueError(
                f"image {image_id!r}: target sem_seg is {tuple(t.sem_seg.shape)} but the image is {tuple(size)}"
            )


def check_sem_seg(sem_seg: Tensor, image_ids: Sequence[str], num_classes: int) -> None:
    """Raise ValueError naming the image when a class index lies outside 0..num_classes-1 and 255.

    One reduction over the batch (a single device sync); the image is looked up only on failure.

    Args:
        sem_seg: LongTensor[B, H, W] class indices (e.g. `Batch.padded_sem_seg()`).
        image_ids: the B image ids.
        num_classes: the size of the class-index space.
    """
    bad = ((sem_seg < 0) | (sem_seg >= num_classes)) & (sem_seg != IGNORE_LABEL)
    if not bool(bad.any()):
        return
    index = int(torch.nonzero(bad.flatten(1).any(dim=1))[0])
    value = int(sem_seg[index][bad[index]][0])
    raise ValueError(
        f"image {image_ids[index]!r}: sem_seg holds class index {value}, outside 0..{num_classes - 1} "
        f"and not {IGNORE_LABEL}"
    )


def check_losses(losses: Any, model: nn.Module, expected_keys: list[str] | None = None) -> list[str]:
    """Check a training-mode output and return its sorted loss names.

    Args:
        losses: what the model returned.
        model: the model (named in errors).
        expected_keys: the names of earlier iterations; every rank all-reduces the losses in this
            order, so the set must not change.

    Raises:
        TypeError: not a non-empty dict of scalar tensors.
        ValueError: a reserved name, or other names than before.
    """
    name = type(model).__name__
    if not isinstance(losses, dict) or not losses:
        raise TypeError(
            f"{name} in training mode must return a non-empty dict of named losses, got {type(losses).__name__}"
        )
    keys = sorted(losses)
    if "total_loss" in losses:
        raise ValueError(f"{name} returned a loss named 'total_loss', a name the engine reserves")
    for key in keys:
        value = losses[key]
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise TypeError(f"loss {key!r} of {name} must be a scalar tensor, got {value!r}")
    if expected_keys is not None and keys != expected_keys:
        raise ValueError(
            f"{name} returned losses {keys}, earlier {expected_keys}; a model must return the same losses "
            "every iteration (a zero loss where a term does not apply)"
        )
    return keys


def check_results(results: Any, model: nn.Module, batch: Batch) -> list[PanopticResult]:
    """Check an eval-mode output: one PanopticResult per image, each at its input size.

    Raises:
        TypeError: not a list of PanopticResult of the batch's length (names the model and image).
        ValueError: a result of another size than its image (names the image).
    """
    name = type(model).__name__
    if not isinstance(results, list) or len(results) != len(batch.image_ids):
        got = f"a list of {len(results)}" if isinstance(results, list) else type(results).__name__
        raise TypeError(
            f"{name} in eval mode must return one PanopticResult per image ({len(batch.image_ids)}), got {got}"
        )
    for result, image_id, size in zip(results, batch.image_ids, batch.image_sizes, strict=True):
        if not isinstance(result, PanopticResult):
            raise TypeError(f"image {image_id!r}: {name} returned {type(result).__name__}, not a PanopticResult")
        if result.image_size != (int(size[0]), int(size[1])):
            raise ValueError(
                f"image {image_id!r}: {name} returned a {result.image_size[0]}x{result.image_size[1]} result, "
                f"expected its input size {int(size[0])}x{int(size[1])}"
            )
    return results


def model_size_divisibility(model: nn.Module) -> int:
    """The padding multiple a model needs (a DDP wrapper is looked through).

    Raises:
        TypeError: the model does not declare `size_divisibility` (every PanopticModel does).
    """
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    value = getattr(net, "size_divisibility", None)
    if not isinstance(value, int) or value < 1:
        raise TypeError(
            f"{type(net).__name__} declares no size_divisibility (a positive int): batches are padded to it"
        )
    return value


class PanopticModel(nn.Module):
    """Base class of every unipan model: the forward skeleton, the fusion, the class information.

    Args:
        meta: the dataset's classes (every class count of the model comes from it).
        size_divisibility: padded batch sides must be multiples of this (the backbone's).
        fuse: the fusion, settings bound (see `Fusion`).

    Attributes:
        needs_targets_at_inference: True when inference reads `batch.targets` (oracle modes); the
            evaluator then passes the ground truth to the model.
    """

    needs_targets_at_inference: bool = False

    def __init__(self, *, meta: DatasetMeta, size_divisibility: int, fuse: Fusion | Callable[..., PanopticResult]):
        super().__init__()
        if size_divisibility < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        if not callable(fuse):
            raise TypeError(f"fuse must be a callable (raw, meta, image_id=...) -> PanopticResult, got {fuse!r}")
        self.meta = meta
        self.size_divisibility = int(size_divisibility)
        self.fuse = fuse

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[PanopticResult]:
        """Weighted losses in training, fused results in eval.

        Args:
            batch: padded images FloatTensor[B, 3, Hp, Wp] with their sizes; targets in training
                (and at inference when `needs_targets_at_inference`).

        Returns:
            training: {loss name: FloatTensor[]}, already weighted (their sum is the total loss).
            eval: one PanopticResult per image at its input size (h, w), `.raw` its RawPrediction.
        """
        check_batch(batch, self.size_divisibility)
        if self.training:
            if batch.targets is None:
                raise ValueError(
                    f"{type(self).__name__} in training mode needs batch.targets (call .eval() to predict)"
                )
            return self.losses(batch)
        if self.needs_targets_at_inference and batch.targets is None:
            raise ValueError(
                f"{type(self).__name__} runs in an oracle mode that reads ground truth at inference: "
                "batch.targets is required"
            )
        return self.predict(batch)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (a batch with targets)."""
        raise NotImplementedError

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """One RawPrediction per image of `batch`, at its input size."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[PanopticResult]:
        """Fuse each image's raw prediction; the raw prediction is attached to its result.

        The fusion gets each image's original size (`batch.original_sizes`, else its input size),
        so that its area thresholds are in original pixels.
        """
        results = []
        original_sizes = batch.original_sizes or batch.image_sizes
        raws = self.raw_predictions(batch)
        for image_id, raw, original_size in zip(batch.image_ids, raws, original_sizes, strict=True):
            size = (int(original_size[0]), int(original_size[1]))
            result = self.fuse(raw, self.meta, image_id=image_id, original_size=size)
            result.raw = raw
            if not result.image_id:
                result.image_id = image_id
            results.append(result)
        return results

    # --- helpers for the models' constructors ---------------------------------------------------
    def check_num_classes(self, part: str, predicted: int, expected: int, space: str) -> None:
        """Raise ValueError when a part predicts another number of classes than the dataset needs."""
        if predicted != expected:
            raise ValueError(
                f"{type(self).__name__}: {part} predicts {predicted} classes; it needs {space} = {expected} "
                f"for {self.meta!r}"
            )
