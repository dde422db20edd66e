"""Tests of wsiseg.qupath.snap: geometry snapped to QuPath's 0.01-px grid, valid, and the
clearance bound that lets traced contours skip GEOS's validity check."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
import shapely.affinity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from wsiseg.contours import tumor_polygons
from wsiseg.qupath import snap, text
from wsiseg.qupath.snap import PRECISION_PX, geometry_json, lattice_rounding, proven_rounding
from wsiseg.qupath.text import geometry_text
from wsiseg.slide.frame import Frame

SQUARE = [(0, 0), (10, 0), (10, 10), (0, 10)]


def _far(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(1e6 + x, 1e6 + y) for x, y in ring]


def _traced(seed: int, scale: float, offset: float) -> list[shapely.Polygon]:
    """Traced tumor outlines (holes, rings touching at corners) in a level-0-like frame."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((160, 160)), 2.5)
    mask = field >= np.quantile(field, 0.5)
    polygons = tumor_polygons(mask, chunk_px=48, simplify_px=1.0)
    return [shapely.affinity.affine_transform(p, [scale, 0, 0, scale, offset, -offset])
            for p in polygons]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 4.008, 2 / 3, 0.2503])
def test_traced_contours_vouched_valid_are_written_valid_as_when_checked(seed, scale):
    polygons = _traced(seed, scale, 1234.567)
    assert polygons and any(len(p.interiors) for p in polygons)
    for polygon in polygons:
        vouched = shapely.from_geojson(geometry_json(polygon, "x", valid=True))
        checked = shapely.from_geojson(geometry_json(polygon, "x"))
        assert vouched.is_valid
        # the same but for the vertices added where rings touch (each within 0.01 px)
        assert shapely.hausdorff_distance(vouched, checked) <= PRECISION_PX
        assert vouched.area == pytest.approx(checked.area, abs=PRECISION_PX * polygon.length)


def test_a_vouched_traced_contour_is_not_checked_by_geos(monkeypatch):
    polygon = max(_traced(0, 4.008, 0.5), key=lambda p: len(p.interiors))
    assert proven_rounding(polygon) is not None
    calls = []
    real = shapely.is_valid
    monkeypatch.setattr(shapely, "is_valid", lambda g, **kw: calls.append(g) or real(g, **kw))
    geometry_json(polygon, "x", valid=True)
    assert calls == []
    geometry_json(polygon, "x")
    assert len(calls) == 1  # unvouched: the rounding is checked


@pytest.mark.parametrize("polygon", [
    # a hole 0.004 px inside the shell: rounding makes the rings touch along an edge
    shapely.Polygon(SQUARE, [[(0.004, 1), (5, 1), (5, 5), (0.004, 5)]]),
    # a hole touching a shell edge 0.005 px from its corner
    shapely.Polygon(SQUARE, [[(0.005, 0), (7, 2), (3, 2)]]),
    # a segment shorter than twice the largest move
    shapely.Polygon([(0, 0), (10, 0), (10, 10), (10.005, 10.005), (0, 10)]),
    # two parts 0.01 px apart
    shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(1.01, 0, 2, 1)]),
    # a hole vertex 0.001 px off a shell edge: near, not on it
    shapely.Polygon(SQUARE, [[(5, 0.001), (7, 2), (3, 2)]]),
    # at 1e6 px, a hole 5e-5 px above the shell's edge at two vertices (within float error
    # of it): joining both would cut the interior (found by the second reader)
    shapely.Polygon(_far(SQUARE), [_far([(3, 5e-5), (3, 5), (7, 5), (7, 5e-5)])]),
    shapely.Polygon(_far(SQUARE), [_far([(3, 5e-5), (5, 5), (7, 5e-5)])]),
    # the same with one real touch and one within float error
    shapely.Polygon(_far(SQUARE), [_far([(3, 0), (5, 5), (7, 5e-5)])]),
])
def test_near_contacts_are_not_proven_and_the_writer_still_writes_valid_geometry(polygon):
    assert polygon.is_valid
    assert proven_rounding(polygon) is None
    written = shapely.from_geojson(geometry_json(polygon, "x", valid=True))
    assert written.is_valid and written.area == pytest.approx(polygon.area, abs=0.2)


