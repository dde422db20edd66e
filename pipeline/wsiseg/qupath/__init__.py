"""QuPath GeoJSON in and out: geometries in, geometries out.

Reads every container and property form QuPath 0.2–0.7 writes (``qupath-geojson.md`` §1, §4.2)
and writes tumour contours the way QuPath ≥ 0.4 imports them without complaint (§4.1, §2.5).
All coordinates are level-0 pixels in **QuPath's** frame; the caller converts with
:class:`wsiseg.slide.frame.Frame`. This module knows nothing of zarr, torch or slides.
"""

from __future__ import annotations

import enum
import gzip
import io
import json
import logging
import math
import numbers
import re
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely

from wsiseg.atomic import atomic_write_bytes
from wsiseg.config import ConfigError
from wsiseg.errors import WsisegError

if TYPE_CHECKING:
    from wsiseg.config import ScribblesConfig

__all__ = [
    "QUPATH_CLASS_COLORS",
    "WSISEG_SOURCE",
    "Annotation",
    "ClassMapping",
    "Label",
    "annotation_features",
    "is_wsiseg_feature",
    "read_annotations",
    "read_annotations_report",
    "validate_feature_collection",
    "write_annotations",
    "write_feature_collection",
]

logger = logging.getLogger(__name__)

WSISEG_SOURCE = "wsiseg"
"""``metadata["source"]`` of the contours we export, so we recognise them when they come back."""

QUPATH_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (90, 90, 180),
    "1+": (255, 215, 0),
    "2+": (225, 150, 50),
    "3+": (200, 50, 50),
}
"""QuPath's built-in classes and their default colours (RGB). QuPath keeps these colours whatever
a file says (§1.3, rule 6), so the writer uses them for these names."""

MAX_ABS_COORDINATE = 1e7
"""Larger |x| or |y| (level-0 px) is no slide coordinate: a broken file or another CRS."""

_PRECISION_PX = 0.01  # QuPath ≥ 0.6 snaps imported vertices to this grid (§2.4)

_DERIVED_DELIMITER = ":"  # QuPath's PathClass delimiter; its string form joins with ": "

_NON_ANNOTATION_TYPES = frozenset({"detection", "cell", "tile", "tmacore", "tma_core", "root"})
_LEGACY_IDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_GEOMETRY_TYPES = frozenset({
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
    "GeometryCollection",
})
_CONTAINER_OR_GEOMETRY = _GEOMETRY_TYPES | {"FeatureCollection"}


class Label(enum.IntEnum):
    """What a scribble says about the pixels under it (the ``scribbles`` raster's values)."""

    IGNORE = 0
    TUMOR = 1
    NON_TUMOR = -1


@dataclass(frozen=True)
class Annotation:
    """One QuPath annotation.

    Attributes
    ----------
    geometry : shapely.Geometry
        QuPath-frame level-0 pixels: (Multi)Polygon, (Multi)LineString or (Multi)Point.
    class_name : str or None
        QuPath's string form, e.g. ``"Tumor"``, ``"Tumor: Positive"``; None = unclassified.
    name : str or None
        The object's name.
    locked : bool
        QuPath's lock (our AI contours are locked).
    measurements : Mapping[str, float]
        Numeric measurements (non-finite values may come back from QuPath files).
    metadata : Mapping[str, str]
        String metadata (QuPath ≥ 0.5 keeps it on annotations).
    id : str or None
        The feature's UUID string.
    color : (int, int, int) or None
        The class colour (RGB) as read, or to write.
    """

    geometry: shapely.Geometry
    class_name: str | None
    name: str | None = None
    locked: bool = False
    measurements: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    id: str | None = None
    color: tuple[int, int, int] | None = None


def is_wsiseg_feature(a: Annotation, *, ai_class_name: str | None = None) -> bool:
    """True for a contour we exported ourselves (``metadata["source"] == "wsiseg"``).

    QuPath 0.4 drops metadata of annotations, so pass the workflow's contour class name
    (``contours.class_name``, e.g. ``"Tumor (AI)"``) as ``ai_class_name`` to recognise those too.
    """
    if a.metadata.get("source") == WSISEG_SOURCE:
        return True
    return ai_class_name is not None and a.class_name == ai_class_name


