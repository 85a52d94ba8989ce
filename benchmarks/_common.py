"""Scaffolding shared by the fusion benchmarks: random detections and a median timer.

The benchmarks are run as scripts (``python benchmarks/<name>.py``), so this module is imported
from the script's own folder.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor


def random_boxes(generator: torch.Generator, num_boxes: int, size: tuple[int, int]) -> Tensor:
    """FloatTensor[N, 4] xyxy boxes with sides log-uniform in 16..512 pixels, centres anywhere.

    Boxes are clipped to the (h, w) image, so some of them are cut by the border.
    """
    h, w = size
    sides = torch.exp(torch.empty(num_boxes, 2).uniform_(math.log(16.0), math.log(512.0), generator=generator))
    centres = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([w, h], dtype=torch.float32)
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    return boxes


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall time of `runs` calls of `fn` in milliseconds, after `warmup` untimed calls, and all times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), times


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    """Median wall seconds of `runs` calls of `fn` after one warm-up call."""
    fn()  # warm-up: allocator, lazy inits
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
