"""The pathologist's edits of our AI contours, as QuPath exports them back (issue 15).

An untouched round exported back — coordinates at 2 decimals, ring start rotated, orientation
reversed, ids replaced — is no edit; a brush edit of one working pixel is, with the area
QuPath reports; a deleted contour is non-tumor when the export holds the round's others.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage

from wsiseg.edits import TOLERANCE_WORKING_PX, Contours, ai_contour_changes
from wsiseg.qupath import Annotation
from wsiseg.refine import load_scribbles, rasterize_new, read_window, refine_round
from wsiseg.session import ai_contours_line
from wsiseg.slide.frame import Frame

from conftest import CMU_SVS, QUPATH_FIXTURES, real
from storekit import blobs, feature, run_store, write_export

SLIDE_ID = "cmu"
WRITTEN = QUPATH_FIXTURES / "written-0.6"


@pytest.fixture()
def cmu_run(tmp_path, small_workflow):
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    return store, out


def scribble_refiner(store, windows, window_px):
    """A fast stand-in for RefineNet: GuideNet's map with the scribbles (grown 6 px) obeyed."""
    out = []
    for origin in windows:
        prob = read_window(store["guide"], origin, window_px).astype(np.float32) / 255.0
        scrib = read_window(store["scribbles"], origin, window_px)
        prob[ndimage.binary_dilation(scrib > 0, iterations=6)] = 1.0
        prob[ndimage.binary_dilation(scrib < 0, iterations=6)] = 0.0
        out.append(prob)
    return out


# -- what QuPath does to our contours on the way back -------------------------------------------
def _ring(coords: list, rotate: bool, reverse: bool) -> list:
    ring = [[round(x, 2), round(y, 2)] for x, y in coords[:-1]]  # QuPath: ≤ 2 decimals
    if rotate:
        k = len(ring) // 3
        ring = ring[k:] + ring[:k]
    if reverse:
        ring = ring[::-1]
    return [*ring, ring[0]]


def back_from_qupath(features: list[dict], *, rotate=True, reverse=True, new_ids=True) -> list:
    """Features as QuPath exports them after import: rounded, rotated, reversed, new ids."""
    out = []
    for f in features:
        f = json.loads(json.dumps(f))
        g = f["geometry"]
        polys = [g["coordinates"]] if g["type"] == "Polygon" else g["coordinates"]
        polys = [[_ring(r, rotate, reverse) for r in rings] for rings in polys]
        g["coordinates"] = polys[0] if g["type"] == "Polygon" else polys
        if new_ids:
            f["id"] = str(uuid.uuid4())  # "Update IDs? Yes"
        out.append(f)
    return out


def round_features(out: Path, round_k: int) -> list[dict]:
    return json.loads((out / f"{SLIDE_ID}.r{round_k}.geojson").read_text())["features"]


def scribble_pixels(store, path: Path) -> int:
    """Scribble pixels the export would add (0 when it says nothing new)."""
    scribbles = load_scribbles(path, store)
    return sum(int((merged != before).sum())
               for _, before, merged in rasterize_new(store, scribbles, path))


def tissue_box(store, k: int, half: float) -> shapely.Polygon:
    tissue = store.tissue_mask
    rr, cc = np.nonzero(ndimage.binary_erosion(tissue, iterations=3))
    i = (len(rr) * (k + 1)) // 5
    rows, cols = store.frame.working_shape
    x, y = (cc[i] + 0.5) * cols / tissue.shape[1], (rr[i] + 0.5) * rows / tissue.shape[0]
    return shapely.box(x - half, y - half, x + half, y + half)


def to_qupath(store, geom):
    return store.frame.transform_geometry(geom, "working", "qupath")


def written_brush_stroke() -> shapely.Polygon:
    """The brush-stroke area QuPath 0.6 itself wrote (scribbles-fc.geojson, first feature)."""
    data = json.loads(real(WRITTEN / "scribbles-fc.geojson").read_text())
    return shapely.geometry.shape(data["features"][0]["geometry"])


