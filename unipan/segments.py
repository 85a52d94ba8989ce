"""Operations on panoptic id maps and their segments, in one place.

- class spaces of semantic predictions: `semantic_channels`, `to_semantic_space`, and the
  per-pixel class of logits, `semantic_argmax`;
- segment statistics: `label_stats` (the one area/bbox kernel, on a label map 0..bins-1) and
  `segment_stats` (on an id map with listed segment ids), `with_stats`;
- geometry of results: `nearest_source_index` (shared with the data pipeline, so that a result
  mapped back lands on the pixels its image came from), `resize_result`, `crop_result`;
- building a result from a per-pixel choice of segments: `compose_panoptic`, `stuff_mean_probs`;
- area thresholds given in original-image pixels, for a map at the network input size:
  `area_at_input_size`.

Layering: this module imports only `unipan.structures` (and torch); fusion, data, io, engine and
the predictor import it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unipan.structures import (
    IGNORE_LABEL,
    VOID_ID,
    DatasetMeta,
    PanopticResult,
    SegmentInfo,
    SemSpace,
)
from unipan.structures import _label_stats as label_stats

__all__ = [
    "SEM_SPACES",
    "area_at_input_size",
    "compose_panoptic",
    "crop_result",
    "label_stats",
    "nearest_source_index",
    "resize_result",
    "segment_stats",
    "semantic_argmax",
    "semantic_channels",
    "stuff_mean_probs",
    "to_semantic_space",
    "with_stats",
]

SEM_SPACES: tuple[SemSpace, ...] = ("stuff", "stuff+things", "all")

# A lookup table indexed by segment id replaces a binary search per pixel when the largest id is
# at most this many times the pixel count (filling the table then costs less than the search).
_LUT_IDS_PER_PIXEL = 8


# --- class spaces --------------------------------------------------------------------------------
def semantic_channels(meta: DatasetMeta, space: SemSpace) -> int:
    """Number of semantic channels C of a prediction in `space` for this dataset.

    "stuff": S; "stuff+things": S + 1 (stuff indices 0..S-1, then one "things" channel);
    "all": S + T.

    Raises:
        ValueError: for an unknown space.
    """
    if space == "stuff":
        return meta.num_stuff
    if space == "stuff+things":
        return meta.num_stuff + 1
    if space == "all":
        return meta.num_stuff + meta.num_things
    raise ValueError(f"sem_space must be one of {SEM_SPACES}, got {space!r}")


def to_semantic_space(sem_seg: Tensor, num_stuff: int, space: SemSpace) -> Tensor:
    """Map class indices (stuff first, then things) to the class space `space`.

    "all": unchanged; "stuff+things": every thing class -> S; "stuff": every thing class ->
    IGNORE_LABEL (a stuff-only head learns nothing on thing pixels). IGNORE_LABEL stays.

    Args:
        sem_seg: integer tensor [...] of class indices, IGNORE_LABEL for ignored pixels.
        num_stuff: S, the number of stuff classes.
        space: the target space.

    Returns:
        LongTensor[...] of the same shape.

    Raises:
        ValueError: for a float tensor, a negative class index, a negative `num_stuff` or an
            unknown space.
    """
    if space not in SEM_SPACES:
        raise ValueError(f"sem_space must be one of {SEM_SPACES}, got {space!r}")
    if num_stuff < 0:
        raise ValueError(f"num_stuff must be >= 0, got {num_stuff}")
    if sem_seg.is_floating_point():
        raise ValueError(f"sem_seg must hold integer class indices, got {sem_seg.dtype}")
    sem_seg = sem_seg.long()
    if sem_seg.numel() and int(sem_seg.min()) < 0:
        raise ValueError(f"sem_seg holds negative class index {int(sem_seg.min())}")
    if space == "all":
        return sem_seg
    is_thing = (sem_seg >= num_stuff) & (sem_seg != IGNORE_LABEL)
    fill = num_stuff if space == "stuff+things" else IGNORE_LABEL
    return torch.where(is_thing, torch.full_like(sem_seg, fill), sem_seg)


def semantic_argmax(logits: Tensor) -> Tensor:
    """LongTensor[h, w]: `logits.argmax(dim=0)` of FloatTensor[C, h, w], computed as `max(dim=0)`.

    The same index (the first maximal channel on ties; a NaN counts as the maximum, as in
    `argmax`), but on the CPU `argmax` over the leading dimension takes a slower path of torch's
    reduction kernels than `max` (`benchmarks/fusion_speed.py` times both on image-sized logits).
    """
    return logits.max(dim=0).indices


# --- statistics ----------------------------------------------------------------------------------
def _unlisted_error(id_map: Tensor, unlisted: Tensor) -> ValueError:
    unknown = sorted(set(id_map[unlisted].unique().tolist()))
    return ValueError(f"id map holds segment ids {unknown[:10]} that have no segment info")


def _compact_labels(id_map: Tensor, ids: Tensor) -> Tensor:
    """LongTensor[H, W]: 0 where the map is void, 1 + position in `ids` elsewhere.

    Raises:
        ValueError: when the map holds a non-zero id that is not in `ids`.
    """
    k = ids.numel()
    lo, hi = (int(v) for v in torch.aminmax(id_map))
    if lo >= 0 and hi + 1 <= _LUT_IDS_PER_PIXEL * id_map.numel():
        # ids of fusion outputs (1..K) and of most datasets are small: one gather per pixel
        lut = torch.full((hi + 1,), -1, dtype=torch.long, device=id_map.device)
        lut[VOID_ID] = 0
        in_range = (ids >= 0) & (ids <= hi)  # listed ids beyond the map's are simply absent
        lut[ids[in_range]] = torch.arange(1, k + 1, device=id_map.device)[in_range]
        compact = lut[id_map.long() if id_map.dtype != torch.int32 else id_map]
        unlisted = compact < 0
        if bool(unlisted.any()):
            raise _unlisted_error(id_map, unlisted)
        return compact
    # large ids (COCO's R + 256 G + 256^2 B): a binary search per pixel
    sorted_ids, perm = torch.sort(ids)
    flat = id_map.reshape(-1).long()
    pos = torch.searchsorted(sorted_ids, flat).clamp_(max=k - 1)
    listed = sorted_ids[pos] == flat
    unlisted = ~listed & (flat != VOID_ID)
    if bool(unlisted.any()):
        raise _unlisted_error(flat, unlisted)
    return torch.where(listed, perm[pos] + 1, 0).reshape(id_map.shape)


def segment_stats(id_map: Tensor, ids: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
    """Pixel count and COCO bbox of each listed segment of an id map.

    Args:
        id_map: IntTensor or LongTensor[H, W] segment ids, 0 = void.
        ids: K distinct non-zero ids; every non-zero id of the map must be among them.

    Returns:
        areas LongTensor[K] and bboxes LongTensor[K, 4] as (x, y, w, h), in the order of `ids`,
        on the map's device; zeros for ids absent from the map.

    Raises:
        ValueError: when the map holds a non-zero id that is not listed, ids repeat, 0 is listed
            or the map is not 2-D.
    """
    if id_map.dim() != 2:
        raise ValueError(f"id map must be [H, W], got shape {tuple(id_map.shape)}")
    if id_map.is_floating_point() or id_map.dtype == torch.bool:
        raise ValueError(f"id map must hold integer segment ids, got {id_map.dtype}")
    ids_t = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(id_map.device)
    k = ids_t.numel()
    if ids_t.unique().numel() != k:
        raise ValueError(f"segment ids repeat: {sorted(ids_t.tolist())}")
    if bool((ids_t == VOID_ID).any()):
        raise ValueError("segment id 0 is void and cannot be listed")
    device = id_map.device
    if k == 0 or id_map.numel() == 0:
        nonvoid = id_map != VOID_ID
        if id_map.numel() and bool(nonvoid.any()):
            raise _unlisted_error(id_map, nonvoid)
        return torch.zeros(k, dtype=torch.long, device=device), torch.zeros((k, 4), dtype=torch.long, device=device)
    areas, bboxes = label_stats(_compact_labels(id_map, ids_t), k + 1)
    return areas[1:], bboxes[1:]


def with_stats(result: PanopticResult, id_map: Tensor) -> PanopticResult:
    """`result` with a new id map: segments without pixels are dropped, area/bbox recomputed.

    Args:
        result: its segments list every non-zero id of `id_map` (others are dropped).
        id_map: IntTensor[H, W] segment ids, 0 = void.

    Returns:
        A new PanopticResult with `id_map`, the same image_id and raw, and the segments' other
        fields (category, crowd, score) kept.

    Raises:
        ValueError: when `id_map` holds ids that `result` does not list.
    """
    areas, bboxes = segment_stats(id_map, [s.id for s in result.segments])
    segments = [
        SegmentInfo(
            id=s.id,
            category_id=s.category_id,
            isthing=s.isthing,
            iscrowd=s.iscrowd,
            area=int(area),
            bbox=(int(b[0]), int(b[1]), int(b[2]), int(b[3])),
            score=s.score,
        )
        for s, area, b in zip(result.segments, areas.tolist(), bboxes.tolist(), strict=True)
        if area > 0
    ]
    return PanopticResult(panoptic=id_map, segments=segments, image_id=result.image_id, raw=result.raw)


# --- geometry ------------------------------------------------------------------------------------
def nearest_source_index(out_len: int, in_len: int, device: torch.device | str | None = None) -> Tensor:
    """Source index of each output position, sampling at pixel centres (PIL / "nearest-exact").

    The data pipeline resizes id maps with it and `resize_result` maps results back with it, so a
    result mapped back lands on the pixels the image came from.

    Returns:
        LongTensor[out_len] with values in 0..in_len-1.
    """
    centres = (torch.arange(out_len, dtype=torch.float64, device=device) + 0.5) * (in_len / out_len)
    return centres.floor().long().clamp_(0, in_len - 1)


def resize_result(result: PanopticResult, size: tuple[int, int]) -> PanopticResult:
    """Resize a panoptic result to `size` = (H, W) by nearest neighbour on the id map.

    Pixels sample the source at their centres (``nearest-exact``), ids are copied exactly (no
    float round trip). Segments with no pixel left are dropped; `area` and `bbox` of the rest are
    recomputed. `raw` is kept as it is (at the network input size).

    Args:
        result: the result at its current size; every non-zero id of its map must be listed in
            its segments.
        size: output (H, W), both >= 1.

    Returns:
        A new PanopticResult with panoptic IntTensor[H, W].

    Raises:
        ValueError: for a bad size, or ids of the map without a segment (naming the image).
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"image {result.image_id!r}: cannot resize a result to {size}")
    panoptic = result.panoptic
    if panoptic.dim() != 2:
        raise ValueError(f"image {result.image_id!r}: panoptic must be IntTensor[H, W], got {tuple(panoptic.shape)}")
    h, w = panoptic.shape
    if (h, w) != (out_h, out_w):
        if h == 0 or w == 0:
            raise ValueError(f"image {result.image_id!r}: cannot resize an empty {h} x {w} result")
        rows = nearest_source_index(out_h, h, panoptic.device)
        cols = nearest_source_index(out_w, w, panoptic.device)
        panoptic = panoptic.index_select(0, rows).index_select(1, cols)
    try:
        return with_stats(result, panoptic)
    except ValueError as e:
        raise ValueError(f"image {result.image_id!r}: {e}") from None


