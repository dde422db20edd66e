"""Labelled slides: a slide store and its int8 label raster, from annotations or patch pairs.

A *labelled slide* is a slide store (the RGB ``image`` at the working resolution, built by
:func:`wsiseg.tiling.tile_slide`) and a label raster of the same (H, W) shape: int8, 1 tumor,
0 non-tumor, −1 unlabelled. Labels come from

- QuPath GeoJSON exports: the tumor classes of the workflow's ``scribbles`` table are
  foreground, everything else inside the annotated region is background; ``Region*``
  annotations, when present, limit where labels count, and other ignore classes (``Ignore*``)
  are cut out as unlabelled;
- mask images (``.png``, ``.tif``, ``.tiff``, ``.jpg``) covering the whole slide at any
  resolution with the slide's aspect ratio (> 127 is tumor; 0/1 masks are accepted too);

and only chunks of the store that hold tissue are labelled (the rest was never read). The
label raster is written chunk by chunk into a zarr array beside the store in the cache
folder, so neither the slide nor its labels are ever held whole in memory; patches are read
from both by window. Which annotation file belongs to which slide, and how mask images and
patch-pair folders are read, is :mod:`wsiseg.train.inputs`.

A folder of image/mask patch pairs (``images/*.jpg`` + ``masks/*.jpg``) gives labelled
"slides" held in memory, one per pair (:func:`labelled_slides_from_patches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore
from wsiseg.train.annotations import (
    LabelGeometries,
    SlideMask,
    read_label_geometries,
    read_slide_mask,
)
from wsiseg.train.inputs import (
    GEOJSON_SUFFIXES,
    annotation_suffix,
    match_annotations,
    slide_stem,
)

#: Edge, in working pixels, of the blocks whose label counts steer patch sampling.
BLOCK_PX = 16
#: Patches are padded with white (glass) where a window runs off a small image.
_PAD_RGB = 255


@dataclass(eq=False)
class LabelledSlide:
    """One slide (or one in-memory patch) with its label raster, both at the working mpp.

    Attributes
    ----------
    store : SlideStore or None
        The slide store; None for an in-memory patch pair.
    label : array-like of int8, shape (H, W)
        1 tumor, 0 non-tumor, −1 unlabelled: a numpy array or a lazily read zarr array.
    name : str
        Slide (or patch) name, for messages and model-card provenance.
    image : array-like of uint8, shape (H, W, 3), optional
        RGB; when not given, the store's ``image`` array (3, H, W), read channel first.
    """

    store: SlideStore | None
    label: Any
    name: str = ""
    image: Any = None
    _blocks: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    _channels_first: bool = field(default=False, repr=False)  # the store's (3, H, W) image

    def __post_init__(self) -> None:
        if self.image is None:
            if self.store is None:
                raise ValueError("LabelledSlide needs a store or an image")
            self.image = self.store["image"]
            self._channels_first = True
        spatial = self.image.shape[1:] if self._channels_first else self.image.shape[:2]
        if tuple(spatial) != tuple(self.label.shape):
            raise ValueError(
                f"{self.name}: image {tuple(self.image.shape)} and label "
                f"{tuple(self.label.shape)} differ in shape"
            )
        if not self.name:
            self.name = self.store.path.stem if self.store is not None else "patch"

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.label.shape[0]), int(self.label.shape[1])

    def read(self, row0: int, col0: int, size_px: int) -> tuple[np.ndarray, np.ndarray]:
        """A ``size_px``² window (RGB uint8, label int8), padded where it leaves the slide."""
        rows, cols = self.shape
        rgb = np.full((size_px, size_px, 3), _PAD_RGB, np.uint8)
        label = np.full((size_px, size_px), -1, np.int8)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + size_px, rows), min(col0 + size_px, cols)
        if r1 > r0 and c1 > c0:
            inner = (slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0))
            if self._channels_first:  # (3, h, w) as stored → the (h, w, 3) training takes
                rgb[inner] = np.moveaxis(np.asarray(self.image[:, r0:r1, c0:c1]), 0, -1)
            else:
                rgb[inner] = np.asarray(self.image[r0:r1, c0:c1])
            label[inner] = np.asarray(self.label[r0:r1, c0:c1])
        return rgb, label

    def block_counts(self, block_px: int = BLOCK_PX) -> tuple[np.ndarray, np.ndarray]:
        """Tumor and non-tumor pixel counts per ``block_px``² block (int64 (h, w) each)."""
        if block_px not in self._blocks:
            self._blocks[block_px] = _block_counts(self.label, block_px)
        return self._blocks[block_px]


# --------------------------------------------------------------------------------------------
# Slides + annotations


def labelled_slides_from_annotations(
    slides: Sequence[Path],
    annotations: Sequence[Path] | Path,
    cache_dir: Path,
    workflow: Workflow,
    *,
    mpp: float | None = None,
    progress: bool = False,
) -> list[LabelledSlide]:
    """Slide stores and label rasters of annotated slides, checked before any work is done.

    Each slide is matched to its annotation file by name: the annotation's name is the
    slide's stem followed by ``.``, ``_`` or ``-`` and anything (``S1.svs`` ↔ ``S1.geojson``,
    ``S1.truth.geojson``, ``S1_mask.png``). ``annotations`` may be files, folders (every
    GeoJSON or mask file in them that matches a slide), or one folder.

    Parameters
    ----------
    slides : sequence of Path
        Slide files (anything :func:`wsiseg.slide.reader.open_slide` opens).
    annotations : Path or sequence of Path
        QuPath GeoJSON exports (level-0 QuPath-frame pixels) or mask images, or folders.
    cache_dir : Path
        Where the slide stores (``<stem>.zarr``) and label rasters (``<stem>.labels.zarr``)
        are written; existing ones that still match are reused.
    workflow : Workflow
        Working resolution, chunk size, tissue detection and the class table.
    mpp : float, optional
        Level-0 µm per pixel for slides whose files do not say.
    progress : bool
        Show tiling progress.

    Returns
    -------
    list of LabelledSlide
        In the order of ``slides``; labels are zarr arrays (int8 (H, W)).

    Raises
    ------
    WsisegError
        Before anything is tiled: two slides with one name, a slide without a matching
        annotation file or with several, an annotation file matching no slide, an unreadable
        annotation file, annotations not overlapping the slide, a slide without tumor
        annotations, a mask whose aspect ratio differs from the slide's by more than 2 %, no
        slides at all.
    """
    from wsiseg.slide.reader import open_slide
    from wsiseg.tiling import make_frame, tile_slide

    slides = [Path(s) for s in slides]
    if not slides:
        raise WsisegError("no slides given: the training set is empty")
    pairs = match_annotations(slides, annotations)
    # Everything that can be checked without tiling is checked first, for every slide.
    plans = []
    for slide, annotation in pairs:
        reader = open_slide(slide)
        try:
            frame = make_frame(reader.info, workflow, mpp)
        finally:
            reader.close()
        plans.append((slide, annotation, frame, _label_source(annotation, frame, workflow)))

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for slide, annotation, frame, source in plans:
        store = tile_slide(
            slide, cache_dir / f"{slide_stem(slide)}.zarr", workflow, mpp=mpp, progress=progress
        ).store
        if store.frame.working_shape != frame.working_shape:  # pragma: no cover - defensive
            raise WsisegError(f"{slide}: the store's frame differs from the slide's")
        label = _write_label_raster(
            cache_dir / f"{slide_stem(slide)}.labels.zarr", store, source, annotation
        )
        labelled = LabelledSlide(store=store, label=label, name=slide.name)
        tumor, other = labelled.block_counts()
        if tumor.sum() == 0:
            raise WsisegError(
                f"{annotation}: no tumor pixel lies on the tissue of {slide} (inside any Region "
                f"annotation); check that the annotation belongs to this slide"
            )
        if tumor.sum() + other.sum() == 0:  # pragma: no cover - tumor implies labelled
            raise WsisegError(f"{annotation}: nothing of {slide} is labelled")
        out.append(labelled)
    return out


# -- label sources ---------------------------------------------------------------------------


def _label_source(annotation: Path, frame: Any, workflow: Workflow) -> LabelGeometries | SlideMask:
    """The labels of a training annotation, checked: some tumor, on the slide."""
    if annotation_suffix(annotation) in GEOJSON_SUFFIXES:
        return _geometries(annotation, frame, workflow)
    mask = read_slide_mask(annotation, frame.level0_size)
    if not mask.tumor.any():
        raise WsisegError(f"{annotation}: the mask has no tumor pixel (> 127)")
    return mask


def _geometries(path: Path, frame: Any, workflow: Workflow) -> LabelGeometries:
    rows, cols = frame.working_shape
    slide_box = shapely.box(0, 0, cols, rows)
    found = read_label_geometries(path, frame, workflow)
    tumor = found.tumor
    if not tumor:
        classes = ", ".join(sorted(found.classes)) or "none"
        raise WsisegError(
            f"{path}: no tumor annotations (tumor classes: "
            f"{', '.join(workflow.scribbles.tumor)}; classes found: {classes})"
        )
    if not any(shapely.intersects(g, slide_box) for g in tumor):
        bounds = shapely.union_all(tumor).bounds
        raise WsisegError(
            f"{path}: the tumor annotations (working px x {bounds[0]:.0f}–{bounds[2]:.0f}, y "
            f"{bounds[1]:.0f}–{bounds[3]:.0f}) do not overlap the slide ({cols} × {rows} "
            f"working px); is this the annotation of another slide?"
        )
    if found.region is not None and not shapely.intersects(found.region, slide_box):
        raise WsisegError(f"{path}: the Region annotations do not overlap the slide")
    return found


def _write_label_raster(path: Path, store: SlideStore, source: Any, annotation: Path) -> Any:
    """Rasterise the labels of every tissue chunk into ``path`` (zarr int8), or reuse it."""
    import zarr

    from wsiseg.store import file_fingerprint

    rows, cols = store.frame.working_shape
    chunk = store.chunk_px
    identity = {
        "annotation": str(Path(annotation).resolve()),
        "fingerprint": file_fingerprint(Path(annotation)),
        "frame": store.frame.to_dict(),
        "source": store.source.to_dict(),
        "chunk_px": chunk,
        "complete": True,
    }
    if path.exists():
        try:
            old = zarr.open_array(str(path), mode="r")
            if dict(old.attrs).get("wsiseg_labels") == identity:
                return old
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            pass
        import shutil

        shutil.rmtree(path)
    labels = zarr.create_array(
        str(path), shape=(rows, cols), chunks=(chunk, chunk), dtype="int8", fill_value=-1,
        zarr_format=3,
    )
    tiled = np.asarray(store["tiled"][...], dtype=bool)
    for i, j in zip(*np.nonzero(tiled), strict=True):
        r0, c0 = int(i) * chunk, int(j) * chunk
        window = (r0, c0, min(chunk, rows - r0), min(chunk, cols - c0))
        labels[r0 : r0 + window[2], c0 : c0 + window[3]] = _label_window(
            source, window, (rows, cols)
        )
    labels.attrs["wsiseg_labels"] = identity  # last: marks the raster complete
    return labels


def _label_window(
    source: LabelGeometries | SlideMask, window: tuple[int, int, int, int],
    shape: tuple[int, int],
) -> NDArray[np.int8]:
    """Labels (int8: 1, 0, −1) of one window of the working frame of ``shape``."""
    if isinstance(source, SlideMask):
        return source.window(window, shape).astype(np.int8)
    tumor, counted = source.window(window)
    out = tumor.astype(np.int8)
    out[~counted] = -1
    return out


def _block_counts(label: Any, block_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Tumor and non-tumor counts per block, reading ``label`` in bands (bounded memory)."""
    rows, cols = int(label.shape[0]), int(label.shape[1])
    gh, gw = -(-rows // block_px), -(-cols // block_px)
    tumor = np.zeros((gh, gw), np.int64)
    other = np.zeros((gh, gw), np.int64)
    band = block_px * max(1, 1024 // block_px)
    for r0 in range(0, rows, band):
        part = np.asarray(label[r0 : r0 + band, :])
        pad_r = -part.shape[0] % block_px
        pad_c = -cols % block_px
        part = np.pad(part, ((0, pad_r), (0, pad_c)), constant_values=-1)
        blocks = part.reshape(part.shape[0] // block_px, block_px, -1, block_px)
        b0 = r0 // block_px
        tumor[b0 : b0 + blocks.shape[0]] = (blocks == 1).sum(axis=(1, 3))
        other[b0 : b0 + blocks.shape[0]] = (blocks == 0).sum(axis=(1, 3))
    return tumor, other


def labelled_slides_from_patches(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, name: str = "patch"
) -> list[LabelledSlide]:
    """In-memory labelled "slides", one per image/mask pair (every pixel labelled)."""
    return [
        LabelledSlide(store=None, label=np.asarray(m, bool).astype(np.int8),
                      image=np.asarray(i, np.uint8), name=f"{name}[{k}]")
        for k, (i, m) in enumerate(zip(images, masks, strict=True))
    ]
