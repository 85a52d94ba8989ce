"""Every fault a user can cause or meet ends in one line from the command, and no work is lost.

One tiny real run (Panoptic FPN at 64 x 64, two iterations, its trunk started from a weights file
that is deleted afterwards) serves eval, predict and resume; each test injects one fault: an
unwritable output folder, a damaged or foreign checkpoint, a missing GPU, a bad config value or
file, an unknown synthetic-data option, an empty split, unreadable images, a full disk, Ctrl-C.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch

from unipan.cli import main
from unipan.config import config_dir, load_config
from unipan.io import load_json

# configs/panoptic_fpn/tiny_synth.yaml, smaller still: a few seconds for two iterations on one thread
TINY = [
    "data.synth_size=[64,64]",
    "data.min_size_train=[64]",
    "data.max_size_train=64",
    "data.max_size_test=64",
    "data.synth_train=4",
    "data.synth_val=2",
    "solver.batch_size=2",
    "solver.max_iter=2",
    "solver.warmup_iters=1",
    "solver.steps=[1]",
    "engine.checkpoint_period=1",
    "engine.log_period=1",
    "engine.num_threads=1",
    "model.backbone.base_width=16",
    "model.backbone.fpn_channels=32",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi_heads.box_head_dim=64",
    "model.roi_heads.batch_size_per_image=32",
    "model.mask_head.conv_dims=32",
    "model.semantic.conv_dims=32",
]
CONFIG = "panoptic_fpn/tiny_synth"  # a shipped config by name, as after a pip install


def config_file() -> Path:
    return config_dir() / "panoptic_fpn" / "tiny_synth.yaml"


def one_error_line(capsys: pytest.CaptureFixture[str], verb: str) -> str:
    """The command's one line on stderr (log lines aside); nothing else went wrong on the way."""
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    lines = [line for line in err if line.startswith("unipan ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"unipan {verb}: "), lines[0]
    assert "Traceback" not in captured.err
    assert "a pickle ran code" not in captured.out + captured.err  # `Evil` below never runs
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run, trained from a trunk weights file that is gone afterwards."""
    from unipan.modeling.backbone.resnet import build_trunk

    root = tmp_path_factory.mktemp("cli_faults")
    cfg = load_config(config_file(), TINY)
    weights = root / "imagenet_trunk.pth"
    torch.manual_seed(1)
    torch.save(build_trunk(cfg.model.backbone).state_dict(), weights)
    out = root / "run"
    assert main(["train", CONFIG, *TINY, f"engine.output_dir={out}", f"model.backbone.weights={weights}"]) == 0
    assert load_config(out / "config.yaml").model.backbone.weights == str(weights)
    weights.unlink()  # the checkpoint must not need it any more
    return out


# --- checkpoints travel -----------------------------------------------------------------------------


def test_eval_and_predict_need_no_backbone_file(run: Path, tmp_path: Path) -> None:
    weights = run / "model_final.pth"
    # overrides anywhere on the line, after the options too
    assert main(["eval", str(run / "config.yaml"), "--weights", str(weights), "--out", str(tmp_path / "e"),
                 "model.fusion.stuff_area=16"]) == 0  # fmt: skip
    assert set(load_json(tmp_path / "e" / "pq.json")) >= {"All", "Things", "Stuff"}
    images = run / "synthetic" / "val" / "images"
    assert main(["predict", "--weights", str(weights), str(images), "data.min_size_test=64", "--out",
                 str(tmp_path / "p")]) == 0  # fmt: skip
    assert len(load_json(tmp_path / "p" / "predictions.json")["images"]) == 2


def test_resume_needs_no_backbone_file(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    overrides = [*TINY, f"engine.output_dir={copy}", "solver.max_iter=3", f"data.synth_root={run / 'synthetic'}"]
    assert main(["train", str(copy / "config.yaml"), *overrides, "--resume"]) == 0
    assert torch.load(copy / "model_final.pth", weights_only=True)["iteration"] == 3


# --- the run folder -----------------------------------------------------------------------------------


def test_training_into_a_run_is_refused_in_one_line(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unipan.engine.run_dir import LOCK_FILE

    def files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != LOCK_FILE}

    before = files()
    assert main(["train", CONFIG, *TINY, f"engine.output_dir={run}"]) == 2
    line = one_error_line(capsys, "train")
    assert f"{run} holds a run" in line and "--resume" in line and "--restart" in line
    assert files() == before


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "read_only"])
def test_unwritable_output_folders_are_refused_before_any_work(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    out = {"under_a_file": tmp_path / "file" / "out", "a_file": tmp_path / "file", "read_only": tmp_path / "ro"}[where]
    if where == "read_only":
        import unipan.files

        def read_only(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EROFS, "Read-only file system")

        # as root a chmod does not stop writes; the probe file is what a read-only mount refuses
        monkeypatch.setattr(unipan.files.tempfile, "mkstemp", read_only)
    val = run / "synthetic" / "val"
    commands = {
        "train": ["train", CONFIG, *TINY, f"engine.output_dir={out}"],
        "predict": ["predict", "--weights", str(run / "model_final.pth"), str(val / "images"), "--out", str(out)],
        "pq": ["pq", "--gt-json", str(val / "panoptic.json"), "--pred-json", str(val / "panoptic.json"),
               "--json", str(out / "pq.json")],
        "data synth": ["data", "synth", "--n", "2", "--out", str(out)],
        "eval": ["eval", str(run / "config.yaml"), "--weights", str(run / "model_final.pth"), "--out", str(out)],
    }  # fmt: skip
    for verb, argv in commands.items():
        assert main(argv) == 2, verb
        line = one_error_line(capsys, verb)
        reason = {"under_a_file": "not a directory", "a_file": "not a folder", "read_only": "read-only file system"}
        assert str(out) in line and "cannot be written" in line and reason[where] in line, line
    assert not (tmp_path / "file").is_dir()


# --- damaged, foreign and malicious checkpoints -------------------------------------------------------------


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("a pickle ran code",))


@pytest.mark.parametrize("kind", ["flipped", "truncated", "config", "pickle"])
def test_eval_and_predict_of_a_bad_checkpoint_say_why_in_one_line(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    weights = tmp_path / "w.pth"
    good = (run / "model_final.pth").read_bytes()
    if kind == "flipped":
        weights.write_bytes(good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1 :])
        digest = (run / "model_final.pth.sha256").read_text().replace("model_final.pth", "w.pth")
        (tmp_path / "w.pth.sha256").write_text(digest)
        expected = "is damaged: its bytes differ from the SHA-256 recorded in w.pth.sha256"
    elif kind == "truncated":
        weights.write_bytes(good[:4000])
        expected = "cannot be read: not a complete PyTorch checkpoint"
    elif kind == "config":
        shutil.copy(run / "config.yaml", weights)
        expected = "cannot be read: it is not a PyTorch checkpoint"
    else:
        torch.save({"model": {}, "x": Evil()}, weights)
        expected = "cannot be read: it holds a pickled object (print) that unipan does not load"
    images = run / "synthetic" / "val" / "images"
    for verb, argv in (
        ("eval", ["eval", str(run / "config.yaml"), "--weights", str(weights)]),
        ("predict", ["predict", "--weights", str(weights), str(images), "--out", str(tmp_path / "p")]),
    ):
        assert main(argv) == 2
        line = one_error_line(capsys, verb)
        assert f"checkpoint {weights} {expected}" in line, line
        assert "weights_only" not in line


def test_a_malicious_backbone_weights_file_is_refused_unrun(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = tmp_path / "trunk.pth"
    torch.save({"conv1.weight": Evil()}, evil)
    argv = ["train", CONFIG, *TINY, f"engine.output_dir={tmp_path / 'run'}", f"model.backbone.weights={evil}",
            f"data.synth_root={run / 'synthetic'}"]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert f"backbone weights {evil}: cannot load: it holds a pickled object (print)" in line, line
    assert "weights_only" not in line


# --- devices, configs, data -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_devices_that_are_not_there(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = run / "synthetic" / "val" / "images"
    predict = ["predict", "--weights", str(run / "model_final.pth"), str(images), "--out", str(tmp_path)]
    assert main([*predict, "--device", "cuda"]) == 2
    assert "--device is 'cuda' but no CUDA device is available" in one_error_line(capsys, "predict")
    assert main([*predict, "--device", "tpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in one_error_line(capsys, "predict")
    assert main(["train", CONFIG, "engine.device=tpu"]) == 2
    assert "override engine.device=tpu: engine.device must be" in one_error_line(capsys, "train")
    assert (
        main(["eval", str(run / "config.yaml"), "--weights", str(run / "model_final.pth"), "engine.device=cuda"]) == 2
    )
    assert "engine.device is 'cuda' but no CUDA device is available" in one_error_line(capsys, "eval")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["solver.lr=fast"], "override solver.lr=fast: solver.lr: Value 'fast'"),
        (["model.roi_heads.positive_fraction=1.5"], "model.roi_heads.positive_fraction must lie in (0, 1], got 1.5"),
        (["solver.clip_grad_norm=-1"], "override solver.clip_grad_norm=-1: solver.clip_grad_norm must be >= 0"),
        (["engine.num_threads=-4"], "engine.num_threads must be >= 0, got -4"),
        (["data.size_divisibility=7"], "unknown config key data.size_divisibility"),
        (["data.synth_options.foo=1"], "data.synth_options unknown option(s) foo (SynthOptions has: min_instances"),
        (["data.synth_options.occlusion=2"], "data.synth_options occlusion must lie in [0, 1], got 2"),
    ],
)
def test_config_errors_name_the_override_and_the_key(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", CONFIG, *overrides, f"engine.output_dir={tmp_path}"]) == 2
    assert expected in one_error_line(capsys, "train")
    assert not list(tmp_path.iterdir())  # refused when the config was read


def test_config_file_errors_keep_their_position(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_base_: {config_file()}\nsolver:\n  lr: [0.1\n")
    assert main(["train", str(bad_yaml)]) == 2
    assert "invalid YAML at line 4 column 1" in one_error_line(capsys, "train")
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text(f"_base_: {config_file()}\nsolver:\n  lr: 0.1\n  max_iter: -3\n")
    assert main(["train", str(bad_value)]) == 2
    assert f"config {bad_value} line 4: solver.max_iter must be > 0, got -3" in one_error_line(capsys, "train")


def test_an_empty_split_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", CONFIG, *TINY, "data.synth_train=0", f"engine.output_dir={tmp_path / 'a'}"]) == 2
    assert "the train split has no images" in one_error_line(capsys, "train")
    (tmp_path / "images").mkdir()
    (tmp_path / "panoptic").mkdir()
    category = '{"id": 1, "name": "sky", "isthing": 0, "color": [70, 130, 180]}'
    (tmp_path / "empty.json").write_text(f'{{"images": [], "annotations": [], "categories": [{category}]}}')
    coco = [
        "data.dataset=coco_panoptic",
        f"data.train_images={tmp_path / 'images'}",
        f"data.train_panoptic={tmp_path / 'panoptic'}",
        f"data.train_json={tmp_path / 'empty.json'}",
        f"engine.output_dir={tmp_path / 'b'}",
    ]
    assert main(["train", CONFIG, *TINY, *coco]) == 2
    assert "empty.json: the split has no images" in one_error_line(capsys, "train")


# --- predict ---------------------------------------------------------------------------------------------


def test_predict_names_each_unreadable_image_and_predicts_the_rest(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    shutil.copytree(run / "synthetic" / "val" / "images", images)
    good = sorted(images.glob("*.png"))
    (images / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # macOS resource fork
    (images / "truncated.png").write_bytes(good[0].read_bytes()[:300])
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(run / "model_final.pth"), str(images), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unipan predict")]
    assert len(err) == 3 and "Traceback" not in "".join(err)
    assert "._IMG_0001.jpg: cannot read image" in err[0] and "truncated.png: cannot read image" in err[1]
    assert err[2] == "unipan predict: error: 2 of 4 images failed (listed above); 2 predicted"
    predictions = load_json(out / "predictions.json")
    assert [im["file_name"] for im in predictions["images"]] == [p.name for p in good]
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == [p.name for p in good]


def test_predict_with_the_datasets_image_ids_is_scored_by_unipan_pq(run: Path, tmp_path: Path) -> None:
    val = run / "synthetic" / "val"
    out = tmp_path / "out"
    assert main(["predict", "--weights", str(run / "model_final.pth"), str(val / "images"),
                 "--images-json", str(val / "panoptic.json"), "--out", str(out)]) == 0  # fmt: skip
    gt = load_json(val / "panoptic.json")
    predictions = load_json(out / "predictions.json")
    assert [im["id"] for im in predictions["images"]] == [im["id"] for im in gt["images"]]  # ints, as COCO's
    assert [a["image_id"] for a in predictions["annotations"]] == [im["id"] for im in gt["images"]]
    assert main(["pq", "--gt-json", str(val / "panoptic.json"), "--gt-dir", str(val / "panoptic"),
                 "--pred-json", str(out / "predictions.json"), "--pred-dir", str(out / "panoptic"),
                 "--json", str(tmp_path / "pq.json")]) == 0  # fmt: skip
    assert load_json(tmp_path / "pq.json")["All"]["n"] > 0


def test_predict_reports_images_of_the_json_that_are_missing(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    val = run / "synthetic" / "val"
    one = sorted((val / "images").glob("*.png"))[0]
    out = tmp_path / "out"
    code = main(["predict", "--weights", str(run / "model_final.pth"), str(one),
                 "--images-json", str(val / "panoptic.json"), "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "000001.png (image id 1 of" in err and "not found in the inputs" in err
    assert len(load_json(out / "predictions.json")["images"]) == 1


# --- a full disk, Ctrl-C ----------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    argv = ["train", CONFIG, *TINY, f"engine.output_dir={out}", f"data.synth_root={run / 'synthetic'}"]
    assert main(argv) == 2
    assert (
        one_error_line(capsys, "train")
        == f"unipan train: error: no space left on device writing {out}/model_0000001.pth"
    )
    assert "No space left on device" in (out / "log.txt").read_text().splitlines()[-1]


def test_ctrl_c_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import unipan.engine.trainer as trainer

    def interrupted(*args: object, **kwargs: object) -> None:
        raise trainer.TrainingInterrupted(
            "interrupted at iteration 7 of 40; --resume continues from x/model_0000005.pth"
        )

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["train", CONFIG]) == 130
    assert one_error_line(capsys, "train") == (
        "unipan train: interrupted at iteration 7 of 40; --resume continues from x/model_0000005.pth"
    )


def test_the_shipped_configs_are_found_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from unipan.config import resolve_config_path

    assert resolve_config_path("panoptic_fpn/tiny_synth") == config_file()
    assert resolve_config_path("upsnet/r50_coco.yaml") == config_dir() / "upsnet" / "r50_coco.yaml"
    # the path of a source checkout before the configs moved into the package
    assert resolve_config_path(Path("configs") / "panoptic_fpn" / "tiny_synth.yaml") == config_file()
    assert main(["train", "nope/x"]) == 2
    assert "config nope/x: no such file, nor a shipped config" in one_error_line(capsys, "train")
