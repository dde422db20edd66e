"""Scribble geometries → int8 label raster; accumulation of rounds."""

from __future__ import annotations

import time

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import (
    GeometryCollection,
    LineString,
    MultiLineString,
    MultiPoint,
    MultiPolygon,
    Point,
    Polygon,
    box,
)

from wsiseg.scribbles.raster import merge_scribbles, new_scribble_pixels, rasterize_labels
from wsiseg.slide.frame import Frame

from conftest import QUPATH_FIXTURES, real

EIGHT_CONNECTED = np.ones((3, 3), bool)


def raster(shapes, window, *, width=1.0, radius=1.0):
    return rasterize_labels(shapes, window, line_width_px=width, point_radius_px=radius)


def centres(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a (rows, cols) window at the origin."""
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    return x, y


# -- areas ----------------------------------------------------------------------------------


def test_polygon_with_hole_fills_ring_and_leaves_hole_empty() -> None:
    cx, cy = 40.3, 37.7
    ring = Point(cx, cy).buffer(30, quad_segs=64)
    hole = Point(cx, cy).buffer(12, quad_segs=64)
    donut = Polygon(ring.exterior, [hole.exterior])
    labels = raster([(donut, 1)], (0, 0, 80, 90))

    assert labels.dtype == np.int8 and labels.shape == (80, 90)
    assert set(np.unique(labels)) == {0, 1}
    x, y = centres(80, 90)
    d = np.hypot(x - cx, y - cy)
    assert np.all(labels[d < 11.5] == 0), "hole must stay empty"
    assert np.all(labels[(d > 12.5) & (d < 29.5)] == 1)
    assert np.all(labels[d > 30.5] == 0)
    assert abs(int(labels.sum()) - donut.area) <= donut.length
    assert ndimage.label(labels == 0)[1] == 2, "hole is a separate unlabeled region"


def test_pixel_is_inside_when_its_centre_is() -> None:
    # Centres are at k + 0.5: columns 2..10 and rows 4..7 have theirs inside this box.
    labels = raster([(box(2.3, 3.6, 10.7, 8.2), -1)], (0, 0, 12, 14))
    expected = np.zeros((12, 14), np.int8)
    expected[4:8, 2:11] = -1
    np.testing.assert_array_equal(labels, expected)


def test_multipolygon_draws_every_part() -> None:
    parts = MultiPolygon([box(1.2, 1.2, 6.8, 4.8), box(10.1, 8.4, 14.6, 15.3)])
    labels = raster([(parts, -1)], (0, 0, 20, 20))
    expected = np.zeros((20, 20), np.int8)
    expected[1:5, 1:7] = -1
    expected[8:15, 10:15] = -1
    np.testing.assert_array_equal(labels, expected)


def test_invalid_bowtie_polygon_is_repaired_and_drawn() -> None:
    bowtie = Polygon([(0, 0), (20, 20), (20, 0), (0, 20), (0, 0)])
    assert not bowtie.is_valid
    labels = raster([(bowtie, 1)], (0, 0, 20, 20))
    repaired_area = shapely.make_valid(bowtie).area  # two triangles, 200 px²
    assert abs(int(labels.sum()) - repaired_area) <= 80
    assert labels[10, 2] == 1 and labels[10, 17] == 1  # both lobes (left and right)
    assert labels[2, 10] == 0  # the notch between them


def test_real_qupath_multipolygon_with_26_holes() -> None:
    """QuPath's own test ROI (10k × 10k level-0 px, 26 holes), at 1/10 scale."""
    path = real(QUPATH_FIXTURES / "polygon.geojson")
    level0 = shapely.from_geojson(path.read_text())
    frame = Frame(level0_size=(10_000, 10_000), level0_mpp=0.25, working_mpp=2.5)
    geometry = shapely.make_valid(frame.transform_geometry(level0, "level0", "working"))
    rows, cols = frame.working_shape

    start = time.perf_counter()
    labels = raster([(geometry, 1)], (0, 0, rows, cols))
    seconds = time.perf_counter() - start

    assert abs(int(labels.sum()) - geometry.area) <= geometry.length
    x, y = centres(rows, cols)
    # Block filling gives exactly the per-pixel rule: centre inside or on the boundary.
    np.testing.assert_array_equal(labels, shapely.intersects_xy(geometry, x, y).astype(np.int8))
    holes = [
        Polygon(interior)
        for polygon in shapely.get_parts(geometry)
        for interior in polygon.interiors
    ]
    assert len(holes) == 26
    # Pixels lying wholly in a hole (and off the islands inside the biggest hole) are empty;
    # the islands are drawn.
    islands = [p for p in shapely.get_parts(geometry) if any(h.contains(p) for h in holes)]
    assert len(islands) == 2
    empty = shapely.union_all(holes).buffer(-0.75).difference(geometry.buffer(0.75))
    assert not labels[shapely.contains_xy(empty, x, y)].any()
    for island in islands:
        assert labels[shapely.contains_xy(island.buffer(-0.75), x, y)].all()
    assert seconds < 5, f"rasterising 1 Mpx took {seconds:.1f} s"

    # Tiled windows reproduce the whole raster (clipping a big real geometry).
    for row0, col0, h, w in [(0, 0, 250, 300), (250, 300, 400, 123), (777, 911, 223, 89)]:
        window = raster([(geometry, 1)], (row0, col0, h, w))
        np.testing.assert_array_equal(window, labels[row0 : row0 + h, col0 : col0 + w])


# -- lines ----------------------------------------------------------------------------------


def test_thin_polyline_is_connected_and_every_segment_present() -> None:
    vertices = [(2.3, 3.1), (30.7, 8.2), (33.4, 35.6), (5.5, 28.9), (18.2, 18.1), (18.6, 18.3)]
    line = LineString(vertices)
    labels = raster([(line, 1)], (0, 0, 40, 40), width=1.0)

    drawn = labels == 1
    assert ndimage.label(drawn, EIGHT_CONNECTED)[1] == 1
    for (x0, y0), (x1, y1) in zip(vertices[:-1], vertices[1:], strict=True):
        for t in np.linspace(0, 1, 9):
            x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
            row, col = int(y), int(x)
            assert drawn[row - 1 : row + 2, col - 1 : col + 2].any(), (x, y)
        assert drawn[int(y0), int(x0)] and drawn[int(y1), int(x1)]
    # Thin: every drawn pixel centre within ~1 px of the line; about one pixel per unit length.
    x, y = centres(40, 40)
    distance = shapely.distance(line, shapely.points(x[drawn], y[drawn]))
    assert distance.max() <= 1.0
    assert line.length * 0.8 <= drawn.sum() <= line.length * 2.0


@pytest.mark.parametrize(
    "line",
    [
        LineString([(0.0, 10.0), (20.0, 10.0)]),  # exactly on a pixel edge
        LineString([(10.0, 0.0), (10.0, 20.0)]),
        LineString([(5.1, 5.1), (5.3, 5.2)]),  # shorter than a pixel
        LineString([(7.0, 7.0), (7.0, 7.0)]),  # degenerate: one point twice
    ],
)
def test_one_pixel_line_is_never_lost(line: LineString) -> None:
    labels = raster([(line, -1)], (0, 0, 20, 20), width=0.2)
    assert (labels == -1).any()
    assert ndimage.label(labels != 0, EIGHT_CONNECTED)[1] == 1


def test_wide_line_has_its_width() -> None:
    line = LineString([(5.0, 20.3), (55.0, 20.3)])
    labels = raster([(line, 1)], (0, 0, 40, 60), width=8.0)
    column = labels[:, 30]
    assert column.sum() == 8  # centres 16.5 … 23.5 lie within 4 px of y = 20.3
    expected = shapely.buffer(line, 4.0).area
    assert abs(int(labels.sum()) - expected) <= shapely.buffer(line, 4.0).length


def test_multilinestring_draws_every_line() -> None:
    lines = MultiLineString([[(2.5, 2.5), (2.5, 15.5)], [(10.5, 2.5), (17.5, 2.5)]])
    labels = raster([(lines, 1)], (0, 0, 20, 20), width=1.0)
    assert labels[2:16, 2].all() and labels[2, 10:18].all()
    assert ndimage.label(labels, EIGHT_CONNECTED)[1] == 2


# -- points ---------------------------------------------------------------------------------


def test_point_gives_disc_of_radius() -> None:
    px, py, radius = 20.3, 15.7, 5.0
    labels = raster([(Point(px, py), -1)], (0, 0, 32, 40), radius=radius)
    x, y = centres(32, 40)
    expected = np.where(np.hypot(x - px, y - py) < radius, -1, 0).astype(np.int8)
    np.testing.assert_array_equal(labels, expected)
    assert abs(-int(labels.sum()) - np.pi * radius**2) <= 2 * np.pi * radius


def test_tiny_point_radius_still_draws_a_pixel() -> None:
    for xy in [(4.0, 4.0), (4.5, 4.5), (4.99, 4.01)]:
        labels = raster([(Point(*xy), 1)], (0, 0, 10, 10), radius=0.1)
        assert 1 <= labels.sum() <= 4


def test_multipoint_draws_every_disc() -> None:
    points = MultiPoint([(3.5, 3.5), (15.5, 12.5)])
    labels = raster([(points, 1)], (0, 0, 20, 20), radius=1.0)
    assert labels[3, 3] == 1 and labels[12, 15] == 1
    assert labels.sum() == 2  # radius 1 around a pixel centre: that pixel only


# -- collections, conflicts, clipping -------------------------------------------------------


def test_geometry_collection_is_split_by_family() -> None:
    area = Polygon(box(2.2, 2.2, 9.8, 9.8).exterior, [box(4.5, 4.5, 7.5, 7.5).exterior])
    line = LineString([(12.5, 3.5), (12.5, 17.5)])
    point = Point(4.5, 15.5)
    nested = GeometryCollection([area, GeometryCollection([line, MultiPoint([point])])])
    together = raster([(nested, 1)], (0, 0, 20, 20), width=3.0, radius=2.0)
    apart = raster([(area, 1), (line, 1), (point, 1)], (0, 0, 20, 20), width=3.0, radius=2.0)
    np.testing.assert_array_equal(together, apart)
    assert together[5, 5] == 0 and together[3, 3] == 1  # the hole, the ring
    assert together[10, 11:14].all() and together[15, 4] == 1


def test_overlap_of_classes_is_unlabeled() -> None:
    tumor = box(2, 2, 12, 12)
    non_tumor = box(8, 8, 18, 18)
    labels = raster([(tumor, 1), (non_tumor, -1), (box(2, 2, 4, 4), 1)], (0, 0, 20, 20))
    assert (labels[8:12, 8:12] == 0).all()
    assert (labels[2:8, 2:12] == 1).all() and (labels[2:12, 2:8] == 1).all()
    assert (labels[12:18, 8:18] == -1).all() and (labels[8:18, 12:18] == -1).all()
    assert (labels == 1).sum() == 100 - 16 and (labels == -1).sum() == 100 - 16


def test_window_clipping_equals_crop_of_bigger_raster() -> None:
    shapes = [
        (Polygon(box(-20, -15, 60, 45).exterior, [box(10.3, 10.3, 30.6, 25.1).exterior]), 1),
        (LineString([(-30.0, 70.2), (50.3, 55.5), (130.0, 90.7)]), -1),
        (MultiPoint([(95.2, 10.7), (118.9, 79.1), (-3.0, 50.0)]), -1),
        (Point(70.4, 30.6).buffer(14), 1),
        (LineString([(60.0, -10.0), (80.0, 120.0)]), 1),
    ]
    full = raster(shapes, (0, 0, 100, 120), width=3.0, radius=6.0)
    assert (full == 1).any() and (full == -1).any() and (full == 0).any()
    for row0, col0, rows, cols in [
        (0, 0, 100, 120),
        (17, 23, 40, 51),
        (60, 90, 40, 30),
        (5, 0, 1, 7),
    ]:
        window = raster(shapes, (row0, col0, rows, cols), width=3.0, radius=6.0)
        assert window.shape == (rows, cols)
        np.testing.assert_array_equal(window, full[row0 : row0 + rows, col0 : col0 + cols])
    far = raster(shapes, (500, 500, 20, 20), width=3.0, radius=6.0)
    assert not far.any()


def test_cost_follows_window_not_geometry() -> None:
    """A slide-sized scribble drawn into a small window takes no slide-sized work."""
    huge_area = box(-1e6, -1e6, 2e6, 2e6)
    huge_line = LineString([(-1e6, 50.5), (2e6, 50.5)])
    huge_disc = Point(5e5, 5e5)
    start = time.perf_counter()
    labels = raster(
        [(huge_area, 1), (huge_line, -1), (huge_disc, -1)], (1000, 2000, 64, 64), radius=1e6
    )
    assert time.perf_counter() - start < 1.0
    assert labels.shape == (64, 64) and (labels == 0).all()  # disc ∩ area conflict everywhere


def test_empty_and_none_geometries_are_skipped() -> None:
    labels = raster([(Polygon(), 1), (LineString(), -1)], (0, 0, 5, 5))
    assert labels.shape == (5, 5) and not labels.any()
    assert raster([], (3, 4, 0, 6)).shape == (0, 6)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="label"):
        raster([(box(0, 0, 2, 2), 2)], (0, 0, 5, 5))
    with pytest.raises(ValueError, match="label"):
        raster([(box(0, 0, 2, 2), 0)], (0, 0, 5, 5))
    with pytest.raises(ValueError, match="window"):
        raster([], (0, 0, -1, 5))
    with pytest.raises(ValueError, match="line_width_px"):
        raster([], (0, 0, 5, 5), width=0.0)
    with pytest.raises(ValueError, match="point_radius_px"):
        raster([], (0, 0, 5, 5), radius=float("nan"))


