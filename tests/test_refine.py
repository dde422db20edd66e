from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from wsiseg.errors import WsisegError
from wsiseg.qupath import read_annotations
from wsiseg.refine import affected_windows, randomwalk_refiner, refine_round
from wsiseg.rounds import undo
from wsiseg.store import StoreError, StoreLock

from conftest import CMU_SVS, QUPATH_FIXTURES, real
from qupath_rules import validate_feature_collection
from storekit import (
    assert_unchanged,
    blobs,
    feature,
    run_store,
    store_snapshot,
    write_export,
)

SLIDE_ID = "cmu"


@pytest.fixture()
def cmu_run(tmp_path, small_workflow):
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    return store, out


def tissue_point(store, k: int = 0) -> tuple[float, float]:
    """A working-px (x, y) well inside tissue."""
    from scipy import ndimage

    tissue = store.tissue_mask
    inner = ndimage.binary_erosion(tissue, iterations=3)
    rr, cc = np.nonzero(inner)
    i = (len(rr) * (k + 1)) // 5
    rows, cols = store.frame.working_shape
    return (cc[i] + 0.5) * cols / tissue.shape[1], (rr[i] + 0.5) * rows / tissue.shape[0]


def to_qupath(store, geom):
    return store.frame.transform_geometry(geom, "working", "qupath")


def qupath_like_export(store, out, path):
    """Brush polygon with a hole, a polyline, points, an edited AI contour, and noise."""
    x0, y0 = tissue_point(store, 0)
    x1, y1 = tissue_point(store, 2)
    x2, y2 = tissue_point(store, 3)
    brush = shapely.Polygon(
        shapely.box(x0 - 12, y0 - 12, x0 + 12, y0 + 12).exterior.coords,
        [shapely.box(x0 - 3, y0 - 3, x0 + 3, y0 + 3).exterior.coords],
    )
    line = shapely.LineString([(x1 - 20, y1), (x1, y1 + 5), (x1 + 20, y1 - 5)])
    points = shapely.MultiPoint([(x2, y2), (x2 + 6, y2 + 6)])
    # export_scribbles.groovy exports every annotation, our contours included
    ai, *other_ai = json.loads((out / f"{SLIDE_ID}.geojson").read_text())["features"]
    edited = shapely.geometry.shape(ai["geometry"]).buffer(40)  # pathologist grew it
    ai["geometry"] = json.loads(shapely.to_geojson(shapely.set_precision(edited, 0.01)))
    features = [*other_ai,
        feature(to_qupath(store, brush), "Tumor"),
        feature(to_qupath(store, line), "Stroma"),
        feature(to_qupath(store, points), "Tumor"),
        ai,
        feature(to_qupath(store, shapely.box(x0, y0, x0 + 5, y0 + 5)), None),  # unclassified
        feature(to_qupath(store, shapely.box(x1, y1, x1 + 5, y1 + 5)), "Region*"),
        feature(to_qupath(store, shapely.box(x1, y1, x1 + 5, y1 + 5)), "Tumor",
                objectType="detection"),
    ]
    return write_export(path, features)


def window_mask(shape, windows, window_px):
    mask = np.zeros(shape, dtype=bool)
    for r, c in windows:
        mask[r : r + window_px, c : c + window_px] = True
    return mask


def test_round_trip_changes_only_the_scribbled_windows_and_undo_restores(cmu_run, tmp_path):
    store, out = cmu_run
    before = store_snapshot(store, out)
    export = qupath_like_export(store, out, tmp_path / "scribbles.geojson")
    refiner = randomwalk_refiner(130.0, 0.4)
    result = refine_round(store, export, out, SLIDE_ID, refiner, "randomwalk")
    assert result.round == 1 and result.new_pixels > 0 and result.windows
    wf = store.workflow
    inside = window_mask(store.frame.working_shape, result.windows, wf.refinenet.window_px)
    refined = np.asarray(store["refined"][...])
    changed = refined != before["refined"]
    assert changed.any()
    assert not (changed & ~inside).any(), "pixels outside the affected windows changed"
    np.testing.assert_array_equal(np.asarray(store["guide"][...]), before["guide"])
    scribbles = np.asarray(store["scribbles"][...])
    assert (scribbles > 0).any() and (scribbles < 0).any()  # tumor brush + stroma line
    history = store.attrs["rounds"]
    counts = history[-1]["scribbles"]
    assert counts == {"tumor": 2, "non_tumor": 1, "ignored": 2, "edited_ai": 1,
                      "ai_matched_by_overlap": 0, "deleted_ai": 0}
    # Every file validates by QuPath's rules and lies inside the slide.
    w, h = store.frame.level0_size
    for name in (f"{SLIDE_ID}.geojson", f"{SLIDE_ID}.r0.geojson", f"{SLIDE_ID}.r1.geojson"):
        data = json.loads((out / name).read_text())
        assert validate_feature_collection(data, bounds=(w, h)) == []
    latest = (out / f"{SLIDE_ID}.geojson").read_bytes()
    assert latest == (out / f"{SLIDE_ID}.r1.geojson").read_bytes()
    # Undo: round 0 again, byte for byte.
    assert undo(store, out, SLIDE_ID) == 0
    assert_unchanged(store, out, before)
    assert len(list(out.glob(f"{SLIDE_ID}.r1.undone-*.geojson"))) == 1


