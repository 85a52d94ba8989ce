"""SPINet's Table 3 (Hwang et al. 2021, Sec. 5.4) on the synthetic set, and both stuff-kernel variants.

Each row trains the tiny config (`unipan/configs/spinet/tiny_synth.yaml`, the `unipan demo --model spinet`
schedule) with one combination of the loss switches and evaluates PQ on the synthetic val split:

- M.C.D: multi-class dice on the stuff softmax (``model.spinet.multiclass_dice``)
- L_inter: the inter-class contour loss (``model.spinet.contour_weight``: 20 or 0)
- L_intra: the intra-class triplet loss (``model.spinet.triplet_weight``: 1 or 0)

and the full row once more with S + 1 stuff kernels (a "things" channel,
``model.spinet.stuff_things_channel=true``) beside the paper's S. Every run is deterministic (the
tiny config's seed) and costs one demo's training time; rows run one after the other.

Run: ``python benchmarks/spinet_table3.py --out runs/spinet_table3 [--rows 0 4 5] [--json t3.json]
[overrides...]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from unipan.app import run_demo

# (label, M.C.D, L_inter, L_intra, S + 1 stuff kernels)
ROWS: list[tuple[str, bool, bool, bool, bool]] = [
    ("none", False, False, False, False),
    ("M.C.D", True, False, False, False),
    ("M.C.D + L_inter", True, True, False, False),
    ("L_inter + L_intra", False, True, True, False),
    ("M.C.D + L_inter + L_intra (paper: S stuff kernels)", True, True, True, False),
    ("M.C.D + L_inter + L_intra, S + 1 stuff kernels", True, True, True, True),
]


def row_overrides(mcd: bool, inter: bool, intra: bool, things_channel: bool) -> list[str]:
    return [
        f"model.spinet.multiclass_dice={str(mcd).lower()}",
        f"model.spinet.contour_weight={20.0 if inter else 0.0}",
        f"model.spinet.triplet_weight={1.0 if intra else 0.0}",
        f"model.spinet.stuff_things_channel={str(things_channel).lower()}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/spinet_table3"), help="one demo folder per row here")
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))), help="row indices to run")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every row (e.g. solver.max_iter=200)")
    args = ap.parse_args()
    table = []
    for index in args.rows:
        label, *switches = ROWS[index]
        report = run_demo(
            args.out / f"row{index}", model="spinet", overrides=[*args.overrides, *row_overrides(*switches)]
        )
        row = {
            "row": label,
            "pq": 100 * report["All"]["pq"],
            "pq_things": 100 * report["Things"]["pq"],
            "pq_stuff": 100 * report["Stuff"]["pq"],
            "train_seconds": report["train_seconds"],
        }
        table.append(row)
        print(f"{label}: PQ {row['pq']:.1f}  Things {row['pq_things']:.1f}  Stuff {row['pq_stuff']:.1f}")
    print("\n| row | PQ | PQ Things | PQ Stuff |\n| --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['row']} | {row['pq']:.1f} | {row['pq_things']:.1f} | {row['pq_stuff']:.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
