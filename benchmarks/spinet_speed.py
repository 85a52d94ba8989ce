"""SPINet's Table 2 on the CPU: network and post-processing time beside UPSNet and Panoptic FPN.

Setting (the paper's Cityscapes one): one 1024 x 2048 image, 8 thing and 11 stuff classes, the
`unipan/configs/<model>/r50_cityscapes.yaml` models with random weights, 100 instances on every side
(`inference_speed.BENCH_OVERRIDES`; SPINet's 4 levels give 25 candidates each and its NMS keeps
them all), `--threads` CPU threads, median of `--runs` timed rounds after one warm-up round (the
models take turns). The paper (TITAN XP): SPINet 171 + 30 ms, UPSNet 191 + 310 ms.

"Post" is what follows the network's tensors, alike for the three models: the masks' way from the
network's resolution into the image, the duplicate removal, the semantic argmax and the fusion.
For UPSNet that is `model.fuse` (pasting the 28 x 28 RoI masks into their boxes, then its panoptic
head, whose argmax over the stuff and thing logits also gives the semantic argmax); for Panoptic
FPN the `semantic_argmax` its `raw_predictions` runs plus `model.fuse` (pasting, then the
heuristic); for SPINet the tail of `image_prediction` that its `raw_predictions` runs (the boxes of
the stride-4 masks, their class-wise NMS, the bilinear upsampling of each kept mask near its box
and the semantic argmax) plus `model.fuse`. These calls are timed by wrapping them in their
modules. "Network" is the rest of `model.raw_predictions` (for every model the semantic logits'
upsampling to the image included). The semantic argmax is also printed on its own: an earlier
version of this benchmark counted it as network for SPINet and Panoptic FPN, though UPSNet's is
inside its fusion.

Random weights make SPINet's thing masks image-sized blobs (a random kernel is positive on about
half of a random feature), the worst case of its post-processing; a trained model's masks are
object-sized. So SPINet's post-processing is also timed with 100 object-sized stride-4 masks
(ellipses in boxes of 16..512 px, as `fusion_speed.py`'s detections) in place of its own thing
logits, beside its own stuff logits.

Targets: SPINet's total below UPSNet's; SPINet's post-processing <= 0.2 x UPSNet's.

On CUDA (``--device cuda``, `benchmarks/gpu_check.sh` runs it) every time is taken after
`torch.cuda.synchronize()`, the wrapped calls' too, so the split is the same; the paper's setting is
a GPU one. ``--size`` sets another image size (the smoke mode of `gpu_check.sh` uses a small one).

Run: ``python benchmarks/spinet_speed.py [--runs 3] [--threads 2] [--device cpu|cuda] [--size 1024 2048]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import random_boxes
from inference_speed import BENCH_OVERRIDES, cityscapes_sized_meta
from torch import Tensor

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unipan.modeling.meta_arch import PanopticModel
from unipan.modeling.models import panoptic_fpn as panoptic_fpn_module
from unipan.modeling.models import spinet as spinet_module
from unipan.modeling.registry import build_model
from unipan.structures import Batch

IMAGE_SIZE = (1024, 2048)
DEVICE = torch.device("cpu")  # set by `main`; `now` synchronises CUDA before reading the clock
MODELS = ("spinet", "upsnet", "panoptic_fpn")
# 4 levels x 25 = 100 candidates; random kernels give near-identical masks that the mask-box NMS
# would merge into a few: an IoU threshold of 1 keeps all 100 for the fusion, as the other models'
OVERRIDES = {"spinet": ["model.spinet.pre_topk=25", "model.spinet.nms_thresh=1.0"]}
# post-processing that runs inside `raw_predictions`, by model: (module, the globals it calls)
# SPINet's `image_prediction`: mask boxes, their NMS, the masks' upsampling, the semantic argmax
TAILS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "spinet": (spinet_module, ("logit_boxes", "batched_nms", "paste_mask_logits", "semantic_argmax")),
    "upsnet": (None, ()),
    "panoptic_fpn": (panoptic_fpn_module, ("semantic_argmax",)),
}


def now() -> float:
    """`time.perf_counter()` once the work queued on `DEVICE` has finished."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


