"""Tests of wsiseg.contours: exact pixel-edge polygons, chunk merging, region mode, memory."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
import shapely
from scipy import ndimage as ndi

import wsiseg.contours.merge as merge
import wsiseg.contours.polygons as polygons_module
import wsiseg.contours.splice as splice_module
import wsiseg.contours.trace as chunk_trace
from wsiseg.contours import (
    RowStreamTracer,
    draw_contours,
    polygon_stats,
    tumor_mask,
    tumor_polygons,
    tumor_polygons_and_means,
    uint8_threshold,
)
from wsiseg.contours.cache import TRACES
from wsiseg.contours.simplify import _finish, _rotated, cut_runs


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _random_blobs(rng: np.random.Generator, shape: tuple[int, int], fraction: float,
                  sigma: float) -> np.ndarray:
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return field >= np.quantile(field, 1.0 - fraction)


def _centres_covered(polygons: list[shapely.Polygon], shape: tuple[int, int]) -> np.ndarray:
    """How many polygons contain each pixel centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    count = np.zeros(shape, dtype=int)
    for polygon in polygons:
        count += shapely.contains_xy(polygon, xx, yy)
    return count


class RecordingArray:
    """A 2-D array wrapper that records the size of every read."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.chunks = getattr(array, "chunks", None)
        self.reads: list[tuple[int, int, int, int]] = []  # (row0, col0, rows, cols)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        self.reads.append((r0, c0, r1 - r0, c1 - c0))
        return np.asarray(self.array[key])


# -- threshold -------------------------------------------------------------------------------


def test_threshold_rule_at_the_boundary_value() -> None:
    assert uint8_threshold(0.5) == 128
    assert uint8_threshold(0.2) == 51  # 0.2 · 255 = 51 exactly, despite float error
    assert uint8_threshold(0.0) == 0
    assert uint8_threshold(1.0) == 255
    codes = np.array([[126, 127, 128, 129]], dtype=np.uint8)
    assert tumor_mask(codes, 0.5).tolist() == [[False, False, True, True]]
    floats = np.array([[0.4999, 0.5, 0.5001]])
    assert tumor_mask(floats, 0.5).tolist() == [[False, True, True]]
    # 127 and 128 side by side: only the 128 half is traced
    prob = np.zeros((10, 10), dtype=np.uint8)
    prob[2:8, 2:5] = 127
    prob[2:8, 5:8] = 128
    (polygon,) = tumor_polygons(prob, simplify_px=0)
    assert polygon.equals(shapely.box(5, 2, 8, 8))
    with pytest.raises(ValueError, match="threshold"):
        tumor_polygons(prob, threshold=1.5)
    with pytest.raises(TypeError, match="uint8"):
        tumor_polygons(prob.astype(np.int32))


# -- exact polygons --------------------------------------------------------------------------


def test_disc_with_hole_and_island_inside_the_hole() -> None:
    shape = (120, 130)
    centre = (60.0, 64.0)
    mask = _disc(shape, centre, 50) & ~_disc(shape, centre, 30) | _disc(shape, centre, 12)
    prob = (mask * 255).astype(np.uint8)
    for chunk_px in (None, 32, 17):
        polygons = tumor_polygons(prob, simplify_px=0, chunk_px=chunk_px)
        assert len(polygons) == 2
        ring, island = polygons  # sorted by area, largest first
        assert len(ring.interiors) == 1 and len(island.interiors) == 0
        labels, _ = ndi.label(mask)
        assert ring.area == np.sum(labels == labels[60, 64 + 40])
        assert island.area == np.sum(labels == labels[60, 64])
        assert shapely.Polygon(ring.interiors[0]).contains(island)
        assert all(p.is_valid for p in polygons)
        assert (_centres_covered(polygons, shape) == mask).all()


def test_pixel_edge_coordinates() -> None:
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:3, 2:7] = True  # rows 1-2, columns 2-6
    (polygon,) = tumor_polygons(mask, simplify_px=0)
    assert polygon.equals(shapely.box(2, 1, 7, 3))  # x = column, y = row, edges on integers


def test_corner_touching_pixels_are_separate_polygons() -> None:
    # 4-connectivity: a diagonal pair is two components; a ring closed only through a corner
    # is one component whose inner background is a hole touching the shell at that corner
    mask = np.zeros((8, 8), dtype=bool)
    mask[1, 1] = mask[2, 2] = True
    mask[4:7, 4:7] = True
    mask[5, 5] = False
    mask[4, 4] = False  # the inner background reaches outside through the corner (5, 5)
    mask[3, 3] = True
    polygons = tumor_polygons(mask, simplify_px=0)
    assert len(polygons) == 4  # ring, and three single pixels (1,1), (2,2), (3,3)
    assert [p.area for p in polygons] == [7.0, 1.0, 1.0, 1.0]
    assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
    assert (_centres_covered(polygons, mask.shape) == mask).all()


def test_each_traced_polygon_is_exactly_its_components_pixels() -> None:
    """One chunk traced from its pixel edges: per label a valid polygon (shell turning left,
    holes right, as the join makes them) whose area and covered pixel centres are exactly that
    4-connected component's, on random masks full of corner touches and holes."""
    rng = np.random.default_rng(11)
    for k in range(400):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        if k % 2:
            mask = ndi.binary_opening(mask) | (rng.random((h, w)) < 0.05)
        labels, polygons = chunk_trace._trace_block(mask, 3, 5)
        if k % 40 == 0:  # any nonzero pixel is tumor, whatever the mask's dtype
            as_uint8 = chunk_trace._trace_block(mask.astype(np.uint8) * 255, 3, 5)[1]
            assert all(shapely.equals_exact(p, q, 0)
                       for p, q in zip(as_uint8, polygons, strict=True))
        assert np.array_equal(labels, ndi.label(mask)[0])
        assert len(polygons) == labels.max()
        for label, polygon in enumerate(polygons, start=1):
            component = np.pad(labels == label, ((3, 0), (5, 0)))
            assert polygon.is_valid and polygon.geom_type == "Polygon"
            assert polygon.area == component.sum()
            assert (_centres_covered([polygon], component.shape) == component).all()
            assert shapely.is_ccw(polygon.exterior)
            assert not any(shapely.is_ccw(ring) for ring in polygon.interiors)


