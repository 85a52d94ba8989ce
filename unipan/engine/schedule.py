"""SGD and learning-rate schedules: linear warmup followed by a step or a poly decay.

The schedules are `torch.optim.lr_scheduler.LRScheduler` subclasses whose lr at iteration `i`
(0-based, counting optimizer steps) is a closed-form function of `i`, so a scheduler restored
from a checkpoint continues exactly. Their `state_dict` holds only progress (`last_epoch`,
`base_lrs`): the shape of the schedule (steps, gamma, max_iter, power, warmup) comes from the
config, so resuming with a longer `max_iter` extends the schedule instead of silently keeping
the old one.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from unipan.config import SolverConfig

# Normalisation layers whose affine parameters get no weight decay: decaying a norm's scale
# towards zero fights the normalisation itself (detectron2's WEIGHT_DECAY_NORM = 0 default).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def warmup_factor_at(iteration: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear warmup multiplier: `warmup_factor` at iteration 0 rising to 1 at `warmup_iters`."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


class _WarmupLR(LRScheduler):
    """Base: lr_i = base_lr * warmup(i) * decay(i); subclasses define `decay`."""

    def __init__(self, optimizer: Optimizer, warmup_iters: int, warmup_factor: float, last_epoch: int = -1) -> None:
        if warmup_iters < 0:
            raise ValueError(f"solver.warmup_iters must be >= 0, got {warmup_iters}")
        if not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f"solver.warmup_factor must be in (0, 1], got {warmup_factor}")
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, last_epoch)

    def decay(self, iteration: int) -> float:
        raise NotImplementedError

    def factor(self, iteration: int) -> float:
        """The multiplier of every base lr at optimizer step `iteration` (0-based)."""
        return warmup_factor_at(iteration, self.warmup_iters, self.warmup_factor) * self.decay(iteration)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def state_dict(self) -> dict[str, Any]:
        # progress only; the schedule's shape is re-read from the config on resume
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "_step_count": self._step_count,
            "_last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"last_epoch", "base_lrs"} - set(state_dict)
        if missing:
            raise KeyError(f"scheduler state lacks {sorted(missing)}")
        if len(state_dict["base_lrs"]) != len(self.base_lrs):
            raise ValueError(
                f"scheduler state has {len(state_dict['base_lrs'])} parameter groups, "
                f"the optimizer has {len(self.base_lrs)}"
            )
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        # put the optimizer's lr where the restored progress says it is
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs


class WarmupStepLR(_WarmupLR):
    """Linear warmup, then lr multiplied by `gamma` at each iteration in `steps`.

    lr_i = base_lr * warmup(i) * gamma ** (number of steps <= i).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        steps: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        steps = [int(s) for s in steps]
        if list(steps) != sorted(steps):
            raise ValueError(f"solver.steps must be increasing, got {steps}")
        if gamma <= 0:
            raise ValueError(f"solver.gamma must be > 0, got {gamma}")
        self.steps = steps
        self.gamma = gamma
        super().__init__(optimizer, warmup_iters, warmup_factor, last_epoch)

    def decay(self, iteration: int) -> float:
        return self.gamma ** bisect_right(self.steps, iteration)


class WarmupPolyLR(_WarmupLR):
    """Linear warmup, then polynomial decay to 0 at `max_iter`.

    lr_i = base_lr * warmup(i) * (1 - i / max_iter) ** power  (0 from max_iter on).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_iter: int,
        power: float = 0.9,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        if max_iter <= 0:
            raise ValueError(f"solver.max_iter must be > 0, got {max_iter}")
        if power <= 0:
            raise ValueError(f"solver.poly_power must be > 0, got {power}")
        self.max_iter = max_iter
        self.power = power
        super().__init__(optimizer, warmup_iters, warmup_factor, last_epoch)

    def decay(self, iteration: int) -> float:
        return max(0.0, 1.0 - iteration / self.max_iter) ** self.power


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters of `model`, in parameter groups.

    Weight decay applies to every trainable parameter except the affine parameters of
    normalisation layers (BatchNorm/GroupNorm/LayerNorm/InstanceNorm). Biases of the other
    layers get lr x `cfg.bias_lr_factor` and weight decay `cfg.weight_decay_bias` (None = the
    weight decay); with the defaults (1.0, None) they are decayed like the weights, as in the
    reference Mask R-CNN and detectron2 setups, and share the weights' group. Frozen parameters
    (requires_grad False, e.g. the stem under `freeze_at`) are left out.

    Returns:
        an SGD optimizer with up to three parameter groups, in this order: "decay" (the base lr
        and weight decay; the trainer logs its lr), "no_decay" (norm layers), "bias" (only when
        biases differ from the weights), each carrying its `name`. A group's "lr" is its base
        lr, which the schedulers scale.

    Raises:
        ValueError: bad solver values, or a model without trainable parameters.
    """
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise ValueError(f"solver.lr must be a positive number, got {cfg.lr}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ValueError(f"solver.momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise ValueError(f"solver.weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.bias_lr_factor <= 0 or not math.isfinite(cfg.bias_lr_factor):
        raise ValueError(f"solver.bias_lr_factor must be a positive number, got {cfg.bias_lr_factor}")
    bias_decay = cfg.weight_decay if cfg.weight_decay_bias is None else cfg.weight_decay_bias
    if bias_decay < 0:
        raise ValueError(f"solver.weight_decay_bias must be >= 0, got {cfg.weight_decay_bias}")
    # biases get their own group only when they differ: the default keeps the two-group layout
    # (and so the optimizer state of checkpoints written before the bias settings existed)
    separate_bias = cfg.bias_lr_factor != 1.0 or bias_decay != cfg.weight_decay
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    bias: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, _NORM_TYPES):
                no_decay.append(param)
            elif separate_bias and name == "bias":
                bias.append(param)
            else:
                decay.append(param)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "name": "no_decay"})
    if bias:
        groups.append({"params": bias, "lr": cfg.lr * cfg.bias_lr_factor, "weight_decay": bias_decay, "name": "bias"})
    if not groups:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: SolverConfig, optimizer: Optimizer) -> _WarmupLR:
    """WarmupStepLR or WarmupPolyLR from `cfg.schedule`.

    Raises:
        ValueError: unknown schedule name, or bad schedule values.
    """
    if cfg.schedule == "step":
        return WarmupStepLR(
            optimizer, cfg.steps, gamma=cfg.gamma, warmup_iters=cfg.warmup_iters, warmup_factor=cfg.warmup_factor
        )
    if cfg.schedule == "poly":
        return WarmupPolyLR(
            optimizer,
            cfg.max_iter,
            power=cfg.poly_power,
            warmup_iters=cfg.warmup_iters,
            warmup_factor=cfg.warmup_factor,
        )
    raise ValueError(f"solver.schedule must be 'step' or 'poly', got {cfg.schedule!r}")
