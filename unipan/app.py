"""The jobs behind `unipan eval`, `unipan predict` and `unipan demo`, as library functions."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from unipan.config import Config, load_config
from unipan.io import atomic_write_text, save_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def config_dir() -> Path:
    """The repository's `configs/` folder (next to the package in a source checkout)."""
    path = Path(__file__).resolve().parents[1] / "configs"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: configs folder not found (install unipan from a source checkout)")
    return path


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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

    other = [o for o in overrides if not o.startswith("model.")]
    cfg = load_config(config_path, other)
    device = _pick_device(cfg.engine.device)
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


def predict_images(weights: Path, inputs: Iterable[Path], out: Path, device: str = "cpu") -> Path:
    """Panoptic PNG + one COCO-panoptic JSON for all images, and an overlay picture per image.

    Returns:
        The path of the predictions JSON.
    """
    from unipan.data.image import read_image
    from unipan.io import write_panoptic_json, write_panoptic_prediction
    from unipan.predictor import Predictor
    from unipan.viz import overlay, save_png

    files = list_images(inputs)
    predictor = Predictor.from_checkpoint(weights, device=device)
    meta = predictor.meta
    out = Path(out)
    images, annotations = [], []
    stems: set[str] = set()
    for i, path in enumerate(files):
        stem = path.stem if path.stem not in stems else f"{path.stem}_{i}"
        stems.add(stem)
        image = read_image(path)
        t0 = time.perf_counter()
        result = predictor(image, image_id=stem)
        log.info("%s: %d segments in %.2f s", path, len(result.segments), time.perf_counter() - t0)
        ann = write_panoptic_prediction(out / "panoptic", stem, f"{stem}.png", result.panoptic, result.segments)
        images.append({"id": stem, "file_name": path.name, "height": image.shape[0], "width": image.shape[1]})
        annotations.append(ann)
        save_png(out / "overlays" / f"{stem}.png", overlay(image, result.panoptic, result.segments, meta, labels=True))
    json_path = out / "predictions.json"
    write_panoptic_json(json_path, images, annotations, meta.to_coco_categories())
    print(f"wrote {len(files)} predictions to {out} (panoptic/, overlays/, predictions.json)")
    return json_path


def run_demo(out: Path, model: str = "panoptic_fpn", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Synthetic data -> train the tiny config on CPU -> evaluate -> pictures -> report.

    Writes under `out`: synthetic/ (the dataset), run/ (checkpoints, metrics, config, loss curve),
    predictions/ (COCO-panoptic PNG + JSON of the val split, instances_results.json), pictures/
    (GT | prediction), report.md and report.json (`eval_report`: `unipan pq --json`'s structure plus
    both mIoUs and the COCO AP), all measured at the images' original size.
    """
    from unipan.data.build import build_dataset
    from unipan.engine.checkpoint import load_model_from_checkpoint
    from unipan.engine.evaluator import evaluate
    from unipan.engine.trainer import train

    out = Path(out)
    cfg_path = config_dir() / model / "tiny_synth.yaml"
    if not cfg_path.is_file():
        raise ValueError(f"model {model!r} has no tiny_synth config ({cfg_path} missing)")
    cfg = load_config(
        cfg_path,
        [f"engine.output_dir={out / 'run'}", f"data.synth_root={out / 'synthetic'}", *overrides],
    )
    t0 = time.perf_counter()
    trained = train(cfg)
    train_s = time.perf_counter() - t0
    device = _pick_device(cfg.engine.device)
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
