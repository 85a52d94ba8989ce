"""Panoptic FPN: semantic head, instance branch, the model, the registry and the configs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import stuff_only, synth_batch
from PIL import Image

from unipan.config import Config, FusionConfig, load_config
from unipan.data.collate import collate
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.data.transforms import Normalize
from unipan.io import load_json, read_id_png
from unipan.modeling.heads.instance import InstanceBranch, build_instance_branch
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead, semantic_loss, semantic_targets_stuff_things
from unipan.modeling.models.panoptic_fpn import PanopticFPN, build_panoptic_fpn
from unipan.modeling.registry import MODELS, build_model
from unipan.structures import (
    IGNORE_LABEL,
    Batch,
    DatasetMeta,
    PanopticResult,
    PanopticTarget,
    RawPrediction,
    SegmentInfo,
)

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "panoptic_fpn" / "tiny_synth.yaml"
LOSS_NAMES = {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_sem_seg"}


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY_CONFIG, list(overrides))


# --- semantic branch -------------------------------------------------------------------------------
def test_semantic_targets_stuff_things() -> None:
    sem = torch.tensor([[0, 1, 2, 3], [4, IGNORE_LABEL, 2, 0]])
    out = semantic_targets_stuff_things(sem, num_stuff=2)
    assert out.tolist() == [[0, 1, 2, 2], [2, IGNORE_LABEL, 2, 0]]
    assert semantic_targets_stuff_things(sem, num_stuff=0).tolist() == [[0, 0, 0, 0], [0, IGNORE_LABEL, 0, 0]]
    with pytest.raises(ValueError, match="negative class index -1"):
        semantic_targets_stuff_things(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="integer class indices"):
        semantic_targets_stuff_things(torch.zeros(3), 2)


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


def test_semantic_loss_ignores_and_never_nans() -> None:
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    targets = torch.randint(0, 4, (2, 8, 8))
    targets[0, :4] = IGNORE_LABEL
    expected = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL)
    torch.testing.assert_close(semantic_loss(logits, targets), expected)
    all_ignored = semantic_loss(logits, torch.full((2, 8, 8), IGNORE_LABEL))
    assert all_ignored.item() == 0.0
    all_ignored.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="out of range for 4 classes"):
        semantic_loss(logits, torch.full((2, 8, 8), 4))


# --- the model ------------------------------------------------------------------------------------
def test_train_step_with_an_image_without_instances() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    batch = stuff_only(batch, meta, 1)
    model = build_model(tiny_config(), meta).train()
    losses = model(batch)
    assert isinstance(losses, dict) and set(losses) == LOSS_NAMES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for part in (model.backbone, model.instance_branch.rpn, model.instance_branch.roi_heads, model.semantic_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(part).__name__
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_all_images_without_instances_train() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(2)
    batch = stuff_only(stuff_only(batch, meta, 0), meta, 1)
    model = build_model(tiny_config(), meta).train()
    losses = model(batch)
    assert set(losses) == LOSS_NAMES and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()


def test_loss_weights() -> None:
    torch.manual_seed(0)
    batch, meta = synth_batch(1)
    model = build_model(tiny_config("model.semantic.loss_weight=1.0"), meta).train()
    torch.manual_seed(1)
    full = model(batch)["loss_sem_seg"]
    model.semantic_loss_weight = 0.25
    torch.manual_seed(1)
    torch.testing.assert_close(model(batch)["loss_sem_seg"], full * 0.25)


def test_eval_results_at_input_size() -> None:
    torch.manual_seed(0)
    ds = SyntheticPanoptic(2, seed=3, opts=SynthOptions(size=(90, 100)), transform=Normalize())
    small = SyntheticPanoptic(1, seed=4, opts=SynthOptions(size=(40, 56)), transform=Normalize())
    batch = collate([ds[0], small[0]])
    assert batch.images.shape[-2:] == (96, 128)
    meta = ds.meta
    seen: list[RawPrediction] = []

    def fusion(raw: RawPrediction) -> PanopticResult:
        seen.append(raw)
        h, w = raw.sem_logits.shape[-2:]
        return PanopticResult(panoptic=torch.zeros((h, w), dtype=torch.int32), segments=[])

    cfg = tiny_config("model.roi_heads.score_thresh=0.0")
    model = build_panoptic_fpn(cfg, meta)
    model = PanopticFPN(
        backbone=model.backbone,
        instance_branch=model.instance_branch,
        semantic_head=model.semantic_head,
        meta=meta,
        semantic_loss_weight=0.5,
        fusion=fusion,
    ).eval()
    results = model(batch)
    assert isinstance(results, list) and len(results) == 2 and len(seen) == 2
    for result, (h, w), image_id in zip(results, batch.image_sizes, batch.image_ids, strict=True):
        raw = result.raw
        assert raw is not None and result.image_id == image_id and result.image_size == (h, w)
        n = len(raw)
        assert n > 0  # score_thresh 0 keeps detections even from an untrained head
        assert raw.boxes.shape == (n, 4) and raw.labels.dtype == torch.long
        assert int(raw.labels.min()) >= 0 and int(raw.labels.max()) < meta.num_things
        assert raw.boxes[:, 2].max() <= w and raw.boxes[:, 3].max() <= h
        assert raw.mask_probs is not None and raw.mask_probs.shape == (n, 28, 28)
        assert 0 <= float(raw.mask_probs.min()) and float(raw.mask_probs.max()) <= 1
        torch.testing.assert_close(raw.extras["mask_logits"].sigmoid(), raw.mask_probs)
        assert raw.sem_logits.shape == (meta.num_stuff + 1, h, w) and raw.sem_space == "stuff+things"
        assert raw.sem_pred is not None and torch.equal(raw.sem_pred, raw.sem_logits.argmax(0))


def test_heuristic_fusion_from_config() -> None:
    pytest.importorskip("unipan.fusion.heuristic")
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 96))
    cfg = tiny_config(
        "model.fusion.stuff_area=0", "model.fusion.instance_score_thresh=0.0", "model.roi_heads.score_thresh=0.0"
    )
    model = build_model(cfg, meta).eval()
    assert isinstance(model, PanopticFPN)
    results = model(batch)
    assert isinstance(results, list)
    for result, image_id in zip(results, batch.image_ids, strict=True):
        assert result.image_id == image_id and result.image_size == (64, 96) and result.raw is not None
        ids = set(torch.unique(result.panoptic).tolist()) - {0}
        assert ids == {s.id for s in result.segments}
        assert {s.category_id for s in result.segments} <= {c.id for c in meta.categories}
        # a stuff_area of 0 keeps every stuff region: at least one stuff segment per image
        assert any(not s.isthing for s in result.segments)


def test_eval_without_detections() -> None:
    pytest.importorskip("unipan.fusion.heuristic")
    torch.manual_seed(0)
    batch, meta = synth_batch(1, size=(64, 64))
    # softmax scores never exceed 1: no detection survives
    model = build_model(tiny_config("model.roi_heads.score_thresh=1.0", "model.fusion.stuff_area=0"), meta).eval()
    (result,) = model(batch)
    raw = result.raw
    assert raw is not None and len(raw) == 0
    assert raw.boxes.shape == (0, 4) and raw.mask_probs is not None and raw.mask_probs.shape == (0, 28, 28)
    assert all(not s.isthing for s in result.segments) and len(result.segments) > 0


def test_batch_of_two_equals_two_singles() -> None:
    """Eval on a padded batch of two same-size images equals each image alone.

    Tolerance: 1e-4 absolute on logits, scores and probabilities, 1e-3 pixels on boxes (float32
    convolutions may sum in a different order at batch size 1 and 2); labels and counts exact.
    """
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(96, 128))
    model = build_model(tiny_config("model.roi_heads.score_thresh=0.0"), meta).eval()
    assert isinstance(model, PanopticFPN)
    pair, _ = model.raw_predictions(batch)
    for i in range(2):
        single = replace(
            batch,
            images=batch.images[i : i + 1],
            image_sizes=batch.image_sizes[i : i + 1],
            image_ids=batch.image_ids[i : i + 1],
            targets=None,
        )
        (alone,), _ = model.raw_predictions(single)
        together = pair[i]
        assert len(alone) == len(together) > 0
        assert torch.equal(alone.labels, together.labels)
        torch.testing.assert_close(alone.boxes, together.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(alone.scores, together.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(alone.mask_probs, together.mask_probs, rtol=0, atol=1e-4)
        torch.testing.assert_close(alone.sem_logits, together.sem_logits, rtol=0, atol=1e-4)


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
    raws, _ = model.raw_predictions(batch)
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
        ours = branch.forward_rpn(features, batch.image_sizes, (64, 64))
        image_list = torchvision.models.detection.image_list.ImageList(batch.images, batch.image_sizes)
        rpn_feats = {name: features[name] for name in branch.in_features}
        theirs, _ = branch.rpn(image_list, rpn_feats)
    for a, b in zip(ours.proposals, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_targets_and_batches_are_named() -> None:
    batch, meta = synth_batch(2)
    model = build_model(tiny_config(), meta).train()
    assert batch.targets is not None
    with pytest.raises(ValueError, match="needs batch.targets"):
        model(replace(batch, targets=None))
    with pytest.raises(ValueError, match="not padded to a multiple of 32"):
        model(replace(batch, images=batch.images[:, :, :60]))
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
    with pytest.raises(ValueError, match="target sem_seg is"):
        model(replace(batch, image_sizes=[(32, 32), batch.image_sizes[1]]))


# --- registry and configs -------------------------------------------------------------------------
def test_registry_unknown_name_lists_known() -> None:
    cfg = tiny_config("model.name=nope")
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*'panoptic_fpn'.*'upsnet'"):
        build_model(cfg, SyntheticPanoptic(1).meta)
    assert MODELS["panoptic_fpn"] is build_panoptic_fpn


@pytest.mark.parametrize("name", ["r50_coco", "r50_cityscapes", "tiny_synth"])
def test_configs_load(name: str) -> None:
    cfg = load_config(REPO / "configs" / "panoptic_fpn" / f"{name}.yaml")
    assert cfg.model.name == "panoptic_fpn"
    if name == "r50_coco":
        assert (cfg.solver.batch_size, cfg.solver.lr, cfg.solver.max_iter) == (16, 0.02, 90000)
        assert cfg.solver.steps == [60000, 80000] and cfg.model.semantic.loss_weight == 0.5
        assert cfg.data.dataset == "coco_panoptic" and max(cfg.data.min_size_train) == 800
    if name == "r50_cityscapes":
        assert cfg.data.crop_size == [512, 1024] and cfg.data.scale_range == [0.5, 2.0]
        assert cfg.model.semantic.loss_weight == 1.0 and cfg.model.fusion.stuff_area == 2048


def test_r50_coco_parameter_count() -> None:
    """R50 Panoptic FPN for COCO (80 things, 53 stuff) against torchvision's Mask R-CNN R50-FPN."""
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80)} for i in range(133)]
    meta = DatasetMeta(cats)
    cfg = load_config(REPO / "configs" / "panoptic_fpn" / "r50_coco.yaml")
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
    model = build_panoptic_fpn(cfg, meta)
    shapes = model.backbone.output_shape()
    other = build_instance_branch(cfg.model, meta.num_things + 1, shapes)
    with pytest.raises(ValueError, match="instance branch has 6 thing classes"):
        PanopticFPN(
            backbone=model.backbone,
            instance_branch=other,
            semantic_head=model.semantic_head,
            meta=meta,
            semantic_loss_weight=0.5,
            fusion=FusionConfig(),
        )
    with pytest.raises(ValueError, match="one size per level"):
        build_instance_branch(tiny_config("model.rpn.anchor_sizes=[8,16]").model, meta.num_things, shapes)
    with pytest.raises(ValueError, match="at least one thing class"):
        build_instance_branch(cfg.model, 0, shapes)
    assert isinstance(model.instance_branch, InstanceBranch)
