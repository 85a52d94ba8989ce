"""Area thresholds are in original-image pixels: every fusion scales them to its input size.

A stuff region of 1200 input pixels on a 40 x 60 input resized from a 20 x 30 file covers 300 file
pixels: a 500-pixel stuff area keeps it without `original_size` and drops it with one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.settings import PanopticHeadSettings
from unipan.fusion.upsnet_head import upsnet_fusion
from unipan.modeling.meta_arch import PanopticModel
from unipan.segments import area_at_input_size
from unipan.structures import Batch, DatasetMeta, PanopticResult, RawPrediction

META = DatasetMeta(
    [
        {"id": 21, "name": "road", "isthing": 0},
        {"id": 23, "name": "sky", "isthing": 0},
        {"id": 7, "name": "car", "isthing": 1},
    ],
    name="area",
)
H, W = 40, 60


def stuff_map() -> torch.Tensor:
    """Class index map: sky (1) in the top 20 rows = 1200 px, road (0) below = 1200 px."""
    sem = torch.zeros((H, W), dtype=torch.long)
    sem[:20] = 1
    return sem


def raw_for(space: str) -> RawPrediction:
    channels = META.num_stuff + (1 if space == "stuff+things" else META.num_things)
    return RawPrediction(
        boxes=torch.zeros((0, 4)),
        scores=torch.zeros(0),
        labels=torch.zeros(0, dtype=torch.long),
        sem_logits=F.one_hot(stuff_map(), channels).permute(2, 0, 1).float() * 10,
        masks=torch.zeros((0, H, W), dtype=torch.bool),
        sem_space=space,  # type: ignore[arg-type]
    )


def stuff_ids(result: PanopticResult) -> set[int]:
    return {s.category_id for s in result.segments if not s.isthing}


def test_area_at_input_size() -> None:
    assert area_at_input_size(4096, (800, 1067), None) == 4096.0
    assert area_at_input_size(4096, (480, 640), (480, 640)) == 4096.0
    assert area_at_input_size(4096, (800, 1067), (480, 640)) == pytest.approx(4096 * 800 * 1067 / (480 * 640))
    assert area_at_input_size(2048, (512, 1024), (1024, 2048)) == pytest.approx(512.0)


def test_heuristic_fusion_stuff_area_is_in_original_pixels() -> None:
    raw = raw_for("stuff+things")
    assert stuff_ids(heuristic_fusion(raw, META, stuff_area=500)) == {21, 23}
    assert stuff_ids(heuristic_fusion(raw, META, stuff_area=500, original_size=(H, W))) == {21, 23}
    assert stuff_ids(heuristic_fusion(raw, META, stuff_area=500, original_size=(20, 30))) == set()
    # a file 2x the input: 1200 input pixels are 4800 file pixels
    assert stuff_ids(heuristic_fusion(raw, META, stuff_area=4800, original_size=(80, 120))) == {21, 23}
    assert stuff_ids(heuristic_fusion(raw, META, stuff_area=4801, original_size=(80, 120))) == set()


def test_upsnet_fusion_stuff_area_is_in_original_pixels() -> None:
    raw = raw_for("all")
    settings = PanopticHeadSettings(stuff_area=500)
    assert stuff_ids(upsnet_fusion(raw, META, settings)) == {21, 23}
    assert stuff_ids(upsnet_fusion(raw, META, settings, original_size=(20, 30))) == set()
    big = PanopticHeadSettings(stuff_area=4800)
    assert stuff_ids(upsnet_fusion(raw, META, big, original_size=(80, 120))) == {21, 23}


class Recorder(PanopticModel):
    """Records what `predict` hands its fusion."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

        def fuse(raw: RawPrediction, meta: DatasetMeta, **kwargs: object) -> PanopticResult:
            self.calls.append(kwargs)
            h, w = raw.sem_logits.shape[-2:]
            return PanopticResult(torch.zeros((h, w), dtype=torch.int32), [])

        super().__init__(meta=META, size_divisibility=8, fuse=fuse)

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        return [raw_for("all") for _ in batch.image_ids]


def test_predict_passes_each_image_original_size() -> None:
    model = Recorder().eval()
    images = torch.zeros((2, 3, H, 64))
    batch = Batch(images, [(H, W), (H, W)], ["a", "b"], original_sizes=[(20, 30), (80, 120)])
    model(batch)
    assert model.calls == [
        {"image_id": "a", "original_size": (20, 30)},
        {"image_id": "b", "original_size": (80, 120)},
    ]
    model.calls.clear()
    model(Batch(images, [(H, W), (H, W)], ["a", "b"]))  # no original sizes: the input sizes
    assert [c["original_size"] for c in model.calls] == [(H, W), (H, W)]
