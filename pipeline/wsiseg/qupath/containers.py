"""Loading QuPath's JSON containers: plain, gzip and zip files, flattened into features.

Size and depth guards (:data:`MAX_JSON_BYTES`, explicit stacks instead of recursion) keep every
file content to a one-line :class:`_BadInput`, which the reader turns into a ``WsisegError``.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_GEOMETRY_TYPES = frozenset({
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
    "GeometryCollection",
})
_CONTAINER_OR_GEOMETRY = _GEOMETRY_TYPES | {"FeatureCollection"}


class _BadInput(Exception):
    """A problem in the file; turned into ``WsisegError("<path>: <message>")`` at the top."""


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



def _only_empty_lists(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if not isinstance(item, list):
            return False
        stack.extend(item)
    return True
