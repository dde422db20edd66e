"""Refine rounds kept inside the slide store: what each round overwrote, its contours.

Layout inside ``<slide-id>.zarr``:

- ``rounds/r<k>.geojson`` — the round's contours exactly as exported (QuPath frame);
  ``wsiseg export`` and the next refine read them from the store alone.
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


def polygons_by_id(annotations: list[Annotation]) -> dict[str, shapely.Geometry]:
    """Our contours among ``annotations`` by feature id (QuPath frame), to spot edits."""
    return {a.id: a.geometry for a in annotations if a.id and is_wsiseg_feature(a)}


def recontour(
    store: SlideStore, previous: list[tuple[shapely.Polygon, float | None]],
    regions: list[tuple[int, int, int, int]],
) -> list[tuple[shapely.Polygon, float | None]]:
    """Contours after a round: previous polygons away from the changed regions are kept with
    their mean probability (``refined`` did not change under them); the regions are contoured
    anew (whole components that touch them), their mean left ``None`` to be measured."""
    from wsiseg.outputs import round_polygons

    if not regions:
        return list(previous)
    # Exported polygons are simplified (≤ 1 px) and rounded: grow the regions by 2 px so a
    # polygon that touched a region is always replaced, never kept twice.
    boxes = [shapely.box(c0 - 2, r0 - 2, c0 + cols + 2, r0 + rows + 2)
             for r0, c0, rows, cols in regions]
    changed = shapely.union_all(boxes)
    kept = [(p, m) for p, m in previous if not shapely.intersects(p, changed)]
    fresh = round_polygons(store, regions=regions)  # each component traced once
    contours = kept + [(p, None) for p in fresh]
    contours.sort(key=lambda pm: -pm[0].area)
    return contours


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
        if out_dir is not None:
            out_round = out_dir / f"{slide_id}.r{last}.geojson"
            if out_round.exists():
                os.replace(out_round, out_dir / f"{slide_id}.r{last}.undone-{stamp}.geojson")
            publish_round(store, out_dir, slide_id, current)
        del store.group["history"][f"r{last}"]
        store.update_attrs(rounds=history, measurements=history[-1].get("measurements"))
        return current
