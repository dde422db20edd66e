"""The one place where coordinates change frame.

Three frames, all with x to the right and y down, origin at the top-left corner of the
top-left pixel (pixel ``(i, j)`` covers ``[i, i+1) × [j, j+1)``):

- **level 0**: full-resolution pixels of the slide as OpenSlide sees it (the reference);
- **working**: level 0 divided by ``scale = working_mpp / level0_mpp``; every array of the
  slide store lives here;
- **QuPath**: level 0 minus the OpenSlide bounds offset, because QuPath's OpenSlide reader
  crops to ``openslide.bounds-*`` (see ``qupath-geojson.md`` §1.4).

Points are arrays of shape ``(N, 2)`` holding ``(x, y)``; geometries (shapely) are converted
with :meth:`Frame.transform_geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class Frame:
    """Level-0 ⇄ working ⇄ QuPath pixel conversions of one slide.

    Parameters
    ----------
    level0_size : (int, int)
        Level-0 (width, height) in pixels.
    level0_mpp : float
        µm per level-0 pixel (square pixels are assumed; OpenSlide's mpp-x).
    working_mpp : float
        µm per working pixel.
    bounds_offset : (int, int)
        OpenSlide ``(bounds-x, bounds-y)``; (0, 0) when the slide has no bounds.
    """

    level0_size: tuple[int, int]
    level0_mpp: float
    working_mpp: float
    bounds_offset: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level0_mpp) and self.level0_mpp > 0):
            raise ValueError(f"level0_mpp must be a positive number, got {self.level0_mpp}")
        if not (math.isfinite(self.working_mpp) and self.working_mpp > 0):
            raise ValueError(f"working_mpp must be a positive number, got {self.working_mpp}")

    @property
    def scale(self) -> float:
        """Level-0 pixels per working pixel."""
        return self.working_mpp / self.level0_mpp

    @property
    def working_size(self) -> tuple[int, int]:
        """Working-resolution (width, height), rounded to whole pixels (at least 1)."""
        w, h = self.level0_size
        return max(1, round(w / self.scale)), max(1, round(h / self.scale))

    @property
    def working_shape(self) -> tuple[int, int]:
        """Working-resolution array shape ``(rows, cols)``."""
        w, h = self.working_size
        return h, w

    @property
    def working_px_area_um2(self) -> float:
        return self.working_mpp**2

    # -- points ---------------------------------------------------------------------------
    def level0_to_working(self, xy: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(xy, dtype=np.float64) / self.scale

    def working_to_level0(self, xy: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(xy, dtype=np.float64) * self.scale

    def level0_to_qupath(self, xy: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(xy, dtype=np.float64) - np.asarray(self.bounds_offset, dtype=np.float64)

    def qupath_to_level0(self, xy: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(xy, dtype=np.float64) + np.asarray(self.bounds_offset, dtype=np.float64)

    def working_to_qupath(self, xy: ArrayLike) -> NDArray[np.float64]:
        return self.level0_to_qupath(self.working_to_level0(xy))

    def qupath_to_working(self, xy: ArrayLike) -> NDArray[np.float64]:
        return self.level0_to_working(self.qupath_to_level0(xy))

    # -- geometries -----------------------------------------------------------------------
    def transform_geometry(self, geometry: shapely.Geometry, source: str, target: str):
        """Convert a shapely geometry between frames ``"level0"``, ``"working"``, ``"qupath"``."""
        convert = self._converter(source, target)
        return shapely.transform(geometry, convert)

    def _converter(self, source: str, target: str):
        to_level0 = {
            "level0": lambda a: np.asarray(a, dtype=np.float64),
            "working": self.working_to_level0,
            "qupath": self.qupath_to_level0,
        }
        from_level0 = {
            "level0": lambda a: np.asarray(a, dtype=np.float64),
            "working": self.level0_to_working,
            "qupath": self.level0_to_qupath,
        }
        if source not in to_level0 or target not in from_level0:
            raise ValueError(f"unknown frame: {source!r} → {target!r}")
        return lambda a: from_level0[target](to_level0[source](a))

    # -- boxes ----------------------------------------------------------------------------
    def working_box_to_level0(
        self, row0: int, col0: int, rows: int, cols: int
    ) -> tuple[float, float, float, float]:
        """A working-pixel box ``(row0, col0, rows, cols)`` as level-0 ``(x, y, width, height)``."""
        s = self.scale
        return col0 * s, row0 * s, cols * s, rows * s

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "level0_size": list(self.level0_size),
            "level0_mpp": self.level0_mpp,
            "working_mpp": self.working_mpp,
            "bounds_offset": list(self.bounds_offset),
            "working_size": list(self.working_size),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Frame:
        return cls(
            level0_size=(int(data["level0_size"][0]), int(data["level0_size"][1])),
            level0_mpp=float(data["level0_mpp"]),
            working_mpp=float(data["working_mpp"]),
            bounds_offset=(int(data["bounds_offset"][0]), int(data["bounds_offset"][1])),
        )