def crop_result(result: PanopticResult, size: tuple[int, int]) -> PanopticResult:
    """The top-left (h, w) of a result (drops batch padding); segments re-counted as in `resize_result`.

    Raises:
        ValueError: naming the image, when its map holds ids without a segment.
    """
    h, w = int(size[0]), int(size[1])
    try:
        return with_stats(result, result.panoptic[:h, :w].contiguous())
    except ValueError as e:
        raise ValueError(f"image {result.image_id!r}: {e}") from None


def area_at_input_size(area: float, input_size: tuple[int, int], original_size: tuple[int, int] | None = None) -> float:
    """An area in original-image pixels, expressed in pixels of the (h, w) network input.

    Area thresholds of the fusions (the stuff area: 4096 on COCO, 2048 on Cityscapes) are given in
    pixels of the image file, as detectron2 and the official UPSNet apply them. The fusions run at
    the input size, so they compare their pixel counts with `area * (h * w) / (H * W)`: a region of
    a pixels at the input size covers about a * (H * W) / (h * w) pixels of the file once its
    result is resized back (`resize_result`).

    Args:
        area: the threshold in original pixels.
        input_size: (h, w) where the fusion counts pixels.
        original_size: (H, W) of the image file; None (or the input size itself) = no scaling.

    Returns:
        The threshold in input pixels (a float: compare counts with `>=`); exactly `area` when
        the sizes are equal.
    """
    if original_size is None:
        return float(area)
    h, w = int(input_size[0]), int(input_size[1])
    big_h, big_w = int(original_size[0]), int(original_size[1])
    if (h, w) == (big_h, big_w):
        return float(area)
    if big_h < 1 or big_w < 1:
        raise ValueError(f"original size {tuple(original_size)} must be at least 1 x 1")
    return float(area) * (h * w) / (big_h * big_w)