def test_same_export_twice_adds_nothing(cmu_run, tmp_path):
    store, out = cmu_run
    export = qupath_like_export(store, out, tmp_path / "s.geojson")
    refiner = randomwalk_refiner(130.0, 0.4)
    first = refine_round(store, export, out, SLIDE_ID, refiner, "randomwalk")
    snap = store_snapshot(store, out)
    again = refine_round(store, export, out, SLIDE_ID, refiner, "randomwalk")
    assert first.new_pixels > 0 and again.new_pixels == 0 and again.round == first.round
    assert_unchanged(store, out, snap)


def test_a_new_export_adds_only_what_is_new(cmu_run, tmp_path):
    store, out = cmu_run
    refiner = randomwalk_refiner(130.0, 0.4)
    x, y = tissue_point(store, 1)
    a = feature(to_qupath(store, shapely.box(x - 8, y - 8, x + 8, y + 8)), "Tumor")
    refine_round(store, write_export(tmp_path / "a.geojson", [a]), out, SLIDE_ID, refiner, "rw")
    n_after_a = int((np.asarray(store["scribbles"][...]) != 0).sum())
    x2, y2 = tissue_point(store, 3)
    b = feature(to_qupath(store, shapely.box(x2 - 4, y2 - 4, x2 + 4, y2 + 4)), "Stroma")
    second = refine_round(store, write_export(tmp_path / "b.geojson", [a, b]), out, SLIDE_ID,
                          refiner, "rw")
    assert second.round == 2
    assert second.new_pixels == int((np.asarray(store["scribbles"][...]) != 0).sum()) - n_after_a
    assert second.new_pixels == 64  # only the 8×8 stroma box is new


