"""UPSNet's own behaviour: where the panoptic loss reaches, loss switches, oracle modes, context FPN.

The contract every model keeps (train step, images without instances, eval at input size, batch
= singles, oracle PQ, checkpoint round trip, bad batches, configs loading, registry) is checked in
tests/models/test_contract.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import synth_batch

from unipan.config import Config, load_config
from unipan.fusion.oracle import ORACLE_LOGIT, oracle_sem_logits
from unipan.fusion.paste import box_pixel_windows
from unipan.fusion.upsnet_head import panoptic_targets, upsnet_fusion
from unipan.modeling.backbone import GlobalContext, build_backbone
from unipan.modeling.heads.upsnet_semantic import semantic_subnet_widths
from unipan.modeling.models.upsnet import UPSNet, build_upsnet
from unipan.structures import DatasetMeta, PanopticTarget

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "unipan" / "configs" / "upsnet"
LOSS_NAMES = {
    "loss_rpn_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
    "loss_mask",
    "loss_sem_seg",
    "loss_sem_roi",
    "loss_panoptic",
}


def tiny_config(*overrides: str) -> Config:
    return load_config(CONFIGS / "tiny_synth.yaml", list(overrides))


def tiny_upsnet(meta: DatasetMeta, *overrides: str) -> UPSNet:
    return build_upsnet(tiny_config(*overrides).model, meta)


def test_panoptic_loss_reaches_the_semantic_and_mask_heads() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    model = tiny_upsnet(meta).train()
    losses = model(batch)
    assert set(losses) == LOSS_NAMES
    # the panoptic loss alone reaches the semantic head (deformable convs and offsets) and the mask head
    model.zero_grad()
    losses["loss_panoptic"].backward()
    head = model.semantic_head
    assert head.scorer.weight.grad is not None and bool(head.scorer.weight.grad.abs().sum() > 0)
    assert bool(head.subnet[0].conv.weight.grad.abs().sum() > 0)
    assert bool(head.subnet[0].offset.weight.grad.abs().sum() > 0)
    mask_predictor = model.instance_branch.mask_head.predictor
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mask_predictor.parameters())
    assert model.backbone.context is not None
    assert bool(model.backbone.context.fc.weight.grad.abs().sum() > 0)


def test_loss_switches_and_weights() -> None:
    batch, meta = synth_batch(2)
    torch.manual_seed(0)
    base = tiny_upsnet(meta).train()
    state = base.state_dict()
    torch.manual_seed(1)
    reference = base(batch)
    no_roi = tiny_upsnet(meta, "model.upsnet.roi_loss_weight=0").train()
    no_roi.load_state_dict(state)
    assert "loss_sem_roi" not in no_roi(batch)
    no_pano = tiny_upsnet(meta, "model.upsnet.panoptic_loss=false").train()
    no_pano.load_state_dict(state)
    assert "loss_panoptic" not in no_pano(batch)
    doubled = tiny_upsnet(
        meta,
        "model.upsnet.semantic_loss_weight=1.0",
        "model.upsnet.roi_loss_weight=0.2",
        "model.upsnet.panoptic_loss_weight=0.5",
    ).train()
    doubled.load_state_dict(state)
    torch.manual_seed(1)  # the same instances are dropped to unknown
    twice = doubled(batch)
    for name in ("loss_sem_seg", "loss_sem_roi", "loss_panoptic"):
        torch.testing.assert_close(twice[name], 2 * reference[name], rtol=1e-4, atol=1e-6)


def test_oracle_modes_read_the_ground_truth() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    assert batch.targets is not None
    model = tiny_upsnet(
        meta,
        "model.upsnet.oracle_boxes=true",
        "model.upsnet.oracle_class_assignment=true",
        "model.upsnet.oracle_semantic=true",
    ).eval()
    assert model.needs_targets_at_inference
    assert model.fuse.func is upsnet_fusion
    settings = model.fuse.keywords["settings"]
    assert not settings.filter_detections and not settings.class_assignment
    assert not tiny_upsnet(meta).needs_targets_at_inference
    raws = model.raw_predictions(batch)
    for raw, t in zip(raws, batch.targets, strict=True):
        assert torch.equal(raw.boxes, t.boxes) and torch.equal(raw.labels, t.labels)
        torch.testing.assert_close(raw.sem_logits, oracle_sem_logits(t.sem_seg, meta.num_classes, ORACLE_LOGIT))
        assert raw.extras["mask_logits"].shape == (len(t), 28, 28)
    results = model(batch)
    assert len(results) == 2
    with pytest.raises(ValueError, match="oracle"):
        model(replace(batch, targets=None))


def _record_loss_inputs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Wrap the loss functions UPSNet calls so that a test sees what they were given."""
    import unipan.modeling.models.upsnet as upsnet_module

    seen: dict[str, list] = {"semantic": [], "panoptic": []}
    real_semantic, real_panoptic = upsnet_module.semantic_loss, upsnet_module.panoptic_loss

    def semantic(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen["semantic"].append((logits, targets))
        return real_semantic(logits, targets)

    def panoptic(*args: object, **kwargs: object) -> torch.Tensor:
        seen["panoptic"].append(args)
        return real_panoptic(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(upsnet_module, "semantic_loss", semantic)
    monkeypatch.setattr(upsnet_module, "panoptic_loss", panoptic)
    return seen


def test_crowd_trains_as_its_class_and_is_unknown_in_the_panoptic_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both references train crowd pixels as their thing class; MaskMatching makes them unknown."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, crowd_prob=1.0)
    assert batch.targets is not None and all(bool(t.crowd.any()) for t in batch.targets)
    seen = _record_loss_inputs(monkeypatch)
    tiny_upsnet(meta).train()(batch)
    ((_, sem_targets),) = seen["semantic"]
    assert torch.equal(sem_targets, batch.padded_sem_seg(crowd_meta=meta))
    for i, t in enumerate(batch.targets):
        h, w = t.image_size
        crowd_labels = sem_targets[i, :h, :w][t.crowd]
        assert bool((crowd_labels >= meta.num_stuff).all()) and bool((crowd_labels < meta.num_classes).all())
        # the panoptic loss sees the same labels at the stride-4 pixel centres...
        sem_small, imap_small, keep = seen["panoptic"][i][4:7]
        assert torch.equal(sem_small, sem_targets[i, 2::4, 2::4])
        # ...so its target makes crowd (thing class, no instance) unknown: channel S + kept
        target = panoptic_targets(sem_small, imap_small, keep, meta.num_stuff)
        crowd_small = torch.zeros_like(sem_targets[i], dtype=torch.bool)
        crowd_small[:h, :w] = t.crowd
        crowd_small = crowd_small[2::4, 2::4] & (imap_small < 0)
        assert bool(crowd_small.any())
        assert bool((target[crowd_small] == meta.num_stuff + int(keep.sum())).all())


def test_losses_see_float32_logits_and_boxes_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit B4/B5 on the CPU's bfloat16 autocast: every cross-entropy gets float32 logits
    (upsampled in float32), the GT boxes of the panoptic loss stay float32."""
    torch.manual_seed(0)
    batch, meta = synth_batch(1)
    seen = _record_loss_inputs(monkeypatch)
    model = tiny_upsnet(meta).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    ((logits, _),) = seen["semantic"]
    assert logits.dtype == torch.float32
    sem_logits, boxes, _, mask_logits = seen["panoptic"][0][:4]
    assert (sem_logits.dtype, boxes.dtype, mask_logits.dtype) == (torch.float32,) * 3


def test_context_fpn() -> None:
    """The global context is added to the coarsest lateral before the top-down pass."""
    torch.manual_seed(0)
    cfg = tiny_config()
    backbone = build_backbone(cfg.model.backbone).eval()
    assert backbone.context is None
    images = torch.randn(1, 3, 64, 64)
    plain = backbone(images)
    shapes = backbone.output_shape()
    context = GlobalContext(shapes["res5"][0], shapes["p5"][0])
    with torch.no_grad():
        context.fc.weight.zero_()
        context.fc.bias.zero_()
    backbone.set_global_context(context)
    out = backbone(images)
    assert list(out) == list(plain)
    for name in plain:
        torch.testing.assert_close(out[name], plain[name])
    # a non-zero context vector reaches every level through the top-down path
    with torch.no_grad():
        context.fc.bias.fill_(1.0)
    moved = backbone(images)
    for name in ("p2", "p3", "p4", "p5", "p6"):
        assert not torch.allclose(moved[name], plain[name]), name
    torch.testing.assert_close(moved["res5"], plain["res5"])
    # UPSNet builds its backbone with the context exactly when the config asks for it
    _, meta = synth_batch(1)
    assert tiny_upsnet(meta).backbone.context is not None
    assert tiny_upsnet(meta, "model.upsnet.global_context=false").backbone.context is None


@pytest.mark.slow
def test_short_regression_loss_falls() -> None:
    """25 SGD steps on 2 synthetic images: the total loss falls to under 40% of its start."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, seed=1)
    model = tiny_upsnet(meta).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(25):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = sum(sum(h.values()) for h in history[:5]) / 5
    last = sum(sum(h.values()) for h in history[-5:]) / 5
    assert math.isfinite(last) and last < 0.4 * first, (first, last)
    for name in ("loss_sem_seg", "loss_sem_roi", "loss_panoptic", "loss_mask"):
        assert np.mean([h[name] for h in history[-5:]]) < np.mean([h[name] for h in history[:5]]), name


@pytest.mark.parametrize("name", ["r50_coco", "r50_cityscapes", "tiny_synth"])
def test_config_values(name: str) -> None:
    """The papers' settings per dataset (that every config loads: test_contract.py)."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    expected = {"r50_coco": (3, True, 4096), "r50_cityscapes": (2, False, 2048), "tiny_synth": (2, True, 64)}[name]
    ups = cfg.model.upsnet
    assert (ups.semantic_num_convs, ups.global_context, cfg.model.fusion.stuff_area) == expected
    widths = semantic_subnet_widths(
        cfg.model.backbone.fpn_channels, ups.semantic_num_convs, ups.semantic_mid_channels, ups.semantic_out_channels
    )
    paper = name != "tiny_synth"
    # the released FCNSubNet layouts; the tiny one is Cityscapes' at a quarter of the width
    assert (
        widths
        == {"r50_coco": [256, 256, 128, 128], "r50_cityscapes": [256, 128, 128], "tiny_synth": [64, 32, 32]}[name]
    )
    # official per-level proposals and bias settings in the paper configs only
    assert cfg.model.rpn.post_nms_per_level is paper
    assert (cfg.solver.bias_lr_factor, cfg.solver.weight_decay_bias) == ((2.0, 0.0) if paper else (1.0, None))


def _inference_speed_module() -> ModuleType:
    """benchmarks/inference_speed.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("inference_speed", REPO / "benchmarks" / "inference_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_r50_parameter_counts_match_the_papers() -> None:
    """46.08M (COCO) and 44.47M (Cityscapes) parameters, SPINet's Table 2: 46.1M and 44.5M.

    Counted as benchmarks/inference_speed.py counts them (its `param_counts`, on the meta device).
    The released FCNSubNet widths make the match: the old 256->256->256->128 layout had 46.54M.
    """
    bench = _inference_speed_module()
    counts = {
        config: bench.param_counts(model, config, make_meta())
        for model, config, make_meta, _, _ in bench.PAPER_PARAMS
        if model == "upsnet"
    }
    assert counts["r50_coco"][0] == 46_076_527
    assert counts["r50_cityscapes"][0] == 44_474_427
    # + the frozen BatchNorm's affine buffers (what the timing table's `n_params` adds)
    assert counts["r50_coco"][1] - counts["r50_coco"][0] == 53_120
    assert round(counts["r50_coco"][0] / 1e6, 2) == 46.08 and round(counts["r50_cityscapes"][0] / 1e6, 2) == 44.47


def test_r50_coco_parameter_count_with_coco_categories(shared_data: Path) -> None:
    """The same count with COCO's own category list (80 things, 53 stuff)."""
    categories = json.loads((shared_data / "panopticapi" / "panoptic_coco_categories.json").read_text())
    meta = DatasetMeta(categories, name="coco")
    assert (meta.num_things, meta.num_stuff) == (80, 53)
    with torch.device("meta"):
        model = build_upsnet(load_config(CONFIGS / "r50_coco.yaml").model, meta)
    assert sum(p.numel() for p in model.parameters()) == 46_076_527


def test_semantic_head_class_count_is_checked() -> None:
    """A semantic head over other classes than S + T is rejected (the batch checks: test_contract.py)."""
    _, meta = synth_batch(1)
    other = tiny_upsnet(meta)
    with pytest.raises(ValueError, match=r"semantic head predicts \d+ classes; it needs stuff \+ things = 2"):
        UPSNet(
            backbone=other.backbone,
            instance_branch=other.instance_branch,
            semantic_head=other.semantic_head,
            meta=DatasetMeta([{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]),
            fuse=other.fuse,
        )


# --- Table 6 oracles through the evaluator and the command line ---------------------------------
def _instances_separable_without_masks(target: PanopticTarget, meta: DatasetMeta) -> bool:
    """No GT box holds a pixel of another instance, or of a crowd region, of its own class."""
    h, w = target.image_size
    windows = box_pixel_windows(target.boxes.float(), (h, w)).tolist()
    for i, (y0, y1, x0, x1) in enumerate(windows):
        same = (target.labels == target.labels[i]).nonzero().flatten().tolist()
        if any(j != i and bool(target.masks[j, y0:y1, x0:x1].any()) for j in same):
            return False
        crowd_ids = [
            s.id
            for s in target.segments
            if s.iscrowd and meta.isthing(s.category_id) and meta.thing_index(s.category_id) == int(target.labels[i])
        ]
        if bool(torch.isin(target.panoptic[y0:y1, x0:x1], torch.tensor(crowd_ids, dtype=torch.int32)).any()):
            return False
    return True


def test_all_oracles_through_evaluate_give_pq_100(tmp_path: Path) -> None:
    """GT boxes + GT class assignment + GT semantics through `evaluate` give PQ 100 on the synthetic val split.

    What "all oracles" needs for PQ 100, and why:
    - GT semantics: one-hot logits (ORACLE_LOGIT = 10) on each pixel's class, crowd with its class;
      with GT boxes, X_mask is 10 exactly on the box's own-class pixels, so stuff pixels stay stuff,
      other-class pixels go to their own instance, and crowd outside same-class boxes is unknown.
    - GT boxes and GT class assignment: every instance is present with its class. The oracle builder
      turns the detection filter (NMS 0.5, score > 0.6) off, which would drop GT boxes the untrained
      box head scores low or that overlap, and the class assignment heuristic off.
    - stuff_area=0: the 64 px area filter would void small GT stuff segments.
    - Masks are no oracle of Table 6: they only separate same-class instances whose boxes share
      pixels, and feed the mask pruning. The mask predictor here says +1 on the whole box (neutral:
      each mask is its box), and the images are the val images where no GT box holds a pixel of
      another instance or a crowd region of its class; elsewhere the mask head decides and PQ is
      what the model's masks earn (the paper's last row: 72.0, PQ_Th 58.6).
    """
    from unipan.data.build import build_dataset
    from unipan.engine.evaluator import evaluate

    cfg = tiny_config(
        "model.upsnet.oracle_boxes=true",
        "model.upsnet.oracle_class_assignment=true",
        "model.upsnet.oracle_semantic=true",
        "model.fusion.stuff_area=0",
        "data.synth_val=16",
        f"data.synth_root={tmp_path / 'synthetic'}",
    )
    val = build_dataset(cfg.data, "val", is_train=False, output_dir=tmp_path)
    meta = val.meta
    chosen = [i for i in range(len(val)) if _instances_separable_without_masks(val[i].target, meta)]
    assert len(chosen) >= 2, chosen
    torch.manual_seed(0)
    model = build_upsnet(cfg.model, meta)
    with torch.no_grad():
        model.instance_branch.mask_head.predictor.mask_fcn_logits.weight.zero_()
        model.instance_branch.mask_head.predictor.mask_fcn_logits.bias.fill_(1.0)
    result = evaluate(model, torch.utils.data.Subset(val, chosen), meta, "cpu", batch_size=2)
    assert result.metrics["num_images"] == len(chosen)
    assert (result.metrics["PQ"], result.metrics["PQ_th"], result.metrics["PQ_st"]) == pytest.approx((100.0,) * 3)


@pytest.mark.slow
def test_oracle_flags_work_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`unipan train` with an oracle flag evaluates at its end; `unipan eval ... model.upsnet.oracle_*=true`
    evaluates a checkpoint with each oracle (Table 6's lower rows)."""
    from unipan.cli import main

    config = str(CONFIGS / "tiny_synth.yaml")
    common = [
        f"data.synth_root={tmp_path / 'synthetic'}",
        "data.synth_train=2",
        "data.synth_val=2",
        "data.synth_size=[64,64]",
        "data.min_size_train=[64]",
        "data.max_size_train=64",
        "data.max_size_test=64",
    ]
    run = tmp_path / "run"
    train_args = [*common, "solver.batch_size=2", "solver.max_iter=1", "solver.warmup_iters=0", "solver.steps=[1]"]
    train_args += [f"engine.output_dir={run}", "engine.num_threads=0", "model.upsnet.oracle_semantic=true"]
    assert main(["train", config, *train_args]) == 0
    final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval"]["num_images"] == 2
    weights = run / "model_final.pth"
    for flags in (
        ["model.upsnet.oracle_semantic=true"],
        ["model.upsnet.oracle_boxes=true"],
        ["model.upsnet.oracle_boxes=true", "model.upsnet.oracle_class_assignment=true"],
        ["model.upsnet.oracle_class_assignment=true"],
    ):
        out = tmp_path / "eval" / "_".join(f.split(".")[-1].split("=")[0] for f in flags)
        assert main(["eval", config, *common, *flags, "--weights", str(weights), "--out", str(out)]) == 0
        assert "PQ" in capsys.readouterr().out
        assert (out / "pq.json").is_file()


# --- CUDA and AMP (skipped without CUDA) ---------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_oracle_raw_prediction_stays_on_the_targets_device() -> None:
    """Audit B2: crowd thing segments add instances built on the targets' device."""
    from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
    from unipan.fusion.oracle import oracle_raw_prediction
    from unipan.fusion.settings import PanopticHeadSettings

    ds = SyntheticPanoptic(8, seed=0, opts=SynthOptions(size=(64, 64), crowd_prob=1.0), split="val")
    meta = ds.meta
    settings = PanopticHeadSettings(stuff_area=0, filter_detections=False)
    crowd_things = 0
    for i in range(len(ds)):
        target = ds[i].target.to("cuda")
        crowd_things += sum(1 for s in target.segments if s.iscrowd and meta.isthing(s.category_id))
        raw = oracle_raw_prediction(target, meta)
        for name in ("boxes", "scores", "labels", "sem_logits", "masks"):
            assert getattr(raw, name).device.type == "cuda", name
        assert raw.extras["full_mask_logits"].device.type == "cuda"
        assert upsnet_fusion(raw, meta, settings, target.image_id).panoptic.device.type == "cuda"
    assert crowd_things > 0


@needs_cuda
def test_cuda_amp_training_step_keeps_float32_losses_and_boxes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit B4/B5 under fp16 autocast on CUDA: float32 logits into every cross-entropy, float32 GT
    boxes, finite losses and gradients."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, crowd_prob=0.5)
    seen = _record_loss_inputs(monkeypatch)
    model = tiny_upsnet(meta).cuda().train()
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model(batch.to("cuda"))
    total = sum(losses.values())
    assert isinstance(total, torch.Tensor) and bool(torch.isfinite(total))
    total.backward()
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    ((logits, _),) = seen["semantic"]
    assert logits.dtype == torch.float32
    for args in seen["panoptic"]:
        assert (args[0].dtype, args[1].dtype, args[3].dtype) == (torch.float32,) * 3


@needs_cuda
def test_cuda_amp_all_oracle_inference() -> None:
    """The oracle modes at inference on CUDA under autocast: GT boxes come back float32 and exact."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, crowd_prob=0.5)
    model = tiny_upsnet(
        meta,
        "model.upsnet.oracle_boxes=true",
        "model.upsnet.oracle_class_assignment=true",
        "model.upsnet.oracle_semantic=true",
    )
    model = model.cuda().eval()
    cuda_batch = batch.to("cuda")
    assert cuda_batch.targets is not None
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        raws = model.raw_predictions(cuda_batch)
        results = model(cuda_batch)
    for raw, t in zip(raws, cuda_batch.targets, strict=True):
        assert raw.boxes.dtype == torch.float32 and torch.equal(raw.boxes, t.boxes.float())
        assert torch.equal(raw.labels, t.labels)
    assert len(results) == 2
