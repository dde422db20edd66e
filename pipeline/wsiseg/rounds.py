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
    """A round's tumor polygons in working px, read back from its stored GeoJSON."""
    return [p for p, _ in contours_of_round(store, round_k)]


def round_annotations(store: SlideStore, round_k: int) -> list[Annotation]:
    """The annotations of a round's stored GeoJSON (QuPath frame), parsed once per round."""
    path = round_geojson_path(store, round_k)
    if not path.exists():
        raise WsisegError(f"{store.path}: round {round_k} has no stored contours ({path.name})")
    return read_annotations(path)


def contours_of_round(
    store: SlideStore, round_k: int, annotations: list[Annotation] | None = None
) -> list[tuple[shapely.Polygon, float | None]]:
    """A round's tumor polygons in working px with their recorded mean tumor probability
    (``None`` where the file has none), read back from the round's stored GeoJSON (or from
    its ``annotations`` when the caller has them already)."""
    from wsiseg.outputs import MEAN_PROBABILITY

    if annotations is None:
        annotations = round_annotations(store, round_k)
    frame = store.frame
    out = []
    for a in annotations:
        geom = frame.transform_geometry(a.geometry, "qupath", "working")
        mean = (a.measurements or {}).get(MEAN_PROBABILITY)
        mean = float(mean) if isinstance(mean, int | float) else None
        out.extend((part, mean) for part in shapely.get_parts(geom))
    return out


@dataclass
class RoundContours:
    """A round's exported contours, as a refine round uses them.

    ``geometries`` are in QuPath-frame level-0 px (as exported, before QuPath's 0.01 px
    snap); ``means`` NaN where unknown. ``feature_texts`` gives features' JSON back.
    """

    ids: list[str]
    geometries: np.ndarray  # of shapely geometries
    means: np.ndarray  # float64
    _texts: list[str] | None = None  # when parsed from the GeoJSON (no index)
    _source: Path | None = None
    _offsets: np.ndarray | None = None  # int64 (n + 1): byte ranges in _source

    def by_id(self) -> dict[str, shapely.Geometry]:
        return dict(zip(self.ids, self.geometries, strict=True))

    def working_polygons(self, store: SlideStore) -> list[tuple[shapely.Polygon, int]]:
        """Polygons in working px with the index of the feature they come from."""
        frame = store.frame
        out = []
        for i, geom in enumerate(self.geometries):
            working = frame.transform_geometry(geom, "qupath", "working")
            out.extend((part, i) for part in shapely.get_parts(working))
        return out

    def feature_texts(self, indices: list[int]) -> list[str]:
        """The Feature JSON texts of these features, byte for byte as written."""
        if self._texts is not None:
            return [self._texts[i] for i in indices]
        data = self._source.read_bytes()  # one read; only the kept features are sliced
        off = self._offsets
        return [data[off[i] : off[i + 1] - 1].decode() for i in indices]


def write_round_index(
    store: SlideStore, round_k: int, ids: list[str], geometries: list[shapely.Geometry],
    means: list[float], offsets: list[int],
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
        means=np.asarray(means, dtype=np.float64),
        geojson=np.asarray([st.st_size, st.st_mtime_ns], dtype=np.int64),
    )
    os.replace(tmp, path)


def load_round_contours(store: SlideStore, round_k: int) -> RoundContours:
    """A round's contours from its index, or parsed from its GeoJSON when the index is
    missing or does not match the file."""
    from wsiseg.outputs import MEAN_PROBABILITY
    from wsiseg.qupath import annotation_features

    geojson = round_geojson_path(store, round_k)
    if not geojson.exists():
        raise WsisegError(f"{store.path}: round {round_k} has no stored contours ({geojson.name})")
    index = _index_path(store, round_k)
    if index.exists():
        with np.load(index, allow_pickle=False) as z:
            st = geojson.stat()
            if z["geojson"].tolist() == [st.st_size, st.st_mtime_ns]:
                wkb, ends = z["wkb"].tobytes(), z["wkb_end"]
                starts = np.concatenate([[0], ends[:-1]])
                geoms = shapely.from_wkb([wkb[a:b] for a, b in zip(starts, ends, strict=True)])
                return RoundContours(ids=z["ids"].tolist(), geometries=np.asarray(geoms),
                                     means=z["means"], _source=geojson, _offsets=z["offsets"])
    ours = [a for a in read_annotations(geojson) if a.id and is_wsiseg_feature(a)]
    means = []
    for a in ours:
        mean = (a.measurements or {}).get(MEAN_PROBABILITY)
        means.append(float(mean) if isinstance(mean, int | float) else np.nan)
    texts = [text for _, _, text in annotation_features(ours)]
    return RoundContours(ids=[a.id for a in ours],
                         geometries=np.asarray([a.geometry for a in ours], dtype=object),
                         means=np.asarray(means, dtype=np.float64), _texts=texts)


def _index_path(store: SlideStore, round_k: int) -> Path:
    return store.path / "rounds" / f"r{round_k}.index.npz"


def recontour(
    store: SlideStore, previous: list[shapely.Polygon], regions: list[tuple[int, int, int, int]],
) -> tuple[list[int], list[shapely.Polygon]]:
    """Contours after a round: which ``previous`` polygons (working px) lie away from the
    changed regions and are kept as they are (``refined`` did not change under them), and the
    polygons contoured anew there (whole components that touch a region, each traced once)."""
    from wsiseg.outputs import round_polygons

    if not regions:
        return list(range(len(previous))), []
    # Exported polygons are simplified (≤ 1 px) and rounded: grow the regions by 2 px so a
    # polygon that touched a region is always replaced, never kept twice.
    boxes = [shapely.box(c0 - 2, r0 - 2, c0 + cols + 2, r0 + rows + 2)
             for r0, c0, rows, cols in regions]
    changed = shapely.union_all(boxes)
    hit = shapely.intersects(np.asarray(previous, dtype=object), changed) if previous else []
    kept = [i for i, h in enumerate(hit) if not h]
    return kept, round_polygons(store, regions=regions)


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
