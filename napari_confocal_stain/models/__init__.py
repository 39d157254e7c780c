"""Neural networks (despeckling nets, stain generators, PatchGAN), registry and checkpoints.

>>> from napari_confocal_stain.models import build_model, save_checkpoint, load_model
>>> net = build_model("unet", base_filters=32)
>>> save_checkpoint("unet32.safetensors", net, training={"epochs": 0})  # doctest: +SKIP
>>> net = load_model("unet32.safetensors", device="auto")  # doctest: +SKIP
"""

from napari_confocal_stain.models.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    WEIGHTS_DIR,
    available_weights,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from napari_confocal_stain.models.despeckle import SKIPS, DespeckleNN
from napari_confocal_stain.models.device import DeviceError, select_device
from napari_confocal_stain.models.discriminator import (
    NLayerDiscriminator,
    patchgan_receptive_field,
)
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
    "DeviceError",
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
    "load_checkpoint",
    "load_model",
    "model_spec",
    "patchgan_receptive_field",
    "register_model",
    "save_checkpoint",
    "select_device",
]