# -- 1. untouched contours are no edit ---------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    [dict(rotate=False, reverse=False, new_ids=False), dict(rotate=True, reverse=False,
     new_ids=False), dict(rotate=False, reverse=True, new_ids=False),
     dict(rotate=True, reverse=True, new_ids=False), dict(rotate=True, reverse=True,
     new_ids=True)],
    ids=["rounded", "rotated", "reversed", "all", "all+new-ids"],
)
def test_round_zero_exported_back_untouched_is_no_edit(cmu_run, tmp_path, how):
    store, out = cmu_run
    assert (store.path / "rounds" / "r0.index.npz").exists()  # compared with the unsnapped copy
    features = round_features(out, 0)
    assert len(features) == 6
    export = write_export(tmp_path / "back.geojson", back_from_qupath(features, **how))
    scribbles = load_scribbles(export, store)
    assert scribbles.edits == []
    assert scribbles.counts["edited_ai"] == 0 and scribbles.counts["deleted_ai"] == 0
    assert scribbles.counts["ai_matched_by_overlap"] == (6 if how["new_ids"] else 0)
    assert scribble_pixels(store, export) == 0


def _edited(original: shapely.Geometry, brush: shapely.Geometry) -> shapely.Geometry:
    return shapely.union(original, brush)  # QuPath's brush adds its stroke to the ROI


def _brush_across_boundary(original_wk: shapely.Geometry, width_px: float) -> shapely.Polygon:
    """A straight brush stroke ``width_px`` working px wide, down across the top of
    ``original`` (working px), from 8 px above it to 5 px inside."""
    x0, y0, x1, y1 = original_wk.bounds
    x = (x0 + x1) / 2
    hits = shapely.get_parts(original_wk.boundary.intersection(
        shapely.LineString([(x, y0 - 1), (x, y1 + 1)])))
    top = min(hits, key=lambda p: p.y)
    return shapely.LineString([(x, top.y - 8), (x, top.y + 5)]).buffer(width_px / 2,
                                                                       cap_style="flat")


def inner_contour(store, features: list[dict]) -> int:
    """The index of a feature whose top lies well inside the slide."""
    for k, f in enumerate(features):
        g = store.frame.transform_geometry(shapely.geometry.shape(f["geometry"]), "qupath",
                                           "working")
        if g.bounds[1] > 20 and g.area > 200:
            return k
    raise AssertionError("no contour away from the slide's top edge")


@pytest.mark.parametrize("width_px", [1.0, 2.5])
def test_a_brush_edit_of_one_working_pixel_counts_with_its_area(cmu_run, tmp_path, width_px):
    store, out = cmu_run
    features = round_features(out, 0)
    f = features[inner_contour(store, features)]
    original_q = shapely.geometry.shape(f["geometry"])
    original = store.frame.transform_geometry(original_q, "qupath", "working")
    brush = _brush_across_boundary(original, width_px)
    edited_q = _edited(original_q, to_qupath(store, brush))
    f["geometry"] = json.loads(shapely.to_geojson(shapely.set_precision(edited_q, 0.01)))
    export = write_export(tmp_path / "e.geojson", back_from_qupath(features, new_ids=True))
    scribbles = load_scribbles(export, store)
    assert scribbles.counts["edited_ai"] == 1
    # The area QuPath reports grew by what we count as tumor (level-0 px² → working px²).
    qupath_grew = (edited_q.area - original_q.area) / store.frame.scale**2
    tumor = sum(g.area for g, label in scribbles.edits if label == 1)
    assert tumor == pytest.approx(qupath_grew, rel=0.02)
    assert not [g for g, label in scribbles.edits if label == -1]
    assert scribble_pixels(store, export) > 0


def test_a_difference_thinner_than_the_tolerance_is_rounding(cmu_run, tmp_path):
    store, out = cmu_run
    features = round_features(out, 0)
    k = inner_contour(store, features)
    original_q = shapely.geometry.shape(features[k]["geometry"])
    original = store.frame.transform_geometry(original_q, "qupath", "working")
    brush = _brush_across_boundary(original, TOLERANCE_WORKING_PX / 3)
    edited_q = _edited(original_q, to_qupath(store, brush))
    features[k]["geometry"] = json.loads(shapely.to_geojson(edited_q))
    export = write_export(tmp_path / "thin.geojson", back_from_qupath(features))
    assert load_scribbles(export, store).edits == []


