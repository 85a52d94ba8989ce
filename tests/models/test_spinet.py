"""SPINet beyond the contract: parameter budget, the oracle through the single-shot conv, the mask
pasting, and every switch of Tables 3-5 (the contract tests live in test_contract.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import synth_batch

from unipan.config import load_config
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.modeling.layers.dynamic_conv import single_shot_conv
from unipan.modeling.models.spinet import SPINet, fuse_kernels, image_prediction, paste_mask_logits
from unipan.modeling.registry import build_model
from unipan.structures import DatasetMeta, PanopticResult, PanopticTarget, SegmentInfo, masks_to_boxes

CONFIGS = Path(__file__).resolve().parents[2] / "unipan" / "configs" / "spinet"
TINY = [
    "model.backbone.base_width=16",
    "model.backbone.fpn_channels=32",
    "model.spinet.panoptic_channels=32",
    "model.spinet.filter_channels=32",
    "model.spinet.pfg_channels=32",
    "model.spinet.triplet_dim=16",
    "model.spinet.fsm_num_convs=2",
]


def cityscapes_meta() -> DatasetMeta:
    cats = [{"id": i + 1, "name": f"stuff{i}", "isthing": 0} for i in range(11)]
    cats += [{"id": 24 + i, "name": f"thing{i}", "isthing": 1} for i in range(8)]
    return DatasetMeta(cats, name="cityscapes-sized")


def n_params(*overrides: str) -> int:
    cfg = load_config(CONFIGS / "r50_cityscapes.yaml", list(overrides))
    with torch.device("meta"):  # structure only
        model = build_model(cfg, cityscapes_meta())
    return sum(p.numel() for p in model.parameters())


# --- parameters (spec 3.1; paper Tables 2, 3, 5) -----------------------------------------------------
def test_parameter_budget_r50_cityscapes() -> None:
    full = n_params()
    assert 41.8e6 <= full <= 42.6e6, full  # paper: 42.2M
    assert 41.8e6 <= n_params("model.backbone.stem=deeplab") <= 42.6e6
    # the auxiliary heads: a 1x1 conv 256 -> 16 and a 256 -> 256 FC (training only)
    no_aux = n_params("model.spinet.contour_weight=0", "model.spinet.triplet_weight=0")
    assert full - no_aux == (256 * 16 + 16) + (256 * 256 + 256)
    # Table 5: a second Panoptic-Feature generator adds 4.4M (46.6 vs 42.2)
    separate = n_params("model.spinet.integrated=false")
    assert 4.3e6 <= separate - full <= 4.5e6, separate - full
    # k = 1 would leave the model far short of the paper's count
    assert n_params("model.spinet.kernel_size=1") < 37.5e6


# --- the oracle through the real op -------------------------------------------------------------------
def oracle_units(
    target: PanopticTarget, meta: DatasetMeta, things_channel: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GT regions as a one-hot Panoptic-Feature: (masks [D, h, w], thing labels [N], N).

    Channels: each instance, each crowd thing region (as an instance, as the fusion oracle), each
    stuff class, then (with `things_channel`) the union of the things.
    """
    regions, labels = list(target.masks), target.labels.tolist()
    for seg in target.segments:
        if seg.iscrowd and meta.isthing(seg.category_id):
            regions.append(target.panoptic == seg.id)
            labels.append(meta.thing_index(seg.category_id))
    n = len(regions)
    sem = target.sem_seg
    regions += [sem == j for j in range(meta.num_stuff)]
    if things_channel:
        regions.append(torch.stack(regions[:n]).any(0) if n else torch.zeros_like(sem, dtype=torch.bool))
    return torch.stack(regions), torch.tensor(labels, dtype=torch.long), n


