"""One refine round: scribbles in, the windows they touch recomputed, contours out.

1. The QuPath export is read (:mod:`wsiseg.qupath`) and its classes mapped to tumor /
   non-tumor / ignore. Our own contours are not scribbles, except where the pathologist
   edited one (by geometry, :mod:`wsiseg.edits`): the area added counts as tumor, the area
   removed as non-tumor, and a contour of the latest round deleted from an export that holds
   others as non-tumor.
2. Scribbles are rasterised at the working resolution and merged into the store's
   ``scribbles`` array; only pixels that are new count.
3. Affected windows: a global grid of ``window_px`` windows with stride
   ``window_px − 2·context_px``, whose *cores* (the window minus ``context_px`` on each
   side) tile the slide; a window is affected when its core holds a new scribble pixel, so
   every new scribble is seen with at least ``context_px`` of context.
4. Each window is refined by RefineNet (RGB, ``guide``, FG/BG distance maps from all
   accumulated scribbles, encoded by :func:`wsiseg.scribbles.encode.encode_refine_input`,
   the function training uses) or by scikit-image's random walker, and blended into
   ``refined`` with feathered edges. ``guide`` is never modified.
5. Contours are recomputed for the affected region only, and the round's GeoJSON written.

Costs follow the scribbled area, not the slide. Every round keeps what it overwrote
(:mod:`wsiseg.rounds`), so ``wsiseg undo`` restores the previous round exactly.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import shapely

from wsiseg import rounds
from wsiseg.edits import Contours, ai_contour_changes
from wsiseg.errors import WsisegError
from wsiseg.journal import Transaction
from wsiseg.outputs import measurements
from wsiseg.qupath import (
    Annotation,
    ClassMapping,
    Label,
    is_wsiseg_feature,
    read_annotations_report,
)
from wsiseg.scribbles.encode import encode_refine_input
from wsiseg.scribbles.raster import merge_scribbles, rasterize_labels
from wsiseg.store import SlideStore, StoreLock, file_fingerprint, pad_value, whiten_glass

log = logging.getLogger(__name__)

# A scribble file is refused when less than this share of its scribbled area is on tissue:
# it most likely belongs to another slide.
MIN_ON_TISSUE = 0.5


@dataclass(frozen=True)
class ScribbleSet:
    """Scribbles of one export, in working pixels, with what was left out and why."""

    shapes: list[tuple[shapely.Geometry, int]]  # (geometry, +1 tumor / −1 non-tumor)
    edits: list[tuple[shapely.Geometry, int]]  # our contours' edits and deletions
    # annotations per outcome: tumor, non_tumor, ignored; AI contours: edited_ai,
    # ai_matched_by_overlap, deleted_ai (see wsiseg.edits)
    counts: dict[str, int]
    unknown_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


Refiner = Callable[[SlideStore, list[tuple[int, int]], int], list[np.ndarray]]


# -- 1. scribbles from a QuPath export -------------------------------------------------------
def load_scribbles(
    path: Path, store: SlideStore, latest: rounds.RoundContours | None = None
) -> ScribbleSet:
    """Parse a QuPath export into labelled working-pixel geometries.

    ``latest`` are the contours of the store's latest round (read from the store when not
    given): exported AI contours are compared with them by geometry (:mod:`wsiseg.edits`):
    edits, and deletions, become scribbles.
    """
    annotations, warnings = read_annotations_report(path)
    wf = store.workflow
    mapping = ClassMapping.from_workflow(wf.scribbles)
    frame = store.frame
    history = store.attrs.get("rounds") or []
    if latest is None and history:
        latest = rounds.load_round_contours(store, int(history[-1]["round"]))
    shapes: list[tuple[shapely.Geometry, int]] = []
    ours: list[Annotation] = []
    counts = {"tumor": 0, "non_tumor": 0, "ignored": 0}
    unknown: set[str] = set()
    for a in annotations:
        # QuPath 0.4 drops metadata: our class name tells our contours then.
        if is_wsiseg_feature(a, ai_class_name=wf.contours.class_name):
            ours.append(a)
            continue
        label = mapping.label_of(a.class_name)
        if label is None:
            unknown.add(str(a.class_name))
            counts["ignored"] += 1
            continue
        if label == Label.IGNORE:
            counts["ignored"] += 1
            continue
        counts["tumor" if label == Label.TUMOR else "non_tumor"] += 1
        shapes.append((frame.transform_geometry(a.geometry, "qupath", "working"), int(label)))

    def earlier() -> list[Contours]:  # read only for AI contours of earlier rounds
        return [_working_contours(store, rounds.load_round_contours(store, int(r["round"])))
                for r in reversed(history[:-1])]

    changes = ai_contour_changes(ours, frame, _working_contours(store, latest), earlier)
    counts |= {"edited_ai": changes.edited, "ai_matched_by_overlap": changes.matched_by_overlap,
               "deleted_ai": changes.deleted}
    if unknown:
        warnings = [*warnings, f"{path}: unknown classes ignored: {', '.join(sorted(unknown))}"]
    if changes.unmatched:
        warnings = [*warnings, f"{path}: {changes.unmatched} AI contour(s) match no contour of "
                               "this slide's rounds: ignored"]
    return ScribbleSet(shapes, changes.edits, counts, sorted(unknown), list(warnings))


def _working_contours(store: SlideStore, contours: rounds.RoundContours | None) -> Contours | None:
    if contours is None:
        return None
    return Contours(list(contours.ids), np.asarray(contours.working_geometries(store)))


# -- 2. rasterise and merge ------------------------------------------------------------------
def rasterize_new(
    store: SlideStore, scribbles: ScribbleSet, source: Path
) -> list[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """Rasterise the export, cluster by cluster; ``[(box, before, merged), ...]``.

    Scribbles are grouped into clusters of overlapping bounding boxes, so two strokes at
    opposite corners of a slide cost two small boxes, not the slide. ``box`` is
    (row0, col0, rows, cols) in working px, clipped to the slide; ``before`` the store's
    scribbles there, ``merged`` with the new ones added.
    """
    wf = store.workflow
    rows, cols = store.frame.working_shape
    line_px = max(1.0, wf.scribbles.line_width_um / wf.working_mpp)
    point_px = max(1.0, wf.scribbles.point_radius_um / wf.working_mpp)
    pad = math.ceil(max(line_px, point_px)) + 1
    strokes = [(g, label) for g, label in scribbles.shapes if not g.is_empty]
    edits = [(g, label) for g, label in scribbles.edits if not g.is_empty]
    if not strokes and not edits:
        return []
    bounds = shapely.bounds([g for g, _ in strokes + edits])
    if not np.all(np.isfinite(bounds)):
        raise WsisegError(f"{source}: scribble coordinates are not finite")
    slide_box = shapely.box(0, 0, cols, rows)
    if not any(shapely.intersects(g, slide_box) for g, _ in strokes + edits):
        raise WsisegError(f"{source}: every scribble lies outside the slide")
    drawn_boxes = []
    for x0, y0, x1, y1 in _clusters(bounds, pad):
        r0, c0 = max(0, math.floor(y0)), max(0, math.floor(x0))
        r1, c1 = min(rows, math.ceil(y1)), min(cols, math.ceil(x1))
        if r1 <= r0 or c1 <= c0:
            continue
        box = (r0, c0, r1 - r0, c1 - c0)
        here = _box_geom(box)
        drawn = [
            rasterize_labels([(g, lab) for g, lab in group if shapely.intersects(g, here)], box,
                             line_width_px=line_px, point_radius_px=point_px)
            for group in (strokes, edits)
        ]
        drawn_boxes.append((drawn[0], drawn[1], box))
    # Only the pathologist's own strokes can betray another slide's file: edits and deletions
    # are of this slide's own contours (matched by id or by overlap).
    _check_on_tissue(store, [(d, box) for d, _, box in drawn_boxes], source)
    out = []
    for stroke_px, edit_px, box in drawn_boxes:
        before = np.asarray(store["scribbles"][_sl(box)])
        new = merge_scribbles(stroke_px, edit_px)  # a stroke and an edit that disagree → 0
        out.append((box, before, merge_scribbles(before, new)))
    return out


def _clusters(bounds: np.ndarray, pad: float) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of groups of overlapping (padded) boxes, (x0, y0, x1, y1)."""
    boxes = shapely.box(bounds[:, 0] - pad, bounds[:, 1] - pad, bounds[:, 2] + pad,
                        bounds[:, 3] + pad)
    merged = shapely.get_parts(shapely.union_all(boxes))
    return [tuple(b) for b in shapely.bounds(merged)]


