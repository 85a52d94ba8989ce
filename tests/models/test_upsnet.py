"""UPSNet the model: train step, eval pass, loss switches, oracle modes, context FPN, configs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stuff_only, synth_batch

from unipan.config import Config, load_config
from unipan.data.collate import collate
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.data.transforms import Normalize
from unipan.fusion.upsnet_head import oracle_sem_logits
from unipan.modeling.backbone import build_backbone
from unipan.modeling.heads.upsnet_semantic import GlobalContext
from unipan.modeling.models.upsnet import ContextFPN, UPSNet, build_upsnet
from unipan.structures import DatasetMeta, PanopticTarget

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


def test_train_step_losses_and_gradients() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    model = build_upsnet(tiny_config(), meta).train()
    losses = model(batch)
    assert set(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and math.isfinite(float(v.detach())) for v in losses.values())
    # the panoptic loss alone reaches the semantic head (deformable convs and offsets) and the mask head
    model.zero_grad()
    losses["loss_panoptic"].backward()
    head = model.semantic_head
    assert head.scorer.weight.grad is not None and bool(head.scorer.weight.grad.abs().sum() > 0)
    assert bool(head.subnet[0].conv.weight.grad.abs().sum() > 0)
    assert bool(head.subnet[0].offset.weight.grad.abs().sum() > 0)
    mask_predictor = model.instance_branch.roi_heads.mask_predictor
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mask_predictor.parameters())
    assert model.backbone.context is not None
    assert bool(model.backbone.context.fc.weight.grad.abs().sum() > 0)


def test_images_without_instances_train() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    batch = stuff_only(stuff_only(batch, meta, 0), meta, 1)
    model = build_upsnet(tiny_config(), meta).train()
    losses = model(batch)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()


def test_loss_switches_and_weights() -> None:
    batch, meta = synth_batch(2)
    torch.manual_seed(0)
    base = build_upsnet(tiny_config(), meta).train()
    state = base.state_dict()
    torch.manual_seed(1)
    reference = base(batch)
    no_roi = build_upsnet(tiny_config("model.upsnet.roi_loss_weight=0"), meta).train()
    no_roi.load_state_dict(state)
    assert "loss_sem_roi" not in no_roi(batch)
    no_pano = build_upsnet(tiny_config("model.upsnet.panoptic_loss=false"), meta).train()
    no_pano.load_state_dict(state)
    assert "loss_panoptic" not in no_pano(batch)
    doubled = build_upsnet(
        tiny_config(
            "model.upsnet.semantic_loss_weight=1.0",
            "model.upsnet.roi_loss_weight=0.2",
            "model.upsnet.panoptic_loss_weight=0.5",
        ),
        meta,
    ).train()
    doubled.load_state_dict(state)
    torch.manual_seed(1)  # the same instances are dropped to unknown
    twice = doubled(batch)
    for name in ("loss_sem_seg", "loss_sem_roi", "loss_panoptic"):
        torch.testing.assert_close(twice[name], 2 * reference[name], rtol=1e-4, atol=1e-6)


def test_eval_results_at_input_size() -> None:
    torch.manual_seed(0)
    ds = SyntheticPanoptic(2, seed=3, opts=SynthOptions(size=(64, 64)), transform=Normalize())
    samples = [ds[0], ds[1]]
    # a smaller second image: the batch is padded and each result must come back at its own size
    small = replace(samples[1], image=samples[1].image[:, :40, :56])
    small = replace(
        small,
        target=PanopticTarget.from_panoptic(
            samples[1].target.panoptic[:40, :56], samples[1].target.segments, ds.meta, samples[1].image_id
        ),
    )
    batch = replace(collate([samples[0], small]), targets=None)
    model = build_upsnet(tiny_config("model.upsnet.score_thresh=0.0", "model.upsnet.stuff_area=0"), ds.meta).eval()
    results = model(batch)
    assert [r.image_size for r in results] == [(64, 64), (40, 56)]
    for r in results:
        assert r.raw is not None and r.raw.sem_space == "all"
        assert r.raw.sem_logits.shape == (ds.meta.num_classes, *r.image_size)
        ids = {int(i) for i in torch.unique(r.panoptic)} - {0}
        assert ids == {s.id for s in r.segments}
        for s in r.segments:
            assert s.area == int((r.panoptic == s.id).sum())
            assert s.category_id in ds.meta


def test_batch_of_two_equals_two_singles() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 96))
    batch = replace(batch, targets=None)
    model = build_upsnet(tiny_config("model.upsnet.score_thresh=0.0", "model.upsnet.stuff_area=0"), meta).eval()
    pair = model.raw_predictions(batch)
    for i in range(2):
        single = replace(
            batch,
            images=batch.images[i : i + 1],
            image_sizes=batch.image_sizes[i : i + 1],
            image_ids=batch.image_ids[i : i + 1],
        )
        (alone,) = model.raw_predictions(single)
        assert len(alone) == len(pair[i]) > 0
        assert torch.equal(alone.labels, pair[i].labels)
        torch.testing.assert_close(alone.boxes, pair[i].boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(alone.sem_logits, pair[i].sem_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(alone.extras["mask_logits"], pair[i].extras["mask_logits"], rtol=0, atol=1e-4)


def test_oracle_modes_read_the_ground_truth() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    assert batch.targets is not None
    model = build_upsnet(
        tiny_config(
            "model.upsnet.oracle_boxes=true",
            "model.upsnet.oracle_class_assignment=true",
            "model.upsnet.oracle_semantic=true",
        ),
        meta,
    ).eval()
    assert not model.fusion.filter_detections and not model.fusion.class_assignment
    raws = model.raw_predictions(batch)
    for raw, t in zip(raws, batch.targets, strict=True):
        assert torch.equal(raw.boxes, t.boxes) and torch.equal(raw.labels, t.labels)
        torch.testing.assert_close(raw.sem_logits, oracle_sem_logits(t.sem_seg, meta.num_classes, 10.0))
        assert raw.extras["mask_logits"].shape == (len(t), 28, 28)
    results = model(batch)
    assert len(results) == 2
    with pytest.raises(ValueError, match="oracle"):
        model(replace(batch, targets=None))


def test_context_fpn() -> None:
    torch.manual_seed(0)
    cfg = tiny_config()
    backbone = build_backbone(cfg.model.backbone).eval()
    images = torch.randn(1, 3, 64, 64)
    plain = backbone(images)
    assert all(
        torch.equal(a, b)
        for a, b in zip(ContextFPN(backbone=backbone, context=None)(images).values(), plain.values(), strict=True)
    )
    shapes = backbone.output_shape()
    context = GlobalContext(shapes["res5"][0], shapes["p5"][0])
    with torch.no_grad():
        context.fc.weight.zero_()
        context.fc.bias.zero_()
    wrapped = ContextFPN(backbone=backbone, context=context).eval()
    out = wrapped(images)
    assert list(out) == list(plain)
    for name in plain:
        torch.testing.assert_close(out[name], plain[name])
    # a non-zero context vector reaches every level through the top-down path
    with torch.no_grad():
        context.fc.bias.fill_(1.0)
    moved = wrapped(images)
    for name in ("p2", "p3", "p4", "p5", "p6"):
        assert not torch.allclose(moved[name], plain[name]), name
    torch.testing.assert_close(moved["res5"], plain["res5"])


def test_short_regression_loss_falls() -> None:
    """25 SGD steps on 2 synthetic images: the total loss falls to under 40% of its start."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, seed=1)
    model = build_upsnet(tiny_config(), meta).train()
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
def test_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.name == "upsnet"
    expected = {"r50_coco": (3, True, 4096), "r50_cityscapes": (2, False, 2048), "tiny_synth": (2, True, 64)}[name]
    ups = cfg.model.upsnet
    assert (ups.semantic_num_convs, ups.global_context, ups.stuff_area) == expected


