"""Reproduce and retrain the napari-confocal-stain models.

Run ``python -m training --help``. The architectures come from
:mod:`napari_confocal_stain.models` (imported, never copied); this package adds, one module
per concept (``docs/training.md`` has the map):

* the commands — :mod:`training.crops` (``extract-crops``), :mod:`training.despeckle`,
  :mod:`training.cyclegan`, :mod:`training.distill`, :mod:`training.gan_poc` and
  :mod:`training.evaluate`, registered in :mod:`training.__main__`;
* what they share — :mod:`training.data` (regions, splits, pseudo-confocal pairs, samplers),
  :mod:`training.noise` (speckle), :mod:`training.structure` (the hematoxylin loss),
  :mod:`training.validation` (held-out scores and their columns), :mod:`training.config`,
  :mod:`training.runstate` (resume), :mod:`training.loop`, :mod:`training.tables` (CSV /
  Markdown) and :mod:`training.images` (PNG).
"""
