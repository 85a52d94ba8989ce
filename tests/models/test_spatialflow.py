"""SpatialFlow's own behaviour: parameter counts of the paper's rows, targets, mask RoIs, detections, fusion, DCN.

The contract every model keeps (train step, images without instances, eval at input size, batch =
singles, oracle PQ through the bound fusion, checkpoint round trip, bad batches, configs loading)
is checked in tests/models/test_contract.py; the sub-networks in tests/modeling/test_spatialflow_towers.py,
anchors / losses / detections / RoI levels in tests/modeling/test_retina.py, DCNv2 in
tests/modeling/test_modulated_deform_conv.py and box fill in tests/fusion/test_box_fill.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stuff_only, synth_batch
from torch import Tensor

from unipan.config import Config, load_config
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.box_fill import heuristic_fusion_box_fill
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.io import load_json, read_id_png
from unipan.modeling.layers.modulated_deform_conv import ModulatedDeformConvPack
from unipan.modeling.models.spatialflow import SpatialFlow
from unipan.modeling.registry import build_model
from unipan.structures import (
    IGNORE_LABEL,
    Batch,
    DatasetMeta,
    PanopticResult,
    PanopticTarget,
    RawPrediction,
    SegmentInfo,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "unipan" / "configs" / "spatialflow"
# narrower than the tiny config: every test here costs well under a second on one thread
SMALL = [
    "model.backbone.base_width=16",
    "model.backbone.fpn_channels=32",
    "model.spatialflow.nms_pre=100",
    "model.spatialflow.max_detections=20",
    "model.mask_head.conv_dims=32",
    "model.stuff.conv_dims=32",
]
BASELINE = [
    "model.spatialflow.stuff_convs=0",
    "model.spatialflow.mask_convs=0",
    "model.spatialflow.flow_reg_cls=false",
    "model.spatialflow.flow_reg_stuff=false",
    "model.spatialflow.flow_reg_mask=false",
    "model.spatialflow.flow_stuff_mask=false",
]


def flows_off(*flows: str) -> list[str]:
    return [f"model.spatialflow.flow_{f}=false" for f in flows]


def small_model(meta: DatasetMeta, *overrides: str, seed: int = 0) -> SpatialFlow:
    torch.manual_seed(seed)
    model = build_model(load_config(CONFIGS / "tiny_synth.yaml", [*SMALL, *overrides]), meta)
    assert isinstance(model, SpatialFlow)
    return model


def coco_sized_meta() -> DatasetMeta:
    return DatasetMeta([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80)} for i in range(133)])


def n_params(path: Path, meta: DatasetMeta, *overrides: str) -> int:
    with torch.device("meta"):
        model = build_model(load_config(path, list(overrides)), meta)
    return sum(p.numel() for p in model.parameters())


# --- the paper's rows --------------------------------------------------------------------------------
def test_r50_coco_parameter_counts_of_every_table2_row() -> None:
    """R50 COCO (80 things, 53 stuff + "other"), trunk BN frozen (buffers): each T2 row adds one switch."""
    meta = coco_sized_meta()
    path = CONFIGS / "r50_coco.yaml"
    rows = [
        (BASELINE, 41_894_458),
        (flows_off("reg_cls", "reg_stuff", "reg_mask", "stuff_mask"), 44_844_858),  # + stuff and mask towers
        (flows_off("reg_stuff", "reg_mask", "stuff_mask"), 47_205_178),  # + reg-cls flow
        (flows_off("reg_mask", "stuff_mask"), 49_565_498),  # + reg-stuff flow
        (flows_off("stuff_mask"), 50_155_578),  # + reg-mask flow
        ([], 50_745_658),  # + stuff-mask flow: SpatialFlow
    ]
    for overrides, expected in rows:
        assert n_params(path, meta, *overrides) == expected, overrides
    with torch.device("meta"):
        model = build_model(load_config(path), meta)
    assert isinstance(model, SpatialFlow)
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("stuff_head", "mask_head")}
    assert parts == {"stuff_head": 1_335_606, "mask_head": 2_643_280}
    # plain RetinaNet R50 (towers off, no stuff / mask heads): torchvision's retinanet_resnet50_fpn
    # (34,014,999 without BN affine terms) with 80 classes and P6 from C5
    retina = 41_894_458 - 1_335_606 - 2_643_280
    assert retina == 37_915_572 == 34_014_999 - 228_195 + 4_128_768


def test_cityscapes_parameter_counts_and_stuff_space() -> None:
    meta = DatasetMeta([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 8)} for i in range(19)])
    path = CONFIGS / "r50_cityscapes.yaml"
    assert n_params(path, meta) == 49_228_999  # the stuff head over all 19 classes
    assert n_params(path, meta, "model.spatialflow.stuff_space=stuff+things") == 49_228_096  # 11 + "other"


def test_paper_config_values() -> None:
    coco = load_config(CONFIGS / "r50_coco.yaml")
    m = coco.model
    assert m.backbone.fpn_levels == "p3-p7" and m.backbone.freeze_at == 2 and m.backbone.norm == "frozen_bn"
    assert (m.spatialflow.stuff_convs, m.spatialflow.mask_convs, m.spatialflow.cls_reg_convs) == (4, 1, 4)
    assert all(
        getattr(m.spatialflow, f) for f in ("flow_reg_cls", "flow_reg_stuff", "flow_reg_mask", "flow_stuff_mask")
    )
    s = m.spatialflow
    assert (s.nms_pre, s.score_thresh, s.nms_thresh, s.max_detections) == (1000, 0.05, 0.4, 100)
    assert (s.fg_iou_thresh, s.bg_iou_thresh, s.anchor_octave_base, s.mask_canonical_scale) == (0.5, 0.4, 4.0, 112)
    assert m.stuff.loss_weight == 0.25 and m.mask_head.sampling_ratio == 0
    # the released code's mask targets are thresholded at 0.5 (the spec's mask head, §3.3)
    assert m.mask_head.binary_targets
    assert dataclasses.asdict(m.fusion) == {
        "instance_score_thresh": 0.37,
        "overlap_thresh": 0.37,
        "mask_thresh": 0.5,
        "stuff_area": 4900,
        "box_fill_thresh": 0.5,
    }
    sol = coco.solver
    assert (sol.batch_size, sol.lr, sol.max_iter, sol.steps, sol.warmup_iters) == (
        8,
        0.005,
        295720,
        [236576, 280934],
        500,
    )
    assert coco.data.min_size_train == [800] and coco.data.max_size_train == 1333
    coco600 = load_config(CONFIGS / "r50_coco_600.yaml")
    assert (coco600.data.min_size_train, coco600.data.min_size_test, coco600.data.max_size_test) == ([600], 600, 1000)
    city = load_config(CONFIGS / "r50_cityscapes.yaml")
    assert city.model.stuff.loss_weight == 1.0 and city.model.spatialflow.stuff_space == "all"
    assert (city.model.fusion.overlap_thresh, city.model.fusion.stuff_area, city.model.fusion.box_fill_thresh) == (
        0.25,
        2048,
        0.5,
    )
    assert (city.solver.lr, city.solver.max_iter, city.solver.steps) == (0.0125, 65472, [41664, 56544])
    assert city.model.mask_head.binary_targets and coco600.model.mask_head.binary_targets
    tiny_cfg = load_config(CONFIGS / "tiny_synth.yaml")  # the demo's: soft targets (its header)
    assert tiny_cfg.model.fusion.box_fill_thresh == 0.0 and not tiny_cfg.model.mask_head.binary_targets


# --- training -------------------------------------------------------------------------------------------
def test_stuff_targets_crowd_as_other_and_padding_ignored() -> None:
    batch, meta = synth_batch(2, size=(60, 64), crowd_prob=1.0)
    assert batch.targets is not None and any(bool(t.crowd.any()) for t in batch.targets)
    model = small_model(meta)
    targets = model.stuff_targets(batch)
    s = meta.num_stuff
    assert tuple(targets.shape) == tuple(batch.images.shape[:1] + batch.images.shape[-2:])
    assert bool((targets[:, 60:] == IGNORE_LABEL).all())  # the padding
    for t, tgt in zip(batch.targets, targets, strict=True):
        region = tgt[:60]
        thing = (t.sem_seg >= s) & (t.sem_seg != IGNORE_LABEL)
        assert bool((region[thing] == s).all()) and bool((region[t.crowd] == s).all())
        stuff = t.sem_seg < s
        assert torch.equal(region[stuff], t.sem_seg[stuff])
    no_crowd = small_model(meta, "model.spatialflow.crowd_as_other=false").stuff_targets(batch)
    crowd = batch.targets[0].crowd
    assert bool((no_crowd[0, :60][crowd] == IGNORE_LABEL).all())


def training_mask_rois(model: SpatialFlow, batch: Batch, seed: int = 1) -> list[Tensor]:
    """The per-image RoIs the mask head trains on in one training forward of `model`."""
    seen: list[list[Tensor]] = []
    forward = model.mask_head.forward

    def spy(features, boxes, padded_size):  # type: ignore[no-untyped-def]
        seen.append([b.detach().clone() for b in boxes])
        return forward(features, boxes, padded_size)

    model.mask_head.forward = spy  # type: ignore[method-assign]
    torch.manual_seed(seed)
    model.train()(batch)
    (rois,) = seen
    return rois


def test_mask_rois_are_detections_plus_every_gt_box() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    assert batch.targets is not None
    rois = training_mask_rois(small_model(meta, "model.spatialflow.score_thresh=0.0"), batch)
    for boxes, target in zip(rois, batch.targets, strict=True):
        # every GT box is a positive RoI of itself; detections overlapping a GT box join it
        assert boxes.shape[0] > len(target) > 0
        for gt in target.boxes:
            assert bool((boxes == gt).all(dim=1).any())
    # without the GT boxes and without detections, no RoI: the loss is 0 and keeps its graph
    model = small_model(
        meta,
        "model.spatialflow.mask_gt_boxes=false",
        "model.spatialflow.score_thresh=1.0",
        "model.mask_head.binary_targets=true",  # the paper configs' targets reach the head
    ).train()
    assert model.mask_head.binary_targets
    loss = model(batch)["loss_mask"]
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_mask_rois_per_image_caps_the_positives_with_a_random_subset() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    assert batch.targets is not None

    def mask_rois(*overrides: str) -> list[Tensor]:
        return training_mask_rois(small_model(meta, "model.spatialflow.score_thresh=0.0", *overrides), batch)

    every = mask_rois()
    capped = mask_rois("model.spatialflow.mask_rois_per_image=2")
    assert min(b.shape[0] for b in every) > 2
    for all_boxes, some in zip(every, capped, strict=True):
        assert some.shape[0] == 2
        # a subset of the uncapped positives, no RoI twice
        assert all(bool((all_boxes == box).all(dim=1).any()) for box in some)
        assert not bool((some[0] == some[1]).all())
    # a cap above the count keeps every positive
    for a, b in zip(every, mask_rois("model.spatialflow.mask_rois_per_image=1000"), strict=True):
        assert torch.equal(a, b)


def test_image_without_instances() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    batch = stuff_only(stuff_only(batch, meta, 0), meta, 1)
    model = small_model(meta).train()
    losses = model(batch)
    assert float(losses["loss_mask"].detach()) == 0.0 and losses["loss_mask"].requires_grad
    assert float(losses["loss_box_reg"].detach()) == 0.0
    # the focal loss over negatives only, divided by max(#pos, 1) per image: finite and positive
    assert 0.0 < float(losses["loss_cls"].detach()) < 1e3


def test_eval_detections_respect_the_settings() -> None:
    batch, meta = synth_batch(2, size=(64, 96))
    model = small_model(
        meta,
        "model.spatialflow.max_detections=5",
        "model.spatialflow.score_thresh=0.01",
    ).eval()
    raws = model.raw_predictions(replace(batch, targets=None))
    assert any(len(r) for r in raws)
    for raw in raws:
        assert len(raw) <= 5 and bool((raw.scores > 0.01).all())
        assert raw.sem_space == "stuff+things" and raw.sem_logits.shape[0] == meta.num_stuff + 1
        assert torch.equal(raw.sem_pred, raw.sem_logits.argmax(0))


def test_stuff_and_mask_logits_shapes_in_training_and_eval() -> None:
    """Spec 7.4: stuff logits B x (S + 1) x Hp/4 x Wp/4, mask logits K x T x 28 x 28 for the K mask RoIs."""
    batch, meta = synth_batch(2, size=(64, 96))
    model = small_model(meta, "model.spatialflow.score_thresh=0.0")
    stuff_shapes: list[tuple[int, ...]] = []
    mask_shapes: list[tuple[int, ...]] = []
    rois: list[int] = []

    def on_stuff(module: torch.nn.Module, args: tuple[object, ...], output: Tensor) -> None:
        stuff_shapes.append(tuple(output.shape))

    def on_mask(module: torch.nn.Module, args: tuple[object, ...], output: tuple[Tensor, Tensor]) -> None:
        boxes = args[1]
        assert isinstance(boxes, list)
        rois.append(sum(int(b.shape[0]) for b in boxes))
        mask_shapes.append(tuple(output[0].shape))

    hooks = [model.stuff_head.register_forward_hook(on_stuff), model.mask_head.register_forward_hook(on_mask)]
    try:
        torch.manual_seed(1)
        model.train()(batch)
        results = model.eval()(replace(batch, targets=None))
    finally:
        for hook in hooks:
            hook.remove()
    s, t = meta.num_stuff, meta.num_things
    assert tuple(batch.images.shape[-2:]) == (64, 96)
    assert stuff_shapes == [(2, s + 1, 16, 24)] * 2
    k_train, k_eval = rois
    assert k_train > 0 and k_eval == sum(len(r.raw) for r in results if r.raw is not None) > 0
    assert mask_shapes == [(k_train, t, 28, 28), (k_eval, t, 28, 28)]
    for result in results:
        assert result.raw is not None and result.raw.mask_probs is not None
        own = (len(result.raw), 28, 28)  # the detection's own class
        assert tuple(result.raw.extras["mask_logits"].shape) == tuple(result.raw.mask_probs.shape) == own


def test_all_space_stuff_head_voids_thing_channels_at_fusion() -> None:
    batch, meta = synth_batch(1, size=(64, 64))
    model = small_model(
        meta, "model.spatialflow.stuff_space=all", "model.spatialflow.score_thresh=1.0", "model.fusion.stuff_area=0"
    ).eval()
    assert model.stuff_head.num_classes == meta.num_classes
    with torch.no_grad():
        for p in model.stuff_head.predictor.parameters():
            p.zero_()
        model.stuff_head.predictor.bias[meta.num_stuff] = 1.0  # the first thing class wins everywhere
    (result,) = model(replace(batch, targets=None))
    assert result.raw is not None and result.raw.sem_space == "all"
    assert result.segments == [] and int(result.panoptic.abs().sum()) == 0
    losses = model.train()(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_stuff"}


def test_dcn_variant_trains() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    dcn = [f"model.spatialflow.{k}=true" for k in ("dcn_backbone", "dcn_cls", "dcn_stuff", "dcn_mask")]
    model = small_model(meta, *dcn).train()
    trunk = model.backbone.trunk
    convs = [block.conv2 for layer in (trunk.layer2, trunk.layer3, trunk.layer4) for block in layer]
    assert convs and all(isinstance(c, ModulatedDeformConvPack) for c in convs)
    assert not isinstance(trunk.layer1[0].conv2, ModulatedDeformConvPack)
    losses = model(batch)
    sum(losses.values()).backward()
    assert all(c.conv_offset.weight.grad is not None for c in convs)
    assert all(f.weight.grad is not None and f.out_channels == 27 for f in model.towers.cls_flows)


# --- fusion -------------------------------------------------------------------------------------------
def test_builder_binds_the_box_fill_fusion() -> None:
    _, meta = synth_batch(1)
    cfg: Config = load_config(CONFIGS / "tiny_synth.yaml", [*SMALL, "model.fusion.box_fill_thresh=0.5"])
    model = build_model(cfg, meta)
    assert model.fuse.func is heuristic_fusion_box_fill  # type: ignore[attr-defined]
    assert model.fuse.keywords == dataclasses.asdict(cfg.model.fusion)  # type: ignore[attr-defined]


def stuff_strip_and_one_thing(meta: DatasetMeta) -> RawPrediction:
    """A 16 x 20 SpatialFlow prediction: stuff class 0 on rows 0-2 (60 pixels), "other" elsewhere.

    One detection (thing 0, score 0.9) with the box x 0..10, y 0..8 (80 pixels) whose mask is its
    rows 4-7 (40 pixels): row 3 of the box is "other" (void after fusion) and rows 0-2 are stuff.
    """
    s = meta.num_stuff
    sem_logits = torch.zeros(s + 1, 16, 20)
    sem_logits[s] = 1.0
    sem_logits[0, 0:3] = 2.0
    masks = torch.zeros(1, 16, 20, dtype=torch.bool)
    masks[0, 4:8, 0:10] = True
    return RawPrediction(
        boxes=torch.tensor([[0.0, 0.0, 10.0, 8.0]]),
        scores=torch.tensor([0.9]),
        labels=torch.tensor([0]),
        sem_logits=sem_logits,
        masks=masks,
        sem_pred=sem_logits.argmax(0),
    )


def predict_with_raw(model: SpatialFlow, raw: RawPrediction, original_size: tuple[int, int]) -> PanopticResult:
    """The model's eval forward on a 1-image batch of `original_size`, its network replaced by `raw`."""
    h, w = (int(v) for v in raw.sem_logits.shape[-2:])
    model.raw_predictions = lambda batch: [raw]  # type: ignore[method-assign]
    batch = Batch(torch.zeros(1, 3, 32, 32), [(h, w)], ["x"], original_sizes=[original_size])
    (result,) = model.eval()(batch)
    return result


