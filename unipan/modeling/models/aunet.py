"""AUNet (Li et al., "Attention-guided Unified Network for Panoptic Segmentation", CVPR 2019).

One ResNet-FPN shared by three branches: the RPN, the FG branch (Mask R-CNN, as Panoptic FPN's)
and the BG branch (Panoptic FPN's semantic head over stuff + one "things" class on COCO, or all
classes on Cityscapes, Table 3). Two attention connections run FG -> BG (Sec. 3.3):

- PAM (Eq. 1-4), one per BG level P2..P5 with its own weights: the RPN's shared 3x3 conv features
  of the level give M' = 1 - sigmoid(conv(ReLU(conv(P)))), the level's semantic features become
  S * (1 + M'), optionally reweighted per channel (Eq. 3-4). It sits after the first block of the
  level's semantic tower, where the map has the level's resolution.
- MAM (Sec. 3.3.2): the FG mask features (28 x 28 deconv output, or the 14 x 14 head output) are
  RoIUpsampled into each RoI's FPN level (`layers/roi_upsample.py`), upsampled to stride 4 and
  summed; the result guides the same attention on the summed stride-4 map, before the predictor.
  RoIs: the positive sampled RoIs in training (the mask head's), the detections the fusion keeps
  (score >= its instance threshold) at inference.

Nothing is detached between the branches: the semantic loss trains the RPN's conv through PAM and
the mask head through MAM (Sec. 3.3, 4.2.2). Losses: Eq. 7, lambda_1 (RPN) .. lambda_4 (semantic).
Fusion: Panoptic FPN's heuristic one ([23], as Table 1's ablations).

With PAM and MAM off this is Panoptic FPN (same parameters in the same order, same outputs);
`separate=True` gives Table 1's "sep": a second backbone for the BG branch, no shared parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor, nn

from unipan.config.models import AUNetConfig
from unipan.fusion.heuristic import heuristic_fusion
from unipan.modeling.backbone import FPN, build_backbone
from unipan.modeling.heads.aunet_attention import (
    AttentionModule,
    HiddenMaskPredictor,
    attended_semantic_features,
    mask_guide,
)
from unipan.modeling.heads.instance import InstanceBranch, InstanceOutputs, build_instance_branch
from unipan.modeling.heads.roi_mask import MaskHead
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.segments import semantic_argmax, to_semantic_space
from unipan.structures import Batch, DatasetMeta, RawPrediction, SemSpace

__all__ = ["BG_CLASSES", "TABLE1_ROWS", "AUNet", "build_aunet"]

BG_CLASSES: dict[str, SemSpace] = {"stuff+things": "stuff+things", "all": "all"}
"""`model.aunet.bg_classes` -> the BG branch's class space (Table 3: COCO's strategy, "Ours_equ",
is stuff + one "things" class; the Cityscapes result uses all 19 semantic labels)."""

TABLE1_ROWS: dict[str, list[str]] = {
    "sep": [
        "model.aunet.separate=true",
        "model.aunet.pam=false",
        "model.aunet.mam=false",
        "model.aunet.reweight=false",
    ],
    "e2e": ["model.aunet.pam=false", "model.aunet.mam=false", "model.aunet.reweight=false"],
    "PAM": ["model.aunet.pam=true", "model.aunet.mam=false", "model.aunet.reweight=false"],
    "PAM_r": ["model.aunet.pam=true", "model.aunet.mam=false", "model.aunet.reweight=true"],
    "MAM": ["model.aunet.pam=false", "model.aunet.mam=true", "model.aunet.reweight=false"],
    "MAM_r": ["model.aunet.pam=false", "model.aunet.mam=true", "model.aunet.reweight=true"],
    "AUNet": ["model.aunet.pam=true", "model.aunet.mam=true", "model.aunet.reweight=true"],
}
"""The overrides of each row of the paper's Table 1 (on any AUNet config)."""

MAM_RESOLUTIONS = (14, 28)
MAM_LEVELS = ("fpn", "single")


