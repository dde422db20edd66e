"""Training GuideNet and RefineNet from annotated slides or patch pairs.

- :mod:`wsiseg.train.inputs`     annotation files matched to slides, mask images, patch pairs
- :mod:`wsiseg.train.labels`     labelled slides (store + label raster)
- :mod:`wsiseg.train.sampling`   class-balanced patches, the slide split
- :mod:`wsiseg.train.augment`    flips / quarter-turns, HED stain jitter
- :mod:`wsiseg.train.losses`     BCE, soft Dice, IoU
- :mod:`wsiseg.train.loop`       the shared loop: time budget, validation, best weights,
  resumable safetensors checkpoints
- :mod:`wsiseg.train.setup`      one run's model, optimiser, GradScaler, checkpoint (all three)
- :mod:`wsiseg.train.guidenet`   :func:`train_guidenet`
- :mod:`wsiseg.train.refinenet`  :func:`train_refinenet`
- :mod:`wsiseg.train.scribble2label`  GuideNet from scribbles alone, with
  :mod:`~wsiseg.train.scribbled` (scribbled items) and :mod:`~wsiseg.train.pseudo`
  (pseudo-labels)

``train_guidenet``, ``train_refinenet`` and ``TrainResult`` are importable from here; torch is
imported on first use only.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainResult", "train_guidenet", "train_refinenet"]


def __getattr__(name: str) -> Any:
    if name == "train_guidenet":
        from wsiseg.train.guidenet import train_guidenet

        return train_guidenet
    if name == "train_refinenet":
        from wsiseg.train.refinenet import train_refinenet

        return train_refinenet
    if name == "TrainResult":
        from wsiseg.train.loop import TrainResult

        return TrainResult
    raise AttributeError(f"module 'wsiseg.train' has no attribute {name!r}")
