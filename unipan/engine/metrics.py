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

from unipan.io import atomic_write, atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TB_DIR = "tb"
# keys of a training record that are not individual losses
_NOT_LOSSES = frozenset({"iteration", "lr", "time", "data_time", "grad_norm", "total_loss"})
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_logging(output_dir: Path | None, rank: int = 0, level: int = logging.INFO) -> Iterator[logging.Handler | None]:
    """Route `unipan` logging to the run's log file (and stderr) while active.

    `unipan` logs INFO on rank 0 (WARNING elsewhere) to output_dir/log.txt (rank 0) and to stderr
    when the application configured no logging of its own.

    Everything is undone on exit (handlers removed, levels restored), so a later run or a test's
    log capture is not affected. Records still propagate to the root logger, where an
    application's (or pytest's) handlers see them.

    Yields:
        The log file's handler (None off rank 0 or without `output_dir`), for records meant for
        the file alone (why a run stopped: the console gets that as the command's one line).
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
        yield added[-1] if output_dir is not None and rank == 0 else None
    finally:
        for handler in added:
            unipan_logger.removeHandler(handler)
            handler.close()
        unipan_logger.setLevel(old_level)


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[int], int]:
    """(the records of a metrics.jsonl, the numbers of its damaged lines, its number of lines)."""
    if not path.is_file():
        return [], [], 0
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records: list[dict[str, Any]] = []
    damaged: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged, len(lines)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl.

    A damaged line (torn by a kill mid-write, or edited by hand) is skipped with a warning naming
    the file and the line: the records are a log, and a resume or a plot must not stop at one.
    """
    records, damaged, _ = _read_records(path)
    if damaged:
        logger.warning("%s: skipping %d damaged line(s): %s", path, len(damaged), ", ".join(map(str, damaged[:10])))
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
        records, damaged, n_lines = _read_records(self.path)
        if damaged == [n_lines]:
            logger.warning("%s: leaving out a torn last line (a kill mid-write)", self.path)
        elif damaged:
            # the file is rewritten without them below; its old text stays readable beside it
            backup = self.path.with_name(f"{METRICS_FILE}.damaged")
            k = 1
            while backup.exists():  # an earlier repair's copy stays too
                k += 1
                backup = self.path.with_name(f"{METRICS_FILE}.damaged-{k}")
            atomic_write_bytes(backup, self.path.read_bytes())
            logger.warning(
                "%s: %d damaged line(s) (%s) left out; the file as it was is kept as %s",
                self.path,
                len(damaged),
                ", ".join(map(str, damaged[:10])),
                backup.name,
            )
        kept = [r for r in records if int(r["iteration"]) <= start_iter]
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
