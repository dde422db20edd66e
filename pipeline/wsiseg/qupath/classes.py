"""The QuPath class table and what we make of it: labels, annotations, class mappings.

QuPath's built-in classes and their colours, the :class:`Annotation` record that the reader
returns and the writer takes, and :class:`ClassMapping` (a class name → tumour / non-tumour /
ignore :class:`Label`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import shapely

from wsiseg.config import ConfigError

if TYPE_CHECKING:
    from wsiseg.config import ScribblesConfig

WSISEG_SOURCE = "wsiseg"
"""``metadata["source"]`` of the contours we export, so we recognise them when they come back."""

QUPATH_CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Stroma": (150, 200, 150),
    "Immune cells": (160, 90, 160),
    "Necrosis": (50, 50, 50),
    "Other": (255, 200, 0),
    "Region*": (0, 0, 180),
    "Ignore*": (180, 180, 180),
    "Positive": (200, 50, 50),
    "Negative": (90, 90, 180),
    "1+": (255, 215, 0),
    "2+": (225, 150, 50),
    "3+": (200, 50, 50),
}
"""QuPath's built-in classes and their default colours (RGB). QuPath keeps these colours whatever
a file says (§1.3, rule 6), so the writer uses them for these names."""

_DERIVED_DELIMITER = ":"  # QuPath's PathClass delimiter; its string form joins with ": "


class Label(enum.IntEnum):
    """What a scribble says about the pixels under it (the ``scribbles`` raster's values)."""

    IGNORE = 0
    TUMOR = 1
    NON_TUMOR = -1


@dataclass(frozen=True)
class Annotation:
    """One QuPath annotation.

    Attributes
    ----------
    geometry : shapely.Geometry
        QuPath-frame level-0 pixels: (Multi)Polygon, (Multi)LineString or (Multi)Point.
    class_name : str or None
        QuPath's string form, e.g. ``"Tumor"``, ``"Tumor: Positive"``; None = unclassified.
    name : str or None
        The object's name.
    locked : bool
        QuPath's lock (our AI contours are locked).
    measurements : Mapping[str, float]
        Numeric measurements (non-finite values may come back from QuPath files).
    metadata : Mapping[str, str]
        String metadata (QuPath ≥ 0.5 keeps it on annotations).
    id : str or None
        The feature's UUID string.
    color : (int, int, int) or None
        The class colour (RGB) as read, or to write.
    valid_geometry : bool
        To write: the maker vouches that ``geometry`` is valid (wsiseg's traced contours are,
        by construction), so the writer proves that snapping it to QuPath's grid keeps it
        valid by a clearance bound instead of GEOS's validity check
        (:func:`wsiseg.qupath.snap.proven_rounding`). Never set by the reader.
    corner_grid : (spacing, x0, y0) or None
        To write a ``valid_geometry``: the lattice its vertices lie on, where they do —
        traced outlines are pixel corners of the working grid, ``(x0 + spacing·i,
        y0 + spacing·j)`` in QuPath's frame — which makes the proof cheaper
        (:func:`wsiseg.qupath.snap.lattice_rounding`; checked, not trusted).
    """

    geometry: shapely.Geometry
    class_name: str | None
    name: str | None = None
    locked: bool = False
    measurements: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    id: str | None = None
    color: tuple[int, int, int] | None = None
    valid_geometry: bool = False
    corner_grid: tuple[float, float, float] | None = None


def is_wsiseg_feature(a: Annotation, *, ai_class_name: str | None = None) -> bool:
    """True for a contour we exported ourselves (``metadata["source"] == "wsiseg"``).

    QuPath 0.4 drops metadata of annotations, so pass the workflow's contour class name
    (``contours.class_name``, e.g. ``"Tumor (AI)"``) as ``ai_class_name`` to recognise those too.
    """
    if a.metadata.get("source") == WSISEG_SOURCE:
        return True
    return ai_class_name is not None and a.class_name == ai_class_name


@dataclass(frozen=True)
class ClassMapping:
    """Which QuPath classes are tumour, non-tumour or not a label.

    Names are compared exactly (case-sensitive, like QuPath). An entry ending in ``*`` (QuPath's
    ``Region*``, ``Ignore*``) also matches the bare name (``Region``). With ``match_base_class``
    a derived class (``Tumor: Positive``) that is not listed itself takes the label of its first
    part (``Tumor``).
    """

    tumor: tuple[str, ...]
    non_tumor: tuple[str, ...]
    ignore: tuple[str, ...]
    match_base_class: bool = True

    def __post_init__(self) -> None:
        for attr in ("tumor", "non_tumor", "ignore"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        seen: dict[str, str] = {}
        for attr in ("tumor", "non_tumor", "ignore"):
            for entry in getattr(self, attr):
                for name in _entry_names(entry):
                    if seen.setdefault(name, attr) != attr:
                        raise ConfigError(
                            f"scribbles: class {name!r} is listed under both "
                            f"{seen[name]} and {attr}"
                        )

    @classmethod
    def from_workflow(cls, scribbles_cfg: ScribblesConfig) -> ClassMapping:
        """The mapping of a workflow's ``scribbles`` section."""
        return cls(
            tumor=tuple(scribbles_cfg.tumor),
            non_tumor=tuple(scribbles_cfg.non_tumor),
            ignore=tuple(scribbles_cfg.ignore),
            match_base_class=scribbles_cfg.match_base_class,
        )

    def label_of(self, class_name: str | None) -> Label | None:
        """The label of a class name; unclassified (None) → IGNORE; not in the table → None."""
        if class_name is None:
            return Label.IGNORE
        label = self._lookup(class_name)
        if label is None and self.match_base_class and _DERIVED_DELIMITER in class_name:
            label = self._lookup(class_name.split(_DERIVED_DELIMITER, 1)[0].strip())
        return label

    def _lookup(self, name: str) -> Label | None:
        for entries, label in (
            (self.tumor, Label.TUMOR),
            (self.non_tumor, Label.NON_TUMOR),
            (self.ignore, Label.IGNORE),
        ):
            if any(name in _entry_names(entry) for entry in entries):
                return label
        return None


def _entry_names(entry: str) -> tuple[str, ...]:
    # "Region*" is QuPath's literal class name; users also type the bare "Region".
    return (entry, entry[:-1]) if entry.endswith("*") and len(entry) > 1 else (entry,)
