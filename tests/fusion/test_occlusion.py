"""REFINE's occlusion-aware fusion: Eq. 7, the greedy reclaim, SHR, training labels, oracle PQ 100."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unipan.data.synthetic import SyntheticPanoptic, SynthOptions, generate_scene
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.occlusion import (
    candidate_pairs,
    occlusion_fusion,
    occlusion_relations,
    occlusion_targets,
    shr_relations,
    soft_occlusion,
    with_relations,
)
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.structures import DatasetMeta, PanopticTarget, RawPrediction

CATS = [{"id": i + 1, "name": f"t{i}", "isthing": 1} for i in range(3)] + [
    {"id": 10 + i, "name": f"s{i}", "isthing": 0} for i in range(3)
]
META = DatasetMeta(CATS)
S = META.num_stuff


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros((h, w), dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def raw_with_masks(masks: list[torch.Tensor], scores: list[float], sem: torch.Tensor) -> RawPrediction:
    n = len(masks)
    return RawPrediction(
        boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n).reshape(n, 4),
        scores=torch.tensor(scores),
        labels=torch.zeros(n, dtype=torch.long),
        sem_logits=F.one_hot(sem, S + 1).permute(2, 0, 1).float() * 20,
        masks=torch.stack(masks),
    )


def relations(raw: RawPrediction, pairs: list[tuple[int, int]], probs: list[tuple[float, float]]) -> RawPrediction:
    return with_relations(raw, torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), torch.tensor(probs).reshape(-1, 2))


# --- Eq. 7 -----------------------------------------------------------------------------------------
def test_eq7_values_and_limits() -> None:
    s = torch.tensor(0.8)
    assert float(soft_occlusion(torch.tensor(0.0), s, 2.5)) == pytest.approx(0.670320046 * 0.8, abs=1e-6)
    assert float(soft_occlusion(torch.tensor(1.0), s, 2.5)) == pytest.approx(0.8)
    o = torch.linspace(0, 1, 11)
    assert bool((soft_occlusion(o, s, 2.5).diff() > 0).all())  # monotone in O
    assert bool((soft_occlusion(torch.tensor(0.3), torch.linspace(0.1, 1, 10), 2.5).diff() > 0).all())  # and in s
    # sigma -> inf: the score order whatever O says; sigma = 0: O alone
    raw = raw_with_masks([box_mask(4, 4, 0, 2, 0, 2)] * 2, [0.9, 0.6], torch.zeros(4, 4, dtype=torch.long))
    raw = relations(raw, [(0, 1)], [(0.1, 0.9)])
    assert occlusion_relations(raw, 1e9).tolist() == [[0, 1]]
    assert occlusion_relations(raw, 0.0).tolist() == [[1, 0]]
    # sigma 2.5: 0.9 e^{-0.81/2.5} = 0.651 > 0.6 e^{-0.01/2.5} = 0.598, the confidence prior wins;
    # with s_0 = 0.7: 0.506 < 0.598, the occlusion network wins
    assert occlusion_relations(raw, 2.5).tolist() == [[0, 1]]
    assert occlusion_relations(replace(raw, scores=torch.tensor([0.7, 0.6])), 2.5).tolist() == [[1, 0]]
    # equal O~: no relation
    assert occlusion_relations(relations(raw, [(0, 1)], [(0.5, 0.5)]), 0.0).shape == (0, 2)
    with pytest.raises(ValueError, match="needs extras"):
        occlusion_relations(replace(raw, extras={}), 2.5, "img7")


# --- the fusion without relations is the heuristic ----------------------------------------------------
def random_raw(seed: int) -> RawPrediction:
    g = torch.Generator().manual_seed(seed)
    h, w, n = 48, 64, 14
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([0.1 * w, 0.1 * h])
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 0.3], dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    radius = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=g)
    probs = torch.sigmoid(6 * (radius - (yy**2 + xx**2).sqrt())) + 0.2 * torch.rand(n, 28, 28, generator=g)
    scores = torch.rand(n, generator=g)
    scores[3] = scores[5]  # a tie
    coarse = torch.randint(S + 1, (h // 8, w // 8), generator=g)
    sem = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)
    return RawPrediction(
        boxes=boxes,
        scores=scores,
        labels=torch.randint(META.num_things, (n,), generator=g),
        sem_logits=F.one_hot(sem, S + 1).permute(2, 0, 1).float() * 20 + torch.rand(S + 1, h, w, generator=g),
        mask_probs=probs.clamp(0, 1),
    )


@pytest.mark.parametrize("seed", [0, 2, 3, 4])
def test_without_relations_equals_heuristic_fusion(seed: int) -> None:
    raw = random_raw(seed)
    kwargs = {"instance_score_thresh": 0.3, "overlap_thresh": 0.5, "mask_thresh": 0.5, "stuff_area": 40}
    expected = heuristic_fusion(raw, META, **kwargs)
    pairs = candidate_pairs(raw, score_thresh=0.3)
    assert pairs.shape[0] > 0  # the case has overlapping instances
    tied = with_relations(raw, pairs, torch.full((pairs.shape[0], 2), 0.5))
    for method, prediction in (("none", raw), ("learned", with_relations(raw, pairs[:0], torch.zeros(0, 2)))):
        for r in (prediction, tied):
            if method == "none" and r is tied:
                continue
            got = occlusion_fusion(r, META, occlusion=method, sigma=0.0, unknown_erasing=False, **kwargs)
            assert torch.equal(got.panoptic, expected.panoptic)
            assert got.segments == expected.segments
    # tied O with sigma > 0: the higher score is on top, which is again the heuristic's order
    got = occlusion_fusion(tied, META, occlusion="learned", sigma=2.5, unknown_erasing=False, **kwargs)
    assert torch.equal(got.panoptic, expected.panoptic)


def test_reclaim_takes_the_intersection_and_drops_emptied_instances() -> None:
    h, w = 10, 12
    sem = torch.zeros((h, w), dtype=torch.long)
    a = box_mask(h, w, 0, 6, 0, 6)  # 36 px, score 0.9
    b = box_mask(h, w, 3, 9, 3, 9)  # 36 px, overlaps a on 9 px, score 0.8
    raw = raw_with_masks([a, b], [0.9, 0.8], sem)
    kw = {"stuff_area": 0, "unknown_erasing": False, "sigma": 0.0, "instance_score_thresh": 0.5}
    plain = occlusion_fusion(relations(raw, [], []), META, **kw)
    assert plain.panoptic[4, 4] == 1 and [s.area for s in plain.segments if s.isthing] == [36, 27]
    b_over = occlusion_fusion(relations(raw, [(0, 1)], [(0.1, 0.9)]), META, **kw)
    assert b_over.panoptic[4, 4] == 2 and [s.area for s in b_over.segments if s.isthing] == [27, 36]
    # b inside a: a (higher score) placed first; b over a takes all of b, a keeps the rest
    inner = box_mask(h, w, 1, 3, 1, 3)
    raw2 = raw_with_masks([a, inner], [0.9, 0.8], sem)
    r2 = occlusion_fusion(relations(raw2, [(0, 1)], [(0.0, 1.0)]), META, **kw)
    assert [s.area for s in r2.segments if s.isthing] == [32, 4]
    # a fully reclaimed instance disappears and ids stay contiguous
    raw3 = raw_with_masks([inner, a], [0.9, 0.8], sem)
    r3 = occlusion_fusion(relations(raw3, [(0, 1)], [(0.0, 1.0)]), META, **kw)
    assert [s.area for s in r3.segments if s.isthing] == [36]
    assert set(torch.unique(r3.panoptic).tolist()) - {0} == {s.id for s in r3.segments}
    # the overlap test counts reclaimed pixels as kept: b would lose 25% without the relation
    r4 = occlusion_fusion(relations(raw, [(0, 1)], [(0.1, 0.9)]), META, **{**kw, "overlap_thresh": 0.2})
    assert [s.area for s in r4.segments if s.isthing] == [27, 36]
    r5 = occlusion_fusion(relations(raw, [], []), META, **{**kw, "overlap_thresh": 0.2})
    assert [s.area for s in r5.segments if s.isthing] == [36]


def test_shr_box_rule() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 6.0, 6.0], [8.0, 8.0, 20.0, 20.0]])
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    # box 1 lies inside box 0 (IoF 1): 1 on top; 0 and 2 overlap by 4 / 100 and 4 / 144: none
    assert shr_relations(boxes, pairs, 0.5).tolist() == [[1, 0]]
    assert shr_relations(boxes, pairs.flip(1), 0.5).tolist() == [[1, 0]]
    h, w = 24, 24
    sem = torch.zeros((h, w), dtype=torch.long)
    raw = raw_with_masks([box_mask(h, w, 0, 10, 0, 10), box_mask(h, w, 2, 6, 2, 6)], [0.9, 0.8], sem)
    raw = replace(raw, boxes=boxes[:2])
    kw = {"stuff_area": 0, "unknown_erasing": False, "instance_score_thresh": 0.5}
    assert [s.area for s in occlusion_fusion(raw, META, occlusion="shr", **kw).segments if s.isthing] == [84, 16]
    assert [s.area for s in occlusion_fusion(raw, META, occlusion="none", **kw).segments if s.isthing] == [100]


def test_candidate_pairs_rho_and_intraclass() -> None:
    h, w = 20, 20
    sem = torch.zeros((h, w), dtype=torch.long)
    big = box_mask(h, w, 0, 10, 0, 10)  # 100 px
    edge = box_mask(h, w, 9, 19, 9, 19)  # 100 px, 1 px shared: below rho of both
    inner = box_mask(h, w, 2, 4, 2, 4)  # 4 px, all inside big: >= rho of itself
    raw = raw_with_masks([big, edge, inner], [0.9, 0.8, 0.7], sem)
    assert candidate_pairs(raw, rho=0.2).tolist() == [[0, 2]]
    assert candidate_pairs(raw, rho=0.01).tolist() == [[0, 1], [0, 2]]
    raw = replace(raw, labels=torch.tensor([0, 1, 0]))
    assert candidate_pairs(raw, rho=0.2, intraclass=False).shape == (0, 2)
    assert candidate_pairs(raw, rho=0.2, score_thresh=0.75).shape == (0, 2)


# --- training labels ------------------------------------------------------------------------------
def test_occlusion_targets() -> None:
    h, w = 10, 10
    panoptic = torch.zeros((h, w), dtype=torch.int32)
    panoptic[:, :5] = 7  # GT instance 0 (segment 7) on the left
    panoptic[:, 5:] = 8  # GT instance 1 (segment 8) on the right
    panoptic[8:, :] = 3  # a stuff segment along the bottom
    ids = torch.tensor([7, 8])
    # RoI masks: r0 (GT 0) covers columns 0..6, r1 (GT 1) columns 4..9; intersection columns 4..6 rows 0..7
    # is owned 8 px by segment 7 (column 4) and 16 px by segment 8: segment 8 (GT 1) is on top
    r0 = box_mask(h, w, 0, 8, 0, 7)
    r1 = box_mask(h, w, 0, 8, 4, 10)
    r2 = box_mask(h, w, 1, 8, 0, 7)  # another RoI of GT 0
    pairs, targets = occlusion_targets(torch.stack([r0, r1, r2]), torch.tensor([0, 1, 0]), panoptic, ids, 0.2)
    got = {tuple(p): t for p, t in zip(pairs.tolist(), targets.tolist(), strict=True)}
    assert got == {(0, 1): 0.0, (1, 0): 1.0, (1, 2): 1.0, (2, 1): 0.0}  # same-GT pair (0, 2) skipped
    # stuff- or void-majority intersections are skipped
    low = box_mask(h, w, 6, 10, 3, 7)
    low2 = box_mask(h, w, 7, 10, 2, 8)
    pairs, _ = occlusion_targets(torch.stack([low, low2]), torch.tensor([0, 1]), panoptic, ids, 0.2)
    assert pairs.shape == (0, 2)
    void = panoptic.clone()
    void[:, 4:7] = 0
    pairs, _ = occlusion_targets(torch.stack([r0, r1]), torch.tensor([0, 1]), void, ids, 0.2)
    assert pairs.shape == (0, 2)
    # overlaps below rho of both masks are skipped
    pairs, _ = occlusion_targets(torch.stack([r0, r1]), torch.tensor([0, 1]), panoptic, ids, 0.6)
    assert pairs.shape == (0, 2)


# --- oracle PQ 100 through every fusion path ----------------------------------------------------------
def pq_of(results: list[tuple[PanopticTarget, object]], meta: DatasetMeta) -> PQResult:
    stat = None
    for target, result in results:
        s = pq_compute_single(target.panoptic, target.segments, result.panoptic, result.segments, meta, target.image_id)  # type: ignore[attr-defined]
        stat = s if stat is None else stat + s
    return PQResult.from_stat(stat, meta)


def test_oracle_pq_100_heuristic_and_unknown_erasing_of_nothing() -> None:
    opts = SynthOptions(size=(64, 80), crowd_prob=0.5, void_border=2, void_outline=0.5)
    val = SyntheticPanoptic(5, seed=0, opts=opts, split="val")
    meta = val.meta
    empty = (torch.zeros((0, 2), dtype=torch.long), torch.zeros((0, 2)))
    for kwargs in (
        {"occlusion": "none", "unknown_erasing": False},
        {"occlusion": "none", "unknown_erasing": True, "ue_dilation": 8},
        {"occlusion": "learned", "unknown_erasing": True, "ue_dilation": 8},
        {"occlusion": "shr", "unknown_erasing": True, "ue_dilation": 8},
    ):
        results = []
        for i in range(len(val)):
            target = val[i].target
            raw = with_relations(oracle_raw_prediction(target, meta), *empty)
            results.append((target, occlusion_fusion(raw, meta, stuff_area=0, **kwargs)))
        pq = pq_of(results, meta)
        assert (pq.pq, pq.things.pq, pq.stuff.pq) == (1.0, 1.0, 1.0), kwargs


def occluded_oracle(
    seed: int, index: int, opts: SynthOptions
) -> tuple[PanopticTarget, RawPrediction, list[tuple[int, int]]]:
    """GT where each instance's mask also covers the visible pixels of the instances lying on it,
    with the drawing order's (top, bottom) pairs (`SynthInstance.occludes`) as instance indices."""
    val = SyntheticPanoptic(index + 1, seed=seed, opts=opts, split="val")
    target = val[index].target
    scene = generate_scene(seed, index, opts, "val")
    position = {int(sid): k for k, sid in enumerate(target.instance_ids.tolist())}
    masks = target.masks.clone()
    order: list[tuple[int, int]] = []
    for inst in scene.instances:
        for below in inst.occludes:
            if inst.segment_id in position and below in position:
                masks[position[below]] |= target.masks[position[inst.segment_id]]
                order.append((position[inst.segment_id], position[below]))
    raw = oracle_raw_prediction(target, val.meta, include_crowd=False)
    return target, replace(raw, masks=masks), order


