"""Atomic checkpoints that load with `torch.load(weights_only=True)`, and the RNG state they carry.

A checkpoint is a dict of tensors and plain containers only (so the safe unpickler accepts it):

- "model", "optimizer", "scheduler": state dicts (optimizer/scheduler may be None);
- "iteration": completed iterations;
- "rng": this process's RNG states (python, numpy, torch, cuda) as tensors and plain numbers;
  "rng_per_rank": the same for every rank of a distributed run, in rank order;
- "config": the resolved `Config` as a dict; "meta": the `categories` list; "model_name";
- anything passed as `extra` (e.g. "scaler" for AMP), under its own key.

Files are written with `unipan.io.atomic_write` (temporary file + rename) and the
`last_checkpoint` pointer is rewritten only after the file it names is complete, so a kill at any
moment leaves the previous checkpoint usable; stale temporary files are never read.

Each checkpoint has its SHA-256 beside it, `<name>.sha256` in `sha256sum` format (`sha256sum -c`
checks it too), written once the checkpoint is in place. torch's zip reader checks no CRC, so a
flipped byte would otherwise load without complaint: `read_checkpoint` (the one reading path of
resume, eval, predict and `load_model_from_checkpoint`) compares the digest before loading and
rejects a damaged file naming it. A checkpoint without a digest file (written before digests, or
copied without it) loads unverified. Loads never unpickle code (`weights_only=True`), and their
errors are told in one line without torch's advice to retry with `weights_only=False`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from unipan.config import Config, config_to_dict
from unipan.io import atomic_write, atomic_write_text, torch_load_failure
from unipan.structures import DatasetMeta

if TYPE_CHECKING:
    from unipan.modeling.meta_arch import PanopticModel

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"
"""Name of the pointer file in an output folder; it holds the file name of the newest checkpoint."""

FINAL_CHECKPOINT = "model_final.pth"

DIGEST_SUFFIX = ".sha256"
"""A checkpoint's digest file is its name plus this suffix: `model_final.pth.sha256`."""

_PERIODIC_RE = re.compile(r"^model_(\d+)\.pth$")
_REQUIRED_KEYS = ("model", "iteration", "model_name", "meta")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: unreadable, another model, other classes, bad keys."""


def checkpoint_name(iteration: int) -> str:
    """File name of the periodic checkpoint after `iteration` completed iterations."""
    return f"model_{iteration:07d}.pth"


# --- RNG state as plain data -------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Every global RNG this process draws from, as tensors and plain numbers.

    Returns:
        {"python": {...}, "numpy": {...}, "torch": ByteTensor, "cuda": list[ByteTensor]}; the
        python Mersenne-Twister state is an Int64Tensor[625], numpy's an Int64Tensor[624].
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    cuda_states: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = list(torch.cuda.get_rng_state_all())
    return {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda_states,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs from `get_rng_state()`'s output (CUDA states only where devices match)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            npst["name"],
            npst["keys"].cpu().numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda_states])
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


class preserve_rng_state:  # noqa: N801 - used as a context manager, reads like one
    """Context manager: whatever runs inside leaves the global RNGs as they were.

    Evaluation and data loading run inside it so they never shift the training's random stream.
    """

    def __enter__(self) -> None:
        self._state = get_rng_state()

    def __exit__(self, *exc: object) -> None:
        set_rng_state(self._state)


# --- save / load ---------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the real model in .module; checkpoints hold the real one
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    iteration: int,
    cfg: Config,
    meta: DatasetMeta,
    extra: dict[str, Any] | None = None,
    rng_per_rank: list[dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file beside `path`, then rename).

    Args:
        path: destination file.
        model: the model (a DDP wrapper is unwrapped).
        optimizer: its state is stored when given.
        scheduler: its state is stored when given.
        iteration: number of completed iterations.
        cfg: the resolved config (stored as a dict).
        meta: the dataset's class information (stored as its categories list).
        extra: more entries; each must be tensors/plain containers (e.g. {"scaler": ...}).
        rng_per_rank: RNG states of every rank of a distributed run, in rank order.

    Raises:
        ValueError: when `extra` overwrites a reserved key.
    """
    ckpt: dict[str, Any] = {
        "model": _unwrap(model).state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "iteration": int(iteration),
        "rng": get_rng_state(),
        "config": config_to_dict(cfg),
        "meta": meta.to_coco_categories(),
        "model_name": cfg.model.name,
    }
    if rng_per_rank is not None:
        ckpt["rng_per_rank"] = rng_per_rank
    for key, value in (extra or {}).items():
        if key in ckpt:
            raise ValueError(f"checkpoint extra key {key!r} is reserved")
        ckpt[key] = value
    path = Path(path)
    digest_path = _digest_path(path)
    digest = ""

    def write(tmp: Path) -> None:
        nonlocal digest
        _torch_save(ckpt, tmp, path)
        digest = sha256_file(tmp)
        # the old digest goes before the new file takes its name: a kill in between leaves a file
        # without a digest (loaded unverified), never a digest that condemns a good file
        digest_path.unlink(missing_ok=True)

    atomic_write(path, write)
    atomic_write_text(digest_path, f"{digest}  {path.name}\n")