# --- composing a result --------------------------------------------------------------------------
def stuff_mean_probs(sem_logits: Tensor, key: Tensor, num_stuff: int) -> Tensor:
    """Mean softmax probability of each stuff class over the pixels whose key is that class.

    Every pixel of a stuff segment carries its class as key, so the mean is over the probability
    of each pixel's own key class: one gather and one weighted bincount after the log-sum-exp.

    Args:
        sem_logits: FloatTensor[C, h, w] with the stuff classes in channels 0..S-1.
        key: LongTensor[h, w] stuff index where a pixel belongs to a stuff segment, anything < 0
            or >= S elsewhere.
        num_stuff: S.

    Returns:
        DoubleTensor[S] (float64: summed in double precision); 0 for classes without pixels.
    """
    logits = sem_logits.float()
    is_stuff = (key >= 0) & (key < num_stuff)
    own = logits.gather(0, torch.where(is_stuff, key, 0)[None])[0]
    prob = torch.exp(own - torch.logsumexp(logits, dim=0))
    # pixels that are not stuff go to a spare bin S, dropped below
    bins = torch.where(is_stuff, key, num_stuff).reshape(-1)
    sums = torch.bincount(bins, weights=prob.reshape(-1).double(), minlength=num_stuff + 1)[:num_stuff]
    counts = torch.bincount(bins, minlength=num_stuff + 1)[:num_stuff]
    return sums / counts.clamp(min=1).double()


