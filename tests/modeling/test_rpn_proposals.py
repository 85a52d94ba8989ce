"""RPN proposal budgets: torchvision's cap per image and official UPSNet's per-level mode."""

from __future__ import annotations

import torch

from unipan.config import RPNConfig
from unipan.modeling.heads.rpn import build_rpn

SHAPES = {f"p{k}": (8, 2**k) for k in range(2, 7)}


def _disjoint_boxes(n: int, offset: float) -> torch.Tensor:
    """n non-overlapping 4 x 4 boxes on a row (NMS keeps them all)."""
    x0 = offset + 10.0 * torch.arange(n, dtype=torch.float32)
    return torch.stack([x0, torch.full_like(x0, 2.0), x0 + 4, torch.full_like(x0, 6.0)], dim=1)


def _filter(per_level: bool, post_nms: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = RPNConfig(pre_nms_top_n_test=100, post_nms_top_n_test=post_nms, post_nms_per_level=per_level)
    rpn = build_rpn(cfg, SHAPES).eval()
    # two "levels" of 6 and 4 anchors (the budgets read only the counts); level 0 scores highest
    boxes = torch.cat([_disjoint_boxes(6, 0.0), _disjoint_boxes(4, 200.0)])[None]
    logits = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6]])
    (kept_boxes,), (scores,) = rpn.filter_proposals(boxes, logits.reshape(-1, 1), [(400, 400)], [6, 4])
    return kept_boxes, scores


def test_per_image_cap_is_torchvision_default() -> None:
    boxes, scores = _filter(per_level=False, post_nms=3)
    assert boxes.shape == (3, 4)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([6.0, 5.0, 4.0])))


def test_per_level_mode_keeps_the_budget_of_every_level() -> None:
    """Official UPSNet (individual proposals): the best n of each level after NMS, no cap per image."""
    boxes, scores = _filter(per_level=True, post_nms=3)
    assert boxes.shape == (6, 4)  # 3 of level 0 and 3 of level 1, more than 3 per image
    expected = torch.sigmoid(torch.tensor([6.0, 5.0, 4.0, 0.9, 0.8, 0.7]))
    torch.testing.assert_close(scores, expected)  # by decreasing score
    assert int((boxes[:, 0] >= 200).sum()) == 3
    # a level with fewer survivors than the budget gives what it has
    boxes, _ = _filter(per_level=True, post_nms=5)
    assert boxes.shape == (9, 4)


def test_per_level_mode_runs_in_the_rpn_forward() -> None:
    torch.manual_seed(0)
    cfg = RPNConfig(
        anchor_sizes=[8, 16, 32, 64, 128],
        pre_nms_top_n_test=50,
        post_nms_top_n_test=20,
        post_nms_per_level=True,
    )
    rpn = build_rpn(cfg, SHAPES).eval()
    features = {f"p{k}": torch.randn(2, 8, 64 // 2**k, 64 // 2**k) for k in range(2, 7)}
    with torch.no_grad():
        out = rpn(features, [(64, 64), (60, 50)], (64, 64))
    assert all(20 < len(p) <= 5 * 20 for p in out.proposals)  # more than one level's budget
    capped = build_rpn(
        RPNConfig(anchor_sizes=[8, 16, 32, 64, 128], pre_nms_top_n_test=50, post_nms_top_n_test=20), SHAPES
    )
    capped.load_state_dict(rpn.state_dict())
    with torch.no_grad():
        assert all(len(p) <= 20 for p in capped.eval()(features, [(64, 64), (60, 50)], (64, 64)).proposals)
