"""What labs take elsewhere: any round's tumor mask as OME-TIFF, its GeoJSON, measurements.

``wsiseg export STORE... [--round K] [--what mask,prob,geojson,measurements] [--out DIR]``
works from the slide store alone (the slide file may have moved or gone):

- ``<slide-id>.r<k>.mask.ome.tif``: the round's tumor mask, uint8 **0 / 255** (255 = tumor,
  so every viewer shows it without a lookup table), the pixels where ``refined`` of that round
  is ``>= ceil(255 θ)`` — the rule of :func:`wsiseg.contours.tumor_mask`, so the mask holds
  exactly the pixels the contours outline (including fragments below ``min_area_um2``, which
  the GeoJSON drops);
- ``<slide-id>.r<k>.prob.ome.tif``: the round's tumor probability, uint8 probability × 255;
- ``<slide-id>.r<k>.geojson``: the round's contours, a byte copy of the store's record
  ``rounds/r<k>.geojson`` (written by the same writer as ``wsiseg run``);
- ``measurements.csv``: one row per (slide, round), computed by
  :func:`wsiseg.outputs.measurements` from the round's stored polygons, the figures
  ``summary.csv`` shows for that round. Rows of other slides and rounds are kept.

Pieces: :mod:`~wsiseg.export.pixels` (any round's ``refined``, rebuilt from the undo
backups), :mod:`~wsiseg.export.ome_tiff` (the pyramidal OME-TIFF writer and its frame),
:mod:`~wsiseg.export.measurements` (the ``measurements.csv`` table),
:mod:`~wsiseg.export.stores` (one store, many stores: what goes where).
"""

from wsiseg.export.measurements import (
    MEASUREMENT_FIELDS,
    measurement_row,
    write_measurements_csv,
)
from wsiseg.export.ome_tiff import pyramid_shapes, read_export_frame, write_ome_tiff
from wsiseg.export.pixels import RoundPixels, refined_of_round, resolve_round
from wsiseg.export.stores import (
    EXPORT_KINDS,
    export_paths,
    export_store,
    export_stores,
    parse_what,
)

__all__ = [
    "EXPORT_KINDS",
    "MEASUREMENT_FIELDS",
    "RoundPixels",
    "export_paths",
    "export_store",
    "export_stores",
    "measurement_row",
    "parse_what",
    "pyramid_shapes",
    "read_export_frame",
    "refined_of_round",
    "resolve_round",
    "write_measurements_csv",
    "write_ome_tiff",
]
