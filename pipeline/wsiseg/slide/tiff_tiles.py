"""Reading regions of a tiled TIFF's pyramid levels with tifffile, beside OpenSlide.

OpenSlide paints every tile of a region through cairo in premultiplied ARGB; on a 2-core
machine that costs ~2.9 ms per 256² JPEG tile, of which ~1.6 ms is compositing, against
~0.35 ms to decode the same tile with imagecodecs' libjpeg-turbo (docs/benchmarks.md §8).
For the slides wsiseg reads most (Aperio SVS and generic tiled TIFF, 8-bit RGB or YCbCr
tiles), a region is therefore cut from the tiles tifffile decodes: the very pixels OpenSlide
returns (bit-identical on the real SVS and the generated slides, ``tests/test_reader.py``),
at a fraction of the cycles. Everything else (metadata, other vendors, associated images)
stays with OpenSlide. On a level of a fractional downsample the cut is exact on the level's
pixel grid where OpenSlide interpolates a sub-pixel shift (:func:`level_origin`).

Damaged files: a tile outside the file, cut short, or that libjpeg cannot decode is refused
(the reader then asks OpenSlide, which raises). Damage that libjpeg only warns about, e.g.
entropy-coded data garbled in the middle of a tile with its end marker intact, is decoded as
libjpeg decodes it (imagecodecs drops the warning), where OpenSlide refuses the tile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

# OpenSlide vendors whose levels are the TIFF's own tiled pages, one page per level.
VENDORS = frozenset({"aperio", "generic-tiff"})

_CONTIG = 1  # TIFF PlanarConfiguration: samples interleaved
_RGB, _YCBCR = 2, 6  # TIFF Photometric
_JPEG = 7  # TIFF Compression (new-style JPEG)
_EOI = b"\xff\xd9"  # JPEG end-of-image marker, the last two bytes of every whole tile


class TiledLevels:
    """The pyramid levels of a tiled TIFF whose tiles tifffile can decode to 8-bit RGB.

    Build with :meth:`open`; :meth:`read` is thread-safe (file reads under one lock,
    decoding in parallel: imagecodecs releases the GIL).
    """

    def __init__(self, tif: Any, pages: dict[int, Any]) -> None:
        self._tif = tif
        self._pages = pages
        # the decode closure of each page, made once: building it reads tags
        self._decoders: dict[int, Callable[..., Any]] = {k: p.decode for k, p in pages.items()}

    @classmethod
    def open(cls, path: Path, level_dimensions: Sequence[tuple[int, int]]) -> TiledLevels | None:
        """The levels of ``path`` that can be read here, or ``None`` if none can.

        Parameters
        ----------
        path : Path
            The slide file (already opened by OpenSlide as one of :data:`VENDORS`).
        level_dimensions : sequence of (width, height)
            OpenSlide's levels; a level is read here when exactly one tiled page of the
            file has its size and holds 8-bit, 3-sample, interleaved RGB or YCbCr JPEG tiles.
        """
        import tifffile

        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # noqa: BLE001 - any parse failure: OpenSlide reads it all
            log.debug("%s: tifffile cannot parse it (%s); OpenSlide reads every level", path, exc)
            return None
        by_size: dict[tuple[int, int], list[Any]] = {}
        pages = {}
        try:
            for page in tif.pages:
                if page.is_tiled:
                    by_size.setdefault((page.imagewidth, page.imagelength), []).append(page)
            for level, size in enumerate(level_dimensions):
                candidates = by_size.get(tuple(size), [])
                if len(candidates) == 1 and _decodable(candidates[0]):
                    pages[level] = candidates[0]
        except Exception as exc:  # noqa: BLE001 - a malformed page: OpenSlide reads it all
            log.debug("%s: tifffile cannot list its pages (%s)", path, exc)
            pages = {}
        if not pages:
            tif.close()
            return None
        tif.filehandle.set_lock(True)  # tiling threads share the handle
        return cls(tif, pages)

    def has(self, level: int) -> bool:
        """Whether :meth:`read` can read ``level``."""
        return level in self._pages

    def read(self, level: int, level_xy: tuple[int, int], size: tuple[int, int]
             ) -> NDArray[np.uint8]:
        """RGB pixels of ``level``, top-left at ``level_xy`` = (x, y) in that level's pixels.

        Parameters
        ----------
        level : int
            A level for which :meth:`has` is true.
        level_xy : (int, int)
            Top-left corner, level px; may lie outside the level.
        size : (int, int)
            (width, height) in level px.

        Returns
        -------
        ndarray of uint8, shape (height, width, 3)
            Pixels outside the level are white, as OpenSlide's transparent ones over white.
        """
        page = self._pages[level]
        x0, y0 = level_xy
        width, height = size
        out = np.full((height, width, 3), 255, np.uint8)
        tile_h, tile_w = page.tilelength, page.tilewidth
        across = -(-page.imagewidth // tile_w)
        rows = range(max(y0, 0) // tile_h,
                     min(-(-(y0 + height) // tile_h), -(-page.imagelength // tile_h)))
        cols = range(max(x0, 0) // tile_w,
                     min(-(-(x0 + width) // tile_w), across))
        for index in (r * across + c for r in rows for c in cols):
            top, left = (index // across) * tile_h, (index % across) * tile_w
            # the part of this tile inside the level and the region (empty past their edges)
            t0, l0 = max(top, y0), max(left, x0)
            t1 = min(top + tile_h, y0 + height, page.imagelength)
            l1 = min(left + tile_w, x0 + width, page.imagewidth)
            if t1 <= t0 or l1 <= l0:
                continue
            tile = self._tile(level, index)
            if tile is not None:
                out[t0 - y0:t1 - y0, l0 - x0:l1 - x0] = tile[t0 - top:t1 - top,
                                                             l0 - left:l1 - left, :3]
        return out

    def _tile(self, level: int, index: int) -> NDArray[np.uint8] | None:
        """Tile ``index`` of ``level`` decoded, ``None`` where the file holds none (byte count
        0: transparent in OpenSlide, white here); anything else not a whole JPEG raises."""
        page, fh = self._pages[level], self._tif.filehandle
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if count == 0:
            return None
        if offset == 0 or offset + count > fh.size:
            raise ValueError(f"tile {index} lies outside the file (offset {offset}, "
                             f"{count} bytes)")
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count or data[-2:] != _EOI:
            # libjpeg only warns on data cut short and imagecodecs drops the warning,
            # where OpenSlide refuses the tile: refuse it too (the caller asks OpenSlide)
            raise ValueError(f"tile {index} does not end with a JPEG end-of-image marker "
                             f"(cut short?)")
        tile, _, _ = self._decoders[level](data, index, jpegtables=page.jpegtables)
        return tile[0]

    def close(self) -> None:
        self._tif.close()


def level_origin(level0_xy: tuple[int, int], downsample: float) -> tuple[int, int] | None:
    """The level pixel that ``level0_xy`` names, or ``None`` if it names none.

    ``level0_xy`` names level pixel ``p`` when it is ``p × downsample`` to the nearest
    level-0 pixel, as :func:`wsiseg.slide.resample.source_box` computes it. Where the
    downsample is a whole number, such a position is a multiple of it and OpenSlide reads the
    very same pixels. Where it is not (level 1 of a 40× SVS is 1/4.0003 the size), OpenSlide
    places the read ``p × downsample − level0_xy`` (under 0.13 level px) off the pixel grid
    and interpolates (cairo); the cut returns pixel ``p`` itself, the grid the resampler
    assumes. Any other position lies between level pixels and is left to OpenSlide.
    """
    x, y = round(level0_xy[0] / downsample), round(level0_xy[1] / downsample)
    if (abs(x * downsample - level0_xy[0]) <= 0.5 + 1e-9
            and abs(y * downsample - level0_xy[1]) <= 0.5 + 1e-9):
        return x, y
    return None


def _decodable(page: Any) -> bool:
    """Whether ``page`` holds tiles this module cuts: 8-bit RGB/YCbCr JPEG, interleaved."""
    try:
        return (page.compression == _JPEG and page.photometric in (_RGB, _YCBCR)
                and page.planarconfig == _CONTIG and page.samplesperpixel == 3
                and page.bitspersample == 8 and page.imagedepth == 1
                and len(page.dataoffsets) == len(page.databytecounts) > 0)
    except Exception:  # noqa: BLE001 - a malformed tag: leave the page to OpenSlide
        return False
