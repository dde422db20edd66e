"""One refine round as a transaction: merge, refine, blend, re-trace, publish, record."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from wsiseg import rounds
from wsiseg.errors import WsisegError
from wsiseg.journal import Transaction
from wsiseg.outputs import measurements, tissue_covered_px
from wsiseg.refine.refiners import Refiner
from wsiseg.refine.scribbles import ai_counts, load_scribbles, rasterize_new
from wsiseg.refine.windows import affected_windows, blend_windows, box_slices, window_regions
from wsiseg.store import SlideStore, StoreLock, file_fingerprint

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RoundResult:
    round: int
    new_pixels: int
    windows: list[tuple[int, int]]  # window origins (row, col), working px
    geojson: Path | None
    tumor_mm2_before: float
    tumor_mm2_after: float
    seconds: float
    refine_s: float
    # AI contours of the export: edited, matched by overlap (ids replaced in QuPath), deleted
    edited_ai: int = 0
    matched_by_overlap: int = 0
    deleted_ai: int = 0


def refine_round(
    store: SlideStore, scribble_file: Path, out_dir: Path, slide_id: str, refiner: Refiner,
    refiner_name: str, runtime: str = "",
) -> RoundResult:
    """Run one refine round under the store's lock; see the module docstring. ``runtime``:
    what RefineNet ran on (``"openvino bf16"``, ...), recorded in the round's history entry.

    A transaction: merging the scribbles, refining, blending, re-tracing, publishing and the
    history entry all happen or none does. On any exception (or Ctrl-C) the store and the
    published files are rolled back to exactly what they were, here; after a kill, by the
    next command that opens the store. A store another process is changing is a
    ``StoreError`` at once; a read-only store is ``StoreError("store is read-only: …")``.
    """
    t0 = time.perf_counter()
    with StoreLock(store.path, "refine"):
        store.reload(recover=True)  # the store as it is now, under the lock
        if store.stage("guide") != "done" or not store.attrs.get("rounds"):
            raise WsisegError(
                f"{store.path}: this slide was never run; `wsiseg run` it before refining"
            )
        history = store.attrs["rounds"]
        round_k = int(history[-1]["round"]) + 1
        latest = rounds.load_round_contours(store, round_k - 1)  # read once, used twice
        scribbles = load_scribbles(scribble_file, store, latest)
        for w in scribbles.warnings:
            log.warning("%s", w)
        before_mm2 = float(history[-1].get("tumor_mm2", 0.0))
        digest = file_fingerprint(Path(scribble_file))
        nothing = RoundResult(round_k - 1, 0, [], None, before_mm2, before_mm2, 0.0, 0.0,
                              **ai_counts(scribbles))
        if any(r.get("scribble_sha256") == digest for r in history):
            # The very same export again: nothing new, whatever conflicts it had.
            return replace(nothing, seconds=time.perf_counter() - t0)
        rasters = rasterize_new(store, scribbles, scribble_file)
        new_count = sum(int((merged != before).sum()) for _, before, merged in rasters)
        if new_count == 0:  # the same export again, or only ignored classes
            return replace(nothing, seconds=time.perf_counter() - t0)
        window_px = store.workflow.refinenet.window_px
        context_px = store.workflow.refinenet.context_px
        shape = store.frame.working_shape
        windows = sorted({
            w for box, before, merged in rasters
            for w in affected_windows(merged != before, box, shape, window_px, context_px)
        })
        regions = window_regions(windows, window_px, shape)
        try:
            with Transaction(store.path, f"refine round {round_k}") as txn:
                with txn.protecting():  # (one flush of the journal for the three)
                    rounds.protect_boxes(txn, store, ["scribbles"],
                                         [box for box, _, _ in rasters])
                    rounds.protect_boxes(txn, store, ["refined"], [r for r, _ in regions])
                    rounds.protect_round_files(txn, store, round_k, out_dir, slide_id)
                entry, m, latest_geojson, refine_s = _apply_round(
                    store, round_k, rasters, windows, regions, refiner, latest, out_dir,
                    slide_id)
                seconds = time.perf_counter() - t0
                entry.update({
                    "refiner": refiner_name, **({"runtime": runtime} if runtime else {}),
                    "scribble_file": str(Path(scribble_file).resolve()),
                    "scribble_sha256": digest, "scribbles": scribbles.counts,
                    "unknown_classes": scribbles.unknown_classes, "new_pixels": new_count,
                    "tumor_mm2_before": before_mm2, "seconds": round(seconds, 3),
                })
                store.update_attrs(rounds=[*history, entry], measurements=_asdict(m))
                txn.commit()
        except BaseException as exc:
            store.reload()  # the attributes as rolled back on disk
            rounds.forget_round_contours(store, round_k)
            log.warning("%s: refine round %d stopped (%s); rolled back, the store and its "
                        "published files are as before it", store.path, round_k,
                        type(exc).__name__)
            raise
        return RoundResult(round_k, new_count, windows, latest_geojson, before_mm2, m.tumor_mm2,
                           seconds, refine_s, **ai_counts(scribbles))


def _apply_round(store, round_k, rasters, windows, regions, refiner, latest, out_dir, slide_id):
    """The writing half of a round (inside its transaction): merge the scribbles, refine and
    blend the windows, re-trace and publish. Returns the history entry so far, the round's
    measurements, the latest GeoJSON's path and the refiner's seconds."""
    window_px = store.workflow.refinenet.window_px
    context_px = store.workflow.refinenet.context_px
    rounds.save_backup(store, round_k, [
        rounds.Backup(region, np.asarray(store["refined"][box_slices(region)]),
                      np.asarray(store["scribbles"][box_slices(region)]))
        for region, _ in regions
    ] + [rounds.Backup(box, None, before) for box, before, _ in rasters])
    for box, _, merged in rasters:
        store["scribbles"][box_slices(box)] = merged
    t1 = time.perf_counter()
    probs = refiner(store, windows, window_px)
    refine_s = time.perf_counter() - t1
    prob_of = dict(zip(windows, probs, strict=True))
    for region, members in regions:
        old = np.asarray(store["refined"][box_slices(region)])
        blended = blend_windows(old, region, members, [prob_of[w] for w in members],
                                window_px, context_px)
        store["refined"][box_slices(region)] = blended
    previous = latest.working_geometries(store)
    kept, fresh, means = rounds.recontour(store, previous, [r for r, _ in regions])
    # areas on tissue: the kept features' from the index, only the new polygons' measured
    covered = (latest.covered_of(store, kept), tissue_covered_px(store, fresh))
    latest_geojson, _ = rounds.write_round_geojson(store, out_dir, slide_id, round_k, fresh,
                                                   kept=(latest, kept), means=means,
                                                   covered_px=covered)
    polygons = rounds.polygons_of(previous[kept]) + fresh
    m = measurements(store, polygons, round_k,
                     covered_px=float(covered[0].sum() + covered[1].sum()))
    entry = {
        "round": round_k, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "refine",
        "windows": len(windows), "regions": [list(r) for r, _ in regions],
        "tumor_mm2": m.tumor_mm2, "refine_seconds": round(refine_s, 3),
        "measurements": _asdict(m),
    }
    return entry, m, latest_geojson, refine_s


def _asdict(obj) -> dict:
    return asdict(obj)
