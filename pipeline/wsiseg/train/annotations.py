"""What an annotation file labels on the working grid: QuPath geometries or a slide mask.

Training (:mod:`wsiseg.train.labels`) and evaluation (:mod:`wsiseg.evaluate.truth`) read
annotations by the same rules:

- a QuPath GeoJSON export: the tumor classes of the workflow's ``scribbles`` table are tumor,
  every other class background; ``Region*`` annotations, when present, limit the pixels that
  count, ``Ignore*`` ones (the table's ignore classes) are cut out; unclassified objects say
  nothing. Lines and points are drawn with the table's widths.
- a mask image covering the whole slide at any resolution with the slide's aspect ratio
  (> 127 is tumor; 0/1 masks are accepted too), mapped onto the grid by nearest pixel centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from numpy.typing import NDArray

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.qupath import ClassMapping, Label, read_annotations
from wsiseg.scribbles.raster import rasterize_labels
from wsiseg.train.inputs import read_grey_image

__all__ = ["MAX_ASPECT_MISMATCH", "LabelGeometries", "SlideMask", "read_label_geometries",
           "read_slide_mask"]

#: Largest relative difference of the mask's and the slide's aspect ratios (width / height).
MAX_ASPECT_MISMATCH = 0.02

Box = tuple[int, int, int, int]  # (row0, col0, rows, cols) on the working grid


@dataclass(frozen=True)
class LabelGeometries:
    """The labelling geometries of one QuPath export, in working-frame pixels.

    Attributes
    ----------
    tumor, ignore : list of shapely.Geometry
    region : shapely.Geometry or None
        Union of the ``Region*`` annotations; None: the whole slide counts.
    classes : frozenset of str
        Every class found (for messages).
    draw : dict
        ``line_width_px`` and ``point_radius_px`` for :func:`rasterize_labels`.
    """

    tumor: list[shapely.Geometry]
    ignore: list[shapely.Geometry]
    region: shapely.Geometry | None
    classes: frozenset[str]
    draw: dict[str, float]

    def window(self, box: Box) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """``(tumor, counted)``, bool (rows, cols) each, of ``box``."""
        tumor = self._raster(self.tumor, box)
        counted = np.ones(tumor.shape, bool)
        if self.region is not None:
            counted &= self._raster([self.region], box)
        if self.ignore:
            counted &= ~self._raster(self.ignore, box)
        return tumor, counted

    def _raster(self, geometries: list[shapely.Geometry], box: Box) -> NDArray[np.bool_]:
        return rasterize_labels(((g, 1) for g in geometries), box, **self.draw) > 0


def read_label_geometries(path: Path, frame: Any, workflow: Workflow) -> LabelGeometries:
    """Sort the annotations of a QuPath export by what they label, mapped onto ``frame``.

    Raises
    ------
    WsisegError
        An unreadable export (see :func:`wsiseg.qupath.read_annotations`).
    """
    mapping = ClassMapping.from_workflow(workflow.scribbles)
    tumor, ignore, regions = [], [], []
    classes = set()
    for a in read_annotations(path):
        if a.class_name is None:
            continue  # unclassified: says nothing
        classes.add(a.class_name)
        geometry = frame.transform_geometry(a.geometry, "qupath", "working")
        base = a.class_name.split(":", 1)[0].strip().rstrip("*")
        if base.lower() == "region":
            regions.append(shapely.make_valid(geometry))
        elif (label := mapping.label_of(a.class_name)) == Label.TUMOR:
            tumor.append(geometry)
        elif label == Label.IGNORE:
            ignore.append(geometry)
        # non-tumor and unknown classes are background, which is the default
    mpp = workflow.working_mpp
    draw = {
        "line_width_px": workflow.scribbles.line_width_um / mpp,
        "point_radius_px": workflow.scribbles.point_radius_um / mpp,
    }
    region = shapely.union_all(regions) if regions else None
    return LabelGeometries(tumor, ignore, region, frozenset(classes), draw)


@dataclass(frozen=True)
class SlideMask:
    """A tumor mask image covering the whole slide (bool (h, w)), at its own resolution."""

    tumor: NDArray[np.bool_]

    def window(self, box: Box, grid_shape: tuple[int, int]) -> NDArray[np.bool_]:
        """The mask on ``box`` of a grid of ``grid_shape`` over the slide (nearest centre)."""
        r0, c0, h, w = box
        mh, mw = self.tumor.shape
        rows, cols = grid_shape
        mr = np.minimum(((np.arange(r0, r0 + h) + 0.5) * mh / rows).astype(np.int64), mh - 1)
        mc = np.minimum(((np.arange(c0, c0 + w) + 0.5) * mw / cols).astype(np.int64), mw - 1)
        return self.tumor[np.ix_(mr, mc)]


def read_slide_mask(path: Path, level0_size: tuple[int, int] | None = None) -> SlideMask:
    """A mask image (> 127 tumor; 0/1 masks too), checked against the slide's aspect ratio.

    Raises
    ------
    WsisegError
        An unreadable image, or (with ``level0_size``) an aspect ratio more than
        :data:`MAX_ASPECT_MISMATCH` off the slide's.
    """
    grey = read_grey_image(path)
    if level0_size is not None:
        h, w = grey.shape
        slide_w, slide_h = level0_size
        mismatch = abs((w / h) / (slide_w / slide_h) - 1.0)
        if mismatch > MAX_ASPECT_MISMATCH:
            raise WsisegError(
                f"{path}: mask of {w} × {h} px does not have the slide's aspect ratio "
                f"({slide_w} × {slide_h} px level 0; off by {100 * mismatch:.1f} % > "
                f"{100 * MAX_ASPECT_MISMATCH:.0f} %)"
            )
    return SlideMask(grey > (0 if grey.max() <= 1 else 127))
