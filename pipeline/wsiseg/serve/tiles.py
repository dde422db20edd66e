"""Deep Zoom tiles of a slide store: the working-resolution image and the tumor probability.

Deep Zoom level ``L`` of an image of ``W × H`` working px is the image scaled by
``2^(L − top)``, ``top = ceil(log2(max(W, H)))``; tiles are ``TILE_PX`` square (smaller at
the right and bottom edges), no overlap. The top level is read straight from the store, only
the zarr region under the tile; every lower tile is the 2×2 mean of the four tiles of the
level above, built on demand and kept in an LRU cache bounded in bytes. Memory is therefore
bounded by the cache plus one tile per level of the recursion, whatever the slide size.

Layers: ``image`` (RGB, JPEG; chunks never tiled — no tissue — read as white glass, the
store's fill value) and ``heatmap`` (``refined``, the current tumor probability, as a colour
ramp PNG with alpha, transparent where the probability is low). Cached tiles are keyed by
the store's version (:meth:`wsiseg.serve.registry.Slide.version`), so a round or an undo
never serves a stale heat map; the same key, hashed, is the tile's ETag.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from wsiseg.store import SlideStore

TILE_PX = 256
LAYERS = {"image": ("image", "jpeg"), "heatmap": ("refined", "png")}
JPEG_QUALITY = 85
DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Pyramid:
    """Deep Zoom geometry of a ``width × height`` image."""

    width: int
    height: int
    tile_px: int = TILE_PX

    @property
    def top(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def level_size(self, level: int) -> tuple[int, int]:
        f = 2 ** (self.top - level)
        return max(1, math.ceil(self.width / f)), max(1, math.ceil(self.height / f))

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) of a tile in the level's pixels; None when there is no such
        tile."""
        if not 0 <= level <= self.top:
            return None
        w, h = self.level_size(level)
        x0, y0 = col * self.tile_px, row * self.tile_px
        if col < 0 or row < 0 or x0 >= w or y0 >= h:
            return None
        return x0, y0, min(w, x0 + self.tile_px), min(h, y0 + self.tile_px)

    def dzi(self, fmt: str) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" '
            f'Format="{fmt}" Overlap="0" TileSize="{self.tile_px}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


class TileCache:
    """LRU of tiles (decoded arrays, and encoded JPEG/PNG bytes), bounded by their total
    bytes; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | bytes | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple, tile: np.ndarray | bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self.bytes += _size(tile)
            while self.bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= _size(old)


def _size(tile: np.ndarray | bytes) -> int:
    return tile.nbytes if isinstance(tile, np.ndarray) else len(tile)


class TileSource:
    """Tiles of one layer of one store at one version."""

    def __init__(self, store: SlideStore, layer: str, version: str, cache: TileCache,
                 cache_key: str):
        self.array_name, self.format = LAYERS[layer]
        self.array = store[self.array_name]
        rows, cols = self.array.shape[-2:]  # image (3, H, W), refined (H, W)
        self.pyramid = Pyramid(cols, rows)
        self.layer = layer
        self.version = version
        self.cache = cache
        self.cache_key = cache_key  # the slide's id: caches are shared by slides

    def etag(self, level: int, col: int, row: int) -> str:
        text = f"{self.cache_key}/{self.layer}/{self.version}/{level}/{col}/{row}"
        return '"' + hashlib.sha1(text.encode()).hexdigest()[:20] + '"'

    def encoded(self, level: int, col: int, row: int) -> bytes | None:
        """The tile as JPEG/PNG bytes; None when the tile does not exist."""
        key = (self.cache_key, self.layer, self.version, level, col, row, "encoded")
        data = self.cache.get(key)
        if data is not None:
            return data
        tile = self.pixels(level, col, row)
        if tile is None:
            return None
        buf = io.BytesIO()
        if self.layer == "image":
            Image.fromarray(tile).save(buf, format="JPEG", quality=JPEG_QUALITY)
        else:
            Image.fromarray(heat_rgba(tile)).save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        self.cache.put(key, data)
        return data

    def pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        """uint8 (h, w, 3) RGB or (h, w) probability × 255 of one tile."""
        box = self.pyramid.tile_box(level, col, row)
        if box is None:
            return None
        key = (self.cache_key, self.layer, self.version, level, col, row)
        tile = self.cache.get(key)
        if tile is not None:
            return tile
        if level == self.pyramid.top:
            tile = self._read(box)
        else:
            tile = self._from_children(level, col, row, box)
        self.cache.put(key, tile)
        return tile

    def _read(self, box: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        if self.layer == "image":  # stored channel first; the tile is (h, w, 3) for PIL
            return np.ascontiguousarray(np.moveaxis(self.array[:, y0:y1, x0:x1], 0, -1))
        return np.asarray(self.array[y0:y1, x0:x1])

    def _from_children(self, level: int, col: int, row: int,
                       box: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        shape = (2 * h, 2 * w, *((3,) if self.layer == "image" else ()))
        acc = np.zeros(shape, np.float32)
        filled = np.zeros(shape[:2], bool)
        for dr in (0, 1):
            for dc in (0, 1):
                child = self.pixels(level + 1, 2 * col + dc, 2 * row + dr)
                if child is None:
                    continue
                ch, cw = child.shape[:2]
                r0, c0 = dr * self.pyramid.tile_px, dc * self.pyramid.tile_px
                acc[r0 : r0 + ch, c0 : c0 + cw] = child
                filled[r0 : r0 + ch, c0 : c0 + cw] = True
        # The level above may be one px short of 2× (odd sizes): repeat its last row/column.
        rows_full, cols_full = int(filled.any(axis=1).sum()), int(filled.any(axis=0).sum())
        acc = acc[:rows_full, :cols_full]
        acc = np.pad(acc, [(0, 2 * h - rows_full), (0, 2 * w - cols_full)]
                     + [(0, 0)] * (acc.ndim - 2), mode="edge")
        mean = acc.reshape(h, 2, w, 2, *acc.shape[2:]).mean(axis=(1, 3))
        return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def _ramp() -> np.ndarray:
    """256 RGBA entries: transparent below 0.2, then blue → yellow → red, more opaque."""
    p = np.arange(256) / 255.0
    r = np.clip(2.0 * p, 0, 1)
    g = np.clip(2.0 - 2.0 * np.abs(2.0 * p - 1.0) - 0.6, 0, 1)
    b = np.clip(1.0 - 2.0 * p, 0, 1)
    a = np.where(p < 0.2, 0.0, 0.35 + 0.5 * p)
    return np.clip(np.rint(np.stack([r, g, b, a], axis=1) * 255), 0, 255).astype(np.uint8)


_RAMP = _ramp()


def heat_rgba(prob: np.ndarray) -> np.ndarray:
    """uint8 (h, w) probability × 255 → uint8 (h, w, 4) RGBA heat map."""
    return _RAMP[prob]
