"""Reading whole-slide images: one small interface, two backends.

:func:`open_slide` tries OpenSlide first (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ... —
whatever openslide-bin opens) and falls back to TIAToolbox's ``WSIReader`` (OME-TIFF, JP2,
NGFF, plain images). TIAToolbox is imported only on that path, so the core runs without it.

Every problem with the file itself is a :class:`SlideError` whose message names the file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError
from wsiseg.slide.tiff_tiles import VENDORS, TiledLevels, level_origin

log = logging.getLogger(__name__)


class SlideError(WsisegError):
    """The slide file cannot be used (missing, unreadable, unsupported, no mpp, ...)."""


@dataclass(frozen=True)
class SlideInfo:
    """What a reader knows about a slide. Sizes are (width, height) in pixels."""

    path: str
    backend: str  # "openslide" | "tiatoolbox"
    vendor: str | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # µm per level-0 pixel (x); None when the file does not say
    objective_power: float | None
    bounds_offset: tuple[int, int]  # OpenSlide bounds-x/y (QuPath's crop), (0, 0) if none

    @property
    def level0_size(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def describe(self) -> str:
        """Multi-line human summary, as ``wsiseg info`` prints it."""
        w, h = self.level0_size
        lines = [
            f"path:            {self.path}",
            f"backend:         {self.backend}",
            f"vendor:          {self.vendor or 'unknown'}",
            f"level-0 size:    {w} x {h} px",
            f"mpp:             {self.mpp if self.mpp is not None else 'unknown (use --mpp)'}",
            f"objective power: {self.objective_power if self.objective_power else 'unknown'}",
            f"bounds offset:   {self.bounds_offset[0]}, {self.bounds_offset[1]}",
            f"levels:          {len(self.level_dimensions)}",
        ]
        for i, ((lw, lh), ds) in enumerate(
            zip(self.level_dimensions, self.level_downsamples, strict=True)
        ):
            lines.append(f"  level {i}: {lw} x {lh} px, downsample {ds:g}")
        return "\n".join(lines)


class SlideReader(Protocol):
    """The interface every backend implements."""

    info: SlideInfo

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> NDArray[np.uint8]:
        """RGB pixels of ``size`` = (width, height) at ``level``, top-left at level-0 (x, y).

        Returns uint8 (height, width, 3). Transparent or out-of-slide pixels are white.
        """
        ...

    def close(self) -> None: ...


def open_slide(path: str | Path) -> SlideReader:
    """Open a slide with OpenSlide, or TIAToolbox when OpenSlide cannot read the file.

    Raises
    ------
    SlideError
        Missing file, a directory, a format neither backend reads, a truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide file")
    import openslide

    fmt = openslide.OpenSlide.detect_format(str(path))
    if fmt is not None:
        try:
            return OpenSlideReader(path)
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: OpenSlide cannot read this {fmt} file ({exc})") from None
    return _open_with_tiatoolbox(path)


_CACHE_SIZE = 16
_cache: OrderedDict[str, tuple[tuple[int, int, int], SlideReader]] = OrderedDict()
_cache_lock = threading.Lock()


def cached_reader(path: str | Path) -> SlideReader:
    """One open reader per slide file and process, reopened when the file changed.

    A long-lived worker keeps readers open across tasks; a slide rescanned or replaced under
    the same path (another modification time, size or inode) is opened anew, never read
    through the old handle. The old reader is not closed here: another thread may still be
    reading from it, and it closes when the last reference goes. OpenSlide handles are
    thread-safe, so threads share a reader.

    Raises
    ------
    SlideError
        As :func:`open_slide`.
    """
    key = str(Path(path).resolve())
    try:
        st = os.stat(key)
    except OSError:
        return open_slide(path)  # raises the one-line reason (missing, unreadable, ...)
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            _cache.move_to_end(key)
            return hit[1]
    reader = open_slide(path)
    with _cache_lock:
        _cache[key] = (stamp, reader)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return reader


def clear_reader_cache() -> None:
    """Forget every cached reader (they close when no one uses them any more)."""
    with _cache_lock:
        _cache.clear()


def _open_with_tiatoolbox(path: Path) -> SlideReader:
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file")
    try:
        return TiatoolboxReader(path)
    except ImportError:
        raise SlideError(
            f"{path}: not a format OpenSlide reads, and TIAToolbox is not installed"
        ) from None
    except SlideError:
        raise
    except Exception as exc:  # TIAToolbox raises many types for unreadable input
        raise SlideError(f"{path}: not a slide format wsiseg can read ({_short(exc)})") from None