def test_qupaths_own_brush_stroke_on_an_ai_contour(cmu_run, tmp_path):
    """QuPath 0.6's brush-stroke geometry, moved onto a contour's top edge, grows it."""
    store, out = cmu_run
    features = round_features(out, 0)
    k = inner_contour(store, features)
    original_q = shapely.geometry.shape(features[k]["geometry"])
    stroke = written_brush_stroke()
    x0, y0, x1, y1 = original_q.bounds
    sx0, sy0, sx1, sy1 = stroke.bounds
    scale = 0.25 * (x1 - x0) / (sx1 - sx0)
    stroke = shapely.affinity.scale(stroke, scale, scale, origin=(sx0, sy0))
    top = min(shapely.get_parts(original_q.boundary.intersection(
        shapely.LineString([((x0 + x1) / 2, y0 - 1), ((x0 + x1) / 2, y1 + 1)]))),
        key=lambda p: p.y)
    sx0, sy0, sx1, sy1 = stroke.bounds
    stroke = shapely.affinity.translate(stroke, top.x - (sx0 + sx1) / 2, top.y - (sy0 + sy1) / 2)
    edited_q = _edited(original_q, stroke)
    features[k]["geometry"] = json.loads(shapely.to_geojson(shapely.set_precision(edited_q, .01)))
    export = write_export(tmp_path / "b.geojson", back_from_qupath(features, new_ids=False))
    scribbles = load_scribbles(export, store)
    assert scribbles.counts["edited_ai"] == 1
    tumor = sum(g.area for g, label in scribbles.edits if label == 1)
    assert tumor == pytest.approx((edited_q.area - original_q.area) / store.frame.scale**2,
                                  rel=0.02)


# -- 2. ids replaced, after rounds -------------------------------------------------------------
def test_every_round_exported_back_untouched_after_two_refines_adds_nothing(cmu_run, tmp_path):
    store, out = cmu_run
    for k, label in ((0, "Tumor"), (3, "Stroma")):
        box = tissue_box(store, k, 8)
        export = write_export(tmp_path / f"s{k}.geojson", [feature(to_qupath(store, box), label)])
        assert refine_round(store, export, out, SLIDE_ID, scribble_refiner, "fake").new_pixels
    assert store.attrs["rounds"][-1]["round"] == 2
    assert round_features(out, 2) != round_features(out, 0)
    before = np.asarray(store["scribbles"][...]).copy()
    for round_k in (0, 1, 2):
        for new_ids in (False, True):
            back = back_from_qupath(round_features(out, round_k), new_ids=new_ids)
            export = write_export(tmp_path / f"r{round_k}-{new_ids}.geojson", back)
            scribbles = load_scribbles(export, store)
            assert scribbles.edits == [], (round_k, new_ids)
            assert scribble_pixels(store, export) == 0
    back = back_from_qupath(round_features(out, 2), new_ids=True)
    result = refine_round(store, write_export(tmp_path / "r2.geojson", back), out, SLIDE_ID,
                          scribble_refiner, "fake")
    assert result.new_pixels == 0 and result.round == 2
    assert result.matched_by_overlap == len(back) and result.edited_ai == 0
    np.testing.assert_array_equal(np.asarray(store["scribbles"][...]), before)
    # One real edit after the ids were replaced is counted and refined.
    f = back[0]
    grown = shapely.geometry.shape(f["geometry"]).buffer(4 * store.frame.scale)
    f["geometry"] = json.loads(shapely.to_geojson(shapely.set_precision(grown, 0.01)))
    result = refine_round(store, write_export(tmp_path / "edit.geojson", back), out, SLIDE_ID,
                          scribble_refiner, "fake")
    assert result.round == 3 and result.new_pixels > 0
    assert result.edited_ai == 1 and result.matched_by_overlap == len(back)
    assert ai_contours_line(result) == (f"AI contours: 1 edited, {len(back)} matched by overlap "
                                        "(QuPath replaced their ids)")
    assert store.attrs["rounds"][-1]["scribbles"]["ai_matched_by_overlap"] == len(back)


# -- 5. deletions ------------------------------------------------------------------------------
def test_a_deleted_contour_becomes_non_tumor(cmu_run, tmp_path):
    store, out = cmu_run
    features = round_features(out, 0)
    gone = store.frame.transform_geometry(shapely.geometry.shape(features[2]["geometry"]),
                                          "qupath", "working")
    kept = back_from_qupath(features[:2] + features[3:], new_ids=False)
    export = write_export(tmp_path / "d.geojson", kept)
    scribbles = load_scribbles(export, store)
    assert scribbles.counts["deleted_ai"] == 1 and scribbles.counts["edited_ai"] == 0
    assert [label for _, label in scribbles.edits] == [-1]
    # (the file's vertices are rounded to QuPath's 0.01 level-0 px grid, the index's are not)
    assert scribbles.edits[0][0].area == pytest.approx(gone.area, rel=1e-5)
    # the same contour deleted, the ids replaced
    again = back_from_qupath(features[:2] + features[3:], new_ids=True)
    same = load_scribbles(write_export(tmp_path / "d2.geojson", again), store)
    assert same.counts["deleted_ai"] == 1 and same.counts["ai_matched_by_overlap"] == 5
    before = np.asarray(store["scribbles"][...]).copy()
    result = refine_round(store, export, out, SLIDE_ID, scribble_refiner, "fake")
    assert result.deleted_ai == 1 and result.new_pixels > 0
    assert "1 contour deleted (their area is non-tumor)" in ai_contours_line(result)
    assert store.attrs["rounds"][-1]["scribbles"]["deleted_ai"] == 1
    added = np.asarray(store["scribbles"][...]) != before
    assert (np.asarray(store["scribbles"][...])[added] == -1).all()
    rr, cc = np.nonzero(added)
    assert shapely.contains_xy(gone.buffer(0.01), cc + 0.5, rr + 0.5).all()
    assert len(rr) == pytest.approx(gone.area, rel=0.05)  # the whole contour, no more


