"""``python -m training <command>``: data preparation, training and evaluation.

Commands (each has ``--help``; :data:`COMMANDS` is the registry):

``extract-crops``  tissue crops from confocal mosaics and H&E slides (+ pseudo-confocal pairs)
``despeckle``      train DespeckleNN variants on synthetic speckle, write the SSIM/PSNR table
``cyclegan``       train a CycleGAN stain model (linear stain → H&E), resumable
``distill``        distil a stain model into a light student, resumable
``supervised``     train a stain model on real H&E and its pseudo-confocal pair, resumable
``gan-poc``        the thesis's GAN proof of concept (MSE vs adversarial, KS test)
``evaluate``       score stain models and despecklers on held-out data
``calibrate``      calibrate a stain model's hallucination flags (thresholds into its checkpoint)

Every command reads a configuration: defaults, then ``--config`` (a preset name such as
``smoke`` / ``full`` / ``cpu`` from ``training/configs/``, or a JSON / TOML file), then
``--set key.sub=value`` overrides, then the explicit flags (``--out``, ``--device`` …).
``${NCS_DATA}`` in a config means ``$NCS_DATA`` or ``../shared/data`` beside the repository.

A command is one :class:`Command` entry: its module (imported only when the command runs, so
``--help`` answers without loading torch) provides ``DEFAULTS`` and the function that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from training.config import apply_overrides, load_config, presets

__all__ = ["COMMANDS", "Command", "Option", "build_parser", "main"]


@dataclass(frozen=True)
class Option:
    """A command's own option: when given, its value replaces ``config[key]``."""

    flags: tuple[str, ...]
    key: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def _json(result: Any, config: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=2)


@dataclass(frozen=True)
class Command:
    """One ``python -m training`` subcommand.

    Attributes
    ----------
    name
        The subcommand; its presets are ``configs/<name with _>_<preset>.json``.
    run
        ``"module:function"``; the module also holds ``DEFAULTS``. The function is called
        with the resolved config, plus ``resume=`` if :attr:`resume` and ``progress=`` if
        :attr:`progress`.
    help, description
        For ``--help``.
    options
        Options beyond the common ones.
    device
        Has ``--device``.
    resume
        Has ``--resume``: its help text.
    progress
        ``run`` takes ``progress=``.
    show
        What to print from ``run``'s result (and the config); None prints nothing.
    prepare
        Adjusts the resolved config from the arguments, for what :attr:`options` cannot say.
    """

    name: str
    run: str
    help: str
    description: str
    options: tuple[Option, ...] = ()
    device: bool = True
    resume: str | None = None
    progress: bool = True
    show: Callable[[Any, Mapping[str, Any]], str | None] = _json
    prepare: Callable[[dict[str, Any], argparse.Namespace], None] | None = None


def _show_crops(counts: Any, config: Mapping[str, Any]) -> str:
    return json.dumps({"out": str(config["out"]), "crops": counts})


def _show_despeckle(rows: Any, config: Mapping[str, Any]) -> str:
    from training.despeckle import TABLE_COLUMNS
    from training.tables import markdown_table

    return markdown_table(rows, TABLE_COLUMNS)


def _show_evaluate(result: Any, config: Mapping[str, Any]) -> str | None:
    from training.evaluate import DESPECKLE_COLUMNS, STAIN_COLUMNS
    from training.tables import markdown_table

    tables = [
        markdown_table(result[key], columns)
        for key, columns in (("stain", STAIN_COLUMNS), ("despeckle", DESPECKLE_COLUMNS))
        if result[key]
    ]
    return "\n".join(tables) or None


def _gan_poc_seed(config: dict[str, Any], args: argparse.Namespace) -> None:
    if args.seed is not None:
        config["seeds"] = [args.seed]


_RESUME = "continue from out/state.safetensors"