def test_fusion_measures_the_stuff_area_in_original_pixels() -> None:
    """stuff_area 240 original pixels over a 16 x 20 input: 240 * 320 / (H * W) input pixels, kept when <= 60.

    From 32 x 40 the threshold is exactly 60 (kept: the comparison is >=); from 32 x 39 it is
    61.5 and the 60-pixel stuff strip turns void, which frees half of the detection's box for box
    fill (0.5 inclusive): the thing then covers all 80 pixels of its box. Through the model's
    eval forward (batch.original_sizes) and its bound fusion called directly.
    """
    meta = SyntheticPanoptic(1).meta
    model = small_model(meta, "model.fusion.stuff_area=240", "model.fusion.box_fill_thresh=0.5")
    no_fill = small_model(meta, "model.fusion.stuff_area=240")
    thing, stuff = meta.thing_dataset_id(0), meta.stuff_dataset_id(0)
    raw = stuff_strip_and_one_thing(meta)

    def areas(result: PanopticResult) -> list[tuple[int, int, int]]:
        """(id, category_id, area) per segment, the areas checked against the map."""
        for seg in result.segments:
            assert seg.area == int((result.panoptic == seg.id).sum())
        return [(seg.id, seg.category_id, seg.area) for seg in result.segments]

    kept = predict_with_raw(model, raw, (32, 40))
    assert kept.image_id == "x" and kept.raw is raw
    assert areas(kept) == [(1, thing, 40), (2, stuff, 60)]
    assert bool((kept.panoptic[0:3] == 2).all()) and bool((kept.panoptic[3] == 0).all())  # 10 void of 80: no fill
    assert areas(predict_with_raw(model, raw, (33, 40))) == [(1, thing, 40), (2, stuff, 60)]  # 58.2

    dropped = predict_with_raw(model, raw, (32, 39))
    assert areas(dropped) == [(1, thing, 80)]
    assert bool((dropped.panoptic[0:8, 0:10] == 1).all())  # box fill took the box's 40 void pixels
    assert int((dropped.panoptic == 0).sum()) == 16 * 20 - 80  # the rest of the strip stays void
    assert areas(predict_with_raw(no_fill, raw, (32, 39))) == [(1, thing, 40)]  # box fill off: the mask only
    assert areas(predict_with_raw(model, raw, (31, 40))) == [(1, thing, 80)]  # 61.9

    # the bound fusion: no original size, or the input size itself, means 240 input pixels
    assert areas(model.fuse(raw, meta, image_id="x", original_size=(32, 40))) == areas(kept)
    assert areas(model.fuse(raw, meta, image_id="x", original_size=(32, 39))) == areas(dropped)
    for same in (None, (16, 20)):
        assert areas(model.fuse(raw, meta, image_id="x", original_size=same)) == [(1, thing, 80)]
    assert areas(model.fuse(raw, meta, original_size=(64, 80))) == [(1, thing, 40), (2, stuff, 60)]  # 15


