"""REFINE's Iterative Bi-directional Prediction Projection (Ren et al., AAAI 2021, Eq. 2-6, Fig. 3).

Given the semantic branch's 256-channel embedding F_sem and its initial logits P_sem^(0) (both at
stride 4), the instance RoI features f_ins (FPN RoIAlign, 14 x 14) and the RoIs, iteration
t = 1..T computes

    f_sem       = RoIAlign(F_sem)                                   (2)
    p_sem       = RoIAlign(P_sem^(t-1))          (logits, 14 x 14)  (3)
    m_ins^(t)   = H_ins^(t)([f_ins + f_sem ; p_sem])                (4)
    P_ins^(t)   = ROI-Flatten(sigmoid(m_ins^(t)))                   (5)
    P_sem^(t)   = H_sem^(t)([P_ins^(t) ; F_sem])                    (6)

Nothing is detached: the paper's point is "more routes of gradients" between the two tasks, so the
semantic loss of iteration t reaches H_ins^(t) through the flattened masks, and the mask loss
reaches the semantic branch through the projected logits and features. The per-RoI weight of the
flatten (the RoI's class score) is detached by the caller, so the semantic loss does not train the
box classifier.

H_ins^(t) is a Mask R-CNN mask head whose first conv reads C_feat + C extra channels; H_sem^(t) is
a Panoptic FPN block (3x3 conv + GroupNorm + ReLU) and a 1x1 predictor (the paper leaves it
unspecified). Separate heads per iteration by default (the cascade convention the paper invokes);
`share_weights` uses one pair for all iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from unipan.modeling.heads.roi_mask import MaskHead
from unipan.modeling.layers.roi_align import roi_align
from unipan.modeling.layers.roi_flatten import roi_flatten

__all__ = ["IBPP", "IBPPMaskHead", "IBPPSemanticHead", "IBPPStep"]


class IBPPMaskHead(nn.Module):
    """H_ins^(t): [f_ins + f_sem ; p_sem] -> per-class mask logits (Eq. 4).

    Args:
        in_channels: channels of f_ins (= those of f_sem).
        sem_classes: C, channels of the projected semantic logits.
        num_convs: 3x3 convs (Mask R-CNN: 4).
        conv_dims: their channels (256).
        num_things: T, output channels.
    """

    def __init__(self, *, in_channels: int, sem_classes: int, num_convs: int, conv_dims: int, num_things: int):
        super().__init__()
        layers = [conv_dims] * num_convs
        self.convs: nn.Module = MaskRCNNHeads(in_channels + sem_classes, layers, 1) if layers else nn.Identity()
        self.predictor = MaskRCNNPredictor(conv_dims if layers else in_channels + sem_classes, conv_dims, num_things)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mask logits FloatTensor[K, T, 2R, 2R] and conv features FloatTensor[K, Cm, R, R] of x [K, Cin, R, R]."""
        features = self.convs(x)
        return self.predictor(features), features


class IBPPSemanticHead(nn.Module):
    """H_sem^(t): [P_ins ; F_sem] -> semantic logits at stride 4 (Eq. 6).

    Args:
        num_things: T, channels of the flattened instance canvas.
        embed_channels: channels of F_sem.
        mid_channels: channels of the 3x3 conv block.
        num_classes: C, output classes.
        norm: "GN" (32 groups) or "none".
    """

    def __init__(self, *, num_things: int, embed_channels: int, mid_channels: int, num_classes: int, norm: str = "GN"):
        super().__init__()
        if norm not in ("GN", "none"):
            raise ValueError(f"IBPP semantic head norm must be 'GN' or 'none', got {norm!r}")
        if norm == "GN" and mid_channels % 32:
            raise ValueError(f"GroupNorm(32) needs refine_sem_channels divisible by 32, got {mid_channels}")
        conv = nn.Conv2d(num_things + embed_channels, mid_channels, 3, padding=1, bias=norm == "none")
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        block: list[nn.Module] = [conv]
        if norm == "GN":
            block.append(nn.GroupNorm(32, mid_channels))
        block.append(nn.ReLU(inplace=True))
        self.block = nn.Sequential(*block)
        self.predictor = nn.Conv2d(mid_channels, num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)  # type: ignore[arg-type]  # made with bias

    def forward(self, flattened: Tensor, embedding: Tensor) -> Tensor:
        """FloatTensor[B, C, h, w] from P_ins [B, T, h, w] and F_sem [B, E, h, w]."""
        return self.predictor(self.block(torch.cat([flattened, embedding], dim=1)))


@dataclass
class IBPPStep:
    """The outputs of one IBPP iteration.

    Attributes:
        mask_logits: FloatTensor[K, T, M, M] m_ins^(t), every class.
        own_logits: FloatTensor[K, M, M] the channel of each RoI's class.
        mask_features: FloatTensor[K, Cm, M/2, M/2] the head's conv output.
        flattened: FloatTensor[B, T, h, w] P_ins^(t).
        sem_logits: FloatTensor[B, C, h, w] P_sem^(t) at stride 4.
    """

    mask_logits: Tensor
    own_logits: Tensor
    mask_features: Tensor
    flattened: Tensor
    sem_logits: Tensor