def test_r50_coco_parameter_count(shared_data: Path) -> None:
    """The paper reports 46.1M parameters for UPSNet R50 on COCO; ours is within 3%."""
    categories = json.loads((shared_data / "panopticapi" / "panoptic_coco_categories.json").read_text())
    meta = DatasetMeta(categories, name="coco")
    assert (meta.num_things, meta.num_stuff) == (80, 53)
    model = build_upsnet(load_config(CONFIGS / "r50_coco.yaml"), meta)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 46.1e6) / 46.1e6 < 0.03, count


def test_registry() -> None:
    from unipan.modeling.registry import MODELS

    if "upsnet" not in MODELS:
        pytest.skip("model 'upsnet' is not registered yet (unipan/modeling/registry.py)")
    batch, meta = synth_batch(1)
    from unipan.modeling.registry import build_model

    assert isinstance(build_model(tiny_config(), meta), UPSNet)


def test_bad_batches_are_named() -> None:
    batch, meta = synth_batch(1)
    model = build_upsnet(tiny_config(), meta).train()
    with pytest.raises(ValueError, match="needs batch.targets"):
        model(replace(batch, targets=None))
    assert batch.targets is not None
    bad = replace(batch.targets[0], sem_seg=batch.targets[0].sem_seg.clone())
    bad.sem_seg[0, 0] = 77
    with pytest.raises(ValueError, match=f"{batch.image_ids[0]}.*77"):
        model(replace(batch, targets=[bad]))
    with pytest.raises(ValueError, match="semantic head predicts"):
        other = build_upsnet(tiny_config(), meta)
        UPSNet(
            backbone=other.backbone,
            instance_branch=other.instance_branch,
            semantic_head=other.semantic_head,
            meta=DatasetMeta([{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]),
            fusion=other.fusion,
        )
