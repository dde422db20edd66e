"""What a slide store turns into for people: contours, annotations, thumbnail, measurements.

Renders only: the round record (what a round wrote, kept in the store) belongs to
:mod:`wsiseg.rounds`, which calls these writers, so a round's files are identical whichever
command wrote them (``wsiseg run`` round 0, ``wsiseg refine``, ``wsiseg export``).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg import __version__
from wsiseg.atomic import atomic_write_bytes, holds_bytes
from wsiseg.contours import (
    RowStreamTracer,
    draw_contours,
    outer_filled,
    polygon_stats,
    tumor_polygons_and_means,
)
from wsiseg.qupath import WSISEG_SOURCE, Annotation
from wsiseg.slide.frame import Frame
from wsiseg.slide.tissue import share_of_mask_covered
from wsiseg.store import SlideStore

#: The measurement holding a contour's mean tumor probability.
MEAN_PROBABILITY = "Mean tumor probability"

# Thumbnails are at most this many pixels on their long side.
THUMBNAIL_PX = 1024


@dataclass(frozen=True)
class SlideMeasurements:
    """Per-slide figures of one round (areas in mm²)."""

    round: int
    tissue_mm2: float
    tumor_mm2: float
    tumor_fraction: float
    foci: int
    largest_focus_mm2: float


def round_contours(
    store: SlideStore, array: str = "refined",
    regions: Sequence[tuple[int, int, int, int]] | None = None,
    spans: Sequence[shapely.Geometry] = (),
) -> tuple[list[shapely.Polygon], np.ndarray]:
    """Tumor polygons of ``array`` in working pixels, filtered by the workflow, and the mean
    probability of each (float64, over its component's pixels).

    ``regions`` (row0, col0, rows, cols each) limit the work to the components touching any
    of them, each traced once; ``spans``: where those are expected to lie (a hint, see
    :func:`~wsiseg.contours.tumor_polygons_and_means`).
    """
    return tumor_polygons_and_means(store[array], regions=regions, spans=spans,
                                    **_contour_options(store))


def round_tracer(store: SlideStore, array: str = "refined") -> RowStreamTracer:
    """:func:`round_contours` of the whole ``array``, traced row by row while it is being
    written (pass its ``rows_final`` to :func:`wsiseg.infer.infer_to_store`)."""
    return RowStreamTracer(store[array], **_contour_options(store))


def _contour_options(store: SlideStore) -> dict[str, float]:
    wf = store.workflow
    cfg = wf.contours
    return {"threshold": cfg.threshold, "simplify_px": cfg.simplify_px,
            "min_area_px": cfg.min_area_um2 / wf.working_mpp**2}


def annotations_for(
    store: SlideStore, polygons: list[shapely.Polygon], round_k: int, slide_id: str,
    means: Sequence[float] | None = None,
) -> list[Annotation]:
    """QuPath annotations (QuPath-frame level-0 px) for a round's polygons, each with its
    area and mean tumor probability: ``means[k]`` when given and finite (from tracing, see
    :func:`round_contours`), else measured on ``refined`` inside the polygon."""
    frame = store.frame
    cfg = store.workflow.contours
    models = store.attrs.get("models", {})
    model_hash = str(models.get("guidenet", {}).get("sha256", ""))[:12]
    # The working grid rounds up to whole pixels: clip to the slide so QuPath sees no
    # coordinate beyond the image.
    slide_box = shapely.box(0, 0, *frame.level0_size)
    # pixel corners of the working grid, in QuPath's frame (vertices the clip adds are not)
    corner_grid = (frame.scale, -float(frame.bounds_offset[0]), -float(frame.bounds_offset[1]))
    out = []
    for k, poly in enumerate(polygons, start=1):
        mean = float(means[k - 1]) if means is not None else math.nan
        if not math.isfinite(mean):
            mean = float(polygon_stats(store["refined"], poly)["mean_probability"])
        area_um2 = float(poly.area) * frame.working_mpp**2
        out.append(
            Annotation(
                geometry=_in_qupath_frame(frame, poly, slide_box),
                class_name=cfg.class_name,
                color=tuple(cfg.color),
                # Refine rounds keep earlier features as they were: new names carry the round.
                name=f"tumor_{k:04d}" if round_k == 0 else f"tumor_r{round_k}_{k:04d}",
                locked=True,
                # traced outlines are valid by construction; affine maps and the clip to
                # the slide keep them so
                valid_geometry=True,
                corner_grid=corner_grid,
                measurements={
                    "Area µm^2": round(area_um2, 2),
                    MEAN_PROBABILITY: round(mean, 4),
                },
                metadata={
                    "source": WSISEG_SOURCE, "version": __version__, "round": str(round_k),
                    "model": model_hash, "slide": slide_id,
                },
                # Deterministic ids: re-exporting the same round gives the same file.
                id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsiseg/{slide_id}/{round_k}/{k}")),
            )
        )
    return out


def _in_qupath_frame(frame: Frame, polygon: shapely.Polygon,
                     slide_box: shapely.Polygon) -> shapely.Geometry:
    """A working-px polygon in QuPath's frame, clipped to the slide (``slide_box``, level 0).

    The clip is an overlay (~0.5 s on a tumor of 60 000 vertices), done only where the
    polygon's bounds leave the box; inside, the polygon goes to QuPath's frame in one pass
    (the same arithmetic as through level 0: its bounds there are its working bounds times
    the scale, to the bit, multiplication by a positive number keeping their order)."""
    x0, y0, x1, y1 = np.asarray(shapely.bounds(polygon)) * frame.scale
    bx0, by0, bx1, by1 = shapely.bounds(slide_box)
    if bx0 <= x0 and by0 <= y0 and x1 <= bx1 and y1 <= by1:
        return frame.transform_geometry(polygon, "working", "qupath")
    level0 = frame.transform_geometry(polygon, "working", "level0")
    return frame.transform_geometry(shapely.intersection(level0, slide_box), "level0",
                                    "qupath")


def published_paths(out_dir: Path, slide_id: str, round_k: int) -> tuple[Path, Path]:
    """Where round k of a slide is published: ``<slide-id>.r<k>.geojson`` and the latest,
    ``<slide-id>.geojson``."""
    return out_dir / f"{slide_id}.r{round_k}.geojson", out_dir / f"{slide_id}.geojson"


def publish_round(record: Path, out_dir: Path, slide_id: str, round_k: int,
                  data: bytes | None = None) -> Path:
    """Copy round k's stored GeoJSON ``record`` to ``out_dir`` as that round's file and as
    the latest (see :func:`published_paths`), which is left as it is when it holds these
    bytes already (a round that changed no contour); returns the latest's path. ``data``:
    the record's bytes, when the caller holds them (a round does: not read again)."""
    round_file, latest = published_paths(out_dir, slide_id, round_k)
    if data is None:
        data = record.read_bytes()
    atomic_write_bytes(round_file, data)
    if not holds_bytes(latest, data):
        atomic_write_bytes(latest, data)
    return latest


def thumbnail_image(store: SlideStore, max_px: int = THUMBNAIL_PX,
                    image: Any = None) -> np.ndarray:
    """The slide at ≤ ``max_px`` on the long side (uint8 (h, w, 3)), glass white.

    ``image``: what to read instead of ``store["image"]``, with its shape and chunks, e.g.
    :attr:`wsiseg.tiling.BackgroundTiling.image`, whose reads wait for the tiling.
    """
    image = store["image"] if image is None else image
    step = max(1, int(np.ceil(max(image.shape[1:]) / max_px)))
    return _strided_read(image, step)


def write_thumbnail(
    store: SlideStore, path: Path, polygons: list[shapely.Polygon], max_px: int = THUMBNAIL_PX,
    thumb: np.ndarray | None = None,
) -> Path:
    """PNG of the slide at ≤ ``max_px`` on the long side with the contours drawn;
    ``thumb``: :func:`thumbnail_image`, when the caller read it already (e.g. beside other
    work)."""
    rows, cols = store["image"].shape[1:]
    step = max(1, int(np.ceil(max(rows, cols) / max_px)))
    if thumb is None:
        thumb = thumbnail_image(store, max_px)
    color = tuple(store.workflow.contours.color)
    drawn = draw_contours(thumb, polygons, scale=1.0 / step, color=color)
    atomic_write_bytes(path, png_bytes(drawn))
    return path


def png_bytes(rgb: NDArray[np.uint8]) -> bytes:
    """Lossless PNG of an RGB image ``(h, w, 3)`` uint8, encoded for speed.

    The thumbnail is written after the network, on a run's critical path: libpng's average
    filter with zlib level 1 and run-length matching took ~27 ms for the 1024-px thumbnail
    of the generated benchmark slide against ~80 ms for Pillow at its fastest compressing
    level (1.40 against 1.37 MB), and 17–18 against 26–31 ms for a 740-px thumbnail of the
    real CMU-1 SVS (5–7 % more bytes).

    Raises
    ------
    ValueError
        ``rgb`` is not ``(h, w, 3)`` uint8.
    """
    # Imported here: serve, refine and export import this module and never write a
    # thumbnail; OpenCV would cost each of them ~0.1 s and ~26 MiB at start.
    import cv2

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"png_bytes: expected a non-empty (h, w, 3) uint8 image, got "
                         f"{rgb.dtype} {rgb.shape}")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [
        cv2.IMWRITE_PNG_COMPRESSION, 1,
        cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_AVG,
        cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE,
    ])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {rgb.shape} image as PNG")
    return encoded.tobytes()


