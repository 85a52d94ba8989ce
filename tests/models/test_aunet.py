"""AUNet's own behaviour: PAM / MAM values, gradient paths, Table 1 rows, Panoptic FPN equality, sizes, configs.

The contract every model keeps (train step, images without instances, eval at input size, batch
= singles, oracle PQ, checkpoint round trip, bad batches, configs loading, registry) is checked in
tests/models/test_contract.py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import synth_batch
from torch import Tensor, nn

import unipan.modeling.models.aunet as aunet_module
from unipan.config import Config, load_config
from unipan.config.models import AUNetConfig, PanopticFPNConfig
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.modeling.heads.aunet_attention import (
    AttentionModule,
    BackgroundReweight,
    HiddenMaskPredictor,
    mask_guide,
)
from unipan.modeling.layers.roi_upsample import multiscale_roi_upsample
from unipan.modeling.models.aunet import TABLE1_ROWS, AUNet
from unipan.modeling.registry import MODELS, build_model
from unipan.structures import DatasetMeta

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "unipan" / "configs"
# the contract case's sizes (a few seconds per test on one thread)
SMALL = [
    "model.backbone.base_width=16",
    "model.backbone.fpn_channels=32",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi_heads.box_head_dim=64",
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.detections_per_img=20",
    "model.mask_head.conv_dims=32",
    "model.semantic.conv_dims=32",
    "model.aunet.reweight_gn_groups=8",
]
PAM_LEVELS = ("p2", "p3", "p4", "p5")


def small_config(*overrides: str) -> Config:
    return load_config(CONFIGS / "aunet" / "tiny_synth.yaml", [*SMALL, *overrides])


def small_model(meta: DatasetMeta, *overrides: str, seed: int = 0) -> AUNet:
    torch.manual_seed(seed)
    model = build_model(small_config(*overrides), meta)
    assert isinstance(model, AUNet)
    return model


def panoptic_fpn_config(cfg: AUNetConfig) -> PanopticFPNConfig:
    """Panoptic FPN with every value it shares with an AUNet config."""
    return PanopticFPNConfig(
        backbone=cfg.backbone,
        rpn=cfg.rpn,
        roi_heads=cfg.roi_heads,
        mask_head=cfg.mask_head,
        semantic=cfg.semantic,
        fusion=cfg.fusion,
    )


# --- PAM and MAM, by hand --------------------------------------------------------------------------
def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_pam_by_hand() -> None:
    """Eq. 1-2 on a 2-channel guide and a 4-channel map, then Eq. 3-4, against arithmetic on floats."""
    pam = AttentionModule(guide_channels=2, channels=4, reweight=True, reweight_groups=1)
    with torch.no_grad():
        pam.conv1.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]).view(2, 2, 1, 1))
        pam.conv1.bias.copy_(torch.tensor([0.1, -0.3]))
        pam.conv2.weight.copy_(torch.tensor([0.7, -1.2]).view(1, 2, 1, 1))
        pam.conv2.bias.copy_(torch.tensor([0.2]))
        assert pam.reweight is not None
        pam.reweight.conv.weight.copy_(torch.eye(4).flip(0).view(4, 4, 1, 1) * 0.5)  # c -> 0.5 * S'[3 - c]
        pam.reweight.norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        pam.reweight.norm.bias.copy_(torch.tensor([0.0, 0.1, 0.0, -0.1]))
    guide = torch.tensor([[[[1.0, -2.0]], [[0.5, 1.0]]]])  # [1, 2, 1, 2]: two pixels
    s = torch.arange(8, dtype=torch.float32).view(1, 4, 1, 2) - 3
    out, attention = pam(s, guide)

    expected_m = []
    for px in range(2):
        p0, p1 = float(guide[0, 0, 0, px]), float(guide[0, 1, 0, px])
        h0 = max(0.0, 1.0 * p0 - 1.0 * p1 + 0.1)
        h1 = max(0.0, 0.5 * p0 + 2.0 * p1 - 0.3)
        expected_m.append(1 - sigmoid(0.7 * h0 - 1.2 * h1 + 0.2))
    torch.testing.assert_close(attention, torch.tensor(expected_m).view(1, 1, 1, 2))
    s1 = [[float(s[0, c, 0, px]) * (1 + expected_m[px]) for px in range(2)] for c in range(4)]
    gap = [sum(row) / 2 for row in s1]
    z = [0.5 * gap[3 - c] for c in range(4)]
    mean = sum(z) / 4
    var = sum((v - mean) ** 2 for v in z) / 4
    gamma, beta = [1.0, 2.0, 0.5, 1.0], [0.0, 0.1, 0.0, -0.1]
    n = [sigmoid((z[c] - mean) / math.sqrt(var + 1e-5) * gamma[c] + beta[c]) for c in range(4)]
    expected = torch.tensor([[s1[c][px] * n[c] for px in range(2)] for c in range(4)]).view(1, 4, 1, 2)
    torch.testing.assert_close(out, expected)

    # without the reweighting the output is S * (1 + M')
    plain = AttentionModule(guide_channels=2, channels=4, reweight=False)
    plain.load_state_dict({k: v for k, v in pam.state_dict().items() if not k.startswith("reweight")})
    out, _ = plain(s, guide)
    torch.testing.assert_close(out, torch.tensor(s1).view(1, 4, 1, 2))


def test_mam_by_hand() -> None:
    """A 2x2 mask feature over a 4x4 box, RoIUpsampled (Eq. 5-6) and used as MAM's guide."""
    y = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # box from 1 to 5 px at stride 1, aligned=False, 2 points per bin: points at 1.5, 2.5, 3.5, 4.5,
    # each split half-half between its two pixels, then divided by value = 0.5 (Eq. 6): weight 1 each
    guide = mask_guide(
        y, [torch.tensor([[1.0, 1.0, 5.0, 5.0]])], [(8, 8)], (8, 8), (8, 8), sampling_ratio=2, normalize=True
    )
    q = y[0, 0] / 4  # R(p_g): a quarter of the bin's value
    # counts[y, bin]: points of that bin reaching pixel y, with weight 1 each (columns alike)
    counts = torch.tensor([[0, 0], [1, 0], [2, 0], [1, 1], [0, 2], [0, 1], [0, 0], [0, 0]], dtype=torch.float32)
    expected = torch.einsum("yp,pq,xq->yx", counts, q, counts)
    torch.testing.assert_close(guide[0, 0], expected)
    assert float(guide.sum()) == pytest.approx(4 * float(y.sum()))  # x4 at phase 0 (Eq. 6's maximum)

    mam = AttentionModule(guide_channels=1, channels=2, reweight=False)
    with torch.no_grad():
        mam.conv1.weight.fill_(2.0)
        mam.conv1.bias.fill_(-1.0)
        mam.conv2.weight.fill_(1.5)
        mam.conv2.bias.fill_(0.5)
    s = torch.randn(1, 2, 8, 8)
    out, attention = mam(s, guide)
    m = 1 - torch.sigmoid(1.5 * torch.relu(2.0 * guide - 1.0) + 0.5)
    torch.testing.assert_close(attention, m)
    torch.testing.assert_close(out, s * (1 + m))
    # pixels under no RoI get the attention of a zero guide
    assert float(attention[0, 0, 7, 7].detach()) == pytest.approx(1 - sigmoid(0.5))


