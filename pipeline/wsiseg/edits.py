"""What the pathologist changed in our AI contours, found by geometry, not by ids.

``export_scribbles.groovy`` exports every annotation of an image, our locked AI contours
included. Each exported AI contour is compared with the contour we wrote (the *original*):

- **Matching.** By id first: the latest round's contour with that id. QuPath may replace
  ids ("Update IDs? Yes" when a round is dragged onto an image holding an earlier one), so an
  AI contour whose id is unknown is the latest round's contour it overlaps best, at an IoU of
  at least :data:`MIN_MATCH_IOU`. An id of an earlier round (a stale copy left in the image)
  is compared with that round's contour. An AI contour with an unknown id that matches the
  latest round only with a change, but an earlier round's contour exactly, is an untouched
  stale copy.
- **Edits.** Area added to the original counts as tumor, area removed (and held by no other
  exported AI contour: a contour split in two) as non-tumor, but only where the boundary
  moved by :data:`TOLERANCE_WORKING_PX` or more: the difference is opened morphologically and
  only its parts that survive the opening are kept, *whole* (so an edit counts with the area
  QuPath reports for it). Coordinate rounding (QuPath writes 2
  decimals), another ring start or orientation, and the writer's 0.01 px snap are thinner
  than that and count as nothing.
- **Deletions.** When the export holds some of the latest round's contours but not others,
  the missing ones were deleted: their area, less what exported AI contours still cover, is
  non-tumor. An export holding none of them says nothing about deletions (the pathologist
  may not have imported the round). The export must hold a contour *new* in the latest
  round (its id, or by geometry, not an earlier round's contour): an image that still shows
  an earlier round holds the contours the latest round kept from it, but not the new ones,
  which it never deleted.

Everything here is in working pixels; exported geometries arrive in the QuPath frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely

from wsiseg.qupath import Annotation, Label
from wsiseg.slide.frame import Frame

#: A boundary moved by less than this (working px) is rounding, not an edit; the difference
#: must be at least this thick somewhere to count (a brush edit of one working pixel does).
TOLERANCE_WORKING_PX = 0.75

#: An AI contour whose id is unknown is matched to the contour it overlaps with at least this
#: intersection over union (a contour grown to twice its area still matches).
MIN_MATCH_IOU = 0.5


@dataclass(frozen=True)
class Contours:
    """One round's AI contours in working px: ``ids[k]`` and ``geometries[k]`` (shapely)."""

    ids: list[str]
    geometries: np.ndarray  # of shapely (Multi)Polygons, working px

    @cached_property
    def index(self) -> dict[str, int]:
        return {fid: k for k, fid in enumerate(self.ids)}

    @cached_property
    def tree(self) -> shapely.STRtree:
        return shapely.STRtree(self.geometries)


@dataclass(frozen=True)
class AiChanges:
    """The changes an export makes to our contours.

    ``edits`` are (geometry in working px, +1 tumor / −1 non-tumor); the counts are AI
    contours: ``edited`` with an edit, ``matched_by_overlap`` matched without a known id,
    ``deleted`` of the latest round missing from the export (with area left to mark),
    ``unmatched`` matched to nothing (ignored).
    """

    edits: list[tuple[shapely.Geometry, int]]
    edited: int = 0
    matched_by_overlap: int = 0
    deleted: int = 0
    unmatched: int = 0


