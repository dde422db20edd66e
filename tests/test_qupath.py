"""QuPath GeoJSON reading, class mapping, writing and validation (wsiseg.qupath)."""

from __future__ import annotations

import gzip
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from wsiseg.config import ScribblesConfig
from wsiseg.errors import WsisegError
from wsiseg.qupath import (
    QUPATH_CLASS_COLORS,
    WSISEG_SOURCE,
    Annotation,
    ClassMapping,
    Label,
    is_wsiseg_feature,
    read_annotations,
    read_annotations_report,
    write_annotations,
)
from wsiseg.qupath.snap import PRECISION_PX, geometry_json
from wsiseg.qupath.text import geometry_text

from qupath_rules import validate_feature_collection

HERE = Path(__file__).resolve().parent
OURS = HERE / "fixtures" / "qupath"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "fixtures" / "qupath"

needs_real = pytest.mark.skipif(
    not (REAL / "polygon.geojson").is_file(),
    reason=f"QuPath's own fixtures not found under {REAL}",
)


def _dump(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _feature(geometry: dict, **props: Any) -> dict:
    return {"type": "Feature", "geometry": geometry,
            "properties": {"objectType": "annotation", **props}}


SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}


def _ring_area(ring: list) -> float:
    xy = np.asarray(ring, dtype=float)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


# ---------------------------------------------------------------------------- real fixtures


@needs_real
def test_polygon_fixture_reads_as_one_annotation_with_26_holes_and_its_area() -> None:
    raw = json.loads((REAL / "polygon.geojson").read_text())
    expected_area = sum(
        _ring_area(poly[0]) - sum(_ring_area(h) for h in poly[1:]) for poly in raw["coordinates"]
    )
    annotations, warnings = read_annotations_report(REAL / "polygon.geojson")
    assert warnings == []
    assert len(annotations) == 1
    (a,) = annotations
    assert a.class_name is None and not a.locked and a.id is None
    assert a.geometry.geom_type == "MultiPolygon"
    parts = sorted(a.geometry.geoms, key=lambda p: -p.area)
    assert [len(p.interiors) for p in parts] == [26, 0, 0]
    assert len(parts[0].exterior.coords) == 1386
    assert a.geometry.area == pytest.approx(expected_area, abs=1e-6)


@needs_real
@pytest.mark.parametrize(
    ("name", "class_name", "color"),
    [
        ("derived-class.json", "First: Second: Third: Fourth", (10, 20, 30)),
        ("derived-class-legacy.json",
         "First-legacy: Second-legacy: Third-legacy: Fourth-legacy", (1, 2, 3)),
    ],
)
def test_derived_class_fixtures(tmp_path: Path, name: str, class_name: str, color: tuple) -> None:
    classification = json.loads((REAL / name).read_text())
    path = _dump(tmp_path / "f.geojson", _feature(SQUARE, classification=classification))
    (a,) = read_annotations(path)
    assert a.class_name == class_name
    assert a.color == color
    mapping = ClassMapping(tumor=("First",), non_tumor=("First-legacy",), ignore=())
    expected = Label.TUMOR if name == "derived-class.json" else Label.NON_TUMOR
    assert mapping.label_of(a.class_name) is expected


# ---------------------------------------------------------------------------- versions


def test_qupath_06_feature_collection() -> None:
    annotations, warnings = read_annotations_report(OURS / "scribbles-v0.6.geojson")
    assert warnings == []
    # 7 features, the detection is dropped
    assert [a.geometry.geom_type for a in annotations] == [
        "Polygon", "MultiPolygon", "LineString", "LineString", "MultiPoint", "Polygon",
    ]
    assert [a.class_name for a in annotations] == [
        "Tumor", "Stroma", "Background", None, "Tumor", "Tumor (AI)",
    ]
    assert annotations[0].color == (200, 0, 0)
    assert annotations[0].id == "ec674228-1ae5-45d0-9772-e81cede02f9a"
    ai = annotations[-1]
    assert ai.locked and ai.name == "tumor_0001"
    assert dict(ai.metadata) == {"source": WSISEG_SOURCE}  # duplicated key read once
    assert dict(ai.measurements) == {"tumor_probability": 0.93}
    assert [is_wsiseg_feature(a) for a in annotations] == [False] * 5 + [True]
    assert not any(a.locked for a in annotations[:-1])
    assert annotations[1].geometry.area == pytest.approx(80 * 90 + 60 * 60)