def centre_tap_kernels(channels: list[int], d: int, k: int = 3, scale: float = 10.0) -> torch.Tensor:
    kernels = torch.zeros(len(channels), d, k, k)
    for row, c in enumerate(channels):
        kernels[row, c, k // 2, k // 2] = scale
    return kernels


def run_oracle(
    model: SPINet, target: PanopticTarget, phi_target: PanopticTarget, scale: int, dedup: str, duplicates: int = 0
) -> tuple[float, torch.Tensor, torch.Tensor, PanopticResult]:
    """PQ of the oracle through single_shot_conv + SPINet's tail + its fusion; its masks, the GT
    regions of `phi_target` and the result."""
    meta = model.meta
    things_channel = model.sem_space == "stuff+things"
    units, labels, n = oracle_units(phi_target, meta, things_channel)
    d = units.shape[0]
    phi = units.float()[None] * 2 - 1  # +1 in the region, -1 elsewhere (void: -1 everywhere)
    rows = list(range(n)) * (1 + duplicates)
    scores = torch.cat([torch.full((n,), 1.0 - 0.1 * r) for r in range(1 + duplicates)])
    thing_k = centre_tap_kernels(rows, d)
    stuff_k = centre_tap_kernels(list(range(n, d)), d)
    thing_labels = labels.repeat(1 + duplicates)
    if dedup == "kernel_fusion":  # the model's order: fuse, convolve, then no further dedup
        thing_k, _, scores, thing_labels = fuse_kernels(thing_k, None, scores, thing_labels, 0.9)
        rows = rows[: len(thing_k)]
    (out,) = single_shot_conv(phi, [thing_k], stuff_k)
    raw = image_prediction(
        out[: len(rows)],
        out[len(rows) :],
        scores,
        thing_labels,
        target.image_size,
        scale=scale,
        mask_logit_thresh=0.0,
        dedup="none" if dedup == "kernel_fusion" else dedup,
        nms_thresh=0.6,
        max_detections=100,
        sem_space=model.sem_space,
    )
    result = model.fuse(raw, meta, image_id=target.image_id)
    stat = pq_compute_single(target.panoptic, target.segments, result.panoptic, result.segments, meta, target.image_id)
    masks = raw.dense_masks()
    assert raw.masks is None and masks is not None  # crops on their boxes, never full-image masks
    return PQResult.from_stat(stat, meta).pq, masks[:n], units[:n], result


def tiny_spinet(meta: DatasetMeta, *extra: str) -> SPINet:
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "tiny_synth.yaml", [*TINY, "model.fusion.stuff_area=0", *extra])
    model = build_model(cfg, meta)
    assert isinstance(model, SPINet)
    return model.eval()


def max_same_class_box_iou(target: PanopticTarget) -> float:
    from torchvision.ops import box_iou

    iou = box_iou(target.boxes, target.boxes)
    same = target.labels[:, None] == target.labels[None, :]
    iou = iou.masked_fill(~same | torch.eye(len(target), dtype=torch.bool), 0)
    return float(iou.max()) if len(target) else 0.0


@pytest.mark.parametrize("things_channel", [False, True])
def test_oracle_through_the_single_shot_conv_gives_pq_100(things_channel: bool) -> None:
    """One-hot Panoptic-Feature, centre-tap kernels x10, no bias, stride 1: PQ 100 through the tail.

    Duplicated kernels (each instance 3 more times, lower scores) are removed by the fusion's overlap
    rule (dedup none), by kernel fusion (the copies merge into one kernel per instance), and by the
    class-wise box NMS (on images whose same-class GT boxes overlap less than the NMS threshold,
    where NMS cannot hit a true instance).
    """
    opts = SynthOptions(size=(64, 80), crowd_prob=0.5, void_border=2, void_outline=0.5)
    val = SyntheticPanoptic(6, seed=0, opts=opts, split="val")
    model = tiny_spinet(val.meta, f"model.spinet.stuff_things_channel={str(things_channel).lower()}")
    nms_checked = 0
    for i in range(len(val)):
        target = val[i].target
        pq, masks, gt, _ = run_oracle(model, target, target, scale=1, dedup="none")
        assert pq == 1.0, target.image_id
        assert torch.equal(masks, gt)  # sign(10 * (2 onehot - 1)) is the region itself
        assert run_oracle(model, target, target, scale=1, dedup="none", duplicates=3)[0] == 1.0
        pq, fused_masks, _, _ = run_oracle(model, target, target, scale=1, dedup="kernel_fusion", duplicates=3)
        assert pq == 1.0 and torch.equal(fused_masks, gt)
        if max_same_class_box_iou(target) <= 0.6:
            assert run_oracle(model, target, target, scale=1, dedup="box_nms", duplicates=3)[0] == 1.0
            nms_checked += 1
    assert nms_checked >= 2