def compose_panoptic(
    z_index: Tensor,
    instance_class: Tensor,
    scores: Tensor,
    meta: DatasetMeta,
    stuff_area: float,
    unknown: bool = True,
    sem_logits: Tensor | None = None,
) -> tuple[Tensor, list[SegmentInfo]]:
    """Turn a per-pixel channel choice (stuff classes, then instances, then unknown) into segments.

    Channel k < S is stuff class k, channel S + i is instance i, channel S + N (when `unknown`)
    the unknown class. Unknown pixels become void; instances relabelled to stuff join that stuff
    class's segment; stuff segments under `stuff_area` pixels become void; instances that won no
    pixel vanish.

    Args:
        z_index: LongTensor[h, w] channel per pixel (S + N + 1 channels when `unknown`, else S + N),
            e.g. the argmax of UPSNet's panoptic logits.
        instance_class: LongTensor[N] class index per instance: S + thing index, or a stuff
            index (< S) for an instance relabelled to stuff.
        scores: FloatTensor[N] detection scores.
        meta: the dataset's classes.
        stuff_area: minimum stuff segment area in pixels of `z_index` (a threshold in original
            pixels goes through `area_at_input_size` first).
        unknown: whether the last channel is the unknown class.
        sem_logits: FloatTensor[C, h, w]: when given, a stuff segment's score is the mean softmax
            probability of its class over its pixels (`stuff_mean_probs`, one more pass over all
            C x h x w logits); else 1.0, as nothing downstream (PQ, COCO-panoptic files) reads it.

    Returns:
        IntTensor[h, w] (int32) segment ids (instances 1..K in channel order, then stuff by class
        index), and their SegmentInfo (area and bbox filled).
    """
    s = meta.num_stuff
    n = int(instance_class.numel())
    dev = z_index.device
    instance_class = instance_class.to(dev)
    # key per channel: stuff class k -> k, instance i -> S + i (or its stuff class), unknown -> -1
    parts = [
        torch.arange(s, device=dev),
        torch.where(instance_class < s, instance_class, s + torch.arange(n, device=dev)),
    ]
    if unknown:
        parts.append(torch.full((1,), -1, device=dev))
    key = torch.cat(parts)[z_index]
    # label key + 1 (0 = unknown): each kept label is exactly one segment's pixels, so its stats
    # are the segment's, before any id is assigned
    areas, bboxes = label_stats(key + 1, s + n + 1)
    area = areas[1:]
    inst_order = torch.nonzero(area[s:] > 0).flatten()
    stuff_order = torch.nonzero(area[:s] >= max(stuff_area, 1)).flatten()
    n_inst, n_stuff = inst_order.numel(), stuff_order.numel()
    id_lut = torch.zeros(s + n + 1, dtype=torch.int32, device=dev)  # indexed by key + 1; 0 = void
    id_lut[s + 1 + inst_order] = torch.arange(1, n_inst + 1, dtype=torch.int32, device=dev)
    id_lut[1 + stuff_order] = torch.arange(n_inst + 1, n_inst + n_stuff + 1, dtype=torch.int32, device=dev)
    panoptic = id_lut[key + 1]

    stuff_scores = [1.0] * s
    if sem_logits is not None and n_stuff:
        stuff_key = torch.where(panoptic != VOID_ID, key, -1)
        stuff_scores = stuff_mean_probs(sem_logits, stuff_key, s).tolist()

    area_list = area.tolist()
    bbox_list = bboxes[1:].tolist()
    score_list = scores.tolist()
    class_list = instance_class.tolist()
    segments: list[SegmentInfo] = []
    for seg_id, i in enumerate(inst_order.tolist(), start=1):
        segments.append(
            SegmentInfo(
                id=seg_id,
                category_id=meta.thing_dataset_id(class_list[i] - s),
                isthing=True,
                area=int(area_list[s + i]),
                bbox=tuple(bbox_list[s + i]),
                score=float(score_list[i]),
            )
        )
    for seg_id, k in enumerate(stuff_order.tolist(), start=n_inst + 1):
        segments.append(
            SegmentInfo(
                id=seg_id,
                category_id=meta.stuff_dataset_id(k),
                isthing=False,
                area=int(area_list[k]),
                bbox=tuple(bbox_list[k]),
                score=float(stuff_scores[k]),
            )
        )
    return panoptic, segments
