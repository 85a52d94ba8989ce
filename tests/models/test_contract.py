"""The model contract, checked for every registered model (STYLE.md lesson 10, review P4).

`MODEL_CASES` holds one tiny case per name of `unipan.modeling.registry.MODELS`; a model without a
case fails `test_every_registered_model_has_a_case`. Every other test is parametrised over the
registry: a train step (finite losses, gradients reaching every trainable part), images without
instances, eval results at the input size, a batch of 2 equal to the two singles, the ground
truth through the model's own fusion giving PQ 100, a checkpoint round trip through
`Predictor.from_checkpoint`, the bad-batch errors of `PanopticModel`, and every
`configs/<model>/*.yaml` loading. The model test files keep only model-specific behaviour.

Each case starts from `configs/<model>/tiny_synth.yaml` and shrinks the widths further, so that a
model's whole case costs a few seconds on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from helpers import stuff_only, synth_batch
from torch import Tensor, nn

from unipan.config import Config, load_config
from unipan.config.models import MODEL_CONFIGS
from unipan.data.collate import collate
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.data.transforms import Normalize
from unipan.engine.checkpoint import save_checkpoint
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.modeling.meta_arch import PanopticModel, check_losses, check_results
from unipan.modeling.registry import MODELS, build_model
from unipan.predictor import Predictor
from unipan.structures import Batch, DatasetMeta, PanopticResult, RawPrediction

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "unipan" / "configs"

# the five losses of the Mask R-CNN instance branch (RPN, box head, mask head)
MASK_RCNN_LOSSES = frozenset(
    {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
)
# smaller than configs/base/tiny_mask_rcnn.yaml: a few seconds per model on one thread
TINY_MASK_RCNN = [
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
]


def semantic_channels(meta: DatasetMeta, space: str) -> int:
    """C of a semantic prediction in `space` (written out here: the test's own reference)."""
    return {"stuff": meta.num_stuff, "stuff+things": meta.num_stuff + 1, "all": meta.num_classes}[space]


def all_space_to_stuff_things(raw: RawPrediction, meta: DatasetMeta) -> RawPrediction:
    """An "all"-space oracle (S + T channels) as the heuristic fusion reads it: S + 1 channels.

    Stuff channels stay; the "things" channel is the largest thing logit, so a thing pixel keeps
    its +scale and a stuff pixel its 0. The full-image GT masks (`raw.masks`) are what the
    heuristic pastes; sem_pred is left to the fusion.
    """
    s = meta.num_stuff
    logits = raw.sem_logits
    things = logits[s:].amax(dim=0, keepdim=True) if meta.num_things else logits[:0]
    assert raw.masks is not None
    return replace(
        raw, sem_logits=torch.cat([logits[:s], things]), sem_space="stuff+things", sem_pred=None, mask_probs=None
    )


def all_space_to_stuff(raw: RawPrediction, meta: DatasetMeta) -> RawPrediction:
    """An "all"-space oracle as a stuff-only ("stuff", S channels) semantic prediction (SPINet).

    Thing pixels are left to the full-image GT masks; the fusion computes sem_pred.
    """
    assert raw.masks is not None
    return replace(raw, sem_logits=raw.sem_logits[: meta.num_stuff], sem_space="stuff", sem_pred=None, mask_probs=None)


def with_no_relations(raw: RawPrediction, meta: DatasetMeta) -> RawPrediction:
    """The "all"-space oracle with an empty occlusion relation (REFINE's fusion reads the extras)."""
    empty = torch.zeros((0, 2), dtype=torch.long)
    return replace(raw, extras={**raw.extras, "occ_pairs": empty, "occ_prob": torch.zeros((0, 2))})


def unchanged(raw: RawPrediction, meta: DatasetMeta) -> RawPrediction:
    """The "all"-space oracle is already what the model's fusion reads."""
    return raw


@dataclass(frozen=True)
class ModelCase:
    """How to run one registered model in the contract tests.

    Attributes:
        overrides: on top of configs/<name>/tiny_synth.yaml: the tiny model of every test.
        loss_names: the exact names of its training losses (the same every iteration).
        zero_without_instances: losses that must be exactly 0 on a batch with no instance.
        sem_space: the `RawPrediction.sem_space` of its raw predictions.
        raw_fields: what its raw predictions carry besides boxes/scores/labels/sem_logits:
            "mask_probs" (with `mask_resolution`), "sem_pred", and the keys of `extras`.
        mask_resolution: M of `mask_probs` FloatTensor[N, M, M].
        detect_overrides: make an untrained model keep detections (eval tests need some).
        no_detection_overrides: make it keep none.
        oracle_overrides: fusion settings that keep every GT segment (no stuff-area filter, no
            detection filtering); the oracle runs through the fusion the builder binds with them.
        oracle_input: turns `oracle_raw_prediction`'s "all"-space ground truth into what this
            model's fusion reads.
        unused_parameters: {parameter name: why it gets no gradient in training}.
    """

    overrides: list[str]
    loss_names: frozenset[str]
    zero_without_instances: frozenset[str]
    sem_space: str
    raw_fields: frozenset[str]
    mask_resolution: int
    detect_overrides: list[str]
    no_detection_overrides: list[str]
    oracle_overrides: list[str]
    oracle_input: Callable[[RawPrediction, DatasetMeta], RawPrediction]
    unused_parameters: dict[str, str] = field(default_factory=dict)


MODEL_CASES: dict[str, ModelCase] = {
    "aunet": ModelCase(
        # the paper's 28x28 MAM (as the tiny config; 14x14 is a switch, tests/models/test_aunet.py)
        overrides=[
            *TINY_MASK_RCNN,
            "model.semantic.conv_dims=32",
            "model.aunet.reweight_gn_groups=8",
            "model.aunet.mam_mask_resolution=28",
        ],
        loss_names=MASK_RCNN_LOSSES | {"loss_sem_seg"},
        zero_without_instances=frozenset({"loss_mask", "loss_box_reg"}),
        sem_space="stuff+things",
        raw_fields=frozenset(
            {"mask_probs", "sem_pred", "mask_logits", "attention_mam"} | {f"attention_p{k}" for k in range(2, 6)}
        ),
        mask_resolution=28,
        detect_overrides=["model.roi_heads.score_thresh=0.0", "model.fusion.instance_score_thresh=0.0"],
        no_detection_overrides=["model.roi_heads.score_thresh=1.0"],
        oracle_overrides=["model.fusion.stuff_area=0"],
        oracle_input=all_space_to_stuff_things,
    ),
    "refine": ModelCase(
        overrides=[
            *TINY_MASK_RCNN,
            "model.semantic.conv_dims=32",
            "model.refine.ibpp_iterations=2",
            "model.refine.semantic_embed_channels=32",
            "model.refine.refine_sem_channels=32",
            "model.occlusion.conv_channels=32",
            "model.occlusion.fc_dim=64",
        ],
        loss_names=(MASK_RCNN_LOSSES - {"loss_mask"})
        | {"loss_sem_seg", "loss_mask_t1", "loss_mask_t2", "loss_sem_seg_t1", "loss_sem_seg_t2", "loss_occlusion"},
        zero_without_instances=frozenset({"loss_box_reg", "loss_mask_t1", "loss_mask_t2", "loss_occlusion"}),
        sem_space="all",
        raw_fields=frozenset({"mask_probs", "sem_pred", "mask_logits", "occ_pairs", "occ_prob"}),
        mask_resolution=28,
        detect_overrides=["model.roi_heads.score_thresh=0.0", "model.fusion.instance_score_thresh=0.0"],
        # Unknown Erasing voids every region of an untrained (unconfident) semantic head
        no_detection_overrides=["model.roi_heads.score_thresh=1.0", "model.fusion.unknown_erasing=false"],
        # SOE (no relations among non-overlapping GT masks) and Unknown Erasing stay on
        oracle_overrides=["model.fusion.stuff_area=0"],
        oracle_input=with_no_relations,
    ),
    "panoptic_fpn": ModelCase(
        overrides=[*TINY_MASK_RCNN, "model.semantic.conv_dims=32"],
        loss_names=MASK_RCNN_LOSSES | {"loss_sem_seg"},
        zero_without_instances=frozenset({"loss_mask", "loss_box_reg"}),
        sem_space="stuff+things",
        raw_fields=frozenset({"mask_probs", "sem_pred", "mask_logits"}),
        mask_resolution=28,
        detect_overrides=["model.roi_heads.score_thresh=0.0", "model.fusion.instance_score_thresh=0.0"],
        # softmax scores never exceed 1: no detection survives
        no_detection_overrides=["model.roi_heads.score_thresh=1.0"],
        oracle_overrides=["model.fusion.stuff_area=0"],
        oracle_input=all_space_to_stuff_things,
    ),
    "upsnet": ModelCase(
        overrides=[
            *TINY_MASK_RCNN,
            "model.upsnet.semantic_mid_channels=32",
            "model.upsnet.semantic_out_channels=16",
        ],
        loss_names=MASK_RCNN_LOSSES | {"loss_sem_seg", "loss_sem_roi", "loss_panoptic"},
        zero_without_instances=frozenset({"loss_mask", "loss_box_reg", "loss_sem_roi"}),
        sem_space="all",
        raw_fields=frozenset({"mask_probs", "mask_logits"}),
        mask_resolution=28,
        detect_overrides=["model.roi_heads.score_thresh=0.0", "model.fusion.score_thresh=0.0"],
        no_detection_overrides=["model.roi_heads.score_thresh=1.0"],
        # GT boxes of overlapping instances must not be suppressed by the class-agnostic NMS
        oracle_overrides=["model.fusion.stuff_area=0", "model.fusion.filter_detections=false"],
        oracle_input=unchanged,
    ),
    # the tiny config with narrower widths, fewer anchors kept and detections
    "spatialflow": ModelCase(
        overrides=[
            "model.backbone.base_width=16",
            "model.backbone.fpn_channels=32",
            "model.spatialflow.nms_pre=100",
            "model.spatialflow.max_detections=20",
            "model.mask_head.conv_dims=32",
            "model.stuff.conv_dims=32",
        ],
        loss_names=frozenset({"loss_cls", "loss_box_reg", "loss_mask", "loss_stuff"}),
        zero_without_instances=frozenset({"loss_mask", "loss_box_reg"}),
        sem_space="stuff+things",
        raw_fields=frozenset({"mask_probs", "sem_pred", "mask_logits"}),
        mask_resolution=28,
        # an untrained classifier scores about its prior (0.01): a threshold of 0 keeps its detections
        # (the tiny config's wider tower init, 0.05, spreads the scores well above float noise)
        detect_overrides=["model.spatialflow.score_thresh=0.0", "model.fusion.instance_score_thresh=0.0"],
        # sigmoid scores never exceed 1: no detection survives
        no_detection_overrides=["model.spatialflow.score_thresh=1.0"],
        oracle_overrides=["model.fusion.stuff_area=0"],
        oracle_input=all_space_to_stuff_things,
    ),
    # 32-wide heads, 2-conv FSM towers; the paper's S stuff kernels (sem_space "stuff")
    "spinet": ModelCase(
        overrides=[
            "model.backbone.base_width=16",
            "model.backbone.fpn_channels=32",
            "model.spinet.panoptic_channels=32",
            "model.spinet.filter_channels=32",
            "model.spinet.pfg_channels=32",
            "model.spinet.triplet_dim=16",
            "model.spinet.fsm_num_convs=2",
            "model.spinet.max_detections=20",
        ],
        loss_names=frozenset(
            {"loss_cls", "loss_thing_dice", "loss_stuff_ce", "loss_stuff_dice", "loss_contour", "loss_triplet"}
        ),
        zero_without_instances=frozenset({"loss_thing_dice", "loss_triplet"}),
        sem_space="stuff",
        raw_fields=frozenset({"sem_pred"}),
        mask_resolution=0,  # full-image masks, no mask_probs
        # scores of the FCOS init (std 0.01) all lie near the prior, where float noise reorders them
        detect_overrides=[
            "model.spinet.score_thresh=0.0",
            "model.fusion.instance_score_thresh=0.0",
            "model.spinet.head_init_std=0.1",
        ],
        # sigmoid scores never exceed 1: no location yields a filter
        no_detection_overrides=["model.spinet.score_thresh=1.0"],
        oracle_overrides=["model.fusion.stuff_area=0"],
        oracle_input=all_space_to_stuff,
    ),
}


NAMES = sorted(MODELS)


def case_of(name: str) -> ModelCase:
    if name not in MODEL_CASES:
        pytest.fail(f"registered model {name!r} has no case in MODEL_CASES (tests/models/test_contract.py)")
    return MODEL_CASES[name]


def tiny_config(name: str, *extra: str) -> Config:
    return load_config(CONFIGS / name / "tiny_synth.yaml", [*case_of(name).overrides, *extra])


def tiny_model(name: str, meta: DatasetMeta, *extra: str, seed: int = 0) -> PanopticModel:
    torch.manual_seed(seed)
    model = build_model(tiny_config(name, *extra), meta)
    assert isinstance(model, PanopticModel)
    return model


def single(batch: Batch, i: int) -> Batch:
    return replace(
        batch,
        images=batch.images[i : i + 1],
        image_sizes=batch.image_sizes[i : i + 1],
        image_ids=batch.image_ids[i : i + 1],
        original_sizes=batch.original_sizes[i : i + 1] if batch.original_sizes else batch.original_sizes,
        targets=None if batch.targets is None else batch.targets[i : i + 1],
    )


def assert_valid_result(result: PanopticResult, meta: DatasetMeta) -> None:
    """Ids of the map == ids of the segments; areas are pixel counts; categories are the dataset's."""
    assert result.panoptic.dtype == torch.int32 and result.panoptic.dim() == 2
    ids = set(torch.unique(result.panoptic).tolist()) - {0}
    assert ids == {s.id for s in result.segments}
    for s in result.segments:
        assert s.category_id in meta and s.isthing == meta.isthing(s.category_id)
        assert s.area == int((result.panoptic == s.id).sum())


# --- the registry -------------------------------------------------------------------------------
def test_every_registered_model_has_a_case() -> None:
    missing = sorted(set(MODELS) - set(MODEL_CASES))
    assert not missing, f"registered models without a contract case in MODEL_CASES: {missing}"
    assert sorted(MODEL_CASES) == sorted(MODELS), "MODEL_CASES names a model that is not registered"
    # every registered model has its config schema of the same name, and vice versa
    assert sorted(MODEL_CONFIGS) == sorted(MODELS)


def test_registry_unknown_name_lists_known() -> None:
    cfg = tiny_config("panoptic_fpn") if "panoptic_fpn" in MODELS else load_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name="nope"))
    known = ".*".join(f"'{n}'" for n in NAMES)
    with pytest.raises(ValueError, match=rf"unknown model 'nope'.*{known}"):
        build_model(cfg, SyntheticPanoptic(1).meta)


