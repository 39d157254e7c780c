"""Neural networks (despeckling nets, stain generators, PatchGAN), registry and checkpoints.

>>> from napari_confocal_stain.models import build_model, save_checkpoint, read_model
>>> net = build_model("unet", base_filters=32)
>>> save_checkpoint("unet32.safetensors", net, training={"epochs": 0})  # doctest: +SKIP
>>> net = read_model("unet32.safetensors")  # doctest: +SKIP

Running a model (on a device, over regions of any size) is
:mod:`napari_confocal_stain.inference`'s job: ``load_model(name, device="auto")``.
"""

from napari_confocal_stain.models.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    WEIGHTS_DIR,
    available_weights,
    known_limits,
    load_checkpoint,
    read_model,
    save_checkpoint,
)
from napari_confocal_stain.models.despeckle import SKIPS, DespeckleNN
from napari_confocal_stain.models.discriminator import (
    NLayerDiscriminator,
    patchgan_receptive_field,
)
from napari_confocal_stain.models.fast import FastGenerator
from napari_confocal_stain.models.flops import count_flops, flops_per_pixel
from napari_confocal_stain.models.generators import (
    AffineGenerator,
    ResnetBlock,
    ResnetGenerator,
    UNetGenerator,
)
from napari_confocal_stain.models.registry import (
    ModelSpec,
    architecture_of,
    available_models,
    build_model,
    model_spec,
    register_model,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "SKIPS",
    "WEIGHTS_DIR",
    "AffineGenerator",
    "DespeckleNN",
    "FastGenerator",
    "ModelSpec",
    "NLayerDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UNetGenerator",
    "architecture_of",
    "available_models",
    "available_weights",
    "build_model",
    "count_flops",
    "flops_per_pixel",
    "known_limits",
    "load_checkpoint",
    "model_spec",
    "patchgan_receptive_field",
    "read_model",
    "register_model",
    "save_checkpoint",
]
