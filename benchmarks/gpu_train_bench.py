"""Training and inference cost of every registered model at COCO size, one table (CUDA, AMP).

For each model of `unipan.modeling.registry.MODELS` (sorted), with its `unipan/configs/<model>/r50_coco.yaml`
(random init: no backbone weights), COCO-sized heads (80 thing, 53 stuff classes) and batches of
synthetic scenes (the synthetic generator's shapes at the requested size, their categories spread
over the COCO-sized classes):

- train s/iter: the mean wall time of `--iters` training iterations (forward under autocast
  float16 on CUDA, GradScaler, gradient clipping, SGD step, as `unipan.engine.trainer`), after
  `--warmup` untimed ones;
- inference ms: the median of `--infer-runs` `model(batch)` calls on one image in eval mode
  (float32, as `benchmarks/inference_speed.py`), after one warm-up call;
- peak memory: `torch.cuda.max_memory_allocated` over the training iterations and over inference;
- non-finite: iterations whose losses were NaN or infinite (by loss name), skipped as GradScaler
  skips them; a readiness finding to look into, not a crash of the check.

`benchmarks/gpu_check.sh` runs it with the defaults (800x1216, batch 2, 100 AMP iterations). The
same logic runs on the CPU in a smoke mode (no AMP there, memory column empty):

    python benchmarks/gpu_train_bench.py --device cpu --iters 2 --size 128 192
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unipan.config import load_config
from unipan.data.collate import collate
from unipan.data.common import make_sample
from unipan.data.synthetic import SynthOptions, generate_image
from unipan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unipan.engine.schedule import build_optimizer, build_scheduler
from unipan.modeling.meta_arch import model_size_divisibility
from unipan.modeling.registry import MODELS, build_model
from unipan.structures import Batch, DatasetMeta, SegmentInfo

ROOT = Path(__file__).resolve().parents[1]


def coco_sized_meta() -> DatasetMeta:
    """80 thing and 53 stuff categories with COCO's id layout (names are placeholders)."""
    cats = [{"id": i + 1, "name": f"thing{i}", "isthing": 1} for i in range(80)]
    cats += [{"id": 92 + i, "name": f"stuff{i}", "isthing": 0} for i in range(53)]
    return DatasetMeta(cats, name="coco-sized")


