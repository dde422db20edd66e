"""Writing tumour contours as GeoJSON that QuPath ≥ 0.4 imports without complaint (§4.1, §2.5)."""

from __future__ import annotations

import gzip
import json
import math
import numbers
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_write_bytes
from wsiseg.qupath.classes import _DERIVED_DELIMITER, QUPATH_CLASS_COLORS, Annotation
from wsiseg.qupath.snap import geometry_json


def write_annotations(
    path: Path | str,
    annotations: Iterable[Annotation],
    *,
    default_color: tuple[int, int, int] = (255, 0, 255),
) -> int:
    """Write annotations as a FeatureCollection QuPath ≥ 0.4 imports (``qupath-geojson.md`` §4.1).

    Each geometry is made valid, reduced to its polygonal parts, snapped to QuPath's 0.01-px grid
    and written as a ``Polygon`` (one part) or ``MultiPolygon`` (several), with closed rings of
    ≥ 4 positions and at most 2 decimals. Annotations with no polygonal area left (lines,
    points, slivers) are not written. The class colour is QuPath's own for its built-in classes
    (:data:`QUPATH_CLASS_COLORS`), else ``a.color``, else ``default_color``. The file is written
    atomically (temporary file + ``os.replace``); a path ending ``.gz`` is gzip-compressed.

    Parameters
    ----------
    path : Path
        ``.geojson`` (or ``.json``, ``.geojson.gz``).
    annotations : iterable of Annotation
        Geometries in QuPath-frame level-0 pixels.
    default_color : (int, int, int)
        Class colour for non-built-in classes without ``a.color``.

    Returns
    -------
    int
        The number of features written.

    Raises
    ------
    ValueError
        A non-finite measurement or coordinate, a colour outside 0–255, a duplicate id, or a
        ``.zip`` path. Nothing is written then; an existing file stays as it was.
    """
    path = Path(path)
    if path.name.lower().endswith(".zip"):
        raise ValueError(f"{path}: write .geojson or .geojson.gz, not .zip")
    features = annotation_features(annotations, default_color=default_color)
    write_feature_collection(path, [text for _, _, text in features])
    return len(features)


def annotation_features(
    annotations: Iterable[Annotation], *, default_color: tuple[int, int, int] = (255, 0, 255)
) -> list[tuple[int, str, str]]:
    """``(index, id, Feature JSON text)`` of each annotation :func:`write_annotations` writes
    (the ones with polygonal area left), checked as there."""
    default_rgb = _checked_rgb(default_color, "default_color")
    out: list[tuple[int, str, str]] = []
    seen_ids: set[str] = set()
    for index, annotation in enumerate(annotations):
        feature = _feature_json(annotation, index, default_rgb)
        if feature is None:
            continue
        feature_id, text = feature
        if feature_id in seen_ids:
            raise ValueError(f"annotation {index}: duplicate id {feature_id!r}")
        seen_ids.add(feature_id)
        out.append((index, feature_id, text))
    return out


def feature_collection_bytes(feature_texts: Sequence[str | bytes]) -> tuple[bytes, list[int]]:
    """Feature JSON texts (``str``, or ``bytes`` in UTF-8) as one FeatureCollection (UTF-8),
    and the byte offset of each feature in it, then the offset just past the last one, so a
    reader can take a feature's text back without parsing the rest."""
    head = b'{"type":"FeatureCollection","features":['
    parts = [text if isinstance(text, bytes) else text.encode() for text in feature_texts]
    offsets = [len(head)]
    for part in parts:
        offsets.append(offsets[-1] + len(part) + 1)  # + the comma after it
    return head + b",".join(parts) + b"]}", offsets


def write_feature_collection(path: Path | str, feature_texts: Sequence[str]) -> list[int]:
    """Write Feature JSON texts as one FeatureCollection, atomically (``.gz``: gzip).

    Returns the offsets of :func:`feature_collection_bytes` (in the uncompressed file).
    """
    path = Path(path)
    data, offsets = feature_collection_bytes(feature_texts)
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: same contours, same bytes
    atomic_write_bytes(path, data)
    return offsets


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _feature_json(
    annotation: Annotation, index: int, default_rgb: tuple[int, int, int]
) -> tuple[str, str] | None:
    """(id, Feature JSON text), or None when the annotation has no area to write."""
    where = f"annotation {index}"
    geometry = geometry_json(annotation.geometry, where, annotation.valid_geometry,
                             annotation.corner_grid)
    if geometry is None:
        return None
    props: dict[str, Any] = {"objectType": "annotation"}
    if annotation.name is not None:
        props["name"] = str(annotation.name)
    if annotation.class_name is not None:
        props["classification"] = _classification_json(annotation, default_rgb, where)
    if annotation.locked:
        props["isLocked"] = True  # QuPath ≥ 0.4 writes the key only when true
    if annotation.measurements:
        props["measurements"] = _measurements_json(annotation.measurements, where)
    if annotation.metadata:
        props["metadata"] = {str(k): str(v) for k, v in annotation.metadata.items()}
    feature_id = str(annotation.id) if annotation.id else str(uuid.uuid4())
    # Key order as QuPath writes it: type, id, geometry, properties.
    text = (
        f'{{"type":"Feature","id":{_dumps(feature_id)},"geometry":{geometry},'
        f'"properties":{_dumps(props)}}}'
    )
    return feature_id, text


def _classification_json(
    annotation: Annotation, default_rgb: tuple[int, int, int], where: str
) -> dict[str, Any]:
    class_name = str(annotation.class_name)
    rgb = QUPATH_CLASS_COLORS.get(class_name)
    if rgb is None:
        rgb = (
            _checked_rgb(annotation.color, f"{where}: color")
            if annotation.color is not None else default_rgb
        )
    names = [p.strip() for p in class_name.split(_DERIVED_DELIMITER) if p.strip()]
    if not names:
        raise ValueError(f"{where}: class name {class_name!r} is blank")
    if len(names) > 1:  # a derived class, written as QuPath ≥ 0.4 writes it
        return {"names": names, "color": list(rgb)}
    return {"name": names[0], "color": list(rgb)}


def _checked_rgb(color: Any, what: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in color)
        ok = len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) and all(
            float(c) == int(c) for c in color
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{what}: expected 3 integers in 0–255, got {color!r}")
    return rgb[0], rgb[1], rgb[2]


def _measurements_json(measurements: Mapping[str, float], where: str) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, value in measurements.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}: measurement {key!r} is not a number: {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: measurement {key!r} is not finite: {value!r}")
        out[str(key)] = int(value) if isinstance(value, numbers.Integral) else float(value)
    return out