class AUNet(PanopticModel):
    """Backbone -> (RPN + FG branch, BG branch with PAM / MAM) -> losses, or fused panoptic results.

    Args:
        backbone: ResNet-FPN (p2..p6) of the RPN and the FG branch, and of the BG branch unless
            `bg_backbone` is given.
        instance_branch: the Mask R-CNN branch; with a 28 x 28 MAM its mask predictor is a
            `HiddenMaskPredictor`.
        semantic_head: Panoptic FPN's semantic head over `sem_space`'s classes.
        meta: the dataset's classes.
        fuse: the heuristic fusion with its settings bound.
        sem_space: "stuff+things" (S + 1 classes) or "all" (S + T).
        semantic_loss_weight: lambda_4 (COCO 0.3, Cityscapes 1.0).
        rpn_loss_weight: lambda_1, on both RPN losses.
        rcnn_loss_weight: lambda_2, on the box classifier and regression losses (Cityscapes 0.75).
        mask_loss_weight: lambda_3.
        pam: {level: PAM} (None: off).
        mam: the mask attention (None: off).
        mam_mask_resolution: 28 (the mask predictor's hidden features) or 14 (the mask head's).
        mam_per_level: RoIs RoIUpsampled into their FPN levels (the paper) or all at stride 4.
        roi_upsample_normalize: Eq. 6 in RoIUpsample.
        mam_score_thresh: at inference MAM reads the detections scoring at least this (the
            fusion's instance threshold: the instances that can reach the panoptic result).
        bg_backbone: Table 1's "sep": the BG branch's own backbone.

    Losses (training): loss_rpn_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
    loss_mask, loss_sem_seg. Raw predictions: sem_logits in `sem_space`, detections with 28 x 28
    mask probabilities; extras: mask_logits, and M' of every attention as
    "attention_<level>" / "attention_mam" FloatTensor[h_l, w_l] (the image's part of the level).
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        instance_branch: InstanceBranch,
        semantic_head: SemanticFPNHead,
        meta: DatasetMeta,
        fuse: Fusion,
        sem_space: SemSpace = "stuff+things",
        semantic_loss_weight: float,
        rpn_loss_weight: float = 1.0,
        rcnn_loss_weight: float = 1.0,
        mask_loss_weight: float = 1.0,
        pam: nn.ModuleDict | None = None,
        mam: AttentionModule | None = None,
        mam_mask_resolution: int = 28,
        mam_per_level: bool = True,
        roi_upsample_normalize: bool = True,
        mam_score_thresh: float = 0.0,
        bg_backbone: FPN | None = None,
    ) -> None:
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        if sem_space not in ("stuff+things", "all"):
            raise ValueError(f"AUNet's BG branch predicts 'stuff+things' or 'all', got sem_space={sem_space!r}")
        expected = meta.num_stuff + 1 if sem_space == "stuff+things" else meta.num_classes
        self.check_num_classes("semantic head", semantic_head.num_classes, expected, sem_space)
        self.check_num_classes("instance branch", instance_branch.num_things, meta.num_things, "things")
        if mam_mask_resolution not in MAM_RESOLUTIONS:
            raise ValueError(f"mam_mask_resolution must be one of {MAM_RESOLUTIONS}, got {mam_mask_resolution}")
        if instance_branch.mask_head is None:
            raise ValueError("AUNet's FG branch needs the instance branch's mask head (MAM reads its features)")
        predictor = instance_branch.mask_head.predictor
        if mam is not None and mam_mask_resolution == 28 and not isinstance(predictor, HiddenMaskPredictor):
            raise ValueError("a 28x28 MAM reads the mask predictor's hidden features: wrap it in HiddenMaskPredictor")
        if pam is not None and not set(pam) <= set(semantic_head.in_features) & set(instance_branch.rpn.in_features):
            raise ValueError(
                f"PAM levels {sorted(pam)} must be levels of both the semantic head "
                f"{semantic_head.in_features} and the RPN {instance_branch.rpn.in_features}"
            )
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
        # registered after the Panoptic FPN parts: with PAM/MAM off the state dict is Panoptic FPN's
        self.bg_backbone = bg_backbone
        self.pam = pam
        self.mam = mam
        self.sem_space: SemSpace = sem_space
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.instance_loss_weights = {
            "loss_rpn_objectness": float(rpn_loss_weight),
            "loss_rpn_box_reg": float(rpn_loss_weight),
            "loss_classifier": float(rcnn_loss_weight),
            "loss_box_reg": float(rcnn_loss_weight),
            "loss_mask": float(mask_loss_weight),
        }
        self.mam_mask_resolution = int(mam_mask_resolution)
        self.mam_per_level = bool(mam_per_level)
        self.roi_upsample_normalize = bool(roi_upsample_normalize)
        self.mam_score_thresh = float(mam_score_thresh)

    # --- shared by training and inference ---------------------------------------------------------
    def _mask_head(self) -> MaskHead:
        head = self.instance_branch.mask_head
        assert head is not None, "checked in __init__"
        return head

    def _mam_inputs(self, instances: InstanceOutputs, training: bool) -> tuple[list[Tensor], Tensor]:
        """The RoIs MAM reads (per image FloatTensor[K_i, 4]) and their mask features [sum K_i, C_m, m, m]."""
        predictor = self._mask_head().predictor
        if self.mam_mask_resolution == 28:
            assert isinstance(predictor, HiddenMaskPredictor)
            features = predictor.take_hidden()
        else:
            features = instances.mask_features
        boxes = list(instances.mask_rois)
        if training:
            return boxes, features
        # inference: the mask head ran on every detection; keep those the fusion may paste
        per_image = features.split([int(b.shape[0]) for b in boxes])
        keep = [det["scores"] >= self.mam_score_thresh for det in instances.detections]
        kept_boxes = [b[k] for b, k in zip(boxes, keep, strict=True)]
        kept = torch.cat([f[k] for f, k in zip(per_image, keep, strict=True)])
        return kept_boxes, kept

    def _semantic_logits(
        self,
        features: dict[str, Tensor],
        bg_features: dict[str, Tensor],
        instances: InstanceOutputs,
        padded_size: tuple[int, int],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """BG logits FloatTensor[B, C, Hp/4, Wp/4] and the attention maps {name: FloatTensor[B, 1, H_l, W_l]}."""
        rpn_features = dict(zip(self.instance_branch.rpn.in_features, instances.rpn.features, strict=True))
        pam = None if self.pam is None else {name: module for name, module in self.pam.items()}
        fused, maps = attended_semantic_features(self.semantic_head, bg_features, pam, rpn_features)  # type: ignore[arg-type]
        if self.mam is not None:
            boxes, mask_features = self._mam_inputs(instances, self.training)
            head = self._mask_head()
            pooler = head.pooler
            guide = mask_guide(
                mask_features,
                boxes,
                [(int(features[n].shape[-2]), int(features[n].shape[-1])) for n in head.in_features],
                padded_size,
                (int(fused.shape[-2]), int(fused.shape[-1])),
                sampling_ratio=int(pooler.sampling_ratio),
                normalize=self.roi_upsample_normalize,
                per_level=self.mam_per_level,
                canonical_scale=int(pooler.canonical_scale),
                canonical_level=int(pooler.canonical_level),
            )
            fused, maps["mam"] = self.mam(fused, guide)
        return self.semantic_head.predictor(fused), maps

    def _bg_features(self, batch: Batch, features: dict[str, Tensor]) -> dict[str, Tensor]:
        return features if self.bg_backbone is None else self.bg_backbone(batch.images)

    # --- training and inference ------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see the class docstring)."""
        assert batch.targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        # Panoptic FPN's semantic targets: crowd pixels carry their class (in "stuff+things" the
        # "things" class, as detectron2 trains them); void and padding are ignored
        padded_sem_seg = batch.padded_sem_seg(crowd_meta=self.meta)
        check_sem_seg(padded_sem_seg, batch.image_ids, self.meta.num_classes)
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, batch.targets)
        losses = {name: loss * self.instance_loss_weights[name] for name, loss in instances.losses.items()}
        logits, _ = self._semantic_logits(features, self._bg_features(batch, features), instances, padded_size)
        # float32 before the bilinear upsampling and the softmax (fp16 under autocast otherwise)
        sem_logits = upsample_logits(logits.float(), padded_size)
        sem_targets = to_semantic_space(padded_sem_seg, self.meta.num_stuff, self.sem_space)
        losses["loss_sem_seg"] = semantic_loss(sem_logits, sem_targets) * self.semantic_loss_weight
        return losses

    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size."""
        return self.inference(batch)[0]

    @torch.no_grad()
    def inference(self, batch: Batch) -> tuple[list[RawPrediction], InstanceOutputs]:
        """The raw predictions together with everything the instance branch computed."""
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, None)
        logits, maps = self._semantic_logits(features, self._bg_features(batch, features), instances, padded_size)
        sem_logits = upsample_logits(logits, padded_size)
        raws: list[RawPrediction] = []
        for i, (h, w) in enumerate(batch.image_sizes):
            det = instances.detections[i]
            image_logits = sem_logits[i, :, :h, :w]
            extras: dict[str, Tensor] = {"mask_logits": det["mask_logits"]}
            for name, m in maps.items():
                # the image's part of the level: ceil(h * H_l / Hp) rows, likewise columns
                rows = math.ceil(h * m.shape[-2] / padded_size[0])
                cols = math.ceil(w * m.shape[-1] / padded_size[1])
                extras[f"attention_{name}"] = m[i, 0, :rows, :cols]
            raws.append(
                RawPrediction(
                    boxes=det["boxes"],
                    scores=det["scores"],
                    labels=det["labels"],
                    sem_logits=image_logits,
                    mask_probs=det["mask_probs"],
                    sem_space=self.sem_space,
                    sem_pred=semantic_argmax(image_logits),
                    extras=extras,
                )
            )
        return raws, instances


def build_aunet(cfg: AUNetConfig, meta: DatasetMeta) -> AUNet:
    """AUNet for `meta`'s classes from its model config (parts created in Panoptic FPN's order first).

    Raises:
        ValueError: naming the `model.aunet.*` key of an unknown choice.
    """
    a = cfg.aunet
    if a.bg_classes not in BG_CLASSES:
        raise ValueError(f"model.aunet.bg_classes must be one of {sorted(BG_CLASSES)}, got {a.bg_classes!r}")
    if a.mam_mask_resolution not in MAM_RESOLUTIONS:
        raise ValueError(
            f"model.aunet.mam_mask_resolution must be one of {MAM_RESOLUTIONS}, got {a.mam_mask_resolution}"
        )
    if a.mam_levels not in MAM_LEVELS:
        raise ValueError(f"model.aunet.mam_levels must be one of {list(MAM_LEVELS)}, got {a.mam_levels!r}")
    sem_space = BG_CLASSES[a.bg_classes]
    # Panoptic FPN's parts, in its order (a seeded build draws the same weights)
    backbone = build_backbone(cfg.backbone)
    shapes = backbone.output_shape()
    instance_branch = build_instance_branch(cfg.rpn, cfg.roi_heads, cfg.mask_head, meta.num_things, shapes)
    semantic_head = SemanticFPNHead(
        in_shapes=shapes,
        conv_dims=cfg.semantic.conv_dims,
        norm=cfg.semantic.norm,
        num_classes=meta.num_stuff + 1 if sem_space == "stuff+things" else meta.num_classes,
    )
    # AUNet's own parts after them
    bg_backbone = build_backbone(cfg.backbone) if a.separate else None
    pam: nn.ModuleDict | None = None
    if a.pam:
        allowed = [n for n in semantic_head.in_features if n in instance_branch.rpn.in_features]
        if not a.pam_levels or not set(a.pam_levels) <= set(allowed):
            raise ValueError(f"model.aunet.pam_levels {a.pam_levels} must be non-empty, among {allowed}")
        pam = nn.ModuleDict(
            {
                level: AttentionModule(shapes[level][0], cfg.semantic.conv_dims, a.reweight, a.reweight_gn_groups)
                for level in a.pam_levels
            }
        )
    mam: AttentionModule | None = None
    if a.mam:
        mask_head = instance_branch.mask_head
        assert mask_head is not None, "build_instance_branch builds one"
        predictor = mask_head.predictor
        conv5 = predictor.conv5_mask
        assert isinstance(conv5, nn.ConvTranspose2d)
        if a.mam_mask_resolution == 28:
            mask_head.predictor = HiddenMaskPredictor(predictor)
            mask_channels = int(conv5.out_channels)
        else:
            mask_channels = int(conv5.in_channels)
        mam = AttentionModule(mask_channels, cfg.semantic.conv_dims, a.reweight, a.reweight_gn_groups)
    return AUNet(
        backbone=backbone,
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        meta=meta,
        fuse=functools.partial(heuristic_fusion, **dataclasses.asdict(cfg.fusion)),
        sem_space=sem_space,
        semantic_loss_weight=cfg.semantic.loss_weight,
        rpn_loss_weight=a.rpn_loss_weight,
        rcnn_loss_weight=a.rcnn_loss_weight,
        mask_loss_weight=a.mask_loss_weight,
        pam=pam,
        mam=mam,
        mam_mask_resolution=a.mam_mask_resolution,
        mam_per_level=a.mam_levels == "fpn",
        roi_upsample_normalize=a.roi_upsample_normalize,
        mam_score_thresh=cfg.fusion.instance_score_thresh if a.mam_score_thresh is None else a.mam_score_thresh,
        bg_backbone=bg_backbone,
    )