class OpenSlideReader:
    """Backend on openslide-python (with openslide-bin)."""

    def __init__(self, path: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        mpp = _float_or_none(props.get(openslide.PROPERTY_NAME_MPP_X))
        power = _float_or_none(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        bounds = (
            int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0) or 0),
            int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0) or 0),
        )
        self.info = SlideInfo(
            path=str(path),
            backend="openslide",
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR),
            level_dimensions=tuple(tuple(map(int, d)) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=mpp,
            objective_power=power,
            bounds_offset=bounds,
        )
        self._path = path
        # SVS and generic TIFF: JPEG tiles cut with tifffile, about 10× fewer cycles than OpenSlide
        self._tiles = (TiledLevels.open(path, self.info.level_dimensions)
                       if self.info.vendor in VENDORS else None)
        self._tiles_usable = True

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> NDArray[np.uint8]:
        import openslide

        tiles = self._tiles
        if tiles is not None and self._tiles_usable and tiles.has(level):
            origin = level_origin(level0_xy, self.info.level_downsamples[level])
            if origin is not None:
                try:
                    return tiles.read(level, origin, size)
                except Exception as exc:  # noqa: BLE001 - OpenSlide decides (error or pixels)
                    log.warning("%s: tifffile cannot read level %d at %s (%s); reading it "
                                "with OpenSlide", self._path, level, level0_xy, _short(exc))
                    self._tiles_usable = False
        try:
            rgba = np.asarray(self._slide.read_region(level0_xy, level, size))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self._path}: read failed at {level0_xy} ({exc})") from None
        return _rgba_over_white(rgba)

    def close(self) -> None:
        self._slide.close()
        if self._tiles is not None:
            self._tiles.close()


class TiatoolboxReader:
    """Fallback backend on TIAToolbox's ``WSIReader`` (imported lazily)."""

    def __init__(self, path: Path):
        from tiatoolbox.wsicore.wsireader import WSIReader

        self._reader = WSIReader.open(str(path))
        meta = self._reader.info
        dims = tuple((int(w), int(h)) for w, h in meta.level_dimensions)
        mpp = None
        if meta.mpp is not None and np.all(np.isfinite(meta.mpp)):
            mpp = float(meta.mpp[0])
        power = _float_or_none(meta.objective_power)
        self.info = SlideInfo(
            path=str(path),
            backend="tiatoolbox",
            vendor=getattr(meta, "vendor", None),
            level_dimensions=dims,
            level_downsamples=tuple(float(d) for d in meta.level_downsamples),
            mpp=mpp,
            objective_power=power,
            bounds_offset=(0, 0),
        )

    def read_region(
        self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]
    ) -> NDArray[np.uint8]:
        region = self._reader.read_rect(
            location=level0_xy, size=size, resolution=level, units="level", pad_mode="constant",
            pad_constant_values=255,
        )
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=2)
        if region.shape[2] == 4:
            return _rgba_over_white(region)
        return np.ascontiguousarray(region[..., :3], dtype=np.uint8)

    def close(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()


def best_level_for(info: SlideInfo, downsample: float) -> int:
    """The pyramid level nearest *above* the wanted resolution (downsample ≤ wanted)."""
    best = 0
    for i, ds in enumerate(info.level_downsamples):
        if ds <= downsample * (1 + 1e-6):
            best = i if ds >= info.level_downsamples[best] else best
    return best


def _rgba_over_white(rgba: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Composite OpenSlide's premultiplied RGBA over white (transparent = no tissue).

    OpenCV does the per-pixel work: dropping alpha with ``cv2.cvtColor`` is ~15× faster
    than numpy's strided copy, and this runs on every tile the slide is read in.
    """
    rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    alpha = cv2.extractChannel(rgba, 3)
    if cv2.minMaxLoc(alpha)[0] == 255:
        return rgb
    # Premultiplied colour: out = rgb + (255 - alpha), saturating at 255 (cv2.add saturates).
    veil = cv2.cvtColor(cv2.bitwise_not(alpha), cv2.COLOR_GRAY2RGB)
    return cv2.add(rgb, veil)


def _float_or_none(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
