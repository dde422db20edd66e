"""The pyramidal OME-TIFF writer of exports, in bounded memory, and the slide frame it carries.


OME-TIFF layout: BigTIFF, tiled (``tile_px``², zlib/deflate), level 0 at the working
resolution with its physical pixel size (OME ``PhysicalSizeX/Y`` in µm and TIFF resolution in
pixels per cm), lower levels (÷2 each, down to one tile) in SubIFDs — max of 2×2 for the mask
(a focus stays visible when zoomed out), mean for the probability. The slide frame (level-0
size and mpp, working mpp, OpenSlide bounds offset) is stored as JSON in the OME image
``Description`` and as a ``wsiseg.frame`` MapAnnotation; :func:`read_export_frame` turns it
back into a :class:`~wsiseg.slide.frame.Frame`, whose ``working_to_level0`` maps mask pixels
onto the slide.

Memory is a few tiles whatever the slide size: level 0 is read tile by tile (through
:func:`refined_of_round` for past rounds) and each level's tiles are reduced into a compressed
scratch zarr next to the output, from which the next level is read; the file is written to a
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from numpy.typing import NDArray

from wsiseg.atomic import atomic_writer
from wsiseg.errors import WsisegError
from wsiseg.slide.frame import Frame

OME_FRAME_NAMESPACE = "wsiseg.frame"
MASK_TUMOR = 255  # mask value of tumor pixels (background 0)
_ENCODE_BUFFER_TILES = 16  # tiles tifffile may hold while encoding in parallel


def pyramid_shapes(shape: tuple[int, int], tile_px: int) -> list[tuple[int, int]]:
    """(rows, cols) of each level: level 0 is ``shape``, each next one ÷2 (rounded up), down
    to the first level that fits in one tile."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > tile_px:
        rows, cols = shapes[-1]
        shapes.append((-(-rows // 2), -(-cols // 2)))
    return shapes


def _quarters(block: NDArray[np.uint8], pad_mode: str) -> list[NDArray[np.uint8]]:
    """The four phases of a block's 2×2 cells, an odd edge padded first.

    Strided slices rather than :func:`skimage.measure.block_reduce`, whose generic block view
    is ~40× slower on a 512² tile and would dominate the export.
    """
    pad = ((0, block.shape[0] % 2), (0, block.shape[1] % 2))
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode=pad_mode)
    return [block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]]


def _reduce_max(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Max of each 2×2 cell (an odd edge padded with background)."""
    return np.maximum.reduce(_quarters(block, "constant"))


def _reduce_mean(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Mean of each 2×2 cell, rounded half up (an odd edge averages with itself)."""
    total = np.add.reduce([q.astype(np.uint16) for q in _quarters(block, "edge")])
    return ((total + 2) // 4).astype(np.uint8)


def write_ome_tiff(
    array_like: Any,
    path: Path,
    *,
    mpp: float,
    frame_dict: Mapping[str, Any],
    kind: str,
    threshold_u8: int | None = None,
    tile_px: int = 512,
    name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a (H, W) uint8 map as a tiled, pyramidal OME-TIFF in bounded memory.

    Parameters
    ----------
    array_like : ArrayLike2D
        (H, W) uint8 probability × 255 at the working resolution, with numpy slicing
        (``zarr.Array``, :class:`RoundPixels`, ``numpy.ndarray``); read one tile at a time.
    path : Path
        Output file (``*.ome.tif``); written to a temporary name, then renamed.
    mpp : float
        µm per pixel of ``array_like`` (the working mpp).
    frame_dict : mapping
        :meth:`Frame.to_dict` of the slide, stored so the image maps back onto the slide.
    kind : {"mask", "prob"}
        ``"mask"``: pixels ``>= threshold_u8`` become 255, the others 0; lower levels take the
        max of 2×2. ``"prob"``: values as they are; lower levels take the mean of 2×2.
    threshold_u8 : int, optional
        Required for ``"mask"``: :func:`wsiseg.contours.uint8_threshold` of θ.
    tile_px : int
        TIFF tile edge (a multiple of 16).
    name : str, optional
        OME image name.
    extra : mapping, optional
        More JSON-able fields for the ``Description`` (slide id, round, ...).

    Returns
    -------
    Path
        ``path``.
    """
    if kind not in ("mask", "prob"):
        raise ValueError(f"kind must be 'mask' or 'prob', got {kind!r}")
    if kind == "mask" and threshold_u8 is None:
        raise ValueError("a mask needs threshold_u8")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    if len(array_like.shape) != 2 or np.dtype(array_like.dtype) != np.uint8:
        raise ValueError(
            f"expected a (H, W) uint8 array, got {array_like.dtype} {tuple(array_like.shape)}"
        )
    path = Path(path)
    shapes = pyramid_shapes(tuple(array_like.shape), tile_px)
    thr = None if threshold_u8 is None or kind == "prob" else int(threshold_u8)
    if thr is not None:

        def convert(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
            return np.where(block >= thr, np.uint8(MASK_TUMOR), np.uint8(0))

        reduce = _reduce_max
    else:

        def convert(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
            return block

        reduce = _reduce_mean

    description = {
        "wsiseg": {
            "kind": kind,
            "values": "0 background, 255 tumor" if kind == "mask" else "probability × 255",
            "threshold_u8": thr,
            "frame": dict(frame_dict),
            **dict(extra or {}),
        }
    }
    metadata = {
        "axes": "YX",
        "Name": name or path.name,
        "Description": json.dumps(description, ensure_ascii=False),
        "PhysicalSizeX": float(mpp),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(mpp),
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": ["tumor" if kind == "mask" else "tumor probability"]},
        "MapAnnotation": {
            "Namespace": OME_FRAME_NAMESPACE,
            "Value": {k: json.dumps(v) for k, v in dict(frame_dict).items()},
        },
    }
    tile_bytes = tile_px * tile_px
    options: dict[str, Any] = {
        "tile": (tile_px, tile_px),
        "compression": "zlib",
        "photometric": "minisblack",
        "resolutionunit": "CENTIMETER",
        "dtype": np.uint8,
        "maxworkers": min(4, os.cpu_count() or 1),
        "buffersize": _ENCODE_BUFFER_TILES * tile_bytes,
    }

    with (
        atomic_writer(path) as out,
        tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels.") as work,
        tifffile.TiffWriter(out, bigtiff=True, ome=True) as tif,
    ):
        source: Any = array_like
        for level, shape in enumerate(shapes):
            following = None
            if level + 1 < len(shapes):
                following = _scratch_level(Path(work) / f"l{level + 1}", shapes[level + 1],
                                           tile_px // 2)
            step_mpp = mpp * 2**level
            tiles = _level_tiles(source, shape, tile_px, convert if level == 0 else None,
                                 reduce, following)
            if level == 0:
                tif.write(tiles, shape=shape, subifds=len(shapes) - 1, metadata=metadata,
                          resolution=(1e4 / step_mpp, 1e4 / step_mpp), **options)
            else:
                tif.write(tiles, shape=shape, subfiletype=1, metadata=None,
                          resolution=(1e4 / step_mpp, 1e4 / step_mpp), **options)
            source = following
    return path


def _scratch_level(where: Path, shape: tuple[int, int], chunk_px: int) -> zarr.Array:
    """A compressed on-disk array for one pyramid level; chunks are half a tile so each tile
    of the level above fills exactly one chunk (no read-modify-write)."""
    return zarr.create_array(
        store=str(where), shape=shape, chunks=(chunk_px, chunk_px), dtype="uint8",
        fill_value=0, zarr_format=3,
    )


def _level_tiles(
    source: Any,
    shape: tuple[int, int],
    tile_px: int,
    convert: Callable[[NDArray[np.uint8]], NDArray[np.uint8]] | None,
    reduce: Callable[[NDArray[np.uint8]], NDArray[np.uint8]],
    following: zarr.Array | None,
) -> Iterator[NDArray[np.uint8]]:
    """The level's tiles in TIFF order (row-major), each reduced into the next level as it
    passes. Edge tiles are smaller; tifffile zero-pads them."""
    rows, cols = shape
    for r in range(0, rows, tile_px):
        for c in range(0, cols, tile_px):
            block = np.asarray(source[r : r + tile_px, c : c + tile_px])
            if convert is not None:
                block = convert(block)
            if following is not None:
                small = reduce(block)
                following[r // 2 : r // 2 + small.shape[0], c // 2 : c // 2 + small.shape[1]] = (
                    small
                )
                del small
            yield np.ascontiguousarray(block)


def read_export_frame(path: Path) -> Frame:
    """The slide :class:`Frame` stored in an exported OME-TIFF (see :func:`write_ome_tiff`).

    Level 0 of the image is the frame's working grid: ``frame.working_to_level0`` maps its
    pixel coordinates onto the slide's level-0 pixels (``working_to_qupath`` onto QuPath's).
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            ome = tif.ome_metadata
        if not ome:
            raise ValueError("no OME-XML")
        image = tifffile.xml2dict(ome)["OME"]["Image"]
        if isinstance(image, list):
            image = image[0]
        frame = json.loads(image["Description"])["wsiseg"]["frame"]
        return Frame.from_dict(frame)
    except (OSError, ValueError, KeyError, TypeError, tifffile.TiffFileError) as exc:
        raise WsisegError(f"{path}: not a wsiseg export with a slide frame ({exc})") from None
