"""The training loop: one code path for 1 process or many (`torchrun --nproc_per_node N`).

One iteration: next batch -> forward (autocast on CUDA with AMP) -> sum of the model's weighted
losses -> backward -> optional gradient clipping -> SGD step -> scheduler step. Around it: logging
every `log_period`, PQ on the val split every `eval_period` and at the end, atomic checkpoints
every `checkpoint_period` and at the end (`model_final.pth`).

Exact resume: the data order is a pure function of the iteration (see `sampler.py`), random
augmentation is seeded per stream position, evaluation and data loading never touch the
training's RNGs, and a checkpoint stores model, optimizer, scheduler, AMP scaler, the iteration
and every rank's RNG states. `train(cfg, resume=True)` after a stop or a kill therefore ends with
the same weights as an uninterrupted run (bit-identical on CPU with a deterministic model). It
resumes from the newest checkpoint that reads back intact (digest checked), passing over a
damaged one with a warning; the backbone's ImageNet file is not needed then.

The run owns its folder (`unipan.engine.run_dir`): a lock for its life, and a folder holding an
earlier run is refused unless the run resumes it or restarts (moving the old run aside). Why a
run stopped (a non-finite loss, Ctrl-C, a full disk, ...) is the last line of its log.txt; Ctrl-C
raises `TrainingInterrupted`, whose message names the iteration and the checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.contrib.logging import logging_redirect_tqdm

from unipan.config import Config, DataConfig, config_to_dict, save_config
from unipan.engine import distributed as du
from unipan.engine.checkpoint import (
    FINAL_CHECKPOINT,
    checkpoint_name,
    get_rng_state,
    read_newest_intact_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    set_rng_state,
    write_last_checkpoint,
)
from unipan.engine.evaluator import EvalResult, evaluate
from unipan.engine.metrics import LOSS_CURVE_FILE, MetricsWriter, plot_loss_curve, read_metrics, run_logging
from unipan.engine.run_dir import hold_run_folder, prepare_run_folder
from unipan.engine.sampler import IterationBatchSampler, SeededDataset, derive_seed
from unipan.engine.schedule import build_optimizer, build_scheduler
from unipan.modeling.meta_arch import check_losses, model_size_divisibility
from unipan.structures import Batch, DatasetMeta, Sample
from unipan.threads import wait_setting_chosen

logger = logging.getLogger(__name__)

__all__ = [
    "EvalResult",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "resolve_device",
    "seed_everything",
    "train",
]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training; the message names the iteration and what `--resume` continues from."""


@dataclasses.dataclass
class TrainResult:
    """What `train` returns (on every rank).

    Attributes:
        final_metrics: the last evaluation's metrics (PQ, SQ, RQ, ... in percent) plus
            "iteration" and the last logged "total_loss"; no PQ keys when there is no val split.
        output_dir: the run folder.
        checkpoint: the final checkpoint (`model_final.pth`).
    """

    final_metrics: dict[str, float]
    output_dir: Path
    checkpoint: Path


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global RNGs (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int = 0, what: str = "engine.device") -> torch.device:
    """The torch device of a device name.

    "auto" -> cuda:<local_rank> when CUDA is available, else cpu; "cuda" -> cuda:<local_rank>;
    "cuda:N" -> that GPU.

    Args:
        name: auto | cpu | cuda | cuda:N.
        local_rank: the process's GPU under torchrun.
        what: how the user named the setting, for the error (`engine.device`, `--device`).

    Raises:
        ValueError: unknown name, or a GPU that is not there (one line).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} is {name!r} but no CUDA device is available (use cpu)")
    index = local_rank if match.group(1) is None else int(match.group(1))
    if index >= torch.cuda.device_count():
        raise ValueError(f"{what} is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def _has_val_split(cfg: DataConfig) -> bool:
    if cfg.dataset == "synthetic":
        return cfg.synth_val > 0
    return bool(cfg.val_images and cfg.val_panoptic and cfg.val_json)


def _build_split(cfg: Config, split: str, is_train: bool, output_dir: Path) -> Dataset[Sample]:
    from unipan.data.build import build_dataset

    # rank 0 goes first so that a dataset which writes files (the synthetic set) is written once
    if du.is_main_process():
        dataset = build_dataset(cfg.data, split, is_train, output_dir=output_dir)
    du.barrier()
    if not du.is_main_process():
        dataset = build_dataset(cfg.data, split, is_train, output_dir=output_dir)
    return dataset


def _checkpoint_to_resume(output_dir: Path, is_main: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest intact checkpoint of the run folder and its contents (rank 0 chooses, all read it)."""
    from unipan.engine.checkpoint import CheckpointError, read_checkpoint

    chosen: tuple[Path, dict[str, Any]] | None = None
    outcome: Path | CheckpointError | None = None
    if is_main:
        try:
            chosen = read_newest_intact_checkpoint(output_dir)
            outcome = None if chosen is None else chosen[0]
        except CheckpointError as e:
            outcome = e
    outcome = du.broadcast_object(outcome)  # every rank resumes from the same file, or stops
    if isinstance(outcome, CheckpointError):
        raise outcome
    if outcome is None:
        return None, None
    return outcome, chosen[1] if chosen is not None else read_checkpoint(outcome)


