"""``python -m training <command>``: data preparation, training and evaluation.

Commands (each has ``--help``):

``extract-crops``  tissue crops from confocal mosaics and H&E slides (+ pseudo-confocal pairs)
``despeckle``      train DespeckleNN variants on synthetic speckle, write the SSIM/PSNR table
``cyclegan``       train a CycleGAN stain model (linear stain → H&E), resumable
``distill``        distil a stain model into a light student (issue 8), resumable
``gan-poc``        the thesis's GAN proof of concept (MSE vs adversarial, KS test)
``evaluate``       score stain models and despecklers on held-out data
``calibrate``      calibrate a stain model's hallucination flags (thresholds into its checkpoint)

Every command reads a configuration: defaults, then ``--config`` (a preset name such as
``smoke`` / ``full`` / ``cpu`` from ``training/configs/``, or a JSON / TOML file), then
``--set key.sub=value`` overrides, then the explicit flags (``--out``, ``--device`` …).
``${NCS_DATA}`` in a config means ``$NCS_DATA`` or ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Not training.runstate: it imports torch, and `--help` should answer at once.
CONFIG_DIR = Path(__file__).parent / "configs"


def _presets(command: str) -> str:
    stem = command.replace("-", "_") + "_"
    names = sorted({p.stem[len(stem) :] for p in CONFIG_DIR.glob(f"{stem}*")})
    return ", ".join(names) or "none"


def _add_common(p: argparse.ArgumentParser, command: str, *, device: bool = True) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=None,
        help=f"preset name ({_presets(command)}) or a JSON/TOML file; default: built-in "
        "defaults (the full recipe)",
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
    if device:
        p.add_argument(
            "--device", default=None, help="auto, cpu, cuda, cuda:N or mps (config: device)"
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration and exit"
    )


def _resolve(args: argparse.Namespace, defaults: dict, command: str) -> dict[str, Any]:
    from training.runstate import apply_overrides, load_config

    config = apply_overrides(load_config(args.config, defaults, command), args.set)
    for key in ("out", "seed", "device"):
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config


def _cmd_extract(args: argparse.Namespace) -> int:
    from training.data import EXTRACT_DEFAULTS, run_extract_crops

    config = _resolve(args, EXTRACT_DEFAULTS, "extract-crops")
    if args.cm:
        config["cm"] = args.cm
    if args.he:
        config["he"] = args.he
    if args.pseudo:
        config["pseudo"] = True
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    counts = run_extract_crops(config, progress=not args.no_progress)
    print(json.dumps({"out": str(config["out"]), "crops": counts}))
    return 0


def _cmd_despeckle(args: argparse.Namespace) -> int:
    from training.despeckle import DEFAULTS, run_despeckle
    from training.evaluate import markdown_table

    config = _resolve(args, DEFAULTS, "despeckle")
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    rows = run_despeckle(config, resume=args.resume, progress=not args.no_progress)
    from training.despeckle import TABLE_COLUMNS

    print(markdown_table(rows, TABLE_COLUMNS))
    return 0


def _cmd_cyclegan(args: argparse.Namespace) -> int:
    from training.cyclegan import DEFAULTS, run_cyclegan

    config = _resolve(args, DEFAULTS, "cyclegan")
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    result = run_cyclegan(config, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from training.distill import DEFAULTS, run_distill

    config = _resolve(args, DEFAULTS, "distill")
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    result = run_distill(config, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_gan_poc(args: argparse.Namespace) -> int:
    from training.gan_poc import DEFAULTS, run_gan_poc

    config = _resolve(args, DEFAULTS, "gan-poc")
    if args.seed is not None:
        config["seeds"] = [args.seed]
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    run_gan_poc(config, progress=not args.no_progress)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import DEFAULTS, markdown_table, run_evaluate

    config = _resolve(args, DEFAULTS, "evaluate")
    if args.stain is not None:
        config["stain"] = args.stain
    if args.despeckle is not None:
        config["despeckle"] = args.despeckle
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    result = run_evaluate(config)
    from training.evaluate import STAIN_COLUMNS

    if result["stain"]:
        print(markdown_table(result["stain"], STAIN_COLUMNS))
    if result["despeckle"]:
        print(markdown_table(result["despeckle"], list(result["despeckle"][0])))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import DEFAULTS, run_calibrate

    config = _resolve(args, DEFAULTS, "calibrate")
    for key in ("model", "card"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.in_place:
        config["in_place"] = True
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    print(json.dumps(run_calibrate(config, progress=not args.no_progress), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate the napari-confocal-stain models (despeckling, "
        "CycleGAN stain) and reproduce the thesis's GAN proof of concept.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser(
        "extract-crops",
        help="tissue crops from CM mosaics / H&E slides",
        description="Cut tissue crops (Otsu mask + minimum mean grey level on "
        "every mode) from confocal mosaics and H&E slides (resized to "
        "0.75 um/px), split by slide, with a manifest.csv.",
    )
    _add_common(p, "extract-crops", device=False)
    p.add_argument(
        "--cm",
        nargs="+",
        default=None,
        help="confocal mosaics (any open_mosaic "
        "input: Vivascope folder, R/F TIFF pair folder, 2-channel TIFF / OME-Zarr)",
    )
    p.add_argument("--he", nargs="+", default=None, help="H&E slides (.svs/.tif/.png/.jpg)")
    p.add_argument(
        "--pseudo", action="store_true", help="also write pseudo-confocal R/F of every H&E crop"
    )
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "despeckle",
        help="train despeckling networks",
        description="Train DespeckleNN variants on synthetic multiplicative "
        "speckle (gamma, uniform, Rayleigh, Gaussian) of clean images (inverted "
        "luma of H&E) and write an SSIM/PSNR table (CSV + Markdown).",
    )
    _add_common(p, "despeckle")
    p.add_argument("--resume", action="store_true", help="continue from the last state")
    p.set_defaults(func=_cmd_despeckle)

    p = sub.add_parser(
        "cyclegan",
        help="train a CycleGAN stain model",
        description="Train a CycleGAN (LSGAN, cycle 10, identity 5, Adam 2e-4, "
        "pool 50, linear decay, crop schedule) from linear-stained confocal or "
        "pseudo-confocal crops to H&E.",
    )
    _add_common(p, "cyclegan")
    p.add_argument("--resume", action="store_true", help="continue from out/state.safetensors")
    p.set_defaults(func=_cmd_cyclegan)

    p = sub.add_parser(
        "distill",
        help="distil a stain model into a light student",
        description="Train a light stain generator (default: the 'light' architecture) to "
        "reproduce a trained stain model (default: stain-unet) on pseudo-confocal crops, "
        "optionally with the hematoxylin-F structure loss; writes student.safetensors.",
    )
    _add_common(p, "distill")
    p.add_argument("--resume", action="store_true", help="continue from out/state.safetensors")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser(
        "gan-poc",
        help="GAN proof of concept (thesis §4.1)",
        description="Fit N(0, 1) with a 3-layer generator by MSE and by an "
        "adversarial loss; print the KS statistic and p-value of 300 samples.",
    )
    _add_common(p, "gan-poc", device=False)
    p.set_defaults(func=_cmd_gan_poc)

    p = sub.add_parser(
        "evaluate",
        help="evaluate stain models and despecklers",
        description="Score stain checkpoints on held-out pseudo-confocal pairs "
        "(SSIM, LBP chi2, nuclei preservation) and despecklers (PSNR, SSIM).",
    )
    _add_common(p, "evaluate")
    p.add_argument(
        "--stain",
        nargs="*",
        default=None,
        help="stain checkpoints or bundled names (default: stain-unet)",
    )
    p.add_argument(
        "--despeckle",
        nargs="*",
        default=None,
        help="despeckle checkpoints or bundled names (default: despeckle-combalia)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "calibrate",
        help="calibrate a stain model's hallucination flags",
        description="Stain known-good held-out pairs with the model, set each flag "
        "signal's threshold per cell size for a target false-flag rate, and write a "
        "checkpoint with the same tensors and the calibration in its metadata "
        "(extra.flag_calibration), plus a model-card section.",
    )
    _add_common(p, "calibrate")
    p.add_argument("--model", default=None, help="bundled name or checkpoint (config: model)")
    p.add_argument(
        "--in-place", action="store_true", help="rewrite the model's checkpoint file itself"
    )
    p.add_argument(
        "--card", default=None, help="model card to update (default: <out>.md if it exists)"
    )
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a ``python -m training`` command; errors become one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    from napari_confocal_stain.errors import ConfocalStainError

    try:
        return func(args)
    except (ConfocalStainError, ValueError, FileExistsError, KeyError) as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