COMMANDS: tuple[Command, ...] = (
    Command(
        "extract-crops",
        "training.crops:run_extract_crops",
        help="tissue crops from CM mosaics / H&E slides",
        description="Cut tissue crops (Otsu mask + minimum mean grey level on every mode) "
        "from confocal mosaics and H&E slides (resized to 0.75 um/px), split by slide, with "
        "a manifest.csv.",
        options=(
            Option(
                ("--cm",),
                "cm",
                {
                    "nargs": "+",
                    "help": "confocal mosaics (any open_mosaic input: Vivascope folder, R/F "
                    "TIFF pair folder, 2-channel TIFF / OME-Zarr)",
                },
            ),
            Option(("--he",), "he", {"nargs": "+", "help": "H&E slides (.svs/.tif/.png/.jpg)"}),
            Option(
                ("--pseudo",),
                "pseudo",
                {
                    "action": "store_true",
                    "help": "also write pseudo-confocal R/F of every H&E crop",
                },
            ),
        ),
        device=False,
        show=_show_crops,
    ),
    Command(
        "despeckle",
        "training.despeckle:run_despeckle",
        help="train despeckling networks",
        description="Train DespeckleNN variants on synthetic multiplicative speckle (gamma, "
        "uniform, Rayleigh, Gaussian) of clean images (inverted luma of H&E) and write an "
        "SSIM/PSNR table (CSV + Markdown).",
        resume="continue from the last state",
        show=_show_despeckle,
    ),
    Command(
        "cyclegan",
        "training.cyclegan:run_cyclegan",
        help="train a CycleGAN stain model",
        description="Train a CycleGAN (LSGAN, cycle 10, identity 5, Adam 2e-4, pool 50, "
        "linear decay, crop schedule) from linear-stained confocal or pseudo-confocal crops "
        "to H&E.",
        resume=_RESUME,
    ),
    Command(
        "distill",
        "training.distill:run_distill",
        help="distil a stain model into a light student",
        description="Train a light stain generator (default: the 'light' architecture) to "
        "reproduce a trained stain model (default: stain-unet) on pseudo-confocal crops, "
        "optionally with the hematoxylin-F structure loss; writes student.safetensors.",
        resume=_RESUME,
    ),
    Command(
        "supervised",
        "training.supervised:run_supervised",
        help="train a stain model on real H&E and its pseudo-confocal pair",
        description="Train a stain generator (default: the 'fast' architecture) with L1 + "
        "luminance SSIM to the true H&E of pseudo-confocal pairs from varied tissue, with HED "
        "stain, zoom (0.25-1 um/px) and detector augmentation; per-tissue held-out scores in "
        "val.csv; writes G.safetensors.",
        resume=_RESUME,
    ),
    Command(
        "gan-poc",
        "training.gan_poc:run_gan_poc",
        help="GAN proof of concept (thesis §4.1)",
        description="Fit N(0, 1) with a 3-layer generator by MSE and by an adversarial "
        "loss; print the KS statistic and p-value of 300 samples.",
        device=False,
        show=lambda result, config: None,
        prepare=_gan_poc_seed,
    ),
    Command(
        "evaluate",
        "training.evaluate:run_evaluate",
        help="evaluate stain models and despecklers",
        description="Score stain checkpoints on held-out pseudo-confocal pairs (SSIM, LBP "
        "chi2, nuclei preservation) and despecklers (PSNR, SSIM).",
        options=(
            Option(
                ("--stain",),
                "stain",
                {
                    "nargs": "*",
                    "help": "stain checkpoints or bundled names (default: every bundled stain "
                    "model)",
                },
            ),
            Option(
                ("--despeckle",),
                "despeckle",
                {
                    "nargs": "*",
                    "help": "despeckle checkpoints or bundled names (default: despeckle-combalia)",
                },
            ),
        ),
        progress=False,
        show=_show_evaluate,
    ),
    Command(
        "calibrate",
        "training.calibrate:run_calibrate",
        help="calibrate a stain model's hallucination flags",
        description="Stain known-good held-out pairs with the model, set each flag signal's "
        "threshold per cell size for a target false-flag rate, and write a checkpoint with "
        "the same tensors and the calibration in its metadata (extra.flag_calibration), plus "
        "a model-card section.",
        options=(
            Option(("--model",), "model", {"help": "bundled name or checkpoint (config: model)"}),
            Option(
                ("--in-place",),
                "in_place",
                {"action": "store_true", "help": "rewrite the model's checkpoint file itself"},
            ),
            Option(
                ("--card",),
                "card",
                {"help": "model card to update (default: <out>.md if it exists)"},
            ),
        ),
    ),
)
"""The subcommands, in the order ``--help`` lists them."""


def _add_arguments(p: argparse.ArgumentParser, command: Command) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"preset name ({', '.join(presets(command.name)) or 'none'}) or a JSON/TOML "
        "file; default: built-in defaults (the full recipe)",
    )
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. train.iterations=10 (JSON values)",
    )
    p.add_argument("--out", "-o", default=None, help="output folder (config: out)")
    p.add_argument("--seed", type=int, default=None, help="random seed (config: seed)")
    if command.device:
        p.add_argument(
            "--device", default=None, help="auto, cpu, cuda, cuda:N or mps (config: device)"
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )
    if command.resume is not None:
        p.add_argument("--resume", action="store_true", help=command.resume)
    for option in command.options:
        # None when absent, so an option only replaces the config entry when given.
        p.add_argument(*option.flags, dest=option.key, default=None, **option.kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate the napari-confocal-stain models (despeckling, "
        "CycleGAN stain) and reproduce the thesis's GAN proof of concept.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        _add_arguments(p, command)
        p.set_defaults(command_spec=command)
    return parser


def _resolve(args: argparse.Namespace, command: Command, defaults: dict) -> dict[str, Any]:
    """Defaults, then ``--config``, ``--set``, the common flags and the command's options."""
    config = apply_overrides(load_config(args.config, defaults, command.name), args.set)
    for key in ("out", "seed", "device"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    for option in command.options:
        value = getattr(args, option.key)
        if value is not None:
            config[option.key] = value
    if command.prepare is not None:
        command.prepare(config, args)
    return config


def _execute(command: Command, args: argparse.Namespace) -> int:
    module_name, function = command.run.split(":")
    module = importlib.import_module(module_name)
    config = _resolve(args, command, module.DEFAULTS)
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    kwargs: dict[str, Any] = {}
    if command.resume is not None:
        kwargs["resume"] = args.resume
    if command.progress:
        kwargs["progress"] = not args.no_progress
    text = command.show(getattr(module, function)(config, **kwargs), config)
    if text is not None:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``python -m training`` command; errors become one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    from napari_confocal_stain.errors import ConfocalStainError

    try:
        return _execute(args.command_spec, args)
    except (ConfocalStainError, ValueError, FileExistsError, KeyError) as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