def _dataset_meta(dataset: Dataset[Sample], what: str) -> DatasetMeta:
    meta = getattr(dataset, "meta", None)
    if not isinstance(meta, DatasetMeta):
        raise ValueError(f"{what} dataset {type(dataset).__name__} has no DatasetMeta `.meta`; pass meta= to train()")
    return meta


def _config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_config_diff(a, b, prefix=f"{name}."))
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs


@dataclasses.dataclass
class _Progress:
    """Where a run is: for the message when Ctrl-C stops it."""

    max_iter: int
    iteration: int  # completed iterations
    checkpoint: Path | None = None
    checkpoint_iteration: int = 0

    def interrupted(self) -> str:
        at = f"interrupted at iteration {self.iteration + 1} of {self.max_iter}"
        if self.checkpoint is None:
            return f"{at}; no checkpoint yet, so --resume starts from the beginning"
        return f"{at}; --resume continues from {self.checkpoint} (iteration {self.checkpoint_iteration})"


class _Averager:
    """Means of scalars since the last log."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def pop(self) -> dict[str, float]:
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


def _worker_init(worker_id: int) -> None:
    # each data worker is one more process on the same cores: one intra-op thread each
    torch.set_num_threads(1)


def train(
    cfg: Config,
    resume: bool = False,
    model: nn.Module | None = None,
    train_set: Dataset[Sample] | None = None,
    val_set: Dataset[Sample] | None = None,
    meta: DatasetMeta | None = None,
    restart: bool = False,
) -> TrainResult:
    """Train a model as `cfg` says; evaluate, checkpoint and log along the way.

    Builds what is not passed in: datasets with `unipan.data.build.build_dataset` (the val split
    only when the config names one), the model with `unipan.modeling.registry.build_model`.
    Joins the process group when launched by torchrun (WORLD_SIZE > 1) and leaves it at the end
    if it joined it here.

    Writes to `cfg.engine.output_dir`: config.yaml (resolved), log.txt, metrics.jsonl, tb/
    (TensorBoard), model_NNNNNNN.pth every `checkpoint_period`, model_final.pth, the
    `last_checkpoint` pointer and loss_curve.png (rank 0 writes; evaluation stays in memory).

    Args:
        cfg: the resolved config.
        resume: continue from the newest intact checkpoint in the output folder (from scratch
            when there is none).
        model: a model to train instead of building one (checkpoints still carry
            `cfg.model.name`).
        train_set: a dataset of `Sample`s to train on instead of building one.
        val_set: a dataset of `Sample`s to evaluate on instead of building one.
        meta: class information; defaults to `train_set.meta`.
        restart: start over in a folder that holds a run: its files are moved aside to
            `<output_dir>.old-<time>/` first (never deleted).

    Returns:
        TrainResult (identical on every rank).

    Raises:
        RunFolderError (a ValueError): the output folder is in use by another run, or holds a run
            and neither `resume` nor `restart` is given.
        OSError: the output folder cannot be written, or a write failed (a full disk: errno
            ENOSPC, naming the file; the last good checkpoint stays).
        ValueError: inconsistent config (batch size not divisible by the number of processes,
            unknown device or schedule), or a checkpoint of another model / other classes.
        CheckpointError (a ValueError): `resume` found checkpoints but none intact.
        FloatingPointError: a loss became NaN or infinite (names the iteration and the losses).
        TrainingInterrupted: Ctrl-C; names the iteration and the checkpoint to resume from.
    """
    created_group = not du.is_dist_initialized()
    rank, world_size, local_rank = du.init_distributed(cfg.engine.device)
    output_dir = Path(cfg.engine.output_dir)
    try:
        with contextlib.ExitStack() as folder:
            problem: BaseException | None = None
            if rank == 0:
                try:
                    folder.enter_context(hold_run_folder(output_dir))
                    prepare_run_folder(output_dir, resume, restart, keep=_inputs_in(cfg, output_dir))
                except (OSError, ValueError) as e:
                    problem = e
            if world_size > 1:
                # every rank stops when rank 0 cannot have the folder
                problem = du.broadcast_object(problem)
            if problem is not None:
                raise problem
            with run_logging(output_dir, rank) as log_file:
                try:
                    return _train(cfg, resume, model, train_set, val_set, meta, rank, world_size, local_rank)
                except BaseException as e:
                    _log_why_the_run_stopped(log_file, e)
                    raise
    finally:
        if created_group:
            du.cleanup()


def _inputs_in(cfg: Config, output_dir: Path) -> list[Path]:
    """Inputs a run may keep in its own folder: the synthetic set, by default <output_dir>/synthetic."""
    from unipan.data.build import synthetic_root

    if cfg.data.dataset != "synthetic":
        return []
    return [synthetic_root(cfg.data, output_dir)]


# errors whose message says it all; any other ending gets its traceback in log.txt
_TOLD_IN_ONE_LINE = (ValueError, OSError, FloatingPointError, KeyboardInterrupt)


def _log_why_the_run_stopped(log_file: logging.Handler | None, e: BaseException) -> None:
    """The last line of log.txt says why the run stopped (the console gets it from the command)."""
    if log_file is None:
        return
    told = isinstance(e, _TOLD_IN_ONE_LINE)
    message = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror}"
    record = logger.makeRecord(
        logger.name,
        logging.ERROR,
        __file__,
        0,
        "run stopped: %s",
        (message if told else f"{type(e).__name__}: {message}",),
        None if told else (type(e), e, e.__traceback__),
    )
    log_file.handle(record)


def _train(  # noqa: C901 - the run set-up in order, kept whole until the step is split out
    cfg: Config,
    resume: bool,
    model: nn.Module | None,
    train_set: Dataset[Sample] | None,
    val_set: Dataset[Sample] | None,
    meta: DatasetMeta | None,
    rank: int,
    world_size: int,
    local_rank: int,
) -> TrainResult:
    eng, solver = cfg.engine, cfg.solver
    output_dir = Path(eng.output_dir)
    is_main = rank == 0
    device = resolve_device(eng.device, local_rank)
    if eng.num_threads > 0:
        torch.set_num_threads(eng.num_threads)
    if device.type == "cpu" and torch.get_num_threads() > 1 and not wait_setting_chosen():
        # the `unipan` command sets the wait policy before torch loads (unipan.threads); a caller of
        # train() that imported torch first runs with torch's long-spinning OpenMP threads
        logger.info(
            "no OpenMP wait setting (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME) is set: torch's %d threads spin "
            "while idle, so beside another CPU-bound process a step can cost several times its quiet time; set "
            "OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=3000 before importing torch (the unipan command does) "
            "or engine.num_threads=1",
            torch.get_num_threads(),
        )
    if solver.max_iter <= 0:
        raise ValueError(f"solver.max_iter must be > 0, got {solver.max_iter}")
    if solver.batch_size <= 0 or solver.batch_size % world_size:
        raise ValueError(
            f"solver.batch_size={solver.batch_size} must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    batch_per_rank = solver.batch_size // world_size
    if cfg.data.dataset == "synthetic" and not cfg.data.synth_root:
        # the documented default place, made explicit in the saved config
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synth_root=str(output_dir / "synthetic")))

    seed_everything(eng.seed)
    if train_set is None:
        train_set = _build_split(cfg, "train", True, output_dir)
    if meta is None:
        meta = _dataset_meta(train_set, "training")
    elif getattr(train_set, "meta", None) not in (None, meta):
        raise ValueError(f"meta passed to train() ({meta!r}) differs from the training set's {train_set.meta!r}")
    if val_set is None and _has_val_split(cfg.data):
        val_set = _build_split(cfg, "val", False, output_dir)
    if val_set is None:
        logger.warning("no validation split configured: training without PQ evaluation")
    found, ckpt = _checkpoint_to_resume(output_dir, is_main) if resume else (None, None)
    if model is None:
        from unipan.modeling.registry import build_model

        built_cfg = cfg
        if ckpt is not None and cfg.model.backbone.weights:
            # the checkpoint's weights replace the trunk's: its ImageNet file may be gone by now
            built_cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, backbone=dataclasses.replace(cfg.model.backbone, weights=""))
            )
        model = build_model(built_cfg, meta)
    model.to(device)
    optimizer = build_optimizer(solver, model)
    scheduler = build_scheduler(solver, optimizer)
    use_amp = solver.amp and device.type == "cuda"
    if solver.amp and not use_amp:
        logger.info("solver.amp is ignored on %s (mixed precision runs on CUDA only)", device)
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_iter = 0
    if resume:
        if found is None or ckpt is None:
            logger.info("resume: no checkpoint in %s, starting from scratch", output_dir)
        else:
            restore_checkpoint(
                ckpt, found, model, optimizer, scheduler, expect_model_name=cfg.model.name, expect_meta=meta
            )
            start_iter = int(ckpt["iteration"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            diffs = _config_diff(ckpt.get("config") or {}, config_to_dict(cfg))
            if diffs:
                logger.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(diffs))
            logger.info("resumed from %s at iteration %d", found, start_iter)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    logger.info(
        "training %s on %s: %d iterations from %d, batch %d (%d per process x %d), %d training images",
        type(model).__name__,
        device,
        solver.max_iter,
        start_iter,
        solver.batch_size,
        batch_per_rank,
        world_size,
        len(train_set),  # type: ignore[arg-type]
    )

    train_model: nn.Module = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # heads may sit out an iteration (no instance in the batch); DDP must not wait for them
            find_unused_parameters=True,
        )
    sampler = IterationBatchSampler(
        len(train_set),  # type: ignore[arg-type]
        batch_per_rank,
        world_size,
        rank,
        seed=eng.seed,
        start_iter=start_iter,
    )
    from unipan.data.collate import Collate

    loader = DataLoader(
        SeededDataset(train_set),
        batch_sampler=sampler,
        # batches are padded as the model needs (its backbone's size divisibility)
        collate_fn=Collate(model_size_divisibility(model)),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
        # its own generator: creating the loader's iterator must not draw from the global RNG
        generator=torch.Generator().manual_seed(eng.seed),
    )
    writer = MetricsWriter(output_dir, start_iter=start_iter, enabled=is_main)
    final_ckpt = output_dir / FINAL_CHECKPOINT
    progress = _Progress(solver.max_iter, start_iter, found, start_iter if found is not None else 0)

    # The training RNG stream: restored on resume, else seeded per rank (ranks draw differently).
    if ckpt is not None:
        per_rank = ckpt.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == world_size:
            set_rng_state(per_rank[rank])
        elif world_size == 1:
            set_rng_state(ckpt["rng"])
        else:
            logger.warning("checkpoint RNG states are for another number of processes; reseeding")
            seed_everything(derive_seed(eng.seed, rank, start_iter))
    else:
        seed_everything(derive_seed(eng.seed, rank))

    def save(iteration: int, path: Path) -> None:
        rng_all = du.all_gather_object(get_rng_state()) if world_size > 1 else None
        if is_main:
            extra = {"scaler": scaler.state_dict()} if scaler is not None else None
            save_checkpoint(
                path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                iteration=iteration,
                cfg=cfg,
                meta=meta,
                extra=extra,
                rng_per_rank=rng_all,
            )
            # the pointer moves only once the file it names is complete
            write_last_checkpoint(output_dir, path)
            logger.info("saved %s", path)
        du.barrier()
        progress.checkpoint, progress.checkpoint_iteration = path, iteration

    def run_eval(iteration: int) -> dict[str, float]:
        assert val_set is not None and meta is not None
        # BatchNorm running statistics drift apart per rank between DDP's broadcasts; evaluate
        # every shard with rank 0's, the ones the checkpoint stores
        du.broadcast_buffers(model)
        result = evaluate(
            model,
            val_set,
            meta,
            device,
            max_images=eng.eval_max_images,
            batch_size=1,
            num_workers=0,
        )
        if is_main:
            # the per-class table only at the end: 133 rows every eval_period would bury the log
            table = result.pq.table(per_class=iteration >= solver.max_iter)
            logger.info("evaluation at iteration %d:\n%s", iteration, table)
        return result.metrics

    last_record: dict[str, Any] = {}
    final_eval: dict[str, float] = {}
    bar = _progress_bar(solver.max_iter, start_iter, enabled=is_main)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(writer.close)
            stack.callback(bar.close)
            console = [lg for lg in (logging.getLogger("unipan"), logging.getLogger()) if _has_console_handler(lg)]
            if is_main and console:
                # console log lines go through tqdm.write so they do not tear the progress bar
                stack.enter_context(logging_redirect_tqdm(console))
            if start_iter < solver.max_iter:
                last_record, final_eval = _loop(
                    train_model,
                    model,
                    loader,
                    optimizer,
                    scheduler,
                    scaler,
                    cfg,
                    device,
                    progress,
                    writer,
                    bar,
                    save,
                    run_eval if val_set is not None else None,
                    final_ckpt,
                )
            else:
                logger.info(
                    "checkpoint is at iteration %d >= max_iter %d: nothing to train", start_iter, solver.max_iter
                )
                if val_set is not None:
                    final_eval = run_eval(start_iter)
    except KeyboardInterrupt as e:
        raise TrainingInterrupted(progress.interrupted()) from e
    if is_main and plot_loss_curve(
        read_metrics(output_dir / "metrics.jsonl"),
        output_dir / LOSS_CURVE_FILE,
        title=f"{cfg.model.name} ({output_dir.name})",
    ):
        logger.info("loss curve: %s", output_dir / LOSS_CURVE_FILE)
    final = {"iteration": float(max(start_iter, solver.max_iter))}
    if "total_loss" in last_record:
        final["total_loss"] = float(last_record["total_loss"])
    final.update(final_eval)
    # a run resumed past its max_iter trains nothing and writes no model_final.pth of its own
    checkpoint = final_ckpt if final_ckpt.is_file() or found is None else found
    return TrainResult(final_metrics=final, output_dir=output_dir, checkpoint=checkpoint)


def _has_console_handler(lg: logging.Logger) -> bool:
    return any(
        isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
        for h in lg.handlers
    )


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train", unit="it", smoothing=0.1
    )


def _loop(
    train_model: nn.Module,
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    device: torch.device,
    progress: _Progress,
    writer: MetricsWriter,
    bar: Any,
    save: Callable[[int, Path], None],
    run_eval: Callable[[int], dict[str, float]] | None,
    final_ckpt: Path,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Iterations progress.iteration .. max_iter - 1; returns the last log record and the final eval."""
    eng, solver = cfg.engine, cfg.solver
    max_iter = solver.max_iter
    start_iter = progress.iteration
    params = [p for p in model.parameters() if p.requires_grad]
    loss_keys: list[str] | None = None
    window = _Averager()
    last_record: dict[str, Any] = {}
    final_eval: dict[str, float] = {}
    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.float16))
        if scaler is not None
        else contextlib.nullcontext
    )
    train_model.train()
    data_iter: Iterator[Batch] = iter(loader)
    for iteration in range(start_iter, max_iter):
        progress.iteration = iteration
        t0 = time.perf_counter()
        batch = next(data_iter).to(device)
        t_data = time.perf_counter() - t0
        lr = float(optimizer.param_groups[0]["lr"])
        with autocast():
            losses = train_model(batch)
        loss_keys = check_losses(losses, model, loss_keys)
        total = sum((losses[k].float() for k in loss_keys), torch.zeros((), device=device))
        # one small all-reduce: every rank sees the same values, so all ranks stop together on NaN
        values = torch.stack([losses[k].detach().float().reshape(()) for k in loss_keys] + [total.detach()])
        if du.get_world_size() > 1:
            values = du.all_reduce_sum(values.to(du.backend_device()))
        reduced = _reduced_losses(values, loss_keys)
        if not all(math.isfinite(v) for v in reduced.values()):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
            raise FloatingPointError(f"iteration {iteration + 1}: loss is not finite ({shown})")
        optimizer.zero_grad(set_to_none=True)
        grad_norm: float | None = None
        if scaler is not None:
            scaler.scale(total).backward()
            if solver.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm))
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            if solver.clip_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, solver.clip_grad_norm))
            optimizer.step()
        scheduler.step()
        done = iteration + 1
        t_iter = time.perf_counter() - t0
        # times are averaged since the last log; losses are this iteration's (mean over ranks), so
        # a resumed run logs exactly what the uninterrupted one did
        timing = {"time": t_iter, "data_time": t_data}
        window.add(timing)
        bar.set_postfix(loss=f"{reduced['total_loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)

        record: dict[str, Any] = {}
        if (eng.log_period > 0 and done % eng.log_period == 0) or done == max_iter:
            record = {"iteration": done, "lr": lr, **reduced, **window.pop()}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            last_record = record
        if run_eval is not None and (done == max_iter or (eng.eval_period > 0 and done % eng.eval_period == 0)):
            metrics = run_eval(done)
            record = {"iteration": done, **record, "eval": metrics}
            if done == max_iter:
                final_eval = metrics
        if record:
            writer.write(record)
        if done == max_iter:
            save(done, final_ckpt)
        elif eng.checkpoint_period > 0 and done % eng.checkpoint_period == 0:
            save(done, final_ckpt.parent / checkpoint_name(done))
    return last_record, final_eval


def _reduced_losses(values: Tensor, keys: list[str]) -> dict[str, float]:
    world = du.get_world_size()
    as_list = [float(v) / world for v in values.tolist()]
    out = dict(zip(keys, as_list[:-1], strict=True))
    out["total_loss"] = as_list[-1]
    return out