@pytest.mark.parametrize("touch", [
    [(0, 0), (4, 2), (2, 4)],  # a hole at the shell's corner: a vertex of both rings
    [(5, 0), (7, 2), (3, 2)],  # a hole touching the middle of a shell edge
    [(5.003, 0), (7.006, 2.001), (3.004, 2.007)],  # the same off the grid
])
def test_rings_touching_at_a_point_keep_their_topology(touch):
    touching = shapely.Polygon(SQUARE, [touch])
    assert touching.is_valid
    snapped = proven_rounding(shapely.affinity.translate(touching, 0.0031, 100.0047))
    assert snapped is not None and snapped.is_valid
    assert len(snapped.interiors) == 1
    assert snapped.area == pytest.approx(touching.area, abs=0.1)
    shell, hole = snapped.exterior, snapped.interiors[0]
    assert shell.intersection(hole).geom_type == "Point"  # still one touch, at a vertex
    assert set(hole.coords) & set(shell.coords)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gap=st.one_of(st.just(0.0), st.floats(0.0005, 0.05)), x=st.floats(-50, 50),
       y=st.floats(-50, 50), tilt=st.floats(-0.3, 0.3), scale=st.floats(0.3, 5.0),
       angle=st.floats(0, 90))
def test_whenever_the_bound_holds_the_rounded_geometry_is_valid(gap, x, y, tilt, scale, angle):
    """A shell and a hole (and a second part) ``gap`` apart or touching at a point, tilted,
    rotated and moved off the grid: the bound may refuse, but what it gives is valid."""
    hole = [(gap, 3), (5, 1 + tilt), (5, 5), (2, 5 - tilt)]
    polygon = shapely.Polygon(SQUARE, [hole])
    other = shapely.Polygon([(10 + gap, 5), (12, tilt), (12, 13)])
    for geometry in (polygon, shapely.MultiPolygon([polygon, other])):
        g = shapely.affinity.rotate(
            shapely.affinity.affine_transform(geometry, [scale, 0, 0, scale, x, y]), angle)
        if not g.is_valid:
            continue
        snapped = proven_rounding(g)
        if snapped is not None:
            assert snapped.is_valid
            assert snapped.area == pytest.approx(g.area, abs=PRECISION_PX * g.length)
            assert gap == 0 or gap * scale > 2 * PRECISION_PX / np.sqrt(2)


# ---------------------------------------------------------------- the lattice form of the bound


def _same(a: shapely.Geometry, b: shapely.Geometry) -> bool:
    return shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 0.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1.0, 2.0, 4.008, 7.9145, 2 / 3])
def test_traced_contours_on_their_lattice_round_as_the_search_proves(seed, scale):
    polygons = _traced(seed, scale, 1234.567)
    grid = (scale, 1234.567, -1234.567)
    for polygon in polygons:
        by_lattice = lattice_rounding(polygon, grid)
        assert by_lattice is not None and by_lattice.is_valid
        by_search = proven_rounding(polygon)
        assert by_search is not None and _same(by_lattice, by_search)


def test_a_vouched_contour_on_its_lattice_needs_no_search_and_no_geos_check(monkeypatch):
    polygon = max(_traced(0, 7.9145, 0.5), key=lambda p: len(p.interiors))
    expected = geometry_json(polygon, "x", valid=True)
    calls = []
    real = shapely.is_valid
    with monkeypatch.context() as m:
        m.setattr(shapely, "is_valid", lambda g, **kw: calls.append(g) or real(g, **kw))
        m.setattr(snap, "proven_rounding", lambda g: calls.append(g))
        m.setattr(shapely, "normalize", lambda g, **kw: calls.append(g))
        got = geometry_json(polygon, "x", valid=True, grid=(7.9145, 0.5, -0.5))
    assert calls == []
    assert got == expected  # the canonical text, found from the arrays


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1.0, 2.0, 7.9145, 2 / 3])
def test_the_canonical_text_from_arrays_is_geos_normal_form(seed, scale):
    """GEOS's normalisation, oriented: rings from their smallest coordinate, holes by size
    and coordinates; found here with array operations, the same text."""
    grid = (scale, 0.5, -0.5)
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.standard_normal((200, 200)), 1.2) > 0.4  # many holes
    polygons = [shapely.affinity.affine_transform(p, [scale, 0, 0, scale, 0.5, -0.5])
                for p in tumor_polygons(~mask, chunk_px=64, simplify_px=1.0)]
    # two holes of one size from one smallest coordinate: a tie only their other
    # coordinates decide, in both orders
    shell = [(0, 0), (100, 0), (100, 100), (0, 100)]
    a, b = [(60, 60), (61, 62), (62, 61)], [(60, 60), (63, 60), (62, 58)]
    polygons += [shapely.affinity.affine_transform(shapely.Polygon(shell, holes),
                                                   [scale, 0, 0, scale, 0.5, -0.5])
                 for holes in ([a, b], [b, a])]
    assert sum(len(p.interiors) for p in polygons) > 20
    proven = 0
    for polygon in polygons:
        rounded = lattice_rounding(polygon, grid)
        if rounded is None:  # (a long steep segment on a fine lattice: left to the search)
            continue
        proven += 1
        reference = geometry_text(shapely.orient_polygons(shapely.normalize(rounded)))
        assert geometry_json(polygon, "x", valid=True, grid=grid) == reference
        # the same rings in another order and from other starts: the same text
        shuffled = shapely.Polygon(
            np.roll(np.asarray(polygon.exterior.coords)[:-1], 3, axis=0),
            [np.asarray(h.coords)[:-1] for h in polygon.interiors][::-1])
        assert geometry_json(shuffled, "x", valid=True, grid=grid) == reference
    assert proven == len(polygons) or (scale < 1 and proven >= 2)