class Tail:
    """Within `with`: the ms spent in the post-processing calls of `TAILS[model]` (and, of it, in
    `semantic_argmax`), and SPINet's last `image_prediction` call.

    Wraps the module globals (and SPINet's `image_prediction`, to keep its arguments), restoring
    them on exit.
    """

    def __init__(self, model: str) -> None:
        self.module, self.names = TAILS[model]
        if model == "spinet":
            self.names = (*self.names, "image_prediction")
        self.ms = 0.0
        self.argmax_ms = 0.0
        self.call: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> Tail:
        for name in self.names:
            self._saved[name] = getattr(self.module, name)
            setattr(self.module, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._saved.items():
            setattr(self.module, name, fn)

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if name == "image_prediction":
                self.call = (args, kwargs)
                return fn(*args, **kwargs)
            t0 = now()
            out = fn(*args, **kwargs)
            ms = (now() - t0) * 1e3
            self.ms += ms
            if name == "semantic_argmax":
                self.argmax_ms += ms
            return out

        return wrapped


def object_sized_logits(size: tuple[int, int], n: int = 100, scale: int = 4) -> Tensor:
    """FloatTensor[n, h/scale, w/scale]: logits 5 (1 - r^2), at least -5, of ellipses (r = 1 on the
    rim) inscribed in random boxes of 16..512 image px (seeded)."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, n, size) / scale
    ys = torch.arange(h // scale, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w // scale, dtype=torch.float32)[None, :] + 0.5
    logits = torch.empty(n, h // scale, w // scale)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
        logits[i] = 5 * (1 - ((xs - cx) / rx) ** 2 - ((ys - cy) / ry) ** 2).clamp(min=-1)
    return logits


def main() -> None:
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda (benchmarks/gpu_check.sh)")
    ap.add_argument("--size", type=int, nargs=2, default=list(IMAGE_SIZE), metavar=("H", "W"))
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if min(args.size) < 64 or args.size[0] % 32 or args.size[1] % 32:
        ap.error(f"--size {args.size[0]} {args.size[1]}: each side must be a multiple of 32, at least 64")
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = cityscapes_sized_meta()
    h, w = args.size
    image = (torch.rand(3, h, w) * 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    image = image.to(DEVICE)
    batch = Batch(images=image[None], image_sizes=[(h, w)], image_ids=["bench"], original_sizes=[(h, w)])
    models = {}
    for name in MODELS:
        cfg = load_config(
            config_dir() / name / "r50_cityscapes.yaml", [*BENCH_OVERRIDES.get(name, []), *OVERRIDES.get(name, [])]
        )
        model = build_model(cfg, meta).eval().to(DEVICE)
        assert isinstance(model, PanopticModel)
        models[name] = model
    # interleaved (one round of every model, then the next), so that a change of the machine's load
    # during the benchmark reaches every model alike; the first round is the warm-up
    net: dict[str, list[float]] = {name: [] for name in MODELS}
    post: dict[str, list[float]] = {name: [] for name in MODELS}
    argmax: dict[str, list[float]] = {name: [] for name in MODELS}
    obj_post: list[float] = []
    obj_argmax: list[float] = []
    counts = {}
    with torch.inference_mode():
        for _ in range(args.runs + 1):
            for name, model in models.items():
                with Tail(name) as tail:
                    t0 = now()
                    (raw,) = model.raw_predictions(batch)
                    t1 = now()
                model.fuse(raw, meta, image_id="bench", original_size=(h, w))
                t2 = now()
                net[name].append((t1 - t0) * 1e3 - tail.ms)
                post[name].append((t2 - t1) * 1e3 + tail.ms)
                argmax[name].append(tail.argmax_ms)
                counts[name] = len(raw)
                if name == "spinet":
                    assert tail.call is not None and tail.argmax_ms > 0
                    obj_ms, obj_argmax_ms = _object_sized_post(models["spinet"], tail.call, meta, (h, w))
                    obj_post.append(obj_ms)
                    obj_argmax.append(obj_argmax_ms)
    rows = {
        name: (
            statistics.median(net[name][1:]),
            statistics.median(post[name][1:]),
            counts[name],
            sum(p.numel() for p in model.parameters()),
        )
        for name, model in models.items()
    }
    print(
        f"\n{h}x{w}, 19 classes, {DEVICE.type} ({args.threads} CPU threads), median of {args.runs} rounds "
        "after 1 warm-up round, random weights\n"
    )
    header = f"{'model (R50, Cityscapes config)':<32}{'network ms':>12}{'post ms':>10}{'total ms':>10}"
    print(f"{header}{'inst':>6}{'params M':>10}")
    for name, (net_ms, post_ms, n, params) in rows.items():
        print(f"{name:<32}{net_ms:>12.0f}{post_ms:>10.0f}{net_ms + post_ms:>10.0f}{n:>6}{params / 1e6:>10.2f}")
    s_net, s_post, _, _ = rows["spinet"]
    u_net, u_post, _, _ = rows["upsnet"]
    total_ok = s_net + s_post < u_net + u_post
    post_ratio = s_post / u_post
    total_ratio = (s_net + s_post) / (u_net + u_post)
    obj_ms = statistics.median(obj_post[1:])
    print(f"\nSPINet total / UPSNet total: {total_ratio:.3f} (target < 1: {'met' if total_ok else 'NOT met'})")
    print(f"SPINet post / UPSNet post:   {post_ratio:.3f} (target <= 0.2: {'met' if post_ratio <= 0.2 else 'NOT met'})")
    print(
        f"SPINet post on 100 object-sized masks: {obj_ms:.0f} ms = {obj_ms / u_post:.3f} x UPSNet's post "
        f"(target <= 0.2: {'met' if obj_ms <= 0.2 * u_post else 'NOT met'})"
    )
    s_arg, p_arg = (statistics.median(argmax[name][1:]) for name in ("spinet", "panoptic_fpn"))
    obj_rest = statistics.median(t - a for t, a in zip(obj_post[1:], obj_argmax[1:], strict=True))
    print(
        f"of the post, the semantic argmax: SPINet {s_arg:.0f} ms, Panoptic FPN {p_arg:.0f} ms (UPSNet's is "
        f"inside its panoptic head); SPINet's post without it on object-sized masks: {obj_rest:.0f} ms = "
        f"{obj_rest / u_post:.3f} x UPSNet's post"
    )
    print("paper (TITAN XP): SPINet 171 + 30 = 201 ms, UPSNet 191 + 310 = 501 ms; post ratio 0.097")


def _object_sized_post(
    model: PanopticModel, call: tuple[tuple[Any, ...], dict[str, Any]], meta: object, size: tuple[int, int]
) -> tuple[float, float]:
    """ms of SPINet's post-processing (tail + fusion) with object-sized thing logits in its last call,
    and of it the semantic argmax."""
    (thing_logits, stuff_logits, scores, labels, image_size), kwargs = call
    objects = object_sized_logits(size, len(scores), kwargs["scale"])
    objects = objects[:, : thing_logits.shape[-2], : thing_logits.shape[-1]].to(thing_logits.device)
    labels = torch.randint(0, 8, labels.shape, generator=torch.Generator().manual_seed(0)).to(labels.device)
    with Tail("spinet") as tail:
        raw = spinet_module.image_prediction(objects, stuff_logits, scores, labels, image_size, **kwargs)
    t0 = now()
    model.fuse(raw, meta, image_id="bench", original_size=size)  # type: ignore[arg-type]
    return (now() - t0) * 1e3 + tail.ms, tail.argmax_ms


if __name__ == "__main__":
    main()
