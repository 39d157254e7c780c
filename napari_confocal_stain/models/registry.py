"""Models by name: each name is a class plus default constructor kwargs.

Checkpoints store an architecture name and the constructor kwargs; ``build_model(name,
**kwargs)`` rebuilds the network from them, so a checkpoint never needs to carry code.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from napari_confocal_stain.models.despeckle import DespeckleNN
from napari_confocal_stain.models.discriminator import NLayerDiscriminator
from napari_confocal_stain.models.fast import FastGenerator
from napari_confocal_stain.models.generators import (
    AffineGenerator,
    ResnetGenerator,
    UNetGenerator,
)
from napari_confocal_stain.models.light import LightGenerator
from napari_confocal_stain.models.limits import KWARG_LIMITS, KwargRule, kwarg_problems

DSCM_INPUT: Mapping[str, Any] = MappingProxyType({"input": "dscm", "range": [-1, 1]})
"""Generators read the Gareau linear stain (DSCM) scaled to [-1, 1] and write RGB in [-1, 1]."""
REFLECTANCE_INPUT: Mapping[str, Any] = MappingProxyType({"input": "reflectance", "range": [0, 1]})
"""Despecklers read and write reflectance in [0, 1]."""
RGB_INPUT: Mapping[str, Any] = MappingProxyType({"input": "rgb", "range": [-1, 1]})
"""The discriminator reads RGB (real H&E or generated) in [-1, 1]."""


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture.

    Attributes
    ----------
    name
        Registry name, e.g. ``"unet"``.
    cls
        The ``nn.Module`` class.
    kwargs
        Default constructor kwargs (``build_model`` overrides them).
    kind
        ``"generator"``, ``"despeckle"`` or ``"discriminator"``.
    normalization
        The input normalisation the model expects, stored in its checkpoints.
    description
        One line for listings.
    limits
        Rules for constructor kwargs that :data:`~napari_confocal_stain.models.limits.KWARG_LIMITS`
        does not cover (or overrides), for classes registered by training code. A checkpoint
        may only set kwargs that have a rule (see :func:`checked_kwargs`).
    """

    name: str
    cls: type[nn.Module]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "generator"
    normalization: Mapping[str, Any] = field(default_factory=lambda: DSCM_INPUT)
    description: str = ""
    limits: Mapping[str, KwargRule] = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}
# The name a bare class maps to when a checkpoint is saved without an explicit architecture.
_CANONICAL: dict[type[nn.Module], str] = {}


def register_model(spec: ModelSpec, *, canonical: bool = False) -> ModelSpec:
    """Add ``spec`` to the registry (training code may register its own variants).

    Parameters
    ----------
    spec
        The architecture to register; its name must be new.
    canonical
        Make ``spec.name`` the name recorded for instances of ``spec.cls`` by default.

    Returns
    -------
    ModelSpec
        ``spec``, for chaining.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"model name {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    if canonical or spec.cls not in _CANONICAL:
        _CANONICAL[spec.cls] = spec.name
    return spec


def available_models() -> tuple[str, ...]:
    """Registered architecture names, sorted."""
    return tuple(sorted(_REGISTRY))


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``.

    Raises
    ------
    KeyError
        Unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model architecture {name!r}; available: {', '.join(available_models())}"
        ) from None


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build the architecture ``name`` with its default kwargs updated by ``overrides``.

    Parameters
    ----------
    name
        A name from :func:`available_models`.
    **overrides
        Constructor kwargs replacing the registered defaults.

    Returns
    -------
    nn.Module
        A freshly initialised model in training mode, on the CPU. Its ``config`` attribute holds
        the full constructor kwargs.

    Raises
    ------
    KeyError
        Unknown name.
    TypeError, ValueError
        Bad kwargs (named in the message).
    """
    spec = model_spec(name)
    kwargs = {**spec.kwargs, **overrides}
    try:
        return spec.cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"build_model({name!r}, **{kwargs!r}): {exc}") from exc


