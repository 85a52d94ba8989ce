"""UPSNet's deformable semantic head, RoI loss and global context (unipan.modeling.heads.upsnet_semantic)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torchvision.ops import roi_align

from unipan.modeling.heads.upsnet_semantic import (
    DeformableConvBlock,
    UPSNetSemanticHead,
    roi_semantic_targets,
    semantic_roi_loss,
)
from unipan.structures import IGNORE_LABEL

SHAPES = {f"p{k}": (8, 2**k) for k in range(2, 7)}


def _features(batch: int, size: int, channels: int = 8, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"p{k}": torch.randn(batch, channels, size // 2 ** (k - 2), size // 2 ** (k - 2), generator=gen, dtype=dtype)
        for k in range(2, 6)
    }


def test_head_shapes_and_layer_widths() -> None:
    """The released FCNSubNet: the next-to-last conv narrows, the last keeps the narrow width."""
    head = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=5, num_convs=3, mid_channels=8, out_channels=4)
    convs = [block.conv for block in head.subnet]
    # COCO's 256->256, 256->128, 128->128 at 8 / 4 channels
    assert [(c.in_channels, c.out_channels) for c in convs] == [(8, 8), (8, 4), (4, 4)]
    # each offset conv reads its layer's input
    assert [b.offset.in_channels for b in head.subnet] == [8, 8, 4]
    assert all(block.offset is not None and block.offset.out_channels == 18 for block in head.subnet)
    feats = _features(2, 32)
    logits, feature = head(feats), head.semantic_feature(feats)
    assert logits.shape == (2, 5, 32, 32) and feature.shape == (2, 16, 32, 32)
    assert head.feature_channels == 16 and head.common_stride == 4
    # Cityscapes' 256->128, 128->128: mid_channels is not used with two layers
    two = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=5, num_convs=2, mid_channels=6, out_channels=4)
    assert [(b.conv.in_channels, b.conv.out_channels) for b in two.subnet] == [(8, 4), (4, 4)]
    four = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=5, num_convs=4, mid_channels=6, out_channels=4)
    assert [(b.conv.in_channels, b.conv.out_channels) for b in four.subnet] == [(8, 6), (6, 6), (6, 4), (4, 4)]
    one = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=5, num_convs=1, out_channels=4)
    assert [(b.conv.in_channels, b.conv.out_channels) for b in one.subnet] == [(8, 4)]


def test_deformable_conv_init_is_kaiming_fan_in() -> None:
    """Released code: kaiming_normal_ with its defaults (fan_in, gain sqrt 2), bias 0, offsets 0."""
    torch.manual_seed(0)
    block = DeformableConvBlock(64, 16)
    std = float(block.conv.weight.detach().std())
    assert abs(std - (2.0 / (64 * 9)) ** 0.5) < 0.05 * (2.0 / (64 * 9)) ** 0.5, std
    assert not block.conv.bias.detach().any() and not block.offset.weight.detach().any()


def test_levels_are_upsampled_bilinearly_and_concatenated_in_order() -> None:
    head = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=3, num_convs=1, out_channels=4)
    feats = _features(1, 16)
    feature = head.semantic_feature(feats)
    for k, name in enumerate(["p2", "p3", "p4", "p5"]):
        y = head.subnet(feats[name])
        if k:
            y = F.interpolate(y, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(feature[:, 4 * k : 4 * (k + 1)], y)


def test_zero_initialised_offsets_make_the_head_a_plain_conv_net() -> None:
    torch.manual_seed(0)
    deform = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=4, num_convs=2, mid_channels=8, out_channels=4)
    plain = UPSNetSemanticHead(
        in_shapes=SHAPES, num_classes=4, num_convs=2, mid_channels=8, out_channels=4, deformable=False
    )
    for d, p in zip(deform.subnet, plain.subnet, strict=True):
        assert not d.offset.weight.detach().any() and not d.offset.bias.detach().any()
        p.conv.weight.data.copy_(d.conv.weight.data)
        p.conv.bias.data.copy_(d.conv.bias.data)
    plain.scorer.load_state_dict(deform.scorer.state_dict())
    feats = _features(1, 16, seed=3)
    torch.testing.assert_close(deform(feats)[0], plain(feats)[0], rtol=1e-4, atol=1e-5)
    # offsets that move the taps change the output: the deformable path is really used
    with torch.no_grad():
        deform.subnet[0].offset.bias.fill_(0.5)
    assert not torch.allclose(deform(feats)[0], plain(feats)[0], atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deformable_head_gradcheck_float64(seed: int) -> None:
    torch.manual_seed(seed)
    shapes = {f"p{k}": (3, 2**k) for k in range(2, 6)}
    head = UPSNetSemanticHead(in_shapes=shapes, num_classes=2, num_convs=2, mid_channels=3, out_channels=2).double()
    for block in head.subnet:
        # random offsets put the taps between pixels, where bilinear sampling is differentiable
        torch.nn.init.normal_(block.offset.weight, std=0.3)
        torch.nn.init.normal_(block.offset.bias, std=0.3)
        # non-zero biases: where a layer's input is all zero (dead ReLUs) a zero bias would put
        # the next ReLU exactly at its kink, where finite differences disagree with autograd
        torch.nn.init.normal_(block.conv.bias, std=0.3)
    feats = _features(1, 8, channels=3, dtype=torch.float64, seed=seed)
    names = list(feats)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in head.named_parameters()}
    pnames = list(params)

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        inputs = dict(zip(names, tensors[: len(names)], strict=True))
        weights = dict(zip(pnames, tensors[len(names) :], strict=True))
        return functional_call(head, weights, (inputs,))[0]

    inputs = tuple(v.requires_grad_(True) for v in feats.values()) + tuple(params.values())
    # fast mode (random projections of the Jacobian) keeps three seeds under a second; the block
    # test below checks the full Jacobian
    assert torch.autograd.gradcheck(run, inputs, fast_mode=True)


def test_deformable_block_full_gradcheck_float64() -> None:
    torch.manual_seed(0)
    block = DeformableConvBlock(2, 2).double()
    torch.nn.init.normal_(block.offset.weight, std=0.3)
    torch.nn.init.normal_(block.offset.bias, std=0.3)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_roi_semantic_targets_sample_cell_centres() -> None:
    sem_seg = torch.arange(40).reshape(5, 8) % 7
    sem_seg[0, 0] = IGNORE_LABEL
    boxes = torch.tensor([[0.0, 0.0, 8.0, 5.0], [2.0, 1.0, 4.0, 3.0], [1.5, 0.5, 7.25, 4.9]])
    targets = roi_semantic_targets(sem_seg, boxes, output_size=4)
    assert targets.shape == (3, 4, 4)
    for b, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for j in range(4):
            for k in range(4):
                row = min(int((y0 + (j + 0.5) * (y1 - y0) / 4) // 1), 4)
                col = min(int((x0 + (k + 0.5) * (x1 - x0) / 4) // 1), 7)
                assert int(targets[b, j, k]) == int(sem_seg[row, col])
    # a 2 x 2 box resized to 4 x 4 repeats each pixel twice (nearest)
    assert targets[1].tolist() == sem_seg[1:3, 2:4].repeat_interleave(2, 0).repeat_interleave(2, 1).tolist()
    assert roi_semantic_targets(sem_seg, boxes[:0]).shape == (0, 28, 28)


def test_roi_logits_and_loss() -> None:
    torch.manual_seed(0)
    head = UPSNetSemanticHead(in_shapes=SHAPES, num_classes=3, num_convs=1, out_channels=2)
    feature = torch.randn(2, head.feature_channels, 8, 8, requires_grad=True)
    # boxes inside the 32 x 32 image, one reaching both far borders
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 12.0], [4.0, 8.0, 32.0, 32.0]]), torch.tensor([[2.0, 2.0, 20.0, 10.0]])]
    scores = head.scorer(feature)
    logits = head.roi_logits(scores, boxes, output_size=7)
    # pooling the scores equals the released code's order, scoring the pooled 512-channel feature
    pooled = roi_align(feature, boxes, output_size=7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(logits, head.scorer(pooled), rtol=1e-5, atol=1e-5)
    sem_segs = [torch.randint(0, 3, (32, 32)), torch.full((32, 32), IGNORE_LABEL)]
    sem_segs[1][:, :10] = 1
    loss = semantic_roi_loss(head, scores, boxes, sem_segs, output_size=7)
    targets = torch.cat([roi_semantic_targets(s, b, 7) for s, b in zip(sem_segs, boxes, strict=True)])
    assert bool((targets == IGNORE_LABEL).any())
    # the released code's mean over every cell, ignored cells counting 0 (reduce=False, then .mean())
    per_cell = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL, reduction="none")
    torch.testing.assert_close(loss, per_cell.mean())
    loss.backward()
    assert feature.grad is not None and bool((feature.grad != 0).any())
    assert head.scorer.weight.grad is not None and bool((head.scorer.weight.grad != 0).any())
    empty = semantic_roi_loss(head, scores, [boxes[0][:0], boxes[1][:0]], sem_segs)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_head_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="p7"):
        UPSNetSemanticHead(in_shapes=SHAPES, num_classes=3, in_features=("p2", "p7"))
    with pytest.raises(ValueError, match="equal channels"):
        UPSNetSemanticHead(in_shapes={**SHAPES, "p3": (16, 8)}, num_classes=3)
    with pytest.raises(ValueError, match="fine to coarse"):
        UPSNetSemanticHead(in_shapes=SHAPES, num_classes=3, in_features=("p3", "p2"))
    with pytest.raises(ValueError, match="num_classes"):
        UPSNetSemanticHead(in_shapes=SHAPES, num_classes=0)