def to_stuff_things(raw: RawPrediction, meta: DatasetMeta, target: PanopticTarget) -> RawPrediction:
    """The "all"-space oracle as SpatialFlow's COCO fusion reads it: stuff channels and "other".

    GT-void pixels predict "other" (they would otherwise tie at 0 and go to stuff class 0), so that
    the fusion leaves them void and box fill has pixels to fill.
    """
    s = meta.num_stuff
    other = raw.sem_logits[s:].amax(dim=0, keepdim=True)
    other[0][target.panoptic == 0] = 1.0
    return replace(raw, sem_logits=torch.cat([raw.sem_logits[:s], other]), sem_space="stuff+things")


def oracle_pq(model: SpatialFlow, targets: list[PanopticTarget], meta: DatasetMeta) -> tuple[float, list[Tensor]]:
    """PQ of the ground truth through the model's fusion, and the fused id maps."""
    stat = None
    maps = []
    for target in targets:
        raw = to_stuff_things(oracle_raw_prediction(target, meta), meta, target)
        result = model.fuse(raw, meta, image_id=target.image_id)
        maps.append(result.panoptic)
        image_stat = pq_compute_single(
            target.panoptic, target.segments, result.panoptic, result.segments, meta, target.image_id
        )
        stat = image_stat if stat is None else stat + image_stat
    assert stat is not None
    return PQResult.from_stat(stat, meta).pq, maps


