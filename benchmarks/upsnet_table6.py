"""The inference rows of UPSNet's Table 6 (Xiong et al. 2019, Sec. 4.2) for one trained checkpoint.

Each row evaluates the same weights on the config's val split (the synthetic one for the demo
checkpoint) with one inference switch or oracle changed, through the same path as
``unipan eval CONFIG --weights W model.upsnet.oracle_...=true``:

- as trained: instance class assignment (ICA) on, unknown class on
- "ICA" off: instances keep the detector's class (``model.fusion.class_assignment=false``)
- "Unk." off at inference: the unknown channel is left out of Z (``model.fusion.unknown=false``;
  the paper's row also trains without it: pass such a checkpoint with ``--extra``)
- GT Box; GT Box + GT ICA; GT Box + GT ICA + GT Seg (the paper's three oracle rows), and each of
  GT ICA and GT Seg alone

The training switches of the table (Pano., Loss Bal., RoI Loss, Unk. in training) need their own
training runs: evaluate those checkpoints as extra rows with ``--extra LABEL=PATH`` (each as it was
trained, with ICA and unknown as configured).

Run: ``python benchmarks/upsnet_table6.py --weights RUN/model_final.pth [--config CONFIG]
[--max-images N] [--extra "no Pano.=OTHER/model_final.pth"] [--json table6.json] [overrides...]``.
Without ``--config`` the checkpoint's stored config gives the data (the demo's synthetic val split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from unipan.config import load_config
from unipan.data.build import build_dataset
from unipan.engine.checkpoint import load_model_from_checkpoint
from unipan.engine.evaluator import evaluate

ORACLE = "model.upsnet.oracle_"

# (label, ICA, Unk., GT Box, GT ICA, GT Seg, model overrides)
ROWS: list[tuple[str, bool, bool, bool, bool, bool, list[str]]] = [
    ("as trained", True, True, False, False, False, []),
    ("ICA off", False, True, False, False, False, ["model.fusion.class_assignment=false"]),
    ("Unk. off (inference)", True, False, False, False, False, ["model.fusion.unknown=false"]),
    ("GT Box", True, True, True, False, False, [f"{ORACLE}boxes=true"]),
    ("GT Box + GT ICA", True, True, True, True, False, [f"{ORACLE}boxes=true", f"{ORACLE}class_assignment=true"]),
    (
        "GT Box + GT ICA + GT Seg",
        True,
        True,
        True,
        True,
        True,
        [f"{ORACLE}boxes=true", f"{ORACLE}class_assignment=true", f"{ORACLE}semantic=true"],
    ),
    ("GT ICA", True, True, False, True, False, [f"{ORACLE}class_assignment=true"]),
    ("GT Seg", True, True, False, False, True, [f"{ORACLE}semantic=true"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, type=Path, help="UPSNet checkpoint (.pth)")
    ap.add_argument("--config", type=Path, default=None, help="config giving the data (default: the stored one)")
    ap.add_argument("--max-images", type=int, default=0, help="evaluate the first N val images (0 = all)")
    ap.add_argument("--extra", action="append", default=[], help="LABEL=CHECKPOINT: another trained variant")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    ap.add_argument("--json", type=Path, default=None, help="also write the table here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every row (data.*, engine.*, model.fusion.*)")
    args = ap.parse_args()

    other = [o for o in args.overrides if not o.startswith("model.")]
    cfg = load_config(args.config, other) if args.config is not None else None
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    runs: list[tuple[str, Path, list[str], tuple[bool, ...] | None]] = [
        (row[0], args.weights, [*args.overrides, *row[6]], tuple(row[1:6])) for row in ROWS
    ]
    for item in args.extra:
        label, sep, path = item.partition("=")
        if not sep or not path:
            ap.error(f"--extra {item!r}: expected LABEL=CHECKPOINT")
        runs.append((label, Path(path), list(args.overrides), None))

    val_set = None
    table: list[dict[str, object]] = []
    for label, weights, overrides, flags in runs:
        loaded = load_model_from_checkpoint(weights, device, cfg=cfg, overrides=overrides)
        if loaded.cfg.model.name != "upsnet":
            raise SystemExit(f"{weights}: a {loaded.cfg.model.name!r} checkpoint; Table 6 rows need an UPSNet one")
        if val_set is None:  # one val split for every row (the first checkpoint's data settings)
            val_set = build_dataset(loaded.cfg.data, "val", is_train=False, output_dir=loaded.cfg.engine.output_dir)
        with torch.no_grad():
            result = evaluate(loaded.model, val_set, loaded.meta, device, max_images=args.max_images)
        m = result.metrics
        table.append(
            {
                "row": label,
                "checkpoint": str(weights),
                "flags": dict(zip(("ICA", "Unk.", "GT Box", "GT ICA", "GT Seg"), flags, strict=True)) if flags else {},
                "PQ": m["PQ"],
                "PQ_th": m["PQ_th"],
                "PQ_st": m["PQ_st"],
                "num_images": m["num_images"],
            }
        )
        print(f"{label}: PQ {m['PQ']:.1f}", flush=True)

    def mark(row: dict[str, object], key: str) -> str:
        flags = row["flags"]
        assert isinstance(flags, dict)
        return "-" if not flags else ("x" if flags[key] else "")

    keys = ("ICA", "Unk.", "GT Box", "GT ICA", "GT Seg")
    print(f"\nUPSNet Table 6 rows, {int(table[0]['num_images'])} val images, weights {args.weights}\n")
    print(f"{'row':<28}" + "".join(f"{k:>8}" for k in keys) + f"{'PQ':>8}{'PQ_Th':>8}{'PQ_St':>8}")
    for row in table:
        cells = "".join(f"{mark(row, k):>8}" for k in keys)
        print(f"{row['row']!s:<28}{cells}{row['PQ']:>8.1f}{row['PQ_th']:>8.1f}{row['PQ_st']:>8.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