def test_oracle_at_stride_4_flips_only_block_corner_pixels() -> None:
    """4x4-blocky GT, Panoptic-Feature at stride 4: bilinear upsampling changes only corner pixels.

    Every GT segment is still found (IoU > 0.9, same category); the flipped corners of things fall
    to the stuff argmax, whose all-equal logits there make a few-pixel segment of stuff class 0.
    """
    small = SyntheticPanoptic(3, seed=1, opts=SynthOptions(size=(40, 48), min_thing_size=6), split="val")
    meta = small.meta
    model = tiny_spinet(meta)
    for i in range(len(small)):
        t4 = small[i].target
        pan = t4.panoptic.repeat_interleave(4, 0).repeat_interleave(4, 1)
        segments = [SegmentInfo(s.id, s.category_id, s.isthing, s.iscrowd) for s in t4.segments]
        target = PanopticTarget.from_panoptic(pan, segments, meta, image_id=t4.image_id)
        _, masks, _, result = run_oracle(model, target, t4, scale=4, dedup="none")
        units, _, n = oracle_units(target, meta, False)
        ys, xs = torch.nonzero((masks != units[:n]).any(0), as_tuple=True)
        assert bool(((ys % 4 == 0) | (ys % 4 == 3)).all()) and bool(((xs % 4 == 0) | (xs % 4 == 3)).all())
        matched = set()
        for seg in target.segments:
            if seg.iscrowd:
                continue
            gt = target.panoptic == seg.id
            ious = {
                r.id: float(((result.panoptic == r.id) & gt).sum() / ((result.panoptic == r.id) | gt).sum())
                for r in result.segments
                if r.category_id == seg.category_id
            }
            best = max(ious, key=ious.__getitem__)
            assert ious[best] > 0.9, (t4.image_id, seg.id)
            matched.add(best)
        assert all(r.area <= 16 for r in result.segments if r.id not in matched and not r.isthing)


def test_fuse_kernels_by_hand() -> None:
    """Same-class near-copies average into the higher-scoring kernel; another class or direction stays."""
    e = torch.eye(4)
    a, a2, c = e[0], e[0] + 0.1 * e[1], e[2]  # cos(a, a2) = 0.995
    kernels = torch.stack([a2, a, a, c]).reshape(4, 1, 2, 2)
    bias = torch.tensor([1.0, 3.0, 5.0, 7.0])
    scores = torch.tensor([0.8, 0.9, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])  # the second `a` is another class
    fused, fused_bias, s, lab = fuse_kernels(kernels, bias, scores, labels, 0.9)
    assert torch.equal(s, torch.tensor([0.9, 0.7, 0.6])) and torch.equal(lab, torch.tensor([0, 1, 0]))
    assert torch.allclose(fused.reshape(3, 4), torch.stack([(a + a2) / 2, a, c]))
    assert fused_bias is not None and torch.allclose(fused_bias, torch.tensor([2.0, 5.0, 7.0]))
    # Panoptic FCN's rule: b joins a; d's first match is b, itself a duplicate, so d is dropped
    # although d is not similar to a
    b = torch.tensor([1.0, 0.4, 0.0, 0.0])
    d = torch.tensor([1.0, 0.9, 0.0, 0.0])
    unit = torch.nn.functional.normalize(torch.stack([a, b, d]), dim=1)
    assert (unit @ unit.T)[0, 1] >= 0.9 > (unit @ unit.T)[0, 2] and (unit @ unit.T)[1, 2] >= 0.9
    three = torch.stack([a, b, d]).reshape(3, 1, 2, 2)
    one_class = torch.zeros(3, dtype=torch.long)
    fused, none_bias, s, _ = fuse_kernels(three, None, torch.tensor([0.9, 0.8, 0.7]), one_class, 0.9)
    assert none_bias is None and torch.equal(s, torch.tensor([0.9])) and torch.allclose(fused.flatten(), (a + b) / 2)
    empty = fuse_kernels(kernels[:0], None, scores[:0], labels[:0], 0.9)
    assert empty[0].shape == (0, 1, 2, 2) and empty[2].numel() == 0


