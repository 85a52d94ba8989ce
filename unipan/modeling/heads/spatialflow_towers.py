"""SpatialFlow's four parallel sub-networks and their spatial information flows (Chen et al., AAAI 2020).

Per pyramid level P_i, with weights shared across levels (as RetinaNet), at each depth j = 1..n the
reg layer is computed first and every flow reads that *current* reg_j (the paper's Eq. 3 and the
authors' released head):

    reg_0 = cls_0 = stuff_0 = P_i
    reg_j   = ReLU(conv_reg_j(reg_{j-1}))
    cls_j   = ReLU(conv_cls_j(cls_{j-1} + phi_cls_j(reg_j)))         reg-cls flow, all five levels
    stuff_j = ReLU(conv_stuff_j(stuff_{j-1} + phi_stuff_j(reg_j)))   reg-stuff flow, P3-P5
    mask_1  = ReLU(conv_mask(P_i + psi(stuff_n) + phi_mask(reg_n)))  stuff-mask and reg-mask flows, P3-P5

phi and psi are separate 3x3 convs without activation; nothing flows into the reg tower. Every
flow is a switch (the rows of the paper's Tables 2 and 3), and so are the stuff and mask towers:
without them the stuff and mask heads read P_i (the paper's Eq. 1, the "baseline").

DCN variant (the paper's supplementary Eq. 6): the cls, stuff and mask convs become modulated
deformable convs and their flow conv becomes the offset conv (3 * 9 outputs), reading
`x_{j-1} + reg_j` (mask: `P_i + reg_n`); the flow is then not added as a feature. With the flow
switched off the offset conv reads `x_{j-1}` alone.

The predictors are RetinaNet's: a 3x3 conv to A * T sigmoid logits (bias -log((1 - p) / p)) on
cls_n, a 3x3 conv to 4A box deltas on reg_n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from unipan.modeling.layers.modulated_deform_conv import ModulatedDeformConv2d, split_offset_mask

__all__ = ["PREDICTOR_INIT_STD", "SEGMENTATION_LEVELS", "SpatialFlowTowers", "TowerOutputs"]

SEGMENTATION_LEVELS = 3
"""The stuff and mask sub-networks run on the first three levels (P3-P5) only."""

# the offset conv of a 3x3 DCNv2: 2 * 9 offsets and 9 modulation logits
_OFFSET_CHANNELS = 27

PREDICTOR_INIT_STD = 0.01
"""Init std of the RetinaNet predictors: small logits, so every score starts at the prior."""


@dataclass
class TowerOutputs:
    """The outputs of the sub-networks for a batch.

    Attributes:
        cls_logits: per level FloatTensor[B, A * T, H_l, W_l] (five levels).
        box_deltas: per level FloatTensor[B, 4 A, H_l, W_l].
        stuff_features: per level P3-P5 FloatTensor[B, C, H_l, W_l] (P_i without a stuff tower).
        mask_features: per level P3-P5 FloatTensor[B, C, H_l, W_l] (P_i without a mask tower).
    """

    cls_logits: list[Tensor]
    box_deltas: list[Tensor]
    stuff_features: list[Tensor]
    mask_features: list[Tensor]


def _conv3x3(channels: int, init_std: float, out_channels: int | None = None, deformable: bool = False) -> nn.Conv2d:
    cls = ModulatedDeformConv2d if deformable else nn.Conv2d
    conv = cls(channels, out_channels or channels, kernel_size=3, padding=1)
    # RetinaNet's (and the released SpatialFlow head's) init: N(0, 0.01), bias 0 (init_std)
    nn.init.normal_(conv.weight, std=init_std)
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]  # made with bias
    return conv


class SpatialFlowTowers(nn.Module):
    """The reg / cls / stuff / mask towers, the spatial flows and the RetinaNet predictors.

    Args:
        channels: C, the FPN channels; the towers keep them (the flows add to P_i).
        num_anchors: A, anchors per position.
        num_things: T, sigmoid classes of the classifier (no background).
        cls_reg_convs: depth n of the reg and cls towers (4).
        stuff_convs: depth of the stuff tower: 0 (stuff head on P_i) or n (the flows pair depths).
        mask_convs: depth of the mask tower: 0 (mask head on P_i) or 1.
        flow_reg_cls: the reg-cls flows phi_cls_1..n.
        flow_reg_stuff: the reg-stuff flows phi_stuff_1..n (needs the stuff tower).
        flow_reg_mask: the reg-mask flow phi_mask (needs the mask tower).
        flow_stuff_mask: the stuff-mask flow psi (needs both towers).
        dcn_cls, dcn_stuff, dcn_mask: those towers' convs as DCNv2 with the flow conv as offset conv.
        norm: "" (the paper and the released head: no normalisation) or "GN": GroupNorm(32) after
            every tower conv, before its ReLU (torchvision's RetinaNet v2 head, mmdetection's
            `norm_cfg=dict(type="GN")`); the flow convs and the predictors stay plain.
        prior_prob: initial foreground probability of the classifier (0.01).
        init_std: std of the normal init of the tower and flow convs (RetinaNet: 0.01; the predictors
            keep 0.01, so that the classifier starts at `prior_prob`).

    Raises:
        ValueError: for a depth or flow that the other switches do not allow (named).
    """

    def __init__(
        self,
        *,
        channels: int,
        num_anchors: int,
        num_things: int,
        cls_reg_convs: int = 4,
        stuff_convs: int = 4,
        mask_convs: int = 1,
        flow_reg_cls: bool = True,
        flow_reg_stuff: bool = True,
        flow_reg_mask: bool = True,
        flow_stuff_mask: bool = True,
        dcn_cls: bool = False,
        dcn_stuff: bool = False,
        dcn_mask: bool = False,
        norm: str = "",
        prior_prob: float = 0.01,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        _check_switches(
            cls_reg_convs, stuff_convs, mask_convs, flow_reg_stuff, flow_reg_mask, flow_stuff_mask, dcn_stuff, dcn_mask
        )
        if num_things < 1 or num_anchors < 1 or channels < 1:
            raise ValueError(
                f"towers need positive channels, anchors and thing classes, got {channels}, {num_anchors}, {num_things}"
            )
        if init_std <= 0:
            raise ValueError(f"spatialflow.head_init_std must be positive, got {init_std}")
        if norm not in ("", "GN"):
            raise ValueError(f"spatialflow.tower_norm must be '' or 'GN', got {norm!r}")
        if norm and channels % 32:
            raise ValueError(f"spatialflow.tower_norm GN needs channels divisible by 32, got {channels}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must lie in (0, 1), got {prior_prob}")
        self.channels = channels
        self.num_anchors = num_anchors
        self.num_things = num_things
        self.depth = cls_reg_convs
        self.flow_reg_cls = flow_reg_cls
        self.flow_reg_stuff = flow_reg_stuff
        self.flow_reg_mask = flow_reg_mask
        self.flow_stuff_mask = flow_stuff_mask
        self.dcn_cls = dcn_cls
        self.dcn_stuff = dcn_stuff
        self.dcn_mask = dcn_mask
        n = cls_reg_convs
        self.reg_convs = nn.ModuleList(_conv3x3(channels, init_std) for _ in range(n))
        self.cls_convs = nn.ModuleList(_conv3x3(channels, init_std, deformable=dcn_cls) for _ in range(n))
        self.stuff_convs = nn.ModuleList(_conv3x3(channels, init_std, deformable=dcn_stuff) for _ in range(stuff_convs))
        self.mask_convs = nn.ModuleList(_conv3x3(channels, init_std, deformable=dcn_mask) for _ in range(mask_convs))

        def norms(count: int) -> nn.ModuleList:
            return nn.ModuleList(nn.GroupNorm(32, channels) if norm else nn.Identity() for _ in range(count))

        self.reg_norms, self.cls_norms = norms(n), norms(n)
        self.stuff_norms, self.mask_norms = norms(stuff_convs), norms(mask_convs)
        # A DCN tower needs its offset conv whether or not the flow feeds it.
        cls_flow_out = _OFFSET_CHANNELS if dcn_cls else channels
        stuff_flow_out = _OFFSET_CHANNELS if dcn_stuff else channels
        mask_flow_out = _OFFSET_CHANNELS if dcn_mask else channels
        self.cls_flows = nn.ModuleList(
            _conv3x3(channels, init_std, cls_flow_out) for _ in range(n if (flow_reg_cls or dcn_cls) else 0)
        )
        self.stuff_flows = nn.ModuleList(
            _conv3x3(channels, init_std, stuff_flow_out)
            for _ in range(stuff_convs if (flow_reg_stuff or dcn_stuff) else 0)
        )
        self.mask_flow = _conv3x3(channels, init_std, mask_flow_out) if (flow_reg_mask or dcn_mask) else None
        self.stuff_mask_flow = _conv3x3(channels, init_std) if flow_stuff_mask else None
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_things, kernel_size=3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=PREDICTOR_INIT_STD)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))  # type: ignore[arg-type]
        self.bbox_reg = nn.Conv2d(channels, num_anchors * 4, kernel_size=3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=PREDICTOR_INIT_STD)
        nn.init.zeros_(self.bbox_reg.bias)  # type: ignore[arg-type]  # made with bias

    def forward(self, features: Sequence[Tensor]) -> TowerOutputs:
        """Run the sub-networks on every level.

        Args:
            features: the pyramid P3..P7, each FloatTensor[B, C, H_l, W_l] (at least three levels;
                the first three also feed the stuff and mask sub-networks).

        Returns:
            The predictions of every level and the stuff / mask features of P3-P5.
        """
        if len(features) < SEGMENTATION_LEVELS:
            raise ValueError(f"SpatialFlow towers need P3..P7, got {len(features)} levels")
        out = TowerOutputs([], [], [], [])
        for level, p in enumerate(features):
            if p.shape[1] != self.channels:
                raise ValueError(f"level P{level + 3} has {p.shape[1]} channels, the towers {self.channels}")
            cls_logits, deltas, stuff, mask = self._level(p, with_segmentation=level < SEGMENTATION_LEVELS)
            out.cls_logits.append(cls_logits)
            out.box_deltas.append(deltas)
            if stuff is not None and mask is not None:
                out.stuff_features.append(stuff)
                out.mask_features.append(mask)
        return out

    def _step(
        self,
        x: Tensor,
        reg: Tensor,
        conv: nn.Module,
        norm: nn.Module,
        flow: nn.Module | None,
        use_flow: bool,
        dcn: bool,
    ) -> Tensor:
        """One layer of a tower that receives the reg flow: ReLU(norm(conv(x + phi(reg)))) or its DCN form."""
        if dcn:
            assert flow is not None
            offset, mask = split_offset_mask(flow(x + reg if use_flow else x))
            return F.relu(norm(conv(x, offset, mask)))
        if use_flow:
            assert flow is not None
            x = x + flow(reg)
        return F.relu(norm(conv(x)))

    def _level(self, p: Tensor, with_segmentation: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        reg = cls = stuff = p
        with_stuff = with_segmentation and len(self.stuff_convs) > 0
        for j in range(self.depth):
            reg = F.relu(self.reg_norms[j](self.reg_convs[j](reg)))
            cls_flow = self.cls_flows[j] if len(self.cls_flows) else None
            cls = self._step(cls, reg, self.cls_convs[j], self.cls_norms[j], cls_flow, self.flow_reg_cls, self.dcn_cls)
            if with_stuff:
                stuff_flow = self.stuff_flows[j] if len(self.stuff_flows) else None
                stuff = self._step(
                    stuff,
                    reg,
                    self.stuff_convs[j],
                    self.stuff_norms[j],
                    stuff_flow,
                    self.flow_reg_stuff,
                    self.dcn_stuff,
                )
        if not with_segmentation:
            return self.cls_logits(cls), self.bbox_reg(reg), None, None
        mask = p
        if len(self.mask_convs):
            x = p if self.stuff_mask_flow is None else p + self.stuff_mask_flow(stuff)
            if self.dcn_mask:
                assert self.mask_flow is not None
                offset, modulation = split_offset_mask(self.mask_flow(p + reg if self.flow_reg_mask else p))
                mask = F.relu(self.mask_norms[0](self.mask_convs[0](x, offset, modulation)))
            else:
                if self.flow_reg_mask:
                    assert self.mask_flow is not None
                    x = x + self.mask_flow(reg)
                mask = F.relu(self.mask_norms[0](self.mask_convs[0](x)))
        return self.cls_logits(cls), self.bbox_reg(reg), stuff, mask


def _check_switches(
    depth: int,
    stuff_convs: int,
    mask_convs: int,
    flow_reg_stuff: bool,
    flow_reg_mask: bool,
    flow_stuff_mask: bool,
    dcn_stuff: bool,
    dcn_mask: bool,
) -> None:
    """Raise ValueError naming the config key of a tower / flow combination that cannot be built."""
    if depth < 1:
        raise ValueError(f"spatialflow.cls_reg_convs must be >= 1, got {depth}")
    if stuff_convs not in (0, depth):
        raise ValueError(
            f"spatialflow.stuff_convs must be 0 or cls_reg_convs ({depth}): the reg-stuff flows pair the "
            f"depths of the two towers; got {stuff_convs}"
        )
    if mask_convs not in (0, 1):
        raise ValueError(f"spatialflow.mask_convs must be 0 or 1, got {mask_convs}")
    needs = {
        "flow_reg_stuff": (flow_reg_stuff, stuff_convs > 0, "the stuff tower (stuff_convs > 0)"),
        "dcn_stuff": (dcn_stuff, stuff_convs > 0, "the stuff tower (stuff_convs > 0)"),
        "flow_reg_mask": (flow_reg_mask, mask_convs > 0, "the mask tower (mask_convs = 1)"),
        "dcn_mask": (dcn_mask, mask_convs > 0, "the mask tower (mask_convs = 1)"),
        "flow_stuff_mask": (
            flow_stuff_mask,
            stuff_convs > 0 and mask_convs > 0,
            "the stuff and mask towers (stuff_convs > 0, mask_convs = 1)",
        ),
    }
    for key, (on, available, what) in needs.items():
        if on and not available:
            raise ValueError(f"spatialflow.{key} needs {what}")
