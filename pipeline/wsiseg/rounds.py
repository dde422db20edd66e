"""Refine rounds kept inside the slide store: what each round overwrote, its contours.

Layout inside ``<slide-id>.zarr``:

- ``rounds/r<k>.geojson`` — the round's contours exactly as exported (QuPath frame);
  ``wsiseg export`` reads them from the store alone.
- ``rounds/r<k>.index.npz`` — beside it, what the next refine round needs without parsing
  the GeoJSON (whose size grows with the slide): each feature's id, geometry (WKB, QuPath
  frame), mean tumor probability and byte range in the GeoJSON, so kept features are copied
  verbatim into the next round's file. Plain arrays, loaded without pickle; an index that
  does not match its GeoJSON (size, mtime) is ignored and the GeoJSON parsed instead.
- zarr group ``history/r<k>`` — for every box the round changed, the ``refined`` and
  ``scribbles`` pixels from before it (attributes hold the boxes). ``wsiseg undo`` writes
  them back, so the previous round comes back exactly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from wsiseg.errors import WsisegError
from wsiseg.qupath import Annotation, is_wsiseg_feature, read_annotations
from wsiseg.store import SlideStore, StoreLock


@dataclass(frozen=True)
class Backup:
    """Pixels of one box before a round; ``refined`` None when the round did not touch it."""

    region: tuple[int, int, int, int]  # (row0, col0, rows, cols), working px
    refined: np.ndarray | None
    scribbles: np.ndarray


def round_geojson_path(store: SlideStore, round_k: int) -> Path:
    return store.path / "rounds" / f"r{round_k}.geojson"


def save_backup(store: SlideStore, round_k: int, backups: list[Backup]) -> None:
    group = store.group.require_group("history")
    name = f"r{round_k}"
    if name in group:
        del group[name]  # left by a round that failed before it was recorded
    g = group.create_group(name)
    boxes = []
    for i, b in enumerate(backups):
        arrays = {"scribbles": b.scribbles}
        if b.refined is not None:
            arrays["refined"] = b.refined
        for key, data in arrays.items():
            arr = g.create_array(f"{key}_{i}", shape=data.shape, dtype=data.dtype,
                                 chunks=data.shape, fill_value=0)
            arr[...] = data
        boxes.append({"region": list(b.region), "refined": b.refined is not None})
    g.attrs["boxes"] = boxes


def load_backup(store: SlideStore, round_k: int) -> list[Backup]:
    try:
        g = store.group["history"][f"r{round_k}"]
    except KeyError:
        raise WsisegError(f"{store.path}: round {round_k} has no undo record") from None
    out = []
    for i, box in enumerate(g.attrs["boxes"]):
        refined = np.asarray(g[f"refined_{i}"][...]) if box["refined"] else None
        out.append(Backup(tuple(box["region"]), refined, np.asarray(g[f"scribbles_{i}"][...])))
    return out


def polygons_of_round(store: SlideStore, round_k: int) -> list[shapely.Polygon]:
    """A round's tumor polygons in working px, read back from the store."""
    contours = load_round_contours(store, round_k)
    return [p for g in contours.working_geometries(store) for p in shapely.get_parts(g)]


@dataclass
class RoundContours:
    """A round's exported contours, as the next refine round uses them.

    ``geometries`` are in QuPath-frame level-0 px (as exported, before QuPath's 0.01 px
    snap), one per feature. ``feature_texts`` gives features' JSON back.
    """

    ids: list[str]
    geometries: np.ndarray  # of shapely geometries
    _annotations: list[Annotation] | None = None  # when parsed from the GeoJSON (no index)
    _source: Path | None = None
    _offsets: np.ndarray | None = None  # int64 (n + 1): byte ranges in _source
    _stamp: list[int] | None = None  # _source's (size, mtime_ns) when the index matched it

    def by_id(self) -> dict[str, shapely.Geometry]:
        return dict(zip(self.ids, self.geometries, strict=True))

    def working_geometries(self, store: SlideStore) -> np.ndarray:
        """The features' geometries in working px (one per feature, possibly multi-part)."""
        return store.frame.transform_geometry(self.geometries, "qupath", "working")

    def feature_texts(self, indices: list[int]) -> list[str]:
        """The Feature JSON texts of these features: byte for byte as written when read
        through the index, written anew from the parsed annotations otherwise."""
        from wsiseg.qupath import annotation_features

        if self._annotations is not None:
            chosen = [self._annotations[i] for i in indices]
            return [text for _, _, text in annotation_features(chosen)]
        data = self._source.read_bytes()  # one read; only the kept features are sliced
        st = self._source.stat()
        if [len(data), st.st_mtime_ns] != self._stamp:
            raise WsisegError(f"{self._source}: changed since its contours were read")
        off = self._offsets
        return [data[off[i] : off[i + 1] - 1].decode() for i in indices]