def test_fuse_kernels_equals_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 2, 3, 3, generator=g)
    # 30 kernels near 6 directions, so that thresholds between 0.5 and 0.99 merge some of them
    kernels = base[torch.randint(0, 6, (30,), generator=g)] + 0.4 * torch.randn(30, 2, 3, 3, generator=g)
    bias = torch.randn(30, generator=g)
    scores = torch.rand(30, generator=g)
    labels = torch.randint(0, 2, (30,), generator=g)
    order = sorted(range(30), key=lambda i: -float(scores[i]))
    flat = [kernels[i].flatten() for i in order]

    def similar(i: int, j: int, thresh: float) -> bool:
        same = int(labels[order[i]]) == int(labels[order[j]])
        return i == j or (same and float(F.cosine_similarity(flat[i], flat[j], dim=0)) >= thresh)

    for thresh in (0.5, 0.8, 0.9, 0.99):
        first = [next(i for i in range(j + 1) if similar(i, j, thresh)) for j in range(30)]
        kept = [j for j in range(30) if first[j] == j]
        got, got_bias, got_scores, got_labels = fuse_kernels(kernels, bias, scores, labels, thresh)
        assert len(got) == len(kept)
        assert len(kept) < 30 or thresh == 0.99  # the loose thresholds merge some kernels
        for row, i in enumerate(kept):
            members = [order[j] for j in range(30) if first[j] == i]
            assert torch.allclose(got[row], kernels[members].mean(dim=0), atol=1e-6)
            assert got_bias is not None and torch.allclose(got_bias[row], bias[members].mean(), atol=1e-6)
            assert float(got_scores[row]) == float(scores[order[i]]) and int(got_labels[row]) == int(labels[order[i]])


