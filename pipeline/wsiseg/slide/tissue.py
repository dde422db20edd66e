"""Tissue detection on a low-resolution thumbnail.

Brightfield tissue (H&E, IHC) is coloured; glass is white or grey. Otsu's threshold on the
HSV saturation separates them; dark pixels (pen marks' shadows, black borders, fluorescence
background) are excluded by a brightness floor, and morphology removes dust and fills gaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray
from scipy import ndimage
from skimage import color, filters, morphology

# Below this HSV value a pixel is too dark to be brightfield tissue (black slide borders,
# fluorescence background, scanner padding).
_MIN_VALUE = 0.2


def tissue_mask(
    rgb: NDArray[np.uint8], *, mpp: float, min_saturation: float, min_area_um2: float
) -> NDArray[np.bool_]:
    """Binary tissue mask of a thumbnail.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (rows, cols, 3)
        The slide at low resolution.
    mpp : float
        µm per thumbnail pixel (to turn ``min_area_um2`` into pixels).
    min_saturation : float
        Floor under Otsu's saturation threshold, in [0, 1]: a slide of blank glass stays blank.
    min_area_um2 : float
        Connected pieces smaller than this are dropped.

    Returns
    -------
    ndarray of bool, shape (rows, cols)
    """
    hsv = color.rgb2hsv(rgb)
    saturation, value = hsv[..., 1], hsv[..., 2]
    usable = value >= _MIN_VALUE
    if not usable.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    sat = saturation[usable]
    threshold = min_saturation
    if np.ptp(sat) > 0:
        threshold = max(float(filters.threshold_otsu(sat)), min_saturation)
    mask = (saturation > threshold) & usable
    # Close small gaps between tissue fragments (~2 px at the thumbnail), then drop dust.
    mask = morphology.closing(mask, morphology.disk(2))
    min_px = max(1, int(round(min_area_um2 / mpp**2)))
    mask = morphology.remove_small_objects(mask, max_size=min_px - 1)
    # Fill small enclosed holes only: glass touching the border is background, never a hole.
    holes = ndimage.binary_fill_holes(mask) & ~mask
    large_holes = morphology.remove_small_objects(holes, max_size=min_px - 1)
    mask = mask | (holes & ~large_holes)
    return mask


def tissue_fraction(mask: NDArray[np.bool_]) -> float:
    """Share of the slide covered by tissue, in [0, 1]."""
    return float(mask.mean()) if mask.size else 0.0


def share_of_mask_covered(
    polygons: Sequence[shapely.Geometry], mask: NDArray[np.bool_], shape: tuple[int, int]
) -> float:
    """The share of a coarse ``mask``'s area that ``polygons`` cover (0–1).

    Parameters
    ----------
    polygons : sequence of shapely.Polygon
        Disjoint polygons in working pixels (x = column, y = row).
    mask : ndarray of bool, shape (h, w)
        E.g. the tissue mask; it covers the whole working grid, so its pixel (i, j) is the
        box ``[j·cols/w, (j+1)·cols/w) × [i·rows/h, (i+1)·rows/h)``.
    shape : (rows, cols)
        The working grid's shape.

    Returns
    -------
    float
        Area of (polygons ∩ mask) / area of mask, exact for the mask's pixel boxes; 0 for an
        empty mask.
    """
    if not len(polygons) or not mask.any():
        return 0.0
    h, w = mask.shape
    sy, sx = shape[0] / h, shape[1] / w
    # One box per run of mask pixels in a row, then their union: far fewer shapes than pixels.
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    rows, edges = np.nonzero(np.diff(padded, axis=1))
    starts, ends = edges[0::2], edges[1::2]  # each row's edges alternate start, end
    runs_row = rows[0::2]
    boxes = shapely.box(starts * sx, runs_row * sy, ends * sx, (runs_row + 1) * sy)
    inside = shapely.union_all(boxes)
    shapely.prepare(inside)
    covered = shapely.area(shapely.intersection(np.asarray(polygons, dtype=object), inside))
    return min(1.0, float(covered.sum()) / (float(mask.sum()) * sy * sx))
