"""Ground truth of a generated slide: the tumor mask TIFF and QuPath GeoJSON, written and read.

The truth is the layout's bilinear tumor map thresholded at 0.5: sampled at ``truth_mpp`` for
the mask and traced as iso-lines for the GeoJSON, so the two agree with each other and with
the place where the texture is half tumor, half normal.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from functools import reduce
from pathlib import Path

import numpy as np
import shapely
import tifffile
from scipy import sparse
from skimage import measure

from wsiseg.errors import WsisegError
from wsiseg.synth.layout import TUMOR, Layout, sample_layout
from wsiseg.synth.render import TILE_PX
from wsiseg.synth.write import BUFFER_TILES

TUMOR_CLASS = "Tumor"
TUMOR_COLOR = (200, 0, 0)


def read_truth_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a truth mask resampled to a working grid.

    The working grid of `shape` ``(rows, cols)`` spans the slide's level-0 extent (read from
    the mask's description; the whole mask if it has none). Each working pixel is tumor when
    at least half of its area is tumor in the mask (area majority; nearest when upsampling).

    Parameters
    ----------
    path
        A ``*.truth.tiff`` written by :func:`synthesize_slide`.
    shape
        ``(rows, cols)`` of the working grid.

    Returns
    -------
    numpy.ndarray
        bool, shape `shape`.
    """
    path = Path(path)
    rows, cols = (int(v) for v in shape)
    if rows < 1 or cols < 1:
        raise WsisegError(f"{path}: cannot resample the truth mask to shape {tuple(shape)}")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            mask = page.asarray() > 127
            meta = _parse_json(page.description)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise WsisegError(f"{path}: cannot read the truth mask ({exc})") from exc
    if mask.ndim != 2:
        raise WsisegError(f"{path}: truth mask is not a 2-D image (shape {mask.shape})")
    src_rows, src_cols = mask.shape
    # Extent of the working grid in mask pixels.
    extent_rows, extent_cols = float(src_rows), float(src_cols)
    if meta and "level0_size" in meta and "truth_px_level0" in meta:
        level0_w, level0_h = meta["level0_size"]
        extent_cols = level0_w / meta["truth_px_level0"]
        extent_rows = level0_h / meta["truth_px_level0"]
    weights_r = _area_weights(rows, extent_rows, src_rows)
    weights_c = _area_weights(cols, extent_cols, src_cols)
    # Tumor share of each working pixel, built from strips of mask rows so that the float
    # copy never exceeds a strip.
    fraction = np.zeros((rows, cols), dtype=np.float32)
    strip = 1024
    for r0 in range(0, src_rows, strip):
        block = mask[r0 : r0 + strip].astype(np.float32)
        across = (weights_c @ block.T).T  # (strip rows, cols)
        fraction += weights_r[:, r0 : r0 + strip] @ across
    return fraction >= 0.5


def _parse_json(text: str | None) -> dict | None:
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _area_weights(n_out: int, extent: float, n_src: int) -> sparse.csr_array:
    """Sparse (n_out, n_src) share of each output cell covered by each source cell.

    Output cell ``i`` spans source coordinates ``[i, i+1) · extent / n_out``; source cells
    past `n_src` count as empty.
    """
    step = extent / n_out
    lo = np.arange(n_out, dtype=np.float64) * step
    src = np.floor(lo).astype(np.int64)[:, None] + np.arange(math.ceil(step) + 1)[None, :]
    overlap = np.minimum(lo[:, None] + step, src + 1) - np.maximum(lo[:, None], src)
    keep = (overlap > 0) & (src < n_src)
    out = np.broadcast_to(np.arange(n_out)[:, None], src.shape)[keep]
    shares = (overlap[keep] / step).astype(np.float32)
    return sparse.csr_array((shares, (out, src[keep])), shape=(n_out, n_src))


def _truth_grid(size: tuple[int, int], mpp: float, truth_mpp: float) -> tuple[int, int, float]:
    """(rows, cols, level-0 px per truth px) of the truth mask of a slide."""
    scale = truth_mpp / mpp
    return math.ceil(size[1] / scale), math.ceil(size[0] / scale), scale