def test_mask_guide_levels_are_upsampled_and_summed() -> None:
    """Per-level RoIUpsample, bilinear to stride 4, sum; overlapping RoIs add up."""
    torch.manual_seed(0)
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [6.0, 6.0, 22.0, 26.0], [0.0, 0.0, 120.0, 100.0]])]
    feats = torch.randn(3, 2, 4, 4)
    shapes = [(32, 32), (16, 16), (8, 8), (4, 4)]
    # canonical size 32 on P4: the first two boxes go to P3, the third to P5
    mapping = {"canonical_scale": 32, "canonical_level": 4}
    got = mask_guide(feats, boxes, shapes, (128, 128), (32, 32), sampling_ratio=2, normalize=True, **mapping)
    levels = multiscale_roi_upsample(feats, boxes, shapes, (128, 128), 2, **mapping)
    want = sum(F.interpolate(m, size=(32, 32), mode="bilinear", align_corners=False) for m in levels)
    torch.testing.assert_close(got, want)
    assert [float(m.abs().sum()) > 0 for m in levels] == [False, True, False, True]
    single = mask_guide(
        feats, boxes, shapes, (128, 128), (32, 32), sampling_ratio=2, normalize=True, per_level=False, **mapping
    )
    assert single.shape == got.shape and not torch.allclose(single, got)


