"""GeoJSON geometry objects → shapely geometries, the way QuPath reads them (§2.4).

Also the polygonal clean-up (:func:`_polygonal`) that the writer shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsiseg.qupath.containers import _GEOMETRY_TYPES, _BadInput, _short, _type_name

MAX_ABS_COORDINATE = 1e7
"""Larger |x| or |y| (level-0 px) is no slide coordinate: a broken file or another CRS."""


def _read_geometry(
    geojson: Any, where: str, warnings: list[str], path: Path
) -> shapely.Geometry | None:
    """A shapely geometry from a GeoJSON geometry object, or None when it is empty."""
    if not isinstance(geojson, dict):
        raise _BadInput(f"{where}: geometry is not a JSON object")
    plane = geojson.get("plane")
    if isinstance(plane, dict):
        z, t = plane.get("z", 0) or 0, plane.get("t", 0) or 0
        if z != 0 or t != 0:
            raise _BadInput(
                f"{where}: geometry lies on plane z={_short(z, 20)}, t={_short(t, 20)}; only "
                "2-D images (z=0, t=0) are supported"
            )
    geometry = _build_geometry(geojson, where)
    if geometry is None or geometry.is_empty:
        return None
    if geometry.geom_type == "GeometryCollection":
        geometry = _homogenise(geometry)
        warnings.append(
            f"{path}: {where}: GeometryCollection reduced to its {geometry.geom_type} parts"
        )
        if geometry.is_empty:
            return None
    if geometry.geom_type in ("Polygon", "MultiPolygon") and not geometry.is_valid:
        reason = shapely.is_valid_reason(geometry)
        geometry = _polygonal(shapely.make_valid(geometry))
        if geometry is None or _is_zero_size(geometry):
            return None  # a degenerate ring (QuPath's empty ROI), not a repair
        warnings.append(f"{path}: {where}: invalid polygon repaired ({reason})")
    return geometry


def _build_geometry(geojson: dict[str, Any], where: str) -> shapely.Geometry | None:
    # Not shapely.from_geojson: QuPath closes unclosed rings, drops degenerate ones and ignores
    # a 3rd coordinate, where GEOS refuses the first two and keeps z.
    kind = _type_name(geojson)
    if kind not in _GEOMETRY_TYPES:
        raise _BadInput(f"{where}: unknown geometry type {_short(geojson.get('type'))}")
    if kind == "GeometryCollection":
        # Nested collections are flattened: each member keeps its geometry (issue 20.2).
        parts = [_build_simple(m, where) for m in _collection_members(geojson, where)]
        return shapely.GeometryCollection([p for p in parts if p is not None and not p.is_empty])
    return _build_simple(geojson, where)


def _collection_members(collection: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The members of a GeometryCollection that are not collections, nested ones flattened,
    in file order (iteratively: nesting depth cannot raise a RecursionError)."""
    members: list[dict[str, Any]] = []
    stack = [collection]
    while stack:
        node = stack.pop()
        if _type_name(node) != "GeometryCollection":
            members.append(node)
            continue
        geometries = node.get("geometries")
        if not isinstance(geometries, list):
            raise _BadInput(f"{where}: GeometryCollection without a 'geometries' array")
        stack.extend(m for m in reversed(geometries) if isinstance(m, dict))
    return members


def _build_simple(geojson: dict[str, Any], where: str) -> shapely.Geometry | None:
    """A Point, LineString, Polygon or their Multi forms; None when empty."""
    kind = _type_name(geojson)
    if kind not in _GEOMETRY_TYPES or kind == "GeometryCollection":
        raise _BadInput(f"{where}: unknown geometry type {_short(geojson.get('type'))}")
    coords = geojson.get("coordinates")
    if not isinstance(coords, list):
        raise _BadInput(f"{where}: {kind} without a 'coordinates' array")
    if kind == "Point":
        if not coords:
            return None
        return shapely.Point(_positions([coords], where)[0])
    if kind == "MultiPoint":
        xy = _positions(coords, where)
        return shapely.MultiPoint(xy) if len(xy) else None
    if kind == "LineString":
        return _line(_positions(coords, where))
    if kind == "MultiLineString":
        lines = [_line(_positions(_as_list(c, where), where)) for c in coords]
        lines = [g for g in lines if g is not None]
        return shapely.MultiLineString(lines) if lines else None
    if kind == "Polygon":
        return _polygon(coords, where)
    polygons = [_polygon(_as_list(c, where), where) for c in coords]  # MultiPolygon
    polygons = [g for g in polygons if g is not None]
    if not polygons:
        return None
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


