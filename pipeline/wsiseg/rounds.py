"""Refine rounds kept inside the slide store: what each round overwrote, its contours.

Layout inside ``<slide-id>.zarr``:

- ``rounds/r<k>.geojson`` — the round's contours exactly as exported (QuPath frame);
  ``wsiseg export`` reads them from the store alone.
- ``rounds/r<k>.index.npz`` — beside it, what the next refine round needs without parsing
  the GeoJSON (:mod:`wsiseg.round_index`, whose names are re-exported here).
- ``history/r<k>`` — for every box the round changed, the ``refined`` and ``scribbles``
  pixels from before it (:mod:`wsiseg.undo_record`, whose names are re-exported here).
  ``wsiseg undo`` writes them back, so the previous round comes back exactly.

A round and an undo are transactions (:mod:`wsiseg.journal`): every file and chunk a round
writes is protected before the first write (:func:`protect_round_files`), so an interrupted
round leaves the store and the published files exactly as before it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import shapely

from wsiseg.atomic import atomic_write_or_link
from wsiseg.contours import outer_filled
from wsiseg.errors import WsisegError
from wsiseg.journal import Transaction
from wsiseg.outputs import annotations_for, publish_round, published_paths, round_contours
from wsiseg.qupath import annotation_features, feature_collection_bytes
from wsiseg.qupath.text import remembering_ring_texts
from wsiseg.round_index import (
    RoundContours,
    _index_path,
    forget_round_contours,  # noqa: F401 (re-exported: refine, serve and the tests use rounds.*)
    load_round_contours,
    load_round_ids,  # noqa: F401
    remember_written_round,
    round_feature_texts,  # noqa: F401
    round_geojson_path,
    write_round_index,
)
from wsiseg.store import SlideStore, StoreLock
from wsiseg.undo_record import Backup, load_backup, save_backup  # noqa: F401 (re-exported)


def polygons_of_round(store: SlideStore, round_k: int) -> list[shapely.Polygon]:
    """A round's tumor polygons in working px, read back from the store."""
    return polygons_of(load_round_contours(store, round_k).working_geometries(store))


def polygons_of(geometries: Sequence[shapely.Geometry]) -> list[shapely.Polygon]:
    """The polygons of features' geometries, in order: a Polygon itself, a MultiPolygon's
    parts (``shapely.get_parts`` would copy each Polygon: 2.7 ms a round for the 67-Mpx
    bench slide's largest tumor)."""
    out: list[shapely.Polygon] = []
    for geometry in geometries:
        if geometry.geom_type == "Polygon":
            out.append(geometry)
        else:
            out.extend(shapely.get_parts(geometry))
    return out


#: Features within this many working px of a changed region are replaced (see recontour).
REPLACE_PX = 2
#: ... and the components within this many px traced again: one more than the polygons' 1 px.
RETRACE_PX = REPLACE_PX + 1


def recontour(
    store: SlideStore, previous: np.ndarray, regions: list[tuple[int, int, int, int]],
) -> tuple[list[int], list[shapely.Polygon], np.ndarray]:
    """Contours after a round, from the previous round's features (working px, one geometry
    each) and the regions whose ``refined`` changed (row0, col0, rows, cols).

    Returns the indices of the features kept as they are, the polygons traced anew (whole
    components, each once) and their mean probabilities. Nothing is lost and nothing is
    there twice:

    - a feature within :data:`REPLACE_PX` of a region is replaced: exported polygons lie
      within 1 px of their components' outlines (simplified, rounded), so every component
      that touches a region, or merges with or splits from one that does, has its features
      there;
    - every component reaching within :data:`RETRACE_PX` of a region is traced: it holds
      each replaced feature's component (1 px from its polygon), changed or not;
    - a feature outside the first margin whose component reached the second one is traced
      again as well: the traced polygon covering most of it replaces it.

    Cost: only the chunks whose tumor mask changed are traced and simplified again, those
    whose pixels changed summed again (the others come from the memo of
    :mod:`wsiseg.contours.cache`, simplification being local to a chunk by construction),
    and of the rest only those written in the last 2 s, or never seen by the memo, are read
    (the others are found by their files' stamps); a touched component is then spliced from
    its chunks' simplified fragments (:mod:`wsiseg.contours.splice`), the unchanged chunks'
    fragments from the memo. On the 67-Mpx bench slide tracing after a stroke on the tumor
    of 60 000 vertices and 9 000 holes costs 0.09–0.15 s in a warm server instead of 2.8 s
    cold. What stays whole-polygon: in the writer, its text and the clearance bound that
    proves its rounding valid (docs/benchmarks.md §7).
    """
    if not regions:
        return list(range(len(previous))), [], np.zeros(0)
    near = shapely.union_all([_box(r, REPLACE_PX) for r in regions])
    replaced = shapely.intersects(previous, near)
    # the replaced features show where the components to trace lie: their chunks are
    # processed at once, not found wave after wave
    traced, means = round_contours(store, regions=[_grown(r, RETRACE_PX) for r in regions],
                                   spans=previous[replaced])
    away = np.flatnonzero(~replaced)
    replaced[away] = _mostly_covered(previous[away], traced)
    return np.flatnonzero(~replaced).tolist(), traced, means