def test_a_contour_on_its_lattice_not_turning_the_rfc_way_is_normalised_by_geos():
    grid = (7.9145, 0.5, -0.5)
    polygon = max(_traced(0, 7.9145, 0.5), key=lambda p: len(p.interiors))
    turned = shapely.Polygon(polygon.exterior, [polygon.interiors[0].coords[::-1],
                                                *polygon.interiors[1:]])
    assert text.canonical_polygon_text(*snap._lattice_rounded(turned, grid)[:2]) is None
    got = geometry_json(turned, "x", valid=True, grid=grid)
    assert got == geometry_json(polygon, "x", valid=True, grid=grid)  # the same polygon
    assert got == geometry_text(shapely.orient_polygons(shapely.normalize(
        lattice_rounding(turned, grid))))


def test_a_ring_changed_past_its_first_vertices_is_written_anew():
    """(Second reader) a ring whose text is remembered, changed far from where it starts:
    the text written is the changed ring's, as a fresh write gives it."""
    grid = (1.0, 0.0, 0.0)
    shell = [(0, 0), (100, 0), (100, 100), (0, 100)]  # RFC 7946: counter-clockwise
    hole = [(20, 20), (20, 40), (28, 40), (28, 20)]  # clockwise
    notched = [(20, 20), (20, 40), (27, 40), (27, 39), (28, 39), (28, 20)]
    with text.remembering_ring_texts():
        geometry_json(shapely.Polygon(shell, [hole]), "x", valid=True, grid=grid)
        remembered = geometry_json(shapely.Polygon(shell, [notched]), "x", valid=True,
                                   grid=grid)
    text.RING_TEXTS.clear()
    fresh = geometry_json(shapely.Polygon(shell, [notched]), "x", valid=True, grid=grid)
    assert remembered == fresh and "[27,39]" in fresh


def test_coordinates_beyond_any_slide_are_left_to_geos():
    """(Second reader) the canonical order's one key per place would overflow past 3e7 px
    both ways: such rings are refused (GEOS orders them), nearer ones are not."""
    def rings(half: float) -> tuple[np.ndarray, np.ndarray]:
        shell = [(-half, -half), (half, -half), (half, half), (-half, half), (-half, -half)]
        hole = [(0, 0), (0, 10), (10, 10), (10, 0), (0, 0)]  # clockwise
        return np.asarray(shell + hole, dtype=np.float64), np.repeat([0, 1], 5)
    assert text.canonical_polygon_text(*rings(4e7)) is None
    near = text.canonical_polygon_text(*rings(1e7))
    polygon = shapely.Polygon(rings(1e7)[0][:5], [rings(1e7)[0][5:]])
    assert near == geometry_text(shapely.orient_polygons(shapely.normalize(polygon)))


