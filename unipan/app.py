"""The jobs behind `unipan eval`, `unipan predict` and `unipan demo`, as library functions."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unipan.config import Config, config_dir, load_config, resolve_config_path
from unipan.io import atomic_write_text, load_json, save_json

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "PredictResult",
    "config_dir",
    "eval_report",
    "evaluate_checkpoint",
    "list_images",
    "predict_images",
    "resolve_config_path",
    "run_demo",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def evaluate_checkpoint(
    config_path: Path, overrides: Sequence[str], weights: Path, out: Path | None = None
) -> dict[str, Any]:
    """PQ/SQ/RQ, both mIoUs and COCO AP of a checkpoint on the config's val split.

    Everything is measured at each image's original size (`unipan.engine.evaluator`). The
    checkpoint's stored model section is the model; the config file gives the data, and the
    `model.*` overrides apply to the stored model section (thresholds, fusion, oracle switches).
    With `out`: COCO-panoptic predictions (panoptic/, predictions.json), the COCO instance results
    (instances_results.json) and the report (pq.json) are written there.
    """
    from unipan.data.build import build_dataset
    from unipan.engine.checkpoint import load_model_from_checkpoint
    from unipan.engine.evaluator import evaluate
    from unipan.engine.trainer import resolve_device

    other = [o for o in overrides if not o.startswith("model.")]
    cfg = load_config(config_path, other)
    device = resolve_device(cfg.engine.device)
    loaded = load_model_from_checkpoint(weights, device, cfg=cfg, overrides=list(overrides))
    val_set = build_dataset(loaded.cfg.data, "val", is_train=False, output_dir=loaded.cfg.engine.output_dir)
    result = evaluate(loaded.model, val_set, loaded.meta, device, out_dir=out)
    print(result.pq.table())
    print(result.summary())
    report = eval_report(result)
    if out is not None:
        save_json(Path(out) / "pq.json", report, indent=2)
        print(f"wrote predictions and pq.json to {out}")
    return report


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def eval_report(result: Any) -> dict[str, Any]:
    """An `EvalResult` as JSON: `unipan pq --json`'s PQ dict plus the semantic and instance metrics.

    Keys beside PQ's: "miou_pan" (mIoU of the panoptic output) and "miou_sem" (of the semantic
    head, in its class space "sem_space"; null without raw predictions), fractions 0..1 as PQ's;
    "instances": {"segm": {AP, AP50, AP75, APs, APm, APl}, "bbox": {...}} in percent as COCOeval
    prints them (null where undefined), or null without thing classes or raw predictions.
    """
    instances = None
    if result.instances is not None:
        instances = {
            kind: {name: _finite_or_none(v) for name, v in values.items()} for kind, values in result.instances.items()
        }
    return {
        **result.pq.to_dict(),
        "miou_pan": result.miou_pan,
        "miou_sem": result.miou_sem,
        "sem_space": result.sem_space,
        "instances": instances,
    }


def list_images(inputs: Iterable[Path]) -> list[Path]:
    """Image files named directly or found (sorted, non-recursive) in the named folders."""
    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


@dataclass
class PredictResult:
    """What `predict_images` did.

    Attributes:
        json_path: the COCO-panoptic predictions JSON (written also when some images failed).
        total: images it was asked to predict.
        failed: one line per image that could not be predicted, naming it and why.
    """

    json_path: Path
    total: int
    failed: list[str] = field(default_factory=list)


@dataclass
class _PredictJob:
    """One image to predict: its file, the id and PNG name its annotation gets, its expected size."""

    path: Path | None
    image_id: str | int
    png_name: str
    file_name: str
    expected_size: tuple[int, int] | None = None
    problem: str = ""


def _jobs_by_stem(files: list[Path]) -> list[_PredictJob]:
    jobs: list[_PredictJob] = []
    stems: set[str] = set()
    for i, path in enumerate(files):
        stem = path.stem if path.stem not in stems else f"{path.stem}_{i}"
        stems.add(stem)
        jobs.append(_PredictJob(path, stem, f"{stem}.png", path.name))
    return jobs


def _jobs_from_images_json(files: list[Path], images_json: Path) -> list[_PredictJob]:
    """The images of a COCO image-info JSON, found by file name among `files`, under the JSON's ids."""
    doc = load_json(images_json)
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not images:
        raise ValueError(f"{images_json}: no 'images' list, so it names no image to predict")
    by_name: dict[str, Path] = {}
    for path in files:
        by_name.setdefault(path.name, path)
    jobs: list[_PredictJob] = []
    for k, info in enumerate(images):
        if not isinstance(info, dict) or "id" not in info or "file_name" not in info:
            raise ValueError(f"{images_json}: images[{k}] needs an 'id' and a 'file_name'")
        file_name = str(info["file_name"])
        found = by_name.get(Path(file_name).name)
        size = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
        job = _PredictJob(found, info["id"], f"{Path(file_name).stem}.png", file_name, size)
        if found is None:
            job.problem = f"{file_name} (image id {info['id']} of {images_json}): not found in the inputs"
        jobs.append(job)
    unlisted = len(files) - sum(job.path is not None for job in jobs)
    if unlisted > 0:
        log.info("%d input images are not listed in %s and are not predicted", unlisted, images_json)
    return jobs