def test_paste_mask_logits_equals_full_upsampling() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, 11, generator=g) - 1.0
    logits[0] = -1.0  # an empty mask
    boxes = masks_to_boxes(logits >= 0)
    for size in [(36, 44), (33, 41)]:
        crops, got_boxes = paste_mask_logits(logits, boxes, size, 0.0)
        full = F.interpolate(logits[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
        want = full[:, : size[0], : size[1]] >= 0
        assert torch.equal(got_boxes, masks_to_boxes(want))
        for crop, (x0, y0, x1, y1), mask in zip(crops, got_boxes.long().tolist(), want, strict=True):
            assert torch.equal(crop, mask[y0:y1, x0:x1])  # the whole mask: its box is tight
        assert crops[0].shape == (0, 0)


@pytest.mark.parametrize("dedup", ["box_nms", "none"])
def test_image_prediction_drops_empty_masks_before_the_top_k(dedup: str) -> None:
    """A candidate whose stride-4 mask has no cell at the threshold is no detection and takes no
    place among `max_detections`, however high it scores."""
    logits = torch.full((4, 8, 8), -5.0)
    logits[1, 1:3, 1:3] = 5.0  # two real masks, far apart
    logits[3, 5:7, 5:7] = 5.0
    scores = torch.tensor([0.99, 0.6, 0.98, 0.5])  # the empty ones (0, 2) score highest
    raw = image_prediction(
        logits,
        torch.zeros(2, 8, 8),
        scores,
        torch.zeros(4, dtype=torch.long),
        (32, 32),
        scale=4,
        mask_logit_thresh=0.0,
        dedup=dedup,
        nms_thresh=0.6,
        max_detections=2,
        sem_space="stuff",
    )
    assert raw.scores.tolist() == pytest.approx([0.6, 0.5])
    assert raw.mask_crops is not None and all(c.numel() > 0 for c in raw.mask_crops)
    assert raw.boxes[:, 0].tolist() == [4.0, 20.0]  # cells 1 and 5, bilinear edge at the cell border


def test_paste_mask_logits_survives_nan_logits() -> None:
    """NaN logits (a diverged model) drop their pixels' rows and columns instead of raising."""
    logits = torch.full((1, 6, 6), -1.0)
    logits[0, 2, 1:4] = 3.0  # a bar: its box is cells x 1..3, y 2
    logits[0, 4, :] = float("nan")  # mixed into the lower pixels of every column of the bar's region
    crops, boxes = paste_mask_logits(logits, torch.tensor([[1.0, 2.0, 4.0, 3.0]]), (24, 24), 0.0)
    x0, y0, x1, y1 = boxes[0].long().tolist()
    assert tuple(crops[0].shape) == (y1 - y0, x1 - x0)


# --- switches ------------------------------------------------------------------------------------------
SWITCHES = {
    # Table 3 rows (the full row is the contract case)
    "t3_none": (
        ["model.spinet.multiclass_dice=false", "model.spinet.contour_weight=0", "model.spinet.triplet_weight=0"],
        {"loss_cls", "loss_thing_dice", "loss_stuff_ce"},
    ),
    "t3_mcd_inter": (
        ["model.spinet.triplet_weight=0"],
        {"loss_cls", "loss_thing_dice", "loss_stuff_ce", "loss_stuff_dice", "loss_contour"},
    ),
    "t3_inter_intra": (
        ["model.spinet.multiclass_dice=false"],
        {"loss_cls", "loss_thing_dice", "loss_stuff_ce", "loss_contour", "loss_triplet"},
    ),
    # Table 4: P.F.G P2-6 / F.S.M P3-7, and P3-7 / P3-7 on the RetinaNet pyramid with P6 from P5
    "t4_pfg26_fsm37": (
        [
            "model.backbone.fpn_levels=p2s8-p7",
            "model.spinet.pfg_levels=[p2,p3,p4,p5,p6]",
            "model.spinet.fsm_levels=[p3,p4,p5,p6,p7]",
        ],
        None,
    ),
    "t4_p37_kernel_fusion": (
        [
            "model.backbone.fpn_levels=p3-p7",
            "model.backbone.p6_from=p5",  # spec G4: AdelaiDet's P6 reads P5
            "model.spinet.pfg_levels=[p3,p4,p5,p6,p7]",
            "model.spinet.fsm_levels=[p3,p4,p5,p6,p7]",
            "model.spinet.dedup=kernel_fusion",
            "model.spinet.kernel_bias=true",
        ],
        None,
    ),
    # Table 5: separate Panoptic-Features; S + 1 stuff kernels; Table 1's deformable trunk; the rest
    "t5_separate_things_channel": (["model.spinet.integrated=false", "model.spinet.stuff_things_channel=true"], None),
    "deform_bias_nodedup": (
        [
            "model.spinet.deformable=true",
            "model.spinet.kernel_bias=true",
            "model.spinet.dedup=none",
            "model.spinet.triplet_negatives=same_class",
            "model.backbone.stem=deeplab",
            "model.spinet.bootstrap_ratio=1.0",
        ],
        None,
    ),
}
ALL_LOSSES = {"loss_cls", "loss_thing_dice", "loss_stuff_ce", "loss_stuff_dice", "loss_contour", "loss_triplet"}


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switches_build_train_and_predict(switch: str) -> None:
    overrides, loss_names = SWITCHES[switch]
    batch, meta = synth_batch(2, size=(64, 64))
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "tiny_synth.yaml", [*TINY, *overrides, "model.spinet.score_thresh=0.0"])
    model = build_model(cfg, meta).train()
    losses = model(batch)
    assert isinstance(losses, dict) and set(losses) == (loss_names or ALL_LOSSES)
    sum(losses.values()).backward()
    assert all(bool(torch.isfinite(v.detach())) for v in losses.values())
    model.eval()
    results = model(replace(batch, targets=None))
    assert isinstance(results, list) and len(results) == 2
    raw = results[0].raw
    assert raw is not None and raw.mask_crops is not None and len(raw.mask_crops) == len(raw)
    masks = raw.dense_masks()
    assert masks is not None and masks.shape == (len(raw), 64, 64)
    channels = meta.num_stuff + int(cfg.model.spinet.stuff_things_channel)
    assert raw.sem_logits.shape == (channels, 64, 64)
    assert raw.sem_space == ("stuff+things" if cfg.model.spinet.stuff_things_channel else "stuff")


def test_losses_are_float32_under_autocast() -> None:
    """Spec §7: the losses in float32 under mixed precision (bfloat16 autocast on the CPU here;
    float16 on a GPU, where sums over an image overflow), each with a finite gradient."""
    batch, meta = synth_batch(2, size=(64, 64))
    model = tiny_spinet(meta, "model.spinet.integrated=false").train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch)
    assert isinstance(losses, dict)
    assert {"loss_cls", "loss_thing_dice", "loss_stuff_ce", "loss_contour", "loss_triplet"} <= set(losses)
    for name, loss in losses.items():
        assert loss.dtype == torch.float32 and bool(torch.isfinite(loss)), name
    sum(losses.values()).backward()  # type: ignore[union-attr]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_triplet_loss_needs_two_instances() -> None:
    batch, meta = synth_batch(1, size=(64, 64))
    model = tiny_spinet(meta).train()
    assert batch.targets is not None
    target = batch.targets[0]
    one = replace(target, masks=target.masks[:1], labels=target.labels[:1])
    phi = torch.randn(1, 32, 16, 16, requires_grad=True)
    masks4 = F.avg_pool2d(target.masks.float()[None], 4)[0]
    loss = model._triplet_loss(phi, [one], [masks4[:1]])
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert phi.grad is not None and bool(torch.isfinite(phi.grad).all())
    two = model._triplet_loss(phi, [target], [masks4])
    assert float(two.detach()) > 0


