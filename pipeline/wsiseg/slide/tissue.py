"""Tissue detection on a low-resolution thumbnail.

Brightfield tissue (H&E, IHC) is coloured; glass is white or grey. Otsu's threshold on the
HSV saturation separates them; dark pixels (pen marks' shadows, black borders, fluorescence
background) are excluded by a brightness floor, and morphology removes dust and fills gaps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray
from scipy import ndimage
from skimage import color, filters, morphology

# Below this HSV value a pixel is too dark to be brightfield tissue (black slide borders,
# fluorescence background, scanner padding).
_MIN_VALUE = 0.2

# Pixels handled per step: the per-pixel temporaries (fancy-index and bincount copies, 8 B
# each) stay at a few MiB whatever the thumbnail's size.
_BAND_PX = 1 << 19


@functools.cache
def _saturation_value_table() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """HSV saturation and value for every (max, min) byte pair, indexed ``max · 256 + min``.

    A pixel's saturation (max − min) / max and value max depend only on its largest and
    smallest channel, so skimage's own ``rgb2hsv`` on the 65 536 pairs gives, bit for bit,
    what it gives on the whole thumbnail — at 3 B per thumbnail pixel instead of ~100.
    """
    top, low = np.divmod(np.arange(256 * 256), 256)
    pairs = np.stack([top, low, low], axis=-1).astype(np.uint8)[np.newaxis]
    hsv = color.rgb2hsv(pairs)[0]
    saturation, value = hsv[:, 1].copy(), hsv[:, 2].copy()
    saturation.flags.writeable = value.flags.writeable = False  # shared by every call
    return saturation, value


def _max_min_codes(rgb: NDArray[np.uint8]) -> NDArray[np.uint16]:
    """``max · 256 + min`` over the channels of each pixel, uint16 (rows, cols)."""
    codes = np.empty(rgb.shape[:2], dtype=np.uint16)
    band_rows = max(1, _BAND_PX // max(1, rgb.shape[1]))
    for r0 in range(0, rgb.shape[0], band_rows):
        band = rgb[r0 : r0 + band_rows]
        out = codes[r0 : r0 + band_rows]
        np.multiply(band.max(axis=-1), 256, out=out, dtype=np.uint16)
        out += band.min(axis=-1)
    return codes


def _lookup(table: NDArray[np.bool_], codes: NDArray[np.uint16]) -> NDArray[np.bool_]:
    """``table[codes]`` in bands (the index copy is 8 B per pixel)."""
    out = np.empty(codes.shape, dtype=bool)
    flat_codes, flat_out = codes.reshape(-1), out.reshape(-1)
    for i in range(0, flat_codes.size, _BAND_PX):
        flat_out[i : i + _BAND_PX] = table[flat_codes[i : i + _BAND_PX]]
    return out


def _otsu_threshold(values: NDArray[np.float64], counts: NDArray[np.int64]) -> float:
    """Otsu's threshold of ``values`` each occurring ``counts`` times.

    The same 256-bin histogram over [min, max] that ``threshold_otsu`` builds from the image.
    """
    hist, edges = np.histogram(values, bins=256, weights=counts)
    return float(filters.threshold_otsu(hist=(hist, (edges[:-1] + edges[1:]) / 2.0)))


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

    Notes
    -----
    Working memory is a few bytes per thumbnail pixel: saturation and value come from a table
    over each pixel's (max, min) channel pair, and Otsu's histogram from that pair's counts.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"tissue_mask: expected uint8 RGB (rows, cols, 3), got {rgb.dtype} "
                         f"{rgb.shape}")
    saturation, value = _saturation_value_table()
    usable = value >= _MIN_VALUE
    codes = _max_min_codes(rgb)
    counts = np.zeros(saturation.size, dtype=np.int64)
    flat = codes.reshape(-1)
    for i in range(0, flat.size, _BAND_PX):
        counts += np.bincount(flat[i : i + _BAND_PX], minlength=saturation.size)
    counts[~usable] = 0
    present = counts > 0
    if not present.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    sat = saturation[present]
    threshold = min_saturation
    if np.ptp(sat) > 0:
        threshold = max(_otsu_threshold(sat, counts[present]), min_saturation)
    mask = _lookup((saturation > threshold) & usable, codes)
    del codes
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