def _grown(region: tuple[int, int, int, int], px: int) -> tuple[int, int, int, int]:
    r0, c0, rows, cols = region
    return r0 - px, c0 - px, rows + 2 * px, cols + 2 * px


def _box(region: tuple[int, int, int, int], px: int) -> shapely.Polygon:
    r0, c0, rows, cols = _grown(region, px)
    return shapely.box(c0, r0, c0 + cols, r0 + rows)


def _mostly_covered(features: np.ndarray, polygons: list[shapely.Polygon]) -> np.ndarray:
    """bool per feature: at least half of its area lies in ``polygons`` (which are disjoint)."""
    out = np.zeros(len(features), dtype=bool)
    if not polygons or len(features) == 0:
        return out
    traced = np.asarray(polygons, dtype=object)
    # Preparing a large traced tumor for the test costs 18-35 ms (its holes' vertices):
    # first the features' bounding boxes against the outer rings filled (2-3 ms: GEOS
    # tests rectangles fast), and only the features left against the polygons.
    boxes = shapely.box(*shapely.bounds(features).T)
    polygon, feature = shapely.STRtree(boxes).query(outer_filled(traced),
                                                    predicate="intersects")
    if len(feature) == 0:
        return out
    near, meeting = np.unique(feature), np.unique(polygon)
    polygon, feature = shapely.STRtree(features[near]).query(traced[meeting],
                                                             predicate="intersects")
    if len(feature) == 0:  # as before: no feature met, none covered (not even one of no area)
        return out
    polygon, feature = meeting[polygon], near[feature]
    inside = shapely.area(shapely.intersection(features[feature], traced[polygon]))
    covered = np.bincount(feature, weights=inside, minlength=len(features))
    return covered >= 0.5 * shapely.area(features)


def write_round_geojson(
    store: SlideStore, out_dir: Path, slide_id: str, round_k: int,
    polygons: list[shapely.Polygon] | None = None,
    kept: tuple[RoundContours, list[int]] | None = None,
    means: Sequence[float] | None = None,
    covered_px: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Path, list[shapely.Polygon]]:
    """Write round k's contours into the store (``rounds/r<k>.geojson``, the record, and its
    index) and publish them as ``<slide-id>.r<k>.geojson`` and ``<slide-id>.geojson`` (the
    latest). ``kept``: features of the previous round that this round keeps, copied byte for
    byte (a refine round's cost then follows the changed regions, not the slide);
    ``polygons`` are then only the new ones, ``means`` their mean probabilities (NaN: measure
    it). Without ``polygons`` the whole of ``refined`` is contoured. ``covered_px``: the
    kept features' and the new polygons' areas on tissue (working px²), recorded in the
    index for the next round's measurements."""
    if polygons is None:
        polygons, means = round_contours(store)
    annotations = annotations_for(store, polygons, round_k, slide_id, means)
    texts: list[str | bytes] = []
    ids, wkb, covered, geometries, refs = [], [], [], [], []
    kept_covered, new_covered = covered_px if covered_px is not None else (None, None)
    kept_working = None
    if kept is not None:
        previous, indices = kept
        texts += previous.feature_bytes(indices)
        ids += [previous.ids[i] for i in indices]
        wkb += previous.wkb_of(indices)
        refs += previous.wkb_refs_of(indices)  # (their WKB is not written again)
        covered += (list(kept_covered) if kept_covered is not None
                    else [np.nan] * len(indices))
        at = np.asarray(indices, dtype=np.intp)
        geometries += list(previous.geometries[at])
        known = previous.working_if_known()
        if known is not None:
            kept_working = list(known[at])
    n_kept = len(geometries)
    # a refine round's new features are mostly rings the round before wrote already
    with remembering_ring_texts() if kept is not None else contextlib.nullcontext():
        features = annotation_features(annotations)
    for index, feature_id, text in features:
        texts.append(text)
        ids.append(feature_id)
        geometries.append(annotations[index].geometry)
        wkb.append(shapely.to_wkb(geometries[-1]))
        refs.append(None)
        covered.append(new_covered[index] if new_covered is not None else np.nan)
    record = round_geojson_path(store, round_k)
    record.parent.mkdir(exist_ok=True)
    data, offsets = feature_collection_bytes(texts)
    # A round that changed no contour (a stroke away from every tumor) has the very bytes of
    # the round before: its record and index then share that round's files (1.6 MB each
    # not written on a 67-Mpx slide); the published copies are still files of their own.
    linked = atomic_write_or_link(record, data, round_geojson_path(store, round_k - 1))
    placed = write_round_index(store, round_k, ids, wkb, offsets, covered,
                               twin=round_k - 1 if linked else None, refs=refs)
    working = None
    if kept_working is not None:  # transforms are per coordinate: the same as all at once
        working = kept_working + list(store.frame.transform_geometry(
            _objects(geometries[n_kept:]), "qupath", "working"))
    if kept is not None:  # a refine round's, for the next one: a server's next stroke
        remember_written_round(store, round_k, ids, _objects(geometries), wkb, offsets,
                               covered, None if working is None else _objects(working), data,
                               placed)
    return publish_round(record, out_dir, slide_id, round_k, data), polygons