def test_is_wsiseg_feature_by_class_name_for_qupath_04() -> None:
    a = Annotation(shapely.box(0, 0, 1, 1), "Tumor (AI)")  # 0.4 drops annotation metadata
    assert not is_wsiseg_feature(a)
    assert is_wsiseg_feature(a, ai_class_name="Tumor (AI)")
    assert not is_wsiseg_feature(Annotation(a.geometry, "Tumor"), ai_class_name="Tumor (AI)")


def test_qupath_03_object_type_colorrgb_and_measurement_array() -> None:
    annotations = read_annotations(OURS / "scribbles-v0.3.geojson")
    assert len(annotations) == 2  # tile and tma_core dropped
    tumor, stroma = annotations
    assert (tumor.class_name, tumor.color, tumor.locked) == ("Tumor", (200, 0, 0), False)
    assert dict(tumor.measurements) == {"Area px^2": 5000.0}
    assert tumor.geometry.area == pytest.approx(5000.0)
    assert (stroma.class_name, stroma.color, stroma.locked) == ("Stroma", (150, 200, 150), True)
    assert stroma.geometry.geom_type == "LineString"


def test_qupath_02_legacy_ids_and_parent_class_chain() -> None:
    annotations = read_annotations(OURS / "scribbles-v0.2.json")
    assert len(annotations) == 2  # PathCellObject and PathDetectionObject dropped
    core, region = annotations
    assert core.class_name == "Tumor: Positive"
    assert core.color == (200, 50, 50)  # the derived class's own colorRGB
    assert core.id is None  # "PathAnnotationObject" is a type, not an id
    assert core.name == "biopsy core"
    assert dict(core.measurements) == {"Num cells": 12.0, "Mean": 0.5}
    assert len(core.geometry.interiors) == 1
    assert core.geometry.area == pytest.approx(400 * 400 - 100 * 100)
    assert region.class_name == "Region*" and region.locked
    assert region.geometry.equals(shapely.Point(1000.5, 1000.25))


@pytest.mark.parametrize(
    "props",
    [
        {"type": "detection"},          # QuPath's alias for objectType
        {"objectType": "DETECTION"},    # qubalab writes enum names
        {"objectType": "cell"},
        {"objectType": "tile"},
        {"objectType": "tmaCore"},
        {"object_type": "root"},
    ],
)
def test_non_annotations_are_dropped(tmp_path: Path, props: dict) -> None:
    other = {"type": "Feature", "geometry": SQUARE, "properties": props}
    path = _dump(tmp_path / "f.geojson", [other, _feature(SQUARE, classification="Tumor")])
    assert [a.class_name for a in read_annotations(path)] == ["Tumor"]


def test_missing_object_type_is_an_annotation(tmp_path: Path) -> None:
    path = _dump(tmp_path / "f.geojson", {"type": "Feature", "geometry": SQUARE})
    (a,) = read_annotations(path)
    assert a.class_name is None and a.geometry.area == 100


@pytest.mark.parametrize(
    ("classification", "class_name", "color"),
    [
        (None, None, None),
        ("Tumor: Positive", "Tumor: Positive", None),
        ({"name": "Stroma", "color": [150, 200, 150]}, "Stroma", (150, 200, 150)),
        ({"name": "Stroma", "color": [150, 200, 150, 128]}, "Stroma", (150, 200, 150)),
        ({"names": ["Tumor", "Positive"], "color": [1, 2, 3]}, "Tumor: Positive", (1, 2, 3)),
        ({"name": "Tumor", "colorRGB": -3670016}, "Tumor", (200, 0, 0)),
    ],
)
def test_classification_forms(
    tmp_path: Path, classification: Any, class_name: str | None, color: tuple | None
) -> None:
    props = {} if classification is None else {"classification": classification}
    (a,) = read_annotations(_dump(tmp_path / "f.geojson", _feature(SQUARE, **props)))
    assert (a.class_name, a.color) == (class_name, color)


def test_childobjects_are_read(tmp_path: Path) -> None:
    child = _feature(SQUARE, classification="Stroma")
    parent = _feature(shapely.geometry.mapping(shapely.box(0, 0, 50, 50)),
                      classification="Region*", childObjects=[child])
    names = [a.class_name for a in read_annotations(_dump(tmp_path / "f.json", parent))]
    assert names == ["Region*", "Stroma"]


# ---------------------------------------------------------------------------- containers