def ai_contour_changes(
    exported: Sequence[Annotation], frame: Frame, latest: Contours | None,
    earlier: Callable[[], list[Contours]] = list,
    tolerance_px: float = TOLERANCE_WORKING_PX,
) -> AiChanges:
    """Compare exported AI contours with the originals (see the module docstring).

    Parameters
    ----------
    exported : sequence of Annotation
        The export's AI contours, QuPath-frame level-0 px.
    frame : Frame
        The slide's frame (QuPath → working px).
    latest : Contours or None
        The latest round's contours, working px; None: nothing to compare with.
    earlier : callable
        Returns the earlier rounds' contours (newest first); called only when an AI contour
        is not one of the latest round's.
    tolerance_px : float
        :data:`TOLERANCE_WORKING_PX`.
    """
    if latest is None or not exported:
        return AiChanges([], unmatched=len(exported))
    ex = np.asarray([_polygonal(frame.transform_geometry(a.geometry, "qupath", "working"))
                     for a in exported], dtype=object)
    index = latest.index
    # Overlaps are computed only for the AI contours whose id the latest round does not know.
    unknown = [k for k, a in enumerate(exported) if (a.id or "") not in index]
    by_overlap = dict(zip(unknown, _best_overlap(ex[unknown], latest), strict=True))
    olds_cache: list[list[Contours]] = []

    def olds() -> list[Contours]:  # the earlier rounds, read once and only when needed
        if not olds_cache:
            olds_cache.append(earlier())
        return olds_cache[0]

    edits: list[tuple[shapely.Geometry, int]] = []
    held: set[int] = set()  # latest contours the export holds
    shown: set[int] = set()  # ... of which these show the export holds the latest round
    unsure: list[tuple[int, int]] = []  # (k, i): unless ex[k] is an earlier round's copy
    edited = matched_by_overlap = unmatched = 0
    for k, a in enumerate(exported):
        i = index.get(a.id or "", -1)
        if i >= 0:
            changes = _changes(ex[k], latest.geometries[i], tolerance_px)
            held.add(i)
            shown.add(i)  # unless the id is an earlier round's too (checked below)
        elif (old := _by_id(olds(), a.id)) is not None:
            changes = _changes(ex[k], old, tolerance_px)  # a stale copy, ids kept
        elif (i := by_overlap[k]) >= 0:
            changes = _changes(ex[k], latest.geometries[i], tolerance_px)
            if changes and _earlier_by_overlap(ex[k], olds(), tolerance_px)[1]:
                continue  # an untouched copy of an earlier round, ids replaced
            matched_by_overlap += 1
            held.add(i)
            if changes:
                shown.add(i)
            else:
                unsure.append((k, i))
        else:
            stale, _ = _earlier_by_overlap(ex[k], olds(), tolerance_px)
            if stale is None:
                unmatched += 1
                continue
            changes = _changes(ex[k], stale, tolerance_px)  # an earlier round's, ids replaced
        changes = _still_uncovered(changes, k, ex, tolerance_px)
        if changes:
            edited += 1
            edits.extend(changes)
    missing = sorted(set(range(len(latest.ids))) - held)
    deleted = 0
    if missing and held:
        # Only a contour new in the latest round shows the export holds that round.
        earlier_ids = {fid for r in olds() for fid in r.ids}
        shown = {i for i in shown if latest.ids[i] not in earlier_ids}
        if not shown:
            shown = next(({i} for k, i in unsure if latest.ids[i] not in earlier_ids
                          and not _earlier_by_overlap(ex[k], olds(), tolerance_px)[1]), set())
    if missing and shown:
        covered = shapely.union_all(ex)
        for i in missing:
            gone = _thick(shapely.difference(latest.geometries[i], covered), tolerance_px)
            if not gone.is_empty:
                deleted += 1
                edits.append((gone, int(Label.NON_TUMOR)))
    return AiChanges(edits, edited, matched_by_overlap, deleted, unmatched)


def _still_uncovered(
    changes: list[tuple[shapely.Geometry, int]], k: int, ex: np.ndarray, tolerance_px: float
) -> list[tuple[shapely.Geometry, int]]:
    """Area removed from a contour but held by another exported AI contour (a contour split
    in two, one part matched) is no non-tumor."""
    out = []
    for geometry, label in changes:
        if label == Label.NON_TUMOR:
            others = np.flatnonzero(shapely.intersects(ex, geometry))
            others = others[others != k]
            if len(others):
                geometry = _thick(shapely.difference(geometry, shapely.union_all(ex[others])),
                                  tolerance_px)
        if not geometry.is_empty:
            out.append((geometry, label))
    return out


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """The area of a geometry, valid (an AI contour reduced to a line has none)."""
    valid = shapely.make_valid(geometry)
    parts = [p for p in shapely.get_parts(valid)
             if shapely.get_type_id(p) in (3, 6)]  # Polygon, MultiPolygon
    return shapely.union_all(parts) if parts else shapely.Polygon()


