"""Pieces of every training loop: learning-rate decay, early stop, progress bar, loss checks.

Each trainer's loop is ``for it in progress_bar(start, stop, total, ...)``: it starts at the
restored iteration and ends at ``stop_at`` (a time-boxed job, continued later by ``--resume``)
or at the end of the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from tqdm import tqdm

__all__ = ["check_finite", "linear_decay", "progress_bar", "set_lr", "stop_iteration"]


def linear_decay(position: float, start: float, end: float, *, extra: float = 1.0) -> float:
    """1 until ``start``, then a line down: ``1 − (position − start) / (end − start + extra)``.

    ``extra = 1`` is CycleGAN's ``linear`` policy (the factor reaches 0 one step after
    ``end``); ``extra = 0`` reaches 0 at ``end``. Never below 0; 1 throughout when
    ``end ≤ start``.
    """
    if end <= start:
        return 1.0
    return max(0.0, 1.0 - max(0.0, position - start) / (end - start + extra))


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizers``."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def stop_iteration(total: int, stop_at: int | None) -> int:
    """Where this process stops: ``stop_at`` if set and sooner than ``total``."""
    return min(total, int(stop_at or total))


def progress_bar(start: int, stop: int, total: int, desc: str, enabled: bool) -> tqdm:
    """Iterations ``start … stop − 1`` with a bar that counts towards ``total``."""
    return tqdm(
        range(start, stop),
        desc=desc,
        initial=start,
        total=total,
        disable=not enabled,
        mininterval=5,
    )


def check_finite(values: Mapping[str, float], iteration: int) -> None:
    """Stop a run whose losses diverged instead of training on NaN for hours."""
    if not all(math.isfinite(v) for v in values.values()):
        raise FloatingPointError(f"non-finite loss at iteration {iteration}: {values}")
