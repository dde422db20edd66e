"""Training data: labelled slides (store + label raster), patch pairs, sampling, augmentation.

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
from both by window.

A folder of image/mask patch pairs (``images/*.jpg`` + ``masks/*.jpg``) gives labelled
"slides" held in memory, one per pair (:func:`labelled_slides_from_patches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore

GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson", ".json", ".geojson.gz", ".json.gz", ".zip")
MASK_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")

#: Largest relative difference of the mask's and the slide's aspect ratios (width / height).
MAX_ASPECT_MISMATCH = 0.02

#: Edge, in working pixels, of the blocks whose label counts steer patch sampling.
_BLOCK_PX = 16
#: A sampled patch should be at least this labelled (a few tries, then any patch is kept).
_MIN_LABELLED_FRACTION = 0.5
_TRIES_PER_PATCH = 8
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
        RGB; the store's ``image`` array when not given.
    """

    store: SlideStore | None
    label: Any
    name: str = ""
    image: Any = None
    _blocks: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.image is None:
            if self.store is None:
                raise ValueError("LabelledSlide needs a store or an image")
            self.image = self.store["image"]
        if tuple(self.image.shape[:2]) != tuple(self.label.shape):
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
            rgb[inner] = np.asarray(self.image[r0:r1, c0:c1])
            label[inner] = np.asarray(self.label[r0:r1, c0:c1])
        return rgb, label

    def block_counts(self, block_px: int = _BLOCK_PX) -> tuple[np.ndarray, np.ndarray]:
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
            slide, cache_dir / f"{_stem(slide)}.zarr", workflow, mpp=mpp, progress=progress
        ).store
        if store.frame.working_shape != frame.working_shape:  # pragma: no cover - defensive
            raise WsisegError(f"{slide}: the store's frame differs from the slide's")
        label = _write_label_raster(
            cache_dir / f"{_stem(slide)}.labels.zarr", store, source, annotation
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


def match_annotations(
    slides: Sequence[Path], annotations: Sequence[Path] | Path | None
) -> list[tuple[Path, Path]]:
    """Pair each slide with its one annotation file by name (see
    :func:`labelled_slides_from_annotations`).

    Raises
    ------
    WsisegError
        Duplicate slide names, a missing annotation path, a slide with no or several matching
        annotation files, an explicitly given annotation file that matches no slide.
    """
    slides = [Path(s) for s in slides]
    stems: dict[str, Path] = {}
    for slide in slides:
        stem = _stem(slide)
        if stem in stems:
            raise WsisegError(
                f"{slide}: has the same name as {stems[stem]}; slides are matched to their "
                f"annotations by name, so rename one"
            )
        stems[stem] = slide
    if annotations is None:
        raise WsisegError("no annotations given (--annotations FILE... or FOLDER)")
    if isinstance(annotations, str | Path):
        annotations = [Path(annotations)]
    slide_files = {s.resolve() for s in slides}
    explicit: list[Path] = []
    found: list[Path] = []
    for item in (Path(a) for a in annotations):
        if item.is_dir():
            found += [
                p for p in sorted(item.iterdir())
                if p.is_file() and _suffix(p) and p.resolve() not in slide_files
            ]
        elif item.is_file():
            if not _suffix(item):
                raise WsisegError(
                    f"{item}: not an annotation file (expected GeoJSON "
                    f"{', '.join(GEOJSON_SUFFIXES)} or a mask image {', '.join(MASK_SUFFIXES)})"
                )
            explicit.append(item)
        else:
            raise WsisegError(f"{item}: no such annotation file or folder")
    matches: dict[Path, list[Path]] = {s: [] for s in slides}
    for path in explicit + found:
        slide = _slide_of(path, stems)
        if slide is None:
            if path in explicit:
                raise WsisegError(
                    f"{path}: matches no slide by name (slides: "
                    f"{', '.join(sorted(stems))}); name it <slide>.geojson or <slide>_mask.png"
                )
            continue
        if path not in matches[slide]:
            matches[slide].append(path)
    pairs = []
    for slide in slides:
        candidates = matches[slide]
        if not candidates:
            raise WsisegError(
                f"{slide}: no annotation file named like it ({_stem(slide)}.geojson, "
                f"{_stem(slide)}_mask.png, ...) among the annotations given"
            )
        if len(candidates) > 1:
            raise WsisegError(
                f"{slide}: several annotation files match it "
                f"({', '.join(str(c) for c in candidates)}); pass exactly one"
            )
        pairs.append((slide, candidates[0]))
    return pairs


def _stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _suffix(path: Path) -> str | None:
    """The annotation suffix of a file name (longest known one), or None."""
    name = path.name.lower()
    known = sorted(GEOJSON_SUFFIXES + MASK_SUFFIXES, key=len, reverse=True)
    return next((s for s in known if name.endswith(s)), None)


def _slide_of(annotation: Path, stems: dict[str, Path]) -> Path | None:
    """The slide whose stem is the longest prefix of the annotation's name, or None."""
    suffix = _suffix(annotation) or ""
    base = annotation.name[: len(annotation.name) - len(suffix)]
    matching = [
        stem for stem in stems
        if base == stem or (base.startswith(stem) and base[len(stem)] in "._-")
    ]
    return stems[max(matching, key=len)] if matching else None


# -- label sources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometries:
    """Working-frame label geometries of one slide, from a GeoJSON export."""

    tumor: list[shapely.Geometry]
    ignore: list[shapely.Geometry]
    region: shapely.Geometry | None  # union of Region* annotations; None = whole slide


@dataclass(frozen=True)
class _Mask:
    """A tumor mask image covering the whole slide (bool (h, w))."""

    tumor: NDArray[np.bool_]


def _label_source(annotation: Path, frame: Any, workflow: Workflow) -> _Geometries | _Mask:
    suffix = _suffix(annotation)
    if suffix in GEOJSON_SUFFIXES:
        return _geometries(annotation, frame, workflow)
    return _mask(annotation, frame)


def _geometries(path: Path, frame: Any, workflow: Workflow) -> _Geometries:
    from wsiseg.qupath import ClassMapping, Label, read_annotations

    mapping = ClassMapping.from_workflow(workflow.scribbles)
    rows, cols = frame.working_shape
    slide_box = shapely.box(0, 0, cols, rows)
    tumor, ignore, region = [], [], []
    classes = set()
    for a in read_annotations(path):
        if a.class_name is None:
            continue  # unclassified: says nothing
        classes.add(a.class_name)
        geometry = frame.transform_geometry(a.geometry, "qupath", "working")
        base = a.class_name.split(":", 1)[0].strip().rstrip("*")
        if base.lower() == "region":
            region.append(geometry)
        elif (label := mapping.label_of(a.class_name)) == Label.TUMOR:
            tumor.append(geometry)
        elif label == Label.IGNORE:
            ignore.append(geometry)
        # non-tumor and unknown classes are background, which is the default
    if not tumor:
        found = ", ".join(sorted(classes)) or "none"
        raise WsisegError(
            f"{path}: no tumor annotations (tumor classes: "
            f"{', '.join(workflow.scribbles.tumor)}; classes found: {found})"
        )
    if not any(shapely.intersects(g, slide_box) for g in tumor):
        bounds = shapely.union_all(tumor).bounds
        raise WsisegError(
            f"{path}: the tumor annotations (working px x {bounds[0]:.0f}–{bounds[2]:.0f}, y "
            f"{bounds[1]:.0f}–{bounds[3]:.0f}) do not overlap the slide ({cols} × {rows} "
            f"working px); is this the annotation of another slide?"
        )
    region_union = None
    if region:
        region_union = shapely.union_all([shapely.make_valid(g) for g in region])
        if not shapely.intersects(region_union, slide_box):
            raise WsisegError(f"{path}: the Region annotations do not overlap the slide")
    return _Geometries(tumor=tumor, ignore=ignore, region=region_union)


def _mask(path: Path, frame: Any) -> _Mask:
    grey = read_grey_image(path)
    h, w = grey.shape
    slide_w, slide_h = frame.level0_size
    mismatch = abs((w / h) / (slide_w / slide_h) - 1.0)
    if mismatch > MAX_ASPECT_MISMATCH:
        raise WsisegError(
            f"{path}: mask of {w} × {h} px does not have the slide's aspect ratio "
            f"({slide_w} × {slide_h} px level 0; off by {100 * mismatch:.1f} % > "
            f"{100 * MAX_ASPECT_MISMATCH:.0f} %)"
        )
    tumor = grey > (0 if grey.max() <= 1 else 127)
    if not tumor.any():
        raise WsisegError(f"{path}: the mask has no tumor pixel (> 127)")
    return _Mask(tumor=tumor)


def read_grey_image(path: Path) -> NDArray[np.uint8]:
    """A mask image as one grey channel (uint8 (h, w)); RGB(A) is converted to luminance."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                pixels = tif.pages.first.asarray()
            if pixels.ndim == 3:
                pixels = np.asarray(Image.fromarray(pixels[..., :3].astype(np.uint8)).convert("L"))
        else:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise WsisegError(f"{path}: cannot read the mask image ({exc})") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise WsisegError(f"{path}: a mask must be a 2-D image, got shape {pixels.shape}")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    return np.clip(pixels, 0, 255).astype(np.uint8)


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
    wf = store.workflow
    for i, j in zip(*np.nonzero(tiled), strict=True):
        r0, c0 = int(i) * chunk, int(j) * chunk
        window = (r0, c0, min(chunk, rows - r0), min(chunk, cols - c0))
        labels[r0 : r0 + window[2], c0 : c0 + window[3]] = _label_window(
            source, window, (rows, cols), wf
        )
    labels.attrs["wsiseg_labels"] = identity  # last: marks the raster complete
    return labels


def _label_window(
    source: _Geometries | _Mask, window: tuple[int, int, int, int], shape: tuple[int, int],
    workflow: Workflow,
) -> NDArray[np.int8]:
    """Labels (int8: 1, 0, −1) of one window of the working frame."""
    from wsiseg.scribbles.raster import rasterize_labels

    r0, c0, h, w = window
    if isinstance(source, _Mask):
        mh, mw = source.tumor.shape
        # Nearest: working pixel centre → mask pixel.
        mr = np.minimum(((np.arange(r0, r0 + h) + 0.5) * mh / shape[0]).astype(np.int64), mh - 1)
        mc = np.minimum(((np.arange(c0, c0 + w) + 0.5) * mw / shape[1]).astype(np.int64), mw - 1)
        return source.tumor[np.ix_(mr, mc)].astype(np.int8)
    cfg = workflow.scribbles
    mpp = workflow.working_mpp
    draw = {
        "line_width_px": cfg.line_width_um / mpp,
        "point_radius_px": cfg.point_radius_um / mpp,
    }

    def raster(geometries: Iterable[shapely.Geometry]) -> NDArray[np.bool_]:
        return rasterize_labels(((g, 1) for g in geometries), window, **draw) > 0

    out = raster(source.tumor).astype(np.int8)
    if source.region is not None:
        out[~raster([source.region])] = -1
    if source.ignore:
        out[raster(source.ignore)] = -1
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


# --------------------------------------------------------------------------------------------
# Patch pairs


def patch_pairs_from_folder(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Image/mask patch pairs from ``folder/images/*`` and ``folder/masks/*``, matched by stem.

    Masks are read as grey (RGB masks by luminance) and thresholded at 127, which also undoes
    the blur of blurred JPEG masks; 0/1 masks are accepted too.

    Returns
    -------
    images : list of ndarray of uint8, shape (H, W, 3)
    masks : list of ndarray of bool, shape (H, W)
        In the order of the sorted names.

    Raises
    ------
    WsisegError
        A missing ``images``/``masks`` folder, no pairs, an image without a mask (or the
        reverse), unreadable files, or a mask whose size differs from its image's.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    image_dir, mask_dir = folder / "images", folder / "masks"
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise WsisegError(f"{folder}: a patch folder needs images/ and masks/ (no {d.name}/)")

    def by_stem(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

    images, masks = by_stem(image_dir), by_stem(mask_dir)
    lonely = sorted(images.keys() ^ masks.keys())
    if lonely:
        name = lonely[0]
        where = image_dir if name in images else mask_dir
        raise WsisegError(
            f"{where / Path(images.get(name) or masks[name]).name}: no matching "
            f"{'mask' if name in images else 'image'} ({len(lonely)} unpaired file(s))"
        )
    if not images:
        raise WsisegError(f"{folder}: no image/mask pairs in images/ and masks/")
    out_images, out_masks = [], []
    for stem in sorted(images):
        try:
            with Image.open(images[stem]) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, UnidentifiedImageError) as exc:
            raise WsisegError(f"{images[stem]}: cannot read the image ({exc})") from None
        grey = read_grey_image(masks[stem])
        if grey.shape != rgb.shape[:2]:
            raise WsisegError(
                f"{masks[stem]}: mask is {grey.shape[1]} × {grey.shape[0]} px but its image is "
                f"{rgb.shape[1]} × {rgb.shape[0]}"
            )
        out_images.append(rgb)
        out_masks.append(grey > (0 if grey.max() <= 1 else 127))
    return out_images, out_masks


def labelled_slides_from_patches(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, name: str = "patch"
) -> list[LabelledSlide]:
    """In-memory labelled "slides", one per image/mask pair (every pixel labelled)."""
    return [
        LabelledSlide(store=None, label=np.asarray(m, bool).astype(np.int8),
                      image=np.asarray(i, np.uint8), name=f"{name}[{k}]")
        for k, (i, m) in enumerate(zip(images, masks, strict=True))
    ]


# --------------------------------------------------------------------------------------------
# Sampling


def sample_patches(
    slides: Sequence[LabelledSlide],
    patch_px: int,
    n: int,
    *,
    rng: np.random.Generator,
    tumor_fraction_range: tuple[float, float] | None = None,
    balance: bool = True,
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.bool_]]:
    """Random labelled patches, read window by window from the slides.

    A patch is centred on a random pixel of a random block (``_BLOCK_PX``² working px) drawn
    in proportion to its count of the wanted class: with ``balance``, tumor and non-tumor
    blocks half the time each (as far as both exist); otherwise in proportion to labelled
    pixels. A few tries are spent on finding a patch at least half labelled.

    Parameters
    ----------
    slides : sequence of LabelledSlide
    patch_px : int
        Patch edge, working pixels.
    n : int
        Number of patches wanted.
    rng : numpy.random.Generator
    tumor_fraction_range : (float, float), optional
        Keep only patches whose tumor fraction (of their labelled pixels) lies within
        ``[low, high]`` (RefineNet: (0.2, 0.8)); such patches are looked for around blocks
        that hold both classes. Fewer than ``n`` come back when they are rare (after
        ``50 n`` tries).
    balance : bool
        Draw tumor and non-tumor centres equally often.

    Returns
    -------
    images : ndarray of uint8, shape (m, P, P, 3)
    masks : ndarray of float32, shape (m, P, P)
        1 tumor, 0 elsewhere.
    valid : ndarray of bool, shape (m, P, P)
        Labelled pixels (the loss counts only these).
        ``m == n`` except as said under ``tumor_fraction_range``.

    Raises
    ------
    WsisegError
        No labelled pixel in any slide, or no patch within ``tumor_fraction_range``.
    """
    if not slides:
        raise WsisegError("no training data: the training set is empty")
    pools = _block_pools(slides, mixed=tumor_fraction_range is not None)
    if not any(len(p[0]) for p in pools.values()):
        raise WsisegError(
            f"no labelled pixel in {', '.join(s.name for s in slides[:3])}"
            f"{' ...' if len(slides) > 3 else ''}"
        )
    images = np.empty((n, patch_px, patch_px, 3), np.uint8)
    masks = np.empty((n, patch_px, patch_px), np.float32)
    valid = np.empty((n, patch_px, patch_px), bool)
    filtered = tumor_fraction_range is not None
    low, high = tumor_fraction_range or (0.0, 1.0)
    max_tries = 50 * n if filtered else (_TRIES_PER_PATCH + 1) * n
    got = tries = 0
    while got < n and tries < max_tries:
        patch = None
        for _ in range(_TRIES_PER_PATCH):
            tries += 1
            kind = _pick_kind(pools, balance, rng, filtered)
            rgb, label = _draw_patch(slides, pools[kind], patch_px, rng)
            labelled = label >= 0
            enough = labelled.mean() >= _MIN_LABELLED_FRACTION
            if filtered:
                tumor = (label == 1).sum() / max(1, labelled.sum())
                if enough and low <= tumor <= high:
                    patch = rgb, label
                    break
                if tries >= max_tries:
                    break
            else:
                patch = rgb, label  # the last try is kept even if mostly unlabelled
                if enough:
                    break
        if patch is not None:
            images[got], masks[got], valid[got] = patch[0], patch[1] == 1, patch[1] >= 0
            got += 1
    if got == 0:
        raise WsisegError(
            f"no {patch_px} px patch with {100 * low:.0f}–{100 * high:.0f} % tumor in "
            f"{', '.join(s.name for s in slides[:3])}{' ...' if len(slides) > 3 else ''}"
        )
    return images[:got], masks[:got], valid[:got]


def _block_pools(
    slides: Sequence[LabelledSlide], *, mixed: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind (tumor / other / mixed / any): (block ids (k, 3) slide,row,col; weights)."""
    ids: dict[str, list[np.ndarray]] = {"tumor": [], "other": [], "mixed": [], "any": []}
    weights: dict[str, list[np.ndarray]] = {k: [] for k in ids}
    for s, slide in enumerate(slides):
        tumor, other = slide.block_counts()
        for kind, w in (
            ("tumor", tumor),
            ("other", other),
            ("any", tumor + other),
            ("mixed", np.minimum(tumor, other) if mixed else np.zeros_like(tumor)),
        ):
            r, c = np.nonzero(w)
            ids[kind].append(np.stack([np.full(len(r), s), r, c], axis=1))
            weights[kind].append(w[r, c].astype(np.float64))
    out = {}
    for kind in ids:
        block_ids = np.concatenate(ids[kind]) if ids[kind] else np.empty((0, 3), np.int64)
        w = np.concatenate(weights[kind]) if weights[kind] else np.empty(0)
        out[kind] = (block_ids, w / w.sum() if w.size and w.sum() > 0 else w)
    return out


def _pick_kind(
    pools: dict[str, tuple[np.ndarray, np.ndarray]], balance: bool, rng: np.random.Generator,
    mixed: bool,
) -> str:
    if mixed and len(pools["mixed"][0]) and rng.random() < 0.75:
        return "mixed"
    if balance:
        kinds = [k for k in ("tumor", "other") if len(pools[k][0])]
        return kinds[int(rng.integers(len(kinds)))]
    return "any"


def _draw_patch(
    slides: Sequence[LabelledSlide], pool: tuple[np.ndarray, np.ndarray], patch_px: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    block_ids, weights = pool
    s, br, bc = block_ids[rng.choice(len(block_ids), p=weights)]
    slide = slides[int(s)]
    rows, cols = slide.shape
    centre_r = int(br) * _BLOCK_PX + int(rng.integers(_BLOCK_PX))
    centre_c = int(bc) * _BLOCK_PX + int(rng.integers(_BLOCK_PX))
    row0 = _clip_origin(centre_r - patch_px // 2, rows, patch_px)
    col0 = _clip_origin(centre_c - patch_px // 2, cols, patch_px)
    return slide.read(row0, col0, patch_px)


def _clip_origin(origin: int, length: int, patch_px: int) -> int:
    """Keep a window inside the slide when it fits, else centre the slide in it."""
    if length >= patch_px:
        return min(max(origin, 0), length - patch_px)
    return -((patch_px - length) // 2)


def split_slides(
    slides: Sequence[LabelledSlide], val_fraction: float, rng: np.random.Generator
) -> tuple[list[LabelledSlide], list[LabelledSlide]]:
    """Hold out ``round(val_fraction × n)`` slides (at least 1 when there are 2 or more and
    ``val_fraction > 0``; at least 1 is kept for training). With a single slide, validation
    uses the training slide (the caller says so in the model card).
    """
    slides = list(slides)
    if not 0.0 <= val_fraction < 1.0:
        raise WsisegError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if len(slides) < 2 or val_fraction == 0:
        return slides, []
    n_val = min(len(slides) - 1, max(1, round(val_fraction * len(slides))))
    order = rng.permutation(len(slides))
    val = sorted(order[:n_val].tolist())
    return [s for k, s in enumerate(slides) if k not in val], [slides[k] for k in val]


# --------------------------------------------------------------------------------------------
# Augmentation


def random_dihedral(
    arrays: Sequence[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    """One random flip/quarter-turn (of the 8) applied alike to (H, W, ...) arrays."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        if flip:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def hed_jitter(
    rgb: NDArray[np.uint8], rng: np.random.Generator, *, sigma: float = 0.05,
    bias: float = 0.02,
) -> NDArray[np.uint8]:
    """Stain (HED) colour jitter: each of haematoxylin, eosin and DAB scaled by
    ``U(1 − sigma, 1 + sigma)`` and shifted by ``U(−bias, bias)`` (Tellez et al. 2018).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    out = hed2rgb(hed)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def augment(
    img: NDArray[np.uint8], mask: np.ndarray, rng: np.random.Generator
) -> tuple[NDArray[np.uint8], np.ndarray]:
    """Random dihedral transform (same for image and mask) and HED colour jitter (image only).

    Parameters
    ----------
    img : ndarray of uint8, shape (H, W, 3)
    mask : ndarray, shape (H, W) or (H, W, C)
        Any per-pixel array that must stay aligned with ``img`` (dtype kept).
    rng : numpy.random.Generator

    Returns
    -------
    (img, mask)
        New arrays of the same shapes and dtypes.
    """
    img, mask = random_dihedral([img, mask], rng)
    return hed_jitter(img, rng), mask


def max_cached(patch_px: int, bytes_per_px: int, cap: int, limit_bytes: float = 1 << 30) -> int:
    """How many patches a cache may hold: ``cap``, or fewer to stay under ``limit_bytes``."""
    return max(1, min(cap, math.floor(limit_bytes / (patch_px * patch_px * bytes_per_px))))