def _objects(items: list) -> np.ndarray:
    """A 1-D object array of these items (geometries; never split into their parts)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def protect_round_files(
    txn: Transaction, store: SlideStore, round_k: int, out_dir: Path | None, slide_id: str,
) -> None:
    """Protect every file a round k writes besides ``scribbles``/``refined`` chunks: its undo
    record (``history/r<k>``, or ``history`` when there is none yet), its contours and index,
    the store's attributes (copied: zarr writes ``zarr.json`` too, and not every zarr
    version replaces it by a rename), and its published files in ``out_dir`` (hard-linked
    where the file system allows: :func:`publish_round` only ever replaces them by a
    rename)."""
    history = store.path / "history"
    undo_record = [history / f"r{round_k}", history / "zarr.json"] if history.is_dir() else [
        history]
    txn.protect([*undo_record, round_geojson_path(store, round_k), _index_path(store, round_k),
                 store.path / "zarr.json"])
    if out_dir is not None:
        txn.protect(published_paths(out_dir, slide_id, round_k), replaced_by_rename=True)


def protect_boxes(txn: Transaction, store: SlideStore, names: Sequence[str],
                  boxes: Sequence[tuple[int, int, int, int]]) -> None:
    """Protect the chunks of the arrays ``names`` that writes of ``boxes`` touch."""
    for name in names:
        txn.protect_chunks(store[name], store.path / name, boxes)


def undo(store: SlideStore, out_dir: Path | None, slide_id: str) -> int:
    """Restore the round before the latest one exactly; returns the round now current.

    All or nothing: interrupted, the store and the published files stay at the latest round.
    """
    with StoreLock(store.path, "undo"):
        store.reload(recover=True)  # another process may have changed it since it was opened
        history = list(store.attrs.get("rounds") or [])
        if len(history) < 2:
            raise WsisegError(f"{store.path}: nothing to undo (only round 0, the run)")
        last = int(history[-1]["round"])
        backups = load_backup(store, last)
        current = int(history[-2]["round"])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        undone = round_geojson_path(store, last)
        kept_as = undone.with_name(f"r{last}.undone-{stamp}.geojson")
        try:
            with Transaction(store.path, f"undo of round {last}") as txn:
                with txn.protecting():
                    protect_boxes(txn, store, ["scribbles", "refined"],
                                  [b.region for b in backups])
                    protect_round_files(txn, store, last, out_dir, slide_id)
                    txn.protect([kept_as])
                    if out_dir is not None:
                        out_round = published_paths(out_dir, slide_id, last)[0]
                        out_kept = out_dir / f"{slide_id}.r{last}.undone-{stamp}.geojson"
                        txn.protect([*published_paths(out_dir, slide_id, current), out_kept],
                                    replaced_by_rename=True)
                for b in backups:
                    r0, c0, rows, cols = b.region
                    sl = np.s_[r0 : r0 + rows, c0 : c0 + cols]
                    store["scribbles"][sl] = b.scribbles
                    if b.refined is not None:
                        store["refined"][sl] = b.refined
                history.pop()
                if undone.exists():  # kept, renamed: nothing written is lost
                    os.replace(undone, kept_as)
                _index_path(store, last).unlink(missing_ok=True)  # derived from that file
                if out_dir is not None:
                    if out_round.exists():
                        os.replace(out_round, out_kept)
                    publish_round(round_geojson_path(store, current), out_dir, slide_id, current)
                del store.group["history"][f"r{last}"]
                store.update_attrs(rounds=history, measurements=history[-1].get("measurements"))
                txn.commit()
        finally:
            store.reload()  # the attributes on disk, whether committed or rolled back
        return current