def test_blob_across_chunk_corners_is_one_polygon() -> None:
    shape = (100, 100)
    mask = _disc(shape, (56, 60), 27)  # over chunk corners (32, 32), (32, 64), (64, 64)...
    mask[30:34, 10:90] = True  # a bar along a chunk border
    whole = tumor_polygons(mask, simplify_px=0, chunk_px=1024)
    chunked = tumor_polygons(mask, simplify_px=0, chunk_px=32)
    assert len(whole) == len(chunked) == 1
    assert chunked[0].area == whole[0].area == mask.sum()
    assert chunked[0].equals(whole[0])


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_chunked_equals_unchunked(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(60, 160)), int(rng.integers(60, 160)))
    mask = _random_blobs(rng, shape, fraction=rng.uniform(0.1, 0.6), sigma=rng.uniform(1, 4))
    mask ^= rng.random(shape) < 0.01  # speckle: single pixels, corner contacts, pin holes
    labels, n = ndi.label(mask)
    pixel_counts = sorted(np.bincount(labels.ravel())[1:].tolist())
    whole = tumor_polygons(mask, simplify_px=0)
    chunked = tumor_polygons(mask, simplify_px=0, chunk_px=int(rng.integers(7, 40)))
    for polygons in (whole, chunked):
        assert len(polygons) == n
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
        assert sorted(p.area for p in polygons) == pixel_counts
        assert sum(p.area for p in polygons) == mask.sum()
        assert (_centres_covered(polygons, shape) == mask).all()
    assert shapely.union_all(whole).equals(shapely.union_all(chunked))


def _blobs_with_corner_contacts(rng: np.random.Generator, side: tuple[int, int],
                                fraction: tuple[float, float], sigma: tuple[float, float],
                                noise: float, at: int) -> np.ndarray:
    """Random blobs with speckle, and an 8×8 checkerboard at (``at``, ``at``): pixels that
    meet only at corners, on chunk lines when ``at`` is a multiple of the chunk size."""
    shape = (int(rng.integers(*side)), int(rng.integers(*side)))
    mask = _random_blobs(rng, shape, fraction=rng.uniform(*fraction), sigma=rng.uniform(*sigma))
    mask ^= rng.random(shape) < noise
    mask[at:at + 8, at:at + 8] = (np.add.outer(np.arange(8), np.arange(8)) % 2).astype(bool)
    return mask


@pytest.mark.parametrize("seed", range(8))
def test_pieces_join_into_the_unchunked_outline_vertex_for_vertex(seed: int) -> None:
    # pieces are joined by cancelling their shared edges, not by an overlay: the result must
    # be the unchunked outline exactly (same rings, same corners, none left on chunk lines),
    # also where pixels meet at a corner on a chunk line and a ring would touch itself there
    rng = np.random.default_rng(100 + seed)
    # corner contacts on the chunk lines of chunk_px 4 or 8
    mask = _blobs_with_corner_contacts(rng, (30, 90), (0.3, 0.7), (1, 3), 0.08, at=8)
    whole = tumor_polygons(mask, simplify_px=0)
    for chunk_px in (4, int(rng.integers(5, 16))):
        chunked = tumor_polygons(mask, simplify_px=0, chunk_px=chunk_px)
        assert all(p.is_valid for p in chunked)
        assert len(chunked) == len(whole)
        for a, b in zip(sorted(whole, key=_key), sorted(chunked, key=_key), strict=True):
            assert shapely.equals_exact(shapely.normalize(a), shapely.normalize(b), 0)


@pytest.fixture
def traced_chunks(monkeypatch) -> list[tuple[int, int]]:
    """The (row0, col0) of each chunk traced from now on, in order."""
    traced: list[tuple[int, int]] = []
    real = chunk_trace._trace_block

    def counting(mask, row0, col0):
        traced.append((row0, col0))
        return real(mask, row0, col0)

    monkeypatch.setattr(chunk_trace, "_trace_block", counting)
    return traced


