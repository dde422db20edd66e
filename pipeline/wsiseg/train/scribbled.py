"""Scribbled training items: scribble rasters from QuPath exports, simulated truth or patches.

An item is a slide (or patch) with its scribble labels (1 tumor, 0 non-tumor, −1 none) and,
when known, its truth labels; the pool patches of Scribble2Label are centred on its scribbles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.qupath import ClassMapping, Label, is_wsiseg_feature, read_annotations
from wsiseg.scribbles.raster import rasterize_labels
from wsiseg.slide.reader import open_slide
from wsiseg.tiling import make_frame, tile_slide
from wsiseg.train.inputs import match_annotations, patch_pairs_from_folder, slide_stem
from wsiseg.train.labels import BLOCK_PX, LabelledSlide, labelled_slides_from_annotations
from wsiseg.train.pseudo import scribble_labels_from_truth
from wsiseg.train.sampling import clip_origin


@dataclass
class ScribbledItem:
    """One slide or patch: its scribble labels and, when known, its truth labels."""

    scribbles: LabelledSlide  # label: 1 tumor scribble, 0 non-tumor scribble, −1 none
    truth: LabelledSlide | None


def items_from_patch_folder(folder: Path, seed: int, index: int) -> list[ScribbledItem]:
    images, masks = patch_pairs_from_folder(folder)
    items = []
    for k, (rgb, mask) in enumerate(zip(images, masks, strict=True)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C81, index, k]))
        name = f"{folder.name}[{k}]"
        labels = scribble_labels_from_truth(mask, rng=rng)
        items.append(ScribbledItem(
            LabelledSlide(store=None, label=labels, image=rgb, name=name),
            LabelledSlide(store=None, label=mask.astype(np.int8), image=rgb, name=name),
        ))
    return items


def items_from_truth(
    slides: Sequence[Path], truth: Sequence[Path] | Path, cache_dir: Path, wf: Workflow,
    mpp: float | None, seed: int, progress: bool,
) -> list[ScribbledItem]:
    truths = labelled_slides_from_annotations(slides, truth, cache_dir, wf, mpp=mpp,
                                              progress=progress)
    items = []
    for k, t in enumerate(truths):
        full = np.asarray(t.label[...])
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C82, k]))
        # A pathologist scribbles non-tumor on tissue, not on the glass between it: simulated
        # strokes stay on the store's tissue mask, so they fall on stroma and its look-alikes.
        labelled = (full >= 0) & tissue_at(t.store, full.shape)
        labels = scribble_labels_from_truth(full == 1, labelled, rng=rng)
        items.append(ScribbledItem(LabelledSlide(store=t.store, label=labels, name=t.name), t))
    return items


def tissue_at(store, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """The store's low-resolution tissue mask, nearest-neighbour at ``shape`` (working px)."""
    tissue = store.tissue_mask
    rows = (np.arange(shape[0]) * tissue.shape[0]) // shape[0]
    cols = (np.arange(shape[1]) * tissue.shape[1]) // shape[1]
    return tissue[np.ix_(rows, cols)]


def items_from_exports(
    slides: Sequence[Path], exports: Sequence[Path] | Path, cache_dir: Path, wf: Workflow,
    mpp: float | None, progress: bool,
) -> list[ScribbledItem]:
    """Slide stores and scribble label rasters from QuPath exports (checked before tiling)."""
    mapping = ClassMapping.from_workflow(wf.scribbles)
    plans = []
    for slide, export in match_annotations(slides, exports):
        reader = open_slide(slide)
        try:
            frame = make_frame(reader.info, wf, mpp)
        finally:
            reader.close()
        shapes = []
        for a in read_annotations(export):
            if is_wsiseg_feature(a, ai_class_name=wf.contours.class_name):
                continue  # our own contours are predictions, not scribbles
            label = mapping.label_of(a.class_name)
            if label in (Label.TUMOR, Label.NON_TUMOR):
                shapes.append((frame.transform_geometry(a.geometry, "qupath", "working"),
                               int(label)))
        if not shapes:
            raise WsisegError(
                f"{export}: no tumor or non-tumor scribbles (tumor classes: "
                f"{', '.join(wf.scribbles.tumor)}; non-tumor: {', '.join(wf.scribbles.non_tumor)})"
            )
        plans.append((slide, export, shapes))
    cache_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for slide, export, shapes in plans:
        store = tile_slide(slide, cache_dir / f"{slide_stem(slide)}.zarr", wf, mpp=mpp,
                           progress=progress).store
        labels = _scribble_raster(store, shapes, wf)
        if not (labels >= 0).any():
            raise WsisegError(f"{export}: no scribble lies on the tissue of {slide}")
        items.append(ScribbledItem(LabelledSlide(store=store, label=labels, name=slide.name), None))
    return items


