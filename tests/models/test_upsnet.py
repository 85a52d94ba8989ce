"""UPSNet's own behaviour: where the panoptic loss reaches, loss switches, oracle modes, context FPN.

The contract every model keeps (train step, images without instances, eval at input size, batch
= singles, oracle PQ, checkpoint round trip, bad batches, configs loading, registry) is checked in
tests/models/test_contract.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import synth_batch

from unipan.config import Config, load_config
from unipan.fusion.oracle import ORACLE_LOGIT, oracle_sem_logits
from unipan.fusion.upsnet_head import upsnet_fusion
from unipan.modeling.backbone import GlobalContext, build_backbone
from unipan.modeling.models.upsnet import UPSNet, build_upsnet
from unipan.structures import DatasetMeta

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "upsnet"
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


def test_r50_coco_parameter_count(shared_data: Path) -> None:
    """The paper reports 46.1M parameters for UPSNet R50 on COCO; ours is within 3%."""
    categories = json.loads((shared_data / "panopticapi" / "panoptic_coco_categories.json").read_text())
    meta = DatasetMeta(categories, name="coco")
    assert (meta.num_things, meta.num_stuff) == (80, 53)
    model = build_upsnet(load_config(CONFIGS / "r50_coco.yaml").model, meta)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 46.1e6) / 46.1e6 < 0.03, count


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
