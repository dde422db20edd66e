"""Training inputs on disk: annotation files matched to slides by name, mask images, patch pairs.

Each slide is matched to its annotation file by name: the annotation's name is the slide's
stem followed by ``.``, ``_`` or ``-`` and anything (``S1.svs`` ↔ ``S1.geojson``,
``S1.truth.geojson``, ``S1_mask.png``). Evaluation matches predictions to truth files the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError

GEOJSON_SUFFIXES: tuple[str, ...] = (".geojson", ".json", ".geojson.gz", ".json.gz", ".zip")
MASK_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


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
        stem = slide_stem(slide)
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
                if p.is_file() and annotation_suffix(p) and p.resolve() not in slide_files
            ]
        elif item.is_file():
            if not annotation_suffix(item):
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
                f"{slide}: no annotation file named like it ({slide_stem(slide)}.geojson, "
                f"{slide_stem(slide)}_mask.png, ...) among the annotations given"
            )
        if len(candidates) > 1:
            raise WsisegError(
                f"{slide}: several annotation files match it "
                f"({', '.join(str(c) for c in candidates)}); pass exactly one"
            )
        pairs.append((slide, candidates[0]))
    return pairs


def slide_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def annotation_suffix(path: Path) -> str | None:
    """The annotation suffix of a file name (longest known one), or None."""
    name = path.name.lower()
    known = sorted(GEOJSON_SUFFIXES + MASK_SUFFIXES, key=len, reverse=True)
    return next((s for s in known if name.endswith(s)), None)


def _slide_of(annotation: Path, stems: dict[str, Path]) -> Path | None:
    """The slide whose stem is the longest prefix of the annotation's name, or None."""
    suffix = annotation_suffix(annotation) or ""
    base = annotation.name[: len(annotation.name) - len(suffix)]
    matching = [
        stem for stem in stems
        if base == stem or (base.startswith(stem) and base[len(stem)] in "._-")
    ]
    return stems[max(matching, key=len)] if matching else None


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