def test_oracle_pq_100_with_and_without_box_fill_on_synthetic_val() -> None:
    """Box fill takes only GT-void pixels from the ground truth, which PQ does not count."""
    opts = SynthOptions(size=(64, 80), crowd_prob=0.0, void_border=2, void_outline=0.5)
    val = SyntheticPanoptic(6, seed=0, opts=opts, split="val")
    meta = val.meta
    targets = [val[i].target for i in range(len(val))]
    fused = {}
    for box_fill in (0.0, 0.5, 0.01):
        model = small_model(meta, "model.fusion.stuff_area=0", f"model.fusion.box_fill_thresh={box_fill}")
        pq, fused[box_fill] = oracle_pq(model, targets, meta)
        assert pq == 1.0, box_fill
    changed = 0
    for target, plain, *filled in zip(targets, fused[0.0], fused[0.5], fused[0.01], strict=True):
        gt_void = target.panoptic == 0
        assert torch.equal(plain == 0, gt_void)  # without box fill every GT-void pixel stays void
        for other in filled:
            diff = other != plain
            assert bool(gt_void[diff].all())
            changed += int(diff.sum())
    assert changed > 0


@pytest.mark.parametrize("box_fill", [0.0, 0.5])
def test_oracle_pq_100_on_real_coco_images(shared_data: Path, box_fill: float) -> None:
    root = shared_data / "panopticapi"
    gt = load_json(root / "sample_data" / "panoptic_examples.json")
    meta = DatasetMeta(load_json(root / "panoptic_coco_categories.json"), name="coco")
    targets = []
    for ann in gt["annotations"][:3]:
        panoptic = read_id_png(root / "sample_data" / "panoptic_examples" / ann["file_name"])[::2, ::2]
        segments = [
            SegmentInfo(s["id"], s["category_id"], meta.isthing(s["category_id"]), bool(s["iscrowd"]))
            for s in ann["segments_info"]
        ]
        panoptic_t = torch.from_numpy(np.ascontiguousarray(panoptic))
        present = set(torch.unique(panoptic_t).tolist())
        targets.append(
            PanopticTarget.from_panoptic(panoptic_t, [s for s in segments if s.id in present], meta, ann["file_name"])
        )
    model = small_model(meta, "model.fusion.stuff_area=0", f"model.fusion.box_fill_thresh={box_fill}")
    pq, _ = oracle_pq(model, targets, meta)
    assert pq == 1.0
