"""Run records: JSON-lines metrics, TensorBoard scalars, the loss-curve PNG, and log setup.

Only rank 0 writes. `metrics.jsonl` has one JSON object per line with at least "iteration"
(completed iterations); training lines add "lr", each loss, "total_loss", "time" (seconds per
iteration) and "data_time"; evaluation results sit under "eval" as a flat dict of floats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unipan.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TB_DIR = "tb"
# keys of a training record that are not individual losses
_NOT_LOSSES = frozenset({"iteration", "lr", "time", "data_time", "grad_norm", "total_loss"})
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_logging(output_dir: Path | None, rank: int = 0, level: int = logging.INFO) -> Iterator[None]:
    """Route `unipan` logging to the run's log file (and stderr) while active.

    `unipan` logs INFO on rank 0 (WARNING elsewhere) to output_dir/log.txt (rank 0) and to stderr
    when the application configured no logging of its own.

    Everything is undone on exit (handlers removed, levels restored), so a later run or a test's
    log capture is not affected. Records still propagate to the root logger, where an
    application's (or pytest's) handlers see them.
    """
    unipan_logger = logging.getLogger("unipan")
    old_level = unipan_logger.level
    unipan_logger.setLevel(level if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(_LOG_FORMAT if rank == 0 else f"[rank {rank}] {_LOG_FORMAT}")
    added: list[logging.Handler] = []
    if not logging.getLogger().handlers:
        # nobody configured logging (a plain script): without a handler INFO would be dropped
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(fmt)
        added.append(stream)
    if output_dir is not None and rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(output_dir / "log.txt", encoding="utf-8")
        file_handler.setFormatter(fmt)
        added.append(file_handler)
    for handler in added:
        unipan_logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            unipan_logger.removeHandler(handler)
            handler.close()
        unipan_logger.setLevel(old_level)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl; a torn last line (a kill mid-write) is skipped.

    Raises:
        ValueError: naming the file and line when a line other than the last is not JSON.
    """
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}: line {number} is not JSON: {e.msg}") from e
    return records


class MetricsWriter:
    """Appends records to metrics.jsonl and mirrors numbers to TensorBoard (rank 0 only).

    Args:
        output_dir: the run folder.
        start_iter: the iteration training (re)starts from: records after it, left by a run that
            was killed after its last checkpoint, are dropped so the file tells one history.
        enabled: False on ranks other than 0 (every call becomes a no-op).
        tensorboard: write TensorBoard events under output_dir/tb.
    """

    def __init__(self, output_dir: Path, start_iter: int = 0, enabled: bool = True, tensorboard: bool = True):
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self._tb: Any = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if int(r.get("iteration", 0)) <= start_iter]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote after the checkpoint we resume from
            self._tb = SummaryWriter(log_dir=str(output_dir / TB_DIR), purge_step=start_iter)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (must hold "iteration") and its numbers to TensorBoard."""
        if not self.enabled:
            return
        iteration = int(record["iteration"])
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if key != "iteration" and isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, iteration)
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{name}/"))
        else:
            out[name] = value
    return out


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Plot each loss and the total against iteration (log scale), lr below, written atomically.

    Returns:
        False (and writes nothing) when no record carries a loss.
    """
    train = [r for r in records if "total_loss" in r]
    if not train:
        return False
    # a bare Figure renders with Agg and needs no pyplot: no global backend switch, no display,
    # and seconds less import time
    from matplotlib.figure import Figure

    iters = [int(r["iteration"]) for r in train]
    loss_keys = sorted({k for r in train for k, v in r.items() if k not in _NOT_LOSSES and isinstance(v, int | float)})
    fig = Figure(figsize=(8, 6))
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(iters, [r["total_loss"] for r in train], color="black", linewidth=2, label="total_loss")
    for key in loss_keys:
        ax_loss.plot(iters, [r.get(key, math.nan) for r in train], linewidth=1, label=key)
    positive = all(r["total_loss"] > 0 for r in train)
    if positive:
        ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8, loc="upper right")
    if title:
        ax_loss.set_title(title)
    ax_lr.plot(iters, [r.get("lr", math.nan) for r in train], color="tab:blue")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(True, alpha=0.3)
    # fixed margins: tight_layout costs seconds with log-scale axes and gains little here
    fig.subplots_adjust(left=0.1, right=0.97, top=0.93 if title else 0.97, bottom=0.09, hspace=0.08)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return True
