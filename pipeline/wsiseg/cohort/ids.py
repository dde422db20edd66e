"""Slide ids: one output name per slide, stable across reruns and unique in a run."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from wsiseg.destination import Destination
from wsiseg.store import STORE_FORMAT, SourceInfo, file_fingerprint

log = logging.getLogger(__name__)


def assign_slide_ids(slides: Sequence[Path], out: Path | Destination) -> dict[Path, str]:
    """Store names: the file stem, made unique when two slides would share one.

    Two slides with the same stem in different folders get ``<stem>-<8 hex of the path>``.
    A stem whose existing store belongs to another slide (another fingerprint) does too,
    so a store is never taken over by a different slide.
    """
    dest = out if isinstance(out, Destination) else Destination.parse(out)
    by_stem: dict[str, list[Path]] = {}
    for path in slides:
        by_stem.setdefault(_stem(path), []).append(path)
    ids: dict[Path, str] = {}
    for stem, paths in by_stem.items():
        for path in paths:
            unique = len(paths) == 1 and not _store_of_other_slide(dest, stem, path)
            ids[path] = stem if unique else f"{stem}-{_path_hash(path)}"
    return ids


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _path_hash(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]


def _store_of_other_slide(dest: Destination, slide_id: str, slide: Path) -> bool:
    source = stored_source(dest.store_attrs(slide_id))
    if source is None or Path(source.path) == slide.resolve():
        return False
    try:
        return file_fingerprint(slide) != source.fingerprint
    except OSError:
        return True


def stored_source(attrs: dict | None) -> SourceInfo | None:
    """The source slide recorded in a store's attributes (None: no store of this format)."""
    if attrs is None or attrs.get("format") != STORE_FORMAT:
        return None
    try:
        return SourceInfo.from_dict(attrs["source"])
    except (KeyError, TypeError):
        return None