def measurements(
    store: SlideStore, polygons: list[shapely.Polygon], round_k: int,
    covered_px: float | None = None,
) -> SlideMeasurements:
    """The slide's figures for a round's ``polygons`` (working px, disjoint).

    ``covered_px``: the polygons' area on tissue (working px², :func:`tissue_covered_px`
    summed) when the caller knows it — a refine round keeps it per feature in the round's
    index, so only its new polygons are intersected with the tissue, not the slide's.
    """
    wf = store.workflow
    tissue = store.tissue_mask
    tissue_mm2 = float(np.count_nonzero(tissue)) * wf.tissue.mask_mpp**2 / 1e6
    areas_mm2 = [float(p.area) * wf.working_mpp**2 / 1e6 for p in polygons]
    tumor_mm2 = float(sum(areas_mm2))
    # The share of the tissue that is tumor (tumor ∩ tissue / tissue): tumor traced beyond
    # the coarse tissue mask does not count, so the fraction never exceeds 1.
    if covered_px is None:
        fraction = share_of_mask_covered(polygons, tissue, store.frame.working_shape)
    else:
        fraction = _share_of_tissue(store, covered_px)
    return SlideMeasurements(
        round=round_k,
        tissue_mm2=round(tissue_mm2, 4),
        tumor_mm2=round(tumor_mm2, 4),
        tumor_fraction=round(fraction, 4),
        foci=len(polygons),
        largest_focus_mm2=round(max(areas_mm2, default=0.0), 4),
    )


