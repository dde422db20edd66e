"""Evaluation: interactive NoI / SPI with a simulated pathologist, and IoU / Dice / PAIP scores.

- :mod:`wsiseg.evaluate.interactive`  DeepScribble's protocol (:func:`evaluate_interactive`)
- :mod:`wsiseg.evaluate.report`       its report (:func:`write_interactive_report`)
- :mod:`wsiseg.evaluate.command`      ``wsiseg eval interactive`` from methods to report
- :mod:`wsiseg.evaluate.refiners`     the methods as window refiners: RefineNet, random
  walker, watershed, GuideNet alone
- :mod:`wsiseg.evaluate.windows`      windows from patch folders (with GuideNet) and slide stores
- :mod:`wsiseg.evaluate.truth`        a slide's ground truth (GeoJSON, mask, generated TIFF)
- :mod:`wsiseg.evaluate.masks`        per-slide IoU, Dice and the PAIP 2019 score
  (:func:`evaluate_masks`)

torch is imported only by the RefineNet refiner and GuideNet predictions.
"""

from __future__ import annotations

from wsiseg.evaluate.interactive import (
    EvalWindow,
    InteractiveResult,
    evaluate_interactive,
    number_of_interactions,
)
from wsiseg.evaluate.masks import (
    MaskReport,
    evaluate_masks,
    format_mask_table,
    iou_dice,
    paip_score,
)
from wsiseg.evaluate.refiners import (
    Refiner,
    baseline_refiners,
    guidenet_refiner,
    randomwalk_refiner,
    refinenet_refiner,
    watershed_refiner,
)
from wsiseg.evaluate.report import write_interactive_report
from wsiseg.evaluate.windows import (
    select_windows,
    windows_from_patch_folder,
    windows_from_store,
)

__all__ = [
    "EvalWindow",
    "InteractiveResult",
    "MaskReport",
    "Refiner",
    "baseline_refiners",
    "evaluate_interactive",
    "evaluate_masks",
    "format_mask_table",
    "guidenet_refiner",
    "iou_dice",
    "number_of_interactions",
    "paip_score",
    "randomwalk_refiner",
    "refinenet_refiner",
    "select_windows",
    "watershed_refiner",
    "windows_from_patch_folder",
    "windows_from_store",
    "write_interactive_report",
]
