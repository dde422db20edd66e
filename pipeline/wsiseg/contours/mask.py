"""The probability map as contouring reads it: thresholds, probabilities, block shapes,
the chunks a geometry spans.

The map is (H, W) at the working resolution: uint8 probability × 255 (the slide store's
``refined``), floating probability in [0, 1], or bool; any array with numpy slicing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import shapely
from numpy.typing import NDArray

DEFAULT_CHUNK_PX = 1024


class ArrayLike2D(Protocol):
    """A 2-D array with numpy slicing: ``numpy.ndarray``, ``zarr.Array``, ``dask.array``..."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


def uint8_threshold(threshold: float) -> int:
    """The smallest uint8 code ``v`` with ``v / 255 >= threshold``.

    ``ceil(255 · threshold)``, computed with a 1e-9 tolerance so that thresholds that are
    exact multiples of 1/255 are not pushed up by float error. For θ = 0.5 this is 128
    (= ``round(0.5 · 255)``): 127 (0.498) is background, 128 (0.502) is tumor.
    """
    _check_threshold(threshold)
    return math.ceil(threshold * 255.0 - 1e-9)


def tumor_mask(prob: NDArray[Any], threshold: float = 0.5) -> NDArray[np.bool_]:
    """Tumor pixels of a probability block: ``prob >= threshold``.

    Parameters
    ----------
    prob : ndarray
        uint8 probability × 255 (compared with :func:`uint8_threshold`), floating probability in
        [0, 1] (compared with ``threshold`` directly), or bool (True = probability 1).
    threshold : float
        Probability threshold θ in [0, 1].

    Returns
    -------
    ndarray of bool, same shape as ``prob``.
    """
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob >= uint8_threshold(threshold)
    _check_threshold(threshold)
    if prob.dtype == np.bool_:
        return prob.copy() if threshold > 0 else np.ones(prob.shape, dtype=bool)
    if np.issubdtype(prob.dtype, np.floating):
        return prob >= threshold
    raise TypeError(f"probability must be uint8 (×255), floating or bool, got {prob.dtype}")


def _check_threshold(threshold: float) -> None:
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")


def _as_probability(values: NDArray[Any]) -> NDArray[np.float64]:
    if values.dtype == np.uint8:
        return values / 255.0
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.floating):
        return values.astype(np.float64)
    raise TypeError(f"probability must be uint8 (×255), floating or bool, got {values.dtype}")


def _block_shape(prob: ArrayLike2D, chunk_px: int | None) -> tuple[int, int]:
    if chunk_px is not None:
        if chunk_px < 1:
            raise ValueError(f"chunk_px must be a positive integer, got {chunk_px}")
        return chunk_px, chunk_px
    chunks = getattr(prob, "chunks", None)
    if chunks is None or len(chunks) != 2:
        return DEFAULT_CHUNK_PX, DEFAULT_CHUNK_PX
    # zarr / h5py: (rows, cols); dask: ((rows, rows, ...), (cols, ...))
    rows, cols = (c[0] if isinstance(c, tuple) else c for c in chunks)
    return int(rows), int(cols)


def chunks_spanned(geometries: Sequence[shapely.Geometry], block: tuple[int, int],
                   grid: tuple[int, int]) -> set[tuple[int, int]]:
    """The (row, col) chunks of a ``grid`` of ``block`` (rows, cols) px that ``geometries``
    (working px: x = column, y = row) likely meet: in each row of chunks that an outer
    ring's vertices reach, those from the leftmost vertex's to the rightmost's. A hint (a
    long edge may cross a row with no vertex there; a bay may leave a chunk between empty):
    0.7 ms for a ring of 13 000 vertices, where testing the chunks against the polygon
    costs 15 ms."""
    bh, bw = block
    parts = shapely.get_parts(np.asarray(geometries, dtype=object))
    xy, part = shapely.get_coordinates(shapely.get_exterior_ring(parts), return_index=True)
    if not len(xy):
        return set()
    rows = np.clip(xy[:, 1] // bh, 0, grid[0] - 1).astype(np.int64)
    cols = np.clip(xy[:, 0] // bw, 0, grid[1] - 1).astype(np.int64)
    band = part.astype(np.int64) * grid[0] + rows  # a row of chunks of one part
    order = np.argsort(band, kind="stable")
    band, cols = band[order], cols[order]
    starts = np.r_[0, np.flatnonzero(np.diff(band)) + 1]
    lowest, highest = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts)
    return {(row, col)
            for row, low, high in zip((band[starts] % grid[0]).tolist(), lowest.tolist(),
                                      highest.tolist(), strict=True)
            for col in range(low, high + 1)}