def test_regions_retrace_only_the_chunks_whose_mask_changed(traced_chunks) -> None:
    traced = traced_chunks
    prob = np.zeros((128, 128), dtype=np.uint8)
    prob[10:120, 10:120] = 200  # one component over all 16 chunks of 32²
    prob[40:50, 40:50] = 0
    first = tumor_polygons_and_means(prob, chunk_px=32, regions=[(60, 60, 4, 4)])
    assert len(traced) == 16
    assert tumor_polygons_and_means(prob, chunk_px=32, regions=[(5, 5, 4, 4)])[0] == []
    traced.clear()
    prob[70:75, 100:110] = 0  # a new hole in chunk (2, 3) only
    second = tumor_polygons_and_means(prob, chunk_px=32, regions=[(60, 60, 4, 4)])
    assert traced == [(64, 96)]
    TRACES.clear()
    fresh = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=1.0)  # whole map: no memo
    assert len(TRACES) == 0
    assert len(second[0]) == len(fresh[0]) == 1
    assert shapely.equals_exact(second[0][0], fresh[0][0], 0)
    assert second[1].tolist() == fresh[1].tolist()
    assert len(first[0][0].interiors) + 1 == len(second[0][0].interiors)


def test_a_chunk_whose_mask_stayed_is_summed_again_not_traced(traced_chunks,
                                                              monkeypatch) -> None:
    """A stroke changes the probability of a whole window and the mask of few of its
    chunks: a chunk of new pixels but the same mask keeps its trace (memo, by the mask's
    digest) and its fragments, and only its pieces' sums are new."""
    traced = traced_chunks
    cut = []
    monkeypatch.setattr(splice_module, "cut_runs",
                        lambda *a, **k: cut.append(1) or cut_runs(*a, **k))
    prob = np.zeros((128, 128), dtype=np.uint8)
    prob[10:120, 10:120] = 200  # one component over all 16 chunks of 32²
    prob[40:50, 40:50] = 0
    first = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=1.0,
                                     regions=[(60, 60, 4, 4)])
    traced.clear()
    cut.clear()
    prob[70:75, 100:110] = 250  # other probability in chunk (2, 3), the same mask
    second = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=1.0,
                                      regions=[(60, 60, 4, 4)])
    assert traced == [] and cut == []
    assert shapely.equals_exact(first[0][0], second[0][0], 0)
    whole = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=1.0)  # no memo
    assert second[1].tolist() == whole[1].tolist() != first[1].tolist()
    assert second[1][0] == pytest.approx(
        prob[prob >= 128].astype(np.float64).sum() / 255 / (prob >= 128).sum(), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_spans_change_which_chunks_come_first_never_the_polygons(seed: int,
                                                                 monkeypatch) -> None:
    """``spans`` (where the components are expected: a refine round gives the previous
    round's outlines) only let the frontier walk process their chunks at once: with right,
    wrong, huge or empty spans the polygons and means are those found without, and right
    ones spare the walk its waves."""
    rng = np.random.default_rng(300 + seed)
    prob = (ndi.gaussian_filter(rng.random((160, 200)), 6) * 255 * 4 - 255 * 1.5)
    prob = np.clip(prob, 0, 255).astype(np.uint8)
    regions = [(int(rng.integers(0, 150)), int(rng.integers(0, 190)), 9, 7),
               (int(rng.integers(0, 150)), int(rng.integers(0, 190)), 3, 12)]
    TRACES.clear()
    want, want_means = tumor_polygons_and_means(prob, chunk_px=16, regions=regions)
    whole = tumor_polygons(prob, chunk_px=16)
    spans = {
        "right": want,
        "wrong": [shapely.box(0, 0, 10, 10), shapely.Point(150, 100).buffer(9)],
        "everything": [shapely.box(-5, -5, 400, 400)],
        "multi-part": [shapely.MultiPolygon(whole[:3])] if len(whole) >= 3 else whole,
        "none": [],
    }
    waves: list[int] = []
    leaks = merge._Merger.leaks

    def counted(self):
        waves.append(1)
        return leaks(self)

    monkeypatch.setattr(merge._Merger, "leaks", counted)
    for name, span in spans.items():
        waves.clear()
        got, means = tumor_polygons_and_means(prob, chunk_px=16, regions=regions, spans=span)
        assert shapely.to_wkb(got).tolist() == shapely.to_wkb(want).tolist(), name
        assert means.tolist() == want_means.tolist(), name
        if name == "right":
            assert len(waves) <= 2, "the components' chunks were processed at once"


@pytest.mark.parametrize("simplify_px", [0.0, 1.0])
def test_components_of_equal_area_and_top_left_come_in_one_order(simplify_px) -> None:
    """Two components of 15 px whose bounds both start at (0, 0): their order is the
    polygons' own (then by the other corner), not the order their chunks were met in, which
    a hint, the regions or a whole-map trace change (found by the second reader)."""
    m = np.zeros((16, 16), np.uint8)
    m[0:6, 0:2] = m[0:3, 2] = 255  # A
    m[0:8, 7] = m[7, 0:7] = 255  # B
    regions = [(0, 7, 1, 1), (5, 0, 1, 1)]
    TRACES.clear()
    plain, means = tumor_polygons_and_means(m, chunk_px=4, simplify_px=simplify_px,
                                            regions=regions)
    hinted, hinted_means = tumor_polygons_and_means(m, chunk_px=4, simplify_px=simplify_px,
                                                    regions=regions, spans=plain)
    whole = tumor_polygons(m, chunk_px=4, simplify_px=simplify_px)
    assert len(plain) == 2
    assert shapely.to_wkb(hinted).tolist() == shapely.to_wkb(plain).tolist()
    assert shapely.to_wkb(whole).tolist() == shapely.to_wkb(plain).tolist()
    assert hinted_means.tolist() == means.tolist()


def test_mean_of_a_component_does_not_depend_on_the_order_its_chunks_are_met() -> None:
    """A refine round meets a component's chunks from its windows outward, a whole-map
    trace in raster order; the float sums of the pieces must give the same mean to the bit."""
    for seed in range(8):
        prob = np.random.default_rng(seed).uniform(0.5, 1.0, (96, 96))  # one component, 9 chunks
        TRACES.clear()
        whole = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=0)[1]
        TRACES.clear()
        corner = tumor_polygons_and_means(prob, chunk_px=32, simplify_px=0,
                                          regions=[(90, 90, 1, 1)])[1]
        assert whole.tolist() == corner.tolist()