def predict_images(
    weights: Path,
    inputs: Iterable[Path],
    out: Path,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    images_json: Path | None = None,
) -> PredictResult:
    """Panoptic PNG + one COCO-panoptic JSON for all images, and an overlay picture per image.

    Every readable image is predicted: one that cannot be read (a truncated file, a macOS `._x.jpg`)
    is named in `PredictResult.failed` and the others go on; the JSON lists the predicted ones.

    Args:
        weights: the checkpoint.
        inputs: image files and folders of images (not recursive).
        out: output folder: panoptic/ (PNGs), overlays/, predictions.json.
        device: cpu | cuda | cuda:N | auto.
        overrides: dotted overrides of the checkpoint's stored config (`data.min_size_test=640`,
            `model.fusion.stuff_area=2048`).
        images_json: a COCO image-info JSON: its images are predicted (found by file name in the
            inputs) under its image ids, with PNGs named after its file names, so `unipan pq`
            scores the output against the dataset's panoptic JSON as it is. Without it, images are
            named by their file stem.

    Returns:
        PredictResult: the JSON's path and the images that failed.
    """
    from unipan.data.image import read_image
    from unipan.engine.trainer import resolve_device
    from unipan.files import check_writable_folder
    from unipan.io import write_panoptic_json, write_panoptic_prediction
    from unipan.predictor import Predictor
    from unipan.viz import overlay, save_png

    out = check_writable_folder(out)
    files = list_images(inputs)
    jobs = _jobs_by_stem(files) if images_json is None else _jobs_from_images_json(files, Path(images_json))
    predictor = Predictor.from_checkpoint(
        weights, device=resolve_device(device, what="--device"), overrides=list(overrides)
    )
    meta = predictor.meta
    images, annotations, failed = [], [], []
    for job in jobs:
        if job.path is None:
            failed.append(job.problem)
            continue
        try:
            image = read_image(job.path)
        except (ValueError, OSError) as e:
            failed.append(str(e))
            continue
        size = (int(image.shape[0]), int(image.shape[1]))
        if job.expected_size is not None and size != job.expected_size:
            failed.append(
                f"{job.path}: is {size[0]}x{size[1]} but {images_json} says "
                f"{job.expected_size[0]}x{job.expected_size[1]}"
            )
            continue
        t0 = time.perf_counter()
        result = predictor(image, image_id=str(job.image_id))
        log.info("%s: %d segments in %.2f s", job.path, len(result.segments), time.perf_counter() - t0)
        ann = write_panoptic_prediction(out / "panoptic", job.image_id, job.png_name, result.panoptic, result.segments)
        images.append({"id": job.image_id, "file_name": job.file_name, "height": size[0], "width": size[1]})
        annotations.append(ann)
        save_png(out / "overlays" / job.png_name, overlay(image, result.panoptic, result.segments, meta, labels=True))
    json_path = out / "predictions.json"
    write_panoptic_json(json_path, images, annotations, meta.to_coco_categories())
    print(f"wrote {len(images)} predictions to {out} (panoptic/, overlays/, predictions.json)")
    return PredictResult(json_path=json_path, total=len(jobs), failed=failed)