def _torch_save(ckpt: dict[str, Any], tmp: Path, path: Path) -> None:
    """torch.save to a file path, its C++ writer's failures turned into an OSError naming `path`."""
    try:
        torch.save(ckpt, tmp)
    except RuntimeError as e:
        # torch's C++ zip writer reports a full disk as a RuntimeError ("PytorchStreamWriter failed
        # writing file ...", "[enforce fail at inline_container.cc] unexpected pos ..."): no errno
        text = str(e)
        if not any(s in text for s in ("inline_container", "PytorchStreamWriter", "write")):
            raise
        free = shutil.disk_usage(path.parent).free
        first = text.splitlines()[0] if text else type(e).__name__
        if free < 64 * 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise OSError(errno.EIO, f"cannot write the checkpoint ({first})", str(path)) from e


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def verify_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Check a checkpoint file against its digest file.

    Returns:
        True when the digest matches, False when there is no digest file (nothing to check).

    Raises:
        CheckpointError: naming the file when its bytes differ from the digest written with it,
            or the digest file is unreadable.
    """
    path = Path(path)
    digest_path = _digest_path(path)
    if not digest_path.is_file():
        return False
    try:
        recorded = digest_path.read_text(encoding="utf-8").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {path}: its digest file {digest_path.name} is unreadable (remove it to load the "
            "checkpoint unverified)"
        ) from e
    if not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise CheckpointError(
            f"checkpoint {path}: its digest file {digest_path.name} holds no SHA-256 (remove it to load the "
            "checkpoint unverified)"
        )
    if sha256_file(path) != recorded:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its bytes differ from the SHA-256 recorded in {digest_path.name} "
            "when it was written"
        )
    return True


def write_last_checkpoint(output_dir: str | os.PathLike[str], checkpoint: str | os.PathLike[str]) -> None:
    """Point `output_dir/last_checkpoint` at `checkpoint` (call only once that file is complete)."""
    atomic_write_text(Path(output_dir) / LAST_CHECKPOINT, Path(checkpoint).name + "\n")


def checkpoint_candidates(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of `output_dir`, newest first (what a resume tries in turn).

    The file the `last_checkpoint` pointer names comes first; when the pointer is missing or names
    a file that is gone, `model_final.pth` and then the periodic `model_NNNNNNN.pth` from the
    highest iteration down. Temporary files of an interrupted write (`.model_*.tmp`) are never
    considered.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found: list[Path] = []
    pointer = out / LAST_CHECKPOINT
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if name:
            target = out / name
            if target.is_file() and target.parent == out:
                found.append(target)
            else:
                logger.warning("%s names %s, which does not exist; looking for other checkpoints", pointer, name)
    if (out / FINAL_CHECKPOINT).is_file():
        found.append(out / FINAL_CHECKPOINT)
    periodic = sorted((int(m.group(1)), p) for p in out.iterdir() if (m := _PERIODIC_RE.match(p.name)) and p.is_file())
    found += [p for _, p in reversed(periodic)]
    return list(dict.fromkeys(found))


def find_last_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in `output_dir` (`checkpoint_candidates`' first), or None."""
    candidates = checkpoint_candidates(output_dir)
    return candidates[0] if candidates else None


