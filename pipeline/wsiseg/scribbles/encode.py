"""Scribble raster → RefineNet input: the one encoding used by training and inference.

RefineNet (DeepScribble) sees six channels: the normalised RGB window, the GuideNet tumor
probability, and one map per scribble class (FG = tumor, BG = non-tumor). DeepScribble's best
encoding turns each class's scribbles into a *distance map*: 1 on the scribble, falling
linearly with the Euclidean distance to 0 at ``max_distance_px`` — larger means closer.

Windows of a big slide
----------------------
A distance map depends on every scribble within ``max_distance_px``, including those just
outside the window. The functions here work on exactly the array they are given, so a caller
encoding one window of a slide reads the window grown by ``ceil(max_distance_px)`` on every
side (clipped to the slide; :func:`window_with_margin`), encodes that, and crops the result
(or calls :func:`distance_maps_window`, which does exactly this for the scribble maps). The
result then equals encoding the whole slide and cropping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from numpy.typing import NDArray

Window = tuple[int, int, int, int]
"""``(row0, col0, rows, cols)`` in working pixels."""

SCRIBBLE_KINDS: tuple[str, ...] = ("distance", "raw", "none")
"""Scribble encodings: DeepScribble's distance maps (I+P+D), binary scribble maps (I+P+S), or
zero maps (I+P, scribbles ignored)."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Scribble labels of the slide store's ``scribbles`` array, in channel order: FG, BG.
_CLASS_LABELS = (1, -1)


