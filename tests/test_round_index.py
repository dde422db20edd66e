"""The round index lets a refine round write and measure only what changed (issue 16).

A round copies kept features' bytes from the previous file and keeps each feature's area on
tissue in the index, so it intersects only its new polygons with the tissue: the file must
be the one the full writer gives for the same features, and the measurements the ones
measured from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import shapely

from wsiseg import filecache, round_index, rounds, wkb_blocks
from wsiseg.outputs import annotations_for, measurements, round_contours, tissue_covered_px
from wsiseg.qupath import annotation_features, read_annotations, write_annotations
from wsiseg.refine import randomwalk_refiner, refine_round
from wsiseg.rounds import undo
from wsiseg.slide.tissue import share_of_mask_covered
from wsiseg.store import SlideStore

from conftest import CMU_SVS, real
from storekit import (
    blobs,
    feature,
    one_tumor,
    refined_low,
    run_store,
    stroke_away_from_the_tumor,
    write_export,
)

SLIDE_ID = "cmu"


@pytest.fixture()
def two_rounds(tmp_path, small_workflow):
    """Round 0 of the real SVS, then two refine rounds of one small stroke each."""
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    from scipy import ndimage

    rr, cc = np.nonzero(ndimage.binary_erosion(store.tissue_mask, iterations=2))
    rows, cols = store.frame.working_shape
    sy, sx = rows / store.tissue_mask.shape[0], cols / store.tissue_mask.shape[1]
    for k, pick in enumerate([0, len(rr) // 2]):
        x, y = (cc[pick] + 0.5) * sx, (rr[pick] + 0.5) * sy
        box = store.frame.transform_geometry(shapely.box(x - 6, y - 6, x + 6, y + 6),
                                             "working", "qupath")
        export = write_export(tmp_path / f"s{k}.geojson", [feature(box, "Tumor")])
        refine_round(store, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    assert len(store.attrs["rounds"]) == 3
    return store, out


def test_a_round_file_is_the_full_writers_output_byte_for_byte(two_rounds, tmp_path):
    """Kept features are copied from the previous file, new ones serialised: the result is
    what writing all the round's features anew gives."""
    store, out = two_rounds
    for k in (1, 2):
        record = rounds.round_geojson_path(store, k)
        annotations = read_annotations(record)
        assert annotations
        write_annotations(tmp_path / f"full{k}.geojson", annotations)
        assert (tmp_path / f"full{k}.geojson").read_bytes() == record.read_bytes()
        assert (out / f"{SLIDE_ID}.r{k}.geojson").read_bytes() == record.read_bytes()


def test_measurements_from_the_index_equal_those_measured_from_scratch(two_rounds):
    store, _ = two_rounds
    latest = rounds.load_round_contours(store, 2)
    assert latest.covered_px is not None and np.isfinite(latest.covered_px).all()
    polygons = rounds.polygons_of_round(store, 2)
    scratch = measurements(store, polygons, 2)
    recorded = store.attrs["measurements"]
    for key in ("tumor_mm2", "tumor_fraction", "foci", "largest_focus_mm2", "tissue_mm2"):
        assert recorded[key] == pytest.approx(getattr(scratch, key), abs=2e-4), key
    # per feature, the index holds what the whole-slide sum is made of
    whole = share_of_mask_covered(polygons, store.tissue_mask, store.frame.working_shape)
    per_feature = tissue_covered_px(store, polygons).sum()
    mask = store.tissue_mask
    rows, cols = store.frame.working_shape
    tissue_px = mask.sum() * (rows / mask.shape[0]) * (cols / mask.shape[1])
    assert per_feature / tissue_px == pytest.approx(whole, rel=1e-9, abs=1e-12)


def test_a_store_opened_again_reads_its_tissue_mask_once(two_rounds, monkeypatch):
    """A server opens the store anew for each stroke; the tissue mask, written once, is read
    once while its files stay the same (wsiseg.filecache)."""
    store, _ = two_rounds
    monkeypatch.setattr(filecache, "SETTLED_S", 0.0)
    first = SlideStore.open(store.path, mode="r").tissue_mask
    again = SlideStore.open(store.path, mode="r").tissue_mask
    assert again is first and not again.flags.writeable
    assert np.array_equal(first, np.asarray(store.array("tissue")[...]))


