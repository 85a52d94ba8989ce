"""Panoptic FPN's own behaviour: semantic head, loss weights, fusion binding, instance branch, configs.

The contract every model keeps (train step, images without instances, eval at input size, batch
= singles, oracle PQ, checkpoint round trip, bad batches, configs loading, registry) is checked in
tests/models/test_contract.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import synth_batch
from PIL import Image
from torchvision.models.detection.rpn import RegionProposalNetwork

from unipan.config import Config, load_config
from unipan.data.transforms import Normalize
from unipan.fusion.heuristic import heuristic_fusion
from unipan.io import load_json, read_id_png
from unipan.modeling.heads.instance import InstanceBranch, build_instance_branch
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.models.panoptic_fpn import PanopticFPN, build_panoptic_fpn
from unipan.modeling.registry import build_model
from unipan.structures import Batch, DatasetMeta, PanopticTarget, SegmentInfo

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "unipan" / "configs" / "panoptic_fpn" / "tiny_synth.yaml"
LOSS_NAMES = {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_sem_seg"}


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY_CONFIG, list(overrides))


# --- semantic branch -------------------------------------------------------------------------------
def test_semantic_head_structure_and_shape() -> None:
    shapes = {f"p{k}": (32, 2**k) for k in range(2, 7)}
    head = SemanticFPNHead(in_shapes=shapes, conv_dims=64, num_classes=5)
    # max(1, log2(stride / 4)) conv blocks per level: p2 1, p3 1, p4 2, p5 3
    convs = {name: sum(isinstance(m, torch.nn.Conv2d) for m in tower) for name, tower in head.scale_heads.items()}
    ups = {name: sum(isinstance(m, torch.nn.Upsample) for m in tower) for name, tower in head.scale_heads.items()}
    gns = sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules())
    assert convs == {"p2": 1, "p3": 1, "p4": 2, "p5": 3}
    assert ups == {"p2": 0, "p3": 1, "p4": 2, "p5": 3}
    assert gns == 7
    feats = {name: torch.randn(2, 32, 96 // s, 128 // s) for name, (_, s) in shapes.items()}
    assert head(feats).shape == (2, 5, 24, 32)
    assert head.layers(feats).shape == (2, 64, 24, 32)
    with pytest.raises(ValueError, match="divisible by 32"):
        SemanticFPNHead(in_shapes=shapes, conv_dims=48, num_classes=5)
    with pytest.raises(ValueError, match=r"\['p7'\] not among"):
        SemanticFPNHead(in_shapes=shapes, in_features=("p2", "p7"), num_classes=5)


def test_semantic_predictor_init_is_c2_msra_fill() -> None:
    """detectron2 fills the predictor like the tower convs: kaiming normal, fan_out (std sqrt(2 / C))."""
    torch.manual_seed(0)
    shapes = {f"p{k}": (32, 2**k) for k in range(2, 7)}
    head = SemanticFPNHead(in_shapes=shapes, conv_dims=128, num_classes=54)
    std = float(head.predictor.weight.detach().std())
    assert abs(std - math.sqrt(2 / 54)) < 0.05 * math.sqrt(2 / 54), std
    assert not head.predictor.bias.detach().any()


def test_crowd_trains_as_things_in_the_semantic_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """detectron2's prepare_panoptic_fpn: crowd pixels are "things" (S), only void is ignored;
    the logits reach the cross-entropy in float32 (here under the CPU's bfloat16 autocast)."""
    import unipan.modeling.models.panoptic_fpn as pfpn_module

    torch.manual_seed(0)
    batch, meta = synth_batch(1, crowd_prob=1.0)
    assert batch.targets is not None and bool(batch.targets[0].crowd.any())
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = pfpn_module.semantic_loss

    def record(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append((logits, targets))
        return real(logits, targets)

    monkeypatch.setattr(pfpn_module, "semantic_loss", record)
    model = build_model(tiny_config(), meta).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    ((logits, targets),) = seen
    assert logits.dtype == torch.float32
    t = batch.targets[0]
    h, w = t.image_size
    assert bool((targets[0, :h, :w][t.crowd] == meta.num_stuff).all())
    void = (t.panoptic == 0) & ~t.crowd
    assert bool((targets[0, :h, :w][void] == 255).all())


def test_loss_weights() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(1)
    model = build_model(tiny_config("model.semantic.loss_weight=1.0"), meta).train()
    torch.manual_seed(1)
    full = model(batch)["loss_sem_seg"]
    model.semantic_loss_weight = 0.25
    torch.manual_seed(1)
    torch.testing.assert_close(model(batch)["loss_sem_seg"], full * 0.25)


def test_builder_binds_the_config_fusion() -> None:
    """The builder binds `heuristic_fusion` with the config's settings; stuff_area 0 keeps stuff."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 96))
    cfg = tiny_config(
        "model.fusion.stuff_area=0", "model.fusion.instance_score_thresh=0.0", "model.roi_heads.score_thresh=0.0"
    )
    model = build_model(cfg, meta).eval()
    assert isinstance(model, PanopticFPN)
    assert model.fuse.func is heuristic_fusion
    assert model.fuse.keywords == dataclasses.asdict(cfg.model.fusion)
    results = model(replace(batch, targets=None))
    assert isinstance(results, list)
    for result in results:
        # a stuff_area of 0 keeps every stuff region: at least one stuff segment per image
        assert any(not s.isthing for s in result.segments)


@pytest.mark.slow
def test_short_regression_loss_falls() -> None:
    """30 SGD steps on 2 synthetic images: the total loss must fall to under half its start."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 64), seed=1)
    model = build_model(tiny_config(), meta).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    history = []
    for _ in range(30):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = sum(sum(h.values()) for h in history[:5]) / 5
    last = sum(sum(h.values()) for h in history[-5:]) / 5
    assert math.isfinite(last) and last < 0.5 * first, (first, last)
    for name in ("loss_sem_seg", "loss_rpn_objectness", "loss_mask"):
        assert np.mean([h[name] for h in history[-5:]]) < np.mean([h[name] for h in history[:5]]), name


def test_real_coco_image_train_and_eval(shared_data: Path) -> None:
    root = shared_data / "panopticapi"
    gt = load_json(root / "sample_data" / "panoptic_examples.json")
    meta = DatasetMeta(load_json(root / "panoptic_coco_categories.json"), name="coco")
    ann = next(a for a in gt["annotations"] if any(s["iscrowd"] for s in a["segments_info"]))
    stem = Path(ann["file_name"]).stem
    image = np.asarray(Image.open(root / "sample_data" / "input_images" / f"{stem}.jpg").convert("RGB"))
    panoptic = read_id_png(root / "sample_data" / "panoptic_examples" / ann["file_name"])
    # every 4th pixel: a ~107 x 160 image keeps the test fast; nearest sampling keeps ids valid
    image, panoptic = image[::4, ::4], panoptic[::4, ::4]
    segments = [
        SegmentInfo(s["id"], s["category_id"], meta.isthing(s["category_id"]), bool(s["iscrowd"]))
        for s in ann["segments_info"]
    ]
    target = PanopticTarget.from_panoptic(torch.from_numpy(np.ascontiguousarray(panoptic)), segments, meta, stem)
    assert len(target) > 0 and bool(target.crowd.any())
    img = Normalize()(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(), None)[0]
    h, w = target.image_size
    images = torch.zeros(1, 3, -(-h // 32) * 32, -(-w // 32) * 32)
    images[0, :, :h, :w] = img
    batch = Batch(images=images, image_sizes=[(h, w)], image_ids=[stem], targets=[target])
    model = build_model(tiny_config(), meta).train()
    assert model.semantic_head.num_classes == 54  # 53 COCO stuff + "things"
    losses = model(batch)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    raws = model.raw_predictions(batch)
    assert raws[0].sem_logits.shape == (54, h, w)


# --- the instance branch --------------------------------------------------------------------------
def test_instance_branch_exposes_intermediate_outputs() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 96))
    cfg = tiny_config("model.roi_heads.score_thresh=0.0")
    model = build_model(cfg, meta)
    assert isinstance(model, PanopticFPN)
    branch = model.instance_branch
    padded = (64, 96)
    features = model.backbone(batch.images)
    t = meta.num_things
    branch.train()
    out = branch.run(features, batch.image_sizes, padded, batch.targets)
    assert set(out.losses) == LOSS_NAMES - {"loss_sem_seg"}
    assert len(out.rpn.features) == 5 and out.rpn.features[0].shape == (2, 64, 16, 24)
    assert out.rpn.objectness[0].shape == (2, 3, 16, 24) and out.rpn.box_deltas[0].shape == (2, 12, 16, 24)
    assert all(len(p) <= cfg.model.rpn.post_nms_top_n_train for p in out.rpn.proposals)
    assert all(r.shape[0] <= cfg.model.roi_heads.batch_size_per_image for r in out.box_rois)
    assert out.box_features.shape == (sum(r.shape[0] for r in out.box_rois), cfg.model.roi_heads.box_head_dim)
    k = sum(r.shape[0] for r in out.mask_rois)
    assert k > 0 and out.mask_logits.shape == (k, t, 28, 28) and out.mask_features.shape == (k, 64, 14, 14)
    assert all(int(lab.min()) >= -1 for lab in out.box_labels)
    # foreground RoIs carry the thing index of their GT
    assert batch.targets is not None
    gt_labels = set(torch.cat([tg.labels for tg in batch.targets]).tolist())
    assert set(torch.cat(out.mask_labels).tolist()) <= gt_labels

    branch.eval()
    with torch.no_grad():
        out = branch.run(features, batch.image_sizes, padded, None)
        gt_boxes = [tg.boxes for tg in batch.targets]
        logits, mask_features = branch.forward_masks(features, gt_boxes, padded)
    assert out.losses == {} and len(out.detections) == 2
    for det in out.detections:
        assert set(det) == {"boxes", "scores", "labels", "mask_probs", "mask_logits"}
    n_gt = sum(len(b) for b in gt_boxes)
    assert logits.shape == (n_gt, t, 28, 28) and mask_features.shape == (n_gt, 64, 14, 14)


def test_rpn_proposals_match_torchvision_rpn_forward() -> None:
    """Our RPN/RoI driving reproduces torchvision's own RegionProposalNetwork.forward in eval."""
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 64))
    model = build_model(tiny_config(), meta).eval()
    assert isinstance(model, PanopticFPN)
    branch = model.instance_branch
    features = model.backbone(batch.images)
    with torch.no_grad():
        ours = branch.rpn(features, batch.image_sizes, (64, 64))
        image_list = torchvision.models.detection.image_list.ImageList(batch.images, batch.image_sizes)
        rpn_feats = {name: features[name] for name in branch.rpn.in_features}
        theirs, _ = RegionProposalNetwork.forward(branch.rpn, image_list, rpn_feats)
    for a, b in zip(ours.proposals, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_targets_are_named() -> None:
    """The instance branch's target checks (the batch checks of every model: test_contract.py)."""
    batch, meta = synth_batch(2)
    model = build_model(tiny_config(), meta).train()
    assert batch.targets is not None
    t0 = batch.targets[0]
    bad_sem = replace(t0, sem_seg=torch.full_like(t0.sem_seg, meta.num_classes))
    with pytest.raises(ValueError, match=rf"image '{t0.image_id}': sem_seg holds class index {meta.num_classes}"):
        model(replace(batch, targets=[bad_sem, batch.targets[1]]))
    bad_label = replace(t0, labels=torch.full_like(t0.labels, meta.num_things))
    with pytest.raises(ValueError, match=rf"image '{t0.image_id}', instance 0: thing index {meta.num_things}"):
        model(replace(batch, targets=[bad_label, batch.targets[1]]))
    flat = t0.boxes.clone()
    flat[0, 2] = flat[0, 0]
    with pytest.raises(ValueError, match=rf"image '{t0.image_id}', instance 0: degenerate box"):
        model(replace(batch, targets=[replace(t0, boxes=flat), batch.targets[1]]))


# --- configs --------------------------------------------------------------------------------------
def test_paper_config_values() -> None:
    """The papers' numbers in the R50 configs (that every config loads: test_contract.py)."""
    coco = load_config(REPO / "unipan" / "configs" / "panoptic_fpn" / "r50_coco.yaml")
    assert (coco.solver.batch_size, coco.solver.lr, coco.solver.max_iter) == (16, 0.02, 90000)
    assert coco.solver.steps == [60000, 80000] and coco.model.semantic.loss_weight == 0.5
    assert coco.data.dataset == "coco_panoptic" and max(coco.data.min_size_train) == 800
    cityscapes = load_config(REPO / "unipan" / "configs" / "panoptic_fpn" / "r50_cityscapes.yaml")
    assert cityscapes.data.crop_size == [512, 1024] and cityscapes.data.scale_range == [0.5, 2.0]
    assert cityscapes.model.semantic.loss_weight == 1.0 and cityscapes.model.fusion.stuff_area == 2048
    # detectron2 Base-RCNN-FPN: 1000 post-NMS proposals per image in training, 1000 in testing
    for cfg in (coco, cityscapes):
        rpn = cfg.model.rpn
        assert (rpn.post_nms_top_n_train, rpn.post_nms_top_n_test, rpn.post_nms_per_level) == (1000, 1000, False)


def test_r50_coco_parameter_count() -> None:
    """R50 Panoptic FPN for COCO (80 things, 53 stuff) against torchvision's Mask R-CNN R50-FPN."""
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80)} for i in range(133)]
    meta = DatasetMeta(cats)
    cfg = load_config(REPO / "unipan" / "configs" / "panoptic_fpn" / "r50_coco.yaml")
    with torch.device("meta"):
        model = build_model(cfg, meta)
        reference = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=81
        )
    assert isinstance(model, PanopticFPN)
    n_model = sum(p.numel() for p in model.parameters())
    n_semantic = sum(p.numel() for p in model.semantic_head.parameters())
    # torchvision's mask predictor has a background channel (81 outputs of 256 + 1); ours has 80.
    # Without pretrained weights torchvision's trunk uses trainable BN (affine terms are
    # parameters); ours is frozen BN (buffers).
    n_bn_affine = sum(2 * m.num_features for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d))
    n_reference = sum(p.numel() for p in reference.parameters()) - 257 - n_bn_affine
    assert n_model - n_semantic == n_reference
    # the semantic branch: 128-ch convs (1 + 1 + 2 + 3 of them) with GN, and a 1x1 to 54 classes
    convs = 4 * (256 * 128 * 9) + 3 * (128 * 128 * 9)
    assert n_semantic == convs + 7 * 2 * 128 + 128 * 54 + 54


def test_branch_inconsistencies_are_rejected() -> None:
    _, meta = synth_batch(1)
    cfg = tiny_config()
    model = build_panoptic_fpn(cfg.model, meta)
    shapes = model.backbone.output_shape()
    m = cfg.model
    other = build_instance_branch(m.rpn, m.roi_heads, m.mask_head, meta.num_things + 1, shapes)
    with pytest.raises(ValueError, match=r"instance branch predicts 6 classes; it needs things = 5"):
        PanopticFPN(
            backbone=model.backbone,
            instance_branch=other,
            semantic_head=model.semantic_head,
            meta=meta,
            semantic_loss_weight=0.5,
            fuse=model.fuse,
        )
    bad = tiny_config("model.rpn.anchor_sizes=[8,16]").model
    with pytest.raises(ValueError, match="one size per level"):
        build_instance_branch(bad.rpn, bad.roi_heads, bad.mask_head, meta.num_things, shapes)
    with pytest.raises(ValueError, match="at least one thing class"):
        build_instance_branch(m.rpn, m.roi_heads, m.mask_head, 0, shapes)
    assert isinstance(model.instance_branch, InstanceBranch)