def _best_overlap(ex: np.ndarray, originals: Contours) -> list[int]:
    """For each exported geometry, the original it overlaps best (IoU ≥ MIN_MATCH_IOU), or −1."""
    best = [-1] * len(ex)
    if len(originals.geometries) == 0 or len(ex) == 0:
        return best
    pairs = originals.tree.query(ex, predicate="intersects")
    if pairs.shape[1] == 0:
        return best
    a, b = ex[pairs[0]], originals.geometries[pairs[1]]
    inter = shapely.area(shapely.intersection(a, b))
    iou = inter / np.maximum(shapely.area(a) + shapely.area(b) - inter, 1e-12)
    score = [-1.0] * len(ex)
    for k, i, value in zip(pairs[0].tolist(), pairs[1].tolist(), iou.tolist(), strict=True):
        if value >= MIN_MATCH_IOU and value > score[k]:
            best[k], score[k] = i, value
    return best


def _by_id(rounds: list[Contours], fid: str | None) -> shapely.Geometry | None:
    for r in rounds:  # newest first
        if fid and fid in r.index:
            return r.geometries[r.index[fid]]
    return None


def _earlier_by_overlap(
    geometry: shapely.Geometry, rounds: list[Contours], tolerance_px: float
) -> tuple[shapely.Geometry | None, bool]:
    """The earlier rounds' contour ``geometry`` is an untouched copy of (and True), else the
    newest one it overlaps best (and False), else (None, False)."""
    first = None
    for r in rounds:  # newest first
        (k,) = _best_overlap(np.asarray([geometry], dtype=object), r)
        if k < 0:
            continue
        if not _changes(geometry, r.geometries[k], tolerance_px):
            return r.geometries[k], True
        first = r.geometries[k] if first is None else first
    return first, False


def _changes(
    edited: shapely.Geometry, original: shapely.Geometry, tolerance_px: float
) -> list[tuple[shapely.Geometry, int]]:
    """Area added to the original → tumor; area removed → non-tumor (see the module doc)."""
    if _same_outline(edited, original, tolerance_px / 2.0):
        return []  # the common case, untouched: no overlay needed
    out = []
    for diff, label in ((shapely.difference(edited, original), Label.TUMOR),
                        (shapely.difference(original, edited), Label.NON_TUMOR)):
        kept = _thick(diff, tolerance_px)
        if not kept.is_empty:
            out.append((kept, int(label)))
    return out


def _same_outline(a: shapely.Geometry, b: shapely.Geometry, within_px: float) -> bool:
    """True when ``a`` and ``b`` have the same rings, vertex for vertex within ``within_px``
    (after normalising ring starts and orientations); False says nothing."""
    ring_a = shapely.get_rings(shapely.get_parts(shapely.normalize(a)))
    ring_b = shapely.get_rings(shapely.get_parts(shapely.normalize(b)))
    if len(ring_a) != len(ring_b) or not np.array_equal(shapely.get_num_coordinates(ring_a),
                                                        shapely.get_num_coordinates(ring_b)):
        return False
    xy_a, xy_b = shapely.get_coordinates(ring_a), shapely.get_coordinates(ring_b)
    return bool(np.abs(xy_a - xy_b).max(initial=0.0) <= within_px)


def _thick(area: shapely.Geometry, tolerance_px: float) -> shapely.Geometry:
    """The parts of ``area`` (a difference of valid areas) at least ``tolerance_px`` thick
    somewhere, each kept whole.

    A part survives when its inward buffer by half the tolerance is not empty: a sliver of
    rounding (≪ 1 px) vanishes, a brush stroke one pixel wide stays, with its whole area.
    """
    radius = tolerance_px / 2.0
    # A part that survives holds a disc of that radius: less area in all is rounding (fast).
    if area is None or area.is_empty or area.area < np.pi * radius**2:
        return shapely.Polygon()
    parts = shapely.get_parts(shapely.get_parts(area))  # GeometryCollection → Multi → parts
    parts = parts[shapely.get_type_id(parts) == 3]  # Polygons (lines of touching edges: no)
    parts = parts[shapely.area(parts) >= np.pi * radius**2]
    kept = parts[~shapely.is_empty(shapely.buffer(parts, -radius))]
    # Parts of one valid difference are disjoint: together they are a valid MultiPolygon.
    return shapely.multipolygons(kept) if len(kept) else shapely.Polygon()
