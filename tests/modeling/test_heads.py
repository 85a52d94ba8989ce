"""The instance parts: RPN, BoxHead, MaskHead, InstanceBranch, against torchvision's Mask R-CNN."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
from helpers import stuff_only, synth_batch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align

from unipan.config import BackboneConfig, MaskHeadConfig, RoIHeadsConfig, RPNConfig
from unipan.modeling.backbone import build_backbone
from unipan.modeling.heads.instance import (
    RPN_IN_FEATURES,
    V1_STATE_DICT_RENAMES,
    InstanceBranch,
    build_instance_branch,
    rename_state_dict_keys,
    torchvision_targets,
)
from unipan.modeling.heads.roi_box import build_box_head
from unipan.modeling.heads.roi_mask import MaskHead, build_mask_head, mask_rcnn_targets
from unipan.modeling.heads.rpn import build_rpn
from unipan.modeling.layers import require_features
from unipan.structures import Batch, DatasetMeta, PanopticTarget

BACKBONE = BackboneConfig(name="resnet18", base_width=16, depths=[1, 1, 1, 1], fpn_channels=32, norm="bn", freeze_at=0)
RPN_CFG = RPNConfig(
    anchor_sizes=[8, 16, 32, 64, 128],
    pre_nms_top_n_train=300,
    pre_nms_top_n_test=300,
    post_nms_top_n_train=150,
    post_nms_top_n_test=150,
    batch_size_per_image=128,
)
ROI_CFG = RoIHeadsConfig(box_head_dim=64, batch_size_per_image=64, positive_fraction=0.5)
MASK_CFG = MaskHeadConfig(num_convs=2, conv_dims=32)


@dataclass
class Setup:
    batch: Batch
    meta: DatasetMeta
    targets: list[PanopticTarget]
    features: dict[str, Tensor]
    shapes: dict[str, tuple[int, int]]
    branch: InstanceBranch
    padded: tuple[int, int]


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.manual_seed(0)
    batch, meta = synth_batch(2, size=(64, 64))
    assert batch.targets is not None
    backbone = build_backbone(BACKBONE).eval()
    with torch.no_grad():
        features = backbone(batch.images)
    shapes = backbone.output_shape()
    branch = build_instance_branch(RPN_CFG, ROI_CFG, MASK_CFG, meta.num_things, shapes)
    return Setup(batch, meta, list(batch.targets), features, shapes, branch, (64, 64))


def _torchvision_parts(branch: InstanceBranch) -> RoIHeads:
    """torchvision's RoIHeads holding the branch's modules; its mask predictor gets a background channel 0."""
    box, mask = branch.box_head, branch.mask_head
    theirs = MaskRCNNPredictor(MASK_CFG.conv_dims, MASK_CFG.conv_dims, branch.num_things + 1)
    with torch.no_grad():
        theirs.conv5_mask.load_state_dict(mask.predictor.conv5_mask.state_dict())
        theirs.mask_fcn_logits.weight[1:] = mask.predictor.mask_fcn_logits.weight
        theirs.mask_fcn_logits.bias[1:] = mask.predictor.mask_fcn_logits.bias
    return RoIHeads(
        box_roi_pool=box.pooler,
        box_head=box.mlp,
        box_predictor=box.predictor,
        fg_iou_thresh=ROI_CFG.fg_iou_thresh,
        bg_iou_thresh=ROI_CFG.bg_iou_thresh,
        batch_size_per_image=ROI_CFG.batch_size_per_image,
        positive_fraction=ROI_CFG.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=ROI_CFG.score_thresh,
        nms_thresh=ROI_CFG.nms_thresh,
        detections_per_img=ROI_CFG.detections_per_img,
        mask_roi_pool=mask.pooler,
        mask_head=mask.convs,
        mask_predictor=theirs,
    )


def test_branch_equals_torchvision_mask_rcnn(setup: Setup) -> None:
    """Training losses and eval detections of torchvision's RPN + RoIHeads forwards, given the same weights."""
    s, branch = setup, setup.branch
    roi_heads = _torchvision_parts(branch)
    image_list = ImageList(s.batch.images, list(s.batch.image_sizes))
    rpn_features = OrderedDict((k, s.features[k]) for k in RPN_IN_FEATURES)
    tv_targets = torchvision_targets(s.targets, s.batch.image_sizes, branch.num_things)

    branch.train()
    roi_heads.train()
    torch.manual_seed(7)
    ours = branch.run(s.features, s.batch.image_sizes, s.padded, s.targets)
    torch.manual_seed(7)
    proposals, rpn_losses = RegionProposalNetwork.forward(branch.rpn, image_list, rpn_features, tv_targets)
    _, roi_losses = roi_heads(s.features, proposals, list(s.batch.image_sizes), tv_targets)
    theirs = {
        "loss_rpn_objectness": rpn_losses["loss_objectness"],
        "loss_rpn_box_reg": rpn_losses["loss_rpn_box_reg"],
        **roi_losses,
    }
    assert set(ours.losses) == set(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours.losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.detections == [] and len(ours.proposals) == 2
    assert all(torch.equal(a, b) for a, b in zip(ours.proposals, proposals, strict=True))

    branch.eval()
    roi_heads.eval()
    with torch.no_grad():
        ours = branch.run(s.features, s.batch.image_sizes, s.padded)
        proposals, _ = RegionProposalNetwork.forward(branch.rpn, image_list, rpn_features)
        detections, _ = roi_heads(s.features, proposals, list(s.batch.image_sizes))
    assert ours.losses == {} and sum(len(d["boxes"]) for d in detections) > 0
    for mine, det in zip(ours.detections, detections, strict=True):
        assert torch.equal(mine["boxes"], det["boxes"]) and torch.equal(mine["scores"], det["scores"])
        assert torch.equal(mine["labels"] + 1, det["labels"])
        torch.testing.assert_close(mine["mask_probs"][:, None], det["masks"], rtol=1e-5, atol=1e-6)


def test_box_sampling_equals_torchvision_with_an_image_without_instances(setup: Setup) -> None:
    s, box = setup, setup.branch.box_head
    meta_targets = stuff_only(s.batch, s.meta, 1).targets
    assert meta_targets is not None and len(meta_targets[1]) == 0
    tv_targets = torchvision_targets(meta_targets, s.batch.image_sizes, box.num_things)
    with torch.no_grad():
        proposals = setup.branch.rpn.eval()(s.features, s.batch.image_sizes, s.padded).proposals
    roi_heads = _torchvision_parts(setup.branch)  # before seeding: it draws a predictor's init
    torch.manual_seed(3)
    samples = box.sample_rois(proposals, tv_targets)
    torch.manual_seed(3)
    rois, matched, labels, regression = roi_heads.select_training_samples(list(proposals), tv_targets)
    for ours, theirs in (
        (samples.rois, rois),
        (samples.gt_index, matched),
        ([lab + 1 for lab in samples.labels], labels),
        # an image without instances regresses to a dummy zero box, as in torchvision (non-finite
        # targets that fastrcnn_loss never reads: no RoI of it is foreground)
        (samples.regression_targets, list(regression)),
    ):
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert bool((samples.labels[1] == -1).all()) and bool((samples.labels[0] >= 0).any())


def test_mask_head_on_arbitrary_boxes_equals_the_branch_path(setup: Setup) -> None:
    s, branch = setup, setup.branch.eval()
    with torch.no_grad():
        out = branch.run(s.features, s.batch.image_sizes, s.padded)
        gt_boxes = [t.boxes for t in s.targets]
        # GT boxes and the detections in one call: each box pools from its own image
        boxes = [torch.cat([g, d]) for g, d in zip(gt_boxes, out.mask_rois, strict=True)]
        logits, features = branch.forward_masks(s.features, boxes, s.padded)
        head = branch.mask_head
        pooled = head.pooler(s.features, gt_boxes, [s.padded] * 2)
        gt_features = head.convs(pooled)
        gt_logits = head.predictor(gt_features)
    n_gt = [len(g) for g in gt_boxes]
    n_det = [len(d) for d in out.mask_rois]
    per_image = logits.split([g + d for g, d in zip(n_gt, n_det, strict=True)])
    mine_gt = torch.cat([x[:g] for x, g in zip(per_image, n_gt, strict=True)])
    mine_det = torch.cat([x[g:] for x, g in zip(per_image, n_gt, strict=True)])
    torch.testing.assert_close(mine_det, out.mask_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine_gt, gt_logits, rtol=1e-5, atol=1e-6)
    m = 2 * MASK_CFG.pooler_resolution
    assert logits.shape == (sum(n_gt) + sum(n_det), branch.num_things, m, m)
    assert features.shape == (sum(n_gt) + sum(n_det), MASK_CFG.conv_dims, m // 2, m // 2)
    # the detections' own channel is what the branch reports
    own = MaskHead.select_class(out.mask_logits, torch.cat(out.mask_labels))
    torch.testing.assert_close(own, torch.cat([d["mask_logits"] for d in out.detections]))


def test_mask_head_on_p3_p5_with_canonical_scale_112() -> None:
    """SpatialFlow's mask head: a 112 px box pools from P4 (224 would choose P3)."""
    torch.manual_seed(0)
    shapes = {f"p{k}": (8, 2**k) for k in range(3, 8)}
    head = build_mask_head(MASK_CFG, shapes, 3, in_features=("p3", "p4", "p5"), canonical_scale=112)
    features = {f"p{k}": torch.randn(1, 8, 256 // 2**k, 256 // 2**k) for k in range(3, 6)}
    box = torch.tensor([[40.0, 50.0, 152.0, 162.0]])
    pooled = head.pooler(features, [box], [(256, 256)])
    expected = roi_align(features["p4"], [box], 14, spatial_scale=1 / 16, sampling_ratio=MASK_CFG.sampling_ratio)
    torch.testing.assert_close(pooled, expected)
    logits, _ = head(features, [box], (256, 256))
    assert logits.shape == (1, 3, 28, 28) and head.in_features == ["p3", "p4", "p5"]


def test_mask_loss(setup: Setup) -> None:
    head = setup.branch.mask_head
    t = setup.targets[0]
    rois = [t.boxes[:2]]
    logits = torch.randn(2, head.num_things, 28, 28, requires_grad=True)
    loss = head.loss(logits, rois, [t.labels[:2]], [torch.arange(2)], [t.masks])
    assert loss.ndim == 0 and float(loss.detach()) > 0
    empty = head.loss(logits[:0], [t.boxes[:0]], [t.labels[:0]], [torch.arange(0)], [t.masks])
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_mask_targets_soft_and_binary_by_hand() -> None:
    """An 8 x 8 box over a mask of its columns 0..4 and every row, M = 4 (2 x 2 px bins).

    torchvision's RoIAlign (aligned=False, 2 x 2 samples at bin offsets 0.5 and 1.5 px, pixel j at
    coordinate j): the third bin's samples at x = 8.5 and 9.5 read 1/2 and 0 (mean 1/4); the last
    row's samples at y = 10.5 and 11.5 read 1 and 1/2 (mean 3/4). Thresholded at 0.5: 1, 1, 0, 0.
    """
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 4:12, 4:9] = True
    box = torch.tensor([[4.0, 4.0, 12.0, 12.0]])
    soft = mask_rcnn_targets([box], [torch.tensor([0])], [mask], 4)
    binary = mask_rcnn_targets([box], [torch.tensor([0])], [mask], 4, binarize=True)
    row, last = [1.0, 1.0, 0.25, 0.0], [0.75, 0.75, 0.1875, 0.0]
    torch.testing.assert_close(soft, torch.tensor([[row, row, row, last]]))
    torch.testing.assert_close(binary, torch.tensor([[[1.0, 1.0, 0.0, 0.0]] * 4]))
    empty = mask_rcnn_targets([box[:0]], [torch.tensor([], dtype=torch.long)], [mask], 4, binarize=True)
    assert empty.shape == (0, 4, 4)


@pytest.mark.parametrize("binary", [False, True])
def test_mask_loss_uses_the_configured_targets(setup: Setup, binary: bool) -> None:
    """`MaskHeadConfig.binary_targets` reaches the loss: BCE against the soft or thresholded crops."""
    head = build_mask_head(MaskHeadConfig(num_convs=0, binary_targets=binary), setup.shapes, setup.meta.num_things)
    assert head.binary_targets is binary
    t = setup.targets[0]
    rois = [t.boxes[:3] + torch.tensor([1.5, -2.0, 3.0, 0.5])]  # off the GT boxes: soft crop edges
    logits = torch.randn(3, head.num_things, 28, 28)
    soft = mask_rcnn_targets(rois, [torch.arange(3)], [t.masks], 28)
    assert bool(((soft > 0) & (soft < 1)).any())
    expected_targets = (soft >= 0.5).float() if binary else soft
    own = MaskHead.select_class(logits, t.labels[:3])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(own, expected_targets)
    torch.testing.assert_close(head.loss(logits, rois, [t.labels[:3]], [torch.arange(3)], [t.masks]), expected)


def test_classify_boxes(setup: Setup) -> None:
    s, box = setup, setup.branch.box_head.eval()
    gt_boxes = [t.boxes for t in s.targets]
    with torch.no_grad():
        scores, labels = box.classify_boxes(s.features, gt_boxes, s.padded)
        features, class_logits, deltas = box(s.features, gt_boxes, s.padded)
    n = sum(len(b) for b in gt_boxes)
    t = box.num_things
    assert scores.shape == labels.shape == (n,) and labels.dtype == torch.int64
    assert features.shape == (n, ROI_CFG.box_head_dim) and class_logits.shape == (n, t + 1)
    assert deltas.shape == (n, 4 * (t + 1))
    probs = class_logits.softmax(dim=-1)
    # the best thing class, background excluded even where it would win
    assert torch.equal(labels, probs[:, 1:].argmax(dim=-1))
    assert torch.equal(scores, probs[torch.arange(n), labels + 1])


def test_rpn_outputs_are_reachable(setup: Setup) -> None:
    s, rpn = setup, setup.branch.rpn.eval()
    with torch.no_grad():
        out = rpn(s.features, s.batch.image_sizes, s.padded)
    a = len(RPN_CFG.aspect_ratios)
    assert rpn.in_features == list(RPN_IN_FEATURES)
    for level, name in enumerate(RPN_IN_FEATURES):
        h, w = s.features[name].shape[-2:]
        assert out.objectness[level].shape == (2, a, h, w)
        assert out.box_deltas[level].shape == (2, 4 * a, h, w)
        assert out.features[level].shape == (2, 32, h, w)
    n_anchors = sum(a * f.shape[-2] * f.shape[-1] for f in out.objectness)
    assert len(out.anchors) == 2 and all(anchors.shape == (n_anchors, 4) for anchors in out.anchors)
    for boxes, scores in zip(out.proposals, out.proposal_scores, strict=True):
        assert boxes.shape == (len(scores), 4) and len(scores) <= RPN_CFG.post_nms_top_n_test
    assert out.losses == {}
    rpn.train()
    with pytest.raises(ValueError, match="the RPN needs targets in training mode"):
        rpn(s.features, s.batch.image_sizes, s.padded)
    rpn.eval()


def test_training_run_reaches_every_parameter(setup: Setup) -> None:
    s, branch = setup, setup.branch.train()
    torch.manual_seed(0)
    out = branch.run(s.features, s.batch.image_sizes, s.padded, s.targets)
    branch.zero_grad()
    sum(out.losses.values()).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in branch.parameters())
    assert out.detections == [] and [len(p) for p in out.proposals] == [len(p) for p in out.rpn.proposals]
    assert all(int(lab.min()) >= -1 for lab in out.box_labels)
    assert set(torch.cat(out.mask_labels).tolist()) <= set(torch.cat([t.labels for t in s.targets]).tolist())
    with pytest.raises(ValueError, match="needs targets in training mode"):
        branch.run(s.features, s.batch.image_sizes, s.padded)
    branch.eval()


def test_require_features_and_builder_errors(setup: Setup) -> None:
    shapes = {"p2": (8, 4), "p3": (8, 8)}
    assert require_features(shapes, ["p3", "p2"], "x") == [(8, 8), (8, 4)]
    with pytest.raises(ValueError, match=r"^mask head inputs \['p4'\] not among backbone outputs \['p2', 'p3'\]$"):
        require_features(shapes, ["p2", "p4"], "mask head")
    with pytest.raises(ValueError, match="needs at least one input feature"):
        require_features(shapes, [], "RPN")
    p3_p7 = {f"p{k}": (8, 2**k) for k in range(3, 8)}
    with pytest.raises(ValueError, match=r"RPN inputs \['p2'\]"):
        build_rpn(RPN_CFG, p3_p7)
    with pytest.raises(ValueError, match=r"box head inputs \['p2'\]"):
        build_box_head(ROI_CFG, p3_p7, 3)
    with pytest.raises(ValueError, match=r"mask head inputs \['p2'\]"):
        build_mask_head(MASK_CFG, p3_p7, 3)
    with pytest.raises(ValueError, match="one size per level"):
        build_rpn(RPNConfig(anchor_sizes=[8, 16]), setup.shapes)
    with pytest.raises(ValueError, match="share one channel count"):
        build_box_head(ROI_CFG, {**setup.shapes, "p3": (16, 8)}, 3)
    with pytest.raises(ValueError, match="at least one thing class"):
        build_instance_branch(RPN_CFG, ROI_CFG, MASK_CFG, 0, setup.shapes)
    branch = setup.branch
    other_mask = build_mask_head(MASK_CFG, setup.shapes, branch.num_things + 1)
    with pytest.raises(ValueError, match=rf"mask head has {branch.num_things + 1} channels"):
        InstanceBranch(rpn=branch.rpn, box_head=branch.box_head, mask_head=other_mask)


def test_v1_state_dict_renames(setup: Setup) -> None:
    new_keys = {f"instance_branch.{k}" for k in setup.branch.state_dict()}
    # key names of the models saved before the split (torchvision RPN + RoIHeads, ContextFPN)
    old = {
        "instance_branch.rpn.head.conv.0.0.weight": "instance_branch.rpn.head.conv.0.0.weight",
        "instance_branch.roi_heads.box_head.fc6.weight": "instance_branch.box_head.mlp.fc6.weight",
        "instance_branch.roi_heads.box_predictor.cls_score.bias": "instance_branch.box_head.predictor.cls_score.bias",
        "instance_branch.roi_heads.mask_head.1.0.weight": "instance_branch.mask_head.convs.1.0.weight",
        "instance_branch.roi_heads.mask_predictor.mask_fcn_logits.weight": (
            "instance_branch.mask_head.predictor.mask_fcn_logits.weight"
        ),
    }
    for model in ("panoptic_fpn", "upsnet"):
        renamed = rename_state_dict_keys({k: torch.zeros(1) for k in old}, V1_STATE_DICT_RENAMES[model])
        assert list(renamed) == list(old.values())
        assert set(renamed) <= new_keys
    upsnet = rename_state_dict_keys(
        {"backbone.backbone.trunk.conv1.weight": torch.zeros(1), "backbone.context.fc.bias": torch.zeros(1)},
        V1_STATE_DICT_RENAMES["upsnet"],
    )
    assert list(upsnet) == ["backbone.trunk.conv1.weight", "backbone.context.fc.bias"]