def test_reweight_needs_four_channels_per_group() -> None:
    with pytest.raises(ValueError, match="reweight_gn_groups"):
        BackgroundReweight(32, 16)
    BackgroundReweight(32, 8)


def test_hidden_mask_predictor_keeps_the_logits_and_parameters() -> None:
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    torch.manual_seed(0)
    predictor = MaskRCNNPredictor(8, 8, 3)
    wrapped = HiddenMaskPredictor(predictor)
    assert wrapped.state_dict().keys() == predictor.state_dict().keys()
    x = torch.randn(5, 8, 7, 7)
    torch.testing.assert_close(wrapped(x), predictor(x))
    hidden = wrapped.take_hidden()
    assert hidden.shape == (5, 8, 14, 14) and float(hidden.detach().min()) >= 0
    with pytest.raises(RuntimeError, match="before the mask head ran"):
        wrapped.take_hidden()


# --- the model ----------------------------------------------------------------------------------------
def test_without_pam_and_mam_it_is_panoptic_fpn() -> None:
    """Same parameters (names, order, values from the same seed) and the same losses, gradients and outputs."""
    batch, meta = synth_batch(2, size=(64, 64), crowd_prob=1.0)
    # crowd pixels: the semantic targets must treat them as Panoptic FPN's do
    assert batch.targets is not None and any(bool(t.crowd.any()) for t in batch.targets)
    cfg = small_config(*TABLE1_ROWS["e2e"])
    torch.manual_seed(0)
    ours = build_model(cfg, meta)
    torch.manual_seed(0)
    theirs = MODELS["panoptic_fpn"](panoptic_fpn_config(cfg.model), meta)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]

    torch.manual_seed(1)
    la = ours.train()(batch)
    torch.manual_seed(1)
    lb = theirs.train()(batch)
    assert isinstance(la, dict) and isinstance(lb, dict) and la.keys() == lb.keys()
    assert all(torch.equal(la[k], lb[k]) for k in la)
    sum(la.values()).backward()
    sum(lb.values()).backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad is None) == (grads[name].grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name].grad), name

    test_batch = replace(batch, targets=None)
    ours.eval()
    theirs.eval()
    for x, y in zip(ours.raw_predictions(test_batch), theirs.raw_predictions(test_batch), strict=True):  # type: ignore[attr-defined]
        assert torch.equal(x.sem_logits, y.sem_logits) and torch.equal(x.boxes, y.boxes)
        assert torch.equal(x.scores, y.scores) and torch.equal(x.labels, y.labels)
        assert x.extras.keys() == y.extras.keys() == {"mask_logits"}
        assert x.mask_probs is not None and y.mask_probs is not None and torch.equal(x.mask_probs, y.mask_probs)
    # the weights of one load into the other
    theirs.load_state_dict(ours.state_dict())


def semantic_grads(model: AUNet, batch: Any) -> dict[str, bool]:
    """Which parts the semantic loss alone reaches (a non-zero gradient)."""
    losses = model.train()(batch)
    assert isinstance(losses, dict)
    losses["loss_sem_seg"].backward()
    parts = {
        "rpn_conv": model.instance_branch.rpn.head.conv,
        "rpn_outputs": nn.ModuleList(
            [model.instance_branch.rpn.head.cls_logits, model.instance_branch.rpn.head.bbox_pred]
        ),
        "box_head": model.instance_branch.box_head,
        "mask_convs": model.instance_branch.mask_head.convs,
        "mask_deconv": model.instance_branch.mask_head.predictor.conv5_mask,
        "mask_logits": model.instance_branch.mask_head.predictor.mask_fcn_logits,
        "backbone": model.backbone,
    }
    return {
        name: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in part.parameters())
        for name, part in parts.items()
    }


@pytest.mark.parametrize(
    ("pam", "mam", "resolution"), [(False, False, 28), (True, False, 28), (False, True, 28), (True, True, 14)]
)
def test_semantic_loss_reaches_rpn_and_mask_head_only_through_the_attentions(
    pam: bool, mam: bool, resolution: int
) -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = small_model(
        meta,
        f"model.aunet.pam={str(pam).lower()}",
        f"model.aunet.mam={str(mam).lower()}",
        f"model.aunet.mam_mask_resolution={resolution}",
    )
    reached = semantic_grads(model, batch)
    assert reached["backbone"]
    assert reached["rpn_conv"] == pam
    assert not reached["rpn_outputs"] and not reached["box_head"] and not reached["mask_logits"]
    assert reached["mask_convs"] == mam
    assert reached["mask_deconv"] == (mam and resolution == 28)


