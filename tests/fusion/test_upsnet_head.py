"""UPSNet's panoptic head (unipan.fusion.upsnet_head): geometry (unipan.fusion.paste), Z and its
argmax, unknown class, training targets and loss, mask pruning, class assignment, composing the
result (unipan.segments), and the oracle (unipan.fusion.oracle: GT in -> PQ 100)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.fusion.paste import box_pixel_windows, crop_full_mask_logits, paste_mask_logits
from unipan.fusion.settings import PanopticHeadSettings
from unipan.fusion.upsnet_head import (
    assign_instance_classes,
    panoptic_argmax,
    panoptic_logits,
    panoptic_loss,
    panoptic_targets,
    prune_masks,
    sample_kept_instances,
    select_detections,
    upsnet_fusion,
)
from unipan.segments import compose_panoptic
from unipan.structures import IGNORE_LABEL, VOID_ID, DatasetMeta, PanopticResult, PanopticTarget, RawPrediction

# 2 stuff (ids 10, 11), 2 things (ids 1, 2): class index 0 = sky, 1 = grass, 2 = disc, 3 = square.
META = DatasetMeta(
    [
        {"id": 1, "name": "disc", "isthing": 1, "color": [255, 0, 0]},
        {"id": 10, "name": "sky", "isthing": 0, "color": [0, 0, 255]},
        {"id": 2, "name": "square", "isthing": 1, "color": [0, 255, 0]},
        {"id": 11, "name": "grass", "isthing": 0, "color": [0, 128, 0]},
    ],
    name="toy",
)
S = META.num_stuff
NO_FILTER = PanopticHeadSettings(stuff_area=0, filter_detections=False)


def instance_index_map(masks: torch.Tensor) -> torch.Tensor:
    """`PanopticTarget.instance_index_map` of a target that holds only these instance masks."""
    n, h, w = masks.shape
    target = PanopticTarget(
        image_id="",
        panoptic=torch.zeros((h, w), dtype=torch.int32),
        segments=[],
        sem_seg=torch.full((h, w), IGNORE_LABEL, dtype=torch.long),
        boxes=torch.zeros((n, 4)),
        labels=torch.zeros(n, dtype=torch.long),
        masks=masks,
        crowd=torch.zeros((h, w), dtype=torch.bool),
        instance_ids=torch.arange(1, n + 1),
    )
    return target.instance_index_map()


def _raw(
    sem_logits: torch.Tensor,
    boxes: list[list[float]],
    labels: list[int],
    full_masks: torch.Tensor,
    scores: list[float] | None = None,
) -> RawPrediction:
    n = len(labels)
    return RawPrediction(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        scores=torch.tensor(scores if scores is not None else [1.0] * n),
        labels=torch.tensor(labels, dtype=torch.long),
        sem_logits=sem_logits,
        sem_space="all",
        extras={"full_mask_logits": full_masks},
    )


# --- geometry ----------------------------------------------------------------------------------
def test_box_pixel_windows_follow_pixel_centres() -> None:
    boxes = torch.tensor(
        [
            [2.0, 3.0, 6.0, 5.0],  # integer GT box: exactly columns 2..5, rows 3..4
            [2.3, 0.4, 6.6, 1.6],  # centres 2.5..6.5 in x (x < 6.6), 0.5 and 1.5 in y
            [-5.0, -5.0, 100.0, 100.0],  # clipped to the image
            [4.0, 4.0, 4.0, 8.0],  # degenerate
            [3.6, 1.0, 3.9, 2.0],  # covers no pixel centre in x
        ]
    )
    win = box_pixel_windows(boxes, (8, 10)).tolist()
    assert win[0] == [3, 5, 2, 6]
    assert win[1] == [0, 2, 2, 7]
    assert win[2] == [0, 8, 0, 10]
    assert win[3][1] == win[3][0] and win[3][3] == win[3][2]
    assert win[4][1] == win[4][0] and win[4][3] == win[4][2]


def test_paste_mask_logits_matches_grid_sample_and_is_differentiable() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 7, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.2, 2.7, 9.9, 6.1], [0.0, 0.0, 12.0, 10.0], [5.5, 3.25, 7.0, 9.75]], dtype=torch.float64)
    size = (10, 12)
    crops = paste_mask_logits(logits, boxes, size)
    win = box_pixel_windows(boxes, size)
    for i, ((y0, y1, x0, x1), crop) in enumerate(zip(win.tolist(), crops, strict=True)):
        assert crop.shape == (y1 - y0, x1 - x0)
        # naive reference: grid_sample at each pixel centre, the box edges mapping to the grid edges
        bx0, by0, bx1, by1 = boxes[i].tolist()
        gx = (torch.arange(x0, x1, dtype=torch.float64) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
        gy = (torch.arange(y0, y1, dtype=torch.float64) + 0.5 - by0) / (by1 - by0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
        ref = F.grid_sample(logits[i][None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        torch.testing.assert_close(crop, ref[0, 0])
    sum(c.sum() for c in crops).backward()
    assert logits.grad is not None and bool((logits.grad != 0).any())


# --- Z and its argmax --------------------------------------------------------------------------
def _random_head_inputs(gen: torch.Generator, n: int, integer: bool) -> tuple:
    c, h, w = S + META.num_things, 9, 11
    # small integers make ties frequent, which the argmax must break as torch does
    sem = torch.randint(-2, 3, (c, h, w), generator=gen).float() if integer else torch.randn(c, h, w, generator=gen)
    xy0 = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) - 2
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    if n:
        boxes[0] = torch.tensor([-1.0, -1.0, w + 1.0, h + 1.0])  # one box over the whole image
    labels = torch.randint(0, META.num_things, (n,), generator=gen)
    win = box_pixel_windows(boxes, (h, w))
    if integer:
        crops = [torch.randint(-2, 3, (y1 - y0, x1 - x0), generator=gen).float() for y0, y1, x0, x1 in win.tolist()]
    else:
        crops = [torch.randn(y1 - y0, x1 - x0, generator=gen) for y0, y1, x0, x1 in win.tolist()]
    return sem, win, labels, crops


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("unknown", [True, False])
def test_panoptic_argmax_equals_argmax_of_materialised_z(integer: bool, unknown: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        n = trial % 6
        sem, win, labels, crops = _random_head_inputs(gen, n, integer)
        z = panoptic_logits(sem, win, labels, crops, S, unknown=unknown)
        assert z.shape == (S + n + int(unknown), *sem.shape[1:])
        fast, sem_pred = panoptic_argmax(sem, win, labels, crops, S, unknown=unknown, return_sem_pred=True)
        assert torch.equal(fast, z.argmax(dim=0)), f"trial {trial}"
        assert torch.equal(sem_pred, sem.argmax(dim=0))


def test_z_and_unknown_logit_on_hand_built_example() -> None:
    # 1 x 4 image; stuff sky/grass, things disc/square; one disc instance whose box is x in [0, 2).
    sem = torch.tensor(
        [
            [[0.5, 0.0, 1.0, 0.0]],  # sky
            [[0.0, 0.2, 0.0, 0.0]],  # grass
            [[2.0, 3.0, 0.5, 4.0]],  # disc
            [[1.0, 0.0, 3.0, -1.0]],  # square
        ]
    )
    win = box_pixel_windows(torch.tensor([[0.0, 0.0, 2.0, 1.0]]), (1, 4))
    crops = [torch.tensor([[1.0, -0.5]])]
    z = panoptic_logits(sem, win, torch.tensor([0]), crops, S)
    # instance channel: X[disc] + Y inside the box, 0 outside
    torch.testing.assert_close(z[2, 0], torch.tensor([3.0, 2.5, 0.0, 0.0]))
    # unknown = max(X_disc, X_square) - max_i X_mask_i, X_mask = X[disc] in the box, 0 outside
    torch.testing.assert_close(z[3, 0], torch.tensor([2.0 - 2.0, 3.0 - 3.0, 3.0 - 0.0, 4.0 - 0.0]))
    torch.testing.assert_close(z[:2], sem[:2])
    # pixels 0-1 go to the instance; pixels 2-3 show things that no instance covers -> unknown
    assert panoptic_argmax(sem, win, torch.tensor([0]), crops, S).tolist() == [[2, 2, 3, 3]]
    # with no instance at all the X_mask term is zero: unknown = max over thing channels
    z0 = panoptic_logits(sem, win[:0], torch.tensor([], dtype=torch.long), [], S)
    torch.testing.assert_close(z0[2, 0], torch.tensor([2.0, 3.0, 3.0, 4.0]))


def test_unknown_wins_where_semantics_see_an_uncovered_thing() -> None:
    h, w = 12, 12
    sem_seg = torch.zeros(h, w, dtype=torch.long)  # sky
    sem_seg[2:6, 2:6] = S + 0  # a disc with an instance
    sem_seg[7:11, 7:11] = S + 1  # a square that the detector missed
    sem = F.one_hot(sem_seg, META.num_classes).permute(2, 0, 1).float() * 8
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[0, 2:6, 2:6] = True
    raw = _raw(sem, [[2, 2, 6, 6]], [0], mask.float() * 16 - 8)
    result = upsnet_fusion(raw, META, NO_FILTER)
    assert bool((result.panoptic[7:11, 7:11] == VOID_ID).all())
    disc = [s for s in result.segments if s.category_id == 1]
    assert len(disc) == 1 and bool((result.panoptic == disc[0].id).sum() == 16)
    assert {s.category_id for s in result.segments} == {1, 10}
    # without the unknown class the missed square's pixels must go to some other segment
    no_unknown = upsnet_fusion(raw, META, PanopticHeadSettings(stuff_area=0, filter_detections=False, unknown=False))
    assert not bool((no_unknown.panoptic[7:11, 7:11] == VOID_ID).any())


# --- training ----------------------------------------------------------------------------------
def test_panoptic_targets_drop_instances_to_unknown() -> None:
    sem_seg = torch.tensor([[0, 1, 2, 2, 3, 255], [1, 2, 3, 3, 255, 0]])
    masks = torch.zeros(3, 2, 6, dtype=torch.bool)
    masks[0, 0, 2:4] = True
    masks[0, 1, 1] = True
    masks[1, 0, 4] = True
    masks[2, 1, 2:4] = True
    imap = instance_index_map(masks)
    assert imap.tolist() == [[-1, -1, 0, 0, 1, -1], [-1, 0, 2, 2, -1, -1]]
    keep = torch.tensor([True, False, True])
    target = panoptic_targets(sem_seg, imap, keep, S)
    # stuff keeps its index; kept instances 0 and 2 get channels S+0 and S+1; dropped -> S+2
    assert target.tolist() == [[0, 1, 2, 2, 4, 255], [1, 2, 3, 3, 255, 0]]
    ignored = panoptic_targets(sem_seg, imap, keep, S, unknown=False)
    assert ignored[0, 4] == IGNORE_LABEL


def test_crowd_pixels_are_unknown_in_the_panoptic_target() -> None:
    """Released MaskMatching: thing-class pixels no kept instance covers (crowd too) are unknown."""
    # S = 2 stuff classes; class 2 and 3 are things. Pixels (0, 4) and (1, 4) are a crowd of class 3
    # (in sem_seg with their class, outside every instance), (1, 5) void.
    sem_seg = torch.tensor([[0, 1, 2, 2, 3, 0], [1, 2, 3, 3, 3, 255]])
    masks = torch.zeros(2, 2, 6, dtype=torch.bool)
    masks[0, 0, 2:4] = True
    masks[0, 1, 1] = True
    masks[1, 1, 2:4] = True
    imap = instance_index_map(masks)
    both = panoptic_targets(sem_seg, imap, torch.tensor([True, True]), S)
    assert both.tolist() == [[0, 1, 2, 2, 4, 0], [1, 2, 3, 3, 4, 255]]  # crowd -> unknown S + 2
    one = panoptic_targets(sem_seg, imap, torch.tensor([False, True]), S)
    assert one.tolist() == [[0, 1, 3, 3, 3, 0], [1, 3, 2, 2, 3, 255]]  # dropped and crowd -> S + 1
    no_unknown = panoptic_targets(sem_seg, imap, torch.tensor([False, True]), S, unknown=False)
    assert no_unknown.tolist() == [[0, 1, 255, 255, 255, 0], [1, 255, 2, 2, 255, 255]]
    # crowd left at the ignore label (not trained) stays ignored
    ignored_crowd = sem_seg.clone()
    ignored_crowd[:, 4] = IGNORE_LABEL
    assert panoptic_targets(ignored_crowd, imap, torch.tensor([True, True]), S)[:, 4].tolist() == [255, 255]


def test_sample_kept_instances() -> None:
    gen = torch.Generator().manual_seed(0)
    # the released code's max(int(0.7 * n), 1): floored, at least one; none of none
    expected = [0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 7, 7]
    for n in range(12):
        keep = sample_kept_instances(n, 0.7, gen)
        assert keep.shape == (n,) and int(keep.sum()) == expected[n], n
    assert int(sample_kept_instances(4, 0.0).sum()) == 1
    picks = {tuple(sample_kept_instances(10, 0.7, gen).tolist()) for _ in range(20)}
    assert len(picks) > 1  # random, not the first 70%
    assert bool(sample_kept_instances(5, 1.0).all())
    with pytest.raises(ValueError, match="keep_fraction"):
        sample_kept_instances(3, 1.5)


def test_panoptic_loss_matches_manual_cross_entropy_and_reaches_both_heads() -> None:
    torch.manual_seed(0)
    h, w = 8, 8
    sem = torch.randn(META.num_classes, h, w, requires_grad=True)
    mask_logits = torch.randn(2, 6, 6, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [3.0, 2.0, 8.0, 7.0]])
    labels = torch.tensor([0, 1])
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 0:4, 0:3] = True
    masks[1, 4:7, 3:8] = True
    sem_seg = torch.zeros(h, w, dtype=torch.long)
    sem_seg[masks[0]] = S + 0
    sem_seg[masks[1]] = S + 1
    sem_seg[7, 7] = IGNORE_LABEL
    imap = instance_index_map(masks)
    keep = torch.tensor([True, True])
    loss = panoptic_loss(sem, boxes, labels, mask_logits, sem_seg, imap, keep, S)
    win = box_pixel_windows(boxes, (h, w))
    z = panoptic_logits(sem, win, labels, paste_mask_logits(mask_logits, boxes, (h, w)), S)
    target = panoptic_targets(sem_seg, imap, keep, S)
    logp = z.log_softmax(dim=0)
    valid = target != IGNORE_LABEL
    assert not bool(valid.all())
    # the released code's mean over all pixels, ignored ones counting 0 (reduce=False, then .mean())
    manual = -(logp.gather(0, torch.where(valid, target, 0)[None])[0] * valid).sum() / valid.numel()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert sem.grad is not None and bool((sem.grad != 0).any())
    assert mask_logits.grad is not None and bool((mask_logits.grad != 0).all(dim=(1, 2)).all())
    # an image without labelled pixels gives 0, not NaN
    empty = panoptic_loss(
        sem, boxes, labels, mask_logits, torch.full_like(sem_seg, 255), torch.full_like(imap, -1), keep, S
    )
    assert float(empty.detach()) == 0.0


# --- inference steps ---------------------------------------------------------------------------
def test_select_detections_class_agnostic_nms_threshold_topk() -> None:
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.95, 0.61, 0.59, 0.8])
    # box 0 overlaps box 1 (IoU 0.81) and loses to it regardless of class; 0.59 is below 0.6
    assert select_detections(boxes, scores, 0.5, 0.6, 100).tolist() == [1, 4, 2]
    assert select_detections(boxes, scores, 0.5, 0.6, 2).tolist() == [1, 4]
    assert select_detections(boxes[:0], scores[:0], 0.5, 0.6, 100).numel() == 0


def test_mask_pruning_hand_built() -> None:
    size = (10, 10)
    full = torch.full((5, 10, 10), -1.0)
    full[0, 0:5, 0:4] = 1.0  # 20 px, kept
    full[1, 0:5, 2:6] = 1.0  # 20 px, 10 on mask 0 (50% > 30%): dropped
    full[2, 4:9, 3:7] = 1.0  # 20 px, 1 on mask 0 and none on mask 1 (dropped): 5% -> kept
    full[3, 0:5, 0:4] = 1.0  # same pixels as mask 0 but another class: kept
    boxes = torch.tensor(
        [[0, 0, 6, 6], [0, 0, 6, 6], [0, 0, 10, 10], [0, 0, 4, 5], [0, 0, 10, 10]], dtype=torch.float32
    )
    labels = torch.tensor([0, 0, 0, 1, 0])  # mask 4 is empty: dropped
    win = box_pixel_windows(boxes, size)
    crops = crop_full_mask_logits(full, win)
    assert prune_masks(crops, win, labels, 0.3, size).tolist() == [True, False, True, True, False]
    # at a threshold of 0.5 the half-covered mask 1 stays (more than half is required to drop)
    assert prune_masks(crops, win, labels, 0.5, size).tolist()[:2] == [True, True]


def test_instance_class_assignment_hand_built() -> None:
    c = META.num_classes
    # four instances (channels S+0..S+3) of 10 pixels each in a 4 x 10 map
    z = torch.tensor([[S + i] * 10 for i in range(4)])
    sem_pred = torch.tensor(
        [
            [2] * 6 + [0] * 4,  # detected disc (2), majority disc -> disc
            [0] * 6 + [2] * 4,  # detected disc, majority sky (60%) -> sky
            [1] * 4 + [3] * 3 + [2] * 3,  # detected disc, mode grass at 40% only -> disc
            [3] * 7 + [0] * 3,  # detected disc, majority square (a thing) -> disc
        ]
    )
    labels = torch.tensor([0, 0, 0, 0])
    assert assign_instance_classes(z, sem_pred, labels, S, c).tolist() == [2, 0, 2, 2]
    # a tie between the detected class and a stuff class keeps the detected class
    z2 = torch.tensor([[S] * 4])
    assert assign_instance_classes(z2, torch.tensor([[0, 0, 2, 2]]), torch.tensor([0]), S, c).tolist() == [2]
    # exactly 50% stuff with the detected class in the minority relabels (at least 50%)
    z3 = torch.tensor([[S] * 4])
    assert assign_instance_classes(z3, torch.tensor([[1, 1, 2, 3]]), torch.tensor([0]), S, c).tolist() == [1]


def test_relabelled_instance_joins_the_stuff_segment_and_small_stuff_is_void() -> None:
    h, w = 10, 10
    sem_seg = torch.zeros(h, w, dtype=torch.long)  # sky everywhere
    sem_seg[8:, :] = 1  # a 20-px grass strip
    sem = F.one_hot(sem_seg, META.num_classes).permute(2, 0, 1).float() * 2
    # a confident "disc" detection on sky: its mask logits win over the semantic sky logit
    full = torch.full((1, h, w), -5.0)
    full[0, 0:4, 0:4] = 5.0
    raw = _raw(sem, [[0, 0, 4, 4]], [0], full)
    assigned = upsnet_fusion(raw, META, NO_FILTER)
    assert [(s.category_id, s.area) for s in assigned.segments] == [(10, 80), (11, 20)]
    plain = upsnet_fusion(
        raw, META, PanopticHeadSettings(stuff_area=0, filter_detections=False, class_assignment=False)
    )
    assert [(s.category_id, s.area) for s in plain.segments] == [(1, 16), (10, 64), (11, 20)]
    small_void = upsnet_fusion(raw, META, PanopticHeadSettings(stuff_area=21, filter_detections=False))
    assert [(s.category_id, s.area) for s in small_void.segments] == [(10, 80)]
    assert bool((small_void.panoptic[8:] == VOID_ID).all())


def test_fusion_filters_detections_and_accepts_every_mask_form() -> None:
    torch.manual_seed(0)
    h, w = 16, 16
    sem = torch.randn(META.num_classes, h, w) * 0.1
    boxes = [[1, 1, 8, 8], [1.5, 1.5, 8, 8], [9, 9, 15, 15], [0, 9, 6, 15]]
    grid = torch.randn(4, 7, 7) + 2.0  # confident masks: each kept instance wins pixels
    base = RawPrediction(
        boxes=torch.tensor(boxes),
        scores=torch.tensor([0.9, 0.8, 0.7, 0.3]),
        labels=torch.tensor([0, 1, 1, 0]),
        sem_logits=sem,
        sem_space="all",
        extras={"mask_logits": grid},
    )
    result = upsnet_fusion(base, META, PanopticHeadSettings(stuff_area=0, class_assignment=False))
    # box 1 is suppressed by box 0 (class-agnostic NMS: other class), box 3 scores below 0.6
    things = [(s.category_id, round(s.score, 3)) for s in result.segments if s.isthing]
    assert things == [(1, 0.9), (2, 0.7)]
    # the same logits as probabilities, or pasted beforehand into full maps, give the same result
    probs = RawPrediction(**{**base.__dict__, "extras": {}, "mask_probs": grid.sigmoid().double()})
    pasted = paste_mask_logits(grid, torch.tensor(boxes), (h, w))
    full = torch.zeros(4, h, w)
    for i, (y0, y1, x0, x1) in enumerate(box_pixel_windows(torch.tensor(boxes), (h, w)).tolist()):
        full[i, y0:y1, x0:x1] = pasted[i]
    full_raw = RawPrediction(**{**base.__dict__, "extras": {"full_mask_logits": full}})
    for other in (probs, full_raw):
        out = upsnet_fusion(other, META, PanopticHeadSettings(stuff_area=0, class_assignment=False))
        assert torch.equal(out.panoptic, result.panoptic)
    # segment bookkeeping: area and bbox match the id map
    for seg in result.segments:
        m = result.panoptic == seg.id
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert seg.area == int(m.sum())
        assert seg.bbox == (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
    assert {int(i) for i in torch.unique(result.panoptic)} - {0} == {s.id for s in result.segments}


def test_binary_masks_enter_as_signed_logits() -> None:
    torch.manual_seed(0)
    sem = torch.randn(META.num_classes, 12, 12)
    masks = torch.zeros(2, 12, 12, dtype=torch.bool)
    masks[0, 1:6, 1:5] = True
    masks[1, 6:11, 4:10] = True
    binary = RawPrediction(
        boxes=torch.tensor([[1.0, 1, 5, 6], [4, 6, 10, 11]]),
        scores=torch.ones(2),
        labels=torch.tensor([0, 1]),
        sem_logits=sem,
        masks=masks,
        sem_space="all",
    )
    settings = PanopticHeadSettings(stuff_area=0, filter_detections=False, binary_mask_logit=3.0)
    signed = RawPrediction(**{**binary.__dict__, "masks": None, "extras": {"full_mask_logits": masks.float() * 6 - 3}})
    assert torch.equal(upsnet_fusion(binary, META, settings).panoptic, upsnet_fusion(signed, META, settings).panoptic)


def test_stuff_scores_are_mean_class_probabilities() -> None:
    torch.manual_seed(0)
    sem = torch.randn(META.num_classes, 6, 6)
    raw = _raw(sem, [], [], torch.zeros(0, 6, 6))
    result = upsnet_fusion(raw, META, PanopticHeadSettings(stuff_area=0, unknown=False, stuff_scores=True))
    probs = sem.softmax(dim=0)
    for seg in result.segments:
        k = META.class_index(seg.category_id)
        assert seg.score == pytest.approx(float(probs[k][result.panoptic == seg.id].mean()), rel=1e-5)


def test_fusion_errors_name_the_image() -> None:
    sem = torch.zeros(META.num_classes, 4, 4)
    with pytest.raises(ValueError, match="img7.*sem_space"):
        upsnet_fusion(
            RawPrediction(
                boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long), sem_logits=sem
            ),
            META,
            image_id="img7",
        )
    with pytest.raises(ValueError, match="img7.*semantic logits of shape"):
        upsnet_fusion(_raw(sem[:3], [], [], torch.zeros(0, 4, 4)), META, image_id="img7")
    no_masks = RawPrediction(
        boxes=torch.tensor([[0.0, 0, 2, 2]]),
        scores=torch.ones(1),
        labels=torch.zeros(1, dtype=torch.long),
        sem_logits=sem,
        sem_space="all",
    )
    with pytest.raises(ValueError, match="img7.*no mask logits"):
        upsnet_fusion(no_masks, META, image_id="img7")
    bad_label = _raw(sem, [[0, 0, 2, 2]], [5], torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="img7.*thing labels"):
        upsnet_fusion(bad_label, META, image_id="img7")


def test_compose_keeps_instances_in_channel_order() -> None:
    z = torch.tensor([[0, S + 1, S + 1, S + 0, S + 2]])
    panoptic, segments = compose_panoptic(z, torch.tensor([S, S + 1]), torch.tensor([0.9, 0.8]), META, 0)
    assert panoptic.dtype == torch.int32
    assert [(s.id, s.category_id, s.isthing, s.score) for s in segments] == [
        (1, 1, True, pytest.approx(0.9)),
        (2, 2, True, pytest.approx(0.8)),
        (3, 10, False, 1.0),
    ]
    assert panoptic.tolist() == [[3, 2, 2, 1, 0]]  # channel S + 2 is the unknown class: void


# --- oracle: ground truth in -> PQ 100 ---------------------------------------------------------
def _pq_is_perfect(target: PanopticTarget, result: PanopticResult, meta: DatasetMeta) -> list[str]:
    """Problems that keep PQ (panopticapi semantics) below 100 for this image; empty if none.

    Every non-crowd GT segment must be matched by one predicted segment of its category whose
    pixels, outside GT void and same-class crowd, are exactly its own (IoU 1); every other
    predicted segment must lie mostly (> 50%) on void or crowd of its class (not a false positive).
    """
    problems: list[str] = []
    gt, pred = target.panoptic, result.panoptic
    gt_cat = {s.id: s.category_id for s in target.segments}
    crowd_ids = {s.id for s in target.segments if s.iscrowd}
    pred_cat = {s.id: s.category_id for s in result.segments}
    matched: set[int] = set()
    for seg in target.segments:
        if seg.iscrowd:
            continue
        region = gt == seg.id
        ids = torch.unique(pred[region]).tolist()
        if len(ids) != 1 or ids[0] == VOID_ID or pred_cat.get(ids[0]) != seg.category_id:
            problems.append(f"GT segment {seg.id} ({seg.category_id}) -> predicted {ids}")
            continue
        p = pred == ids[0]
        extra = p & ~region & (gt != VOID_ID)
        if bool(extra.any()):
            problems.append(
                f"GT segment {seg.id}: predicted segment {ids[0]} also covers {int(extra.sum())} labelled px"
            )
        matched.add(ids[0])
    for seg in result.segments:
        if seg.id in matched:
            continue
        p = pred == seg.id
        ignorable = p & (
            (gt == VOID_ID)
            | torch.isin(gt, torch.tensor(sorted(i for i in crowd_ids if gt_cat[i] == seg.category_id) or [-1]))
        )
        if int(ignorable.sum()) * 2 <= int(p.sum()):
            problems.append(f"predicted segment {seg.id} ({seg.category_id}) is a false positive")
    return problems


def _assert_oracle_pq_100(samples: list, meta: DatasetMeta, settings: PanopticHeadSettings) -> None:
    results = [upsnet_fusion(oracle_raw_prediction(s.target, meta), meta, settings, s.image_id) for s in samples]
    # the structural check names what went wrong; PQ itself must then be exactly 100
    for s, r in zip(samples, results, strict=True):
        problems = _pq_is_perfect(s.target, r, meta)
        assert not problems, f"image {s.image_id}: {problems[:5]}"
    stat = sum(
        pq_compute_single(s.target.panoptic, s.target.segments, r.panoptic, r.segments, meta, s.image_id)
        for s, r in zip(samples, results, strict=True)
    )
    pq = PQResult.from_stat(stat, meta)
    assert pq.n > 0 and pq.things.n > 0 and pq.stuff.n > 0
    assert (pq.pq, pq.things.pq, pq.stuff.pq) == (1.0, 1.0, 1.0)


def test_oracle_gives_pq_100_on_synthetic_val() -> None:
    synthetic = pytest.importorskip("unipan.data.synthetic")
    ds = synthetic.SyntheticPanoptic(50, seed=0, split="val")
    samples = [ds[i] for i in range(len(ds))]
    assert sum(len(s.target) for s in samples) > 100
    _assert_oracle_pq_100(samples, ds.meta, NO_FILTER)


def test_oracle_gives_pq_100_on_coco_fixture(shared_data: Path) -> None:
    coco = pytest.importorskip("unipan.data.coco_panoptic")
    root = shared_data / "panopticapi" / "sample_data"
    ds = coco.CocoPanopticDataset(root / "input_images", root / "panoptic_examples", root / "panoptic_examples.json")
    samples = [ds[i] for i in range(len(ds))]
    assert any(seg.iscrowd for s in samples for seg in s.target.segments)
    _assert_oracle_pq_100(samples, ds.meta, NO_FILTER)