def tissue_covered_px(store: SlideStore, polygons: Sequence[shapely.Geometry]) -> np.ndarray:
    """float64 (n,): each polygon's area on the tissue mask's pixel boxes, working px² —
    what :func:`~wsiseg.slide.tissue.share_of_mask_covered` sums, per polygon, with only
    the mask's pixels under the polygons' bounds read into boxes."""
    out = np.zeros(len(polygons))
    if not len(polygons):
        return out
    mask = store.tissue_mask
    h, w = mask.shape
    rows, cols = store.frame.working_shape
    sy, sx = rows / h, cols / w
    geoms = np.asarray(polygons, dtype=object)
    x0, y0, x1, y1 = shapely.total_bounds(geoms)
    i0, i1 = max(0, int(y0 // sy)), min(h, int(math.ceil(y1 / sy)) + 1)
    j0, j1 = max(0, int(x0 // sx)), min(w, int(math.ceil(x1 / sx)) + 1)
    # A polygon's area less its area off tissue: the boxes of the mask's background runs it
    # meets are few (a tumor lies on tissue), so GEOS clips a large tumor against a handful
    # of boxes instead of against the tissue's whole outline (0.04 s instead of 0.2 s for a
    # 60 000-vertex tumor).
    background = ~mask[i0:i1, j0:j1]
    out = shapely.area(geoms).astype(np.float64)
    if not background.any():
        return out
    padded = np.pad(background, ((0, 0), (1, 1))).astype(np.int8)
    r, edges = np.nonzero(np.diff(padded, axis=1))
    starts, ends, runs_row = edges[0::2] + j0, edges[1::2] + j0, r[0::2] + i0
    boxes = shapely.box(starts * sx, runs_row * sy, ends * sx, (runs_row + 1) * sy)
    # found by the outer rings filled (the query 3 ms instead of 35 for a 61 000-vertex
    # tumor); a box in a hole adds nothing below but float rounding in the sum
    pairs = shapely.STRtree(boxes).query(outer_filled(geoms), predicate="intersects")
    for k in np.unique(pairs[0]).tolist():
        off = shapely.union_all(boxes[pairs[1][pairs[0] == k]])
        out[k] -= shapely.area(shapely.intersection(geoms[k], off))
    return out


def _share_of_tissue(store: SlideStore, covered_px: float) -> float:
    """``covered_px`` (working px²) as a share of the tissue mask's area, at most 1."""
    mask = store.tissue_mask
    if not mask.any():
        return 0.0
    rows, cols = store.frame.working_shape
    sy, sx = rows / mask.shape[0], cols / mask.shape[1]
    return min(1.0, float(covered_px) / (float(np.count_nonzero(mask)) * sy * sx))


def _strided_read(image, step: int) -> np.ndarray:
    """Every ``step``-th pixel of a (3, H, W) array as (h, w, 3), read one chunk row at a
    time (never-tiled chunks read as white glass, the fill value)."""
    rows = image.shape[1]
    chunk = image.chunks[1]
    parts = []
    for r0 in range(0, rows, chunk):
        block = np.asarray(image[:, r0 : min(rows, r0 + chunk)])
        first = (-r0) % step
        parts.append(np.moveaxis(block[:, first::step, ::step], 0, -1))
    return np.concatenate(parts, axis=0)
