"""Scribble2Label's labels on arrays: simulated scribbles, the prediction average, pseudo-labels.

Also the random-walk seeds that optionally grow the scribbles first (Can et al. 2018), and the
average of the pool's predictions kept beside the checkpoint for resumed runs. The trainer
that uses them is :mod:`wsiseg.train.scribble2label`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsiseg.atomic import atomic_path
from wsiseg.scribbles.human import human_scribbles

__all__ = [
    "PredictionAverage",
    "pseudo_labels",
    "pseudo_stats",
    "random_walk_labels",
    "scribble_labels_from_truth",
    "update_average",
]

_EMA_KEY = "wsiseg_s2l"


def scribble_labels_from_truth(
    truth: NDArray[np.bool_],
    labelled: NDArray[np.bool_] | None = None,
    *,
    rng: np.random.Generator,
    radius_px: int = 2,
    spacing_px: float = 16.0,
    tile_px: int = 64,
) -> NDArray[np.int8]:
    """Human-like scribbles drawn from a ground truth, as a training label raster.

    :func:`wsiseg.scribbles.human.human_scribbles` inside the tumor and inside the labelled
    non-tumor area, each clipped to its class.

    Parameters
    ----------
    truth : ndarray of bool, shape (H, W)
    labelled : ndarray of bool, shape (H, W), optional
        Where the truth is known (default: everywhere); no scribble is drawn elsewhere.
    rng : numpy.random.Generator
    radius_px, spacing_px, tile_px
        See :func:`~wsiseg.scribbles.human.human_scribbles`.

    Returns
    -------
    ndarray of int8, shape (H, W)
        1 tumor scribble, 0 non-tumor scribble, −1 not scribbled (the labels convention of
        :class:`~wsiseg.train.labels.LabelledSlide`).
    """
    truth = np.asarray(truth, bool)
    known = np.ones(truth.shape, bool) if labelled is None else np.asarray(labelled, bool)
    tumor, other = truth & known, ~truth & known
    out = np.full(truth.shape, -1, np.int8)
    kw = {"rng": rng, "radius_px": radius_px, "spacing_px": spacing_px, "tile_px": tile_px}
    out[human_scribbles(other, **kw) & other] = 0
    out[human_scribbles(tumor, **kw) & tumor] = 1
    return out


def update_average(
    average: NDArray[np.floating] | None, prediction: NDArray[np.floating], alpha: float
) -> NDArray[np.float32]:
    """Scribble2Label's prediction ensemble: ``α · prediction + (1 − α) · average``.

    The first call (``average`` None) returns the prediction itself (``y_0 = f(x)``).
    """
    prediction = np.asarray(prediction, np.float32)
    if average is None:
        return prediction.copy()
    return (alpha * prediction + (1.0 - alpha) * np.asarray(average, np.float32)).astype(
        np.float32
    )


def pseudo_labels(
    average: NDArray[np.floating], scribbles: NDArray[np.integer], tau: float
) -> NDArray[np.int8]:
    """Pseudo-labels of the unscribbled pixels where the average prediction is consistent.

    Parameters
    ----------
    average : ndarray of float, shape (..., H, W)
        Averaged tumor probability.
    scribbles : ndarray of int, same shape
        1 tumor, 0 non-tumor, −1 not scribbled.
    tau : float
        Consistency threshold in (0.5, 1).

    Returns
    -------
    ndarray of int8, same shape
        1 where ``average > tau``, 0 where ``average < 1 − tau``, −1 elsewhere — and −1 on
        every scribbled pixel: there the scribble is the label, whatever the average says.
    """
    average = np.asarray(average)
    scribbles = np.asarray(scribbles)
    out = np.full(average.shape, -1, np.int8)
    out[average > tau] = 1
    out[average < 1.0 - tau] = 0
    out[scribbles >= 0] = -1
    return out


def random_walk_labels(
    rgb: NDArray[np.uint8],
    scribbles: NDArray[np.integer],
    *,
    threshold: float = 0.9,
    beta: float = 130.0,
) -> NDArray[np.int8]:
    """Scribbles grown into random-walker seed regions (Can et al. 2018).

    scikit-image's random walker is seeded with the tumor and non-tumor scribbles; unscribbled
    pixels whose probability of one class reaches ``threshold`` take that class. Scribbled
    pixels keep their label. A patch with scribbles of one class only is returned unchanged
    (the walker would give that class to every pixel).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    scribbles : ndarray of int, shape (H, W)
        1 tumor, 0 non-tumor, −1 not scribbled.
    threshold : float
        Probability a pixel needs to join a class (the paper: 0.99 cardiac, 0.90 prostate).
    beta : float
        Random-walker edge weight.

    Returns
    -------
    ndarray of int8, shape (H, W)
        Same convention as ``scribbles``.
    """
    from skimage.segmentation import random_walker

    scribbles = np.asarray(scribbles, np.int8)
    out = scribbles.copy()
    if not ((scribbles == 1).any() and (scribbles == 0).any()):
        return out
    seeds = np.zeros(scribbles.shape, np.int32)
    seeds[scribbles == 1] = 1
    seeds[scribbles == 0] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # Solved directly: with seeds this sparse the conjugate gradient is slow and, at
        # scikit-image's tolerance, far from the solution (see wsiseg.evaluate.refiners).
        prob = random_walker(np.asarray(rgb, np.float32) / 255.0, seeds, beta=beta, mode="bf",
                             channel_axis=-1, return_full_prob=True)
    free = scribbles < 0
    out[free & (prob[0] >= threshold)] = 1
    out[free & (prob[1] >= threshold)] = 0
    return out


def pseudo_stats(
    labels: NDArray[np.int8], scribbled: NDArray[np.int8], truth: NDArray[np.int8] | None,
    epoch: int, count: int,
) -> dict[str, float]:
    """Share of unscribbled pixels pseudo-labelled, their accuracy, and contradictions."""
    free = scribbled < 0
    labelled = labels >= 0
    fraction = float(labelled[free].mean()) if free.any() else 0.0
    accuracy = math.nan
    if truth is not None:
        judged = labelled & (truth >= 0)
        if judged.any():
            accuracy = float((labels[judged] == truth[judged]).mean())
    # The training target: the scribble where there is one, else the pseudo-label.
    target = np.where(scribbled >= 0, scribbled, labels)
    contradictions = int(np.count_nonzero((scribbled >= 0) & (target != scribbled)))
    return {"epoch": epoch, "averaged": count, "fraction": round(fraction, 6),
            "accuracy": round(accuracy, 6) if math.isfinite(accuracy) else math.nan,
            "contradictions": contradictions}


class PredictionAverage:
    """The pool's averaged predictions, kept beside the checkpoint for resumed runs."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = json.dumps(config, sort_keys=True)
        self.average: NDArray[np.float32] | None = None
        self.count = 0
        self.epoch = -1
        self.log: list[dict[str, float]] = []

    def update(self, probs: NDArray[np.float32], alpha: float, epoch: int) -> None:
        self.average = update_average(self.average, probs, alpha)
        self.count += 1
        self.epoch = epoch

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def save(self) -> None:
        from safetensors.numpy import save_file

        meta = {"config": self.config, "count": self.count, "epoch": self.epoch,
                "log": self.log}
        with atomic_path(self.path) as tmp:
            save_file({"average": self.average.astype(np.float16)}, tmp,
                      metadata={_EMA_KEY: json.dumps(meta)})

    def load(self) -> None:
        """Averages of the run being resumed (none if absent or made with other settings)."""
        from safetensors import safe_open

        if not self.path.exists():
            return
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {})[_EMA_KEY])
                average = f.get_tensor("average")
        except Exception:  # noqa: BLE001 - a damaged file: the averages start over
            return
        if meta.get("config") != self.config:
            return
        self.average = average.astype(np.float32)
        self.count, self.epoch = int(meta["count"]), int(meta["epoch"])
        self.log = list(meta.get("log", []))
