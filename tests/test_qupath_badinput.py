"""The scribble reader on hostile input (issue 20.1, 20.2): annotations or one line, never a
traceback. Every case here raised something else before (TypeError, OverflowError,
ValueError, RecursionError, zlib.error) or lost a stroke."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import shapely

from wsiseg.errors import WsisegError
from wsiseg.qupath import containers, read_annotations_report

SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
TUMOR = {"name": "Tumor", "color": [200, 0, 0]}


def _feature(geometry: Any, **props: Any) -> dict:
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", **props}}


def _write(tmp_path: Path, text: str | bytes, name: str = "export.geojson") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _refused(path: Path, match: str) -> str:
    with pytest.raises(WsisegError, match=match) as err:
        read_annotations_report(path)
    message = str(err.value)
    named = str(path).replace("\n", "\\n")  # a line break in the name is written as \n
    assert message.startswith(f"{named}: ") and "\n" not in message and len(message) < 400
    return message


@pytest.mark.parametrize("document", [
    {"type": {"a": 1}},
    [{"type": []}],
    _feature({"type": ["Polygon"], "coordinates": SQUARE["coordinates"]}),
    _feature({"type": "GeometryCollection", "geometries": [{"type": {"x": 1}}]}),
])
def test_unhashable_types_are_refused_in_one_line(tmp_path, document) -> None:
    _refused(_write(tmp_path, json.dumps(document)),
             "not GeoJSON|unknown geometry type|nothing to read")


def test_a_features_member_with_an_odd_type_is_read_as_qupath_does(tmp_path) -> None:
    # QuPath parses every element of `features` as a feature, whatever its `type`.
    document = {"type": "FeatureCollection",
                "features": [{"type": {"a": 1}, "geometry": SQUARE}, {"type": [], "x": 1}]}
    annotations, _ = read_annotations_report(_write(tmp_path, json.dumps(document)))
    assert [a.geometry.area for a in annotations] == [100]


@pytest.mark.parametrize("color", ["[Infinity, 0, 0]", "[NaN, 0, 0]", "[-Infinity, 1, 2]",
                                   "[255, 1" + "0" * 400 + ", 0]"])
def test_non_finite_colour_is_ignored_not_fatal(tmp_path, color) -> None:
    text = ('{"type": "Feature", "geometry": ' + json.dumps(SQUARE) + ', "properties": '
            '{"classification": {"name": "Tumor", "color": ' + color + '}}}')
    [a], _ = read_annotations_report(_write(tmp_path, text))
    assert a.class_name == "Tumor" and a.color is None


def test_integer_measurement_beyond_float_reads_as_infinity(tmp_path) -> None:
    text = json.dumps(_feature(SQUARE, measurements={"big": 1}))
    text = text.replace('"big": 1', '"big": 1' + "0" * 400)
    [a], _ = read_annotations_report(_write(tmp_path, text))
    assert a.measurements["big"] == float("inf")


def test_lone_surrogates_in_names_are_replaced(tmp_path) -> None:
    text = json.dumps(_feature(SQUARE, name="a\ud800", classification={
        "name": "Tum\udfffor", "color": [1, 2, 3]}, metadata={"k\ud800": "v"}))
    [a], _ = read_annotations_report(_write(tmp_path, text))
    for value in (a.name, a.class_name, *a.metadata):
        value.encode("utf-8")  # would raise on a lone surrogate


def _nested_children(depth: int) -> str:
    leaf = json.dumps(_feature(SQUARE, classification=TUMOR))
    head = ('{"type": "Feature", "geometry": ' + json.dumps(SQUARE)
            + ', "properties": {"childObjects": [')
    return head * depth + leaf + "]}}" * depth


def _nested_collections(depth: int) -> str:
    inner = '{"type": "GeometryCollection", "geometries": [' * depth + json.dumps(SQUARE)
    return ('{"type": "Feature", "geometry": ' + inner + "]}" * depth
            + ', "properties": {"classification": {"name": "Tumor", "color": [1, 2, 3]}}}')


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    '{"a":' * 100_000,
    _nested_children(400),
    _nested_collections(900),
], ids=["brackets", "objects", "children-400", "collections-900"])
def test_deep_nesting_is_refused_in_one_line(tmp_path, text) -> None:
    _refused(_write(tmp_path, text), "nested too deeply")


def test_moderate_nesting_is_read_without_recursion(tmp_path) -> None:
    annotations, _ = read_annotations_report(_write(tmp_path, _nested_children(150)))
    assert len(annotations) == 151
    deep_array = "[" * 300 + json.dumps(_feature(SQUARE)) + "]" * 300
    assert len(read_annotations_report(_write(tmp_path, deep_array, "a.json"))[0]) == 1


@pytest.mark.parametrize("depth", [1, 2, 20])
def test_nested_geometry_collection_keeps_the_stroke(tmp_path, depth) -> None:
    """Issue 20.2: the polygon inside nested collections is read, with its class."""
    text = _nested_collections(depth)
    (annotations, warnings) = read_annotations_report(_write(tmp_path, text))
    assert len(annotations) == 1
    assert annotations[0].class_name == "Tumor"
    assert annotations[0].geometry.equals(shapely.geometry.shape(SQUARE))
    assert not any("empty or zero-size" in w for w in warnings)


def test_nested_collection_mixing_lines_and_polygons_keeps_the_polygons(tmp_path) -> None:
    line = {"type": "LineString", "coordinates": [[0, 0], [50, 50]]}
    geometry = {"type": "GeometryCollection", "geometries": [
        line, {"type": "GeometryCollection", "geometries": [SQUARE, 7, None]}]}
    [a], warnings = read_annotations_report(_write(tmp_path, json.dumps(_feature(geometry))))
    assert a.geometry.geom_type == "Polygon" and a.geometry.area == 100
    assert any("GeometryCollection reduced to its Polygon parts" in w for w in warnings)


def _gzip_with_bad_deflate() -> bytes:
    data = bytearray(gzip.compress(json.dumps(_feature(SQUARE)).encode() * 50, mtime=0))
    data[30] ^= 0xFF  # inside the deflate stream: zlib.error, which is not an OSError
    return bytes(data)


def _zip_with_negative_seek() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("export.geojson", json.dumps(_feature(SQUARE)))
    data = bytearray(buffer.getvalue())
    end = data.rfind(b"PK\x05\x06")
    data[end + 16:end + 20] = (10**6).to_bytes(4, "little")  # central directory offset
    return bytes(data)


def _zip_with_unknown_method() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("export.geojson", json.dumps(_feature(SQUARE)))
    data = bytearray(buffer.getvalue())
    central = data.rfind(b"PK\x01\x02")
    data[central + 10:central + 12] = (99).to_bytes(2, "little")  # compression method 99
    return bytes(data)


@pytest.mark.parametrize("make, match", [
    (_gzip_with_bad_deflate, "not a readable gzip file"),
    (_zip_with_negative_seek, "not a readable zip archive"),
    (_zip_with_unknown_method, "not a readable zip archive"),
])
def test_damaged_containers_are_refused_in_one_line(tmp_path, make, match) -> None:
    _refused(_write(tmp_path, make()), match)


def test_huge_integer_literal_and_long_reprs_stay_one_short_line(tmp_path) -> None:
    _refused(_write(tmp_path, "[" + "9" * 5000 + "]"), "not valid JSON")
    odd_type = {"type": "x\n" * 1000, "coordinates": []}
    message = _refused(_write(tmp_path, json.dumps(_feature(odd_type)), "b.geojson"),
                       "unknown geometry type")
    assert len(message) < 200


def test_file_name_with_a_line_break_stays_one_line(tmp_path) -> None:
    _refused(_write(tmp_path, "{not json", "odd\nname.geojson"), "not valid JSON")


def test_a_compression_bomb_is_refused_without_inflating_it_all(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(containers, "MAX_JSON_BYTES", 1 << 20)
    padding = " " * (4 << 20)  # 4 MiB of JSON whitespace gzips to a few kB
    text = json.dumps(_feature(SQUARE)) + padding
    _refused(_write(tmp_path, gzip.compress(text.encode())), "uncompresses to more than 1 MiB")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("export.geojson", text)
    _refused(_write(tmp_path, buffer.getvalue(), "b.zip"), "uncompresses to more than 1 MiB")
    _refused(_write(tmp_path, text, "c.geojson"), "larger than 1 MiB")
