"""Unknown Erasing (REFINE Eq. 8, BCC-Net's algorithm) on hand-built maps and against a literal port."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unipan.fusion.oracle import oracle_sem_logits
from unipan.fusion.unknown_erasing import dilate_square, max_confidence, unknown_erasing


def bcc_reference(logits: torch.Tensor, num_stuff: int, threshold: float, iterations: int) -> np.ndarray:
    """BCC-Net's loop written out: per class, 3x3 dilations, 4-connected components, mean confidence."""
    prob = torch.softmax(logits.double(), dim=0).numpy()
    pred = prob.argmax(axis=0)
    erased = np.zeros(pred.shape, dtype=bool)
    for c in np.unique(pred):
        if c >= num_stuff:  # our choice: only stuff regions are judged
            continue
        region = pred == c
        dilated = ndimage.binary_dilation(region, structure=np.ones((3, 3), bool), iterations=iterations)
        components, n = ndimage.label(dilated)
        for k in range(1, n + 1):
            part = (components == k) & region
            if part.any() and prob[c][part].mean() < threshold:
                erased[part] = True
    return erased


def smooth_logits(seed: int, channels: int, size: tuple[int, int], scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, channels, size[0] // 8 + 1, size[1] // 8 + 1), generator=g) * scale
    fine = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    return fine + 0.3 * torch.randn((channels, *size), generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_equals_a_literal_port_of_bccnet(seed: int) -> None:
    logits = smooth_logits(seed, channels=6, size=(40, 56), scale=1.5)
    for dilation in (1, 3, 9):  # scipy reads iterations=0 as "until nothing changes"
        got = unknown_erasing(logits, 4, threshold=0.5, dilation=dilation).numpy()
        assert np.array_equal(got, bcc_reference(logits, 4, 0.5, dilation)), dilation
    assert got.any() and not got.all()  # the case erases something and keeps something


def test_square_dilation_equals_scipy_iterations() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((60, 70)) > 0.97
    for r in (1, 4, 50):
        expected = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=r)
        assert np.array_equal(dilate_square(mask, r), expected), r


def two_squares(gap: int) -> tuple[torch.Tensor, int]:
    """Class 0 everywhere at confidence 0.9, except a large class-1 block (conf 0.3) and a small class-1
    fragment (conf 0.9) `gap` pixels to its right; class 2 is a thing channel."""
    h, w = 40, 60 + gap + 10
    logits = torch.zeros((3, h, w))
    logits[0] = 5.0
    # a large class-1 region with low confidence (0.40)
    big = (slice(5, 35), slice(0, 60))
    logits[0][big], logits[1][big], logits[2][big] = 0.2, 0.6, 0.4
    small = (slice(15, 19), slice(60 + gap, 64 + gap))
    logits[0][small], logits[1][small] = 0.0, 4.0
    return logits, 60 + gap


def test_fragments_within_the_radius_are_judged_together() -> None:
    for gap, merged in ((100, True), (101, False)):
        logits, x = two_squares(gap)
        erased = unknown_erasing(logits, 2, threshold=0.5, dilation=50)
        # the large unconfident region is erased either way
        assert bool(erased[20, 10])
        # the small confident fragment goes with it only when within reach (gap <= 2 * radius)
        assert bool(erased[16, x + 1]) is merged, gap
        assert not bool(erased[0, 0])  # confident class-0 background kept


def test_a_mean_of_exactly_the_threshold_is_kept() -> None:
    logits = torch.zeros((3, 8, 8))
    logits[0] = 1.0
    logits[1, 2:5, 2:5] = 3.0
    _, conf = max_confidence(logits)
    exact = float(conf[3, 3])  # every pixel of the class-1 block has this confidence
    assert not bool(unknown_erasing(logits, 3, threshold=exact, dilation=0)[3, 3])
    assert bool(unknown_erasing(logits, 3, threshold=float(np.nextafter(exact, 1.0)), dilation=0)[3, 3])


def test_thing_regions_are_never_judged_and_one_hot_gt_erases_nothing() -> None:
    sem = torch.randint(0, 5, (24, 30))
    sem[:3] = 255  # void rows: all-zero logits (their fate does not matter: void in the GT)
    erased = unknown_erasing(oracle_sem_logits(sem, 5), 3, threshold=0.5, dilation=4)
    assert not bool(erased[sem != 255].any())  # p > 0.99 everywhere a class is given
    # a thing channel (index >= S) with low confidence stays
    logits = torch.zeros((4, 6, 6))
    logits[3] = 0.5
    assert not bool(unknown_erasing(logits, 2, threshold=0.9, dilation=1).any())


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"FloatTensor\[C, h, w\]"):
        unknown_erasing(torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="dilation must be >= 0"):
        unknown_erasing(torch.zeros(3, 4, 4), 2, dilation=-1)
