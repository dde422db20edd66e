"""Drawing polygon outlines onto an RGB thumbnail."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import shapely
from numpy.typing import NDArray
from PIL import Image, ImageDraw


def draw_contours(
    rgb: NDArray[np.uint8],
    polygons: Iterable[shapely.Geometry],
    *,
    scale: float,
    color: tuple[int, int, int] = (255, 0, 255),
    width_px: int = 2,
) -> NDArray[np.uint8]:
    """Polygon outlines (shells and holes) drawn onto a copy of an RGB thumbnail.

    Parameters
    ----------
    rgb : ndarray
        (h, w, 3) uint8 image; not modified.
    polygons : iterable of shapely.Polygon or MultiPolygon
        Coordinates multiplied by ``scale`` give ``rgb``'s pixel-edge coordinates (pixel
        ``(i, j)`` covers ``[i, i+1) × [j, j+1)``); e.g. ``scale = thumbnail_w / working_w``.
    scale : float
        Thumbnail pixels per polygon unit.
    color : (int, int, int)
        Outline colour.
    width_px : int
        Line width in thumbnail pixels.

    Returns
    -------
    ndarray
        (h, w, 3) uint8 copy of ``rgb`` with the outlines drawn (Pillow ``ImageDraw.line``).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be a (h, w, 3) uint8 image, got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(np.array(rgb, copy=True))
    draw = ImageDraw.Draw(image)
    fill = tuple(int(v) for v in color)
    parts = shapely.get_parts(np.asarray(list(polygons), dtype=object))
    not_polygons = parts[shapely.get_type_id(parts) != shapely.GeometryType.POLYGON]
    if len(not_polygons):
        raise ValueError(f"draw_contours: expected polygons, got a {not_polygons[0].geom_type}")
    rings = shapely.get_rings(parts)
    if not len(rings):
        return np.asarray(image)
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    # Pillow puts pixel centres on integers: shift by half a pixel. All rings' coordinates
    # are taken in one call, not ring by ring (a tumor of 9 000 holes: 0.3 → 0.07 s).
    xy = xy * scale - 0.5
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    for line in np.split(xy, starts[1:]):
        draw.line([tuple(p) for p in line.tolist()], fill=fill, width=width_px, joint="curve")
    return np.asarray(image)