def test_the_polygons_of_features_are_their_parts_in_order():
    """A feature's Polygon is one polygon, a MultiPolygon's parts are several: what a
    round's measurements count as foci."""
    a, b, c = shapely.box(0, 0, 2, 2), shapely.box(5, 0, 6, 1), shapely.box(8, 8, 9, 9)
    got = rounds.polygons_of(np.asarray([a, shapely.MultiPolygon([b, c]), shapely.Polygon()],
                                        dtype=object))
    assert [p.wkt for p in got] == [a.wkt, b.wkt, c.wkt, "POLYGON EMPTY"]
    assert got[0] is a  # (not a copy: a large tumor's copy costs milliseconds a round)


def test_an_index_without_areas_on_tissue_is_measured_once(two_rounds):
    """Round 0 (written before any refine round) and older indexes have no areas on tissue:
    they are measured when a round needs them."""
    store, _ = two_rounds
    latest = rounds.load_round_contours(store, 2)
    everything = list(range(len(latest.ids)))
    recorded = latest.covered_of(store, everything)
    forgotten = dataclasses.replace(latest, covered_px=None)
    assert np.allclose(forgotten.covered_of(store, everything), recorded, rtol=1e-9)


def test_the_ids_of_a_round_read_from_the_index_or_the_file(two_rounds):
    store, _ = two_rounds
    ids = rounds.load_round_contours(store, 2).ids
    assert rounds.load_round_ids(store, 2) == ids
    rounds._index_path(store, 2).unlink()
    assert rounds.load_round_ids(store, 2) == ids


def test_polygons_inside_the_slide_are_written_as_if_clipped(two_rounds):
    """Clipping to the slide is skipped for polygons inside it (taken to QuPath's frame in
    one pass): the same bytes as clipped through level 0; those leaving it are clipped."""
    store, _ = two_rounds
    polygons, means = round_contours(store)
    assert polygons
    frame = store.frame
    w, h = frame.working_size
    polygons += [shapely.box(-2.5, 3, 9, 12), shapely.box(w - 6, h - 4, w + 3, h + 0.25)]
    means = [*means, 0.5, 0.5]
    fast = annotations_for(store, polygons, 1, SLIDE_ID, means)
    slide = shapely.box(0, 0, *frame.level0_size)
    clipped = [dataclasses.replace(a, geometry=frame.transform_geometry(
        shapely.intersection(frame.transform_geometry(p, "working", "level0"), slide),
        "level0", "qupath")) for a, p in zip(fast, polygons, strict=True)]
    assert annotation_features(fast) == annotation_features(clipped)
    assert shapely.bounds(fast[-1].geometry)[2] <= frame.level0_size[0] - frame.bounds_offset[0]


def test_a_round_kept_in_memory_is_the_one_read_back_from_its_files(two_rounds):
    """A refine round keeps the contours it wrote for the next round (a server's next stroke
    decodes nothing): they are exactly what its files give back."""
    store, _ = two_rounds
    kept = rounds.load_round_contours(store, 2)
    # from the round itself: it knew its features in working px, a read from disk does not
    assert kept.working_if_known() is not None
    round_index._RECENT.clear()
    read = rounds.load_round_contours(store, 2)
    assert read is not kept and read.working_if_known() is None
    assert kept.ids == read.ids
    assert kept.wkb_of(list(range(len(kept.ids)))) == read.wkb_of(list(range(len(read.ids))))
    assert list(shapely.to_wkb(kept.geometries)) == list(shapely.to_wkb(read.geometries))
    assert list(shapely.to_wkb(kept.working_geometries(store))) == list(
        shapely.to_wkb(read.working_geometries(store)))
    np.testing.assert_array_equal(kept.covered_px, read.covered_px)
    all_features = list(range(len(read.ids)))
    assert kept.feature_bytes(all_features) == read.feature_bytes(all_features)
    assert kept._data == rounds.round_geojson_path(store, 2).read_bytes()  # (sliced, not read)
    assert rounds.load_round_ids(store, 2) == read.ids