def test_affected_windows_cover_every_new_pixel_with_context():
    new = np.zeros((1000, 1500), dtype=bool)
    new[10, 10] = new[500, 700] = new[999, 1499] = True
    windows = affected_windows(new, (0, 0, 1000, 1500), (1000, 1500), 384, 64)
    for r, c in zip(*np.nonzero(new), strict=True):
        holders = [(wr, wc) for wr, wc in windows if wr <= r < wr + 384 and wc <= c < wc + 384]
        assert holders
        # context on each side unless the slide border is closer
        wr, wc = holders[0]
        assert min(r - wr, wr + 384 - r) >= 64 or wr == 0 or wr + 384 == 1000
    assert len(windows) == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON|malformed|JSON"),
        ("", "empty"),
        ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}, '
         '"properties": {}}', "Circle|geometry type"),
        ('{"type": "Feature", "geometry": null, "properties": {}}', "geometry"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 5]}, '
         '"properties": {"classification": {"name": "Tumor", "color": [1, 2, 3]}}}',
         "finite|NaN"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1e12, 5]}, '
         '"properties": {"classification": {"name": "Tumor", "color": [1, 2, 3]}}}',
         "huge|large|range"),
    ],
)
def test_bad_scribble_files_change_nothing(cmu_run, tmp_path, content, message):
    store, out = cmu_run
    before = store_snapshot(store, out)
    bad = tmp_path / "bad.geojson"
    bad.write_text(content)
    with pytest.raises(WsisegError, match=message) as err:
        refine_round(store, bad, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    assert "bad.geojson" in str(err.value)
    assert_unchanged(store, out, before)


def test_scribbles_outside_the_slide_or_off_tissue_are_refused(cmu_run, tmp_path):
    store, out = cmu_run
    before = store_snapshot(store, out)
    w, h = store.frame.level0_size
    outside = feature(shapely.box(w + 100, h + 100, w + 200, h + 200), "Tumor")
    with pytest.raises(WsisegError, match="outside the slide"):
        refine_round(store, write_export(tmp_path / "o.geojson", [outside]), out, SLIDE_ID,
                     randomwalk_refiner(130.0, 0.4), "rw")
    # Another slide's export: scribbles on glass of this one.
    glass = feature(shapely.box(20, 20, 300, 300), "Tumor")
    with pytest.raises(WsisegError, match="another slide"):
        refine_round(store, write_export(tmp_path / "g.geojson", [glass]), out, SLIDE_ID,
                     randomwalk_refiner(130.0, 0.4), "rw")
    assert_unchanged(store, out, before)


def test_self_intersecting_polygon_and_unknown_class_are_not_fatal(cmu_run, tmp_path):
    store, out = cmu_run
    x, y = tissue_point(store, 1)
    bowtie = shapely.Polygon([(x - 10, y - 10), (x + 10, y + 10), (x + 10, y - 10),
                              (x - 10, y + 10), (x - 10, y - 10)])
    feats = [feature(to_qupath(store, bowtie), "Tumor"),
             feature(to_qupath(store, shapely.box(x, y, x + 4, y + 4)), "Mystery class")]
    result = refine_round(store, write_export(tmp_path / "s.geojson", feats), out, SLIDE_ID,
                          randomwalk_refiner(130.0, 0.4), "rw")
    assert result.new_pixels > 0
    assert store.attrs["rounds"][-1]["unknown_classes"] == ["Mystery class"]


def test_refine_before_run_is_refused(tmp_path, small_workflow):
    from wsiseg.tiling import tile_slide

    store = tile_slide(real(CMU_SVS), tmp_path / "never.zarr", small_workflow).store
    export = write_export(tmp_path / "s.geojson", [feature(shapely.box(0, 0, 9, 9), "Tumor")])
    with pytest.raises(WsisegError, match="never run"):
        refine_round(store, export, tmp_path, "never", randomwalk_refiner(130.0, 0.4), "rw")


def test_two_refines_of_one_slide_cannot_run_at_once(cmu_run, tmp_path):
    store, out = cmu_run
    x, y = tissue_point(store, 1)
    export = write_export(tmp_path / "s.geojson",
                          [feature(to_qupath(store, shapely.box(x, y, x + 9, y + 9)), "Tumor")])
    with StoreLock(store.path, "test"), pytest.raises(StoreError, match="another wsiseg process"):
        refine_round(store, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")


def test_undo_with_only_round_zero_is_an_error(cmu_run):
    store, out = cmu_run
    with pytest.raises(WsisegError, match="nothing to undo"):
        undo(store, out, SLIDE_ID)


def test_qupath_fixtures_parse_as_scribble_sources():
    """The real QuPath files read as annotations the refine step can map."""
    anns = read_annotations(real(QUPATH_FIXTURES / "polygon.geojson"))
    assert len(anns) == 1 and anns[0].class_name is None  # unclassified → ignored
    assert len(anns[0].geometry.geoms[0].interiors) == 26


def test_refine_raises_tumor_iou_on_a_generated_slide(synth_slides, small_workflow, tmp_path):
    """A GuideNet that is unsure over part of a tumor; one tumor brush there; random walker."""
    from scipy import ndimage

    from wsiseg.synth import read_truth_mask

    s = synth_slides[0]
    truth_holder = {}

    def guide(rows: int, cols: int) -> np.ndarray:
        truth = read_truth_mask(s.truth_mask_path, (rows, cols))
        truth_holder["truth"] = truth
        prob = ndimage.gaussian_filter(truth.astype(np.float32), 2) * 255
        labels, n = ndimage.label(truth)
        biggest = 1 + int(np.argmax(ndimage.sum(truth, labels, range(1, n + 1))))
        rr, cc = np.nonzero(labels == biggest)
        r0, c0 = int(np.median(rr)), int(np.median(cc))
        truth_holder["missed"] = (r0, c0)
        prob[r0 - 60 : r0 + 60, c0 - 60 : c0 + 60] = 0.45 * 255  # unsure: no seeds here
        return prob.astype(np.uint8)

    out = tmp_path / "out"
    store = run_store(s.slide_path, out, "synth", small_workflow, guide)
    truth = truth_holder["truth"]
    r0, c0 = truth_holder["missed"]
    region = np.zeros_like(truth)
    region[r0 - 60 : r0 + 60, c0 - 60 : c0 + 60] = True
    brush_px = ndimage.binary_erosion(truth & region, iterations=8)
    assert brush_px.sum() > 50
    # One brush stroke along the tumor's core inside the unsure square, as polygons.
    from wsiseg.contours import tumor_polygons

    brush = shapely.union_all(tumor_polygons(brush_px.astype(np.uint8) * 255, simplify_px=0))
    export = write_export(tmp_path / "s.geojson", [feature(to_qupath(store, brush), "Tumor")])
    guide_before = np.asarray(store["refined"][...]) >= 128
    result = refine_round(store, export, out, "synth", randomwalk_refiner(130.0, 0.4), "rw")
    inside = window_mask(truth.shape, result.windows, store.workflow.refinenet.window_px)
    refined = np.asarray(store["refined"][...]) >= 128

    def iou(pred):
        a, b = pred[inside], truth[inside]
        return (a & b).sum() / max(1, (a | b).sum())

    assert iou(refined) > iou(guide_before) + 0.02


def test_random_walker_on_a_window_seeded_everywhere():
    """A confident GuideNet seeds every pixel: the seeds are the answer (no crash)."""
    guide = np.zeros((32, 32), np.uint8)
    guide[:, :16] = 255  # confident tumor left, confident non-tumor right
    fake = {"image": np.full((3, 32, 32), 200, np.uint8), "guide": guide,
            "scribbles": np.zeros((32, 32), np.int8)}
    (prob,) = randomwalk_refiner(130.0, 0.4)(fake, [(0, 0)], 32)
    assert prob.shape == (32, 32)
    assert (prob[:, :16] == 1).all() and (prob[:, 16:] == 0).all()


def test_features_away_from_the_scribbles_are_carried_over_byte_for_byte(cmu_run, tmp_path):
    from wsiseg import rounds

    store, out = cmu_run
    r0 = json.loads((out / f"{SLIDE_ID}.r0.geojson").read_text())["features"]
    assert len(r0) >= 2
    x, y = tissue_point(store, 0)
    export = write_export(tmp_path / "s.geojson",
                          [feature(to_qupath(store, shapely.box(x - 6, y - 6, x + 6, y + 6)),
                                   "Tumor")])
    result = refine_round(store, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    r1 = json.loads((out / f"{SLIDE_ID}.r1.geojson").read_text())["features"]
    text = (out / f"{SLIDE_ID}.r1.geojson").read_text()
    regions = store.attrs["rounds"][-1]["regions"]  # (row0, col0, rows, cols), working px
    changed = shapely.union_all([to_qupath(store, shapely.box(c - 3, r - 3, c + w + 3, r + h + 3))
                                 for r, c, h, w in regions])
    assert result.windows
    away = [f for f in r0 if not shapely.geometry.shape(f["geometry"]).intersects(changed)]
    assert away, "the test needs contours away from the scribbled windows"
    for f in away:  # same id, same JSON text, kept from round 0
        assert json.dumps(f, separators=(",", ":"), ensure_ascii=False) in text
    assert {f["id"] for f in away} <= {f["id"] for f in r1}
    # The index reads back what the file says; a stale index is ignored, not trusted.
    indexed = rounds.load_round_contours(store, 1)
    assert indexed.ids == [f["id"] for f in r1]
    everything = list(range(len(indexed.ids)))
    indexed_features = [json.loads(t) for t in indexed.feature_bytes(everything)]
    assert indexed_features == r1
    record = rounds.round_geojson_path(store, 1)
    record.write_bytes(record.read_bytes().replace(b"]}", b"] }"))  # same content, new size
    with pytest.raises(WsisegError, match="changed since its contours were read"):
        indexed.feature_bytes(everything)  # byte ranges of the old file are not trusted
    parsed = rounds.load_round_contours(store, 1)
    assert parsed.ids == indexed.ids
    # the index keeps the geometry before the writer's 0.01 px snap
    assert max(shapely.hausdorff_distance(parsed.geometries, indexed.geometries)) < 0.02
    assert [json.loads(t) for t in parsed.feature_bytes(everything)] == indexed_features
    assert undo(store, out, SLIDE_ID) == 0
    assert not (store.path / "rounds" / "r1.index.npz").exists()