class IBPP(nn.Module):
    """T iterations of semantic -> RoI and RoI -> semantic projection (see the module docstring).

    Args:
        iterations: T >= 1.
        share_weights: one head pair for all iterations (default: one pair per iteration).
        feature_channels: channels of f_ins and F_sem (they are added, so they must agree).
        num_classes: C, classes of the semantic logits (stuff + things).
        num_things: T_c, thing classes.
        mask_num_convs: convs of each H_ins.
        mask_conv_dims: their channels.
        sem_channels: channels of each H_sem's conv block.
        pooler_resolution: R, the RoIAlign size of f_sem / p_sem (f_ins must have it too).
        sampling_ratio: RoIAlign sampling points per bin.
        semantic_stride: input pixels per pixel of F_sem and the semantic logits (4).
        norm: norm of H_sem's block.
    """

    def __init__(
        self,
        *,
        iterations: int,
        share_weights: bool,
        feature_channels: int,
        num_classes: int,
        num_things: int,
        mask_num_convs: int,
        mask_conv_dims: int,
        sem_channels: int,
        pooler_resolution: int = 14,
        sampling_ratio: int = 2,
        semantic_stride: int = 4,
        norm: str = "GN",
    ) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"IBPP needs at least one iteration, got {iterations}")
        self.iterations = int(iterations)
        self.share_weights = bool(share_weights)
        self.num_things = int(num_things)
        self.pooler_resolution = int(pooler_resolution)
        self.sampling_ratio = int(sampling_ratio)
        self.semantic_stride = int(semantic_stride)
        n_heads = 1 if share_weights else iterations
        self.mask_heads = nn.ModuleList(
            IBPPMaskHead(
                in_channels=feature_channels,
                sem_classes=num_classes,
                num_convs=mask_num_convs,
                conv_dims=mask_conv_dims,
                num_things=num_things,
            )
            for _ in range(n_heads)
        )
        self.sem_heads = nn.ModuleList(
            IBPPSemanticHead(
                num_things=num_things,
                embed_channels=feature_channels,
                mid_channels=sem_channels,
                num_classes=num_classes,
                norm=norm,
            )
            for _ in range(n_heads)
        )

    def project(self, maps: Tensor, rois: Sequence[Tensor]) -> Tensor:
        """RoIAlign of a stride-4 map at the RoIs (Eq. 2-3): FloatTensor[K, C, R, R].

        aligned=False and the sampling ratio of the FPN mask pooler, so f_sem lines up with f_ins.
        """
        return roi_align(
            maps,
            [r.to(maps.dtype) for r in rois],
            output_size=self.pooler_resolution,
            spatial_scale=1.0 / self.semantic_stride,
            sampling_ratio=self.sampling_ratio,
            aligned=False,
        )

    def forward(
        self,
        f_ins: Tensor,
        embedding: Tensor,
        sem_logits: Tensor,
        rois: Sequence[Tensor],
        labels: Sequence[Tensor],
        weights: Sequence[Tensor] | None,
    ) -> tuple[Tensor, list[IBPPStep]]:
        """Run the T iterations.

        Args:
            f_ins: FloatTensor[K, E, R, R] FPN RoI features of `rois` (all images in order).
            embedding: FloatTensor[B, E, h, w] F_sem.
            sem_logits: FloatTensor[B, C, h, w] P_sem^(0).
            rois: per image FloatTensor[K_i, 4] boxes in input pixels.
            labels: per image LongTensor[K_i] thing index (the mask channel and canvas channel).
            weights: per image FloatTensor[K_i] flatten weights (scores, detached), or None.

        Returns:
            (f_sem FloatTensor[K, E, R, R] the projected embedding, one IBPPStep per iteration).
        """
        b, _, h, w = sem_logits.shape
        counts = [int(r.shape[0]) for r in rois]
        image_index = torch.repeat_interleave(
            torch.arange(len(counts), device=sem_logits.device), torch.tensor(counts, device=sem_logits.device)
        )
        boxes = torch.cat(list(rois)) if counts else sem_logits.new_zeros((0, 4))
        label_t = torch.cat(list(labels)) if counts else torch.zeros(0, dtype=torch.long)
        weight_t = torch.cat(list(weights)) if weights is not None and counts else None
        f_sem = self.project(embedding, rois)
        enhanced = f_ins + f_sem
        steps: list[IBPPStep] = []
        previous = sem_logits
        for t in range(self.iterations):
            k = 0 if self.share_weights else t
            p_sem = self.project(previous, rois)
            mask_logits, mask_features = self.mask_heads[k](torch.cat([enhanced, p_sem], dim=1))
            own = MaskHead.select_class(mask_logits, label_t)
            flattened = roi_flatten(
                own.sigmoid(),
                boxes,
                label_t,
                weight_t,
                image_index,
                b,
                self.num_things,
                (h, w),
                self.semantic_stride,
            )
            previous = self.sem_heads[k](flattened, embedding)
            steps.append(IBPPStep(mask_logits, own, mask_features, flattened, previous))
        return f_sem, steps
