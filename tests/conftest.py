"""Shared fixtures. Real-data tests read ../shared/data (never committed) and skip without it."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP: the `unipan` command's thread defaults (idle threads spin briefly,
# then sleep). On a 2-core machine torch's long-spinning intra-op threads fight every other process
# and made small tests 5-20x slower.
from unipan.threads import configure_threads  # imports no torch

configure_threads()

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the test folders mirror the package; shared builders live in tests/helpers.py, imported as `helpers`
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED_DATA = Path(os.environ.get("UNIPAN_SHARED_DATA", REPO.parent / "shared" / "data"))

# The tests run small tensors, for which a second intra-op thread costs more than it gives.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real COCO-panoptic / Cityscapes samples; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA
