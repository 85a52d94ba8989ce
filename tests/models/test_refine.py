"""REFINE's own behaviour: IBPP iterations, gradient routes of the named losses, switches, configs.

The contract every model keeps is checked in tests/models/test_contract.py; the parts on their own
in tests/modeling/test_roi_flatten.py, tests/modeling/test_ibpp.py, tests/fusion/test_occlusion.py
and tests/fusion/test_unknown_erasing.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import stuff_only, synth_batch

from unipan.config import load_config
from unipan.modeling.models.refine import REFINE
from unipan.modeling.registry import build_model
from unipan.structures import DatasetMeta

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "unipan" / "configs" / "refine" / "tiny_synth.yaml"
SMALL = [
    "model.backbone.base_width=16",
    "model.backbone.fpn_channels=32",
    "model.rpn.pre_nms_top_n_train=100",
    "model.rpn.post_nms_top_n_train=50",
    "model.rpn.pre_nms_top_n_test=100",
    "model.rpn.post_nms_top_n_test=50",
    "model.roi_heads.box_head_dim=64",
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.detections_per_img=20",
    "model.mask_head.conv_dims=32",
    "model.semantic.conv_dims=32",
    "model.refine.semantic_embed_channels=32",
    "model.refine.refine_sem_channels=32",
    "model.occlusion.conv_channels=32",
    "model.occlusion.fc_dim=64",
]
DETECT = ["model.roi_heads.score_thresh=0.0", "model.fusion.instance_score_thresh=0.0"]


def tiny(meta: DatasetMeta, *extra: str, seed: int = 0) -> REFINE:
    torch.manual_seed(seed)
    model = build_model(load_config(TINY, [*SMALL, *extra]), meta)
    assert isinstance(model, REFINE)
    return model


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_iterations_losses_and_outputs(iterations: int) -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = tiny(meta, f"model.refine.ibpp_iterations={iterations}", *DETECT).train()
    assert (model.instance_branch.mask_head is None) == (iterations > 0)
    losses = model(batch)
    assert isinstance(losses, dict)
    per_iteration = {f"loss_{kind}_t{t}" for kind in ("mask", "sem_seg") for t in range(1, iterations + 1)}
    base = {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_sem_seg"}
    assert set(losses) == base | per_iteration | {"loss_occlusion"} | ({"loss_mask"} if iterations == 0 else set())
    model.eval()
    (result, _) = model(replace(batch, targets=None))
    raw = result.raw
    assert raw is not None and raw.sem_space == "all" and raw.sem_logits.shape == (meta.num_classes, 64, 64)
    assert raw.mask_probs is not None and raw.mask_probs.shape == (len(raw), 28, 28)
    pairs, prob = raw.extras["occ_pairs"], raw.extras["occ_prob"]
    assert pairs.shape == prob.shape and pairs.shape[1] == 2
    assert bool(((prob >= 0) & (prob <= 1)).all())


def grad_sum(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else float(g.abs().sum()) for g in got)


def test_gradient_routes_of_the_named_losses() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    model = tiny(meta, "model.refine.ibpp_iterations=2").train()
    losses = model(batch)
    assert model.ibpp is not None and model.occlusion_head is not None
    mask_head_1 = list(model.ibpp.mask_heads[0].parameters())
    base_sem = list(model.semantic_head.parameters())
    # the semantic loss of iteration 1 trains H_ins^(1) (through ROI-Flatten of its masks)
    assert grad_sum(losses["loss_sem_seg_t1"], mask_head_1) > 0
    # the mask loss of iteration 1 trains the base semantic head (through Eq. 2-3's projections)
    assert grad_sum(losses["loss_mask_t1"], base_sem) > 0
    # the occlusion loss trains its head only (detached inputs)
    occ_params = list(model.occlusion_head.parameters())
    if float(losses["loss_occlusion"].detach()) > 0:
        assert grad_sum(losses["loss_occlusion"], occ_params) > 0
    others = [p for n, p in model.named_parameters() if not n.startswith("occlusion_head.")]
    assert grad_sum(losses["loss_occlusion"], others) == 0.0
    # the semantic loss of P^(2) does not reach the box classifier (detached flatten scores)
    box_predictor = list(model.instance_branch.box_head.predictor.parameters())
    assert grad_sum(losses["loss_sem_seg_t2"], box_predictor) == 0.0


def test_stage_loss_weights_scale_each_iteration() -> None:
    batch, meta = synth_batch(1, size=(64, 64))
    model = tiny(meta, "model.refine.ibpp_iterations=2").train()
    torch.manual_seed(3)
    full = model(batch)
    model.stage_loss_weights = [1.0, 0.1]
    model.semantic_loss_weight = 0.25
    torch.manual_seed(3)
    scaled = model(batch)
    torch.testing.assert_close(scaled["loss_mask_t2"], full["loss_mask_t2"] * 0.2)
    torch.testing.assert_close(scaled["loss_sem_seg_t2"], full["loss_sem_seg_t2"] * 0.1)
    torch.testing.assert_close(scaled["loss_sem_seg"], full["loss_sem_seg"] * 0.5)


def test_binary_mask_targets_reach_the_ibpp_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.mask_head.binary_targets` thresholds the targets of every IBPP iteration's loss."""
    import unipan.modeling.models.refine as refine_module

    original = refine_module.mask_rcnn_targets
    seen: list[torch.Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(refine_module, "mask_rcnn_targets", spy)
    batch, meta = synth_batch(1, size=(64, 64))
    losses = {}
    for binary in (False, True):
        model = tiny(meta, "model.refine.ibpp_iterations=2", f"model.mask_head.binary_targets={binary}").train()
        assert model.binary_mask_targets is binary
        seen.clear()
        torch.manual_seed(3)
        losses[binary] = model(batch)
        assert len(seen) == 1 and seen[0].numel()
        values = set(seen[0].unique().tolist())
        assert values <= {0.0, 1.0} if binary else values - {0.0, 1.0}
    assert float(losses[True]["loss_mask_t1"].detach()) != float(losses[False]["loss_mask_t1"].detach())


def test_images_without_instances_have_zero_instance_losses() -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    batch = stuff_only(stuff_only(batch, meta, 0), meta, 1)
    losses = tiny(meta).train()(batch)
    assert isinstance(losses, dict)
    for key in ("loss_mask_t1", "loss_mask_t2", "loss_occlusion"):
        assert float(losses[key].detach()) == 0.0 and losses[key].requires_grad


def test_switches_and_their_errors() -> None:
    _, meta = synth_batch(1, size=(64, 64))
    # Table 3 base: no IBPP, no occlusion head, no UE: no embedding either (no unused parameters)
    base = tiny(
        meta,
        "model.refine.ibpp_iterations=0",
        "model.occlusion.enabled=false",
        "model.fusion.occlusion=none",
        "model.fusion.unknown_erasing=false",
    )
    assert base.embedding is None and base.ibpp is None and base.occlusion_head is None
    with pytest.raises(ValueError, match="model.fusion.occlusion=learned needs the occlusion head"):
        tiny(meta, "model.occlusion.enabled=false")
    with pytest.raises(ValueError, match="semantic_embed_channels=16 must equal model.backbone.fpn_channels=32"):
        tiny(meta, "model.refine.semantic_embed_channels=16")
    with pytest.raises(ValueError, match="stage_loss_weights has 1 values for 2"):
        tiny(meta, "model.refine.ibpp_iterations=2", "model.refine.stage_loss_weights=[1.0]")
    with pytest.raises(ValueError, match="mask_output must be one of"):
        tiny(meta, "model.refine.mask_output=max")
    only = tiny(meta, "model.occlusion.occlusion_only=true")
    trainable = {n.split(".")[0] for n, p in only.named_parameters() if p.requires_grad}
    assert trainable == {"occlusion_head"}
    shared = tiny(meta, "model.refine.share_weights=true")
    assert shared.ibpp is not None and len(shared.ibpp.mask_heads) == 1
    # the mean of the iterations' masks
    mean = tiny(meta, "model.refine.mask_output=mean", *DETECT).eval()
    batch, _ = synth_batch(1, size=(64, 64))
    (result,) = mean(replace(batch, targets=None))
    raw = result.raw
    assert raw is not None and raw.mask_probs is not None
    torch.testing.assert_close(raw.extras["mask_logits"].sigmoid(), raw.mask_probs)


TABLE_ROWS = {
    "table3_base": [
        "model.refine.ibpp_iterations=0",
        "model.occlusion.enabled=false",
        "model.fusion.occlusion=none",
        "model.fusion.unknown_erasing=false",
    ],
    "table3_ibpp": [
        "model.occlusion.enabled=false",
        "model.fusion.occlusion=none",
        "model.fusion.unknown_erasing=false",
    ],
    "table3_soe": ["model.fusion.unknown_erasing=false"],
    "table3_ue": [],
    "table4_ibpp1": ["model.refine.ibpp_iterations=1"],
    "table5_shr": ["model.occlusion.enabled=false", "model.fusion.occlusion=shr"],
    "table5_ocfusion": ["model.occlusion.inputs=[mask,feature]", "model.fusion.sigma=0"],
    "table5_strong": ["model.occlusion.inputs=[mask,feature,label]", "model.fusion.sigma=0"],
    "table5_soe_2": ["model.fusion.sigma=2.0"],
    "table6_mask": ["model.occlusion.inputs=[mask]", "model.fusion.sigma=0"],
}


@pytest.mark.parametrize("row", sorted(TABLE_ROWS))
def test_every_table_row_is_a_config(row: str) -> None:
    cfg = load_config(REPO / "unipan" / "configs" / "refine" / "r50_coco.yaml", TABLE_ROWS[row])
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 3)} for i in range(5)]
    with torch.device("meta"):
        model = build_model(cfg, DatasetMeta(cats))
    assert isinstance(model, REFINE)
