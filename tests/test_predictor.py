"""Predictor: user images in (resize, normalise, pad), results back at the original size.

A fake model that paints a known pattern at its input size makes every step checkable: what the
model receives (size, padding, normalisation), and what comes back (nearest-neighbour resizing,
padding removal, vanished segments dropped, area/bbox recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from unipan.config import BackboneConfig, Config, load_config
from unipan.data.transforms import resize_pair, shortest_edge_size
from unipan.predictor import Predictor
from unipan.segments import crop_result, resize_result
from unipan.structures import Batch, DatasetMeta, PanopticResult, SegmentInfo

META = DatasetMeta(
    [
        {"id": 7, "name": "car", "isthing": 1},
        {"id": 9, "name": "person", "isthing": 1},
        {"id": 21, "name": "road", "isthing": 0},
    ],
    name="toy",
)
REPO = Path(__file__).resolve().parents[1]


def pattern(h: int, w: int) -> torch.Tensor:
    """The fake model's id map at (h, w): void top row, thing 1 on the left third, stuff 2 on the
    rest, and thing 3 a single pixel at an even (row, column), which a 2x nearest-exact downsample
    (sampling odd source pixels) drops."""
    pan = torch.full((h, w), 2, dtype=torch.int32)
    pan[:, : w // 3] = 1
    pan[0] = 0
    pan[2, (w - 4) // 2 * 2] = 3
    return pan


class PatternModel(nn.Module):
    """Returns `pattern` at each image's input size (or at the padded size / a wrong size).

    Batches are padded to its `size_divisibility`, as for every model (the predictor reads it).
    """

    def __init__(self, output: str = "input", size_divisibility: int = 32) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))  # a weight, so checkpoints have a state
        self.output = output
        self.size_divisibility = size_divisibility
        self.batches: list[Batch] = []

    def forward(self, batch: Batch) -> list[PanopticResult]:
        assert not self.training and not torch.is_grad_enabled()
        self.batches.append(batch)
        results = []
        for (h, w), image_id in zip(batch.image_sizes, batch.image_ids, strict=True):
            if self.output == "padded":
                hp, wp = batch.images.shape[-2:]
                pan = torch.full((hp, wp), 6, dtype=torch.int32)  # id 6 only in the padding
                pan[:h, :w] = pattern(h, w)
            elif self.output == "wrong":
                pan = pattern(h + 1, w)
            else:
                pan = pattern(h, w)
            # areas and boxes deliberately wrong: the predictor must recompute them; id 5 has no pixel
            segments = [
                SegmentInfo(1, 7, True, score=0.9),
                SegmentInfo(2, 21, False, area=-1),
                SegmentInfo(3, 9, True, score=0.8),
                SegmentInfo(5, 9, True, score=0.7),
            ]
            if self.output == "padded":
                segments.append(SegmentInfo(6, 21, False))
            results.append(PanopticResult(pan + int(self.offset.item()) * 0, segments, image_id=image_id))
        return results


def make_cfg(min_size: int = 0, max_size: int = 1000) -> Config:
    return load_config(None, [f"data.min_size_test={min_size}", f"data.max_size_test={max_size}"])


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def nearest_exact(pan: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Independent reference: pixel i samples source floor((i + 0.5) * in / out)."""
    h, w = pan.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return pan.numpy()[rows][:, cols]


def check_segments(result: PanopticResult) -> None:
    """Exactly the ids of the map are listed, with their true area and COCO bbox."""
    pan = result.panoptic.numpy()
    assert {s.id for s in result.segments} == set(np.unique(pan).tolist()) - {0}
    for s in result.segments:
        ys, xs = np.nonzero(pan == s.id)
        assert s.area == len(ys)
        assert s.bbox == (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


def test_upscaled_input_comes_back_at_original_size() -> None:
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=80))
    result = predictor(random_image(40, 60), image_id="a")
    (batch,) = model.batches
    assert batch.image_sizes == [(80, 120)] and batch.original_sizes == [(40, 60)]
    assert tuple(batch.images.shape) == (1, 3, 96, 128)  # padded to multiples of 32
    assert result.image_id == "a" and result.panoptic.dtype == torch.int32
    assert result.panoptic.shape == (40, 60)
    assert np.array_equal(result.panoptic.numpy(), nearest_exact(pattern(80, 120), (40, 60)))
    # the one-pixel thing 3 sat on an even row: the 2x downsample drops it, and id 5 never had pixels
    assert [s.id for s in result.segments] == [1, 2]
    assert [(s.category_id, s.isthing, s.score) for s in result.segments] == [
        (7, True, 0.9),
        (21, False, 1.0),
    ]
    check_segments(result)