def test_ring_texts_are_remembered():
    polygons = _traced(2, 2.0, 0.0)
    big = max(polygons, key=lambda p: len(p.interiors))
    grid = (2.0, 0.0, 0.0)
    text.RING_TEXTS.clear()
    first = geometry_json(big, "x", valid=True, grid=grid)
    assert len(text.RING_TEXTS._texts) == 0  # (a batch run writes each tumor once)
    with text.remembering_ring_texts():
        assert geometry_json(big, "x", valid=True, grid=grid) == first
    assert len(text.RING_TEXTS._texts) == len(big.interiors) + 1
    # a polygon with one hole less: its rings' texts are found, not written again
    fewer = shapely.Polygon(big.exterior, big.interiors[1:])
    written = []
    real = shapely.to_wkt
    with pytest.MonkeyPatch.context() as m, text.remembering_ring_texts():
        m.setattr(shapely, "to_wkt", lambda g, **kw: written.append(g) or real(g, **kw))
        again = geometry_json(fewer, "x", valid=True, grid=grid)
        assert geometry_json(big, "x", valid=True, grid=grid) == first
    assert written == []
    text.RING_TEXTS.clear()
    assert geometry_json(fewer, "x", valid=True, grid=grid) == again
    # what the budget cannot hold is not kept; past half the budget a generation is
    # dropped, and the texts used meanwhile are carried into the next one
    small = text._RingTexts(10)
    small.put_many([b"k" * 8], ["[[1,2],[3,4]]"])
    assert small.get_many([b"k" * 8]) == [None]
    entry = 10 + 14 + text._ENTRY_OVERHEAD  # each of these: key, text, its objects
    cache = text._RingTexts(4 * entry + 2)  # two entries a generation
    cache.put_many([b"a" * 10, b"b" * 10], ["[[0,0]]" * 2, "[[1,1]]" * 2])
    cache.put_many([b"c" * 10], ["[[2,2]]" * 2])  # a new generation: a, b older
    assert cache.get_many([b"a" * 10]) == ["[[0,0]]" * 2]  # carried into the current one
    cache.put_many([b"d" * 10], ["[[3,3]]" * 2])  # a full one more: b is dropped
    assert cache.get_many([b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10]) == [
        "[[0,0]]" * 2, None, "[[2,2]]" * 2, "[[3,3]]" * 2]


@pytest.mark.parametrize("touch", [
    [(0, 0), (4, 2), (2, 4)],  # a hole at the shell's corner: a vertex of both rings
    [(5, 0), (7, 2), (3, 2)],  # a hole touching the middle of a shell edge
    [(10, 3), (6, 9), (6, 4)],  # ... of a vertical edge, off its lattice midpoint
])
@pytest.mark.parametrize("spacing", [1.0, 3.7, 0.2503])
def test_lattice_touches_are_noded_and_keep_their_topology(touch, spacing):
    grid = (spacing, 0.37, 100.21)
    touching = shapely.affinity.affine_transform(
        shapely.Polygon(SQUARE, [touch]), [spacing, 0, 0, spacing, grid[1], grid[2]])
    assert touching.is_valid
    snapped = lattice_rounding(touching, grid)
    assert snapped is not None and snapped.is_valid
    assert _same(snapped, proven_rounding(touching))
    shell, hole = snapped.exterior, snapped.interiors[0]
    assert shell.intersection(hole).geom_type == "Point"  # still one touch, at a vertex
    assert set(hole.coords) & set(shell.coords)


@pytest.mark.parametrize("polygon, grid", [
    # a vertex off the lattice (the clip at the slide's edge adds such vertices)
    (shapely.Polygon([(0, 0), (10, 0), (10, 10.5), (0, 10)]), (1.0, 0.0, 0.0)),
    # the right lattice spacing, the wrong origin
    (shapely.box(0.3, 0.3, 10.3, 10.3), (1.0, 0.0, 0.0)),
    # a segment of direction (400, 1): a lattice point may lie 1/400 px from it
    (shapely.Polygon([(0, 0), (400, 1), (400, 10), (0, 10)]), (1.0, 0.0, 0.0)),
    # a lattice finer than the rounding's reach
    (shapely.box(0, 0, 0.01, 0.01), (0.005, 0.0, 0.0)),
    # two vertices within float error of one lattice point but not equal: rounding would
    # join them into a touch nothing checked (found by the second reader)
    (shapely.Polygon([(0, 0), (10, 0), (5, 5), (10, 10), (0, 10), (5, 5 + 1e-14)]),
     (1.0, 0.0, 0.0)),
    (shapely.Polygon(SQUARE, [[(1e-14, 1e-14), (2, 8), (10 - 1e-14, 10 - 1e-14)]]),
     (1.0, 0.0, 0.0)),
])
def test_what_the_lattice_cannot_prove_is_left_to_the_search(polygon, grid):
    assert polygon.is_valid
    assert lattice_rounding(polygon, grid) is None
    written = shapely.from_geojson(geometry_json(polygon, "x", valid=True, grid=grid))
    assert written.is_valid and written.area == pytest.approx(polygon.area, abs=0.2)