def read_newest_intact_checkpoint(
    output_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `output_dir` that reads back intact, and its contents.

    A damaged or unreadable one is passed over with a warning naming it, and the next older one
    is tried, so a resume falls back to the last good state instead of stopping (or, without a
    digest check, silently loading flipped bytes).

    Returns:
        (path, checkpoint dict), or None when the folder has no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none of them is intact (names each).
    """
    problems = []
    for path in checkpoint_candidates(output_dir):
        try:
            ckpt = read_checkpoint(path, map_location)
        except CheckpointError as e:
            logger.warning("%s; trying an older checkpoint", e)
            problems.append(str(e))
            continue
        if problems:
            logger.warning("resuming from %s, the newest intact checkpoint", path)
        return path, ckpt
    if problems:
        raise CheckpointError(f"no intact checkpoint in {output_dir}: " + "; ".join(problems))
    return None


def _class_summary(categories: list[dict[str, Any]]) -> str:
    things = sum(1 for c in categories if int(c.get("isthing", 0)))
    return f"{things} thing / {len(categories) - things} stuff classes"


def _check_meta(path: Path, stored: list[dict[str, Any]], expect: DatasetMeta) -> None:
    try:
        stored_meta = DatasetMeta(stored)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: bad stored categories: {e}") from e
    if (stored_meta.num_things, stored_meta.num_stuff) != (expect.num_things, expect.num_stuff):
        raise CheckpointError(
            f"checkpoint {path} was trained with {_class_summary(stored)}, this model has "
            f"{expect.num_things} thing / {expect.num_stuff} stuff classes"
        )
    stored_ids = [(c.id, c.isthing) for c in stored_meta.categories]
    expect_ids = [(c.id, c.isthing) for c in expect.categories]
    if stored_ids != expect_ids:
        diff = [f"{a[0]}!={b[0]}" for a, b in zip(stored_ids, expect_ids, strict=True) if a != b]
        raise CheckpointError(
            f"checkpoint {path} was trained on other categories than this model's dataset "
            f"(same counts, different ids or order: {', '.join(diff[:10])})"
        )


def _load_model_state(path: Path, model: nn.Module, state: dict[str, Any]) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_diff = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shape_diff:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shape_diff:
            parts.append(f"shape mismatches ({len(shape_diff)}): {'; '.join(shape_diff[:20])}")
        raise CheckpointError(f"checkpoint {path} does not fit model {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file once (`torch.load(weights_only=True)`) and check it is a unipan one.

    The file is first checked against its digest (`verify_checkpoint`) when it has one. A
    checkpoint written before the config layout changed (config version 1) has its model state
    keys renamed to today's layout here, so every loader sees one layout.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a damaged file (digest mismatch), an unreadable one, or not a unipan
            checkpoint; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {torch_load_failure(e)}") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED_KEYS):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a unipan checkpoint (needs keys {list(_REQUIRED_KEYS)}, has {have})"
        )
    config = ckpt.get("config") or {}
    if int(config.get("config_version", 1)) == 1 and isinstance(ckpt["model"], dict):
        ckpt["model"] = _migrate_state_dict_v1(str(ckpt["model_name"]), ckpt["model"])
    return ckpt


def _migrate_state_dict_v1(model_name: str, state: dict[str, Any]) -> dict[str, Any]:
    """Model state keys of a version-1 checkpoint in today's module layout."""
    from unipan.modeling.heads.instance import V1_STATE_DICT_RENAMES, rename_state_dict_keys

    return rename_state_dict_keys(state, V1_STATE_DICT_RENAMES.get(model_name, []))


def restore_checkpoint(
    ckpt: dict[str, Any],
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    expect_model_name: str | None = None,
    expect_meta: DatasetMeta | None = None,
) -> None:
    """Restore what is passed in from a checkpoint dict read by `read_checkpoint` (named `path`).

    Checks run before anything is modified, so a rejected checkpoint leaves the model intact.

    Raises:
        CheckpointError: another model, other classes, missing/unexpected/mis-shaped parameters,
            optimizer/scheduler state that is absent or does not fit.
    """
    path = Path(path)
    if expect_model_name is not None and ckpt["model_name"] != expect_model_name:
        raise CheckpointError(f"checkpoint {path} is for model {ckpt['model_name']!r}, not {expect_model_name!r}")
    if expect_meta is not None:
        _check_meta(path, ckpt["meta"], expect_meta)
    if optimizer is not None and ckpt.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {path} has no optimizer state to resume from")
    if scheduler is not None and ckpt.get("scheduler") is None:
        raise CheckpointError(f"checkpoint {path} has no scheduler state to resume from")
    if model is not None:
        _load_model_state(path, _unwrap(model), ckpt["model"])
    try:
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer/scheduler state does not fit ({e})") from e


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    expect_model_name: str | None = None,
    expect_meta: DatasetMeta | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """`read_checkpoint` then `restore_checkpoint`: what resuming a run needs.

    Returns:
        The whole checkpoint dict (RNG states are not applied here: see `set_rng_state`).

    Raises:
        FileNotFoundError, CheckpointError: see `read_checkpoint` and `restore_checkpoint`.
    """
    ckpt = read_checkpoint(path, map_location)
    restore_checkpoint(ckpt, path, model, optimizer, scheduler, expect_model_name, expect_meta)
    return ckpt


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint (see `load_model_from_checkpoint`)."""

    model: PanopticModel
    meta: DatasetMeta
    cfg: Config


def load_model_from_checkpoint(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    cfg: Config | None = None,
    overrides: Sequence[str] = (),
) -> LoadedModel:
    """The one path from a checkpoint file to a model in eval mode (eval, predict, demo).

    One policy: the checkpoint's stored model section is the truth. `cfg` (the user's config file)
    contributes everything else (data, solver, engine); `model.*` overrides apply on top of the
    stored model section and may change what leaves the weights' layout alone (thresholds, fusion
    settings, oracle switches): one that changes a parameter's shape fails the strict load. The
    backbone's ImageNet file is not read again: the checkpoint holds the trained weights.

    Args:
        path: the checkpoint.
        device: where the model goes.
        cfg: the user's resolved config (None: the stored one for everything).
        overrides: dotted `key=value` overrides; the `model.*` ones are applied here.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, not a unipan checkpoint, a bad stored config or override,
            or weights that do not fit the model the config builds (names the keys).
    """
    from unipan.config import ConfigError, config_from_dict
    from unipan.modeling.registry import build_model

    path = Path(path)
    ckpt = read_checkpoint(path)
    model_overrides = [o for o in overrides if o.startswith("model.")]
    if any(o.startswith("model.name=") for o in model_overrides):
        raise CheckpointError(
            f"checkpoint {path} holds a {ckpt['model_name']!r} model; model.name cannot be overridden"
        )
    try:
        stored = config_from_dict(ckpt.get("config") or {}, model_overrides)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    # the weights below overwrite the trunk: its ImageNet file may be gone, or on another machine
    stored.model.backbone.weights = ""
    if stored.model.name != ckpt["model_name"]:
        raise CheckpointError(
            f"checkpoint {path}: its config names model {stored.model.name!r}, its weights {ckpt['model_name']!r}"
        )
    cfg = stored if cfg is None else dataclasses.replace(cfg, model=stored.model)
    try:
        meta = DatasetMeta(ckpt["meta"], name=path.stem)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: bad stored categories: {e}") from e
    model = build_model(cfg, meta)
    _load_model_state(path, model, ckpt["model"])
    return LoadedModel(model=model.to(device).eval(), meta=meta, cfg=cfg)
