"""Faults around a run's folder and checkpoints, each injected: the run stops in one clear message, or
recovers, and no earlier result is lost.

Two runs on one folder, training over a finished run, a corrupted checkpoint (bytes flipped, not
truncated), a full disk, a non-finite loss, Ctrl-C, temporary files of a kill, a damaged metrics line.
The tiny model and toy data of `test_engine.py` keep each case to a second or two.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import (
    TinyModel,
    ToyPanoptic,
    assert_same_weights,
    final_weights,
    records,
    run_tiny,
    tiny_config,
    toy_meta,
)

from unipan.engine.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from unipan.engine.run_dir import LOCK_FILE, RunFolderError
from unipan.engine.trainer import TrainingInterrupted, train
from unipan.structures import Batch


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 8-iteration run (checkpoints at 3 and 6) to compare recoveries with."""
    out = tmp_path_factory.mktemp("straight")
    run_tiny(out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


def crashing_at(call: int) -> TinyModel:
    """The straight run's model (same init), crashing on its `call`-th training forward."""
    torch.manual_seed(0)
    return TinyModel(toy_meta(), dropout=0.3, crash_at=call)


def flip_byte(path: Path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


# --- a run owns its folder ---------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_stops_naming_it(tmp_path: Path) -> None:
    """Another process holds the folder's lock: the run stops before writing anything there."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(tmp_path / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid 4242 (the first run)'); f.flush(); print('locked', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = rf"{re.escape(str(tmp_path))} is in use by another run \(pid 4242 \(the first run\)\)"
        with pytest.raises(RunFolderError, match=busy):
            run_tiny(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no log.txt, metrics, config
    finally:
        holder.kill()
        holder.wait()
    run_tiny(tmp_path)  # the lock died with its process
    assert (tmp_path / "model_final.pth").is_file()


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path: Path) -> None:
    seen = []

    class Probe(TinyModel):
        def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
            with open(tmp_path / LOCK_FILE, "a+") as f:  # another open file: flock conflicts with it
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("free")
                except BlockingIOError:
                    seen.append("held")
            return super().losses(batch)

    torch.manual_seed(0)
    run_tiny(tmp_path, model=Probe(toy_meta()))
    assert set(seen) == {"held"}
    with open(tmp_path / LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: no BlockingIOError


def test_training_over_a_finished_run_is_refused_and_changes_nothing(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match=r"holds a run \(model_final.pth.*metrics.jsonl\); continue it with "
                       r"--resume, or start over with --restart"):  # fmt: skip
        run_tiny(run)
    assert snapshot(run) == before


def test_restart_moves_the_old_run_aside(straight: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = snapshot(run)
    run_tiny(run, restart=True, checkpoint_period=5)
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == before  # every file of the old run, byte for byte
    # the new run's folder holds only its own checkpoints: no old periodic one for a later --resume
    assert sorted(p.name for p in run.glob("model_*.pth")) == ["model_0000005.pth", "model_final.pth"]
    assert [r["iteration"] for r in records(run)] == [r["iteration"] for r in records(straight)]


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    (tmp_path / ".model_0000003.pth.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".metrics.jsonl.x.tmp").write_text("{")
    run_tiny(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_damaged_metrics_line_does_not_block_resume(straight: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(tmp_path, model=crashing_at(5))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[0] = '{"iteration": 2, "lr": 0.0\x00\x00 garbage'
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run_tiny(tmp_path, resume=True)
    assert_same_weights(final_weights(straight), final_weights(tmp_path), atol=0)
    assert "garbage" in (tmp_path / "metrics.jsonl.damaged").read_text()  # the old text is kept
    assert [r["iteration"] for r in records(tmp_path)] == [4, 6, 8]


# --- checkpoint digests ---------------------------------------------------------------------------------


def test_a_corrupted_checkpoint_is_rejected_naming_it(tmp_path: Path) -> None:
    meta = toy_meta()
    model = TinyModel(meta)
    path = tmp_path / "m.pth"
    save_checkpoint(
        path, model=model, optimizer=None, scheduler=None, iteration=1, cfg=tiny_config(tmp_path), meta=meta
    )
    digest = (tmp_path / "m.pth.sha256").read_text()
    assert digest.endswith("  m.pth\n") and len(digest.split()[0]) == 64  # sha256sum's format
    assert verify_checkpoint(path) is True
    flip_byte(path, 0.4)
    torch.load(path, weights_only=True)  # torch's zip reader notices nothing: the digest must
    with pytest.raises(CheckpointError, match=r"checkpoint .*m.pth is damaged: its bytes differ from the SHA-256"):
        load_checkpoint(path, TinyModel(meta))
    # a checkpoint without a digest file (older unipan, or copied alone) loads unverified
    (tmp_path / "m.pth.sha256").unlink()
    assert verify_checkpoint(path) is False
    read_checkpoint(path)


def test_resume_falls_back_to_the_newest_intact_checkpoint(
    straight: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(tmp_path, model=crashing_at(8))
    assert (tmp_path / LAST_CHECKPOINT).read_text().strip() == "model_0000006.pth"
    flip_byte(tmp_path / "model_0000006.pth")
    with caplog.at_level(logging.WARNING, logger="unipan"):
        result = run_tiny(tmp_path, resume=True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model_0000006.pth is damaged" in m and "trying an older checkpoint" in m for m in warned)
    assert any("resuming from" in m and "model_0000003.pth" in m for m in warned)
    assert result.checkpoint == tmp_path / "model_final.pth"
    assert_same_weights(final_weights(straight), final_weights(tmp_path), atol=0)  # exact from iteration 3


def test_resume_with_no_intact_checkpoint_names_each(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(tmp_path, model=crashing_at(5))
    flip_byte(tmp_path / "model_0000003.pth")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*model_0000003.pth is damaged"):
        run_tiny(tmp_path, resume=True)


# --- the run stops in one line, recorded in log.txt ---------------------------------------------------------


def test_disk_full_names_the_file_and_keeps_the_last_good_checkpoint(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    calls = []

    def save_until_the_disk_is_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        calls.append(f)
        if len(calls) == 2:
            real_save(obj, f, *args, **kwargs)  # half written when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left on device") as info:
        run_tiny(tmp_path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "model_0000006.pth")
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "model_0000006.pth").exists()
    assert (tmp_path / LAST_CHECKPOINT).read_text().strip() == "model_0000003.pth"
    assert verify_checkpoint(tmp_path / "model_0000003.pth")  # the last good one, intact
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert "run stopped:" in log[-1] and "model_0000006.pth: No space left on device" in log[-1]
    monkeypatch.setattr(torch, "save", real_save)
    run_tiny(tmp_path, resume=True)
    assert_same_weights(final_weights(straight), final_weights(tmp_path), atol=0)


def test_a_non_finite_loss_is_the_last_line_of_the_log(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss is not finite \(loss_reg=nan"):
        run_tiny(tmp_path, model=TinyModel(toy_meta(), nan_at=3))
    last = (tmp_path / "log.txt").read_text().splitlines()[-1]
    assert "ERROR" in last and "run stopped: iteration 3: loss is not finite (loss_reg=nan" in last
    assert "Traceback" not in (tmp_path / "log.txt").read_text()


def test_ctrl_c_names_the_iteration_and_what_resume_continues_from(straight: Path, tmp_path: Path) -> None:
    class CtrlC(TinyModel):
        def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
            if self.calls == 4:  # the 5th iteration
                raise KeyboardInterrupt
            return super().losses(batch)

    torch.manual_seed(0)
    message = (
        rf"interrupted at iteration 5 of 8; --resume continues from {tmp_path / 'model_0000003.pth'} \(iteration 3\)"
    )
    with pytest.raises(TrainingInterrupted, match=message):
        run_tiny(tmp_path, model=CtrlC(toy_meta(), dropout=0.3))
    assert "interrupted at iteration 5 of 8" in (tmp_path / "log.txt").read_text().splitlines()[-1]
    run_tiny(tmp_path, resume=True)
    assert_same_weights(final_weights(straight), final_weights(tmp_path), atol=0)


def test_ctrl_c_before_the_first_checkpoint(tmp_path: Path) -> None:
    class CtrlC(TinyModel):
        def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="iteration 1 of 8; no checkpoint yet, so --resume starts from"):
        run_tiny(tmp_path, model=CtrlC(toy_meta()))


def test_resume_and_restart_exclude_each_other(tmp_path: Path) -> None:
    meta = toy_meta()
    with pytest.raises(RunFolderError, match="exclude each other"):
        train(tiny_config(tmp_path), resume=True, restart=True, model=TinyModel(meta), train_set=ToyPanoptic(2, meta))