def _as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _BadInput(f"{where}: malformed coordinates (expected nested arrays)")
    return value


def _positions(value: Any, where: str) -> np.ndarray:
    """(N, 2) float64 positions; a 3rd value per position is ignored, as QuPath does."""
    if isinstance(value, list) and not value:
        return np.empty((0, 2))
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise _BadInput(f"{where}: malformed coordinates (ragged arrays)") from None
    if array.ndim != 2 or array.shape[1] < 2 or array.dtype.kind not in "iuf":
        raise _BadInput(
            f"{where}: malformed coordinates (expected [x, y] number pairs)"
        )
    xy = array[:, :2].astype(np.float64)
    if not np.isfinite(xy).all():
        raise _BadInput(f"{where}: coordinates are not finite (NaN or infinity)")
    if np.abs(xy).max() > MAX_ABS_COORDINATE:
        raise _BadInput(
            f"{where}: coordinate {np.abs(xy).max():.6g} px is too large for a slide "
            f"(> {MAX_ABS_COORDINATE:.0e}; not level-0 pixels?)"
        )
    return xy


def _line(xy: np.ndarray) -> shapely.LineString | None:
    return shapely.LineString(xy) if len(xy) >= 2 else None


def _ring(xy: np.ndarray) -> np.ndarray | None:
    if len(xy) and not np.array_equal(xy[0], xy[-1]):
        xy = np.vstack([xy, xy[:1]])  # QuPath does not require closure on read; close it
    return xy if len(xy) >= 4 else None


def _polygon(rings: list[Any], where: str) -> shapely.Polygon | None:
    if not rings:
        return None
    closed = [_ring(_positions(_as_list(r, where), where)) for r in rings]
    shell, holes = closed[0], [h for h in closed[1:] if h is not None]
    if shell is None:
        return None  # degenerate (QuPath's empty ROI); a hole without a shell is nothing
    return shapely.Polygon(shell, holes)


def _homogenise(collection: shapely.Geometry) -> shapely.Geometry:
    # QuPath keeps the polygons of a mixed collection, else the lines, else the points (§2.4).
    parts = list(shapely.get_parts(collection))
    for family, multi in (
        (("Polygon", "MultiPolygon"), shapely.MultiPolygon),
        (("LineString", "MultiLineString"), shapely.MultiLineString),
        (("Point", "MultiPoint"), shapely.MultiPoint),
    ):
        chosen = [g for p in parts if p.geom_type in family for g in shapely.get_parts(p)]
        if chosen:
            return chosen[0] if len(chosen) == 1 else multi(chosen)
    return shapely.GeometryCollection()


def _polygonal(geometry: shapely.Geometry) -> shapely.Polygon | shapely.MultiPolygon | None:
    """The polygonal parts of any geometry as one valid (Multi)Polygon; None when there are none."""
    parts = [p for p in _polygon_parts(geometry) if not p.is_empty]
    if not parts:
        return None
    out = parts[0] if len(parts) == 1 else shapely.MultiPolygon(parts)
    if not out.is_valid:  # e.g. parts sharing an edge after make_valid of a collection
        out = _polygonal_union(parts)
    return out if out is not None and not out.is_empty else None


def _polygonal_union(parts: list[shapely.Polygon]) -> shapely.Polygon | shapely.MultiPolygon | None:
    merged = list(_polygon_parts(shapely.union_all(parts)))
    if not merged:
        return None
    return merged[0] if len(merged) == 1 else shapely.MultiPolygon(merged)


def _polygon_parts(geometry: shapely.Geometry) -> Iterator[shapely.Polygon]:
    if geometry.geom_type == "Polygon":
        yield geometry
    elif geometry.geom_type in ("MultiPolygon", "GeometryCollection"):
        for part in geometry.geoms:
            yield from _polygon_parts(part)


def _is_zero_size(geometry: shapely.Geometry) -> bool:
    if geometry.is_empty:
        return True
    dim = shapely.get_dimensions(geometry)
    if dim == 2:
        return not geometry.area > 0
    if dim == 1:
        return not geometry.length > 0
    return False
