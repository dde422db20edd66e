"""Segmentation scores per slide against ground truth: IoU, Dice and the PAIP 2019 score.

A *prediction* is a slide store (its ``refined`` or ``guide`` array at the working resolution,
thresholded at the workflow's contour threshold) or a mask image; the *truth* is read by
:class:`wsiseg.evaluate.truth.TruthSource` (QuPath GeoJSON, a mask image, or a generated
slide's ``*.truth.tiff``).

A store is scored chunk by chunk, so memory stays at a chunk whatever the slide's size.

The PAIP 2019 challenge (task 1, whole-tumor segmentation) scores a method by the mean over
slides of the per-slide Jaccard index, where a slide whose Jaccard is below 0.65 counts as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from wsiseg.errors import WsisegError
from wsiseg.evaluate._files import csv_text, write_text
from wsiseg.evaluate.truth import TruthSource
from wsiseg.train.inputs import MASK_SUFFIXES, match_annotations, read_grey_image

if TYPE_CHECKING:
    from wsiseg.config import Workflow
    from wsiseg.store import SlideStore

__all__ = [
    "PAIP_CUTOFF",
    "MaskReport",
    "MaskScore",
    "evaluate_masks",
    "format_mask_table",
    "iou_dice",
    "paip_score",
    "score_prediction",
]

#: PAIP 2019: a slide whose Jaccard index is below this counts as 0.
PAIP_CUTOFF = 0.65


# --------------------------------------------------------------------------------------------
# Scores


def iou_dice(
    prediction: ArrayLike, truth: ArrayLike, counted: ArrayLike | None = None
) -> tuple[float, float]:
    """IoU (Jaccard) and Dice of the tumor class; both 1.0 when both masks are empty.

    Parameters
    ----------
    prediction, truth : array-like of bool, same shape
    counted : array-like of bool, optional
        Only these pixels count.

    Returns
    -------
    (iou, dice) : (float, float)
    """
    pred = np.asarray(prediction, bool)
    true = np.asarray(truth, bool)
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} differ in shape")
    if counted is not None:
        keep = np.asarray(counted, bool)
        pred, true = pred & keep, true & keep
    inter = int(np.count_nonzero(pred & true))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
    return _ratios(inter, total)


def paip_score(jaccards: Sequence[float], cutoff: float = PAIP_CUTOFF) -> float:
    """PAIP 2019 score: mean of per-slide Jaccard indices, those below ``cutoff`` counted as 0.

    Parameters
    ----------
    jaccards : sequence of float
        One IoU per slide.
    cutoff : float
        0.65 in the challenge.

    Returns
    -------
    float
        NaN for no slides.
    """
    values = np.asarray(list(jaccards), dtype=np.float64)
    if values.size == 0:
        return math.nan
    return float(np.where(values >= cutoff, values, 0.0).mean())


def _ratios(intersection: int, total: int) -> tuple[float, float]:
    """(IoU, Dice) from ``|P ∩ T|`` and ``|P| + |T|``."""
    if total == 0:
        return 1.0, 1.0
    union = total - intersection
    return intersection / union, 2.0 * intersection / total


# --------------------------------------------------------------------------------------------
# One slide


@dataclass(frozen=True)
class MaskScore:
    """Scores of one slide (pixel counts at the prediction's resolution)."""

    name: str
    prediction: str
    truth: str
    iou: float
    dice: float
    paip_jaccard: float  # iou, or 0 below PAIP_CUTOFF
    truth_px: int
    predicted_px: int
    counted_px: int


def score_prediction(
    prediction: Path,
    truth: Path,
    *,
    array: str = "refined",
    threshold: float | None = None,
    workflow: Workflow | None = None,
) -> MaskScore:
    """IoU, Dice and PAIP Jaccard of one prediction (store or mask image) against its truth.

    Parameters
    ----------
    prediction : Path
        A slide store (``*.zarr``) or a predicted mask image (> 127 is tumor).
    truth : Path
        See :class:`TruthSource`.
    array : {"refined", "guide"}
        The store array to score.
    threshold : float, optional
        Probability threshold for a store (default: its workflow's ``contours.threshold``).
    workflow : Workflow, optional
        Class table for GeoJSON truth (default: the store's workflow).

    Raises
    ------
    WsisegError
        Unreadable or mismatched inputs (one line naming the file).
    """
    from wsiseg.store import SlideStore

    prediction, truth = Path(prediction), Path(truth)
    name = _stem(prediction)
    if (prediction / "zarr.json").is_file():
        if array not in ("refined", "guide"):
            raise WsisegError(f"--array must be refined or guide, got {array!r}")
        store = SlideStore.open(prediction, mode="r")
        if store.stage("guide") != "done":
            raise WsisegError(f"{prediction}: GuideNet never ran on this store; `wsiseg run` it")
        theta = store.workflow.contours.threshold if threshold is None else threshold
        source = TruthSource.open(truth, store=store, workflow=workflow)
        inter, total, truth_px, pred_px, counted_px = _count_store(store, array, theta, source)
    else:
        if prediction.is_dir():
            raise WsisegError(f"{prediction}: a folder but not a slide store (no zarr.json)")
        if not prediction.is_file():
            raise WsisegError(f"{prediction}: prediction not found")
        grey = read_grey_image(prediction)
        pred = grey > (0 if grey.max() <= 1 else 127)
        source = TruthSource.open(truth, shape=pred.shape, workflow=workflow)
        true, counted = source.window((0, 0, *pred.shape))
        pred, true = pred & counted, true & counted
        inter = int(np.count_nonzero(pred & true))
        truth_px, pred_px = int(np.count_nonzero(true)), int(np.count_nonzero(pred))
        total, counted_px = truth_px + pred_px, int(np.count_nonzero(counted))
    iou, dice = _ratios(inter, total)
    return MaskScore(
        name=name, prediction=str(prediction), truth=str(truth), iou=iou, dice=dice,
        paip_jaccard=iou if iou >= PAIP_CUTOFF else 0.0, truth_px=truth_px,
        predicted_px=pred_px, counted_px=counted_px,
    )


def _count_store(
    store: SlideStore, array: str, threshold: float, source: TruthSource
) -> tuple[int, int, int, int, int]:
    """(|P ∩ T|, |P| + |T|, |T|, |P|, counted) over the store, one chunk at a time."""
    from wsiseg.contours import tumor_mask

    rows, cols = store.frame.working_shape
    chunk = store.chunk_px
    data = store[array]
    inter = truth_px = pred_px = counted_px = 0
    for r0 in range(0, rows, chunk):
        for c0 in range(0, cols, chunk):
            box = (r0, c0, min(chunk, rows - r0), min(chunk, cols - c0))
            pred = tumor_mask(np.asarray(data[r0 : r0 + box[2], c0 : c0 + box[3]]), threshold)
            true, counted = source.window(box)
            pred, true = pred & counted, true & counted
            inter += int(np.count_nonzero(pred & true))
            truth_px += int(np.count_nonzero(true))
            pred_px += int(np.count_nonzero(pred))
            counted_px += int(np.count_nonzero(counted))
    return inter, truth_px + pred_px, truth_px, pred_px, counted_px


# --------------------------------------------------------------------------------------------
# A cohort


@dataclass(frozen=True)
class MaskReport:
    """Scores of every slide and the cohort's means."""

    scores: list[MaskScore]
    mean_iou: float
    mean_dice: float
    paip: float

    def rows(self) -> list[dict[str, Any]]:
        """CSV rows: one per slide, then one ``mean`` row (its ``paip_jaccard`` is the score)."""
        out = [asdict(s) for s in self.scores]
        out.append({
            "name": "mean", "prediction": "", "truth": "", "iou": self.mean_iou,
            "dice": self.mean_dice, "paip_jaccard": self.paip, "truth_px": "",
            "predicted_px": "", "counted_px": "",
        })
        return out


def evaluate_masks(
    predictions: Sequence[Path],
    truths: Sequence[Path] | Path,
    *,
    array: str = "refined",
    threshold: float | None = None,
    workflow: Workflow | None = None,
    out_csv: Path | None = None,
) -> MaskReport:
    """IoU, Dice and PAIP Jaccard per slide, and the cohort's means, optionally as CSV.

    Parameters
    ----------
    predictions : sequence of Path
        Slide stores (``*.zarr``) or predicted mask images; a folder that is not a store
        stands for the stores and mask images in it.
    truths : Path or sequence of Path
        Truth files or folders, matched to the predictions by name as training matches
        annotations to slides (``S1.zarr`` ↔ ``S1.geojson``, ``S1.truth.tiff``,
        ``S1_mask.png``; see :func:`wsiseg.train.inputs.match_annotations`).
    array : {"refined", "guide"}
        The store array to score.
    threshold : float, optional
        Probability threshold for stores (default: each store's ``contours.threshold``).
    workflow : Workflow, optional
        Class table for GeoJSON truth (default: each store's own workflow).
    out_csv : Path, optional
        Write the rows of :meth:`MaskReport.rows` here (atomically).

    Returns
    -------
    MaskReport

    Raises
    ------
    WsisegError
        No predictions, a prediction without a matching truth file (or with several), and any
        error of :func:`score_prediction`; before anything is written.
    """
    expanded = _expand_predictions(predictions)
    pairs = match_annotations(expanded, truths)
    scores = [
        score_prediction(p, t, array=array, threshold=threshold, workflow=workflow)
        for p, t in pairs
    ]
    report = MaskReport(
        scores=scores,
        mean_iou=float(np.mean([s.iou for s in scores])),
        mean_dice=float(np.mean([s.dice for s in scores])),
        paip=paip_score([s.iou for s in scores]),
    )
    if out_csv is not None:
        write_text(Path(out_csv), csv_text(report.rows()))
    return report


def format_mask_table(report: MaskReport) -> str:
    """A plain-text table: one line per slide and the means, PAIP score last."""
    width = max([len(s.name) for s in report.scores] + [len("mean")])
    lines = [f"{'slide':<{width}}  {'IoU':>6}  {'Dice':>6}  {'PAIP J':>6}"]
    for s in report.scores:
        lines.append(f"{s.name:<{width}}  {s.iou:6.3f}  {s.dice:6.3f}  {s.paip_jaccard:6.3f}")
    lines.append(f"{'mean':<{width}}  {report.mean_iou:6.3f}  {report.mean_dice:6.3f}  "
                 f"{report.paip:6.3f}")
    lines.append(f"PAIP 2019 score (mean Jaccard, < {PAIP_CUTOFF} counted as 0): "
                 f"{report.paip:.4f} over {len(report.scores)} slide(s)")
    return "\n".join(lines)


def _expand_predictions(predictions: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for item in (Path(p) for p in predictions):
        if item.is_dir() and not (item / "zarr.json").is_file():
            found = [
                p for p in sorted(item.iterdir())
                if (p / "zarr.json").is_file()
                or (p.is_file() and p.name.lower().endswith(MASK_SUFFIXES))
            ]
            if not found:
                raise WsisegError(f"{item}: no slide stores (*.zarr) or mask images in it")
            out += found
        elif item.exists():
            out.append(item)
        else:
            raise WsisegError(f"{item}: prediction not found")
    if not out:
        raise WsisegError("no predictions given (slide stores or mask images)")
    return out


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".zarr")] if name.endswith(".zarr") else path.stem
