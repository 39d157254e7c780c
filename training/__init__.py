"""Reproduce and retrain the napari-confocal-stain models.

Run ``python -m training --help``. The architectures come from
:mod:`napari_confocal_stain.models` (imported, never copied); this package adds the data
preparation (:mod:`training.data`), speckle models (:mod:`training.noise`), the despeckling
and CycleGAN trainers (:mod:`training.despeckle`, :mod:`training.cyclegan`), the
structure-preserving losses (:mod:`training.structure`), distillation into a light generator
(:mod:`training.distill`), the thesis's GAN proof of concept (:mod:`training.gan_poc`) and
evaluation tables (:mod:`training.evaluate`). See ``docs/training.md``.
"""
