"""Datasets from config: COCO-panoptic folders (Cityscapes-panoptic too) or the synthetic set.

The synthetic set is written to disk in COCO-panoptic format once and then read by the same
loader as real data, so the demo and the tests exercise the real input path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from unipan.config import DataConfig
from unipan.io import load_json, save_json
from unipan.structures import Sample

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


def synthetic_root(cfg: DataConfig, output_dir: str | Path | None = None) -> Path:
    """Where the synthetic set of `cfg` lives: cfg.synth_root, else <output_dir>/synthetic."""
    if cfg.synth_root:
        return Path(cfg.synth_root)
    if output_dir is None:
        raise ValueError("data.synth_root is empty and no output_dir was given to place the synthetic set")
    return Path(output_dir) / "synthetic"


def ensure_synthetic(cfg: DataConfig, split: str, root: Path) -> Path:
    """Write the synthetic split under `root` unless an identical one is already there.

    Returns:
        The split's COCO-panoptic JSON path.
    """
    from unipan.data.synthetic import SYNTH_VERSION, SynthOptions, write_synthetic_dataset

    n = {"train": cfg.synth_train, "val": cfg.synth_val}[split]
    opts = SynthOptions(**{**dict(cfg.synth_options), "size": tuple(cfg.synth_size)})
    options = _jsonable(dataclasses.asdict(opts))
    recipe = {"version": SYNTH_VERSION, "n": n, "seed": cfg.synth_seed, "split": split, "options": options}
    stamp = root / f"{split}.recipe.json"
    if stamp.exists():
        try:
            if load_json(stamp) == recipe:
                return root / split / "panoptic.json"
        except ValueError:
            pass  # a damaged stamp means: write again
    log.info("writing synthetic %s split (%d images) to %s", split, n, root)
    json_path = write_synthetic_dataset(root, n, seed=cfg.synth_seed, opts=opts, split=split)
    # The stamp goes last: a run killed mid-write regenerates instead of trusting half a folder.
    save_json(stamp, recipe)
    return Path(json_path)


def build_dataset(cfg: DataConfig, split: str, is_train: bool, output_dir: str | Path | None = None) -> Dataset[Sample]:
    """The dataset of one split with the transforms of training or testing.

    Args:
        cfg: the data config.
        split: "train" or "val".
        is_train: training transforms (random resize, flip, crop) or testing ones.
        output_dir: run folder, used to place the synthetic set when cfg.synth_root is empty.

    Returns:
        A Dataset of `Sample`s with a `.meta` attribute (DatasetMeta) and `original_panoptic(i)`
        (the untransformed ground truth the evaluator measures against,
        `unipan.data.common.HasOriginalPanoptic`).
    """
    from unipan.data.coco_panoptic import CocoPanopticDataset
    from unipan.data.transforms import build_transforms

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    transform = build_transforms(cfg, is_train=is_train)
    if cfg.dataset == "synthetic":
        if (cfg.synth_train if split == "train" else cfg.synth_val) <= 0:
            raise ValueError(f"the {split} split has no images (data.synth_{split} is 0)")
        root = synthetic_root(cfg, output_dir)
        json_path = ensure_synthetic(cfg, split, root)
        dataset = CocoPanopticDataset(
            json_path.parent / "images", json_path.parent / "panoptic", json_path, transform=transform
        )
    elif cfg.dataset == "coco_panoptic":
        images, panoptic, json_file = (
            (cfg.train_images, cfg.train_panoptic, cfg.train_json)
            if split == "train"
            else (cfg.val_images, cfg.val_panoptic, cfg.val_json)
        )
        missing = [k for k, v in (("images", images), ("panoptic", panoptic), ("json", json_file)) if not v]
        if missing:
            keys = ", ".join(f"data.{split}_{k}" for k in missing)
            raise ValueError(f"dataset coco_panoptic needs {keys} set (paths of the {split} split)")
        json_path = Path(json_file)
        dataset = CocoPanopticDataset(images, panoptic, json_path, transform=transform)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; expected 'synthetic' or 'coco_panoptic'")
    if len(dataset) == 0:
        raise ValueError(f"the {split} split has no images: {json_path} has no image with an annotation")
    return dataset


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
