"""Bounds on the constructor kwargs a checkpoint may ask for.

A checkpoint names an architecture and the kwargs that rebuild it, so the file, not our code,
chooses those numbers. Before anything is built from them every kwarg is checked here: its
JSON type and a range. Building on the ``meta`` device allocates no tensor memory, but its
time still grows with the number of modules (a million residual blocks are a million Python
objects), so the counts are bounded too. The ranges are one to two orders of magnitude above
anything this package trains (thesis and CycleGAN sizes: 64 base filters, 9 blocks, 3–7
downsamplings, 7 despeckling layers) and building the largest allowed architecture on the meta
device takes about 0.2 s.

=====================================  ==================================================
kwarg                                  allowed
=====================================  ==================================================
``in_channels``, ``out_channels``      int, 1 … 64
``base_filters``, ``max_filters``,     int, 1 … 8192
``filters``
``channels``                           list of 2 … 13 ints, each 1 … 8192
``n_down``                             int, 0 … 12
``n_layers``                           int, 1 … 12
``n_blocks``                           int, 0 … 256
``layers``                             int, 1 … 256
``kernel``, ``head_kernel``            int, 1 … 31
``dilation``                           int 1 … 64, or a list of 1 … 256 such ints
``skip``                               one of :data:`~napari_confocal_stain.models.SKIPS`
``final_activation``                   null, ``"tanh"``, ``"relu"``, ``"sigmoid"``,
                                       ``"softplus"``
``norm``                               ``"instance"`` or ``"none"``
``input_skip``, ``clamp_output``,      true or false
``detail``
``eps``, ``div_eps``                   number, 0 < x ≤ 1
=====================================  ==================================================

Besides the kwargs, a loaded architecture may hold at most :data:`MAX_PARAMETERS` parameters
(1 GiB of float32; the largest bundled model has 1.8 M, CycleGAN's ResNet 11.4 M).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from napari_confocal_stain.models.despeckle import ACTIVATIONS, SKIPS

__all__ = [
    "KWARG_LIMITS",
    "MAX_PARAMETERS",
    "Either",
    "Flag",
    "FloatRange",
    "IntList",
    "IntRange",
    "KwargRule",
    "OneOf",
    "kwarg_problems",
]

MAX_PARAMETERS = 2**28
"""Most parameters (tensor elements) a loaded architecture may hold."""


class KwargRule:
    """A constraint on one kwarg value: :meth:`problem` says what is wrong, or None."""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def __str__(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, a subclass of int: not a count.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class IntRange(KwargRule):
    """An int (not a bool) in ``lo … hi``."""

    lo: int
    hi: int

    def problem(self, value: Any) -> str | None:
        if not _is_int(value):
            return f"is a {type(value).__name__}, expected {self}"
        if not self.lo <= value <= self.hi:
            return f"is out of range, expected {self}"
        return None

    def __str__(self) -> str:
        return f"an int from {self.lo} to {self.hi}"


@dataclass(frozen=True)
class IntList(KwargRule):
    """A list of ``min_len … max_len`` ints, each in ``lo … hi``."""

    min_len: int
    max_len: int
    lo: int
    hi: int

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return f"is a {type(value).__name__}, expected {self}"
        if not self.min_len <= len(value) <= self.max_len:
            return f"has {len(value)} entries, expected {self}"
        if not all(_is_int(v) and self.lo <= v <= self.hi for v in value):
            return f"is not {self}"
        return None

    def __str__(self) -> str:
        return f"a list of {self.min_len} to {self.max_len} ints from {self.lo} to {self.hi}"


@dataclass(frozen=True)
class FloatRange(KwargRule):
    """A finite number ``x`` with ``lo < x ≤ hi``."""

    lo: float
    hi: float

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"is a {type(value).__name__}, expected {self}"
        if not (math.isfinite(value) and self.lo < value <= self.hi):
            return f"is out of range, expected {self}"
        return None

    def __str__(self) -> str:
        return f"a number above {self.lo:g} and at most {self.hi:g}"


@dataclass(frozen=True)
class Flag(KwargRule):
    """``true`` or ``false``."""

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"is a {type(value).__name__}, expected {self}"

    def __str__(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class OneOf(KwargRule):
    """One of a few values (strings or None)."""

    values: tuple[Any, ...]

    def problem(self, value: Any) -> str | None:
        # Compare types too: JSON 1 must not pass for True, nor 0 for a missing None.
        ok = any(type(value) is type(v) and value == v for v in self.values)
        return None if ok else f"is not {self}"

    def __str__(self) -> str:
        return "one of " + ", ".join("null" if v is None else repr(v) for v in self.values)


@dataclass(frozen=True)
class Either(KwargRule):
    """A value that satisfies any one of ``rules``."""

    rules: tuple[KwargRule, ...]

    def problem(self, value: Any) -> str | None:
        if any(rule.problem(value) is None for rule in self.rules):
            return None
        return f"is not {self}"

    def __str__(self) -> str:
        return " or ".join(str(rule) for rule in self.rules)


_CHANNELS = IntRange(1, 8192)

KWARG_LIMITS: Mapping[str, KwargRule] = MappingProxyType(
    {
        "in_channels": IntRange(1, 64),
        "out_channels": IntRange(1, 64),
        "base_filters": _CHANNELS,
        "max_filters": _CHANNELS,
        "filters": _CHANNELS,
        "channels": IntList(2, 13, 1, 8192),
        "n_down": IntRange(0, 12),
        "n_layers": IntRange(1, 12),
        "n_blocks": IntRange(0, 256),
        "layers": IntRange(1, 256),
        "kernel": IntRange(1, 31),
        "head_kernel": IntRange(1, 31),
        "dilation": Either((IntRange(1, 64), IntList(1, 256, 1, 64))),
        "skip": OneOf(tuple(SKIPS)),
        "final_activation": OneOf((None, *ACTIVATIONS)),
        "norm": OneOf(("instance", "none")),
        "input_skip": Flag(),
        "clamp_output": Flag(),
        "detail": Flag(),
        "eps": FloatRange(0.0, 1.0),
        "div_eps": FloatRange(0.0, 1.0),
    }
)
"""The rule for each constructor kwarg of the registered classes, by name."""


def kwarg_problems(
    accepted: Sequence[str] | None,
    kwargs: Mapping[str, Any],
    limits: Mapping[str, KwargRule],
) -> str | None:
    """The first thing wrong with ``kwargs``, in words, or None.

    Parameters
    ----------
    accepted
        The constructor's parameter names (``None``: it takes ``**kwargs``, any name goes).
    kwargs
        The kwargs to check (only these; defaults are trusted code).
    limits
        The rule of each name.
    """
    for key, value in kwargs.items():
        if not isinstance(key, str):
            return f"kwarg name {key!r} is not a string"
        if accepted is not None and key not in accepted:
            return f"unknown kwarg {key!r} (it takes {', '.join(accepted)})"
        rule = limits.get(key)
        if rule is None:
            return f"kwarg {key!r} has no declared limits (register them in ModelSpec.limits)"
        problem = rule.problem(value)
        if problem is not None:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            return f"{key}={shown} {problem}"
    return None
