"""QuPath's import rules as a checker for the GeoJSON we write (a test helper, not pipeline code).

:func:`validate_feature_collection` lists what QuPath's importer would reject or repair in a
parsed FeatureCollection (``qupath-geojson.md`` §2.3–2.5). Tests call it on the writer's files;
the pipeline itself never needs it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import shapely

from wsiseg.qupath.containers import _GEOMETRY_TYPES
from wsiseg.qupath.read import _color


class _BadInput(Exception):
    """Malformed coordinates; caught in :func:`_geometry_problems` and reported as a problem."""


def validate_feature_collection(
    obj: Any, bounds: tuple[float, float] | None = None
) -> list[str]:
    """Problems QuPath's importer would have with a parsed GeoJSON FeatureCollection.

    Checks the rules of ``qupath-geojson.md`` §2.3–2.5: every feature has a geometry, no
    GeometryCollection, coordinates finite numbers, polygon rings closed with ≥ 4 positions and
    valid, a colour on every classification object, finite numeric measurements, unique ids,
    ``[r, g, b]`` colours, and (with ``bounds``) coordinates inside ``[0, width] × [0, height]``.

    Parameters
    ----------
    obj : dict
        The parsed JSON.
    bounds : (float, float) or None
        (width, height) of the image in QuPath-frame level-0 pixels.

    Returns
    -------
    list of str
        One line per problem (``"feature #3: ..."``); empty when QuPath would import it.
    """
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        return ["top level is not a FeatureCollection"]
    features = obj.get("features")
    if not isinstance(features, list):
        return ["FeatureCollection has no 'features' array"]
    problems: list[str] = []
    seen_ids: set[str] = set()
    for index, feature in enumerate(features, start=1):
        where = f"feature #{index}"
        if not isinstance(feature, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        if feature.get("type") != "Feature":
            problems.append(f"{where}: type is {feature.get('type')!r}, not 'Feature'")
        feature_id = feature.get("id")
        if feature_id is not None:
            if not isinstance(feature_id, str):
                problems.append(f"{where}: id is not a string")
            elif feature_id in seen_ids:
                problems.append(f"{where}: duplicate id {feature_id!r}")
            else:
                seen_ids.add(feature_id)
        geometry_problems = _geometry_problems(feature.get("geometry"), bounds)
        problems.extend(f"{where}: {p}" for p in geometry_problems)
        props = feature.get("properties")
        if props is not None and not isinstance(props, dict):
            problems.append(f"{where}: properties is not a JSON object")
        elif props:
            problems.extend(f"{where}: {p}" for p in _property_problems(props))
    return problems


def _geometry_problems(geometry: Any, bounds: tuple[float, float] | None) -> list[str]:
    if geometry is None:
        return ["geometry is null"]
    if not isinstance(geometry, dict):
        return ["geometry is not a JSON object"]
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        return ["geometry is a GeometryCollection"]
    if kind not in _GEOMETRY_TYPES:
        return [f"unknown geometry type {kind!r}"]
    coords = geometry.get("coordinates")
    depth = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2,
             "Polygon": 2, "MultiPolygon": 3}[kind]
    try:
        position_lists = _position_lists(coords, depth)
    except _BadInput as exc:
        return [str(exc)]
    problems: list[str] = []
    all_xy = [xy for _, xy in position_lists if len(xy)]
    if all_xy:
        stacked = np.concatenate(all_xy)
        if not np.isfinite(stacked).all():
            return ["coordinates are not finite (NaN or infinity)"]
        if bounds is not None:
            width, height = bounds
            x, y = stacked[:, 0], stacked[:, 1]
            if x.min() < 0 or y.min() < 0 or x.max() > width or y.max() > height:
                problems.append(
                    f"coordinates x ∈ [{x.min():g}, {x.max():g}], y ∈ [{y.min():g}, {y.max():g}] "
                    f"leave the image [0, {width:g}] × [0, {height:g}]"
                )
    if kind in ("LineString", "MultiLineString"):
        problems.extend(
            f"line {label}has {len(xy)} position(s), needs ≥ 2"
            for label, xy in position_lists if len(xy) < 2
        )
    if kind in ("Polygon", "MultiPolygon"):
        ring_problems = [
            p for label, xy in position_lists for p in _ring_problems(label, xy)
        ]
        problems.extend(ring_problems)
        if not ring_problems and not problems:
            shape = _polygonal_from_rings(kind, position_lists)
            if shape.is_empty:
                problems.append(f"{kind} without rings")
            elif not shape.is_valid:
                problems.append(f"invalid {kind}: {shapely.is_valid_reason(shape)}")
            elif not shape.area > 0:
                problems.append(f"{kind} has zero area")
    if kind == "Point" and not position_lists[0][1].size:
        problems.append("Point without coordinates")
    return problems


def _polygonal_from_rings(
    kind: str, position_lists: list[tuple[str, np.ndarray]]
) -> shapely.Polygon | shapely.MultiPolygon:
    groups: dict[str, list[np.ndarray]] = {}
    for label, xy in position_lists:  # label "i " (Polygon ring i) or "i.j " (part i, ring j)
        part = label.split(".")[0] if kind == "MultiPolygon" else "0"
        groups.setdefault(part, []).append(xy)
    polygons = [shapely.Polygon(rings[0], rings[1:]) for rings in groups.values()]
    if kind == "Polygon":
        return polygons[0] if polygons else shapely.Polygon()
    return shapely.MultiPolygon(polygons)


def _ring_problems(label: str, xy: np.ndarray) -> list[str]:
    problems = []
    if len(xy) < 4:
        problems.append(f"ring {label}has {len(xy)} position(s), needs ≥ 4")
    if len(xy) and not np.array_equal(xy[0], xy[-1]):
        problems.append(f"ring {label}is not closed")
    return problems


def _position_lists(coords: Any, depth: int) -> list[tuple[str, np.ndarray]]:
    """Every innermost position list of a coordinates array, labelled by its index path."""
    if depth == 0:  # Point
        return [("", _strict_positions([coords] if coords else []))]
    if depth == 1:
        return [("", _strict_positions(coords))]
    if not isinstance(coords, list):
        raise _BadInput("malformed coordinates (expected nested arrays)")
    out = []
    for i, sub in enumerate(coords):
        for label, xy in _position_lists(sub, depth - 1):
            out.append((f"{i}{'.' + label if label else ' '}", xy))
    return out


def _strict_positions(value: Any) -> np.ndarray:
    if not isinstance(value, list):
        raise _BadInput("malformed coordinates (expected nested arrays)")
    if not value:
        return np.empty((0, 2))
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise _BadInput("malformed coordinates (ragged arrays)") from None
    if array.ndim != 2 or array.shape[1] < 2 or array.dtype.kind not in "iuf":
        raise _BadInput("malformed coordinates (expected [x, y] number pairs)")
    return array[:, :2].astype(np.float64)


def _property_problems(props: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    classification = props.get("classification")
    if isinstance(classification, dict):
        has_name = isinstance(classification.get("name"), str) or (
            isinstance(classification.get("names"), list) and classification["names"]
        )
        if not has_name:
            problems.append("classification has neither 'name' nor 'names'")
        if _color(classification.get("color")) is None and not isinstance(
            classification.get("colorRGB"), int
        ):
            problems.append("classification has no valid 'color' [r, g, b] (QuPath aborts)")
    elif classification is not None and not isinstance(classification, str):
        problems.append("classification is neither a string nor an object")
    color = props.get("color")
    if color is not None and not (
        (isinstance(color, int) and not isinstance(color, bool))
        or (isinstance(color, list) and len(color) == 3 and _color(color) is not None)
    ):
        problems.append(f"color {color!r} is not [r, g, b]")
    locked = props.get("isLocked")
    if locked is not None and not isinstance(locked, bool):
        problems.append(f"isLocked {locked!r} is not a boolean")
    measurements = props.get("measurements")
    if measurements is not None:
        if isinstance(measurements, dict):
            items = list(measurements.items())
        elif isinstance(measurements, list):
            items = [(m.get("name"), m.get("value")) if isinstance(m, dict) else (None, m)
                     for m in measurements]
        else:
            items = []
            problems.append("measurements is neither an object nor an array")
        for key, value in items:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
                value
            ):
                problems.append(f"measurement {key!r} = {value!r} is not a finite number")
    metadata = props.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems.append("metadata is not a JSON object")
    name = props.get("name")
    if name is not None and not isinstance(name, str):
        problems.append("name is not a string")
    return problems