def run_demo(
    out: Path, model: str = "panoptic_fpn", overrides: Sequence[str] = (), resume: bool = False, restart: bool = False
) -> dict[str, Any]:
    """Synthetic data -> train the tiny config on CPU -> evaluate -> pictures -> report.

    Writes under `out`: synthetic/ (the dataset), run/ (checkpoints, metrics, config, loss curve),
    predictions/ (COCO-panoptic PNG + JSON of the val split, instances_results.json), pictures/
    (GT | prediction), report.md and report.json (`eval_report`: `unipan pq --json`'s structure plus
    both mIoUs and the COCO AP), all measured at the images' original size. `resume` and `restart`
    are `train`'s: a folder that holds a demo's run is refused unless one of them is given.
    """
    from unipan.data.build import build_dataset
    from unipan.engine.checkpoint import load_model_from_checkpoint
    from unipan.engine.evaluator import evaluate
    from unipan.engine.trainer import resolve_device, train

    out = Path(out)
    cfg_path = config_dir() / model / "tiny_synth.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"model {model!r} has no tiny_synth config ({cfg_path} missing)")
    cfg = load_config(
        cfg_path,
        [f"engine.output_dir={out / 'run'}", f"data.synth_root={out / 'synthetic'}", *overrides],
    )
    t0 = time.perf_counter()
    trained = train(cfg, resume=resume, restart=restart)
    train_s = time.perf_counter() - t0
    device = resolve_device(cfg.engine.device)
    loaded = load_model_from_checkpoint(trained.checkpoint, device, cfg=cfg)
    cfg, meta = loaded.cfg, loaded.meta
    val_set = build_dataset(cfg.data, "val", is_train=False)
    result = evaluate(loaded.model, val_set, meta, device, out_dir=out / "predictions")
    pictures = _demo_pictures(out, cfg, meta)
    report = {**eval_report(result), "train_seconds": round(train_s, 1), "model": model}
    save_json(out / "report.json", report, indent=2)
    atomic_write_text(out / "report.md", _report_md(result, out, trained.output_dir, pictures, train_s, model))
    print(result.pq.table())
    print(result.summary())
    print(f"\nreport: {out / 'report.md'}")
    return report


def _demo_pictures(out: Path, cfg: Config, meta: Any, n: int = 6) -> list[Path]:
    from unipan.viz import visualize_folder

    val_dir = Path(cfg.data.synth_root) / "val"
    return visualize_folder(
        val_dir / "images",
        val_dir / "panoptic",
        val_dir / "panoptic.json",
        out / "pictures",
        pred_dir=out / "predictions" / "panoptic",
        pred_json=out / "predictions" / "predictions.json",
        max_images=n,
    )


def _report_md(result: Any, out: Path, run_dir: Path, pictures: list[Path], train_s: float, model: str) -> str:
    d = result.pq.to_dict()
    rows = "\n".join(
        f"| {k} | {100 * d[k]['pq']:.1f} | {100 * d[k]['sq']:.1f} | {100 * d[k]['rq']:.1f} | {d[k]['n']} |"
        for k in ("All", "Things", "Stuff")
    )
    semantic_and_ap = f"\n```\n{result.summary()}\n```\n"
    pics = "\n".join(f"- {p.relative_to(out)}" for p in pictures)
    return f"""# unipan demo: {model} on the synthetic dataset

Trained for {train_s / 60:.1f} minutes on {torch.get_num_threads()} CPU threads. Every number is
measured at the images' original size against their original ground truth.

| | PQ | SQ | RQ | classes |
| --- | --- | --- | --- | --- |
{rows}
{semantic_and_ap}
- loss curve: {(Path(run_dir) / "loss_curve.png").relative_to(out)}
- checkpoint: {(Path(run_dir) / "model_final.pth").relative_to(out)}
- metrics: {(Path(run_dir) / "metrics.jsonl").relative_to(out)}
- predictions (COCO-panoptic PNG + JSON, COCO instance results): predictions/
- evaluation in `unipan pq --json` form, with both mIoUs and the COCO AP: report.json

Pictures (ground truth | prediction):
{pics}

Per class:

```
{result.pq.table()}
```
"""
