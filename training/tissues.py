"""The tissue-wise split of the project's real H&E: which images train, which only evaluate.

Evaluation images are never trained on. The one large slide (CC0 CMU-1-Small-Region, skin-like
squamous epithelium) is split into horizontal bands, as everywhere in :mod:`training`: bands
0, 1, 3, 4 train, 2 and 5 are held out. The other images are split whole, at least one of each
tissue kind held out (``../shared/data/SOURCES.md`` describes them): oral squamous cell
carcinoma at 20× and at 40×, breast TMA carcinoma, a carcinoma in fibrous stroma (the only
image of its kind, so never trained on), and stardist's dense tumour ``histo.jpg``. The
held-out images include every image the hallucination flags are evaluated on
(``docs/flags.md``), so a flag evaluation never runs on tissue the model was trained on.

Pixel sizes: as recorded by the source where it says; the UCSB breast TMA (~0.5 µm/px) and the
40× oral images (~0.25 µm/px, a 40× objective on a typical camera) are estimates from nuclear
sizes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HELDOUT_IMAGES", "TRAIN_IMAGES", "image_entries"]

TRAIN_IMAGES: tuple[dict[str, Any], ...] = (
    {"path": "${NCS_DATA}/he/extra/ocdc_1009009_r31c0.jpg", "pixel_size_um": 0.5025},
    {"path": "${NCS_DATA}/he/extra/rahman_OSCC_400x_1.jpg", "pixel_size_um": 0.25},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma10_010704_benign1_ccd.png", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma12_010804_malignant1_ccd.jpg", "pixel_size_um": 0.5},
)
"""Whole images trained on (besides the training bands of the CC0 slide)."""

HELDOUT_IMAGES: tuple[dict[str, Any], ...] = (
    {"path": "${NCS_DATA}/he/histo.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ocdc_1009009_r27c10.jpg", "pixel_size_um": 0.5025},
    {"path": "${NCS_DATA}/he/extra/rahman_OSCC_400x_13.jpg", "pixel_size_um": 0.25},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma10_010704_malignant1_ccd.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma23_022103_malignant1_ccd.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/ucsb_ytma49_042003_malignant1_ccd.jpg", "pixel_size_um": 0.5},
    {"path": "${NCS_DATA}/he/extra/openslide_os1_detail.png", "pixel_size_um": 0.227},
)
"""Whole images only evaluated on (with the held-out bands 2 and 5 of the CC0 slide)."""


def image_entries(kind: str) -> list[dict[str, Any]]:
    """Copies of :data:`TRAIN_IMAGES` (``"train"``) or :data:`HELDOUT_IMAGES` (``"heldout"``)."""
    table = {"train": TRAIN_IMAGES, "heldout": HELDOUT_IMAGES}[kind]
    return [dict(e) for e in table]