# -- merging rounds -------------------------------------------------------------------------


def test_merge_keeps_adds_and_clears_conflicts() -> None:
    existing = np.array([[0, 0, 1, 1, -1, -1, 1, -1, 0]], np.int8)
    new = np.array([[0, 1, 0, 1, 0, -1, -1, 1, -1]], np.int8)
    before = (existing.copy(), new.copy())
    merged = merge_scribbles(existing, new)
    np.testing.assert_array_equal(merged, np.array([[0, 1, 1, 1, -1, -1, 0, 0, -1]], np.int8))
    assert merged.dtype == np.int8
    np.testing.assert_array_equal(existing, before[0])  # inputs untouched
    np.testing.assert_array_equal(new, before[1])
    changed = new_scribble_pixels(existing, merged)
    assert changed.dtype == np.bool_
    np.testing.assert_array_equal(changed, np.array([[0, 1, 0, 0, 0, 0, 1, 1, 1]], bool))


def test_merge_is_idempotent_and_accumulates_rounds() -> None:
    rng = np.random.default_rng(3)
    existing = rng.choice(np.array([-1, 0, 0, 0, 1], np.int8), size=(30, 40))
    np.testing.assert_array_equal(merge_scribbles(existing, existing), existing)
    assert not new_scribble_pixels(existing, merge_scribbles(existing, existing)).any()
    # A round that only repeats or extends earlier scribbles adds exactly the new pixels,
    # and re-merging it changes nothing.
    extension = existing.copy()
    extension[:5] = np.where(existing[:5] == 0, 1, existing[:5])
    merged = merge_scribbles(existing, extension)
    np.testing.assert_array_equal(merged, extension)
    np.testing.assert_array_equal(merge_scribbles(merged, extension), merged)
    np.testing.assert_array_equal(
        new_scribble_pixels(existing, merged), (existing == 0) & (extension != 0)
    )
    # Nothing new: nothing changes.
    np.testing.assert_array_equal(merge_scribbles(existing, np.zeros_like(existing)), existing)


def test_merge_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape"):
        merge_scribbles(np.zeros((3, 4), np.int8), np.zeros((4, 3), np.int8))
    with pytest.raises(ValueError, match="shape"):
        new_scribble_pixels(np.zeros((3, 4), np.int8), np.zeros((3, 5), np.int8))
