"""The global patch grid: origins, which patches meet tissue, the blending window."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError

#: Smallest blending weight: border pixels covered by a single patch still normalise.
WINDOW_FLOOR = 1e-3




def _axis_origins(length: int, patch_px: int, stride_px: int) -> NDArray[np.int64]:
    last = max(length - patch_px, 0)
    origins = np.arange(0, last + 1, stride_px, dtype=np.int64)
    if origins[-1] != last:
        origins = np.append(origins, np.int64(last))
    return origins


def check_grid(patch_px: int, stride_px: int) -> None:
    if patch_px <= 0 or stride_px <= 0:
        raise WsisegError(
            f"guidenet.patch_px ({patch_px}) and guidenet.stride_px ({stride_px}) "
            "must be positive"
        )
    if stride_px > patch_px:
        raise WsisegError(
            f"guidenet.stride_px ({stride_px}) exceeds guidenet.patch_px ({patch_px}): "
            "patches would leave gaps"
        )


def patch_origins(shape: tuple[int, int], patch_px: int, stride_px: int) -> NDArray[np.int64]:
    """Top-left corners of the global patch grid over an image.

    Parameters
    ----------
    shape : (int, int)
        Image ``(H, W)`` in working pixels.
    patch_px, stride_px : int
        Patch edge ``P`` and stride ``S`` (``0 < S ≤ P``), working pixels.

    Returns
    -------
    ndarray of int64, shape (N, 2)
        ``(row, col)`` origins in row-major order: ``0, S, 2S, …`` on each axis plus the
        border-aligned ``H - P`` (``W - P``) so every pixel is covered. A side shorter than
        ``P`` has the single origin 0 (the patch is zero-padded).
    """
    check_grid(patch_px, stride_px)
    rows = _axis_origins(int(shape[0]), patch_px, stride_px)
    cols = _axis_origins(int(shape[1]), patch_px, stride_px)
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1)


def tissue_patch_mask(
    origins: NDArray[np.int64],
    patch_px: int,
    tissue: NDArray[np.bool_],
    shape: tuple[int, int],
) -> NDArray[np.bool_]:
    """Which patches meet tissue.

    Parameters
    ----------
    origins : ndarray of int64, shape (N, 2)
        Patch ``(row, col)`` origins in working pixels.
    patch_px : int
        Patch edge in working pixels.
    tissue : ndarray of bool, shape (h, w)
        Low-resolution tissue mask of the whole image; one tissue pixel spans
        ``(H / h, W / w)`` working pixels (fractional scales are fine).
    shape : (int, int)
        Working image ``(H, W)``.

    Returns
    -------
    ndarray of bool, shape (N,)
        True where any tissue pixel overlapping the patch window (clipped to the image) is set.
    """
    tissue = np.asarray(tissue)
    if tissue.ndim != 2 or tissue.size == 0:
        raise WsisegError(f"tissue mask: expected a non-empty 2-D array, got shape {tissue.shape}")
    height, width = int(shape[0]), int(shape[1])
    mask_h, mask_w = tissue.shape
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    # Summed-area table: the tissue count inside any window in O(1).
    table = np.zeros((mask_h + 1, mask_w + 1), dtype=np.int64)
    table[1:, 1:] = tissue.astype(bool).cumsum(0, dtype=np.int64).cumsum(1)

    def span(start: NDArray[np.int64], length: int, mask_len: int) -> tuple[NDArray, NDArray]:
        stop = np.minimum(start + patch_px, length)
        # Exact integer floor/ceil of working → tissue pixel coordinates.
        lo = (start * mask_len) // length
        hi = -((-stop * mask_len) // length)
        lo = np.clip(lo, 0, mask_len)
        return lo, np.clip(np.maximum(hi, lo + 1), 0, mask_len)

    r0, r1 = span(origins[:, 0], height, mask_h)
    c0, c1 = span(origins[:, 1], width, mask_w)
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return count > 0


def blend_window(patch_px: int) -> NDArray[np.float32]:
    """2-D Hann (raised-cosine) blending window with a small positive floor.

    Returns
    -------
    ndarray of float32, shape (P, P)
        Peak 1 at the centre, falling smoothly to :data:`WINDOW_FLOOR` at the borders, so
        overlapping patches fade into each other without seams.
    """
    centres = (np.arange(patch_px, dtype=np.float64) + 0.5) / patch_px
    hann = np.sin(np.pi * centres) ** 2
    return np.maximum(np.outer(hann, hann), WINDOW_FLOOR).astype(np.float32)
