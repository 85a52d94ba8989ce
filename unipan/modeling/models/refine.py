"""REFINE (Ren et al., AAAI 2021): prediction fusion for panoptic segmentation.

Panoptic FPN whose semantic head predicts every stuff and thing class, plus three parts:

- IBPP (Eq. 2-6, `unipan.modeling.heads.ibpp`): T iterations of semantic -> RoI projection
  (RoIAlign of a 256-channel semantic embedding F_sem, added to the FPN RoI features, and of the
  previous semantic logits, concatenated) and RoI -> semantic projection (ROI-Flatten of the masks,
  concatenated with F_sem), with a mask head and a semantic head per iteration. The instance
  branch runs without a mask head of its own. Losses: mask BCE of iteration t weighted w_t, the
  semantic CE of P^(0) weighted lambda and of P^(t) weighted lambda * w_t (w = 1, 0.5, 0.25).
- SOE (Eq. 7): an occlusion network (`unipan.modeling.heads.occlusion`) on detached RoI
  features, masks and labels, trained jointly with labels from the panoptic ground truth
  (`unipan.fusion.occlusion.occlusion_targets`); at inference its O(i, j) for the candidate pairs
  go into `RawPrediction.extras` ("occ_pairs", "occ_prob") and the fusion applies Eq. 7.
- UE (Eq. 8): inference only, inside the fusion (`unipan.fusion.unknown_erasing`).

Every part is a switch (the rows of the paper's Tables 3-6): `model.refine.ibpp_iterations`
(0 = the Table 3 base), `model.occlusion.enabled` / `inputs`, `model.fusion.occlusion` (none |
learned | shr), `model.fusion.sigma` (0 = hard rule), `model.fusion.unknown_erasing`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unipan.config.models import RefineConfig
from unipan.fusion.occlusion import OCCLUSION_METHODS, candidate_pairs, occlusion_fusion, occlusion_targets
from unipan.fusion.paste import paste_masks_in_image
from unipan.modeling.backbone import FPN, build_backbone
from unipan.modeling.heads.ibpp import IBPP, IBPPStep
from unipan.modeling.heads.instance import ROI_IN_FEATURES, InstanceBranch, InstanceOutputs, build_instance_branch
from unipan.modeling.heads.occlusion import OcclusionHead
from unipan.modeling.heads.roi_mask import MaskHead, mask_rcnn_targets
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.modeling.layers.roi_align import MultiScaleRoIAlign, roi_align
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.segments import semantic_argmax
from unipan.structures import Batch, DatasetMeta, PanopticTarget, RawPrediction

__all__ = ["REFINE", "build_refine"]

SEMANTIC_STRIDE = 4
MASK_OUTPUTS = ("last", "mean")


class REFINE(PanopticModel):
    """Backbone -> instance branch (no mask head) + all-class semantic head -> IBPP -> occlusion head.

    Args:
        backbone: ResNet-FPN with p2..p6.
        instance_branch: RPN + box head; its own mask head only when `ibpp` is None.
        semantic_head: H_sem over S + T classes (stuff first).
        embedding: 1x1 conv + ReLU from the semantic features to F_sem (E = FPN channels), or None
            when nothing reads F_sem (no IBPP and no occlusion head).
        ibpp: the IBPP iterations, or None (T = 0: the base mask head's masks).
        mask_pooler: FPN RoIAlign giving f_ins (R x R) for IBPP and the occlusion head.
        occlusion_head: the occlusion network, or None.
        meta: the dataset's classes.
        fuse: the fusion with its settings bound (`occlusion_fusion`).
        semantic_loss_weight: lambda, the weight of P^(0)'s cross-entropy.
        stage_loss_weights: w_t per iteration (>= T values).
        flatten_score_weighted: ROI-Flatten weights each mask by its RoI's class score.
        mask_output: "last" (m^(T)) or "mean" (mean probability of the T iterations).
        occlusion_loss_weight: weight of the occlusion BCE.
        pairs_per_image: ordered occlusion training pairs kept per image.
        pair_settings: the fusion's instance_score_thresh, mask_thresh, rho and intraclass, which
            choose the candidate pairs at inference (and rho the training pairs).
        binary_mask_targets: the IBPP iterations' mask targets thresholded at 0.5
            (`mask_head.binary_targets`; the base mask head reads it itself).
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        instance_branch: InstanceBranch,
        semantic_head: SemanticFPNHead,
        embedding: nn.Module | None,
        ibpp: IBPP | None,
        mask_pooler: MultiScaleRoIAlign,
        occlusion_head: OcclusionHead | None,
        meta: DatasetMeta,
        fuse: Fusion,
        semantic_loss_weight: float = 0.5,
        stage_loss_weights: tuple[float, ...] = (1.0, 0.5, 0.25),
        flatten_score_weighted: bool = True,
        mask_output: str = "last",
        occlusion_loss_weight: float = 1.0,
        pairs_per_image: int = 128,
        pair_settings: dict[str, float | bool] | None = None,
        binary_mask_targets: bool = False,
    ) -> None:
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        self.check_num_classes("semantic head", semantic_head.num_classes, meta.num_classes, "stuff + things")
        self.check_num_classes("instance branch", instance_branch.num_things, meta.num_things, "things")
        iterations = ibpp.iterations if ibpp is not None else 0
        if ibpp is None and instance_branch.mask_head is None:
            raise ValueError("REFINE without IBPP iterations needs the instance branch's own mask head")
        if len(stage_loss_weights) < iterations:
            raise ValueError(
                f"model.refine.stage_loss_weights has {len(stage_loss_weights)} values for {iterations} IBPP iterations"
            )
        if mask_output not in MASK_OUTPUTS:
            raise ValueError(f"model.refine.mask_output must be one of {MASK_OUTPUTS}, got {mask_output!r}")
        if (ibpp is not None or occlusion_head is not None) and embedding is None:
            raise ValueError("IBPP and the occlusion head read the semantic embedding F_sem: embedding is required")
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
        self.embedding = embedding
        self.ibpp = ibpp
        self.mask_pooler = mask_pooler
        self.occlusion_head = occlusion_head
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.stage_loss_weights = [float(w) for w in stage_loss_weights[:iterations]]
        self.flatten_score_weighted = bool(flatten_score_weighted)
        self.mask_output = mask_output
        self.occlusion_loss_weight = float(occlusion_loss_weight)
        self.pairs_per_image = int(pairs_per_image)
        self.pair_settings = dict(
            pair_settings or {"score_thresh": 0.5, "mask_thresh": 0.5, "rho": 0.2, "intraclass": True}
        )
        self.binary_mask_targets = bool(binary_mask_targets)

    # --- shared forward --------------------------------------------------------------------------
    def _forward_heads(self, batch: Batch, targets: list[PanopticTarget] | None) -> _Heads:
        """Backbone, instance branch, semantic head and IBPP, with every intermediate kept."""
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, targets, masks=self.ibpp is None)
        sem_features = self.semantic_head.layers(features)
        sem0 = self.semantic_head.predictor(sem_features)
        embedding = self.embedding(sem_features) if self.embedding is not None else None
        rois, labels = instances.mask_rois, instances.mask_labels
        f_ins = self.mask_pooler(dict(features), list(rois), [padded_size] * len(rois))
        label_t = torch.cat(list(labels)) if labels else torch.zeros(0, dtype=torch.long)
        steps: list[IBPPStep] = []
        if self.ibpp is not None:
            assert embedding is not None
            if self.training:
                weights = instances.class_probs if self.flatten_score_weighted else None
            else:
                weights = [d["scores"] for d in instances.detections] if self.flatten_score_weighted else None
            f_sem, steps = self.ibpp(f_ins, embedding, sem0, rois, labels, weights)
            sem_final = steps[-1].sem_logits
            if self.mask_output == "mean":
                probs = torch.stack([s.own_logits.sigmoid() for s in steps]).mean(dim=0)
                final_logits = torch.logit(probs)
            else:
                final_logits = steps[-1].own_logits
                probs = final_logits.sigmoid()
        else:
            f_sem = None
            if embedding is not None:
                f_sem = roi_align(
                    embedding,
                    [r.to(embedding.dtype) for r in rois],
                    self.mask_pooler.output_size,
                    1.0 / SEMANTIC_STRIDE,
                    self.mask_pooler.sampling_ratio,
                    False,
                )
            sem_final = sem0
            if self.training:
                final_logits = MaskHead.select_class(instances.mask_logits, label_t)
            else:
                final_logits = torch.cat([d["mask_logits"] for d in instances.detections])
            probs = final_logits.sigmoid()
        pair_features = (f_ins + f_sem).detach() if f_sem is not None else f_ins.detach()
        return _Heads(
            instances=instances,
            padded_size=padded_size,
            sem0=sem0,
            sem_final=sem_final,
            steps=steps,
            rois=list(rois),
            label_t=label_t,
            final_logits=final_logits,
            final_probs=probs,
            pair_features=pair_features,
        )

    # --- training --------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see the module docstring for the names)."""
        targets = batch.targets
        assert targets is not None
        # crowd pixels train as their class, as the base Panoptic FPN (detectron2's convention)
        padded_sem_seg = batch.padded_sem_seg(crowd_meta=self.meta)
        check_sem_seg(padded_sem_seg, batch.image_ids, self.meta.num_classes)
        heads = self._forward_heads(batch, list(targets))
        losses = dict(heads.instances.losses)
        # float32 before the upsampling and the softmax (fp16 under autocast otherwise)
        sem0 = upsample_logits(heads.sem0.float(), heads.padded_size)
        losses["loss_sem_seg"] = semantic_loss(sem0, padded_sem_seg) * self.semantic_loss_weight
        if heads.steps:
            size = int(heads.steps[0].own_logits.shape[-1])
            gt_masks = [t.masks for t in targets]
            mask_targets = mask_rcnn_targets(
                heads.rois, heads.instances.mask_gt_index, gt_masks, size, binarize=self.binary_mask_targets
            )
            for t, (step, w) in enumerate(zip(heads.steps, self.stage_loss_weights, strict=True), start=1):
                own = step.own_logits
                if mask_targets.shape[0]:
                    loss_mask = F.binary_cross_entropy_with_logits(own, mask_targets.to(own))
                else:
                    loss_mask = own.sum() * 0.0
                losses[f"loss_mask_t{t}"] = loss_mask * w
                sem_t = upsample_logits(step.sem_logits.float(), heads.padded_size)
                losses[f"loss_sem_seg_t{t}"] = semantic_loss(sem_t, padded_sem_seg) * (self.semantic_loss_weight * w)
        if self.occlusion_head is not None:
            losses["loss_occlusion"] = self._occlusion_loss(heads, list(targets)) * self.occlusion_loss_weight
        return losses

    def _occlusion_loss(self, heads: _Heads, targets: list[PanopticTarget]) -> Tensor:
        """BCE of the occlusion head on RoI pairs labelled by the panoptic ground truth (detached inputs)."""
        assert self.occlusion_head is not None
        probs, features = heads.final_probs.detach(), heads.pair_features
        canvas = (heads.padded_size[0] // SEMANTIC_STRIDE, heads.padded_size[1] // SEMANTIC_STRIDE)
        all_pairs: list[Tensor] = []
        all_targets: list[Tensor] = []
        start = 0
        for image_rois, gt_index, target in zip(heads.rois, heads.instances.mask_gt_index, targets, strict=True):
            k = int(image_rois.shape[0])
            if k >= 2:
                masks = paste_masks_in_image(probs[start : start + k], image_rois / SEMANTIC_STRIDE, canvas) >= 0.5
                pairs, labels = occlusion_targets(
                    masks,
                    gt_index,
                    _panoptic_at_stride(target.panoptic, canvas).to(masks.device),
                    target.instance_ids.to(masks.device),
                    float(self.pair_settings["rho"]),
                )
                n_keep = self.pairs_per_image // 2
                if pairs.shape[0] // 2 > n_keep:
                    # keep both orders of a pair together (the two targets are complementary)
                    chosen = torch.randperm(pairs.shape[0] // 2, device=pairs.device)[:n_keep]
                    rows = torch.stack([2 * chosen, 2 * chosen + 1], dim=1).reshape(-1)
                    pairs, labels = pairs[rows], labels[rows]
                all_pairs.append(pairs + start)
                all_targets.append(labels)
            start += k
        pairs = torch.cat(all_pairs) if all_pairs else torch.zeros((0, 2), dtype=torch.long)
        if pairs.shape[0] == 0:
            # no labelled pair: a zero loss that keeps the head in the graph
            return sum((p.sum() * 0.0 for p in self.occlusion_head.parameters()), features.new_zeros(()))
        logits = self.occlusion_head(features, probs, heads.label_t.to(features.device), pairs.to(features.device))
        return F.binary_cross_entropy_with_logits(logits, torch.cat(all_targets).to(logits))

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size, "all" space, with the occlusion extras."""
        heads = self._forward_heads(batch, None)
        sem_logits = upsample_logits(heads.sem_final, heads.padded_size)
        detections = heads.instances.detections
        counts = [int(d["boxes"].shape[0]) for d in detections]
        per_image = zip(
            batch.image_sizes,
            detections,
            heads.final_probs.split(counts),
            heads.final_logits.split(counts),
            strict=True,
        )
        raws: list[RawPrediction] = []
        for i, ((h, w), det, image_probs, image_logits) in enumerate(per_image):
            logits = sem_logits[i, :, :h, :w]
            raws.append(
                RawPrediction(
                    boxes=det["boxes"],
                    scores=det["scores"],
                    labels=det["labels"],
                    sem_logits=logits,
                    mask_probs=image_probs,
                    sem_space="all",
                    sem_pred=semantic_argmax(logits),
                    extras={"mask_logits": image_logits},
                )
            )
        if self.occlusion_head is not None:
            features, label_t = heads.pair_features, heads.label_t.to(heads.pair_features.device)
            start = 0
            for raw, k in zip(raws, counts, strict=True):
                pairs = candidate_pairs(
                    raw,
                    score_thresh=float(self.pair_settings["score_thresh"]),
                    mask_thresh=float(self.pair_settings["mask_thresh"]),
                    rho=float(self.pair_settings["rho"]),
                    intraclass=bool(self.pair_settings["intraclass"]),
                ).to(features.device)
                prob = features.new_zeros((pairs.shape[0], 2))
                if pairs.shape[0]:
                    # both orders in one pass: O(i, j) and O(j, i)
                    both = torch.cat([pairs, pairs.flip(1)]) + start
                    o = self.occlusion_head(features, heads.final_probs, label_t, both).sigmoid()
                    prob = torch.stack(o.split(pairs.shape[0]), dim=1)
                raw.extras["occ_pairs"] = pairs
                raw.extras["occ_prob"] = prob
                start += k
        return raws


@dataclass
class _Heads:
    """The intermediates of one forward (`REFINE._forward_heads`).

    Attributes:
        instances: the instance branch's outputs.
        padded_size: (Hp, Wp).
        sem0: FloatTensor[B, C, Hp/4, Wp/4] P^(0).
        sem_final: the final semantic logits (P^(T), or P^(0) without IBPP).
        steps: the IBPP iterations (empty without IBPP).
        rois: per image FloatTensor[K_i, 4] (training: foreground RoIs; eval: detections).
        label_t: LongTensor[K] their thing indices.
        final_logits: FloatTensor[K, M, M] final mask logits of each RoI's class.
        final_probs: FloatTensor[K, M, M] their probabilities.
        pair_features: FloatTensor[K, E, R, R] f_ins + f_sem, detached (the occlusion head's input).
    """

    instances: InstanceOutputs
    padded_size: tuple[int, int]
    sem0: Tensor
    sem_final: Tensor
    steps: list[IBPPStep]
    rois: list[Tensor]
    label_t: Tensor
    final_logits: Tensor
    final_probs: Tensor
    pair_features: Tensor


def _panoptic_at_stride(panoptic: Tensor, canvas: tuple[int, int]) -> Tensor:
    """GT segment ids at the centres of the stride-4 canvas pixels (void beyond the image)."""
    sampled = panoptic[SEMANTIC_STRIDE // 2 :: SEMANTIC_STRIDE, SEMANTIC_STRIDE // 2 :: SEMANTIC_STRIDE]
    out = torch.zeros(canvas, dtype=panoptic.dtype, device=panoptic.device)
    h, w = min(canvas[0], sampled.shape[0]), min(canvas[1], sampled.shape[1])
    out[:h, :w] = sampled[:h, :w]
    return out


def build_refine(cfg: RefineConfig, meta: DatasetMeta) -> REFINE:
    """REFINE for `meta`'s classes from its model config.

    Raises:
        ValueError: naming the config key for inconsistent settings (an embedding width other
            than the FPN's, a learned occlusion fusion without the occlusion head, ...).
    """
    r, occ, fusion = cfg.refine, cfg.occlusion, cfg.fusion
    if r.ibpp_iterations < 0:
        raise ValueError(f"model.refine.ibpp_iterations must be >= 0, got {r.ibpp_iterations}")
    if fusion.occlusion not in OCCLUSION_METHODS:
        raise ValueError(f"model.fusion.occlusion must be one of {OCCLUSION_METHODS}, got {fusion.occlusion!r}")
    if fusion.occlusion == "learned" and not occ.enabled:
        raise ValueError(
            "model.fusion.occlusion=learned needs the occlusion head (model.occlusion.enabled=true); "
            "use model.fusion.occlusion=none or shr without it"
        )
    fpn_channels = cfg.backbone.fpn_channels
    embed_channels = r.semantic_embed_channels or fpn_channels
    if embed_channels != fpn_channels:
        raise ValueError(
            f"model.refine.semantic_embed_channels={embed_channels} must equal model.backbone.fpn_channels="
            f"{fpn_channels} (F_sem is added to the FPN RoI features, Eq. 4)"
        )
    backbone = build_backbone(cfg.backbone)
    shapes = backbone.output_shape()
    with_ibpp = r.ibpp_iterations > 0
    instance_branch = build_instance_branch(
        cfg.rpn, cfg.roi_heads, cfg.mask_head, meta.num_things, shapes, with_mask_head=not with_ibpp
    )
    semantic_head = SemanticFPNHead(
        in_shapes=shapes, conv_dims=cfg.semantic.conv_dims, norm=cfg.semantic.norm, num_classes=meta.num_classes
    )
    embedding: nn.Module | None = None
    if with_ibpp or occ.enabled:
        conv = nn.Conv2d(cfg.semantic.conv_dims, embed_channels, 1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # made with bias
        embedding = nn.Sequential(conv, nn.ReLU(inplace=True))
    resolution = cfg.mask_head.pooler_resolution
    ibpp = (
        IBPP(
            iterations=r.ibpp_iterations,
            share_weights=r.share_weights,
            feature_channels=fpn_channels,
            num_classes=meta.num_classes,
            num_things=meta.num_things,
            mask_num_convs=cfg.mask_head.num_convs,
            mask_conv_dims=cfg.mask_head.conv_dims,
            sem_channels=r.refine_sem_channels,
            pooler_resolution=resolution,
            sampling_ratio=cfg.mask_head.sampling_ratio,
            semantic_stride=SEMANTIC_STRIDE,
            norm=cfg.semantic.norm,
        )
        if with_ibpp
        else None
    )
    # f_ins: the FPN mask RoIAlign (the base mask head's own pooler when it exists)
    mask_pooler = (
        instance_branch.mask_head.pooler
        if instance_branch.mask_head is not None
        else MultiScaleRoIAlign(list(ROI_IN_FEATURES), resolution, cfg.mask_head.sampling_ratio)
    )
    occlusion_head = (
        OcclusionHead(
            inputs=occ.inputs,
            feature_channels=fpn_channels,
            num_things=meta.num_things,
            resolution=resolution,
            num_convs=occ.num_convs,
            conv_channels=occ.conv_channels,
            fc_dim=occ.fc_dim,
        )
        if occ.enabled
        else None
    )
    model = REFINE(
        backbone=backbone,
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        embedding=embedding,
        ibpp=ibpp,
        mask_pooler=mask_pooler,
        occlusion_head=occlusion_head,
        meta=meta,
        fuse=functools.partial(occlusion_fusion, **dataclasses.asdict(fusion)),
        semantic_loss_weight=cfg.semantic.loss_weight,
        stage_loss_weights=tuple(r.stage_loss_weights),
        flatten_score_weighted=r.flatten_score_weighted,
        mask_output=r.mask_output,
        occlusion_loss_weight=occ.loss_weight,
        pairs_per_image=occ.pairs_per_image,
        pair_settings={
            "score_thresh": fusion.instance_score_thresh,
            "mask_thresh": fusion.mask_thresh,
            "rho": fusion.rho,
            "intraclass": fusion.intraclass,
        },
        binary_mask_targets=cfg.mask_head.binary_targets,
    )
    if occ.occlusion_only:
        if occlusion_head is None:
            raise ValueError("model.occlusion.occlusion_only needs model.occlusion.enabled=true")
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("occlusion_head."))
    return model
