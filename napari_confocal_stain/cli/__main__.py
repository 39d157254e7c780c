"""``python -m napari_confocal_stain.cli``: the same as ``confocal-stain``."""

import sys

from napari_confocal_stain.cli import main

sys.exit(main())
