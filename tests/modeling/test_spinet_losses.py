"""SPINet's losses on hand-built cases (Eq. 1-7) and its location targets (Sec. 5.2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from unipan.modeling.heads.spinet_heads import IGNORE_LOCATION, ContourHead, instance_levels, location_targets
from unipan.modeling.layers.losses import (
    bootstrapped_cross_entropy,
    contour_loss,
    contour_targets,
    dice_loss,
    multiclass_dice_loss,
    semantic_loss,
    soft_margin_triplet_loss,
)
from unipan.structures import IGNORE_LABEL, PanopticTarget


# --- dice ------------------------------------------------------------------------------------------
def test_dice_hand_cases() -> None:
    t = torch.zeros(1, 4, 4)
    t[0, :2] = 1.0
    assert float(dice_loss(t.clone(), t)[0]) == pytest.approx(0.0, abs=1e-5)
    # p = 0.5 everywhere, half the pixels on: 1 - 2 * 4 / (4 + 8) = 1/3
    assert float(dice_loss(torch.full_like(t, 0.5), t)[0]) == pytest.approx(1 / 3, abs=1e-5)
    # an empty target gives exactly 1 with zero gradient
    p = torch.rand(2, 3, 3, requires_grad=True)
    loss = dice_loss(p, torch.zeros(2, 3, 3))
    assert loss.tolist() == [1.0, 1.0]
    (grad,) = torch.autograd.grad(loss.sum(), p)
    assert bool((grad == 0).all())


def test_multiclass_dice() -> None:
    targets = torch.tensor([[[0, 1, 2], [2, 1, 0]]])  # [1, 2, 3], every class present
    logits = F.one_hot(targets, 3).permute(0, 3, 1, 2).float() * 50
    assert float(multiclass_dice_loss(logits, targets)) == pytest.approx(0.0, abs=1e-4)
    # a fourth, absent class adds exactly 1 to the sum (mean over 4 classes) with zero gradient
    logits4 = torch.cat([logits, torch.zeros(1, 1, 2, 3)], 1).requires_grad_(True)
    loss = multiclass_dice_loss(logits4, targets)
    assert float(loss.detach()) == pytest.approx(0.25, abs=1e-4)
    probs = F.softmax(logits4, 1)
    probs.retain_grad()
    # the gradient reaching the absent class's probabilities is exactly 0
    valid = (targets != IGNORE_LABEL).unsqueeze(1)
    onehot = F.one_hot(targets, 4).permute(0, 3, 1, 2) * valid
    per_class = dice_loss((probs * valid).transpose(0, 1).flatten(1), onehot.transpose(0, 1).flatten(1))
    per_class[3].backward()
    assert probs.grad is not None and bool((probs.grad[:, 3] == 0).all())
    # ignored pixels count nowhere: a wrong prediction there changes nothing
    ignored = targets.clone()
    ignored[0, 0, 0] = IGNORE_LABEL
    wrong = logits.clone()
    wrong[0, :, 0, 0] = torch.tensor([0.0, 50.0, 0.0])
    assert float(multiclass_dice_loss(wrong, ignored)) == pytest.approx(float(multiclass_dice_loss(logits, ignored)))


def test_bootstrapped_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    targets = torch.randint(0, 4, (2, 3, 5), generator=g)
    targets[0, 0, :3] = IGNORE_LABEL
    assert float(bootstrapped_cross_entropy(logits, targets, 1.0)) == pytest.approx(
        float(semantic_loss(logits, targets))
    )
    # 10 pixels (2 more ignored), ratio 0.2: the mean of the 2 largest valid losses
    logits = torch.randn(1, 3, 3, 4, generator=g)[..., :4]
    targets = torch.randint(0, 3, (1, 3, 4), generator=g)
    targets[0, 0, :2] = IGNORE_LABEL
    per_pixel = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL, reduction="none")[targets != IGNORE_LABEL]
    assert per_pixel.numel() == 10
    want = per_pixel.sort(descending=True).values[:2].mean()
    assert float(bootstrapped_cross_entropy(logits, targets, 0.2)) == pytest.approx(float(want))
    # no labelled pixel: 0 with a gradient path
    logits.requires_grad_(True)
    none = bootstrapped_cross_entropy(logits, torch.full_like(targets, IGNORE_LABEL), 0.2)
    assert float(none.detach()) == 0.0 and none.requires_grad


# --- intra-class triplet -----------------------------------------------------------------------------
def literal_eq5(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    d_p = -torch.linalg.vector_norm(a - p, dim=-1)
    d_n = -torch.linalg.vector_norm(a - n, dim=-1)
    return -torch.log(torch.exp(d_p) / (torch.exp(d_p) + torch.exp(d_n)))


def test_triplet_hand_cases_and_eq5() -> None:
    a = torch.zeros(3, 4, dtype=torch.float64)
    n = torch.zeros(3, 4, dtype=torch.float64)
    n[:, 0] = torch.tensor([0.5, 2.0, 7.0])
    # anchor = positive, |a - n| = d: log(1 + e^-d) (the 1e-12 under the square root keeps
    # coinciding vectors 1e-6 apart)
    got = soft_margin_triplet_loss(a, a.clone(), n)
    torch.testing.assert_close(got, torch.log1p(torch.exp(-n[:, 0])), rtol=0, atol=1e-6)
    # equal distances: log 2
    p = torch.zeros(1, 4, dtype=torch.float64)
    p[0, 1] = 3.0
    n1 = torch.zeros(1, 4, dtype=torch.float64)
    n1[0, 2] = 3.0
    assert float(soft_margin_triplet_loss(a[:1], p, n1)) == pytest.approx(math.log(2))
    # random cases where Eq. 5 is representable: the same values
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(50, 8, dtype=torch.float64, generator=g) * 3 for _ in range(3))
    torch.testing.assert_close(soft_margin_triplet_loss(a, p, n), literal_eq5(a, p, n), rtol=1e-10, atol=1e-12)
    # far apart (float32): Eq. 5 as printed underflows (e^-200 = 0) to -log 0, the softplus form is exact
    a32 = torch.zeros(1, 2)
    p32 = torch.tensor([[200.0, 0.0]])
    n32 = torch.tensor([[0.0, 100.0]])
    assert not math.isfinite(float(literal_eq5(a32, p32, n32)))
    assert float(soft_margin_triplet_loss(a32, p32, n32)) == pytest.approx(100.0)
    # coinciding vectors keep a finite gradient
    v = torch.zeros(1, 3, requires_grad=True)
    soft_margin_triplet_loss(v, v, v).sum().backward()
    assert v.grad is not None and bool(torch.isfinite(v.grad).all())


# --- inter-class contour -----------------------------------------------------------------------------
def test_pixel_shuffle_layout_of_the_contour_head() -> None:
    head = ContourHead(16)
    with torch.no_grad():
        head.conv.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
        head.conv.bias.zero_()
    feats = torch.arange(16 * 2 * 3, dtype=torch.float32).view(1, 16, 2, 3)
    out = head(feats)
    assert out.shape == (1, 8, 12)
    for y in range(2):
        for x in range(3):
            for i in range(4):
                for j in range(4):
                    assert out[0, 4 * y + i, 4 * x + j] == feats[0, 4 * i + j, y, x]


def test_contour_targets_two_class_split() -> None:
    labels = torch.zeros(1, 8, 12, dtype=torch.long)
    labels[0, :, 6:] = 3
    labels[0, :, 10:] = -1  # padding: no contour against it, no target in it
    soft = contour_targets(labels, sigma=1.0)
    # contour pixels: columns 5 and 6 (each side of the split), peak 1
    assert bool((soft[0, :, 5] == 1).all()) and bool((soft[0, :, 6] == 1).all())
    assert float(soft.max()) == 1.0
    # symmetric about the split, exp(-d^2/2) decay, 0 beyond 3 pixels and in the padding
    torch.testing.assert_close(soft[0, 0, 4], torch.tensor(math.exp(-0.5)))
    torch.testing.assert_close(soft[0, 0, 7], torch.tensor(math.exp(-0.5)))
    torch.testing.assert_close(soft[0, 0, 2], torch.tensor(math.exp(-4.5)))
    torch.testing.assert_close(soft[0, 0, 9], torch.tensor(math.exp(-4.5)))
    assert bool((soft[0, :, :2] == 0).all()) and bool((soft[0, :, 10:] == 0).all())
    # one class everywhere: no contour
    assert float(contour_targets(torch.zeros(1, 5, 5, dtype=torch.long)).max()) == 0.0


def test_contour_loss_is_focal_with_soft_targets_over_valid_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 7, generator=g)
    targets = torch.rand(2, 6, 7, generator=g)
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    valid[1, :, 5:] = False
    want = sigmoid_focal_loss(logits[valid], targets[valid], alpha=0.25, gamma=2.0, reduction="mean")
    torch.testing.assert_close(contour_loss(logits, targets, valid), want)


# --- location targets -----------------------------------------------------------------------------
def make_target(masks: torch.Tensor, labels: list[int], crowd: torch.Tensor | None = None) -> PanopticTarget:
    n, h, w = masks.shape
    return PanopticTarget(
        image_id="t",
        panoptic=torch.zeros(h, w, dtype=torch.int32),
        segments=[],
        sem_seg=torch.zeros(h, w, dtype=torch.long),
        boxes=torch.zeros(n, 4),
        labels=torch.tensor(labels, dtype=torch.long),
        masks=masks,
        crowd=torch.zeros(h, w, dtype=torch.bool) if crowd is None else crowd,
        instance_ids=torch.arange(n),
    )


def test_location_targets_overlap_tiny_instance_and_crowd() -> None:
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, :16, :16] = True  # large
    masks[1, 2:7, 2:7] = True  # small, on top of the large one: wins the overlap
    masks[2, 25, 30] = True  # one pixel, off every cell centre
    crowd = torch.zeros(32, 32, dtype=torch.bool)
    crowd[16:24, 16:24] = True
    (level,) = location_targets(make_target(masks, [0, 1, 2], crowd), [(4, 4)], [8])
    # centres at 4, 12, 20, 28
    assert level[0, 0] == 1  # (4, 4) lies in both: the smaller wins
    assert level[0, 1] == 0 and level[1, 0] == 0 and level[1, 1] == 0
    assert level[2, 2] == IGNORE_LOCATION  # a crowd centre
    # the one-pixel instance has no centre in it: it gets the cell covering it
    assert level[3, 3] == 2 and int((level == 2).sum()) == 1
    assert level[3, 0] == -1
    # cells beyond the image (a padded feature map) are ignored
    (big,) = location_targets(make_target(masks, [0, 1, 2], crowd), [(5, 6)], [8])
    assert bool((big[4:] == IGNORE_LOCATION).all()) and bool((big[:, 4:] == IGNORE_LOCATION).all())


def test_location_targets_scale_ranges() -> None:
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, :40, :40] = True  # scale 40: the coarse level only
    masks[1, 4:12, 4:12] = True  # scale 8, on top of the large one: the fine level only
    masks[2, 50, 60] = True  # scale 1, off every fine cell centre: falls back to its finest level
    target = make_target(masks, [0, 1, 2])
    ranges = [(1.0, 16.0), (12.0, 128.0)]
    assert instance_levels(masks, ranges, 2).tolist() == [[False, True], [True, False], [True, False]]
    fine, coarse = location_targets(target, [(8, 8), (4, 4)], [8, 16], ranges)
    # fine level (centres 4, 12, ..., 60): the small instance, never the large one
    assert set(fine.unique().tolist()) == {-1, 1, 2}
    assert fine[0, 0] == 1 and fine[1, 1] == -1 and int((fine == 2).sum()) == 1 and fine[6, 7] == 2
    # coarse level (centres 8, 24, 40, 56): the large instance, also where the small one lies on it
    assert coarse[0, 0] == 0 and coarse[1, 1] == 0 and coarse[2, 2] == -1
    assert set(coarse.unique().tolist()) == {-1, 0}
    # without ranges both levels hold every instance that covers a centre
    fine_all, coarse_all = location_targets(target, [(8, 8), (4, 4)], [8, 16])
    assert fine_all[1, 1] == 0 and coarse_all[0, 0] == 1
    # scales outside every range go to the nearest end
    outside = instance_levels(masks, [(10.0, 20.0), (20.0, 30.0)], 2)
    assert outside.tolist() == [[False, True], [True, False], [True, False]]
