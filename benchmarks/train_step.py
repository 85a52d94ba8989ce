"""Time one training step of a model's tiny config: forward, backward and an SGD step on a fixed batch.

The step of `unipan demo` without its data loading, logging and schedule, so that a change to a
part (a head, an op) can be measured alone: each model's `unipan/configs/<model>/tiny_synth.yaml`,
8 synthetic 128 x 128 training images (the first 8 of a freshly written split), median of `--runs`
steps after 2 warm-up steps, wall and process CPU seconds. Weights are random unless `--weights`
names a checkpoint of the same config (a trained RPN keeps more positive RoIs, so a trained step
costs more: that is the cost late in a demo run). `--profile` adds torch.profiler's table of the
most expensive operators.

    python benchmarks/train_step.py --models panoptic_fpn upsnet refine
    python benchmarks/train_step.py --models refine --weights demo_out/run/model_final.pth \\
        model.refine.ibpp_iterations=3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.build import build_dataset
from unipan.data.collate import collate
from unipan.engine.checkpoint import read_checkpoint
from unipan.modeling.registry import build_model


def step_seconds(
    model_name: str, synth_root: Path, overrides: list[str], weights: Path | None, runs: int, profile: bool
) -> tuple[float, float]:
    """(median wall s, median process CPU s) of one training step."""
    cfg = load_config(
        config_dir() / model_name / "tiny_synth.yaml",
        [f"data.synth_root={synth_root}", "data.synth_train=8", "data.synth_val=1", *overrides],
    )
    dataset = build_dataset(cfg.data, "train", is_train=True)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.meta)  # type: ignore[attr-defined]
    if weights is not None:
        state = read_checkpoint(weights)
        # strict=False: a switch such as fewer IBPP iterations leaves some trained heads unused
        model.load_state_dict(state["model"], strict=False)
    model.train()
    batch = collate([dataset[i] for i in range(8)], model.size_divisibility)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()

    for _ in range(2):
        step()
    walls, cpus = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    if profile:
        with torch.profiler.profile() as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["panoptic_fpn"], help="registered model names")
    ap.add_argument("--weights", type=Path, default=None, help="a checkpoint of the (single) model's tiny config")
    ap.add_argument("--runs", type=int, default=5, help="timed steps (the median is printed)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's operator table")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every model")
    args = ap.parse_args()
    if args.weights is not None and len(args.models) != 1:
        ap.error("--weights belongs to one model: give one name to --models")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'model':<16}{'wall s':>9}{'CPU s':>9}   ({args.threads} threads, median of {args.runs})")
        for name in args.models:
            wall, cpu = step_seconds(name, Path(tmp), args.overrides, args.weights, args.runs, args.profile)
            print(f"{name:<16}{wall:>9.3f}{cpu:>9.3f}")


if __name__ == "__main__":
    main()
