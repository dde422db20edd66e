"""Scribbles of a QuPath export: read, mapped to tumor / non-tumor, rasterised where new."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely

from wsiseg import rounds
from wsiseg.edits import Contours, ai_contour_changes
from wsiseg.errors import WsisegError
from wsiseg.qupath import (
    Annotation,
    ClassMapping,
    Label,
    is_wsiseg_feature,
    read_annotations_report,
)
from wsiseg.refine.windows import box_slices, clusters
from wsiseg.scribbles.raster import merge_scribbles, rasterize_labels
from wsiseg.store import SlideStore

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
    for x0, y0, x1, y1 in clusters(bounds, pad):
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
        before = np.asarray(store["scribbles"][box_slices(box)])
        new = merge_scribbles(stroke_px, edit_px)  # a stroke and an edit that disagree → 0
        out.append((box, before, merge_scribbles(before, new)))
    return out


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


def ai_counts(scribbles: ScribbleSet) -> dict[str, int]:
    c = scribbles.counts
    return {"edited_ai": c["edited_ai"], "matched_by_overlap": c["ai_matched_by_overlap"],
            "deleted_ai": c["deleted_ai"]}