TWO = [_feature(SQUARE, classification="Tumor"),
       _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, classification="Stroma")]


def _container(kind: str, tmp_path: Path) -> tuple[Path, list[str | None]]:
    fc = {"type": "FeatureCollection", "features": TWO}
    text = json.dumps(fc)
    if kind == "feature_collection":
        return _dump(tmp_path / "a.geojson", fc), ["Tumor", "Stroma"]
    if kind == "bare_array":
        return _dump(tmp_path / "a.json", TWO), ["Tumor", "Stroma"]
    if kind == "nested_arrays":
        return _dump(tmp_path / "a.json", [[TWO[0]], [[fc]], []]), ["Tumor", "Tumor", "Stroma"]
    if kind == "single_feature":
        return _dump(tmp_path / "a.geojson", TWO[0]), ["Tumor"]
    if kind == "bare_geometry":
        return _dump(tmp_path / "a.geojson", SQUARE), [None]
    if kind == "gzip":
        path = tmp_path / "a.geojson.gz"
        path.write_bytes(gzip.compress(text.encode()))
        return path, ["Tumor", "Stroma"]
    if kind == "zip":
        path = tmp_path / "a.zip"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a.geojson", text)
            z.writestr("__MACOSX/._a.geojson", b"\x00\x05\x16\x07 not json")
            z.writestr("notes.txt", "ignored")
        return path, ["Tumor", "Stroma"]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["feature_collection", "bare_array", "nested_arrays", "single_feature", "bare_geometry",
     "gzip", "zip"],
)
def test_every_container_form(tmp_path: Path, kind: str) -> None:
    path, class_names = _container(kind, tmp_path)
    annotations, warnings = read_annotations_report(path)
    assert warnings == []
    assert [a.class_name for a in annotations] == class_names
    assert annotations[0].geometry.equals(shapely.box(0, 0, 10, 10))


def test_empty_collections_read_as_nothing(tmp_path: Path) -> None:
    assert read_annotations(_dump(tmp_path / "a.geojson", {"type": "FeatureCollection",
                                                           "features": []})) == []
    assert read_annotations(_dump(tmp_path / "b.geojson", [])) == []