def write_round_index(
    store: SlideStore, round_k: int, ids: list[str], geometries: list[shapely.Geometry],
    offsets: list[int],
) -> None:
    """Write ``rounds/r<k>.index.npz`` for the GeoJSON just written (see the module doc)."""
    geojson = round_geojson_path(store, round_k)
    st = geojson.stat()
    wkb = [shapely.to_wkb(g) for g in geometries]
    ends = np.cumsum([len(b) for b in wkb], dtype=np.int64)
    path = _index_path(store, round_k)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp, ids=np.asarray(ids, dtype=str), offsets=np.asarray(offsets, dtype=np.int64),
        wkb=np.frombuffer(b"".join(wkb), dtype=np.uint8), wkb_end=ends,
        geojson=np.asarray([st.st_size, st.st_mtime_ns], dtype=np.int64),
    )
    os.replace(tmp, path)


def load_round_contours(store: SlideStore, round_k: int) -> RoundContours:
    """A round's contours from its index, or parsed from its GeoJSON when the index is
    missing or does not match the file."""
    geojson = round_geojson_path(store, round_k)
    if not geojson.exists():
        raise WsisegError(f"{store.path}: round {round_k} has no stored contours ({geojson.name})")
    index = _index_path(store, round_k)
    if index.exists():
        with np.load(index, allow_pickle=False) as z:
            st = geojson.stat()
            stamp = [st.st_size, st.st_mtime_ns]
            if z["geojson"].tolist() == stamp:
                wkb, ends = z["wkb"].tobytes(), z["wkb_end"]
                starts = np.concatenate([[0], ends[:-1]])
                geoms = shapely.from_wkb([wkb[a:b] for a, b in zip(starts, ends, strict=True)])
                return RoundContours(ids=z["ids"].tolist(), geometries=np.asarray(geoms),
                                     _source=geojson, _offsets=z["offsets"], _stamp=stamp)
    ours = [a for a in read_annotations(geojson) if a.id and is_wsiseg_feature(a)]
    return RoundContours(ids=[a.id for a in ours],
                         geometries=np.asarray([a.geometry for a in ours], dtype=object),
                         _annotations=ours)


def _index_path(store: SlideStore, round_k: int) -> Path:
    return store.path / "rounds" / f"r{round_k}.index.npz"


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
    """
    from wsiseg.outputs import round_contours

    if not regions:
        return list(range(len(previous))), [], np.zeros(0)
    near = shapely.union_all([_box(r, REPLACE_PX) for r in regions])
    replaced = shapely.intersects(previous, near)
    traced, means = round_contours(store, regions=[_grown(r, RETRACE_PX) for r in regions])
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
    pairs = shapely.STRtree(traced).query(features, predicate="intersects")
    if pairs.shape[1] == 0:
        return out
    inside = shapely.area(shapely.intersection(features[pairs[0]], traced[pairs[1]]))
    covered = np.bincount(pairs[0], weights=inside, minlength=len(features))
    return covered >= 0.5 * shapely.area(features)


def undo(store: SlideStore, out_dir: Path | None, slide_id: str) -> int:
    """Restore the round before the latest one exactly; returns the round now current."""
    from wsiseg.outputs import publish_round

    with StoreLock(store.path, "undo"):
        history = list(store.attrs.get("rounds") or [])
        if len(history) < 2:
            raise WsisegError(f"{store.path}: nothing to undo (only round 0, the run)")
        last = int(history[-1]["round"])
        for b in load_backup(store, last):
            r0, c0, rows, cols = b.region
            sl = np.s_[r0 : r0 + rows, c0 : c0 + cols]
            store["scribbles"][sl] = b.scribbles
            if b.refined is not None:
                store["refined"][sl] = b.refined
        history.pop()
        current = int(history[-1]["round"])
        stamp = time.strftime("%Y%m%d-%H%M%S")
        undone = round_geojson_path(store, last)
        if undone.exists():  # kept, renamed: nothing written is lost
            os.replace(undone, undone.with_name(f"r{last}.undone-{stamp}.geojson"))
        _index_path(store, last).unlink(missing_ok=True)  # derived from the file just renamed
        if out_dir is not None:
            out_round = out_dir / f"{slide_id}.r{last}.geojson"
            if out_round.exists():
                os.replace(out_round, out_dir / f"{slide_id}.r{last}.undone-{stamp}.geojson")
            publish_round(store, out_dir, slide_id, current)
        del store.group["history"][f"r{last}"]
        store.update_attrs(rounds=history, measurements=history[-1].get("measurements"))
        return current