def write_truth_mask(
    path: Path, layout: Layout, size: tuple[int, int], mpp: float, truth_mpp: float
) -> None:
    rows, cols, scale = _truth_grid(size, mpp, truth_mpp)

    def tiles() -> Iterator[np.ndarray]:
        for r in range(-(-rows // TILE_PX)):
            y_um = (r * TILE_PX + np.arange(TILE_PX) + 0.5) * truth_mpp
            for c in range(-(-cols // TILE_PX)):
                x_um = (c * TILE_PX + np.arange(TILE_PX) + 0.5) * truth_mpp
                tumor = sample_layout(layout, y_um, x_um, [TUMOR])[0]
                yield np.where(tumor >= 0.5, 255, 0).astype(np.uint8)

    description = json.dumps(
        {
            "generator": "wsiseg.synth",
            "level0_size": list(size),
            "mpp": mpp,
            "truth_mpp": truth_mpp,
            "truth_px_level0": scale,
        }
    )
    px_per_cm = 1e4 / truth_mpp
    with tifffile.TiffWriter(path, bigtiff=rows * cols > 2**31) as tif:
        tif.write(
            data=tiles(),
            shape=(rows, cols),
            dtype=np.uint8,
            tile=(TILE_PX, TILE_PX),
            photometric="minisblack",
            compression="zlib",
            resolution=(px_per_cm, px_per_cm),
            resolutionunit="CENTIMETER",
            description=description,
            metadata=None,
            software="wsiseg",
            buffersize=BUFFER_TILES * TILE_PX * TILE_PX,
        )


def truth_polygons(layout: Layout) -> shapely.MultiPolygon:
    """Tumor regions (the layout's 0.5 iso-line) as polygons in µm."""
    tumor = np.pad(layout.maps[TUMOR], 1)  # zero border: every contour closes
    rings = []
    for contour in measure.find_contours(tumor, 0.5):
        if len(contour) < 4:
            continue
        # contour is (row, col) on padded nodes; node (r, c) sits at ((c+0.5)·mpp, (r+0.5)·mpp).
        xy = (contour[:, ::-1] - 1.0 + 0.5) * layout.mpp
        ring = shapely.Polygon(xy)
        if ring.area > 0:
            rings.append(shapely.make_valid(ring))
    if not rings:
        return shapely.MultiPolygon()
    # Nested rings alternate outer / hole: even-odd union.
    area = reduce(lambda a, b: a.symmetric_difference(b), sorted(rings, key=lambda g: -g.area))
    polygons = [g for g in getattr(area, "geoms", [area]) if isinstance(g, shapely.Polygon)]
    polygons = [p for p in polygons if not p.is_empty and p.area > 0]
    return shapely.MultiPolygon(polygons)


def _ring_coords(ring: shapely.LinearRing) -> list[list[float]]:
    """Closed ring as ``[[x, y], ...]`` rounded to 0.01 px (QuPath's own grid)."""
    coords = [[round(x, 2), round(y, 2)] for x, y in ring.coords]
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    return coords


def _geojson_polygons(polygons: shapely.MultiPolygon, scale: float) -> list[list]:
    """GeoJSON Polygon coordinates of `polygons` scaled by `scale`, valid after rounding."""
    snapped = shapely.set_precision(shapely.transform(polygons, lambda xy: xy * scale), 0.01)
    out = []
    for part in shapely.get_parts(snapped):
        if not isinstance(part, shapely.Polygon) or part.is_empty:
            continue
        part = shapely.geometry.polygon.orient(part, 1.0)
        rings = [_ring_coords(part.exterior)] + [_ring_coords(r) for r in part.interiors]
        if any(len(r) < 4 for r in rings):
            continue
        # QuPath rejects the whole file over one invalid polygon: check what is written.
        if not shapely.Polygon(rings[0], rings[1:]).is_valid:
            raise RuntimeError(f"synthetic truth polygon became invalid: {part.wkt[:80]}")
        out.append(rings)
    return out


def write_truth_geojson(path: Path, layout: Layout, mpp: float, slide_id: str) -> None:
    name_space = uuid.UUID("5a1de000-0000-4000-8000-000000000000")
    features = [
        {
            "type": "Feature",
            # Deterministic ids keep the files byte-identical per seed.
            "id": str(uuid.uuid5(name_space, f"{slide_id}:{i}")),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": TUMOR_CLASS, "color": list(TUMOR_COLOR)},
            },
        }
        for i, rings in enumerate(_geojson_polygons(truth_polygons(layout), 1.0 / mpp))
    ]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh, allow_nan=False)
