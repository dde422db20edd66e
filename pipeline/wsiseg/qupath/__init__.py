"""QuPath GeoJSON in and out: geometries in, geometries out.

Reads every container and property form QuPath 0.2–0.7 writes (``qupath-geojson.md`` §1, §4.2)
and writes tumour contours the way QuPath ≥ 0.4 imports them without complaint (§4.1, §2.5).
All coordinates are level-0 pixels in **QuPath's** frame; the caller converts with
:class:`wsiseg.slide.frame.Frame`. This package knows nothing of zarr, torch or slides.

Modules: :mod:`~wsiseg.qupath.classes` (class table, labels, annotations),
:mod:`~wsiseg.qupath.read` (the reader) on :mod:`~wsiseg.qupath.containers` (files → features)
and :mod:`~wsiseg.qupath.geometry` (GeoJSON → shapely), :mod:`~wsiseg.qupath.write` (the writer)
on :mod:`~wsiseg.qupath.snap` (one geometry snapped to QuPath's grid, valid) and
:mod:`~wsiseg.qupath.text` (its GeoJSON text, in canonical order).
"""

from wsiseg.qupath.classes import (
    QUPATH_CLASS_COLORS,
    WSISEG_SOURCE,
    Annotation,
    ClassMapping,
    Label,
    is_wsiseg_feature,
)
from wsiseg.qupath.read import read_annotations, read_annotations_report
from wsiseg.qupath.write import (
    annotation_features,
    feature_collection_bytes,
    write_annotations,
    write_feature_collection,
)

__all__ = [
    "QUPATH_CLASS_COLORS",
    "WSISEG_SOURCE",
    "Annotation",
    "ClassMapping",
    "Label",
    "annotation_features",
    "feature_collection_bytes",
    "is_wsiseg_feature",
    "read_annotations",
    "read_annotations_report",
    "write_annotations",
    "write_feature_collection",
]
