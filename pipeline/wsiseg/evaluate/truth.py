"""Ground truth of one slide for scoring: GeoJSON, a mask image or a generated truth TIFF.

The truth is read window by window on the prediction's pixel grid: a QuPath GeoJSON export
(tumor classes of the workflow's ``scribbles`` table are tumor, everything else inside the
slide is not; ``Region*`` annotations, when present, limit the pixels that count and
``Ignore*`` ones are left out — the rules of :mod:`wsiseg.train.labels`), a mask image
covering the slide (> 127 is tumor; resampled to the working grid, nearest), or a generated
slide's ``*.truth.tiff`` (:func:`wsiseg.synth.read_truth_mask`). Two mask images must have
one size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
import tifffile
from numpy.typing import NDArray

from wsiseg.errors import WsisegError
from wsiseg.synth import read_truth_mask
from wsiseg.train.annotations import read_label_geometries, read_slide_mask
from wsiseg.train.inputs import GEOJSON_SUFFIXES, MASK_SUFFIXES

if TYPE_CHECKING:
    from wsiseg.config import Workflow
    from wsiseg.store import SlideStore

__all__ = ["TruthSource"]


class TruthSource:
    """Ground truth of one slide, read window by window on the prediction's pixel grid.

    Build with :meth:`open`; :meth:`window` gives ``(truth, counted)`` of a box.
    """

    def __init__(self, path: Path, shape: tuple[int, int]):
        self.path = Path(path)
        self.shape = shape

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        store: SlideStore | None = None,
        shape: tuple[int, int] | None = None,
        workflow: Workflow | None = None,
    ) -> TruthSource:
        """The truth in ``path`` on the grid of a store's working frame, or of a mask image.

        Parameters
        ----------
        path : Path
            QuPath GeoJSON, mask image or a generated slide's ``*.truth.tiff``.
        store : SlideStore, optional
            The prediction's store: the truth is mapped onto its working frame.
        shape : (int, int), optional
            Without a store: the ``(rows, cols)`` of the predicted mask image; a mask image
            must have exactly this size.
        workflow : Workflow, optional
            Class table and line widths for GeoJSON (default: the store's workflow).

        Raises
        ------
        WsisegError
            Missing or unreadable file; GeoJSON without a store; a mask of another size (two
            images) or aspect ratio (store); tumor annotations off the slide.
        """
        path = Path(path)
        if not path.exists():
            raise WsisegError(f"{path}: truth file not found")
        if path.is_dir():
            raise WsisegError(f"{path}: is a folder, not a truth file")
        name = path.name.lower()
        if name.endswith(GEOJSON_SUFFIXES):
            if store is None:
                raise WsisegError(
                    f"{path}: GeoJSON truth needs a slide store as the prediction (its frame "
                    f"maps QuPath pixels to the working grid), not a mask image"
                )
            return _GeoJSONTruth(path, store, workflow or store.workflow)
        if not name.endswith(MASK_SUFFIXES):
            raise WsisegError(f"{path}: not a truth file (GeoJSON or mask image "
                              f"{', '.join(MASK_SUFFIXES)})")
        if store is not None:
            synth = _synth_truth(path, store)
            if synth is not None:
                return synth
            return _MaskTruth(path, store.frame.working_shape, store.frame.level0_size)
        if shape is None:
            raise ValueError("TruthSource.open needs a store or a shape")
        return _MaskTruth(path, shape, None)

    def window(self, box: tuple[int, int, int, int]) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        """``(truth, counted)``, bool (rows, cols) each, of ``box = (row0, col0, rows, cols)``."""
        raise NotImplementedError


class _MaskTruth(TruthSource):
    """A mask image; mapped by nearest pixel centre onto the grid when sizes differ."""

    def __init__(self, path: Path, shape: tuple[int, int], level0_size: tuple[int, int] | None):
        super().__init__(path, shape)
        self.mask = read_slide_mask(path, level0_size)
        mh, mw = self.mask.tumor.shape
        rows, cols = shape
        if level0_size is None and (mh, mw) != (rows, cols):
            raise WsisegError(
                f"{path}: truth mask is {mw} × {mh} px but the predicted mask is "
                f"{cols} × {rows} px"
            )

    def window(self, box):
        return self.mask.window(box, self.shape), np.ones(box[2:], bool)


class _ArrayTruth(TruthSource):
    """A truth already resampled to the whole working grid (generated slides)."""

    def __init__(self, path: Path, truth: NDArray[np.bool_]):
        super().__init__(path, truth.shape)
        self.truth = truth

    def window(self, box):
        r0, c0, h, w = box
        return self.truth[r0 : r0 + h, c0 : c0 + w], np.ones((h, w), bool)


def _synth_truth(path: Path, store: SlideStore) -> _ArrayTruth | None:
    """A generated slide's truth TIFF (its description gives its extent), else None."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
    except (OSError, ValueError, tifffile.TiffFileError):
        return None  # read as a plain mask image, which reports the problem
    try:
        meta = json.loads(description) if description else None
    except json.JSONDecodeError:
        return None
    if not (isinstance(meta, dict) and meta.get("generator") == "wsiseg.synth"):
        return None
    return _ArrayTruth(path, read_truth_mask(path, store.frame.working_shape))


class _GeoJSONTruth(TruthSource):
    """QuPath annotations: tumor classes, Region* (where labels count) and Ignore* (cut out)."""

    def __init__(self, path: Path, store: SlideStore, workflow: Workflow):
        rows, cols = store.frame.working_shape
        super().__init__(path, (rows, cols))
        self.labels = read_label_geometries(path, store.frame, workflow)
        slide_box = shapely.box(0, 0, cols, rows)
        tumor = self.labels.tumor
        if tumor and not any(shapely.intersects(g, slide_box) for g in tumor):
            raise WsisegError(
                f"{path}: the tumor annotations do not overlap the slide of {store.path} "
                f"({cols} × {rows} working px); is this the truth of another slide?"
            )

    def window(self, box):
        return self.labels.window(box)