def test_utf8_names_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "a.geojson"
    text = json.dumps(_feature(SQUARE, classification="Tumör", name="Kern ✓"), ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (a,) = read_annotations(path)
    assert (a.class_name, a.name) == ("Tumör", "Kern ✓")


# ---------------------------------------------------------------------------- class mapping


def test_class_mapping_from_default_workflow() -> None:
    mapping = ClassMapping.from_workflow(ScribblesConfig())
    assert mapping.label_of("Tumor") is Label.TUMOR
    assert mapping.label_of("Tumour") is Label.TUMOR
    assert mapping.label_of("Tumor: Positive") is Label.TUMOR
    assert mapping.label_of("Stroma") is Label.NON_TUMOR
    assert mapping.label_of("Immune cells: Negative") is Label.NON_TUMOR
    for name in ("Region*", "Region", "Ignore*", "Ignore", "Ignore*: Tumor"):
        assert mapping.label_of(name) is Label.IGNORE, name
    assert mapping.label_of(None) is Label.IGNORE
    assert mapping.label_of("Lymph node") is None
    assert mapping.label_of("tumor") is None  # case-sensitive, like QuPath
    assert mapping.label_of("Tumor (AI)") is None
    assert mapping.label_of("Positive: Tumor") is None  # only the first part is the base


def test_class_mapping_base_class_switch_and_exact_names_first() -> None:
    strict = ClassMapping(tumor=("Tumor",), non_tumor=("Stroma",), ignore=(),
                          match_base_class=False)
    assert strict.label_of("Tumor: Positive") is None
    assert strict.label_of("Region") is None
    mixed = ClassMapping(tumor=["Tumor"], non_tumor=["Tumor: Negative"], ignore=["Region*"])
    assert mixed.tumor == ("Tumor",)  # lists become tuples
    assert mixed.label_of("Tumor: Negative") is Label.NON_TUMOR
    assert mixed.label_of("Tumor: Positive") is Label.TUMOR


def test_class_mapping_rejects_a_class_under_two_labels() -> None:
    with pytest.raises(WsisegError, match="'Stroma'.*tumor and non_tumor"):
        ClassMapping(tumor=("Tumor", "Stroma"), non_tumor=("Stroma",), ignore=())
    with pytest.raises(WsisegError, match="'Region'"):
        ClassMapping(tumor=("Region",), non_tumor=(), ignore=("Region*",))


# ---------------------------------------------------------------------------- bad input


def _nan_square() -> str:
    return ('{"type":"Polygon","coordinates":[[[0,0],[NaN,0],[10,10],[0,0]]]}')


BAD_INPUTS: dict[str, tuple[bytes, str]] = {
    "malformed_json": (b'{"type": "FeatureCollection", "features": [', "not valid JSON"),
    "empty": (b"", "empty"),
    "whitespace": (b"  \n ", "empty"),
    "not_geojson_object": (b'{"slide": "a.svs", "tumor": true}', "not GeoJSON"),
    "not_geojson_array": (b"[1, 2, 3]", "not GeoJSON"),
    "not_geojson_scalar": (b'"hello"', "not GeoJSON"),
    "unknown_geometry": (json.dumps(_feature({"type": "Circle", "coordinates": [1, 2]})).encode(),
                         "unknown geometry type 'Circle'"),
    "only_null_geometry": (json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": None, "properties": {}}]}).encode(), "geometry null"),
    "nan": (_nan_square().encode(), "not finite"),
    "infinity": (_nan_square().replace("NaN", "-Infinity").encode(), "not finite"),
    "huge": (json.dumps({"type": "Point", "coordinates": [2e7, 5]}).encode(), "too large"),
    "plane": (json.dumps(_feature({**SQUARE, "plane": {"c": -1, "z": 3, "t": 0}})).encode(),
              "plane z=3"),
    "ragged": (json.dumps({"type": "LineString", "coordinates": [[0, 0], [1]]}).encode(),
               "malformed coordinates"),
    "strings": (json.dumps({"type": "LineString", "coordinates": [["0", "0"], ["1", "1"]]})
                .encode(), "malformed coordinates"),
    "flat_polygon": (json.dumps({"type": "Polygon", "coordinates": [0, 0, 1, 1]}).encode(),
                     "malformed coordinates"),
    "no_features_array": (b'{"type": "FeatureCollection"}', "features"),
    "not_utf8": (b'{"type": "Point", "coordinates": [1, 2], "x": "\xff\xfe"}', "UTF-8"),
    "corrupt_gzip": (b"\x1f\x8b\x08\x00garbage", "gzip"),
    "corrupt_zip": (b"PK\x03\x04garbage", "zip"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_one_line_error_naming_the_file(tmp_path: Path, case: str) -> None:
    content, what = BAD_INPUTS[case]
    path = tmp_path / f"{case}.geojson"
    path.write_bytes(content)
    with pytest.raises(WsisegError) as info:
        read_annotations(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert what in message
    assert "\n" not in message


def test_zip_without_geojson_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "no json here")
    with pytest.raises(WsisegError, match=r"a\.zip: zip archive holds no \.geojson"):
        read_annotations(path)
    with pytest.raises(WsisegError, match="missing.geojson: file not found"):
        read_annotations(tmp_path / "missing.geojson")


def test_null_geometry_among_good_features_is_skipped_and_counted(tmp_path: Path) -> None:
    null = {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation"}}
    path = _dump(tmp_path / "a.geojson", {"type": "FeatureCollection",
                                          "features": [null, TWO[0], null]})
    annotations, warnings = read_annotations_report(path)
    assert [a.class_name for a in annotations] == ["Tumor"]
    assert len(warnings) == 1
    assert warnings[0].startswith(str(path)) and "2 feature(s) with geometry null" in warnings[0]


def test_self_intersecting_polygon_is_repaired_with_a_warning(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    path = _dump(tmp_path / "a.geojson", _feature(bowtie, classification="Tumor"))
    annotations, warnings = read_annotations_report(path)
    (a,) = annotations
    assert a.geometry.is_valid
    assert a.geometry.geom_type == "MultiPolygon"
    assert a.geometry.area == pytest.approx(50.0)  # two triangles of 25 px²
    assert len(warnings) == 1
    assert "feature #1 (Tumor)" in warnings[0] and "repaired" in warnings[0]


def test_empty_and_zero_size_geometries_are_skipped(tmp_path: Path) -> None:
    empty_roi = {"type": "Polygon", "coordinates": [[[0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]]}
    features = [
        _feature(empty_roi),                                              # QuPath's empty ROI
        _feature({"type": "Polygon", "coordinates": []}),
        _feature({"type": "LineString", "coordinates": [[3, 3]]}),
        _feature({"type": "LineString", "coordinates": [[3, 3], [3, 3]]}),
        _feature({"type": "MultiPoint", "coordinates": []}),
        _feature({"type": "Point", "coordinates": [4, 4]}, classification="Tumor"),
    ]
    path = _dump(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": features})
    annotations, warnings = read_annotations_report(path)
    assert [a.geometry.geom_type for a in annotations] == ["Point"]
    assert len(warnings) == 1 and "5 empty or zero-size" in warnings[0]


def test_unclosed_ring_third_coordinate_and_plane_zero_are_accepted(tmp_path: Path) -> None:
    open_ring = {"type": "Polygon", "coordinates": [[[0, 0, 1], [10, 0, 1], [10, 10, 1]]],
                 "plane": {"c": -1, "z": 0, "t": 0}, "isEllipse": True}
    (a,) = read_annotations(_dump(tmp_path / "a.geojson", open_ring))
    assert a.geometry.area == pytest.approx(50.0)
    assert not a.geometry.has_z  # a 3rd value is tolerated and dropped, as QuPath does


def test_geometry_collection_keeps_the_polygons(tmp_path: Path) -> None:
    collection = {"type": "GeometryCollection", "geometries": [
        SQUARE, {"type": "LineString", "coordinates": [[0, 0], [50, 50]]}]}
    annotations, warnings = read_annotations_report(_dump(tmp_path / "a.geojson", collection))
    assert [a.geometry.geom_type for a in annotations] == ["Polygon"]
    assert "GeometryCollection" in warnings[0]


def test_non_numeric_measurements(tmp_path: Path) -> None:
    props = {"measurements": {"a": 1, "b": "NaN", "c": "Infinity", "d": "high", "e": None}}
    annotations, warnings = read_annotations_report(
        _dump(tmp_path / "a.geojson", _feature(SQUARE, **props)))
    m = annotations[0].measurements
    assert m["a"] == 1.0 and math.isnan(m["b"]) and m["c"] == math.inf
    assert set(m) == {"a", "b", "c"}
    assert "non-numeric measurement(s) dropped: d" in warnings[0]


# ---------------------------------------------------------------------------- writing


def _annotations_with_holes() -> list[Annotation]:
    shell = shapely.Polygon(
        [(1200, 800), (1800, 820.25), (1850.5, 1400), (1150, 1350.75)],
        holes=[[(1400, 1000), (1500, 1000), (1500, 1100.5), (1400, 1100.5)],
               [(1300, 1200), (1350, 1200), (1350, 1250), (1300, 1250)]],
    )
    multi = shapely.MultiPolygon([
        shapely.box(3000, 3000, 3400, 3300),
        shapely.Polygon([(3600.5, 3100.25), (3900, 3100.25), (3900, 3500)]),
    ])
    return [
        Annotation(shell, "Tumor (AI)", name="tumor_0001", locked=True,
                   measurements={"tumor_probability": 0.93, "area_px": 48210},
                   metadata={"source": WSISEG_SOURCE, "model": "v1.2"},
                   id="f910f435-df7f-44ae-b7c0-832dd100a611", color=(10, 20, 30)),
        Annotation(multi, "Tumor (AI)", name="tumor_0002", locked=True,
                   metadata={"source": WSISEG_SOURCE}),
        Annotation(shapely.box(0, 0, 5, 5), "Tumor", color=(1, 2, 3)),  # built-in colour wins
        Annotation(shapely.box(10, 10, 20, 20), "Tumor: Positive", color=(4, 5, 6)),
        Annotation(shapely.box(30, 30, 40, 40), None),
    ]


def test_write_validate_read_round_trip(tmp_path: Path) -> None:
    originals = _annotations_with_holes()
    path = tmp_path / "slide.geojson"
    assert write_annotations(path, originals) == len(originals)
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert validate_feature_collection(obj, bounds=(5000, 5000)) == []
    features = obj["features"]
    assert [f["geometry"]["type"] for f in features] == ["Polygon", "MultiPolygon"] + \
        ["Polygon"] * 3
    props = [f["properties"] for f in features]
    assert all(p["objectType"] == "annotation" for p in props)
    assert props[0]["classification"] == {"name": "Tumor (AI)", "color": [10, 20, 30]}
    assert props[1]["classification"] == {"name": "Tumor (AI)", "color": [255, 0, 255]}
    assert props[2]["classification"]["color"] == list(QUPATH_CLASS_COLORS["Tumor"])
    assert props[3]["classification"] == {"names": ["Tumor", "Positive"], "color": [4, 5, 6]}
    assert "classification" not in props[4]
    assert [p.get("isLocked") for p in props] == [True, True, None, None, None]
    assert features[0]["id"] == "f910f435-df7f-44ae-b7c0-832dd100a611"
    assert len({f["id"] for f in features}) == len(features)

    back = read_annotations(path)
    assert len(back) == len(originals)
    for original, read in zip(originals, back, strict=True):
        n_vertices = len(shapely.get_coordinates(original.geometry))
        assert abs(read.geometry.area - original.geometry.area) <= 0.01 * n_vertices
        assert read.geometry.symmetric_difference(original.geometry).area <= 0.01 * n_vertices
        assert read.class_name == original.class_name
        assert read.locked == original.locked
        assert read.name == original.name
        assert dict(read.measurements) == pytest.approx(dict(original.measurements))
        assert dict(read.metadata) == dict(original.metadata)
    assert len(back[0].geometry.interiors) == 2
    assert len(back[1].geometry.geoms) == 2
    assert back[0].color == (10, 20, 30) and back[1].color == (255, 0, 255)
    assert back[2].color == (200, 0, 0)
    assert back[0].id == originals[0].id
    assert [is_wsiseg_feature(a) for a in back] == [True, True, False, False, False]


def test_written_coordinates_are_snapped_valid_and_compact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    circle = shapely.Point(5000.123456, 4000.987654).buffer(333.3333, quad_segs=64)
    noise = rng.normal(0, 1e-3, (257, 2))
    jitter = shapely.Polygon(shapely.get_coordinates(circle.exterior) + noise)
    bowtie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    sliver = shapely.Polygon([(0, 0), (1, 0.001), (2, 0)])  # vanishes on the 0.01 grid
    line = shapely.LineString([(0, 0), (5, 5)])
    annotations = [Annotation(g, "Tumor (AI)") for g in (circle, jitter, bowtie, sliver, line)]
    path = tmp_path / "slide.geojson"
    assert write_annotations(path, annotations) == 3
    text = path.read_text(encoding="utf-8")
    obj = json.loads(text)
    assert validate_feature_collection(obj) == []
    for feature in obj["features"]:
        xy = np.asarray(shapely.get_coordinates(shapely.geometry.shape(feature["geometry"])))
        assert np.allclose(xy * 100, np.round(xy * 100), atol=1e-6)  # ≤ 2 decimals
    assert obj["features"][2]["geometry"]["type"] == "MultiPolygon"  # bowtie repaired
    for original, read in zip((circle, jitter), read_annotations(path)[:2], strict=True):
        # snapping moves each vertex by ≤ 0.005·√2 px: area changes by ≤ perimeter × 0.01 px
        assert abs(read.geometry.area - original.area) <= original.length * 0.01
    integral = shapely.box(100, 200, 300, 400)
    write_annotations(path, [Annotation(integral, None)])
    assert "100.0" not in path.read_text() and "[100,200]" in path.read_text()


def test_write_gzip_and_utf8(tmp_path: Path) -> None:
    path = tmp_path / "slide.geojson.gz"
    write_annotations(path, [Annotation(shapely.box(0, 0, 1, 1), "Tumör", name="Kern ✓")])
    raw = gzip.decompress(path.read_bytes())
    assert "Tumör".encode() in raw  # ensure_ascii=False, UTF-8
    (a,) = read_annotations(path)
    assert (a.class_name, a.name) == ("Tumör", "Kern ✓")
    again = tmp_path / "again.geojson.gz"
    write_annotations(again, read_annotations(path))
    assert again.read_bytes() == path.read_bytes()  # mtime 0, ids kept: reproducible


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_measurement_fails_and_leaves_the_file_untouched(
    tmp_path: Path, bad: float
) -> None:
    path = tmp_path / "slide.geojson"
    path.write_text("previous contents", encoding="utf-8")
    a = Annotation(shapely.box(0, 0, 1, 1), "Tumor", measurements={"p": bad})
    with pytest.raises(ValueError, match="measurement 'p' is not finite"):
        write_annotations(path, [a])
    assert path.read_text(encoding="utf-8") == "previous contents"
    assert sorted(os.listdir(tmp_path)) == ["slide.geojson"]


def _nan_polygon() -> shapely.Polygon:
    with np.errstate(invalid="ignore"):  # shapely warns while building it; that is the point
        return shapely.Polygon([(0, 0), (math.nan, 0), (1, 1)])


@pytest.mark.parametrize(
    ("annotation", "match"),
    [
        (Annotation(shapely.box(0, 0, 1, 1), "X", color=(0, 0, 256)), "0–255"),
        (Annotation(shapely.box(0, 0, 1, 1), "X", measurements={"p": "high"}), "not a number"),
        (Annotation(_nan_polygon(), "X"), "non-finite"),
        (Annotation(shapely.box(0, 0, 1, 1), " : "), "blank"),
    ],
)
def test_write_rejects_bad_values(tmp_path: Path, annotation: Annotation, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_annotations(tmp_path / "a.geojson", [annotation])
    assert not any(tmp_path.iterdir())


def test_write_rejects_duplicate_ids(tmp_path: Path) -> None:
    a = Annotation(shapely.box(0, 0, 1, 1), "X", id="same")
    with pytest.raises(ValueError, match="duplicate id"):
        write_annotations(tmp_path / "a.geojson", [a, a])


def test_write_is_atomic_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slide.geojson"
    path.write_text("previous contents", encoding="utf-8")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_annotations(path, [Annotation(shapely.box(0, 0, 1, 1), "Tumor")])
    assert path.read_text(encoding="utf-8") == "previous contents"
    assert sorted(os.listdir(tmp_path)) == ["slide.geojson"]


def test_write_replaces_and_keeps_permissions(tmp_path: Path) -> None:
    path = tmp_path / "slide.geojson"
    write_annotations(path, [Annotation(shapely.box(0, 0, 1, 1), "Tumor")])
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o664)
    assert write_annotations(path, []) == 0
    assert path.stat().st_mode & 0o777 == 0o664
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


# ---------------------------------------------------------------------------- validation


def _fc(*features: dict) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


@pytest.mark.parametrize(
    ("feature", "problem"),
    [
        (_feature(SQUARE, classification={"name": "Tumor"}), "no valid 'color'"),
        (_feature(SQUARE, classification={"name": "Tumor", "color": "#ff0000"}), "'color'"),
        (_feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10]]]}),
         "ring 0 is not closed"),
        (_feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 0]]]}),
         "ring 0 has 3 position(s)"),
        (_feature({"type": "MultiPolygon", "coordinates": [[[[0, 0], [10, 0], [0, 0]]]]}),
         "ring 0.0 has 3"),
        (_feature({"type": "Polygon",
                   "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}),
         "invalid Polygon: Self-intersection"),
        (_feature({"type": "Polygon", "coordinates": [[[0, 0], [math.nan, 0], [1, 1], [0, 0]]]}),
         "not finite"),
        ({"type": "Feature", "geometry": None, "properties": {}}, "geometry is null"),
        (_feature({"type": "GeometryCollection", "geometries": [SQUARE]}), "GeometryCollection"),
        (_feature(SQUARE, measurements={"p": "NaN"}), "measurement 'p'"),
        (_feature(SQUARE, measurements={"p": math.inf}), "measurement 'p'"),
        (_feature(SQUARE, color="#ff0000"), "color '#ff0000'"),
        (_feature(SQUARE, isLocked="yes"), "isLocked"),
        (_feature({"type": "LineString", "coordinates": [[0, 0]]}), "needs ≥ 2"),
        (_feature({"type": "Polygon", "coordinates": [[[0, 0], [1], [0, 0]]]}), "malformed"),
        (_feature({"type": "Polygon", "coordinates": []}), "Polygon without rings"),
        (_feature({"type": "MultiPolygon", "coordinates": [
            [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]],
            [[[5, 5], [15, 5], [15, 15], [5, 15], [5, 5]]]]}), "invalid MultiPolygon"),
    ],
)
def test_validate_finds_what_qupath_rejects(feature: dict, problem: str) -> None:
    problems = validate_feature_collection(_fc(_feature(SQUARE, classification="Tumor"), feature))
    assert len(problems) >= 1
    assert all(p.startswith("feature #2: ") for p in problems)
    assert any(problem in p for p in problems), problems