def _scribble_raster(store, shapes, wf: Workflow) -> NDArray[np.int8]:
    """Scribble labels (1, 0, −1) of the tissue chunks, rasterised where scribbles are.

    In memory at the working resolution (int8: 1 byte per working pixel); only the chunks that
    scribbles touch are drawn.
    """
    rows, cols = store.frame.working_shape
    chunk = store.chunk_px
    tiled = np.asarray(store["tiled"][...], dtype=bool)
    out = np.full((rows, cols), -1, np.int8)
    tree = shapely.STRtree([g for g, _ in shapes])
    draw = {"line_width_px": max(1.0, wf.scribbles.line_width_um / wf.working_mpp),
            "point_radius_px": max(1.0, wf.scribbles.point_radius_um / wf.working_mpp)}
    for i, j in zip(*np.nonzero(tiled), strict=True):
        r0, c0 = int(i) * chunk, int(j) * chunk
        h, w = min(chunk, rows - r0), min(chunk, cols - c0)
        hits = tree.query(shapely.box(c0, r0, c0 + w, r0 + h))
        if hits.size == 0:
            continue
        drawn = rasterize_labels([shapes[k] for k in hits], (r0, c0, h, w), **draw)
        window = out[r0 : r0 + h, c0 : c0 + w]
        window[drawn > 0] = 1
        window[drawn < 0] = 0
    return out


def pick_patches(
    items: Sequence[ScribbledItem], patch_px: int, n: int, rng: np.random.Generator
) -> tuple[NDArray[np.uint8], NDArray[np.int8], NDArray[np.int8] | None]:
    """``n`` patches centred on scribbled blocks, tumor and non-tumor scribbles equally often.

    Returns RGB uint8 (n, P, P, 3), scribble labels int8 (n, P, P) and truth labels int8
    (n, P, P) — None unless every item has a truth.
    """
    pools = {}
    for kind in ("tumor", "other"):
        ids, weights = [], []
        for s, item in enumerate(items):
            tumor, other = item.scribbles.block_counts(BLOCK_PX)
            counts = tumor if kind == "tumor" else other
            r, c = np.nonzero(counts)
            ids.append(np.stack([np.full(len(r), s), r, c], axis=1))
            weights.append(counts[r, c].astype(np.float64))
        block_ids = np.concatenate(ids)
        w = np.concatenate(weights)
        if w.size:
            pools[kind] = (block_ids, w / w.sum())
    kinds = sorted(pools)
    with_truth = all(item.truth is not None for item in items)
    images = np.empty((n, patch_px, patch_px, 3), np.uint8)
    scribbles = np.empty((n, patch_px, patch_px), np.int8)
    truth = np.empty((n, patch_px, patch_px), np.int8) if with_truth else None
    for k in range(n):
        block_ids, w = pools[kinds[k % len(kinds)]]
        s, br, bc = block_ids[rng.choice(len(block_ids), p=w)]
        item = items[int(s)]
        rows, cols = item.scribbles.shape
        r0 = clip_origin(int(br) * BLOCK_PX + int(rng.integers(BLOCK_PX)) - patch_px // 2,
                         rows, patch_px)
        c0 = clip_origin(int(bc) * BLOCK_PX + int(rng.integers(BLOCK_PX)) - patch_px // 2,
                         cols, patch_px)
        images[k], scribbles[k] = item.scribbles.read(r0, c0, patch_px)
        if truth is not None:
            truth[k] = item.truth.read(r0, c0, patch_px)[1]
    return images, scribbles, truth
