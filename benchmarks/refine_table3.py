"""REFINE's Table 3 (component analysis) on the synthetic set, from equal-budget runs.

Two trainings of unipan/configs/refine/tiny_synth.yaml with the same data, schedule and seed:

- base: `model.refine.ibpp_iterations=0 model.occlusion.enabled=false` (Panoptic FPN with the
  all-class semantic head: the paper's baseline);
- full: the config as is (IBPP with the config's T iterations and the occlusion head, trained
  jointly on detached inputs).

By default both get the config's steps (equal steps); `--equal-time` gives the base as many steps
as fit in the full model's training time instead (it is cheaper per step). Then the rows, each on
the whole synthetic val split:

| row   | model | fusion                                   |
| base  | base  | occlusion none, UE off (= the heuristic) |
| +IBPP | full  | occlusion none, UE off                   |
| +SOE  | full  | occlusion learned (sigma 2.5), UE off    |
| +UE   | full  | occlusion learned, UE on                 |

Run: ``python benchmarks/refine_table3.py --out runs/refine_table3`` (two tiny trainings: about
twice the demo's time on 2 quiet cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.build import build_dataset
from unipan.data.collate import collate
from unipan.engine.checkpoint import load_model_from_checkpoint
from unipan.engine.trainer import train
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.occlusion import occlusion_fusion

BASE = ["model.refine.ibpp_iterations=0", "model.occlusion.enabled=false", "model.fusion.occlusion=none"]
ROWS = [
    ("base", "base", {"occlusion": "none", "unknown_erasing": False}),
    ("+IBPP", "full", {"occlusion": "none", "unknown_erasing": False}),
    ("+SOE", "full", {"occlusion": "learned", "unknown_erasing": False}),
    ("+UE", "full", {"occlusion": "learned", "unknown_erasing": True}),
]


def run(out: Path, name: str, overrides: list[str]) -> tuple[Path, float]:
    cfg = load_config(
        config_dir() / "refine" / "tiny_synth.yaml",
        [f"engine.output_dir={out / name}", f"data.synth_root={out / 'synthetic'}", *overrides],
    )
    t0 = time.perf_counter()
    trained = train(cfg)
    return Path(trained.checkpoint), time.perf_counter() - t0


def training_seconds(checkpoint: Path) -> float:
    """Training wall seconds of a `unipan demo` checkpoint (`<demo>/run/model_final.pth`), from the
    demo's report.json; NaN when there is none."""
    report = checkpoint.parent.parent / "report.json"
    return float(json.loads(report.read_text())["train_seconds"]) if report.is_file() else float("nan")


@torch.no_grad()
def rows_of(checkpoint: Path, settings: list[dict[str, Any]]) -> list[PQResult]:
    loaded = load_model_from_checkpoint(checkpoint, "cpu")
    model, cfg, meta = loaded.model, loaded.cfg, loaded.meta
    base = dataclasses.asdict(cfg.model.fusion)
    fuses = [functools.partial(occlusion_fusion, **{**base, **s}) for s in settings]
    val = build_dataset(cfg.data, "val", is_train=False)
    stats: list[Any] = [None] * len(fuses)
    for i in range(len(val)):
        sample = val[i]
        (raw,) = model.raw_predictions(replace(collate([sample], model.size_divisibility), targets=None))
        for k, fuse in enumerate(fuses):
            result = fuse(raw, meta, image_id=sample.image_id)
            t = sample.target
            stat = pq_compute_single(t.panoptic, t.segments, result.panoptic, result.segments, meta, sample.image_id)
            stats[k] = stat if stats[k] is None else stats[k] + stat
    return [PQResult.from_stat(s, meta) for s in stats]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/refine_table3"))
    parser.add_argument("--equal-time", action="store_true", help="give the base the full model's training time")
    parser.add_argument(
        "--full-weights",
        type=Path,
        default=None,
        help="the full model's checkpoint from a run of the same config (`unipan demo --model refine`'s "
        "run/model_final.pth) instead of training it again; its training time is read from the demo's report.json",
    )
    parser.add_argument(
        "--base-weights",
        type=Path,
        default=None,
        help="the base model's checkpoint from an earlier run of this script (<out>/base/model_final.pth) "
        "instead of training it again (its time is then not known)",
    )
    args = parser.parse_args(argv)
    if args.base_weights is not None and args.equal_time:
        parser.error("--base-weights and --equal-time exclude each other (the base's steps are set by the run)")
    if args.full_weights is None:
        full_ckpt, full_s = run(args.out, "full", [])
    else:
        full_ckpt, full_s = args.full_weights, training_seconds(args.full_weights)
    base_overrides = list(BASE)
    if args.equal_time:
        steps = load_config(config_dir() / "refine" / "tiny_synth.yaml").solver.max_iter
        # a short probe run measures the base's step cost on this machine
        _, probe_s = run(args.out, "probe", [*BASE, "solver.max_iter=20", "solver.steps=[18,19]"])
        base_steps = int(steps * full_s / (probe_s * steps / 20))
        base_overrides += [
            f"solver.max_iter={base_steps}",
            f"solver.steps=[{int(base_steps * 0.815)},{int(base_steps * 0.946)}]",
        ]
    if args.base_weights is None:
        base_ckpt, base_s = run(args.out, "base", base_overrides)
    else:
        base_ckpt, base_s = args.base_weights, float("nan")
    results = {"base": rows_of(base_ckpt, [ROWS[0][2]]), "full": rows_of(full_ckpt, [r[2] for r in ROWS[1:]])}
    table = [("base", results["base"][0])] + [
        (row, pq) for (row, _, _), pq in zip(ROWS[1:], results["full"], strict=True)
    ]
    print(f"\ntraining: base {base_s / 60:.1f} min, full {full_s / 60:.1f} min\n")
    print("| row | PQ | PQ^Th | PQ^St |\n|---|---|---|---|")
    for row, pq in table:
        print(f"| {row} | {100 * pq.pq:.1f} | {100 * pq.things.pq:.1f} | {100 * pq.stuff.pq:.1f} |")
    summary = {row: {"pq": pq.pq, "pq_th": pq.things.pq, "pq_st": pq.stuff.pq} for row, pq in table}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table3.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