def test_the_features_a_round_wrote_are_answered_without_reading_its_file(
        two_rounds, monkeypatch):
    """A server answers a stroke with the round's new features: sliced from the bytes the
    round wrote (kept in memory), not from the file read again (its size follows the
    slide); the same texts as read from the file."""
    store, _ = two_rounds
    ids = set(rounds.load_round_ids(store, 2))
    record = rounds.round_geojson_path(store, 2)
    real_read = type(record).read_bytes

    def read_bytes(path):
        assert path != record, "the round's GeoJSON was read again"
        return real_read(path)

    monkeypatch.setattr(type(record), "read_bytes", read_bytes)
    from_memory = rounds.round_feature_texts(store, 2, ids)
    monkeypatch.undo()
    round_index._RECENT.clear()
    assert from_memory == rounds.round_feature_texts(store, 2, ids) and from_memory


def test_contours_kept_in_memory_are_not_used_once_their_files_are_replaced(two_rounds):
    store, _ = two_rounds
    kept = rounds.load_round_contours(store, 2)
    assert rounds.load_round_contours(store, 2) is kept
    index = store.path / "rounds" / "r2.index.npz"
    copy = index.with_name("copy.npz")
    copy.write_bytes(index.read_bytes())
    copy.replace(index)  # another process writing the same bytes: a new file
    again = rounds.load_round_contours(store, 2)
    assert again is not kept and again.ids == kept.ids


def test_area_on_tissue_is_the_exact_overlay_with_background_in_holes_and_inside():
    """``tissue_covered_px``: each polygon's area on the tissue mask's pixel boxes, exactly,
    whether a background box lies in a hole (nothing off), inside the polygon (its area
    off), across the outline or outside it; found from the outer rings, checked here
    against GEOS's overlay with the tissue's own boxes."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    mask = rng.random((40, 50)) > 0.15  # background boxes scattered everywhere
    mask[10:14, 10:14] = False  # a background block inside the ring's hole below
    store = SimpleNamespace(tissue_mask=mask, frame=SimpleNamespace(working_shape=(160, 200)))
    sy = sx = 4.0
    rr, cc = np.nonzero(mask)
    tissue = shapely.union_all(shapely.box(cc * sx, rr * sy, (cc + 1) * sx, (rr + 1) * sy))
    ring = shapely.Polygon([(20, 20), (90, 20), (90, 90), (20, 90)],
                           [[(38, 38), (60, 38), (60, 60), (38, 60)]])
    polygons = [ring, shapely.box(101.5, 7.25, 187, 150.5),
                shapely.MultiPolygon([shapely.box(0, 100, 30, 130),
                                      shapely.box(120, 152, 199, 159)]),
                shapely.box(41, 41, 55, 55)]  # wholly in the block of background: 0
    got = tissue_covered_px(store, polygons)
    want = [shapely.area(shapely.intersection(p, tissue)) for p in polygons]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
    assert got[3] == 0 and got[0] < ring.area  # background met inside the ring itself


def test_a_round_that_changes_no_contour_shares_the_files_of_the_round_before(
        tmp_path, small_workflow):
    """A stroke away from every tumor changes no contour: the round's stored GeoJSON (and,
    once the areas on tissue are known, its index) is a hard link to the round before's,
    the latest published file is left as it was, and the round's own published file is a
    file of its own. Undo then restores each round's files byte for byte."""
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, one_tumor)
    record = [rounds.round_geojson_path(store, k) for k in range(4)]
    index = [round_index._index_path(store, k) for k in range(4)]
    latest = out / f"{SLIDE_ID}.geojson"
    r0_bytes, latest_inode = record[0].read_bytes(), latest.stat().st_ino
    assert len(rounds.load_round_ids(store, 0)) == 1
    for k in (1, 2):
        export = stroke_away_from_the_tumor(store, tmp_path / f"s{k}.geojson", k)
        result = refine_round(store, export, out, SLIDE_ID, refined_low, "fixed")
        assert result.round == k and result.new_pixels > 0 and result.windows
    assert os.path.samefile(record[0], record[1]) and os.path.samefile(record[1], record[2])
    # round 0's index had no areas on tissue (round 1 measured them): written; round 2's
    # holds the very arrays of round 1's
    assert not os.path.samefile(index[0], index[1]) and os.path.samefile(index[1], index[2])
    assert latest.stat().st_ino == latest_inode and latest.read_bytes() == r0_bytes
    published = out / f"{SLIDE_ID}.r2.geojson"
    assert published.read_bytes() == r0_bytes and published.stat().st_nlink == 1
    # what the next round reads of round 2, from memory or from its (shared) files
    round_index._RECENT.clear()
    again = rounds.load_round_contours(store, 2)
    assert again.ids == rounds.load_round_ids(store, 0)
    assert again.feature_bytes([0]) == [r0_bytes[
        again._offsets[0]:again._offsets[1] - 1]]
    # a round that changes a contour (a tumor found where the stroke is) writes its own
    tumor = stroke_away_from_the_tumor(store, tmp_path / "t.geojson", 3)

    def high(s, windows, window_px):
        return [np.full((window_px, window_px), 0.9, np.float32) for _ in windows]

    assert refine_round(store, tumor, out, SLIDE_ID, high, "fixed").round == 3
    assert not os.path.samefile(record[2], record[3]) and record[3].read_bytes() != r0_bytes
    assert latest.read_bytes() == record[3].read_bytes()
    # undo: each round's files come back exactly, round 0's never changed
    undo(store, out, SLIDE_ID)
    assert latest.read_bytes() == r0_bytes and record[2].read_bytes() == r0_bytes
    assert undo(store, out, SLIDE_ID) == 1 and undo(store, out, SLIDE_ID) == 0
    assert record[0].read_bytes() == r0_bytes and latest.read_bytes() == r0_bytes
    assert rounds.load_round_ids(store, 0) == again.ids