def test_oracle_pq_100_through_soe_with_the_gt_order() -> None:
    """Amodal-like GT masks (an occluded instance extends under its occluders), the drawing order as
    O in {0, 1}, equal scores: PQ 100 with the hard rule and any sigma; flipped O loses it, and so does
    the heuristic. The labels `occlusion_targets` derives from the panoptic map agree with that order
    on every pair it labels."""
    opts = SynthOptions(size=(64, 64), min_instances=4, max_instances=7, occlusion=0.8, crowd_prob=0.0)
    cases = [occluded_oracle(1, i, opts) for i in range(4)]
    assert sum(len(order) for _, _, order in cases) >= 5  # the images have occlusions
    meta = SyntheticPanoptic(1, seed=1, opts=opts, split="val").meta
    labelled = 0
    for target, raw, order in cases:
        assert raw.masks is not None
        pairs, labels = occlusion_targets(raw.masks, torch.arange(len(raw)), target.panoptic, target.instance_ids, 0.2)
        for (i, j), label in zip(pairs.tolist(), labels.tolist(), strict=True):
            assert ((i, j) in order) == (label == 1.0)
            labelled += 1
    assert labelled >= 4
    for sigma, flip in ((0.0, False), (2.0, False), (2.5, False), (4.0, False), (2.5, True)):
        results = []
        for target, raw, order in cases:
            pairs = torch.tensor([sorted(p) for p in order], dtype=torch.long).reshape(-1, 2)
            top_first = torch.tensor([float(p[0] < p[1]) for p in order])
            prob = torch.stack([top_first, 1 - top_first], dim=1).reshape(-1, 2)
            if flip:
                prob = prob.flip(1)
            fused = occlusion_fusion(
                with_relations(raw, pairs, prob), meta, stuff_area=0, sigma=sigma, unknown_erasing=False
            )
            results.append((target, fused))
        pq = pq_of(results, meta)
        if flip:
            assert pq.things.pq < 1.0
        else:
            assert pq.pq == 1.0, sigma
    # without relations the heuristic cannot recover the occluders
    plain = [(t, occlusion_fusion(r, meta, occlusion="none", stuff_area=0, unknown_erasing=False)) for t, r, _ in cases]
    assert pq_of(plain, meta).things.pq < 1.0


def test_area_threshold_in_original_pixels() -> None:
    h, w = 10, 10
    sem = torch.zeros((h, w), dtype=torch.long)
    sem[:, 5:] = 1  # two stuff classes of 50 px each
    raw = raw_with_masks([box_mask(h, w, 0, 1, 0, 1)], [0.1], sem)
    kw = {"occlusion": "none", "unknown_erasing": False, "stuff_area": 100}
    assert sum(not s.isthing for s in occlusion_fusion(raw, META, **kw).segments) == 0
    # the original was 20 x 20: 100 original pixels are 25 of these
    scaled = occlusion_fusion(raw, META, original_size=(20, 20), **kw)
    assert sum(not s.isthing for s in scaled.segments) == 2
    expected = heuristic_fusion(raw, META, stuff_area=100, original_size=(20, 20))
    assert torch.equal(scaled.panoptic, expected.panoptic) and scaled.segments == expected.segments