def distance_maps(scribbles: NDArray[np.int8], *, max_distance_px: float) -> NDArray[np.float32]:
    """FG (tumor) and BG (non-tumor) scribble distance maps.

    Parameters
    ----------
    scribbles : ndarray of int8, shape (H, W)
        0 none, +1 tumor, −1 non-tumor.
    max_distance_px : float
        Distance, in working pixels, at which a map reaches 0.

    Returns
    -------
    ndarray of float32, shape (2, H, W)
        ``[FG, BG]``: ``max(0, 1 − d / max_distance_px)`` with ``d`` the Euclidean distance
        from the pixel to the nearest scribble pixel of that class (1 on the scribble, exactly
        0 from ``max_distance_px`` on); all 0 when the class has no scribble.
    """
    scribbles = _check_scribbles(scribbles)
    if not (math.isfinite(max_distance_px) and max_distance_px > 0):
        raise ValueError(f"max_distance_px must be a positive number, got {max_distance_px}")
    maps = np.zeros((2, *scribbles.shape), np.float32)
    for channel, label in enumerate(_CLASS_LABELS):
        on_scribble = scribbles == label
        if not on_scribble.any():
            continue
        # OpenCV's precise L2 transform is the exact Euclidean one, ~10x scipy's
        # distance_transform_edt (1 ms a 512² window instead of 10), but in float32, whose
        # last bit depends on where the pixel lies in the array. A squared distance between
        # pixels is an integer: rounded back and rooted in float64 it is the very value
        # scipy gives, so a window encoded with its margin equals the whole slide cropped,
        # bit for bit (exact while d² < ~10⁶, i.e. everywhere the map is not 0).
        distance = cv2.distanceTransform(np.ascontiguousarray(~on_scribble, dtype=np.uint8),
                                         cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        exact = np.sqrt(np.rint(np.square(distance, dtype=np.float64)))
        np.clip(1.0 - exact / max_distance_px, 0.0, 1.0, out=exact)
        maps[channel] = exact
    return maps


def scribble_maps(
    scribbles: NDArray[np.int8], *, max_distance_px: float, scribble_kind: str = "distance"
) -> NDArray[np.float32]:
    """The two scribble channels of RefineNet's input in the given encoding.

    Parameters
    ----------
    scribbles : ndarray of int8, shape (H, W)
        0 none, +1 tumor, −1 non-tumor.
    max_distance_px : float
        See :func:`distance_maps` (used by ``"distance"`` only).
    scribble_kind : {"distance", "raw", "none"}
        Distance maps, binary scribble maps (1 on the class's scribbles), or zeros.

    Returns
    -------
    ndarray of float32, shape (2, H, W), values in [0, 1]
        ``[FG, BG]``.
    """
    scribbles = _check_scribbles(scribbles)
    if scribble_kind == "distance":
        return distance_maps(scribbles, max_distance_px=max_distance_px)
    if scribble_kind == "raw":
        return np.stack([scribbles == label for label in _CLASS_LABELS]).astype(np.float32)
    if scribble_kind == "none":
        return np.zeros((2, *scribbles.shape), np.float32)
    raise ValueError(
        f"scribble_kind must be one of {', '.join(SCRIBBLE_KINDS)}, got {scribble_kind!r}"
    )


def encode_refine_input(
    rgb: NDArray[np.uint8],
    guide: NDArray[np.uint8] | NDArray[np.floating],
    scribbles: NDArray[np.int8],
    *,
    max_distance_px: float,
    scribble_kind: str = "distance",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> NDArray[np.float32]:
    """RefineNet's six-channel input for one window; the encoding of training and inference.

    The scribble maps are computed from ``scribbles`` alone: for a window of a larger slide,
    pass arrays read with a margin of ``ceil(max_distance_px)`` (:func:`window_with_margin`)
    and crop the result, so that scribbles just outside the window count (see the module
    docstring).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    guide : ndarray, shape (H, W)
        GuideNet tumor probability: uint8 (× 255, as in the slide store) or float in [0, 1].
    scribbles : ndarray of int8, shape (H, W)
        0 none, +1 tumor, −1 non-tumor.
    max_distance_px : float
        Distance, in working pixels, at which a distance map reaches 0.
    scribble_kind : {"distance", "raw", "none"}
        See :func:`scribble_maps`; the model card of the RefineNet weights says which.
    mean, std : sequence of 3 floats
        RGB normalisation (applied to ``rgb / 255``); ImageNet's by default.

    Returns
    -------
    ndarray of float32, shape (6, H, W)
        Normalised R, G, B; guide probability in [0, 1]; FG map; BG map.

    Raises
    ------
    ValueError
        Shapes that do not match, wrong dtypes, a guide outside [0, 1], an unknown kind.
    """
    rgb = np.asarray(rgb)
    guide = np.asarray(guide)
    scribbles = _check_scribbles(scribbles)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 of shape (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] != guide.shape or guide.shape != scribbles.shape:
        raise ValueError(
            f"shapes differ: rgb {rgb.shape}, guide {guide.shape}, scribbles {scribbles.shape}"
        )
    mean_arr = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std_arr = np.asarray(std, np.float32).reshape(3, 1, 1)
    if mean_arr.size != 3 or std_arr.size != 3 or not np.all(std_arr > 0):
        raise ValueError(f"mean and std must be 3 numbers (std > 0), got {mean}, {std}")

    out = np.empty((6, *guide.shape), np.float32)
    out[:3] = (np.moveaxis(rgb, 2, 0).astype(np.float32) / 255.0 - mean_arr) / std_arr
    out[3] = _guide_probability(guide)
    out[4:] = scribble_maps(scribbles, max_distance_px=max_distance_px, scribble_kind=scribble_kind)
    return out


def encode_refine_batch(
    rgb: NDArray[np.uint8],
    guide: NDArray[np.uint8] | NDArray[np.floating],
    scribbles: NDArray[np.int8],
    *,
    max_distance_px: float,
    scribble_kind: str = "distance",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> NDArray[np.float32]:
    """:func:`encode_refine_input` for N windows at once.

    Parameters
    ----------
    rgb : ndarray of uint8, shape (N, H, W, 3)
    guide : ndarray, shape (N, H, W)
    scribbles : ndarray of int8, shape (N, H, W)
    max_distance_px, scribble_kind, mean, std
        As for :func:`encode_refine_input`; each window's maps are computed on its own.

    Returns
    -------
    ndarray of float32, shape (N, 6, H, W)
    """
    rgb, guide, scribbles = np.asarray(rgb), np.asarray(guide), np.asarray(scribbles)
    if not (len(rgb) == len(guide) == len(scribbles)):
        raise ValueError(
            f"batch sizes differ: rgb {rgb.shape}, guide {guide.shape}, scribbles {scribbles.shape}"
        )
    if rgb.ndim != 4:
        raise ValueError(f"rgb must have shape (N, H, W, 3), got {rgb.shape}")
    out = np.empty((len(rgb), 6, *rgb.shape[1:3]), np.float32)
    for i in range(len(rgb)):
        out[i] = encode_refine_input(
            rgb[i],
            guide[i],
            scribbles[i],
            max_distance_px=max_distance_px,
            scribble_kind=scribble_kind,
            mean=mean,
            std=std,
        )
    return out


def window_with_margin(
    window: Window, margin_px: float, shape: tuple[int, int]
) -> tuple[Window, tuple[slice, slice]]:
    """A window grown by a margin on every side (clipped to the array), and where it sits inside.

    Parameters
    ----------
    window : (int, int, int, int)
        ``(row0, col0, rows, cols)``, inside an array of ``shape``.
    margin_px : float
        Margin in pixels, rounded up (``ceil(max_distance_px)`` for distance maps).
    shape : (int, int)
        ``(H, W)`` of the whole array.

    Returns
    -------
    grown : (int, int, int, int)
        ``(row0, col0, rows, cols)`` of the grown window.
    inner : (slice, slice)
        Row and column slices of the original window inside the grown one: crop a result
        computed on the grown window with ``result[..., inner[0], inner[1]]``.
    """
    row0, col0, rows, cols = (int(v) for v in window)
    height, width = (int(v) for v in shape)
    if rows < 0 or cols < 0 or row0 < 0 or col0 < 0 or row0 + rows > height or col0 + cols > width:
        raise ValueError(f"window {window} does not fit in an array of shape {shape}")
    margin = math.ceil(margin_px)
    if margin < 0:
        raise ValueError(f"margin_px must not be negative, got {margin_px}")
    top, left = max(0, row0 - margin), max(0, col0 - margin)
    bottom, right = min(height, row0 + rows + margin), min(width, col0 + cols + margin)
    grown = (top, left, bottom - top, right - left)
    inner = (slice(row0 - top, row0 - top + rows), slice(col0 - left, col0 - left + cols))
    return grown, inner


def distance_maps_window(
    read_scribbles: Callable[[int, int, int, int], NDArray[np.int8]],
    window: Window,
    max_distance_px: float,
    shape: tuple[int, int],
) -> NDArray[np.float32]:
    """FG/BG distance maps of one window of a large scribble array, scribbles around it included.

    Reads the window grown by ``ceil(max_distance_px)`` (clipped to ``shape``), computes
    :func:`distance_maps` and crops: the result equals computing on the whole array and
    cropping, at a cost in proportion to the grown window.

    Parameters
    ----------
    read_scribbles : callable (row0, col0, rows, cols) → ndarray of int8, shape (rows, cols)
        Reads a window of the scribble array (e.g. of the slide store's ``scribbles``).
    window : (int, int, int, int)
        ``(row0, col0, rows, cols)`` in working pixels.
    max_distance_px : float
        See :func:`distance_maps`.
    shape : (int, int)
        ``(H, W)`` of the whole scribble array.

    Returns
    -------
    ndarray of float32, shape (2, rows, cols)
    """
    grown, (row_slice, col_slice) = window_with_margin(window, max_distance_px, shape)
    scribbles = np.asarray(read_scribbles(*grown))
    if scribbles.shape != grown[2:]:
        raise ValueError(f"read_scribbles{grown} returned shape {scribbles.shape}")
    return distance_maps(scribbles, max_distance_px=max_distance_px)[:, row_slice, col_slice]


def _check_scribbles(scribbles: NDArray[np.int8]) -> NDArray[np.int8]:
    scribbles = np.asarray(scribbles)
    if scribbles.ndim != 2 or not np.issubdtype(scribbles.dtype, np.signedinteger):
        raise ValueError(
            f"scribbles must be a signed integer array of shape (H, W), "
            f"got {scribbles.dtype} {scribbles.shape}"
        )
    return scribbles


def _guide_probability(guide: NDArray[np.generic]) -> NDArray[np.float32]:
    """GuideNet probability as float32 in [0, 1] from uint8 (× 255) or float."""
    if guide.dtype == np.uint8:
        return guide.astype(np.float32) / 255.0
    if not np.issubdtype(guide.dtype, np.floating):
        raise ValueError(f"guide must be uint8 (× 255) or float in [0, 1], got {guide.dtype}")
    probability = guide.astype(np.float32, copy=False)
    if probability.size and not (probability.min() >= 0.0 and probability.max() <= 1.0):
        raise ValueError(
            f"guide probability must lie in [0, 1], got [{probability.min()}, {probability.max()}]"
        )
    return probability
