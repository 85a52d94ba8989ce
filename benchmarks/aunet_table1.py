"""AUNet's Table 1 on the synthetic set: each row trained with the tiny config, equal budget, one table.

Every row is `unipan demo --model aunet` (unipan/configs/aunet/tiny_synth.yaml: same data, seed, schedule
and steps) with the row's overrides from `unipan.modeling.models.aunet.TABLE1_ROWS`; "e2e" is
Panoptic FPN's tiny demo with AUNet's loss weights. AP is the evaluator's mask AP (as the paper's);
mIoU is the BG branch's, over its own classes (stuff + "things").

Run: ``python benchmarks/aunet_table1.py [--rows e2e PAM MAM AUNet] [--out runs/aunet_table1] [key=value ...]``
(each row takes about as long as the demo; extra overrides apply to every row, e.g.
solver.max_iter=300 for a quicker, shorter-budget table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unipan.app import run_demo
from unipan.modeling.models.aunet import TABLE1_ROWS

DEFAULT_ROWS = ["e2e", "PAM", "PAM_r", "MAM", "MAM_r", "AUNet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(TABLE1_ROWS), help="Table 1 rows to train")
    ap.add_argument("--out", type=Path, default=Path("runs/aunet_table1"), help="one demo folder per row under it")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every row (equal budget)")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for row in args.rows:
        t0 = time.perf_counter()
        report = run_demo(args.out / row, model="aunet", overrides=[*TABLE1_ROWS[row], *args.overrides])
        results[row] = {
            "pq": 100 * report["All"]["pq"],
            "pq_things": 100 * report["Things"]["pq"],
            "pq_stuff": 100 * report["Stuff"]["pq"],
            # the BG branch's mIoU in its own class space, and mask AP (null when undefined)
            "miou": 100 * (report.get("miou_sem") or float("nan")),
            "ap": float((((report.get("instances") or {}).get("segm") or {}).get("AP")) or float("nan")),
            "train_seconds": report["train_seconds"],
            "wall_seconds": time.perf_counter() - t0,
        }
        (args.out / "table1.json").write_text(json.dumps(results, indent=2))
    print(f"\nAUNet Table 1 on the synthetic set (config aunet/tiny_synth, overrides {args.overrides or 'none'})\n")
    print("| row | overrides | PQ | PQ Things | PQ Stuff | mask AP | mIoU | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row, r in results.items():
        flags = " ".join(o.removeprefix("model.aunet.") for o in TABLE1_ROWS[row])
        print(
            f"| {row} | {flags} | {r['pq']:.1f} | {r['pq_things']:.1f} | {r['pq_stuff']:.1f} | {r['ap']:.1f} "
            f"| {r['miou']:.1f} | {r['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