def test_mam_reads_positive_rois_in_training_and_kept_detections_at_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    batch, meta = synth_batch(2, size=(64, 96))
    model = small_model(
        meta,
        "model.roi_heads.score_thresh=0.0",
        "model.fusion.instance_score_thresh=0.2",
        "model.aunet.mam_mask_resolution=28",
    )
    calls: list[tuple[list[Tensor], Tensor]] = []

    def spy(features: Tensor, boxes: list[Tensor], *args: Any, **kwargs: Any) -> Tensor:
        calls.append((list(boxes), features))
        return mask_guide(features, boxes, *args, **kwargs)

    monkeypatch.setattr(aunet_module, "mask_guide", spy)
    branch = model.instance_branch
    original_run = branch.run
    runs: list[Any] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        runs.append(original_run(*args, **kwargs))
        return runs[-1]

    monkeypatch.setattr(branch, "run", run)
    model.train()(batch)
    (boxes, feats), out = calls[-1], runs[-1]
    assert all(torch.equal(x, y) for x, y in zip(boxes, out.mask_rois, strict=True))
    assert feats.shape == (sum(len(b) for b in boxes), 32, 28, 28) and feats.requires_grad
    assert sum(len(b) for b in boxes) > 0
    model.eval()
    raws = model.raw_predictions(replace(batch, targets=None))
    (boxes, feats), out = calls[-1], runs[-1]
    dropped = kept_any = False
    for kept, det, raw in zip(boxes, out.detections, raws, strict=True):
        keep = det["scores"] >= 0.2
        assert torch.equal(kept, det["boxes"][keep])
        dropped, kept_any = dropped or bool((~keep).any()), kept_any or bool(keep.any())
        assert set(raw.extras) == {"mask_logits", "attention_mam", *(f"attention_{n}" for n in PAM_LEVELS)}
    assert feats.shape[0] == sum(len(b) for b in boxes)
    assert dropped and kept_any  # the threshold did select


@pytest.mark.parametrize("row", list(TABLE1_ROWS))
def test_every_table1_row_builds_and_trains(row: str) -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = small_model(meta, *TABLE1_ROWS[row])
    on = dict(item.removeprefix("model.aunet.").split("=") for item in TABLE1_ROWS[row])
    assert (model.pam is not None) == (on["pam"] == "true") and (model.mam is not None) == (on["mam"] == "true")
    attentions = [m for m in (*(model.pam.values() if model.pam is not None else ()), model.mam) if m is not None]
    assert all((m.reweight is not None) == (on["reweight"] == "true") for m in attentions)  # type: ignore[union-attr]
    assert (model.bg_backbone is not None) == (row == "sep")
    losses = model.train()(batch)
    assert isinstance(losses, dict)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()


def test_sep_shares_no_parameter_between_the_branches() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = small_model(meta, *TABLE1_ROWS["sep"])
    assert model.bg_backbone is not None
    fg = {id(p) for p in model.backbone.parameters()}
    assert fg.isdisjoint(id(p) for p in model.bg_backbone.parameters())
    losses = model.train()(batch)
    assert isinstance(losses, dict)
    losses["loss_sem_seg"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None for p in model.bg_backbone.parameters())
    model.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if k != "loss_sem_seg").backward()
    assert all(p.grad is None for p in model.bg_backbone.parameters())
    assert all(p.grad is None for p in model.semantic_head.parameters())


def test_bg_classes_all_predicts_every_class() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = small_model(meta, "model.aunet.bg_classes=all", "model.roi_heads.score_thresh=0.0")
    assert model.semantic_head.num_classes == meta.num_classes and model.sem_space == "all"
    losses = model.train()(batch)
    assert isinstance(losses, dict) and math.isfinite(float(losses["loss_sem_seg"].detach()))
    raws = model.eval().raw_predictions(replace(batch, targets=None))
    assert raws[0].sem_space == "all" and raws[0].sem_logits.shape[0] == meta.num_classes
    results = model(replace(batch, targets=None))
    assert isinstance(results, list) and len(results) == 2
    # the ground truth in the "all" space through the model's fusion gives PQ 100
    val = SyntheticPanoptic(3, seed=0, opts=SynthOptions(size=(64, 80), crowd_prob=0.5, void_border=2), split="val")
    oracle = small_model(val.meta, "model.aunet.bg_classes=all", "model.fusion.stuff_area=0")
    assert oracle.fuse.func is heuristic_fusion  # type: ignore[attr-defined]
    for i in range(len(val)):
        t = val[i].target
        result = oracle.fuse(oracle_raw_prediction(t, val.meta), val.meta, image_id=t.image_id)
        stat = pq_compute_single(t.panoptic, t.segments, result.panoptic, result.segments, val.meta, t.image_id)
        assert PQResult.from_stat(stat, val.meta).pq == 1.0


