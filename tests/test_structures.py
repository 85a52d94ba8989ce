"""PanopticTarget views that the models' losses read."""

from __future__ import annotations

import torch

from unipan.structures import IGNORE_LABEL, Batch, DatasetMeta, PanopticTarget, SegmentInfo, logit_boxes, masks_to_boxes

META = DatasetMeta(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 2, "name": "car", "isthing": 1},
        {"id": 10, "name": "sky", "isthing": 0},
    ]
)


def _target() -> PanopticTarget:
    panoptic = torch.zeros(4, 6, dtype=torch.int32)
    panoptic[:2] = 5  # sky
    panoptic[2:, :2] = 7  # a person
    panoptic[2:, 2:4] = 9  # a crowd of cars
    segments = [
        SegmentInfo(id=5, category_id=10, isthing=False),
        SegmentInfo(id=7, category_id=1, isthing=True),
        SegmentInfo(id=9, category_id=2, isthing=True, iscrowd=True),
    ]
    return PanopticTarget.from_panoptic(panoptic, segments, META, image_id="a")


def test_sem_seg_with_crowd_labels_crowd_pixels_with_their_class() -> None:
    target = _target()
    crowd = target.crowd
    assert int(crowd.sum()) == 4 and bool((target.sem_seg[crowd] == IGNORE_LABEL).all())
    with_crowd = target.sem_seg_with_crowd(META)
    assert bool((with_crowd[crowd] == META.class_index(2)).all())
    assert torch.equal(with_crowd[~crowd], target.sem_seg[~crowd])
    assert int(with_crowd[2, 5]) == IGNORE_LABEL  # void stays ignored


def test_padded_sem_seg_with_and_without_crowd() -> None:
    target = _target()
    batch = Batch(images=torch.zeros(1, 3, 8, 8), image_sizes=[(4, 6)], image_ids=["a"], targets=[target])
    plain = batch.padded_sem_seg()
    crowd = batch.padded_sem_seg(crowd_meta=META)
    assert plain.shape == crowd.shape == (1, 8, 8)
    assert bool((plain[0, 4:] == IGNORE_LABEL).all()) and bool((crowd[0, :, 6:] == IGNORE_LABEL).all())
    assert int((crowd != plain).sum()) == 4


def test_instance_index_map() -> None:
    target = _target()
    index = target.instance_index_map()
    assert int((index == 0).sum()) == 4 and int((index == -1).sum()) == 20


def test_masks_to_boxes_by_hand_and_logit_boxes_equal_it() -> None:
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 4, 0] = True
    masks[1, 0, 6] = True  # two corners: the box spans the map
    # masks[2] is empty
    want = torch.tensor([[2, 1, 6, 3], [0, 0, 7, 5], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(masks_to_boxes(masks), want)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 13, 17, generator=g) - 1.5
    logits[0] = -1.0  # empty
    logits[1, 3, 4] = 0.5  # exactly at the threshold: in the mask (">=")
    logits[1] = logits[1].clamp(max=0.5)
    for thresh in (0.5, 0.0, -1.0):
        assert torch.equal(logit_boxes(logits, thresh), masks_to_boxes(logits >= thresh))
    assert logit_boxes(logits[:0], 0.0).shape == (0, 4) and masks_to_boxes(masks[:0]).shape == (0, 4)