# --- training -----------------------------------------------------------------------------------
def trainable_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each top-level child and each of their children that own trainable parameters."""
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, module in model.named_modules():
        if not name or name.count(".") > 1:
            continue
        params = [(f"{name}.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        if params:
            parts[name] = params
    return parts


@pytest.mark.parametrize("name", NAMES)
def test_train_step_losses_and_gradients(name: str) -> None:
    case = case_of(name)
    batch, meta = synth_batch(2, size=(64, 64))
    assert batch.targets is not None and all(len(t) > 0 for t in batch.targets)
    model = tiny_model(name, meta).train()
    losses = model(batch)
    assert isinstance(losses, dict)
    assert check_losses(losses, model) == sorted(case.loss_names)
    for key, value in losses.items():
        assert value.dim() == 0 and value.requires_grad and math.isfinite(float(value.detach())), key
    unknown_unused = set(case.unused_parameters) - {n for n, _ in model.named_parameters()}
    assert not unknown_unused, f"unused_parameters names no parameter of {name}: {sorted(unknown_unused)}"

    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        if n in case.unused_parameters:
            continue
        assert p.grad is not None, f"{n} got no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{n} has a non-finite gradient"
    for part, params in trainable_parts(model).items():
        used = [p for n, p in params if n not in case.unused_parameters]
        if not used:
            continue
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in used), f"no gradient reaches {part}"


@pytest.mark.parametrize("empty", ["one", "all"])
@pytest.mark.parametrize("name", NAMES)
def test_images_without_instances_train(name: str, empty: str) -> None:
    """A batch where one image, or every image, has no instance: the same losses, finite gradients."""
    case = case_of(name)
    batch, meta = synth_batch(2, size=(64, 64))
    batch = stuff_only(batch, meta, 1)
    if empty == "all":
        batch = stuff_only(batch, meta, 0)
    model = tiny_model(name, meta).train()
    losses = model(batch)
    assert check_losses(losses, model) == sorted(case.loss_names)
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    if empty == "all":
        for key in case.zero_without_instances:
            assert float(losses[key].detach()) == 0.0, key
    sum(losses.values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), n


@pytest.mark.parametrize("name", NAMES)
def test_bad_batches_are_named(name: str) -> None:
    batch, meta = synth_batch(2, size=(64, 64))
    assert batch.targets is not None
    model = tiny_model(name, meta).train()
    with pytest.raises(ValueError, match="needs batch.targets"):
        model(replace(batch, targets=None))
    with pytest.raises(ValueError, match=f"not padded to a multiple of {model.size_divisibility}"):
        model(replace(batch, images=batch.images[:, :, :60]))
    t0 = batch.targets[0]
    bad_sem = replace(t0, sem_seg=t0.sem_seg.clone())
    bad_sem.sem_seg[0, 0] = 77
    with pytest.raises(ValueError, match=rf"image '{t0.image_id}': sem_seg holds class index 77"):
        model(replace(batch, targets=[bad_sem, batch.targets[1]]))
    with pytest.raises(ValueError, match="target sem_seg is"):
        model(replace(batch, image_sizes=[(32, 32), batch.image_sizes[1]]))


# --- evaluation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_eval_results_at_input_size(name: str) -> None:
    """A padded batch of two images of different sizes: one valid result per image at its size."""
    case = case_of(name)
    big = SyntheticPanoptic(1, seed=3, opts=SynthOptions(size=(64, 96)), transform=Normalize())
    small = SyntheticPanoptic(1, seed=4, opts=SynthOptions(size=(40, 56)), transform=Normalize())
    meta = big.meta
    model = tiny_model(name, meta, *case.detect_overrides).eval()
    batch = replace(collate([big[0], small[0]], model.size_divisibility), targets=None)
    assert tuple(batch.images.shape[-2:]) == (64, 96)
    results = check_results(model(batch), model, batch)
    assert [r.image_size for r in results] == [(64, 96), (40, 56)]
    for result, (h, w), image_id in zip(results, batch.image_sizes, batch.image_ids, strict=True):
        assert result.image_id == image_id
        assert_valid_result(result, meta)
        raw = result.raw
        assert isinstance(raw, RawPrediction)
        assert raw.sem_space == case.sem_space
        assert raw.sem_logits.shape == (semantic_channels(meta, raw.sem_space), h, w)
        assert raw.sem_logits.is_floating_point() and bool(torch.isfinite(raw.sem_logits).all())
        fields = {"mask_probs"} if raw.mask_probs is not None else set()
        fields |= ({"sem_pred"} if raw.sem_pred is not None else set()) | set(raw.extras)
        assert fields == case.raw_fields
        if raw.sem_pred is not None:
            assert torch.equal(raw.sem_pred, raw.sem_logits.argmax(0))
        n = len(raw)
        assert n > 0  # a score threshold of 0 keeps detections even from an untrained head
        assert raw.boxes.shape == (n, 4) and raw.labels.shape == (n,) and raw.labels.dtype == torch.long
        assert int(raw.labels.min()) >= 0 and int(raw.labels.max()) < meta.num_things
        assert float(raw.boxes.min()) >= 0 and float(raw.boxes[:, 2].max()) <= w and float(raw.boxes[:, 3].max()) <= h
        if raw.mask_probs is not None:
            assert raw.mask_probs.shape == (n, case.mask_resolution, case.mask_resolution)
            assert float(raw.mask_probs.min()) >= 0 and float(raw.mask_probs.max()) <= 1
        if "mask_logits" in raw.extras:
            torch.testing.assert_close(raw.extras["mask_logits"].sigmoid(), raw.mask_probs)


@pytest.mark.parametrize("name", NAMES)
def test_eval_without_detections(name: str) -> None:
    case = case_of(name)
    batch, meta = synth_batch(1, size=(64, 64))
    model = tiny_model(name, meta, *case.no_detection_overrides, "model.fusion.stuff_area=0").eval()
    (result,) = check_results(model(replace(batch, targets=None)), model, batch)
    raw = result.raw
    assert raw is not None and len(raw) == 0 and raw.boxes.shape == (0, 4)
    if raw.mask_probs is not None:
        assert raw.mask_probs.shape == (0, case.mask_resolution, case.mask_resolution)
    assert_valid_result(result, meta)
    assert len(result.segments) > 0 and all(not s.isthing for s in result.segments)


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_two_equals_two_singles(name: str) -> None:
    """Eval on a batch of two same-size images equals each image alone.

    Tolerance: 1e-4 absolute on logits, scores and probabilities, 1e-3 pixels on boxes (float32
    convolutions may sum in another order at batch size 1 and 2); labels and counts exact.
    """
    case = case_of(name)
    batch, meta = synth_batch(2, size=(64, 96))
    batch = replace(batch, targets=None)
    model = tiny_model(name, meta, *case.detect_overrides).eval()
    pair = model.raw_predictions(batch)
    assert len(pair) == 2
    for i in range(2):
        (alone,) = model.raw_predictions(single(batch, i))
        together = pair[i]
        assert len(alone) == len(together) > 0
        assert torch.equal(alone.labels, together.labels)
        torch.testing.assert_close(alone.boxes, together.boxes, rtol=0, atol=1e-3)
        torch.testing.assert_close(alone.scores, together.scores, rtol=0, atol=1e-4)
        torch.testing.assert_close(alone.sem_logits, together.sem_logits, rtol=0, atol=1e-4)
        assert (alone.mask_probs is None) == (together.mask_probs is None)
        if alone.mask_probs is not None:
            torch.testing.assert_close(alone.mask_probs, together.mask_probs, rtol=0, atol=1e-4)
        assert alone.extras.keys() == together.extras.keys()
        for key, value in alone.extras.items():
            if isinstance(value, Tensor):
                torch.testing.assert_close(value, together.extras[key], rtol=0, atol=1e-4, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_oracle_gives_pq_100_through_the_models_fusion(name: str) -> None:
    """Ground truth through `model.fuse` (the fusion the builder bound) gives PQ exactly 100.

    The synthetic val images carry crowd regions, a void border and void object outlines, the
    cases a fusion most easily gets wrong.
    """
    case = case_of(name)
    opts = SynthOptions(size=(64, 80), crowd_prob=0.5, void_border=2, void_outline=0.5)
    val = SyntheticPanoptic(6, seed=0, opts=opts, split="val")
    meta = val.meta
    model = tiny_model(name, meta, *case.oracle_overrides).eval()
    stat = None
    for i in range(len(val)):
        target = val[i].target
        raw = case.oracle_input(oracle_raw_prediction(target, meta), meta)
        result = model.fuse(raw, meta, image_id=target.image_id)
        assert result.image_size == target.image_size
        assert_valid_result(result, meta)
        image_stat = pq_compute_single(
            target.panoptic, target.segments, result.panoptic, result.segments, meta, target.image_id
        )
        assert PQResult.from_stat(image_stat, meta).pq == 1.0, f"image {target.image_id}"
        stat = image_stat if stat is None else stat + image_stat
    pq = PQResult.from_stat(stat, meta)
    assert pq.n > 0 and pq.things.n > 0 and pq.stuff.n > 0
    assert (pq.pq, pq.things.pq, pq.stuff.pq) == (1.0, 1.0, 1.0)
    # the images exercise crowd and void
    targets = [val[i].target for i in range(len(val))]
    assert any(bool(t.crowd.any()) for t in targets) and all(bool((t.panoptic == 0).any()) for t in targets)


# --- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_through_predictor(name: str, tmp_path: Path) -> None:
    case = case_of(name)
    ds = SyntheticPanoptic(1, seed=5, opts=SynthOptions(size=(48, 80)))
    image, *_ = ds.load_raw(0)
    meta = ds.meta
    cfg = tiny_config(name, *case.detect_overrides)
    model = tiny_model(name, meta, *case.detect_overrides, seed=1).eval()
    path = tmp_path / "model.pth"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, iteration=3, cfg=cfg, meta=meta)

    loaded = Predictor.from_checkpoint(path)
    assert type(loaded.model) is type(model) and not loaded.model.training
    assert loaded.meta == meta and loaded.cfg.model == cfg.model
    ours, theirs = model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    expected = Predictor(model, meta, cfg)(image, image_id="x")
    got = loaded(image, image_id="x")
    assert got.image_size == (48, 80) == expected.image_size
    assert torch.equal(got.panoptic, expected.panoptic)
    assert got.segments == expected.segments
    assert any(s.isthing for s in got.segments)  # the instance path ran too


# --- configs ------------------------------------------------------------------------------------
CONFIG_FILES = [(name, path) for name in NAMES for path in sorted((CONFIGS / name).glob("*.yaml"))]


@pytest.mark.parametrize("name", NAMES)
def test_every_model_has_configs(name: str) -> None:
    names = {p.stem for n, p in CONFIG_FILES if n == name}
    assert "tiny_synth" in names, f"configs/{name}/tiny_synth.yaml is missing (the contract tests build on it)"


@pytest.mark.parametrize(("name", "path"), CONFIG_FILES, ids=[f"{n}/{p.name}" for n, p in CONFIG_FILES])
def test_config_loads_and_builds(name: str, path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.name == name
    assert isinstance(cfg.model, MODEL_CONFIGS[name])
    cats = [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 3)} for i in range(5)]
    with torch.device("meta"):  # the structure only: no memory, no initialisation cost
        model = build_model(cfg, DatasetMeta(cats))
    assert isinstance(model, PanopticModel)