def _key(polygon: shapely.Polygon) -> tuple[float, float, float]:
    x0, y0, _, _ = polygon.bounds
    return (-polygon.area, y0, x0)


@pytest.mark.parametrize("seed", range(4))
def test_mean_probability_of_each_component_while_tracing(seed: int) -> None:
    """The mean over each component's pixels, however the chunks cut it, and in region mode
    for the components found there."""
    rng = np.random.default_rng(50 + seed)
    shape = (int(rng.integers(80, 160)), int(rng.integers(80, 160)))
    prob = (ndi.gaussian_filter(rng.random(shape), 3) * 255).astype(np.uint8)
    prob = np.clip((prob.astype(int) - 110) * 6, 0, 255).astype(np.uint8)
    labels, n = ndi.label(prob >= 128)
    assert n >= 2
    expected = ndi.mean(prob / 255.0, labels, np.arange(1, n + 1))
    for chunk_px in (1024, int(rng.integers(9, 40))):
        polygons, means = tumor_polygons_and_means(prob, simplify_px=0, chunk_px=chunk_px)
        assert len(polygons) == len(means) == n
        for polygon, mean in zip(polygons, means, strict=True):
            r, c = polygon.representative_point().coords[0][::-1]
            assert mean == pytest.approx(expected[labels[int(r), int(c)] - 1], abs=1e-12)
    box = (shape[0] // 3, shape[1] // 3, 20, 20)
    polygons, means = tumor_polygons_and_means(prob, simplify_px=1, chunk_px=16, region=box)
    wanted = set(np.unique(labels[box[0]:box[0] + 20, box[1]:box[1] + 20]).tolist()) - {0}
    assert len(polygons) == len(wanted)
    assert sorted(means.tolist()) == pytest.approx(sorted(expected[k - 1] for k in wanted))
    assert tumor_polygons_and_means(np.zeros((10, 10), np.uint8))[1].shape == (0,)


@pytest.mark.parametrize("seed", range(3))
def test_tracing_rows_as_they_are_written_gives_the_same_contours(seed: int) -> None:
    """Rows written (and announced) top to bottom in uneven steps, the last ones never
    announced: the same polygons and means as tracing the finished map, and no chunk row is
    read before it is final."""
    rng = np.random.default_rng(70 + seed)
    shape = (int(rng.integers(90, 200)), int(rng.integers(60, 160)))
    # blobs and specks (several tumors inside one chunk in every row, some under the
    # minimum area), each pixel its own value: a polygon paired with another's mean shows
    tumor = _random_blobs(rng, shape, 0.3, 3.0) ^ (rng.random(shape) < 0.02)
    final = np.where(tumor, rng.integers(128, 256, shape),
                     rng.integers(0, 128, shape)).astype(np.uint8)
    expected = tumor_polygons_and_means(final, chunk_px=16, simplify_px=0.5, min_area_px=4)
    written = np.zeros(shape, dtype=np.uint8)
    recording = RecordingArray(written)
    row = 0
    with RowStreamTracer(recording, chunk_px=16, simplify_px=0.5, min_area_px=4) as tracer:
        while row < shape[0] - 20:
            row = min(row + int(rng.integers(5, 50)), shape[0] - 20)
            written[:row] = final[:row]
            tracer.rows_final(row)
            for r0, _, rows, _ in list(recording.reads):
                assert r0 + rows <= row, "a row was read before it was final"
        written[:] = final
        polygons, means = tracer.result()
    assert len(polygons) == len(expected[0])
    assert all(shapely.equals_exact(p, q, 0) for p, q in zip(polygons, expected[0],
                                                              strict=True))
    assert np.array_equal(means, expected[1])


def test_streamed_tumors_are_spliced_once_closed_not_at_the_end(monkeypatch) -> None:
    """A tumor spanning chunks is spliced as soon as the rows below it are traced, a tumor
    inside one chunk finished as soon as its row is: only those of the last row of chunks
    are left for :meth:`RowStreamTracer.result` (its time is on ``wsiseg run``'s serial
    tail), and one below the minimum area is never spliced. The polygons are exactly the
    whole map's."""
    from wsiseg.contours.merge import _Merger

    prob = np.zeros((64, 64), np.uint8)
    prob[3:6, 20:50] = 220  # chunk row 0 alone, across three chunks
    prob[10:26, 10:41] = 200  # chunk rows 0-1
    prob[20:32, 45:60] = 190  # ends on chunk row 1's bottom line: closed by row 2, not in it
    prob[40:42, 14:18] = 210  # across two chunks, 8 px: under the minimum area
    prob[40:44, 40:44] = 255  # inside one chunk: never spliced, finished beside tracing
    prob[50:64, 5:41] = 180  # reaches the last chunk row (3)
    prob[56:60, 50:54] = 230  # inside one chunk of the last row: finished at the end
    expected = tumor_polygons_and_means(prob, chunk_px=16, simplify_px=1.0, min_area_px=10)
    calls: list[tuple[int, bool]] = []
    spliced, finish = _Merger.spliced, polygons_module._finish
    finished_at_end: list[int] = []

    def counted(self: _Merger, gids: list[int], simplify_px: float) -> tuple:
        calls.append((len(gids), in_result))
        return spliced(self, gids, simplify_px)

    def counted_finish(exact: list, *args: Any) -> tuple:
        finished_at_end.append(len(exact))
        return finish(exact, *args)

    monkeypatch.setattr(_Merger, "spliced", counted)
    monkeypatch.setattr(polygons_module, "_finish", counted_finish)  # only result() finishes
    in_result = False
    with RowStreamTracer(prob, chunk_px=16, simplify_px=1.0, min_area_px=10) as tracer:
        for row in (16, 32, 48):
            tracer.rows_final(row)
            while not all(future.done() for future in tracer._futures):
                time.sleep(0.001)
        in_result = True
        polygons, means = tracer.result()
    # the three upper tumors early, in the order they close; the lowest at the end
    assert [early for _, early in calls] == [False, False, False, True]
    assert finished_at_end == [1]  # the last row's tumor inside one chunk alone
    assert len(polygons) == len(expected[0]) == 6
    assert all(shapely.equals_exact(p, q, 0) for p, q in zip(polygons, expected[0], strict=True))
    assert np.array_equal(means, expected[1])


@pytest.mark.parametrize("seed", range(3))
def test_simplified_polygons_stay_within_one_pixel(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    mask = _random_blobs(rng, (150, 150), fraction=0.3, sigma=5)
    exact = tumor_polygons(mask, simplify_px=0, chunk_px=48)
    simple = tumor_polygons(mask, simplify_px=1.0, chunk_px=48)
    assert len(simple) == len(exact)
    assert sum(len(p.exterior.coords) for p in simple) < sum(len(p.exterior.coords) for p in exact)
    for s in simple:
        e = max(exact, key=lambda e: shapely.intersection(e, s).area)  # its component
        assert s.is_valid
        assert abs(s.area - e.area) <= e.length * 1.0
        assert shapely.hausdorff_distance(s, e, densify=0.05) <= 1.0 + 1e-9


@pytest.mark.parametrize("seed", range(12))
def test_simplification_by_chunk_is_valid_close_and_local(seed: int) -> None:
    # runs are simplified chunk by chunk with their vertices on chunk lines kept: every
    # polygon valid and within the tolerance of its exact outline, even with corner contacts
    # on chunk lines, and a change in one chunk moves no vertex outside it
    rng = np.random.default_rng(300 + seed)
    mask = _blobs_with_corner_contacts(rng, (50, 120), (0.2, 0.7), (1.5, 5), 0.03, at=16)
    shape = mask.shape
    chunk = int(rng.choice([8, 16, 24]))
    exact = tumor_polygons(mask, simplify_px=0, chunk_px=chunk)
    simple = tumor_polygons(mask, simplify_px=1.0, chunk_px=chunk)
    assert len(simple) == len(exact)
    assert all(p.is_valid and p.area > 0 for p in simple)
    for p in simple:
        e = max(exact, key=lambda e: shapely.intersection(e, p).area)
        assert shapely.hausdorff_distance(p, e, densify=0.05) <= 1.0 + 1e-9

    changed = mask.copy()
    r0, c0 = chunk * int(rng.integers(1, 3)), chunk * int(rng.integers(1, 3))
    changed[r0 + 2:r0 + chunk - 2, c0 + 2:c0 + chunk - 2] ^= True  # inside one chunk
    after = tumor_polygons(changed, simplify_px=1.0, chunk_px=chunk)

    def vertices_outside(polygons):
        xy = shapely.get_coordinates(np.asarray(polygons, dtype=object))
        out = ~((xy[:, 0] >= c0) & (xy[:, 0] <= c0 + chunk) & (xy[:, 1] >= r0)
                & (xy[:, 1] <= r0 + chunk))
        return {tuple(v) for v in xy[out]}

    # unless the change splits or joins components (which then group their runs anew),
    # no vertex outside the changed chunk moves
    before_labels, after_labels = ndi.label(mask)[0], ndi.label(changed)[0]
    outside = (before_labels > 0) & ~((np.arange(shape[0])[:, None] // chunk == r0 // chunk)
                                      & (np.arange(shape[1])[None, :] // chunk == c0 // chunk))
    pairs = {(int(p), int(q)) for p, q in zip(before_labels[outside], after_labels[outside],
                                              strict=True)}
    if len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs}):
        assert vertices_outside(after) == vertices_outside(simple)


def _spliced_and_joined(mask: np.ndarray, chunk: int, tolerance: float) -> list[tuple[Any, Any]]:
    """Each component over several chunks: spliced from its fragments, and joined whole then
    simplified."""
    merger = merge._Merger(mask, 0.5, (chunk, chunk), [(0, 0, *mask.shape)])
    for i in range(merger.grid[0]):
        for j in range(merger.grid[1]):
            merger.process(i, j)
    out = []
    for gids in merger.whole_components()[1]:
        if len(gids) > 1:
            exact = merger.joined(gids)
            spliced, area = merger.spliced(gids, tolerance)
            assert area == exact.area
            whole = _finish([exact], tolerance, 0.0, merger.block)[0][0]
            out.append((exact if spliced is None else spliced, whole))
    return out


@pytest.mark.parametrize("seed", range(10))
def test_a_component_spliced_from_its_chunks_is_the_one_simplified_whole(seed: int) -> None:
    # a refine round splices a large tumor from its chunks' simplified runs instead of joining
    # and simplifying it whole: the polygon must be the same vertex for vertex (rings, ring
    # starts, ring order), corner contacts on chunk lines and runs along them included
    rng = np.random.default_rng(500 + seed)
    if seed % 2:
        mask = _blobs_with_corner_contacts(rng, (30, 120), (0.2, 0.7), (1, 5), 0.05,
                                           at=int(rng.choice([4, 8, 16])))
    else:
        mask = _random_blobs(rng, (int(rng.integers(20, 150)), int(rng.integers(20, 150))),
                             fraction=rng.uniform(0.1, 0.9), sigma=rng.uniform(0.5, 6))
    pairs = []
    for chunk in (4, int(rng.integers(3, 40))):
        pairs += _spliced_and_joined(mask, chunk, float(rng.choice([1.0, 0.5, 0.99])))
    assert pairs
    for spliced, whole in pairs:
        assert shapely.equals_exact(spliced, whole, 0)


def test_components_on_chunk_lines_only_splice_as_simplified_whole() -> None:
    # boxes and holes whose every edge lies on a chunk line: fragments without runs
    box = np.zeros((20, 24), dtype=bool)
    box[4:16, 0:20] = True
    hole = box.copy()
    hole[8:12, 8:12] = False
    moved = hole.copy()
    moved[12:16, 4:8], moved[8:12, 4:8] = False, True
    pinch = np.zeros((16, 16), dtype=bool)
    pinch[:8, :8] = pinch[8:, 8:] = pinch[:8, 8:] = True  # a corner contact at (8, 8)
    pinch[4, 8] = pinch[3, 7] = False
    for mask in (box, hole, moved, pinch):
        for chunk in (2, 4, 8):
            pairs = _spliced_and_joined(mask, chunk, 1.0)
            assert pairs
            for spliced, whole in pairs:
                assert shapely.equals_exact(spliced, whole, 0)


def test_min_area_drops_small_fragments() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[40:43, 40:43] = True  # 9 px
    mask[50, 10] = True  # 1 px
    assert len(tumor_polygons(mask, simplify_px=0)) == 3
    kept = tumor_polygons(mask, simplify_px=0, min_area_px=10)
    assert [p.area for p in kept] == [400.0]
    # a fragment is judged whole, not per chunk: 9 px split over four chunks is kept at 9
    assert [p.area for p in tumor_polygons(mask, simplify_px=0, min_area_px=9,
                                           chunk_px=41)] == [400.0, 9.0]


# -- region mode -----------------------------------------------------------------------------


def test_region_returns_touching_polygons_whole() -> None:
    shape = (256, 256)
    mask = np.zeros(shape, dtype=bool)
    mask[10:14, 5:250] = True  # a long bar across eight chunks
    mask[14:200, 240:244] = True  # ... turning down through seven more
    mask[100:120, 20:40] = True  # a blob away from the region
    mask[150:160, 100:110] = True  # another one, inside the region
    prob = RecordingArray((mask * 255).astype(np.uint8))
    region = (0, 0, 40, 40)  # holds only the bar's left end
    polygons = tumor_polygons(prob, chunk_px=32, simplify_px=0, region=region)
    full = tumor_polygons(mask, simplify_px=0)
    assert len(polygons) == 1
    assert polygons[0].equals(full[0])  # the bar, whole, though mostly outside the region
    assert polygons[0].area == 4 * 245 + 186 * 4
    read = {(r // 32, c // 32) for r, c, _, _ in prob.reads}
    assert (3, 0) not in read and (4, 3) not in read  # chunks of the unrelated blobs
    assert len(read) < 64
    # a region around the second blob returns it alone
    (blob,) = tumor_polygons(mask, chunk_px=32, simplify_px=0, region=(140, 90, 30, 30))
    assert blob.equals(shapely.box(100, 150, 110, 160))
    assert tumor_polygons(mask, chunk_px=32, region=(60, 60, 20, 20)) == []


def test_several_regions_trace_each_component_once() -> None:
    mask = np.zeros((256, 256), dtype=bool)
    mask[10:14, 5:250] = True  # the bar of the test above, touched by both regions
    mask[150:160, 100:110] = True  # a blob in the second region
    mask[100:120, 20:40] = True  # and one in neither
    prob = RecordingArray((mask * 255).astype(np.uint8))
    regions = [(0, 0, 40, 40), (0, 200, 40, 40), (140, 90, 30, 30)]
    polygons = tumor_polygons(prob, chunk_px=32, simplify_px=0, regions=regions)
    full = tumor_polygons(mask, simplify_px=0)
    assert len(polygons) == 2  # the bar once, though two regions touch it, and the blob
    assert polygons[0].equals(full[0]) and polygons[1].equals(shapely.box(100, 150, 110, 160))
    chunks = [(r // 32, c // 32) for r, c, _, _ in prob.reads]
    assert len(chunks) == len(set(chunks))  # every chunk read once
    assert (3, 0) not in chunks  # not the blob that no region touches
    with pytest.raises(ValueError, match="region or regions"):
        tumor_polygons(mask, region=(0, 0, 1, 1), regions=[(0, 0, 1, 1)])


# -- zarr and memory -------------------------------------------------------------------------


def test_zarr_v3_large_array_reads_one_chunk_at_a_time(tmp_path) -> None:
    zarr = pytest.importorskip("zarr")
    side, chunk = 8192, 512
    array = zarr.create_array(store=tmp_path / "refined.zarr", shape=(side, side),
                              chunks=(chunk, chunk), dtype="uint8")
    rng = np.random.default_rng(7)
    expected = 0
    # blobs straddling chunk corners and borders; everything else is the fill value 0
    for r, c in [(512, 512), (3000, 1500), (4096, 4096), (6600, 7000), (8000, 100)]:
        blob = (_random_blobs(rng, (300, 300), fraction=0.4, sigma=6) * 200).astype(np.uint8)
        blob[_disc((300, 300), (150, 150), 60)] = 255
        r0, c0 = max(r - 150, 0), max(c - 150, 0)
        array[r0:r0 + 300, c0:c0 + 300] = blob
        expected += int((blob >= 128).sum())
    prob = RecordingArray(array)
    polygons = tumor_polygons(prob, simplify_px=0)
    assert max(rows * cols for _, _, rows, cols in prob.reads) <= (chunk + 2) ** 2
    assert len(prob.reads) == (side // chunk) ** 2  # each chunk read once, chunk-aligned
    assert sum(p.area for p in polygons) == expected
    assert all(p.is_valid for p in polygons)
    # the same from a numpy copy of the corner window, processed unchunked
    window = np.asarray(array[350:700, 350:700])
    near = [p for p in polygons if p.intersects(shapely.box(350, 350, 700, 700))]
    alone = tumor_polygons(window, simplify_px=0)
    assert sorted(p.area for p in near) == sorted(p.area for p in alone)


# -- stats and drawing -----------------------------------------------------------------------


def test_polygon_stats_mean_probability() -> None:
    prob = np.zeros((300, 300), dtype=np.uint8)
    prob[50:250, 40:260] = 200
    polygon = shapely.box(60, 70, 240, 230)  # inside the constant region
    stats = polygon_stats(prob, polygon)
    assert stats["area_px"] == 180 * 160
    assert stats["mean_probability"] == pytest.approx(200 / 255)
    # half over 200, half over 0, with a hole: compare with every pixel centre tested directly
    shape_with_hole = shapely.Polygon(
        [(150, 10), (290, 10), (290, 290), (150, 290)], [[(200, 100), (250, 100), (250, 200)]]
    )
    yy, xx = np.mgrid[:300, :300] + 0.5
    inside = shapely.contains_xy(shape_with_hole, xx, yy)
    stats = polygon_stats(RecordingArray(prob), shape_with_hole)
    assert stats["mean_probability"] == pytest.approx(prob[inside].mean() / 255)
    float_stats = polygon_stats(prob / 255.0, shape_with_hole)
    assert float_stats["mean_probability"] == pytest.approx(stats["mean_probability"])
    assert math.isnan(polygon_stats(prob, shapely.box(10.6, 10.6, 10.9, 10.9))["mean_probability"])


def test_polygon_stats_reads_only_the_bounding_box() -> None:
    prob = RecordingArray(np.full((2000, 2000), 255, dtype=np.uint8))
    stats = polygon_stats(prob, shapely.Point(1500, 500).buffer(100))
    assert stats["mean_probability"] == 1.0
    for r0, c0, rows, cols in prob.reads:
        assert r0 >= 399 and c0 >= 1399 and r0 + rows <= 601 and c0 + cols <= 1601


def test_draw_contours_changes_pixels_along_the_outline_only() -> None:
    rgb = np.full((100, 120, 3), 30, dtype=np.uint8)
    polygon = shapely.Polygon([(20, 20), (200, 20), (200, 160), (20, 160)],
                              [[(80, 60), (140, 60), (140, 120), (80, 120)]])
    out = draw_contours(rgb, [polygon], scale=0.5, color=(255, 0, 255), width_px=2)
    assert (rgb == 30).all()  # the input is not modified
    assert out.shape == rgb.shape and out.dtype == np.uint8
    changed = np.any(out != rgb, axis=2)
    assert changed.sum() > 2 * (90 + 70 + 30 + 30)  # both rings drawn
    assert (out[changed] == (255, 0, 255)).all()
    yy, xx = np.nonzero(changed)
    outline = shapely.affinity.scale(polygon, 0.5, 0.5, origin=(0, 0)).boundary
    distances = shapely.distance(outline, shapely.points(xx + 0.5, yy + 0.5))
    assert distances.max() <= 2.0  # within the line width of the outline


def test_draw_contours_draws_every_ring_of_every_part_as_pillow_draws_it() -> None:
    """All rings' coordinates taken at once draw the very pixels of drawing ring by ring:
    traced blobs with holes, a MultiPolygon, a sub-pixel ring (a dot)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(5)
    mask = _random_blobs(rng, (200, 240), fraction=0.45, sigma=2.0)
    polygons = tumor_polygons(mask, chunk_px=64, simplify_px=1.0)
    polygons += [shapely.MultiPolygon([shapely.box(3, 3, 9, 9), shapely.box(20, 3, 30, 9)]),
                 shapely.box(100, 100, 100.5, 100.5)]
    assert any(len(p.interiors) for p in polygons if p.geom_type == "Polygon")
    rgb = np.full((120, 140, 3), 200, dtype=np.uint8)
    image = Image.fromarray(rgb.copy())
    draw = ImageDraw.Draw(image)
    for geometry in polygons:
        for part in shapely.get_parts(geometry):
            for ring in (part.exterior, *part.interiors):
                xy = np.asarray(ring.coords) * 0.55 - 0.5
                draw.line([tuple(p) for p in xy.tolist()], fill=(255, 0, 255), width=2,
                          joint="curve")
    out = draw_contours(rgb, polygons, scale=0.55, color=(255, 0, 255), width_px=2)
    assert np.array_equal(out, np.asarray(image))


def test_draw_contours_refuses_what_is_not_a_polygon() -> None:
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="expected polygons, got a LineString"):
        draw_contours(rgb, [shapely.box(1, 1, 4, 4), shapely.LineString([(0, 0), (9, 9)])],
                      scale=1.0)


def test_ring_sizes_beyond_the_rotation_key_are_refused() -> None:
    """The start of each ring is found with one int64 key per vertex (cell × 2**24 +
    position): a ring of up to 2**24 vertices fits, one more does not."""
    one = np.zeros(1, dtype=np.intp)
    cell, kept = np.array([5], dtype=np.int64), np.array([True])
    assert _rotated(cell, kept, one, one, np.array([2**24])).tolist() == [0]
    with pytest.raises(ValueError, match="more than 2\\*\\*24 vertices"):
        _rotated(cell, kept, one, one, np.array([2**24 + 1]))
    with pytest.raises(ValueError, match="740 000 px"):
        _rotated(np.array([2**39], dtype=np.int64), kept, one, one, np.array([1]))


def test_ring_neighbours_are_each_vertexs_predecessor_and_successor_in_its_ring() -> None:
    """The O(n) neighbours of the rings' vertices, against searching the ring ids in
    themselves (what four places did), rings of 1 to 11 vertices with gaps in their ids."""
    from wsiseg.contours.join import ring_neighbours

    rng = np.random.default_rng(7)
    for _ in range(200):
        sizes = rng.integers(1, 12, rng.integers(0, 30))
        ids = np.sort(rng.choice(1000, len(sizes), replace=False))
        ring_id = np.repeat(ids, sizes).astype(np.intp)
        idx = np.arange(len(ring_id))
        first = np.searchsorted(ring_id, ring_id)
        last = np.searchsorted(ring_id, ring_id, side="right") - 1
        previous, following = ring_neighbours(ring_id)
        assert previous.tolist() == np.where(idx == first, last, idx - 1).tolist()
        assert following.tolist() == np.where(idx == last, first, idx + 1).tolist()
