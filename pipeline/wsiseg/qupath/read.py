"""Reading a QuPath GeoJSON export into :class:`Annotation` records, with one-line warnings.

Reads every container and property form QuPath 0.2–0.7 writes (``qupath-geojson.md`` §1, §4.2).
Coordinates are level-0 pixels in **QuPath's** frame; the caller converts with
:class:`wsiseg.slide.frame.Frame`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from contextlib import suppress
from pathlib import Path
from typing import Any

from wsiseg.errors import WsisegError
from wsiseg.qupath.classes import Annotation
from wsiseg.qupath.containers import (
    _TOO_DEEP,
    _BadInput,
    _iter_features,
    _load_json,
    _one_line,
    _only_empty_lists,
    _short,
    _text,
)
from wsiseg.qupath.geometry import _is_zero_size, _read_geometry

logger = logging.getLogger(__name__)

_NON_ANNOTATION_TYPES = frozenset({"detection", "cell", "tile", "tmacore", "tma_core", "root"})
_LEGACY_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}


def read_annotations(path: Path) -> list[Annotation]:
    """Read the annotations of a QuPath GeoJSON export (warnings are logged).

    See :func:`read_annotations_report`.
    """
    annotations, warnings = read_annotations_report(path)
    for line in warnings:
        logger.warning("%s", line)
    return annotations


def read_annotations_report(path: Path | str) -> tuple[list[Annotation], list[str]]:
    """Read the annotations of a QuPath GeoJSON export, with one-line warnings.

    Accepts ``.geojson``/``.json``, gzip (``.geojson.gz``) and ``.zip`` (every ``.geojson`` /
    ``.json`` entry), recognised by content; a FeatureCollection, a (nested) array, a single
    Feature or a bare geometry; the property forms of QuPath 0.2–0.7. Keeps annotations only
    (drops detections, cells, tiles, TMA cores). Repairs invalid polygons with
    ``shapely.make_valid`` (polygonal parts kept), skips empty and zero-size geometries and
    features whose geometry is null; each of these adds a warning line.

    Parameters
    ----------
    path : Path
        The GeoJSON file.

    Returns
    -------
    annotations : list of Annotation
        In file order; geometries in QuPath-frame level-0 pixels.
    warnings : list of str
        One line each, naming the file.

    Raises
    ------
    WsisegError
        Unreadable or malformed JSON, an empty file, JSON that is not GeoJSON, an unknown
        geometry type, malformed, non-finite or huge (> 1e7 px) coordinates, a geometry on a
        z/t plane other than 0, a file whose only features have ``geometry: null``, a damaged
        gzip or zip container, JSON nested hundreds of levels deep or larger than
        :data:`MAX_JSON_BYTES`. The message is one line, ``"<path>: <what is wrong>"``; no
        other exception escapes for any file content (``scripts/fuzz/scribbles.py``).
    """
    path = Path(path)
    try:
        documents = _load_json(path)
        return _parse_documents(documents, path)
    except _BadInput as exc:
        raise WsisegError(_one_line(f"{path}: {exc}")) from None
    except RecursionError:  # a value nested past what the walks below can follow
        raise WsisegError(_one_line(f"{path}: {_TOO_DEEP}")) from None


def _parse_documents(documents: list[Any], path: Path) -> tuple[list[Annotation], list[str]]:
    stats = {"unrecognised": 0, "containers": 0}
    features = [f for doc in documents for f in _iter_features(doc, stats)]
    if not features and stats["containers"] == 0 and not _only_empty_lists(documents):
        raise _BadInput(
            "not GeoJSON (expected a FeatureCollection, a Feature, an array of Features "
            "or a geometry)"
        )
    warnings: list[str] = []
    if stats["unrecognised"]:
        warnings.append(
            f"{path}: {stats['unrecognised']} JSON value(s) that are not GeoJSON features ignored"
        )
    n_with_geometry = sum(1 for f in features if f.get("geometry") is not None)
    null_geometry = len(features) - n_with_geometry
    if null_geometry and not n_with_geometry:
        raise _BadInput(
            f"every feature ({null_geometry}) has geometry null; nothing to read"
        )
    if null_geometry:
        warnings.append(f"{path}: {null_geometry} feature(s) with geometry null skipped")

    annotations: list[Annotation] = []
    n_empty = 0
    for index, feature in enumerate(features, start=1):
        props = feature.get("properties")
        props = props if isinstance(props, dict) else {}
        if _object_type(feature, props).lower() in _NON_ANNOTATION_TYPES:
            continue
        geojson = feature.get("geometry")
        if geojson is None:
            continue
        class_name, color = _classification(props.get("classification"))
        where = f"feature #{index}" + (f" ({class_name})" if class_name else "")
        geometry = _read_geometry(geojson, where, warnings, path)
        if geometry is None or _is_zero_size(geometry):
            n_empty += 1
            continue
        measurements, dropped = _measurements(props.get("measurements"))
        if dropped:
            warnings.append(
                f"{path}: {where}: non-numeric measurement(s) dropped: {', '.join(dropped)}"
            )
        feature_id = feature.get("id")
        name = props.get("name")
        annotations.append(Annotation(
            geometry=geometry,
            class_name=class_name,
            name=_text(name) if isinstance(name, str) else None,
            locked=props.get("isLocked") in (True, "true"),
            measurements=measurements,
            metadata=_metadata(props.get("metadata")),
            id=_text(feature_id)
            if isinstance(feature_id, str) and feature_id not in _LEGACY_IDS else None,
            color=color,
        ))
    if n_empty:
        warnings.append(f"{path}: {n_empty} empty or zero-size geometry(ies) skipped")
    return annotations, warnings


def _object_type(feature: dict[str, Any], props: dict[str, Any]) -> str:
    # Same precedence as QuPath's reader (§2.3): objectType, object_type, type, legacy id.
    for key in ("objectType", "object_type", "type"):
        value = props.get(key)
        if isinstance(value, str) and value:
            return value
    legacy = feature.get("id")
    if isinstance(legacy, str) and legacy in _LEGACY_IDS:
        return _LEGACY_IDS[legacy]
    return "annotation"


def _classification(value: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    """Class name (QuPath's ``"A: B"`` string form) and class colour of every form (§4.2.4)."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return (_text(value).strip() or None), None
    if not isinstance(value, dict):
        return None, None
    color = _color(value.get("color"))
    if color is None:
        color = _color(value.get("colorRGB"))
    names = value.get("names")
    if isinstance(names, list) and names:
        parts = [_name_part(n) for n in names if n is not None]
        return (": ".join(p for p in parts if p) or None), color
    parts = []
    node: Any = value
    while isinstance(node, dict) and node.get("name") is not None:  # legacy parentClass chain
        parts.insert(0, _name_part(node["name"]))
        node = node.get("parentClass")
    return (": ".join(p for p in parts if p) or None), color


def _name_part(value: Any) -> str:
    # QuPath's class names are strings; a number is taken as its text, anything else cut short.
    return _text(value if isinstance(value, str) else _short(value)).strip()


def _color(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # packed (A)RGB, signed 32-bit in legacy files
        packed = value & 0xFFFFFF
        return (packed >> 16) & 0xFF, (packed >> 8) & 0xFF, packed & 0xFF
    if not (isinstance(value, list) and len(value) in (3, 4)):
        return None
    # An int is finite however large (math.isfinite would overflow on 10**400); 0–255 below.
    if all(
        (isinstance(c, int) and not isinstance(c, bool))
        or (isinstance(c, float) and math.isfinite(c))
        for c in value[:3]
    ):
        rgb = tuple(int(c) for c in value[:3])
        if all(0 <= c <= 255 for c in rgb):
            return rgb[0], rgb[1], rgb[2]
    return None


def _measurements(value: Any) -> tuple[dict[str, float], list[str]]:
    items: list[tuple[Any, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):  # QuPath 0.2/0.3: [{"name": ..., "value": ...}]
        items = [(m.get("name"), m.get("value")) for m in value if isinstance(m, dict)]
    else:
        return {}, []
    out: dict[str, float] = {}
    dropped: list[str] = []
    for key, raw in items:
        if key is None or raw is None:
            continue
        number: float | None = None
        if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
            try:
                number = float(raw)
            except OverflowError:  # an integer beyond float: Java's parser reads ±Infinity
                number = math.inf if raw > 0 else -math.inf
        elif isinstance(raw, str):
            with suppress(ValueError):
                number = float(raw)  # QuPath writes "NaN", "Infinity", "-Infinity"
        key_text = _text(key) if isinstance(key, str) else _short(key)
        if number is None:
            dropped.append(key_text)
        else:
            out[key_text] = number
    return out, dropped


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {
        _text(k): _text(v) if isinstance(v, str) else _text(json.dumps(v, ensure_ascii=False))
        for k, v in value.items()
        if v is not None
    }
