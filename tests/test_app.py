"""The CLI's jobs end to end on a tiny run: demo -> eval -> predict, and their outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unipan.cli import main
from unipan.io import load_json, read_id_png

TINY = [
    "solver.max_iter=2",
    "solver.warmup_iters=1",
    "solver.steps=[1]",
    "data.synth_train=8",
    "data.synth_val=3",
    "engine.log_period=1",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_demo_writes_report_predictions_and_pictures(demo_dir: Path) -> None:
    report = load_json(demo_dir / "report.json")
    assert set(report) >= {"All", "Things", "Stuff", "per_class", "miou_pan", "miou_sem", "instances", "train_seconds"}
    assert report["sem_space"] == "stuff+things" and 0.0 <= report["miou_sem"] <= 1.0
    assert set(report["instances"]) == {"segm", "bbox"} and "AP50" in report["instances"]["segm"]
    assert "mIoU (semantic head" in (demo_dir / "report.md").read_text()
    for group in ("All", "Things", "Stuff"):
        assert set(report[group]) == {"pq", "sq", "rq", "n"}
        assert 0.0 <= report[group]["pq"] <= 1.0
    assert report["All"]["n"] == report["Things"]["n"] + report["Stuff"]["n"]
    assert (demo_dir / "report.md").read_text().startswith("# unipan demo: panoptic_fpn")
    assert (demo_dir / "run" / "loss_curve.png").is_file()
    assert (demo_dir / "run" / "model_final.pth").is_file()
    pictures = sorted((demo_dir / "pictures").glob("*.png"))
    assert len(pictures) == 3
    preds = load_json(demo_dir / "predictions" / "predictions.json")
    assert len(preds["annotations"]) == 3
    for ann in preds["annotations"]:
        ids = read_id_png(demo_dir / "predictions" / "panoptic" / ann["file_name"])
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}


def test_demo_report_agrees_with_unipan_pq(demo_dir: Path, tmp_path: Path) -> None:
    val = demo_dir / "synthetic" / "val"
    out = tmp_path / "pq.json"
    code = main(
        [
            "pq",
            "--gt-json", str(val / "panoptic.json"),
            "--gt-dir", str(val / "panoptic"),
            "--pred-json", str(demo_dir / "predictions" / "predictions.json"),
            "--pred-dir", str(demo_dir / "predictions" / "panoptic"),
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    from_files = json.loads(out.read_text())
    report = load_json(demo_dir / "report.json")
    # every PQ unipan prints is measured at the original size, as `unipan pq` measures the files
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert from_files[group][key] == pytest.approx(report[group][key], abs=1e-9)


def test_eval_cli(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = demo_dir / "run" / "config.yaml"
    code = main(["eval", str(cfg), "--weights", str(demo_dir / "run" / "model_final.pth"), "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Things" in printed and "mIoU (semantic head" in printed and "mask" in printed
    assert set(load_json(tmp_path / "pq.json")) >= {"All", "Things", "Stuff", "per_class", "miou_pan", "miou_sem"}
    results = load_json(tmp_path / "instances_results.json")
    assert isinstance(results, list)
    for det in results[:5]:
        assert set(det) == {"image_id", "category_id", "bbox", "score", "segmentation"}


def test_predict_cli_on_a_folder_and_a_file(demo_dir: Path, tmp_path: Path) -> None:
    images = demo_dir / "synthetic" / "val" / "images"
    one = sorted(images.glob("*.png"))[0]
    code = main(["predict", str(images), str(one), "--weights", str(demo_dir / "run" / "model_final.pth"),
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    preds = load_json(tmp_path / "predictions.json")
    assert len(preds["images"]) == 4  # 3 from the folder, the repeated file gets its own id
    assert len({im["id"] for im in preds["images"]}) == 4
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 4


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", str(tmp_path / "missing.png"), "--weights", str(tmp_path / "w.pth"),
                 "--out", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("unipan predict: error:") and "w.pth" in err and "\n" not in err
    assert main(["demo", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