def test_an_export_holding_none_of_the_contours_deletes_nothing(cmu_run, tmp_path):
    store, out = cmu_run
    box = tissue_box(store, 1, 6)
    export = write_export(tmp_path / "s.geojson", [feature(to_qupath(store, box), "Tumor")])
    scribbles = load_scribbles(export, store)
    assert scribbles.counts["deleted_ai"] == 0 and scribbles.edits == []


def test_an_image_still_showing_an_earlier_round_deletes_nothing(cmu_run, tmp_path):
    """Round 1 kept some of round 0's contours (same ids) and traced new ones: an export
    of round 0's contours holds the kept ones, but never saw the new ones."""
    store, out = cmu_run
    box = tissue_box(store, 0, 10)
    export = write_export(tmp_path / "s.geojson", [feature(to_qupath(store, box), "Tumor")])
    refine_round(store, export, out, SLIDE_ID, scribble_refiner, "fake")
    r0, r1 = round_features(out, 0), round_features(out, 1)
    assert {f["id"] for f in r0} & {f["id"] for f in r1}, "the test needs kept contours"
    assert {f["id"] for f in r1} - {f["id"] for f in r0}, "the test needs new contours"
    for new_ids in (False, True):
        back = write_export(tmp_path / f"old-{new_ids}.geojson",
                            back_from_qupath(r0, new_ids=new_ids))
        scribbles = load_scribbles(back, store)
        assert scribbles.counts["deleted_ai"] == 0 and scribbles.edits == []



def test_contours_without_metadata_are_known_by_their_class(cmu_run, tmp_path):
    """QuPath 0.4 drops annotations' metadata: our class name still tells our contours."""
    store, out = cmu_run
    features = back_from_qupath(round_features(out, 0))
    for f in features:
        del f["properties"]["metadata"]
        assert f["properties"]["classification"]["name"] == "Tumor (AI)"
    scribbles = load_scribbles(write_export(tmp_path / "q04.geojson", features), store)
    assert scribbles.edits == [] and scribbles.unknown_classes == []
    assert scribbles.counts["ai_matched_by_overlap"] == len(features)


# -- the comparison on its own (no store) -------------------------------------------------------
def _contours(*geoms, prefix="r0") -> Contours:
    return Contours([f"{prefix}-{k}" for k in range(len(geoms))],
                    np.asarray(geoms, dtype=object))


def test_a_contour_split_in_two_is_no_non_tumor():
    frame = Frame((1000, 1000), 2.0, 2.0)  # one working px per level-0 px
    square, other = shapely.box(100, 100, 140, 140), shapely.box(300, 300, 340, 340)
    latest = _contours(square, other)
    left = Annotation(shapely.box(100, 100, 120, 140), "Tumor (AI)", id="r0-0")
    right = Annotation(shapely.box(120, 100, 140, 140), "Tumor (AI)", id="new")
    kept = Annotation(other, "Tumor (AI)", id="r0-1")
    changes = ai_contour_changes([left, right, kept], frame, latest)
    assert changes.edits == [] and changes.deleted == 0
    assert changes.matched_by_overlap == 1  # the right half: IoU 0.5


def test_an_edited_stale_copy_is_compared_with_its_own_round():
    frame = Frame((1000, 1000), 2.0, 2.0)
    r0 = _contours(shapely.box(100, 100, 140, 140), prefix="r0")
    r1 = _contours(shapely.box(100, 100, 150, 140), prefix="r1")  # grown by the refine
    stale = Annotation(shapely.box(100, 100, 140, 145), "Tumor (AI)", id="r0-0")
    changes = ai_contour_changes([stale], frame, r1, earlier=lambda: [r0])
    assert [(round(g.area), label) for g, label in changes.edits] == [(200, 1)]
    assert changes.deleted == 0  # r1's contour is missing, but the image shows round 0
