"""Shared losses: the NaN-free semantic cross-entropy and logit resizing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.structures import IGNORE_LABEL


def test_semantic_loss_ignores_and_never_nans() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    targets = torch.randint(0, 4, (2, 8, 8))
    targets[0, :4] = IGNORE_LABEL
    expected = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL)
    torch.testing.assert_close(semantic_loss(logits, targets), expected)
    all_ignored = semantic_loss(logits, torch.full((2, 8, 8), IGNORE_LABEL))
    assert float(all_ignored.detach()) == 0.0 and all_ignored.requires_grad
    with pytest.raises(ValueError, match="semantic target 4 out of range for 4 classes"):
        semantic_loss(logits, torch.full((2, 8, 8), 4))
    with pytest.raises(ValueError, match="differ in batch or size"):
        semantic_loss(logits, targets[:, :4])


def test_upsample_logits() -> None:
    logits = torch.randn(1, 3, 4, 6)
    assert upsample_logits(logits, (4, 6)) is logits
    up = upsample_logits(logits, (16, 24))
    torch.testing.assert_close(up, F.interpolate(logits, size=(16, 24), mode="bilinear", align_corners=False))