def checked_kwargs(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The full constructor kwargs of ``name`` with ``overrides``, each checked against its limit.

    Unlike :func:`build_model`, which trusts its caller, this is for kwargs that come from a
    file: each must be a parameter of the class and satisfy its rule (type and range, see
    :mod:`napari_confocal_stain.models.limits`), so that building the architecture, even on the
    meta device, costs bounded time.

    Parameters
    ----------
    name
        A name from :func:`available_models`.
    overrides
        The kwargs to check; they replace the registered defaults.

    Returns
    -------
    dict
        ``{**defaults, **overrides}``.

    Raises
    ------
    KeyError
        Unknown name.
    ValueError
        An unknown kwarg, a wrong type or a value out of range (named in the message).
    """
    spec = model_spec(name)
    params = inspect.signature(spec.cls).parameters.values()
    accepted = (
        None
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        else [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    )
    problem = kwarg_problems(accepted, overrides, {**KWARG_LIMITS, **spec.limits})
    if problem is not None:
        raise ValueError(problem)
    return {**spec.kwargs, **overrides}


def architecture_of(model: nn.Module) -> str:
    """The canonical registry name of ``model``'s class (e.g. ``"unet"`` for a U-Net).

    Raises
    ------
    KeyError
        The class is not registered.
    """
    try:
        return _CANONICAL[type(model)]
    except KeyError:
        raise KeyError(f"{type(model).__name__} is not a registered model class") from None


for _spec, _canonical in [
    (
        ModelSpec(
            "affine",
            AffineGenerator,
            {},
            description="1×1 conv, identity on DSCM = the Gareau mapping (thesis baseline)",
        ),
        True,
    ),
    (
        ModelSpec(
            "resnet",
            ResnetGenerator,
            {"base_filters": 64, "n_down": 2, "n_blocks": 9},
            description="CycleGAN resnet_9blocks (Combalia et al. 2019)",
        ),
        True,
    ),
    (
        ModelSpec(
            "resnet-thesis",
            ResnetGenerator,
            {"base_filters": 64, "n_down": 3, "n_blocks": 9},
            description="ResNet with 3 downsamplings and 9 blocks (thesis §3.3.2)",
        ),
        False,
    ),
    (
        ModelSpec(
            "unet",
            UNetGenerator,
            {"base_filters": 64, "n_down": 3},
            description="U-Net with skip concatenations (thesis §3.3.2, fewer hallucinations)",
        ),
        True,
    ),
    (
        ModelSpec(
            "unet-light",
            UNetGenerator,
            {"base_filters": 32, "n_down": 3},
            description="U-Net with half the filters (~1/4 of the FLOPs) for CPU viewing",
        ),
        False,
    ),
    (
        ModelSpec(
            "light",
            LightGenerator,
            {"channels": [8, 16, 32, 64], "n_blocks": 3, "input_skip": True, "head_kernel": 3},
            description="light U-Net: 3×3 stem/head, residual bottleneck, input skip "
            "(≤ 1/4 of stain-unet's FLOPs)",
        ),
        True,
    ),
    (
        ModelSpec(
            "fast",
            FastGenerator,
            {"channels": [16, 32, 64, 128], "n_blocks": 2},
            description="norm-free U-Net on 2×2-folded input (pixel shuffle out), per-pixel "
            "input path: the CPU viewport's stain",
        ),
        True,
    ),
    (
        ModelSpec(
            "patchgan",
            NLayerDiscriminator,
            {"base_filters": 64, "n_layers": 3},
            kind="discriminator",
            normalization=RGB_INPUT,
            description="70×70 PatchGAN discriminator",
        ),
        True,
    ),
    (
        ModelSpec(
            "despeckle",
            DespeckleNN,
            {},
            kind="despeckle",
            normalization=REFLECTANCE_INPUT,
            description="DespeckleNN, any skip / depth / width (defaults: thesis best)",
        ),
        True,
    ),
    (
        ModelSpec(
            "despeckle-thesis",
            DespeckleNN,
            {"skip": "log-add", "layers": 3, "filters": 32, "kernel": 5},
            kind="despeckle",
            normalization=REFLECTANCE_INPUT,
            description="log-add skip, M=3, K=32, N=5 (thesis best, SSIM 0.960 at L=1)",
        ),
        False,
    ),
    (
        ModelSpec(
            "despeckle-combalia",
            DespeckleNN,
            {
                "skip": "multiplicative",
                "layers": 7,
                "filters": 64,
                "kernel": 3,
                "final_activation": "tanh",
            },
            kind="despeckle",
            normalization=REFLECTANCE_INPUT,
            description="multiplicative skip, 7×64 filters 3×3, tanh last (Combalia et al.)",
        ),
        False,
    ),
    (
        ModelSpec(
            "despeckle-dilated",
            DespeckleNN,
            {
                "skip": "log-add",
                "layers": 7,
                "filters": 64,
                "kernel": 3,
                "dilation": [1, 2, 3, 4, 3, 2, 1],
            },
            kind="despeckle",
            normalization=REFLECTANCE_INPUT,
            description="log-add skip, dilations 1,2,3,4,3,2,1 (ID-CNN, Wang et al. 2017)",
        ),
        False,
    ),
]:
    register_model(_spec, canonical=_canonical)
del _spec, _canonical
