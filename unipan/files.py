"""Small file utilities without heavy imports: atomic writes, JSON, writable output folders.

`unipan.config` and the light CLI verbs use them, so this module must not import torch.

Errors of the file system (a full disk, a read-only folder) come out as `OSError`s that name the
file the caller asked for, never a temporary file beside it, so the command's one-line message
(`unipan.cli`) says which file could not be written and why.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_folder",
    "load_json",
    "save_json",
    "torch_load_failure",
]

TEMP_SUFFIX = ".tmp"
"""Temporary files of `atomic_write` are named `.<name>.<random>.tmp` beside their destination."""


def _naming(e: OSError, path: Path) -> OSError:
    """`e` again, naming `path` (the destination) instead of a temporary file; same errno subclass."""
    if e.errno is None:
        return e
    # OSError(errno, ...) constructs the matching subclass (PermissionError, ...)
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`.

    A reader never sees a half-written file, and a kill mid-write leaves the old file intact.

    Raises:
        OSError: naming `path` (not the temporary file) when the folder or the file cannot be
            written, e.g. errno ENOSPC on a full disk; the temporary file is removed and the old
            `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp, str(tmp)):
            raise _naming(e, path) from e
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def load_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a parse error names the file, line and column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def save_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None) -> None:
    """Write JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def check_writable_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """Create `path` (with its parents) when missing and check that a file can be created in it.

    Commands call this before any work, so a read-only or impossible output folder ends the
    command at once instead of after minutes of computation.

    Raises:
        OSError: one line naming `what` and `path` and why (exists as a file, read-only file
            system, permission denied, ...).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise OSError(errno.ENOTDIR, "exists and is not a folder", str(path))
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".unipan-write-check.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise OSError(f"{what} {path} cannot be written: {reason[:1].lower()}{reason[1:]}") from e
    return path


def torch_load_failure(e: BaseException) -> str:
    """Why `torch.load(weights_only=True)` failed, in a few words for the user.

    torch's messages run over many lines and advise retrying with `weights_only=False`, which
    would run whatever code a malicious file holds; unipan never does, so that advice is not
    passed on.
    """
    text = str(e)
    if isinstance(e, EOFError) or not text.strip():
        return "the file is empty or cut short"
    if "Weights only load failed" in text or type(e).__name__ == "UnpicklingError":
        if m := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
            return (
                f"it holds a pickled object ({m.group(1)}) that unipan does not load: a unipan checkpoint is "
                "tensors and plain data only"
            )
        return (
            "it is not a PyTorch checkpoint of tensors and plain data (a pickle of other objects, or not a checkpoint)"
        )
    if "zip archive" in text or "central directory" in text:
        return "not a complete PyTorch checkpoint (truncated, damaged, or another kind of file)"
    first = text.strip().splitlines()[0]
    return f"{type(e).__name__}: {first.split('. ')[0]}"