def test_bad_switches_are_named() -> None:
    _, meta = synth_batch(1, size=(64, 64))
    with pytest.raises(ValueError, match="model.spinet.dedup 'mask' unknown"):
        tiny_spinet(meta, "model.spinet.dedup=mask")
    with pytest.raises(ValueError, match=r"filter sampling module inputs \['p9'\]"):
        tiny_spinet(meta, "model.spinet.fsm_levels=[p9]")
    with pytest.raises(ValueError, match=r"model.spinet.scale_ranges must be one \[lo, hi\] per FSM level"):
        tiny_spinet(meta, "model.spinet.scale_ranges=[[1,64],[32,128]]")
    with pytest.raises(ValueError, match="ascending without gaps"):
        tiny_spinet(meta, "model.spinet.scale_ranges=[[1,32],[40,128],[64,256],[128,512]]")


def test_class_and_contour_focal_settings_are_separate() -> None:
    batch, meta = synth_batch(2, size=(64, 64))

    def losses(*overrides: str) -> dict[str, float]:
        model = tiny_spinet(meta, *overrides).train()
        torch.manual_seed(1)  # the same sampled filters in every call
        return {k: float(v.detach()) for k, v in model(batch).items()}

    base = losses()
    cls = losses("model.spinet.focal_gamma=1.0", "model.spinet.focal_alpha=0.5")
    contour = losses("model.spinet.contour_focal_gamma=1.0", "model.spinet.contour_focal_alpha=0.5")
    assert cls["loss_cls"] != base["loss_cls"] and cls["loss_contour"] == base["loss_contour"]
    assert contour["loss_contour"] != base["loss_contour"] and contour["loss_cls"] == base["loss_cls"]
    for name in ("loss_thing_dice", "loss_stuff_ce", "loss_triplet"):
        assert cls[name] == base[name] == contour[name]
