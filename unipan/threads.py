"""Torch's CPU thread defaults for a machine that is not idle.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the PyPI wheels). Between parallel
regions its worker threads spin, waiting for the next one, before they sleep: by default for
300,000 iterations of a spin loop. On an idle machine that saves the wake-up; with one other
CPU-bound process on the same cores, the spinning threads take the time slices the working thread
needs, and every parallel region waits for a thread that the kernel has descheduled: a training
step of the tiny model then costs many times its quiet time.

Passive waiting (`OMP_WAIT_POLICY=PASSIVE`: sleep at once) removes that, but on a machine where
waking a sleeping thread is slow it makes every parallel region pay the wake-up, and a quiet step
costs far more than with torch's default. A short spin (`GOMP_SPINCOUNT=3000`) keeps a thread awake
across the back-to-back regions of one step and still gives the core up soon: beside a competing
process it mostly stays within the loaded target, as passive waiting does, at close to torch's
quiet speed; longer spins fail the loaded target (`benchmarks/train_under_load.py` measures all of
these; the README has the numbers).

The defaults name both: libgomp (the Linux wheels) takes an explicit `GOMP_SPINCOUNT` over the
spin count that `OMP_WAIT_POLICY=PASSIVE` implies (zero), so it spins briefly; an OpenMP runtime
that does not read `GOMP_SPINCOUNT` (LLVM's libomp, as in the macOS wheels) still reads the
standard `OMP_WAIT_POLICY` and waits passively.

libgomp reads its environment once, when it is loaded, which is when torch is first imported; so
`configure_threads` has to run before that (the `unipan` command calls it before it imports
anything that imports torch). A wait setting the user put in the environment always wins: when
any of `WAIT_VARIABLES` is set, nothing is added (our spin count would override the one the
user's `OMP_WAIT_POLICY=ACTIVE` implies, our policy a libomp `KMP_BLOCKTIME`).

This module must not import torch.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping

logger = logging.getLogger(__name__)

DEFAULT_THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
"""Environment defaults for torch's OpenMP pool: idle threads spin briefly (libgomp), then sleep."""

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The variables that set how an idle OpenMP thread waits; the user's setting of any of them wins."""


def wait_setting_chosen(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment (default `os.environ`) sets any of `WAIT_VARIABLES`."""
    env = os.environ if environ is None else environ
    return any(k in env for k in WAIT_VARIABLES)


def configure_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put `DEFAULT_THREAD_ENV` into the environment unless the user chose how threads wait.

    Nothing is added when any of `WAIT_VARIABLES` is set, and a variable already set is never
    changed.

    Args:
        environ: the environment to change (default `os.environ`, for this process and its
            children).

    Returns:
        The variables it set (empty when the user had chosen a wait setting).
    """
    env = os.environ if environ is None else environ
    if wait_setting_chosen(env):
        return {}
    added = {k: v for k, v in DEFAULT_THREAD_ENV.items() if k not in env}
    env.update(added)
    if added and environ is None and "torch" in sys.modules:
        # the pool has read its settings already; the variables still reach child processes
        logger.debug("torch was imported before the thread defaults were set: %s apply to children only", added)
    return added
