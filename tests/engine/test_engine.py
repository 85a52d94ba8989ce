"""Training engine: schedules, sampler, checkpoints, exact resume (also after SIGKILL), outputs.

The tiny model and toy dataset here are deterministic on CPU and cheap (32x32 images, a two-conv
network), so resume equality can be checked bit for bit; `test_distributed.py` reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import Dataset

from unipan.config import Config, load_config
from unipan.data.common import make_sample
from unipan.engine.checkpoint import (
    LAST_CHECKPOINT,
    CheckpointError,
    find_last_checkpoint,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from unipan.engine.sampler import IterationBatchSampler, SeededDataset, epoch_permutation
from unipan.engine.schedule import WarmupPolyLR, WarmupStepLR, build_optimizer, build_scheduler
from unipan.engine.trainer import train
from unipan.modeling.meta_arch import PanopticModel
from unipan.structures import (
    IGNORE_LABEL,
    Batch,
    DatasetMeta,
    PanopticResult,
    PanopticTarget,
    RawPrediction,
    Sample,
    SegmentInfo,
)

TESTS = Path(__file__).resolve().parent
SIZE = 32

# --- tiny deterministic stand-ins (a real model/dataset would make these tests minutes long) ------


def toy_meta(num_things: int = 2, num_stuff: int = 2) -> DatasetMeta:
    cats = [{"id": 10 + i, "name": f"stuff{i}", "isthing": 0, "color": [40 * i, 200, 40]} for i in range(num_stuff)] + [
        {"id": 1 + i, "name": f"thing{i}", "isthing": 1, "color": [200, 40 * i, 40]} for i in range(num_things)
    ]
    return DatasetMeta(cats, name="toy")


class ToyPanoptic(Dataset[Sample]):
    """Two stuff bands and up to two rectangles of thing classes; colours encode the class.

    Training items flip horizontally with probability 0.5 using the global torch RNG, the way a
    real transform draws, so the engine's per-sample seeding is exercised.
    """

    def __init__(self, n: int, meta: DatasetMeta, seed: int = 0, train: bool = True) -> None:
        self.n, self.meta, self.seed, self.train = n, meta, seed, train

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        img, pan, segments = self._raw(index)
        return make_sample(img, pan, segments, self.meta, f"img{index:03d}", transform=self._transform)

    def original_panoptic(self, index: int) -> tuple[np.ndarray, list[SegmentInfo]]:
        _, pan, segments = self._raw(index)
        return pan, segments

    def _raw(self, index: int) -> tuple[np.ndarray, np.ndarray, list[SegmentInfo]]:
        rng = np.random.default_rng([self.seed, index])
        pan = np.zeros((SIZE, SIZE), dtype=np.int32)
        img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        segments: list[SegmentInfo] = []
        split = int(rng.integers(8, 24))
        stuff = self.meta.stuff_categories
        for k, (y0, y1) in enumerate(((0, split), (split, SIZE))):
            cat = stuff[k % len(stuff)]
            pan[y0:y1] = 100 + k
            img[y0:y1] = cat.color
            segments.append(SegmentInfo(id=100 + k, category_id=cat.id, isthing=False))
        for j in range(int(rng.integers(1, 3))):
            cat = self.meta.thing_categories[int(rng.integers(0, self.meta.num_things))]
            y, x = (int(v) for v in rng.integers(0, SIZE - 10, size=2))
            h, w = (int(v) for v in rng.integers(5, 10, size=2))
            pan[y : y + h, x : x + w] = 1 + j
            img[y : y + h, x : x + w] = cat.color
            segments.append(SegmentInfo(id=1 + j, category_id=cat.id, isthing=True))
        pan[0, :3] = 0  # a little void
        noise = rng.integers(0, 30, size=img.shape)
        img = np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)
        segments = [s for s in segments if (pan == s.id).any()]
        return img, pan, segments

    def _transform(self, image: Tensor, panoptic: Tensor) -> tuple[Tensor, Tensor]:
        if self.train and float(torch.rand(())) < 0.5:
            image, panoptic = image.flip(-1), panoptic.flip(-1)
        return (image - 128.0) / 64.0, panoptic


def connected_components_fusion(
    raw: RawPrediction, meta: DatasetMeta, *, image_id: str = "", original_size: tuple[int, int] | None = None
) -> PanopticResult:
    """Panoptic map of per-pixel "all"-space logits: one segment per stuff class present, one per
    connected component of each thing class (TinyModel's fusion)."""
    cls = raw.sem_logits.argmax(0).cpu().numpy()
    pan = np.zeros(cls.shape, dtype=np.int32)
    segments: list[SegmentInfo] = []
    next_id = 1
    for class_index, category_id in enumerate(meta.class_index_to_dataset_id):
        region = cls == class_index
        if not region.any():
            continue
        if meta.isthing(category_id):
            labels, count = ndimage.label(region)
            parts = [labels == k for k in range(1, count + 1)]
        else:
            parts = [region]
        for part in parts:
            pan[part] = next_id
            segments.append(SegmentInfo(id=next_id, category_id=category_id, isthing=meta.isthing(category_id)))
            next_id += 1
    return PanopticResult(torch.from_numpy(pan), segments, image_id)


def _no_instances(sem_logits: Tensor) -> RawPrediction:
    """A RawPrediction of semantic logits alone (the test doubles detect no instance)."""
    device = sem_logits.device
    return RawPrediction(
        boxes=torch.zeros((0, 4), device=device),
        scores=torch.zeros(0, device=device),
        labels=torch.zeros(0, dtype=torch.long, device=device),
        sem_logits=sem_logits,
        sem_space="all",
    )


class TinyModel(PanopticModel):
    """Per-pixel classifier over the all-classes space; panoptic output by connected components.

    Batches are padded to multiples of 8 (its `size_divisibility`).

    Args:
        dropout: >0 makes training draw from the torch RNG (to test RNG restore on resume).
        crash_at: raise RuntimeError on this training forward call (1-based), simulating a stop.
        nan_at: make a loss NaN on this training forward call.
    """

    def __init__(self, meta: DatasetMeta, dropout: float = 0.0, crash_at: int = 0, nan_at: int = 0) -> None:
        super().__init__(meta=meta, size_divisibility=8, fuse=connected_components_fusion)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout2d(dropout)
        self.conv2 = nn.Conv2d(8, meta.num_classes, 1)
        self.crash_at, self.nan_at, self.calls = crash_at, nan_at, 0

    def logits(self, batch: Batch) -> Tensor:
        return self.conv2(self.drop(F.relu(self.conv1(batch.images))))

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        logits = self.logits(batch)
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        assert batch.targets is not None
        # per-image means, then the batch mean: equal for 1 x 4 and 2 x 2 images (DDP test)
        per_image = [
            F.cross_entropy(logits[i : i + 1, :, :h, :w], t.sem_seg[None], ignore_index=IGNORE_LABEL)
            for i, ((h, w), t) in enumerate(zip(batch.image_sizes, batch.targets, strict=True))
        ]
        loss_sem = torch.stack(per_image).mean()
        loss_reg = 1e-3 * logits.pow(2).mean()
        if self.calls == self.nan_at:
            loss_reg = loss_reg * float("nan")
        return {"loss_sem": loss_sem, "loss_reg": loss_reg}

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        logits = self.logits(batch)
        return [_no_instances(logits[i, :, :h, :w]) for i, (h, w) in enumerate(batch.image_sizes)]


def ground_truth_fusion(gt: dict[str, PanopticTarget]) -> Callable[..., PanopticResult]:
    """A fusion that answers with the ground truth of the image it is asked about."""

    def fuse(
        raw: RawPrediction, meta: DatasetMeta, *, image_id: str = "", original_size: tuple[int, int] | None = None
    ) -> PanopticResult:
        t = gt[image_id]
        return PanopticResult(t.panoptic.clone(), [s for s in t.segments if not s.iscrowd], image_id)

    return fuse


class OracleModel(PanopticModel):
    """Returns the ground truth as its prediction (PQ must be 100); batches padded to 8."""

    def __init__(self, dataset: ToyPanoptic) -> None:
        gt = {s.image_id: s.target for s in (dataset[i] for i in range(len(dataset)))}
        super().__init__(meta=dataset.meta, size_divisibility=8, fuse=ground_truth_fusion(gt))
        self.weight = nn.Parameter(torch.zeros(1))

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        assert batch.targets is None, "evaluation must not hand ground truth to the model"
        assert batch.images.shape[-1] % 8 == 0 and batch.images.shape[-2] % 8 == 0
        c = self.meta.num_classes
        return [_no_instances(torch.zeros(c, h, w)) for h, w in batch.image_sizes]


def tiny_config(out: Path, **engine: object) -> Config:
    cfg = load_config(
        overrides=[
            f"engine.output_dir={out}",
            "engine.device=cpu",
            "engine.log_period=2",
            "engine.checkpoint_period=3",
            "engine.eval_period=0",
            "engine.seed=7",
            "solver.batch_size=4",
            "solver.lr=0.05",
            "solver.max_iter=8",
            "solver.warmup_iters=2",
            "solver.schedule=poly",
            "solver.clip_grad_norm=5.0",
            "data.num_workers=0",
        ]
        + [f"engine.{k}={v}" for k, v in engine.items()]
    )
    return cfg


def run_tiny(
    out: Path,
    resume: bool = False,
    model: nn.Module | None = None,
    dropout: float = 0.3,
    restart: bool = False,
    **engine: object,
):
    meta = toy_meta()
    torch.manual_seed(0)  # the model's init; train() seeds its own stream afterwards
    model = model if model is not None else TinyModel(meta, dropout=dropout)
    return train(
        tiny_config(out, **engine),
        resume=resume,
        model=model,
        train_set=ToyPanoptic(10, meta),
        val_set=ToyPanoptic(4, meta, seed=99, train=False),
        meta=meta,
        restart=restart,
    )


def final_weights(out: Path) -> dict[str, Tensor]:
    return torch.load(out / "model_final.pth", weights_only=True)["model"]


def assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- schedules and optimizer ----------------------------------------------------------------------


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    opt = scheduler.optimizer
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_warmup_step_schedule_values() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(WarmupStepLR(opt, steps=[6, 8], gamma=0.1, warmup_iters=4, warmup_factor=0.2), 10)
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_warmup_poly_schedule_values_and_resume() -> None:
    def make() -> WarmupPolyLR:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
        return WarmupPolyLR(opt, max_iter=10, power=0.9, warmup_iters=3, warmup_factor=0.1)

    lrs = _lrs(make(), 10)
    for i, lr in enumerate(lrs):
        warm = 0.1 * (1 - i / 3) + i / 3 if i < 3 else 1.0
        assert lr == pytest.approx(0.5 * warm * (1 - i / 10) ** 0.9, abs=1e-12)
    first = make()
    _lrs(first, 4)
    state = first.state_dict()
    assert set(state) == {"last_epoch", "base_lrs", "_step_count", "_last_lr"}
    again = make()
    again.load_state_dict(state)
    assert _lrs(again, 6) == pytest.approx(lrs[4:], abs=1e-15)


def test_build_scheduler_and_optimizer_from_config() -> None:
    cfg = load_config(overrides=["solver.schedule=step", "solver.steps=[5]", "solver.weight_decay=0.01"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    model[2].weight.requires_grad_(False)
    opt = build_optimizer(cfg.solver, model)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.01 and by_name["no_decay"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["no_decay"]["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert len(by_name["decay"]["params"]) == 3  # conv0 weight+bias, conv2 bias (weight frozen)
    assert isinstance(build_scheduler(cfg.solver, opt), WarmupStepLR)
    cfg.solver.schedule = "cosine"
    with pytest.raises(ValueError, match="solver.schedule"):
        build_scheduler(cfg.solver, opt)
    with pytest.raises(ValueError, match="increasing"):
        WarmupStepLR(opt, steps=[5, 3])


def test_bias_groups_lr_factor_and_weight_decay() -> None:
    """detectron2-style bias settings: biases outside norm layers get their own lr and decay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    default = build_optimizer(load_config().solver, model)
    assert [g["name"] for g in default.param_groups] == ["decay", "no_decay"]  # the layout of old checkpoints
    cfg = load_config(overrides=["solver.lr=0.1", "solver.bias_lr_factor=2.0", "solver.weight_decay_bias=0.0"])
    opt = build_optimizer(cfg.solver, model)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "bias"]  # the trainer logs group 0
    assert {id(p) for p in by_name["bias"]["params"]} == {id(model[0].bias), id(model[2].bias)}
    assert {id(p) for p in by_name["decay"]["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert (by_name["bias"]["lr"], by_name["bias"]["weight_decay"]) == (pytest.approx(0.2), 0.0)
    assert (by_name["decay"]["lr"], by_name["decay"]["weight_decay"]) == (pytest.approx(0.1), 1e-4)
    # the schedule scales every group's own base lr
    scheduler = WarmupStepLR(opt, steps=[2], gamma=0.1, warmup_iters=0)
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.02])
    # a bias decay alone (no lr factor) also separates the biases
    only_decay = build_optimizer(load_config(overrides=["solver.weight_decay_bias=0.0"]).solver, model)
    assert [g["name"] for g in only_decay.param_groups] == ["decay", "no_decay", "bias"]
    with pytest.raises(ValueError, match="solver.bias_lr_factor"):
        build_optimizer(load_config(overrides=["solver.bias_lr_factor=0"]).solver, model)


def test_bias_groups_resume_exactly(tmp_path: Path) -> None:
    """A bias group (2x lr, no decay) survives a crash: the resumed run equals the straight one bit for bit."""
    meta = toy_meta()

    def run(out: Path, crash_at: int = 0, resume: bool = False) -> object:
        cfg = tiny_config(out)
        cfg.solver.bias_lr_factor = 2.0
        cfg.solver.weight_decay_bias = 0.0
        torch.manual_seed(0)
        return train(
            cfg,
            resume=resume,
            model=TinyModel(meta, dropout=0.3, crash_at=crash_at),
            train_set=ToyPanoptic(10, meta),
            val_set=ToyPanoptic(2, meta, seed=99, train=False),
            meta=meta,
        )

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run(straight)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crashed, crash_at=5)
    run(crashed, resume=True)
    assert_same_weights(final_weights(straight), final_weights(crashed), atol=0)
    a = torch.load(straight / "model_final.pth", weights_only=True)
    b = torch.load(crashed / "model_final.pth", weights_only=True)
    assert [g["name"] for g in a["optimizer"]["param_groups"]] == ["decay", "bias"]  # TinyModel has no norm
    assert a["scheduler"] == b["scheduler"]
    assert a["scheduler"]["base_lrs"][1] == pytest.approx(2 * a["scheduler"]["base_lrs"][0])


# --- sampler --------------------------------------------------------------------------------------


def test_sampler_order_is_a_pure_function_of_the_iteration() -> None:
    full = IterationBatchSampler(7, 4, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(10)]
    resumed = iter(IterationBatchSampler(7, 4, seed=3, start_iter=6))
    assert [next(resumed) for _ in range(4)] == stream[6:]
    # two ranks with 2 images each see exactly the images of one process with 4
    for i in range(10):
        r0 = IterationBatchSampler(7, 2, world_size=2, rank=0, seed=3).indices_at(i)
        r1 = IterationBatchSampler(7, 2, world_size=2, rank=1, seed=3).indices_at(i)
        assert r0 + r1 == stream[i]
    # the stream is a concatenation of permutations (every image once per epoch), reshuffled
    flat = [index for batch in stream for index, _ in batch]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    assert list(epoch_permutation(50, 3, 0)) != list(epoch_permutation(50, 3, 1))
    seeds = [s for batch in stream for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def test_seeded_dataset_is_reproducible_and_leaves_rng_alone() -> None:
    ds = SeededDataset(ToyPanoptic(3, toy_meta()))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    flips = {seed: ds[(1, seed)].target.panoptic for seed in range(12)}
    assert torch.equal(torch.get_rng_state(), before)
    for seed, pan in flips.items():
        assert torch.equal(ds[(1, seed)].target.panoptic, pan)
    # the augmentation does depend on the seed: both flip outcomes occur
    assert len({pan[0, :3].sum().item() for pan in flips.values()}) == 2


# --- checkpoints ----------------------------------------------------------------------------------


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    meta = toy_meta()
    model = TinyModel(meta)
    cfg = tiny_config(tmp_path)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "a.pth", model=model, optimizer=None, scheduler=None, iteration=5, cfg=cfg, meta=meta)
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt = load_checkpoint(tmp_path / "a.pth", model, expect_model_name=cfg.model.name, expect_meta=meta)
    set_rng_state(ckpt["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert ckpt["iteration"] == 5 and ckpt["config"]["model"]["name"] == cfg.model.name == "panoptic_fpn"
    assert DatasetMeta(ckpt["meta"]) == meta
    state = get_rng_state()
    assert isinstance(state["torch"], Tensor)


def test_wrong_checkpoint_gives_clear_errors(tmp_path: Path) -> None:
    meta = toy_meta(2, 2)
    model = TinyModel(meta)
    cfg = tiny_config(tmp_path)
    path = tmp_path / "m.pth"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, iteration=1, cfg=cfg, meta=meta)

    with pytest.raises(CheckpointError, match=r"is for model 'panoptic_fpn', not 'upsnet'"):
        load_checkpoint(path, TinyModel(meta), expect_model_name="upsnet")
    other = toy_meta(3, 2)
    msg = r"trained with 2 thing / 2 stuff classes, this model has 3 thing / 2 stuff"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path, TinyModel(other), expect_model_name="panoptic_fpn", expect_meta=other)
    renamed = DatasetMeta([{**c.to_dict(), "id": c.id + 50} for c in meta.categories])
    with pytest.raises(CheckpointError, match="other categories"):
        load_checkpoint(path, expect_meta=renamed)
    # without the meta check the parameter shapes still catch another class count
    untouched = TinyModel(other)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    msg = r"shape mismatches.*conv2.weight: checkpoint \(4, 8, 1, 1\) vs model \(5, 8, 1, 1\)"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path, untouched)
    assert_same_weights(untouched.state_dict(), before, atol=0)  # a rejected load changes nothing

    class Renamed(TinyModel):
        def __init__(self, meta: DatasetMeta) -> None:
            super().__init__(meta)
            self.head = self.conv2
            del self.conv2

    msg = r"missing keys \(2\): head.weight, head.bias.*unexpected keys \(2\): conv2"
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(path, Renamed(meta))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"garbage.pth cannot be read"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="not a unipan checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model, optimizer=opt)


def test_find_last_checkpoint_ignores_temp_files_and_dangling_pointer(tmp_path: Path) -> None:
    assert find_last_checkpoint(tmp_path) is None
    (tmp_path / ".model_0000009.pth.abc.tmp").write_bytes(b"half")
    assert find_last_checkpoint(tmp_path) is None
    for it in (3, 12):
        (tmp_path / f"model_{it:07d}.pth").write_bytes(b"x")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000012.pth"
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000003.pth\n")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000003.pth"
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000099.pth\n")
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000012.pth"


# --- training: outputs, resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 8-iteration run, evaluated every 3 iterations."""
    out = tmp_path_factory.mktemp("straight")
    run_tiny(out, eval_period=3)
    return out


def test_training_writes_every_output(straight_run: Path) -> None:
    out = straight_run
    saved = load_config(out / "config.yaml")
    assert saved.engine.output_dir == str(out) and saved.solver.max_iter == 8 and saved.model.name == "panoptic_fpn"
    recs = records(out)
    assert [r["iteration"] for r in recs] == [2, 3, 4, 6, 8]
    train_recs = [r for r in recs if "total_loss" in r]
    assert [r["iteration"] for r in train_recs] == [2, 4, 6, 8]
    for r in train_recs:
        assert {"lr", "loss_sem", "loss_reg", "total_loss", "time", "data_time", "grad_norm"} <= set(r)
        assert r["total_loss"] == pytest.approx(r["loss_sem"] + r["loss_reg"], rel=1e-6)
    assert train_recs[-1]["total_loss"] < train_recs[0]["total_loss"]  # it learns
    evals = [r for r in recs if "eval" in r]
    assert [r["iteration"] for r in evals] == [3, 6, 8]
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st", "num_images"} <= set(evals[-1]["eval"])
    assert evals[-1]["eval"]["num_images"] == 4
    assert (out / LAST_CHECKPOINT).read_text().strip() == "model_final.pth"
    assert sorted(p.name for p in out.glob("model_*.pth")) == [
        "model_0000003.pth",
        "model_0000006.pth",
        "model_final.pth",
    ]
    assert not list(out.glob(".*.tmp"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "evaluation at iteration 8" in (out / "log.txt").read_text()
    assert not logging.getLogger("unipan").handlers  # the run's log handlers were removed


def test_resume_after_a_crash_equals_the_uninterrupted_run(straight_run: Path, tmp_path: Path) -> None:
    meta = toy_meta()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(tmp_path, model=TinyModel(meta, dropout=0.3, crash_at=5), eval_period=3)
    assert find_last_checkpoint(tmp_path) == tmp_path / "model_0000003.pth"
    result = run_tiny(tmp_path, resume=True, eval_period=3)
    assert result.checkpoint == tmp_path / "model_final.pth"
    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=1e-6)
    # the optimizer's momentum and the scheduler continue exactly too
    a = torch.load(straight_run / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "model_final.pth", weights_only=True)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], atol=1e-6, rtol=0)
    assert a["scheduler"] == b["scheduler"]
    # one consistent history: the crashed run's records after iteration 3 were dropped and redone
    ra, rb = records(straight_run), records(tmp_path)
    assert [r["iteration"] for r in rb] == [r["iteration"] for r in ra]
    for x, y in zip(ra, rb, strict=True):
        if "total_loss" in x:
            assert y["total_loss"] == pytest.approx(x["total_loss"], abs=1e-6)
        if "eval" in x:
            assert y["eval"]["PQ"] == pytest.approx(x["eval"]["PQ"], abs=1e-9)
    assert result.final_metrics["PQ"] == pytest.approx(ra[-1]["eval"]["PQ"], abs=1e-9)


def test_evaluation_does_not_change_training(straight_run: Path, tmp_path: Path) -> None:
    run_tiny(tmp_path, eval_period=0)
    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=0)


def test_data_workers_do_not_change_training(straight_run: Path, tmp_path: Path) -> None:
    """Augmentation is seeded per stream position, so 2 worker processes load what 0 workers load."""
    meta = toy_meta()
    cfg = tiny_config(tmp_path)
    cfg.data.num_workers = 2
    torch.manual_seed(0)
    model = TinyModel(meta, dropout=0.3)
    val = ToyPanoptic(4, meta, seed=99, train=False)
    train(cfg, model=model, train_set=ToyPanoptic(10, meta), val_set=val, meta=meta)
    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=0)


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
import test_engine as te

real_save = torch.save
saves = []

def save_then_die(obj, path, *args, **kwargs):
    saves.append(path)
    real_save(obj, path, *args, **kwargs)
    if len(saves) == 2:
        # a kill in the middle of writing the second checkpoint: half a temp file stays behind
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_then_die
te.run_tiny(__import__("pathlib").Path({out!r}), eval_period=3)
"""


def test_resume_after_sigkill_mid_checkpoint_write(straight_run: Path, tmp_path: Path) -> None:
    script = _KILL_SCRIPT.format(tests=str(TESTS), out=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = list(tmp_path.glob(".model_0000006.pth.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the torn write is really there
    assert not (tmp_path / "model_0000006.pth").exists()
    assert (tmp_path / LAST_CHECKPOINT).read_text().strip() == "model_0000003.pth"
    run_tiny(tmp_path, resume=True, eval_period=3)
    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=1e-6)
    assert [r["iteration"] for r in records(tmp_path)] == [r["iteration"] for r in records(straight_run)]
    assert not list(tmp_path.glob(".*.tmp"))  # the torn write's temporary file was removed at the start


def test_resume_of_a_finished_run_trains_no_further(straight_run: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("model_final.pth", LAST_CHECKPOINT):
        shutil.copy(straight_run / name, tmp_path / name)
    result = run_tiny(tmp_path, resume=True)
    assert_same_weights(final_weights(straight_run), final_weights(tmp_path), atol=0)
    assert result.final_metrics["PQ"] == pytest.approx(records(straight_run)[-1]["eval"]["PQ"], abs=1e-9)


def test_resume_rejects_a_checkpoint_with_other_classes(straight_run: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("model_0000003.pth", LAST_CHECKPOINT):
        shutil.copy(straight_run / name, tmp_path / name)
    (tmp_path / LAST_CHECKPOINT).write_text("model_0000003.pth")
    meta = toy_meta(3, 2)
    with pytest.raises(CheckpointError, match="trained with 2 thing / 2 stuff classes, this model has 3 thing"):
        train(
            tiny_config(tmp_path),
            resume=True,
            model=TinyModel(meta),
            train_set=ToyPanoptic(4, meta),
            val_set=ToyPanoptic(2, meta),
            meta=meta,
        )


def test_non_finite_loss_names_the_iteration(tmp_path: Path) -> None:
    meta = toy_meta()
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss is not finite \(loss_reg=nan"):
        run_tiny(tmp_path, model=TinyModel(meta, nan_at=3))


def test_bad_model_output_and_batch_size_errors(tmp_path: Path) -> None:
    meta = toy_meta()

    class NoDict(TinyModel):
        def forward(self, batch: Batch):  # type: ignore[override]
            out = super().forward(batch)
            return list(out.values()) if isinstance(out, dict) else out

    with pytest.raises(TypeError, match="NoDict in training mode must return a non-empty dict"):
        run_tiny(tmp_path, model=NoDict(meta))
    cfg = tiny_config(tmp_path)
    cfg.solver.batch_size = 0
    with pytest.raises(ValueError, match="solver.batch_size=0"):
        train(cfg, model=TinyModel(meta), train_set=ToyPanoptic(4, meta), meta=meta)


# --- evaluation ----------------------------------------------------------------------------------


def test_evaluate_oracle_gives_pq_100_and_writes_predictions(tmp_path: Path) -> None:
    from unipan.engine.evaluator import evaluate
    from unipan.io import load_json, read_id_png

    meta = toy_meta()
    val = ToyPanoptic(5, meta, seed=4, train=False)
    result = evaluate(OracleModel(val), val, meta, "cpu", batch_size=2, out_dir=tmp_path)
    assert result.metrics["PQ"] == pytest.approx(100.0)
    assert result.metrics["num_images"] == 5
    assert result.metrics["mIoU_pan"] == pytest.approx(100.0) and result.miou_pan == pytest.approx(1.0)
    # the test double's raw prediction is all-zero logits: its semantic head says class 0 everywhere
    assert result.sem_space == "all" and result.miou_sem is not None and result.miou_sem < 1.0
    # thing instances in the ground truth, no detection: COCO AP 0
    assert result.metrics["mask_AP"] == 0.0 and result.metrics["box_AP"] == 0.0
    pred = load_json(result.predictions_json)
    assert len(pred["annotations"]) == 5 and len(pred["categories"]) == 4
    ann = pred["annotations"][0]
    ids = read_id_png(tmp_path / "panoptic" / ann["file_name"])
    assert torch.equal(torch.from_numpy(ids), val[0].target.panoptic)
    limited = evaluate(OracleModel(val), val, meta, "cpu", max_images=2)
    assert limited.metrics["num_images"] == 2


class HalfSizeToy(ToyPanoptic):
    """Testing transform that halves the image: predictions live at 16 x 16, files at 32 x 32."""

    def _transform(self, image: Tensor, panoptic: Tensor) -> tuple[Tensor, Tensor]:
        from unipan.data.transforms import resize_pair

        image, small = resize_pair(image, panoptic, (SIZE // 2, SIZE // 2))
        assert small is not None
        return (image - 128.0) / 64.0, small


def test_evaluate_measures_at_the_original_size_as_unipan_pq_does(tmp_path: Path) -> None:
    """Predictions live at 16 x 16, files at 32 x 32: `evaluate` scores what it writes, at 32 x 32."""
    from unipan.engine.evaluator import evaluate
    from unipan.evaluation.pq import pq_compute_folders
    from unipan.io import load_json, panoptic_segment_stats, read_id_png, write_id_png, write_panoptic_json

    meta = toy_meta()
    val = HalfSizeToy(3, meta, seed=5, train=False)
    result = evaluate(OracleModel(val), val, meta, "cpu", out_dir=tmp_path / "pred")
    # the half-size oracle loses pixels on the way down and back: not 100 at the original size
    assert 50.0 < result.metrics["PQ"] < 100.0
    gt_dir = tmp_path / "gt"
    anns = []
    for i in range(len(val)):
        ids, segments = val.original_panoptic(i)
        stats = panoptic_segment_stats(ids)  # the toy states no areas; a GT file does
        segments = [dataclasses.replace(s, area=stats[s.id][0]) for s in segments]
        write_id_png(gt_dir / f"img{i:03d}.png", ids)
        anns.append(
            {
                "image_id": f"img{i:03d}",
                "file_name": f"img{i:03d}.png",
                "segments_info": [s.to_coco_dict() for s in segments],
            }
        )
    write_panoptic_json(tmp_path / "gt.json", [], anns, meta.to_coco_categories())
    files = pq_compute_folders(tmp_path / "gt.json", gt_dir, result.predictions_json, tmp_path / "pred" / "panoptic")
    assert_same_numbers(result.pq.to_dict(), files.to_dict(), tol=1e-9)
    for ann in load_json(result.predictions_json)["annotations"]:
        ids = read_id_png(tmp_path / "pred" / "panoptic" / ann["file_name"])
        assert ids.shape == (SIZE, SIZE)
        listed = {s["id"]: s["area"] for s in ann["segments_info"]}
        present, counts = np.unique(ids[ids > 0], return_counts=True)
        assert listed == dict(zip(present.tolist(), counts.tolist(), strict=True))


def assert_same_numbers(a: object, b: object, tol: float, where: str = "") -> None:
    """Nested dicts/lists of numbers equal to `tol` (same keys, same structure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_numbers(a[k], b[k], tol, f"{where}/{k}")
    elif isinstance(a, float | int) and isinstance(b, float | int):
        assert abs(a - b) <= tol, (where, a, b)
    else:
        assert a == b, where


def test_evaluate_rejects_predictions_of_the_wrong_size() -> None:
    from unipan.engine.evaluator import evaluate

    meta = toy_meta()
    val = ToyPanoptic(2, meta, train=False)

    class Shrunk(OracleModel):
        def forward(self, batch: Batch) -> list[PanopticResult]:
            return [PanopticResult(r.panoptic[:-1], r.segments, r.image_id) for r in super().forward(batch)]

    expected = r"image 'img000': Shrunk returned a 31x32 result, expected its input size 32x32"
    with pytest.raises(ValueError, match=expected):
        evaluate(Shrunk(val), val, meta, "cpu")


def test_loss_values_are_finite_numbers(straight_run: Path) -> None:
    for r in records(straight_run):
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), k


# --- the real path: model, datasets and collate built from a config --------------------------------


@pytest.mark.slow
def test_config_built_panoptic_fpn_trains_and_resumes_exactly(tmp_path: Path) -> None:
    """Synthetic data written by build_dataset, Panoptic FPN from the registry (trainable BN, RPN and
    RoI sampling draw from the torch RNG, random flips): resuming from the iteration-2 checkpoint
    reproduces the uninterrupted weights bit for bit."""
    import shutil

    overrides = [
        f"data.synth_root={tmp_path / 'synth'}",
        "data.synth_train=4",
        "data.synth_val=1",
        "data.synth_size=[64,64]",
        "data.min_size_train=[64]",
        "data.max_size_train=64",
        "data.max_size_test=64",
        "solver.batch_size=2",
        "solver.max_iter=3",
        "solver.warmup_iters=2",
        "solver.steps=[2]",
        "engine.log_period=1",
        "engine.checkpoint_period=2",
        "engine.eval_period=0",
        "engine.num_threads=0",
    ]
    config = TESTS.parents[1] / "unipan" / "configs" / "panoptic_fpn" / "tiny_synth.yaml"
    a, b = tmp_path / "a", tmp_path / "b"
    result = train(load_config(config, [*overrides, f"engine.output_dir={a}"]))
    assert result.checkpoint == a / "model_final.pth"
    assert {"PQ", "PQ_th", "PQ_st", "mIoU_pan", "mIoU_sem", "mask_AP", "box_AP"} <= set(result.final_metrics)
    assert result.final_metrics["num_images"] == 1
    assert {"loss_mask", "loss_rpn_objectness"} <= set(records(a)[0])  # the model's own loss names
    b.mkdir()
    shutil.copy(a / "model_0000002.pth", b)
    (b / LAST_CHECKPOINT).write_text("model_0000002.pth\n")
    train(load_config(config, [*overrides, f"engine.output_dir={b}"]), resume=True)
    assert_same_weights(final_weights(a), final_weights(b), atol=0)
    assert [r["total_loss"] for r in records(b)] == [r["total_loss"] for r in records(a)[2:]]
