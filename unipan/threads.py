"""Torch's CPU thread defaults for a machine that is not idle.

torch's CPU kernels run on an OpenMP pool (GNU libgomp in the PyPI wheels). Between parallel
regions its worker threads spin, waiting for the next one, before they sleep. On an idle machine
that saves the wake-up; with one other CPU-bound process on the same cores, the spinning threads
take the time slices the working thread needs, and every parallel region waits for a thread that
the kernel has descheduled: a training step of the tiny model then costs many times its quiet time.
Passive waiting (threads sleep in the kernel as soon as they are idle) removes that, at a small
cost on a quiet machine (`benchmarks/train_under_load.py` measures both).

libgomp reads its environment once, when it is loaded, which is when torch is first imported; so
`configure_threads` has to run before that (the `unipan` command calls it before it imports
anything that imports torch). A value the user put in the environment always wins.

This module must not import torch.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

DEFAULT_THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Environment defaults for torch's OpenMP pool: idle threads sleep instead of spinning."""


def configure_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put `DEFAULT_THREAD_ENV` into the environment, keeping every variable already set.

    Args:
        environ: the environment to change (default `os.environ`, for this process and its
            children).

    Returns:
        The variables it set (empty when the user had set them all).
    """
    env = os.environ if environ is None else environ
    added = {k: v for k, v in DEFAULT_THREAD_ENV.items() if k not in env}
    env.update(added)
    if added and environ is None and "torch" in sys.modules:
        # the pool has read its settings already; the variables still reach child processes
        logger.debug("torch was imported before the thread defaults were set: %s apply to children only", added)
    return added