@pytest.mark.parametrize("polygon", [
    # a shell whose vertex (2, 0) lies inside its own first edge: invalid, wrongly vouched
    shapely.Polygon([(0, 0), (4, 0), (4, 4), (3, 4), (2, 0), (1, 4), (0, 4)]),
    # ... a hole doing so
    shapely.Polygon(SQUARE, [[(2, 2), (6, 2), (6, 6), (5, 6), (4, 2), (3, 6), (2, 6)]]),
])
def test_a_ring_touching_itself_is_not_proven_by_the_lattice(polygon):
    assert not polygon.is_valid
    assert lattice_rounding(polygon, (1.0, 0.0, 0.0)) is None
    written = shapely.from_geojson(geometry_json(polygon, "x", valid=True, grid=(1.0, 0, 0)))
    assert written.is_valid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), spacing=st.floats(0.05, 12.0),
       x0=st.floats(-1e5, 1e5), y0=st.floats(-1e5, 1e5), simplify=st.sampled_from([0.0, 1.0]))
def test_whenever_the_lattice_bound_holds_the_rounding_is_valid(seed, spacing, x0, y0,
                                                                 simplify):
    """Random blobs (holes, diagonal touches) traced, simplified or not, put on a random
    lattice: what the lattice proves is valid and is the rounding the search proves."""
    rng = np.random.default_rng(seed)
    field = ndi.gaussian_filter(rng.standard_normal((48, 48)), rng.uniform(0.6, 2.0))
    mask = field >= np.quantile(field, rng.uniform(0.3, 0.7))
    for polygon in tumor_polygons(mask, chunk_px=16, simplify_px=simplify):
        g = shapely.affinity.affine_transform(polygon, [spacing, 0, 0, spacing, x0, y0])
        snapped = lattice_rounding(g, (spacing, x0, y0))
        if snapped is None:
            continue
        assert snapped.is_valid
        assert snapped.area == pytest.approx(g.area, abs=PRECISION_PX * g.length)
        searched = proven_rounding(g)
        if searched is not None:
            assert _same(snapped, searched)


def test_a_contour_clipped_at_the_slide_edge_is_written_valid():
    """At a scale of 100.00000000000001 the clip at the slide's edge puts a vertex within
    float error of, but not at, another one on the lattice (found by the second reader)."""
    frame = Frame(level0_size=(100000, 100000), level0_mpp=0.009, working_mpp=0.9)
    traced = shapely.Polygon([(990, 0), (1000, 0), (1000, 10), (990, 10)],
                             [[(995, 4), (1000, 5), (995, 6)]])
    clipped = shapely.intersection(frame.transform_geometry(traced, "working", "level0"),
                                   shapely.box(0, 0, *frame.level0_size))
    assert clipped.is_valid
    written = shapely.from_geojson(
        geometry_json(clipped, "x", valid=True, grid=(frame.scale, 0.0, 0.0)))
    assert written.is_valid
    assert written.area == pytest.approx(clipped.area, rel=1e-6)


def test_lattice_coordinates_beyond_the_int64_keys_are_left_to_the_search():
    """A direction (2**32, 3): its squared length would wrap around in int64 and pass a
    clearance of spacing / 3 for one of spacing / 2**32 (found by the second reader)."""
    s = 0.0860544
    sliver = shapely.Polygon([(0, 0), (2**32 * s, 3 * s), (s, -s)])
    near = shapely.Polygon([(1431655765 * s, s), (1431655766 * s, 2 * s),
                            (1431655764 * s, 2 * s)])
    polygon = shapely.MultiPolygon([sliver, near])
    assert polygon.is_valid
    assert lattice_rounding(polygon, (s, 0.0, 0.0)) is None
    assert shapely.from_geojson(geometry_json(polygon, "x", valid=True, grid=(s, 0.0, 0.0))
                                ).is_valid


def test_a_repeated_vertex_is_left_to_the_search():
    """The lattice's rounding is built from the (noded) coordinates with no repeated vertex
    removed: a ring that repeats one is not proven by the lattice (a segment of length 0)."""
    grid = (3.7, 0.37, 100.21)
    repeated = shapely.affinity.affine_transform(
        shapely.Polygon([(0, 0), (10, 0), (10, 10), (10, 10), (0, 10)],
                        [[(5, 0), (7, 2), (3, 2)]]), [3.7, 0, 0, 3.7, *grid[1:]])
    assert repeated.is_valid
    assert lattice_rounding(repeated, grid) is None
    assert shapely.from_geojson(geometry_json(repeated, "x", valid=True, grid=grid)).is_valid