def test_validate_bounds_ids_and_top_level() -> None:
    inside = _feature(SQUARE)
    assert validate_feature_collection(_fc(inside), bounds=(10, 10)) == []
    (problem,) = validate_feature_collection(_fc(inside), bounds=(9, 100))
    assert "leave the image [0, 9] × [0, 100]" in problem
    twice = {**inside, "id": "a"}
    assert validate_feature_collection(_fc(twice, twice)) == ["feature #2: duplicate id 'a'"]
    assert validate_feature_collection([inside]) == ["top level is not a FeatureCollection"]
    assert validate_feature_collection({"type": "FeatureCollection"}) != []


def test_geometry_text_is_geos_geojson_with_integers_written_bare() -> None:
    # coordinates on the 0.01 grid, of every magnitude a slide has, and negative ones
    rng = np.random.default_rng(3)
    k = rng.integers(-10**9, 10**9, size=(4000, 2)).astype(np.float64)
    k[::3] = np.rint(k[::3] / 100) * 100  # integers, as pixel-edge contours mostly are
    xy = np.floor(k + 0.5) / 100
    shell = [(-2e7, -2e7), (2e7, -2e7), (2e7, 2e7), (-2e7, 2e7)]
    hole = [(1, 1), (2.5, 1), (2.5, 2.25), (1, 2.25)]
    shapes = [shapely.Polygon(shell, [hole]), shapely.Polygon(hole),
              shapely.MultiPolygon([shapely.Polygon(shell, [hole]),
                                    shapely.Polygon([(3e7, 0), (3e7 + 0.07, 0), (3e7, 0.01)])])]
    shapes.append(shapely.Polygon(np.r_[[[-3e7, -3e7]], xy, [[3e7, 3e7]]]))  # text only
    for shape in shapes:
        reference = shapely.to_geojson(shape).replace(".0,", ",").replace(".0]", "]")
        assert geometry_text(shape) == reference
        assert json.loads(geometry_text(shape))["type"] == shape.geom_type
    # GEOS's GeoJSON writer keeps the sign of zero ("-0.0"); the text writes 0
    assert geometry_text(shapely.Polygon([(-0.0, 0), (1, 0), (1, 1)])) == (
        '{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,0]]]}')