def test_downscaled_input_comes_back_at_original_size() -> None:
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=30, max_size=50))
    result = predictor(random_image(90, 200))
    # shortest edge 30 would make the long side 67 > 50: capped at 50
    expect = shortest_edge_size(90, 200, 30, 50)
    assert expect == (23, 50)
    assert model.batches[0].image_sizes == [expect]
    assert np.array_equal(result.panoptic.numpy(), nearest_exact(pattern(*expect), (90, 200)))
    assert [s.id for s in result.segments] == [1, 2, 3]  # upsampling keeps every segment
    check_segments(result)


def test_normalisation_and_zero_padding() -> None:
    model = PatternModel(size_divisibility=16)  # the padding multiple comes from the model
    cfg = make_cfg()
    predictor = Predictor(model, META, cfg)
    image = np.empty((20, 27, 3), dtype=np.uint8)
    image[...] = (10, 120, 250)
    predictor(image)
    images = model.batches[0].images
    assert tuple(images.shape) == (1, 3, 32, 32)
    for c in range(3):
        want = (image[0, 0, c] - cfg.data.pixel_mean[c]) / cfg.data.pixel_std[c]
        assert torch.allclose(images[0, c, :20, :27], torch.tensor(want, dtype=torch.float32), atol=1e-5)
    assert int(torch.count_nonzero(images[0, :, 20:])) == 0 and int(torch.count_nonzero(images[0, :, :, 27:])) == 0


def test_keep_size_and_padding() -> None:
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=0))
    result = predictor(random_image(33, 45))
    assert model.batches[0].image_sizes == [(33, 45)] and tuple(model.batches[0].images.shape[-2:]) == (64, 64)
    assert torch.equal(result.panoptic, pattern(33, 45))
    check_segments(result)


def test_keep_size_is_still_capped_by_max_size_test() -> None:
    """min_size_test 0 keeps a small image's size, but a large photo is shrunk to max_size_test."""
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=0, max_size=64))
    small = predictor(random_image(33, 45))
    large = predictor(random_image(600, 800))
    assert [b.image_sizes for b in model.batches] == [[(33, 45)], [(48, 64)]]
    assert small.image_size == (33, 45) and large.image_size == (600, 800)  # results at the file's size
    check_segments(large)


def test_result_at_the_padded_size_is_rejected() -> None:
    """Models return results at the input size (the contract): the predictor crops nothing."""
    predictor = Predictor(PatternModel(output="padded"), META, make_cfg(min_size=0))
    with pytest.raises(
        ValueError, match=r"image 'pad': PatternModel returned a 64x64 result, expected its input size 33x45"
    ):
        predictor(random_image(33, 45), image_id="pad")


def test_wrong_result_size_names_the_image() -> None:
    predictor = Predictor(PatternModel(output="wrong"), META, make_cfg())
    expected = r"image 'bad': PatternModel returned a 34x45 result, expected its input size 33x45"
    with pytest.raises(ValueError, match=expected):
        predictor(random_image(33, 45), image_id="bad")


def test_predict_many_batches_like_single_images() -> None:
    images = [random_image(40, 60, 1), random_image(50, 30, 2), random_image(45, 45, 3)]
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=64))
    many = list(predictor.predict_many([(images[0], "x"), images[1], images[2]], batch_size=2))
    assert [len(b) for b in model.batches] == [2, 1]
    first = model.batches[0]
    assert first.image_sizes == [(64, 96), (107, 64)] and tuple(first.images.shape[-2:]) == (128, 96)
    assert [r.image_id for r in many] == ["x", "1", "2"]
    for image, result in zip(images, many, strict=True):
        single = predictor(image)
        assert torch.equal(single.panoptic, result.panoptic)
        assert single.segments == result.segments
        assert result.image_size == image.shape[:2]
    with pytest.raises(ValueError, match="batch_size"):
        list(predictor.predict_many(images, batch_size=0))


def test_image_paths(tmp_path: Path) -> None:
    path = tmp_path / "photo_17.png"
    Image.fromarray(random_image(21, 34)).save(path)
    model = PatternModel()
    predictor = Predictor(model, META, make_cfg(min_size=42))
    result = predictor(path)
    assert result.image_id == "photo_17" and result.image_size == (21, 34)
    assert model.batches[0].image_sizes == [(42, 68)]
    (from_many,) = predictor.predict_many([str(path)])
    assert from_many.image_id == "photo_17" and torch.equal(from_many.panoptic, result.panoptic)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor(tmp_path / "missing.png")


def test_bad_images_are_rejected_with_their_id() -> None:
    predictor = Predictor(PatternModel(), META, make_cfg())
    with pytest.raises(ValueError, match=r"image 'f'.*uint8"):
        predictor(np.zeros((8, 8, 3), dtype=np.float32), image_id="f")
    with pytest.raises(ValueError, match=r"image 'g'.*H x W x 3"):
        predictor(np.zeros((8, 8), dtype=np.uint8), image_id="g")
    with pytest.raises(TypeError, match="image path"):
        predictor([[1, 2, 3]])  # type: ignore[arg-type]