def make_batches(meta: DatasetMeta, size: tuple[int, int], batch_size: int, count: int, seed: int = 0) -> list[Batch]:
    """`count` batches of synthetic scenes of `size`, categories remapped onto `meta`'s classes."""
    rng = np.random.default_rng(seed)
    things, stuff = meta.thing_dataset_ids, meta.stuff_dataset_ids
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    opts = SynthOptions(size=size, min_instances=4, max_instances=12)
    batches = []
    for b in range(count):
        samples = []
        for k in range(batch_size):
            image, panoptic, segments = generate_image(seed, b * batch_size + k, opts, split="gpu-bench")
            # one random COCO-sized class per synthetic class of the image
            remap: dict[int, int] = {}
            for s in segments:
                if s.category_id not in remap:
                    remap[s.category_id] = int(rng.choice(things if s.isthing else stuff))
            segments = [SegmentInfo(s.id, remap[s.category_id], s.isthing, s.iscrowd, s.area, s.bbox) for s in segments]
            sample = make_sample(image, panoptic, segments, meta, f"{b}-{k}")
            sample.image = (sample.image - mean) / std
            samples.append(sample)
        batches.append(collate(samples, 32))
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(
    name: str,
    meta: DatasetMeta,
    batches: list[Batch],
    device: torch.device,
    iters: int,
    warmup: int,
    infer_runs: int,
) -> dict[str, Any]:
    """Train s/iter, inference ms and peak memories of one model (see the module docstring)."""
    cfg = load_config(ROOT / "unipan" / "configs" / name / "r50_coco.yaml")  # no backbone weights: random init
    torch.manual_seed(0)
    model = build_model(cfg, meta).to(device)
    # the batches differ from the configs' in size; the step is the model's, so the model's padding
    divisibility = model_size_divisibility(model)
    if divisibility > 32:
        raise ValueError(f"{name}: size divisibility {divisibility} > 32 of the prepared batches")
    optimizer = build_optimizer(cfg.solver, model)
    scheduler = build_scheduler(cfg.solver, optimizer)  # the config's warm-up, as a real run starts
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.float16)) if use_amp else contextlib.nullcontext
    )
    on_device = [b.to(device) for b in batches]

    def cycle() -> Iterator[Batch]:
        while True:
            yield from on_device

    data = cycle()
    params = [p for p in model.parameters() if p.requires_grad]

    non_finite: dict[str, int] = {}

    def step() -> None:
        with autocast():
            losses = model(next(data))
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        if bad:  # counted and skipped, as GradScaler skips such steps; the table reports them
            for k in bad:
                non_finite[k] = non_finite.get(k, 0) + 1
            return
        total = sum(v.float() for v in losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm or 1e9)
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm or 1e9)
            optimizer.step()
        scheduler.step()

    _reset_peak(device)
    model.train()
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    train_s = (time.perf_counter() - start) / iters
    train_peak = _peak_mb(device)

    optimizer.zero_grad(set_to_none=True)  # gradients freed before inference is measured
    _reset_peak(device)
    model.eval()
    one = on_device[0]
    single = Batch(
        images=one.images[:1],
        image_sizes=one.image_sizes[:1],
        image_ids=one.image_ids[:1],
        original_sizes=one.original_sizes[:1],
    )
    times = []
    with torch.inference_mode():
        model(single)
        for _ in range(infer_runs):
            _sync(device)
            t0 = time.perf_counter()
            model(single)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "train_s_per_iter": train_s,
        "inference_ms": 1e3 * statistics.median(times),
        "train_peak_mb": train_peak,
        "inference_peak_mb": _peak_mb(device),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "amp": use_amp,
        "non_finite_losses": non_finite,
    }


def _non_finite(counts: dict[str, int], steps: int) -> str:
    """'-' or 'loss_a 3/105, ...': steps whose loss was NaN or infinite (skipped, not timed apart)."""
    return ", ".join(f"{k} {v}/{steps}" for k, v in sorted(counts.items())) or "-"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) | cpu (smoke mode) | cuda:N")
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2, help="images per training iteration (default 2)")
    parser.add_argument("--iters", type=int, default=100, help="timed training iterations (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training iterations first (default 5)")
    parser.add_argument("--infer-runs", type=int, default=10, help="timed inference calls (default 10)")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), help="default: every registered model")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_train_bench: error: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
        return 2
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        print(f"gpu_train_bench: error: unknown models {unknown}; registered: {sorted(MODELS)}", file=sys.stderr)
        return 2
    size = (args.size[0], args.size[1])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {size[0]}x{size[1]}, batch {args.batch}", flush=True)
    meta = coco_sized_meta()
    t0 = time.perf_counter()
    batches = make_batches(meta, size, args.batch, count=2)
    print(f"data: 2 batches of synthetic scenes in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for name in args.models:
        row = bench_model(name, meta, batches, device, args.iters, args.warmup, args.infer_runs)
        rows.append(row)
        print(f"  {name}: {json.dumps(row)}", flush=True)

    amp = "AMP float16" if device.type == "cuda" else "float32 (no AMP on CPU)"
    print(
        f"\n{size[0]}x{size[1]}, train batch {args.batch} ({amp}, mean of {args.iters} iterations after "
        f"{args.warmup}), inference 1 image float32 (median of {args.infer_runs})\n"
    )
    names = ("model", "train s/iter", "inference ms", "peak MB train", "peak MB infer", "non-finite")
    header = "| " + " | ".join(f"{c:<14}" if k == 0 else f"{c:>13}" for k, c in enumerate(names)) + " |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r['model']:<14} | {r['train_s_per_iter']:>13.3f} | {r['inference_ms']:>13.1f} | "
            f"{_mb(r['train_peak_mb']):>13} | {_mb(r['inference_peak_mb']):>13} | "
            f"{_non_finite(r['non_finite_losses'], args.iters + args.warmup):>13} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