def test_a_damaged_index_is_ignored_and_the_geojson_read(two_rounds):
    """The index is derived data: empty, cut short or of another file, the round's
    contours, ids and feature texts come from its GeoJSON, as they would without it."""
    store, _ = two_rounds
    index = round_index._index_path(store, 2)
    want = rounds.load_round_contours(store, 2)
    texts = rounds.round_feature_texts(store, 2, set(want.ids))
    good = index.read_bytes()
    for damaged in (b"", good[: len(good) // 2], b"PK\x03\x04 not a zip"):
        index.write_bytes(damaged)
        round_index._RECENT.clear()
        assert rounds.load_round_ids(store, 2) == want.ids
        parsed = rounds.load_round_contours(store, 2)
        assert parsed.ids == want.ids and parsed._annotations is not None  # from the GeoJSON
        assert [json.loads(t) for t in rounds.round_feature_texts(store, 2, set(want.ids))] \
            == [json.loads(t) for t in texts]


def _cold(store, round_k):
    round_index._RECENT.clear()
    return rounds.load_round_contours(store, round_k)


def test_an_index_writes_the_geometry_of_its_new_features_only(two_rounds):
    """A feature's WKB is written once, in the block of the round that made it; a later
    round's index refers to that block (its size follows the round's change, not the
    slide), and read cold gives every feature's geometry exactly as the round kept it."""
    store, _ = two_rounds
    kept = rounds.load_round_contours(store, 2)  # as the round wrote it (memory)
    cold = _cold(store, 2)
    assert cold.ids == kept.ids and cold._wkb == kept._wkb and cold._annotations is None
    assert cold._wkb_refs == kept._wkb_refs
    previous = _cold(store, 1)
    with np.load(round_index._index_path(store, 2)) as z:
        block = z["block"].tobytes()
        new_ids = set(kept.ids) - set(previous.ids)
        # only the features new in round 2 are in its block, in file order
        assert block == b"".join(w for i, w in zip(kept.ids, kept._wkb, strict=True)
                                 if i in new_ids)
        assert set(z["ref_rounds"].tolist()) <= {0, 1, 2}
    for feature_id, ref in zip(kept.ids, kept._wkb_refs, strict=True):
        made_in = 2 if feature_id in new_ids else ref[0]
        assert ref[0] == made_in
    assert any(ref[0] < 2 for ref in kept._wkb_refs)  # some geometry not written again


def test_an_index_whose_block_is_missing_or_another_is_not_used(two_rounds, tmp_path):
    """A block referred to by an index is part of it: missing, damaged, or rewritten with
    other geometry (its digest differs), the round's contours come from its GeoJSON."""
    store, _ = two_rounds
    want = _cold(store, 2)
    refs_to = {k for k, _, _ in want._wkb_refs if k != 2}
    assert refs_to
    earlier = round_index._index_path(store, min(refs_to))
    good = earlier.read_bytes()
    with np.load(earlier) as z:
        other = {name: z[name] for name in z.files}
    other["block"] = other["block"].copy()
    other["block"][-1] ^= 1  # one byte of geometry changed: another block ...
    rewritten = {**other, "block_digest": np.frombuffer(wkb_blocks.block_digest(
        other["block"].tobytes(), other["block_end"]), dtype=np.uint8)}  # ... and its digest
    for damaged in ("missing", b"", good[: len(good) // 2], other, rewritten):
        if isinstance(damaged, str):
            earlier.unlink()
        elif isinstance(damaged, dict):
            np.savez(earlier, **damaged)
        else:
            earlier.write_bytes(damaged)
        got = _cold(store, 2)
        assert got.ids == want.ids and got._annotations is not None  # parsed from the GeoJSON
        # the same geometry, as written: in canonical order, on the 0.01 grid
        assert shapely.equals_exact(shapely.normalize(got.geometries),
                                    shapely.normalize(want.geometries), 0.01).all()
    earlier.write_bytes(good)
    assert _cold(store, 2)._annotations is None


def test_an_index_from_before_shared_blocks_is_read_and_the_next_round_writes_its_own(
        two_rounds, tmp_path):
    """An index written by an earlier wsiseg holds every feature's WKB and no references:
    it is read as before, and the next round writes the geometry of the features it keeps
    from it into its own block (where they lie on disk is not known)."""
    store, out = two_rounds
    index = round_index._index_path(store, 2)
    want = _cold(store, 2)
    with np.load(index) as z:
        arrays = {name: z[name] for name in ("ids", "offsets", "geojson", "covered_px")}
    ends = np.cumsum([len(w) for w in want._wkb], dtype=np.int64)
    np.savez(index, wkb=np.frombuffer(b"".join(want._wkb), dtype=np.uint8), wkb_end=ends,
             **arrays)
    old = _cold(store, 2)
    assert old._annotations is None and old._wkb == want._wkb and old._wkb_refs is None
    rx, cx = np.nonzero(store.tissue_mask)
    rows, cols = store.frame.working_shape
    y = (rx[len(rx) // 3] + 0.5) * rows / store.tissue_mask.shape[0]
    x = (cx[len(cx) // 3] + 0.5) * cols / store.tissue_mask.shape[1]
    box = store.frame.transform_geometry(shapely.box(x - 6, y - 6, x + 6, y + 6),
                                         "working", "qupath")
    export = write_export(tmp_path / "s3.geojson", [feature(box, "Stroma")])
    refine_round(store, export, out, SLIDE_ID, randomwalk_refiner(130.0, 0.4), "rw")
    third = _cold(store, 3)
    assert all(k == 3 for k, _, _ in third._wkb_refs)  # nothing referred to round 2's index
    assert rounds.load_round_ids(store, 3) == third.ids


def test_an_index_with_blocks_is_not_read_as_one_from_before(two_rounds):
    """A wsiseg from before shared blocks reads an index's "wkb" as every feature's WKB in
    order: an index with blocks has none (so such a reader parses the GeoJSON, not pairing
    ids with the wrong geometry), and an index of the first form of blocks, which named its
    block "wkb", is not used by this one."""
    store, _ = two_rounds
    index = round_index._index_path(store, 2)
    want = _cold(store, 2)
    with np.load(index) as z:
        assert "wkb" not in z.files and "wkb_end" not in z.files
        arrays = {name: z[name] for name in z.files}
    early = {("wkb" if k == "block" else "wkb_end" if k == "block_end"
              else "wkb_digest" if k == "block_digest" else k): v for k, v in arrays.items()}
    np.savez(index, **early)
    got = _cold(store, 2)
    assert got.ids == want.ids and got._annotations is not None  # parsed from the GeoJSON


def test_a_served_answer_reads_the_file_when_it_changed_under_the_memory(two_rounds,
                                                                        monkeypatch):
    """The features a round wrote are answered from memory while its file is the one
    written; a file that changed between the check and the slicing is read, not an error."""
    store, _ = two_rounds
    recent = rounds.load_round_contours(store, 2)
    want = rounds.round_feature_texts(store, 2, set(recent.ids[:2]))
    stale = dataclasses.replace(recent, _stamp=[0, 0])  # its slicing now refuses
    monkeypatch.setattr(round_index, "_recall", lambda store, round_k: stale)
    assert rounds.round_feature_texts(store, 2, set(recent.ids[:2])) == want


def test_a_round_with_no_geometry_of_its_own_links_the_index_of_the_round_before(tmp_path):
    """Round k−1 wrote new features (its block holds them); round k changed no contour (its
    GeoJSON is a link to k−1's) and keeps them all by reference: its index is k−1's, linked,
    and read as round k's it gives the same geometry."""
    store = types.SimpleNamespace(path=tmp_path)
    (tmp_path / "rounds").mkdir()
    wkb = [shapely.to_wkb(shapely.box(i * 10, 0, i * 10 + 5, 5)) for i in range(3)]
    record = rounds.round_geojson_path(store, 0)
    record.write_bytes(b"x" * 40)
    placed = round_index.write_round_index(store, 0, ["a", "b", "c"], wkb, [0, 10, 20, 30])
    os.link(record, rounds.round_geojson_path(store, 1))
    again = round_index.write_round_index(store, 1, ["a", "b", "c"], wkb, [0, 10, 20, 30],
                                          twin=0, refs=placed)
    index = [round_index._index_path(store, k) for k in (0, 1)]
    assert again == placed and os.path.samefile(*index)
    with np.load(index[1]) as z:
        parts, refs = round_index._feature_wkb(store, {name: z[name] for name in z.files})
    assert parts == wkb and refs == placed
    # a round that keeps one feature by reference and writes another is not linked
    os.unlink(index[1])
    round_index.write_round_index(store, 1, ["a", "b", "c"], wkb, [0, 10, 20, 30], twin=0,
                                  refs=[*placed[:2], None])
    assert not os.path.samefile(*index)


def test_an_index_refers_to_a_bounded_number_of_earlier_blocks(tmp_path, monkeypatch):
    """Each round adds a feature (its own block); once an index would refer to more than
    MAX_EARLIER_BLOCKS earlier blocks it holds every feature's WKB itself, and later rounds
    refer to it: a cold read never opens more than that many other indexes."""
    monkeypatch.setattr(wkb_blocks, "MAX_EARLIER_BLOCKS", 3)
    store = types.SimpleNamespace(path=tmp_path)
    (tmp_path / "rounds").mkdir()
    ids, wkb, placed, referred = [], [], [], []
    for k in range(8):
        ids.append(f"f{k}")
        wkb.append(shapely.to_wkb(shapely.box(k * 10, 0, k * 10 + 5, 5)))
        rounds.round_geojson_path(store, k).write_bytes(b"x" * (10 * k + 10))
        offsets = list(range(0, 10 * len(ids) + 1, 10))
        placed = round_index.write_round_index(store, k, ids, wkb, offsets,
                                               refs=[*placed, None])
        with np.load(round_index._index_path(store, k)) as z:
            z = {name: z[name] for name in z.files}
        referred.append(len({r for r, _, _ in placed} - {k}))
        parts, refs = round_index._feature_wkb(store, z)
        assert parts == wkb and refs == placed
    assert max(referred) <= 3 and referred[4] == 0  # round 4 would have referred to 4
