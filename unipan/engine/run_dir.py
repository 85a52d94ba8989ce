"""A run owns its folder: an exclusive lock for the run's life, no silent reuse of a finished run.

Two runs writing one `engine.output_dir` would interleave their logs and overwrite each other's
checkpoints and metrics; a new run started (without `--resume`) over a finished one would
truncate its metrics and leave its old periodic checkpoints beside the new ones, where a later
`--resume` could pick them up. So, before a run writes anything:

- `hold_run_folder` takes an exclusive `flock` on `<output_dir>/.unipan.lock` (held until the run
  ends; the kernel drops it when the process dies, even by kill -9), and a second run on the folder
  stops at once with one line naming it;
- `prepare_run_folder` refuses a folder that holds a run unless the run resumes it, or was asked to
  start over, in which case the old run's files are moved aside to `<output_dir>.old-<time>/`
  (never deleted); and it removes the temporary files a killed run left (`.model_*.tmp`, ...),
  which nothing else can be writing while the lock is held.

In a distributed run rank 0 does this and every rank agrees on the outcome (`unipan.engine.trainer`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from unipan.engine.checkpoint import DIGEST_SUFFIX, LAST_CHECKPOINT, checkpoint_candidates
from unipan.engine.metrics import METRICS_FILE
from unipan.files import TEMP_SUFFIX, check_writable_folder

logger = logging.getLogger(__name__)

__all__ = ["LOCK_FILE", "RunFolderError", "hold_run_folder", "prepare_run_folder", "run_files"]

LOCK_FILE = ".unipan.lock"
"""The lock file in a run folder; it stays after the run (only the lock on it is released)."""


class RunFolderError(ValueError):
    """The output folder cannot be used for this run: in use by another run, or holds a run."""


@contextlib.contextmanager
def hold_run_folder(output_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Create `output_dir` and hold an exclusive lock on it while the block runs.

    Raises:
        OSError: the folder cannot be created or written (one line naming it).
        RunFolderError: another process holds the lock (names the folder and that process).
    """
    out = check_writable_folder(output_dir, "engine.output_dir")
    lock_path = out / LOCK_FILE
    with open(lock_path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip()
            by = f" ({holder})" if holder else ""
            raise RunFolderError(
                f"{out} is in use by another run{by}; wait for it to end or choose another engine.output_dir"
            ) from e
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # some network file systems have no flock: run, but say what is not guarded
            logger.warning("%s: cannot lock (%s); a second run in this folder would not be detected", out, e.strerror)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield out
        finally:
            # closing the file releases the lock; the file stays (removing it would race a new run)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def run_files(output_dir: str | os.PathLike[str]) -> list[str]:
    """Names of the files that make `output_dir` hold a run: checkpoints, their pointer, metrics."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p.name for p in checkpoint_candidates(out)]
    if (out / LAST_CHECKPOINT).is_file():
        found.append(LAST_CHECKPOINT)
    metrics = out / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    return found


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove the temporary files (`.<name>.<random>.tmp`) of writes a kill interrupted."""
    stale = [p for p in output_dir.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        logger.info(
            "removed %d temporary file(s) of an interrupted run: %s", len(stale), ", ".join(p.name for p in stale)
        )
    return stale


def _aside_path(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    k = 1
    while target.exists():
        k += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{k}")
    return target


def move_run_aside(output_dir: Path, keep: Iterable[Path] = ()) -> Path:
    """Move everything in `output_dir` but the lock and `keep` to a new `<output_dir>.old-<time>/`.

    Returns:
        The folder the old run now lives in.
    """
    keep_names = {LOCK_FILE} | {Path(k).name for k in keep if Path(k).resolve().parent == output_dir.resolve()}
    target = _aside_path(output_dir)
    target.mkdir()
    for entry in sorted(output_dir.iterdir()):
        if entry.name not in keep_names:
            entry.rename(target / entry.name)
    return target


def prepare_run_folder(
    output_dir: Path, resume: bool, restart: bool, keep: Iterable[Path] = ()
) -> tuple[Path | None, list[Path]]:
    """Make the (locked) folder ready for a run: refuse, or move aside, what an earlier run left.

    Args:
        output_dir: the run folder, locked by `hold_run_folder`.
        resume: the run continues the one in the folder.
        restart: the run starts over: an earlier run's files are moved aside.
        keep: paths in the folder that are inputs, not the run's outputs (the synthetic data set
            written there by default), left in place when a run is moved aside.

    Returns:
        (the folder the old run was moved to or None, the stale temporary files removed).

    Raises:
        RunFolderError: the folder holds a run and neither `resume` nor `restart` is set, or both are.
    """
    if resume and restart:
        raise RunFolderError("resume and restart exclude each other: a run either continues or starts over")
    stale = remove_stale_temporaries(output_dir)
    found = run_files(output_dir)
    if resume or not found:
        return None, stale
    shown = ", ".join(dict.fromkeys(n for n in found if not n.endswith(DIGEST_SUFFIX)))
    if not restart:
        raise RunFolderError(
            f"{output_dir} holds a run ({shown}); continue it with --resume, or start over with --restart "
            f"(which moves it aside to {output_dir.name}.old-<time>/)"
        )
    moved = move_run_aside(output_dir, keep)
    logger.warning("--restart: moved the earlier run in %s (%s) to %s", output_dir, shown, moved)
    return moved, stale