def test_grid_snap_by_rounding_equals_set_precision_and_repairs_what_it_breaks():
    import re

    import shapely.affinity

    from conftest import QUPATH_FIXTURES

    def written(g):
        # what the writer wrote before its fast paths: GEOS's snap, canonical order, and the
        # ".0" of integers dropped by a regular expression
        text = shapely.to_geojson(shapely.orient_polygons(shapely.normalize(
            shapely.set_precision(g, PRECISION_PX))))
        return re.sub(r"(\d)\.0(?=[,\]])", r"\1", text)

    shapes = []
    for path in sorted((QUPATH_FIXTURES / "written-0.6").glob("*.geojson")):
        data = json.loads(path.read_text())
        features = data.get("features", []) if isinstance(data, dict) else data
        for feature in features if isinstance(features, list) else []:
            geometry = feature.get("geometry") if isinstance(feature, dict) else None
            if isinstance(geometry, dict) and geometry.get("type") in ("Polygon", "MultiPolygon"):
                shapes.append(shapely.from_geojson(json.dumps(geometry)))
    shapes.append(shapely.Polygon([(0, 0), (7, 0), (7, 5), (3, 5), (3, 2), (0, 2)]))
    shapes.append(shapely.Polygon([(-10, 0), (10.5, 0), (10, -20), (-10, -20)]))
    assert len(shapes) >= 5
    for shape in shapes:
        for scale in (1.0, 4.008, 2 / 3):  # level-0 frames of real slides are not integral
            g = shapely.make_valid(shapely.affinity.scale(shape, scale, scale, origin=(0, 0)))
            if g.geom_type in ("Polygon", "MultiPolygon"):
                assert geometry_json(g, "x") == written(g)
    # A hole 0.004 px inside the shell: rounding alone would make the rings touch along an edge.
    thin = shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)],
                           [[(0.004, 1), (5, 1), (5, 5), (0.004, 5)]])
    text = geometry_json(thin, "x")
    assert shapely.from_geojson(text).is_valid and PRECISION_PX == 0.01
    assert text == written(thin)
    # An invalid input (a bow tie) is repaired before the snap, as before.
    bow_tie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    repaired = shapely.from_geojson(geometry_json(bow_tie, "x"))
    assert repaired.is_valid and repaired.area == 50
