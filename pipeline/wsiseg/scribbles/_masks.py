"""Mask helpers both scribble simulators share: 8-connectivity, mask pairs, inner distance.

Label rasters follow the slide store's convention: int8, +1 tumor, −1 non-tumor, 0 none.
Coordinates inside are ``(row, col)`` pixels of the array.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

# 8-connectivity: a diagonal step keeps a region (and a 1-px stroke) in one piece.
EIGHT = np.ones((3, 3), dtype=bool)


def inner_distance(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Euclidean distance of each mask pixel to the nearest pixel outside it or the image.

    The image edge counts as a border: a scribble is drawn on what is visible, away from the
    patch edge, and a mask that fills the patch still has a centre.
    """
    return ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def pair_masks(truth: NDArray, prediction: NDArray) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Truth and prediction as bool masks of one 2-D shape (float prediction: > 0.5)."""
    truth = np.asarray(truth, dtype=bool)
    prediction = np.asarray(prediction)
    pred = prediction > 0.5 if prediction.dtype.kind == "f" else prediction.astype(bool)
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(
            f"truth and prediction must be 2-D of one shape, got {truth.shape}, {pred.shape}"
        )
    return truth, pred