def test_resize_result_matches_reference_and_data_pipeline() -> None:
    g = torch.Generator().manual_seed(0)
    pan = torch.randint(0, 4, (13, 17), generator=g, dtype=torch.int32) * 100
    segments = [SegmentInfo(100, 7, True, score=0.5), SegmentInfo(200, 9, True), SegmentInfo(300, 21, False)]
    result = PanopticResult(pan, segments, image_id="r", raw=None)
    for size in ((39, 51), (7, 9), (13, 40), (1, 1)):
        out = resize_result(result, size)
        assert np.array_equal(out.panoptic.numpy(), nearest_exact(pan, size))
        # the same grid as the data pipeline's id-map resizing
        _, piped = resize_pair(torch.zeros(3, 13, 17), pan, size)
        assert piped is not None and torch.equal(out.panoptic, piped)
        check_segments(out)
        assert out.image_id == "r"
    assert [s.score for s in resize_result(result, (39, 51)).segments] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"image 'r'.*ids \[300\] that have no segment info"):
        resize_result(PanopticResult(pan, segments[:2], image_id="r"), (5, 5))
    with pytest.raises(ValueError, match="cannot resize"):
        resize_result(result, (0, 5))
    cropped = crop_result(result, (5, 6))
    assert torch.equal(cropped.panoptic, pan[:5, :6])
    check_segments(cropped)


@dataclass
class PatternConfig:
    """The model section of the fake model's config (registered for test_from_checkpoint only)."""

    name: str = "pattern_test"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    size_divisibility: int = 32


def build_pattern_model(cfg: PatternConfig, meta: DatasetMeta) -> nn.Module:
    assert meta == META and isinstance(cfg, PatternConfig)
    return PatternModel(size_divisibility=cfg.size_divisibility)


def test_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unipan.config.models import MODEL_CONFIGS
    from unipan.engine.checkpoint import save_checkpoint
    from unipan.modeling import registry

    monkeypatch.setitem(registry.MODELS, "pattern_test", build_pattern_model)
    monkeypatch.setitem(MODEL_CONFIGS, "pattern_test", PatternConfig)
    cfg = load_config(None, ["model.name=pattern_test", "data.min_size_test=100", "data.max_size_test=1000"])
    model = PatternModel()
    with torch.no_grad():
        model.offset.fill_(3.0)
    path = tmp_path / "model.pth"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, iteration=1, cfg=cfg, meta=META)
    # a data override, and a model override the weights' layout allows: the padding multiple
    predictor = Predictor.from_checkpoint(path, overrides=["data.min_size_test=64", "model.size_divisibility=16"])
    assert predictor.cfg.data.min_size_test == 64 and predictor.cfg.model.name == "pattern_test"
    assert predictor.meta == META
    assert isinstance(predictor.model, PatternModel) and float(predictor.model.offset.detach()) == 3.0
    assert not predictor.model.training
    result = predictor(random_image(32, 40))
    (batch,) = predictor.model.batches
    assert batch.image_sizes == [(64, 80)] and tuple(batch.images.shape[-2:]) == (64, 80)
    assert result.image_size == (32, 40)
    stored = Predictor.from_checkpoint(path, overrides=["data.min_size_test=64"])
    stored(random_image(32, 40))
    assert tuple(stored.model.batches[0].images.shape[-2:]) == (64, 96)  # the stored multiple, 32

    ckpt = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "meta"}, tmp_path / "no_meta.pth")
    with pytest.raises(ValueError, match=r"no_meta.pth is not a unipan checkpoint \(needs keys .*'meta'"):
        Predictor.from_checkpoint(tmp_path / "no_meta.pth")
    torch.save({**ckpt, "model": {"other": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth does not fit model PatternModel: missing keys \(1\): offset"):
        Predictor.from_checkpoint(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="unknown config key data.no_such_key"):
        Predictor.from_checkpoint(path, overrides=["data.no_such_key=1"])
    with pytest.raises(FileNotFoundError):
        Predictor.from_checkpoint(tmp_path / "absent.pth")


def test_real_panoptic_fpn_end_to_end() -> None:
    """The registered Panoptic FPN (random weights, tiny config) through the Predictor and fusion."""
    tiny = REPO / "unipan" / "configs" / "panoptic_fpn" / "tiny_synth.yaml"
    if not tiny.is_file():
        pytest.skip("tiny Panoptic FPN config not available yet")
    from unipan.data.synthetic import synth_meta
    from unipan.modeling.registry import build_model

    torch.manual_seed(0)
    cfg = load_config(tiny, ["data.min_size_test=64", "data.max_size_test=128"])
    meta = synth_meta()
    predictor = Predictor(build_model(cfg, meta), meta, cfg)
    result = predictor(random_image(50, 70), image_id="real")
    assert result.image_size == (50, 70) and result.image_id == "real"
    check_segments(result)
    assert all(s.category_id in meta for s in result.segments)