def test_bad_switches_are_named() -> None:
    _, meta = synth_batch(1)
    for override, key in [
        ("model.aunet.bg_classes=things", "bg_classes"),
        ("model.aunet.mam_mask_resolution=7", "mam_mask_resolution"),
        ("model.aunet.mam_levels=p2", "mam_levels"),
        ("model.aunet.pam_levels=[p6]", "pam_levels"),
        ("model.aunet.reweight_gn_groups=16", "reweight_gn_groups"),
    ]:
        with pytest.raises(ValueError, match=key):
            small_model(meta, override)


# --- sizes and configs ----------------------------------------------------------------------------
def coco_meta() -> DatasetMeta:
    return DatasetMeta([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80)} for i in range(133)])


def count(cfg: Any, meta: DatasetMeta) -> int:
    with torch.device("meta"):
        model = build_model(cfg, meta)
    return sum(p.numel() for p in model.parameters())


def test_r50_coco_parameter_count() -> None:
    """AUNet R50 COCO = Panoptic FPN R50 + 4 PAMs + MAM: 5 x (256^2 + 256 + 256 + 1 + 128^2 + 2 x 128) = 413,445."""
    meta = coco_meta()
    cfg = load_config(CONFIGS / "aunet" / "r50_coco.yaml")
    pfpn = count(replace(cfg, model=panoptic_fpn_config(cfg.model)), meta)
    assert count(cfg, meta) == pfpn + 413_445
    assert 5 * (256 * 256 + 256 + 256 + 1 + 128 * 128 + 2 * 128) == 413_445
    assert count(load_config(CONFIGS / "aunet" / "r50_coco.yaml", TABLE1_ROWS["e2e"]), meta) == pfpn
    backbone = sum(p.numel() for p in aunet_module.build_backbone(cfg.model.backbone).parameters())
    assert count(load_config(CONFIGS / "aunet" / "r50_coco.yaml", TABLE1_ROWS["sep"]), meta) == pfpn + backbone
    # PAM alone without the reweighting: 4 x (256^2 + 256 + 256 + 1)
    assert count(load_config(CONFIGS / "aunet" / "r50_coco.yaml", TABLE1_ROWS["PAM"]), meta) == pfpn + 4 * 66_049


def test_paper_config_values() -> None:
    coco = load_config(CONFIGS / "aunet" / "r50_coco.yaml").model
    assert (coco.aunet.pam, coco.aunet.mam, coco.aunet.reweight, coco.aunet.bg_classes) == (
        True,
        True,
        True,
        "stuff+things",
    )
    lambdas = (coco.aunet.rpn_loss_weight, coco.aunet.rcnn_loss_weight, coco.aunet.mask_loss_weight)
    assert (*lambdas, coco.semantic.loss_weight) == (1.0, 1.0, 1.0, 0.3)
    assert coco.aunet.mam_mask_resolution == 28 and coco.aunet.roi_upsample_normalize
    city = load_config(CONFIGS / "aunet" / "r50_cityscapes.yaml")
    a = city.model.aunet
    assert (a.pam, a.mam, a.bg_classes) == (True, False, "all")
    assert (a.rpn_loss_weight, a.rcnn_loss_weight, a.mask_loss_weight, city.model.semantic.loss_weight) == (
        1,
        0.75,
        1,
        1,
    )
    assert city.solver.lr == 0.01 and city.solver.weight_decay == 4e-5 and city.data.crop_size == [512, 1024]
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 8)} for i in range(19)]
    with torch.device("meta"):
        model = build_model(city, DatasetMeta(cats))
    assert isinstance(model, AUNet) and model.semantic_head.num_classes == 19 and model.mam is None