def _box_geom(box: tuple[int, int, int, int]) -> shapely.Geometry:
    return shapely.box(box[1], box[0], box[1] + box[3], box[0] + box[2])


def _check_on_tissue(store: SlideStore, drawn_boxes, source: Path) -> None:
    """Refuse scribbles that are mostly off tissue: likely another slide's file."""
    tissue = store.tissue_mask
    rows, cols = store.frame.working_shape
    on, total = 0, 0
    for drawn, box in drawn_boxes:
        rr, cc = np.nonzero(drawn)
        tr = np.minimum(((rr + box[0]) * tissue.shape[0]) // rows, tissue.shape[0] - 1)
        tc = np.minimum(((cc + box[1]) * tissue.shape[1]) // cols, tissue.shape[1] - 1)
        on += int(tissue[tr, tc].sum())
        total += rr.size
    if total == 0:
        return
    if on / total < MIN_ON_TISSUE:
        raise WsisegError(
            f"{source}: only {on / total:.0%} of the scribbled area lies on this slide's "
            f"tissue; is it the export of another slide? (store {store.path.name})"
        )


# -- 3. windows ------------------------------------------------------------------------------
def affected_windows(
    new_pixels: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int],
    window_px: int, context_px: int,
) -> list[tuple[int, int]]:
    """Origins (row, col) of the windows whose core holds a new scribble pixel.

    Parameters
    ----------
    new_pixels : ndarray of bool, shape (box rows, box cols)
    box : (row0, col0, rows, cols)
        Where ``new_pixels`` lies in the slide, working px.
    shape : (rows, cols)
        The slide's working shape.
    """
    stride = window_px - 2 * context_px
    if stride <= 0:
        raise WsisegError(f"refinenet.context_px must be below half of window_px ({window_px})")
    rr, cc = np.nonzero(new_pixels)
    if rr.size == 0:
        return []
    rr = rr + box[0]
    cc = cc + box[1]
    wr = _window_index(rr, stride, context_px, shape[0], window_px)
    wc = _window_index(cc, stride, context_px, shape[1], window_px)
    keys = np.unique(np.stack([wr, wc], axis=1), axis=0)
    return [
        (_window_origin(int(i), stride, shape[0], window_px),
         _window_origin(int(j), stride, shape[1], window_px))
        for i, j in keys
    ]


def _window_index(coord: np.ndarray, stride: int, context: int, size: int, window: int):
    last = max(0, math.ceil((size - window) / stride))
    return np.clip((coord - context) // stride, 0, last)


def _window_origin(index: int, stride: int, size: int, window: int) -> int:
    # The last window is pulled inside the slide; a slide smaller than a window starts at 0.
    return int(max(0, min(index * stride, size - window)))


def window_regions(
    windows: list[tuple[int, int]], window_px: int, shape: tuple[int, int]
) -> list[tuple[tuple[int, int, int, int], list[tuple[int, int]]]]:
    """Group overlapping windows: ``[(region (row0, col0, rows, cols), windows), ...]``."""
    if not windows:
        return []
    origins = np.asarray(windows, dtype=float)
    bounds = np.stack([origins[:, 1], origins[:, 0], origins[:, 1] + window_px,
                       origins[:, 0] + window_px], axis=1)
    out = []
    for x0, y0, x1, y1 in _clusters(bounds, 0.0):
        r0, c0 = int(y0), int(x0)
        r1, c1 = min(shape[0], int(y1)), min(shape[1], int(x1))
        members = [w for w in windows if r0 <= w[0] < r1 and c0 <= w[1] < c1]
        out.append(((r0, c0, r1 - r0, c1 - c0), members))
    return out


def feather_weight(window_px: int, context_px: int) -> np.ndarray:
    """float32 (P, P): 1 in the core, falling linearly to ~0 at the window's border."""
    ramp = np.minimum(1.0, (np.arange(window_px) + 0.5) / max(1, context_px))
    ramp = np.minimum(ramp, ramp[::-1]).astype(np.float32)
    return np.minimum.outer(ramp, ramp)


# -- 4. refiners -----------------------------------------------------------------------------
def read_window(array, origin: tuple[int, int], window_px: int, margin: int = 0) -> np.ndarray:
    """A window (plus margin) of a store array; beyond the slide it reads as glass (white)
    for ``image``, as the fill value (0) for the others."""
    rows, cols = array.shape[:2]
    r0, c0 = origin[0] - margin, origin[1] - margin
    size = window_px + 2 * margin
    out = np.full((size, size, *array.shape[2:]), pad_value(array), dtype=array.dtype)
    rs, cs = max(0, r0), max(0, c0)
    re, ce = min(rows, r0 + size), min(cols, c0 + size)
    if re > rs and ce > cs:
        out[rs - r0 : re - r0, cs - c0 : ce - c0] = array[rs:re, cs:ce]
    return whiten_glass(out, array)


def refinenet_refiner(network, batch_size: int, tta: bool = False) -> Refiner:
    """Refine windows with RefineNet, batch by batch.

    Parameters
    ----------
    network : wsiseg.runtime.Network
        RefineNet loaded once by the caller (:func:`wsiseg.runtime.load_network`, OpenVINO or
        torch); its ``card`` says how to encode the windows.
    batch_size : int
        Windows encoded and refined at once: at most this many encoded windows (6 × P² float32
        each) exist at any time, whatever the number of windows, so a scribble across the
        whole slide costs the memory of one batch plus the ``(P, P)`` float32 results.
    tta : bool
        The mean over the 8 flips / 90° rotations of each window (8× the network's time).
    """
    import torch

    from wsiseg.infer import dihedral_mean

    card = network.card
    kind = str(card.scribble_encoding.get("kind", "distance"))
    max_distance = float(card.scribble_encoding.get("max_distance_px", 64.0))
    mean = tuple(card.normalisation["mean"])
    std = tuple(card.normalisation["std"])
    batch_size = max(1, int(batch_size))

    def encode(store: SlideStore, origin: tuple[int, int], window_px: int) -> np.ndarray:
        margin = math.ceil(max_distance)  # distances see scribbles just outside the window
        rgb = read_window(store["image"], origin, window_px, margin)
        guide = read_window(store["guide"], origin, window_px, margin)
        scrib = read_window(store["scribbles"], origin, window_px, margin)
        x = encode_refine_input(rgb, guide, scrib, max_distance_px=max_distance,
                                scribble_kind=kind, mean=mean, std=std)
        return x[:, margin : margin + window_px, margin : margin + window_px]

    def refine(store: SlideStore, windows: list[tuple[int, int]], window_px: int):
        out: list[np.ndarray] = []
        for i in range(0, len(windows), batch_size):
            # Encoded, refined and dropped one batch at a time (np.stack copies the crops,
            # so the margins of this batch are freed with the list).
            batch = np.stack([encode(store, w, window_px) for w in windows[i : i + batch_size]])
            x = torch.from_numpy(batch)
            del batch
            with torch.inference_mode():
                prob = (dihedral_mean(lambda t: network(t)[:, 0], x) if tta
                        else network(x)[:, 0])
            out.extend(prob.float().cpu().numpy())
        return out

    return refine


def randomwalk_refiner(beta: float, confident_margin: float) -> Refiner:
    """The paper's RW baseline: scikit-image's random walker seeded by the scribbles and by
    confident GuideNet regions (probability within ``confident_margin`` of 0 or 1)."""
    from skimage.segmentation import random_walker

    def refine(store: SlideStore, windows: list[tuple[int, int]], window_px: int):
        out = []
        for origin in windows:
            rgb = read_window(store["image"], origin, window_px).astype(np.float32) / 255.0
            guide = read_window(store["guide"], origin, window_px).astype(np.float32) / 255.0
            scrib = read_window(store["scribbles"], origin, window_px)
            seeds = np.zeros(guide.shape, dtype=np.int32)
            seeds[guide >= 1.0 - confident_margin] = 1
            seeds[guide <= confident_margin] = 2
            seeds[scrib > 0] = 1  # scribbles override GuideNet's confidence
            seeds[scrib < 0] = 2
            if len(np.unique(seeds[seeds > 0])) < 2:
                # One label only: nothing to separate; follow the scribbles' class.
                out.append(np.full(guide.shape, 1.0 if (seeds == 1).any() else 0.0, np.float32))
                continue
            if not (seeds == 0).any():
                # Every pixel seeded (a confident GuideNet): nothing left to walk, and
                # random_walker would return its seeds' one-hot rather than probabilities.
                out.append((seeds == 1).astype(np.float32))
                continue
            with warnings.catch_warnings():
                # cg_j's tolerance lets probabilities stray ~1e-3 outside [0, 1]: clipped.
                warnings.simplefilter("ignore", UserWarning)
                prob = random_walker(rgb, seeds, beta=beta, mode="cg_j", tol=1e-3,
                                     channel_axis=-1, return_full_prob=True)
            out.append(np.clip(prob[0], 0.0, 1.0).astype(np.float32))
        return out

    return refine


# -- 5. one round ----------------------------------------------------------------------------
def refine_round(
    store: SlideStore, scribble_file: Path, out_dir: Path, slide_id: str, refiner: Refiner,
    refiner_name: str,
) -> RoundResult:
    """Run one refine round under the store's lock; see the module docstring.

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
                              **_ai_counts(scribbles))
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
                rounds.protect_boxes(txn, store, ["scribbles"], [box for box, _, _ in rasters])
                rounds.protect_boxes(txn, store, ["refined"], [r for r, _ in regions])
                txn.protect(rounds.round_paths(store, round_k, out_dir, slide_id))
                entry, m, latest_geojson, refine_s = _apply_round(
                    store, round_k, rasters, windows, regions, refiner, latest, out_dir,
                    slide_id)
                seconds = time.perf_counter() - t0
                entry.update({
                    "refiner": refiner_name, "scribble_file": str(Path(scribble_file).resolve()),
                    "scribble_sha256": digest, "scribbles": scribbles.counts,
                    "unknown_classes": scribbles.unknown_classes, "new_pixels": new_count,
                    "tumor_mm2_before": before_mm2, "seconds": round(seconds, 3),
                })
                store.update_attrs(rounds=[*history, entry], measurements=_asdict(m))
                txn.commit()
        except BaseException as exc:
            store.reload()  # the attributes as rolled back on disk
            log.warning("%s: refine round %d stopped (%s); rolled back, the store and its "
                        "published files are as before it", store.path, round_k,
                        type(exc).__name__)
            raise
        return RoundResult(round_k, new_count, windows, latest_geojson, before_mm2, m.tumor_mm2,
                           seconds, refine_s, **_ai_counts(scribbles))


def _apply_round(store, round_k, rasters, windows, regions, refiner, latest, out_dir, slide_id):
    """The writing half of a round (inside its transaction): merge the scribbles, refine and
    blend the windows, re-trace and publish. Returns the history entry so far, the round's
    measurements, the latest GeoJSON's path and the refiner's seconds."""
    window_px = store.workflow.refinenet.window_px
    context_px = store.workflow.refinenet.context_px
    rounds.save_backup(store, round_k, [
        rounds.Backup(region, np.asarray(store["refined"][_sl(region)]),
                      np.asarray(store["scribbles"][_sl(region)]))
        for region, _ in regions
    ] + [rounds.Backup(box, None, before) for box, before, _ in rasters])
    for box, _, merged in rasters:
        store["scribbles"][_sl(box)] = merged
    t1 = time.perf_counter()
    probs = refiner(store, windows, window_px)
    refine_s = time.perf_counter() - t1
    prob_of = dict(zip(windows, probs, strict=True))
    for region, members in regions:
        old = np.asarray(store["refined"][_sl(region)])
        blended = blend_windows(old, region, members, [prob_of[w] for w in members],
                                window_px, context_px)
        store["refined"][_sl(region)] = blended
    previous = latest.working_geometries(store)
    kept, fresh, means = rounds.recontour(store, previous, [r for r, _ in regions])
    latest_geojson, _ = rounds.write_round_geojson(store, out_dir, slide_id, round_k, fresh,
                                                   kept=(latest, kept), means=means)
    polygons = [p for g in previous[kept] for p in shapely.get_parts(g)] + fresh
    m = measurements(store, polygons, round_k)
    entry = {
        "round": round_k, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "refine",
        "windows": len(windows), "regions": [list(r) for r, _ in regions],
        "tumor_mm2": m.tumor_mm2, "refine_seconds": round(refine_s, 3),
        "measurements": _asdict(m),
    }
    return entry, m, latest_geojson, refine_s


def blend_windows(
    old: np.ndarray, region: tuple[int, int, int, int], windows: Iterable[tuple[int, int]],
    probs: Iterable[np.ndarray], window_px: int, context_px: int,
) -> np.ndarray:
    """Feathered blend of refined windows into ``old`` (uint8, the region's ``refined``)."""
    r0, c0, rows, cols = region
    acc = np.zeros((rows, cols), np.float32)
    wsum = np.zeros((rows, cols), np.float32)
    weight = feather_weight(window_px, context_px)
    for (wr, wc), prob in zip(windows, probs, strict=True):
        rs, cs = wr - r0, wc - c0
        h, w = min(window_px, rows - rs), min(window_px, cols - cs)
        acc[rs : rs + h, cs : cs + w] += weight[:h, :w] * prob[:h, :w]
        wsum[rs : rs + h, cs : cs + w] += weight[:h, :w]
    new = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
    alpha = np.minimum(wsum, 1.0)  # 1 inside, ramping to 0 at the union's border
    out = alpha * new + (1.0 - alpha) * (old.astype(np.float32) / 255.0)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _ai_counts(scribbles: ScribbleSet) -> dict[str, int]:
    c = scribbles.counts
    return {"edited_ai": c["edited_ai"], "matched_by_overlap": c["ai_matched_by_overlap"],
            "deleted_ai": c["deleted_ai"]}


def _sl(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    return slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3])


def _asdict(obj) -> dict:
    return asdict(obj)
