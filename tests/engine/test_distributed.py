"""2 CPU processes under torchrun (gloo) train like 1 process on the same global batch.

The test launches this file itself as the worker script:
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py OUT`.
The tiny model has no batch statistics (no BatchNorm) and no dropout, and its loss is a mean of
per-image means, so 2 processes x 2 images and 1 process x 4 images compute the same gradient;
only the order of floating-point sums differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _run(out: Path) -> None:
    """Both the worker (under torchrun) and the single-process reference run this."""
    import test_engine as te

    te.run_tiny(out, dropout=0.0, eval_period=4, log_period=1)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    path = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__)),
            str(two),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _run(one)  # the reference trains meanwhile, on the other core
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output[-4000:]

    a = torch.load(one / "model_final.pth", weights_only=True)
    b = torch.load(two / "model_final.pth", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-5, rtol=0)
    assert len(b["rng_per_rank"]) == 2  # every rank's RNG state, for an exact distributed resume
    ra, rb = _records(one), _records(two)
    # rank 0 alone writes: one record per logged iteration, none duplicated by rank 1
    assert [r["iteration"] for r in rb] == [r["iteration"] for r in ra] == list(range(1, 9))
    for x, y in zip(ra, rb, strict=True):
        assert y["lr"] == pytest.approx(x["lr"], abs=1e-12)
        for k in ("loss_sem", "loss_reg", "total_loss"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), (x["iteration"], k)
    evals = [(x["eval"], y["eval"]) for x, y in zip(ra, rb, strict=True) if "eval" in x]
    assert len(evals) == 2
    for ea, eb in evals:
        # PQ statistics summed across ranks equal the single-process statistics
        assert eb["num_images"] == ea["num_images"] == 4
        # and so do the confusion matrices and the gathered COCO records
        for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mIoU_pan", "mIoU_sem", "mask_AP", "box_AP"):
            assert eb[k] == pytest.approx(ea[k], abs=1e-6), k
    log = (two / "log.txt").read_text()
    assert "batch 4 (2 per process x 2)" in log


if __name__ == "__main__":
    _run(Path(sys.argv[1]))