@dataclass(frozen=True)
class ClassMapping:
    """Which QuPath classes are tumour, non-tumour or not a label.

    Names are compared exactly (case-sensitive, like QuPath). An entry ending in ``*`` (QuPath's
    ``Region*``, ``Ignore*``) also matches the bare name (``Region``). With ``match_base_class``
    a derived class (``Tumor: Positive``) that is not listed itself takes the label of its first
    part (``Tumor``).
    """

    tumor: tuple[str, ...]
    non_tumor: tuple[str, ...]
    ignore: tuple[str, ...]
    match_base_class: bool = True

    def __post_init__(self) -> None:
        for attr in ("tumor", "non_tumor", "ignore"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        seen: dict[str, str] = {}
        for attr in ("tumor", "non_tumor", "ignore"):
            for entry in getattr(self, attr):
                for name in _entry_names(entry):
                    if seen.setdefault(name, attr) != attr:
                        raise ConfigError(
                            f"scribbles: class {name!r} is listed under both "
                            f"{seen[name]} and {attr}"
                        )

    @classmethod
    def from_workflow(cls, scribbles_cfg: ScribblesConfig) -> ClassMapping:
        """The mapping of a workflow's ``scribbles`` section."""
        return cls(
            tumor=tuple(scribbles_cfg.tumor),
            non_tumor=tuple(scribbles_cfg.non_tumor),
            ignore=tuple(scribbles_cfg.ignore),
            match_base_class=scribbles_cfg.match_base_class,
        )

    def label_of(self, class_name: str | None) -> Label | None:
        """The label of a class name; unclassified (None) → IGNORE; not in the table → None."""
        if class_name is None:
            return Label.IGNORE
        label = self._lookup(class_name)
        if label is None and self.match_base_class and _DERIVED_DELIMITER in class_name:
            label = self._lookup(class_name.split(_DERIVED_DELIMITER, 1)[0].strip())
        return label

    def _lookup(self, name: str) -> Label | None:
        for entries, label in (
            (self.tumor, Label.TUMOR),
            (self.non_tumor, Label.NON_TUMOR),
            (self.ignore, Label.IGNORE),
        ):
            if any(name in _entry_names(entry) for entry in entries):
                return label
        return None


def _entry_names(entry: str) -> tuple[str, ...]:
    # "Region*" is QuPath's literal class name; users also type the bare "Region".
    return (entry, entry[:-1]) if entry.endswith("*") and len(entry) > 1 else (entry,)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _BadInput(Exception):
    """A problem in the file; turned into ``WsisegError("<path>: <message>")`` at the top."""


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


MAX_JSON_BYTES = 1 << 30
"""Largest JSON text read (after gunzip / unzip): a guard against compression bombs."""

_TOO_DEEP = "JSON nested too deeply to read (hundreds of levels; a QuPath export has a few)"


def _one_line(message: str) -> str:
    # A file name or value may hold line breaks; the message must stay one line.
    return message.replace("\r", "\\r").replace("\n", "\\n")


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value from the file, cut to ``limit`` characters (messages stay short)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _type_name(node: Any) -> str | None:
    """A JSON object's ``type`` when it is a string (a file may put anything there)."""
    kind = node.get("type") if isinstance(node, dict) else None
    return kind if isinstance(kind, str) else None


def _text(value: str) -> str:
    # json.loads keeps lone surrogates ("\ud800"); they cannot be written as UTF-8 later.
    return value.encode("utf-8", "replace").decode("utf-8")


def _load_json(path: Path) -> list[Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise _BadInput(f"file is larger than {MAX_JSON_BYTES >> 20} MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _BadInput("file not found") from None
    except OSError as exc:
        raise _BadInput(f"cannot read ({exc.strerror or exc})") from None
    if not raw.strip():
        raise _BadInput("file is empty")
    if raw[:4] == b"PK\x03\x04":  # recognise by content: QuPath users rename files
        return [_parse_json(data, f"{name}: ") for name, data in _unzip(raw)]
    if raw[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(MAX_JSON_BYTES + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise _BadInput(f"not a readable gzip file ({_exc_text(exc)})") from None
        if len(raw) > MAX_JSON_BYTES:
            raise _BadInput(f"uncompresses to more than {MAX_JSON_BYTES >> 20} MiB")
        if not raw.strip():
            raise _BadInput("file is empty (after gunzip)")
    return [_parse_json(raw, "")]


def _unzip(raw: bytes) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every .geojson / .json entry of a zip archive."""
    entries: list[tuple[str, bytes]] = []
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = [
                n for n in archive.namelist()
                if n.lower().endswith((".geojson", ".json"))
                and not n.startswith("__MACOSX/")  # macOS resource forks, not JSON
                and not n.rsplit("/", 1)[-1].startswith("._")
            ]
            total = 0
            for name in names:
                with archive.open(name) as f:
                    data = f.read(MAX_JSON_BYTES + 1 - total)
                total += len(data)
                if total > MAX_JSON_BYTES:
                    raise _BadInput(f"zip archive uncompresses to more than "
                                    f"{MAX_JSON_BYTES >> 20} MiB")
                entries.append((_text(name), data))
    except _BadInput:
        raise
    # A damaged archive raises many types (BadZipFile, zlib.error, NotImplementedError for an
    # unknown method, RuntimeError for an encrypted entry, ValueError, EOFError, ...).
    except Exception as exc:
        raise _BadInput(f"not a readable zip archive ({_exc_text(exc)})") from None
    if not entries:
        raise _BadInput("zip archive holds no .geojson or .json file")
    return entries


def _exc_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


def _parse_json(raw: bytes, prefix: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _BadInput(f"{prefix}not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise _BadInput(f"{prefix}file is empty")
    try:
        # NaN/Infinity literals are accepted here and rejected where they matter (coordinates).
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadInput(
            f"{prefix}not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise _BadInput(f"{prefix}not valid JSON ({_exc_text(exc)})") from None
    except RecursionError:  # json's C parser recurses once per nested array or object
        raise _BadInput(f"{prefix}{_TOO_DEEP}") from None


def _iter_features(node: Any, stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Flatten QuPath's containers (§2.2) into Feature-like dicts, children included.

    Iterative (an explicit stack), so nesting depth costs memory, never a RecursionError.
    """
    stack: list[tuple[Any, bool]] = [(node, False)]  # (value, a member of `features`)
    while stack:
        item, in_features = stack.pop()
        if isinstance(item, list):
            stack.extend((x, False) for x in reversed(item))
            continue
        kind = _type_name(item)
        if not isinstance(item, dict):
            stats["unrecognised"] += 1
        elif in_features and kind not in _CONTAINER_OR_GEOMETRY:
            # QuPath parses every element of `features` as an object without checking its type.
            yield from _feature_and_children(item)
        elif kind == "FeatureCollection":
            stats["containers"] += 1
            features = item.get("features")
            if not isinstance(features, list):
                raise _BadInput("FeatureCollection without a 'features' array")
            stack.extend((x, True) for x in reversed(features))
        elif kind == "Feature":
            yield from _feature_and_children(item)
        elif kind in _GEOMETRY_TYPES:
            yield {"type": "Feature", "geometry": item, "properties": {}}
        else:
            stats["unrecognised"] += 1


def _feature_and_children(feature: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A feature, then its hierarchy's descendants depth first (§1.2, §2.3), iteratively."""
    stack = [feature]
    while stack:
        item = stack.pop()
        yield item
        props = item.get("properties")
        if not isinstance(props, dict):
            continue
        for key in ("children", "childObjects"):  # reversed: childObjects first, as before
            children = props.get(key)
            if isinstance(children, list):
                stack.extend(c for c in reversed(children) if isinstance(c, dict))


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


def _only_empty_lists(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if not isinstance(item, list):
            return False
        stack.extend(item)
    return True


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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


def write_feature_collection(path: Path | str, feature_texts: Sequence[str]) -> list[int]:
    """Write Feature JSON texts as one FeatureCollection, atomically (``.gz``: gzip).

    Returns the byte offset of each feature in the (uncompressed) file, then the offset just
    past the last one, so a reader can take a feature's text back without parsing the rest.
    """
    path = Path(path)
    head = b'{"type":"FeatureCollection","features":['
    parts = [text.encode() for text in feature_texts]
    offsets = [len(head)]
    for part in parts:
        offsets.append(offsets[-1] + len(part) + 1)  # + the comma after it
    data = head + b",".join(parts) + b"]}"
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: same contours, same bytes
    _atomic_write_bytes(path, data)
    return offsets


def _dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def _feature_json(
    annotation: Annotation, index: int, default_rgb: tuple[int, int, int]
) -> tuple[str, str] | None:
    """(id, Feature JSON text), or None when the annotation has no area to write."""
    where = f"annotation {index}"
    geometry = _geometry_for_qupath(annotation.geometry, where)
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


def _geometry_for_qupath(geometry: shapely.Geometry, where: str) -> str | None:
    """GeoJSON geometry text by the writer checklist of §4.1, or None when no area is left."""
    if geometry is None or geometry.is_empty:
        return None
    if not np.isfinite(shapely.get_coordinates(geometry)).all():
        raise ValueError(f"{where}: geometry has non-finite coordinates")
    polygonal = _polygonal(geometry if geometry.is_valid else shapely.make_valid(geometry))
    if polygonal is None:
        return None
    # QuPath ≥ 0.6 snaps to this grid and rejects what the snap makes invalid; do it first.
    snapped = _polygonal(shapely.set_precision(polygonal, _PRECISION_PX))
    if snapped is None or not snapped.area > 0:
        return None
    # Canonical vertex order (a re-export writes the same bytes), then RFC 7946's right-hand
    # rule; QuPath itself ignores orientation.
    snapped = shapely.orient_polygons(shapely.normalize(snapped))
    if not snapped.is_valid:  # set_precision's default mode guarantees validity
        raise AssertionError(f"{where}: {shapely.is_valid_reason(snapped)}")  # pragma: no cover
    # GEOS writes the shortest decimal of each snapped coordinate, i.e. ≤ 2 decimals; drop the
    # ".0" of integers, as QuPath does (pixel-edge contours are mostly integers).
    return _INTEGRAL_DOT_ZERO.sub(r"\1", shapely.to_geojson(snapped))


_INTEGRAL_DOT_ZERO = re.compile(r"(\d)\.0(?=[,\]])")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)  # the one atomic write (permissions from the umask)


# --------------------------------------------------------------------------------------------
# Validation by QuPath's import rules
# --------------------------------------------------------------------------------------------


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
