"""The zarr (v3) slide store: one group per slide, ``<out>/<slide-id>.zarr``.

Arrays, all at the working resolution except ``tissue``:

==============  ==================  =====  ===============================================
name            shape               dtype  meaning
==============  ==================  =====  ===============================================
``image``       (3, H, W)           uint8  RGB, channel first (OME-Zarr); glass never written
``guide``       (H, W)              uint8  GuideNet tumor probability × 255, never edited
``refined``     (H, W)              uint8  probability after refine rounds (= guide first)
``scribbles``   (H, W)              int8   0 none, +1 tumor, −1 non-tumor (accumulated)
``tissue``      (h, w)              bool   tissue mask at ``tissue.mask_mpp``
``tiled``       (chunk rows, cols)  uint8  1 where the ``image`` chunk is complete
==============  ==================  =====  ===============================================

``image`` is an OME-Zarr (NGFF 0.5) image: the group's ``ome`` attributes declare its axes
(c channel; y, x space in micrometres, scale = the working µm/px) and its RGB channels, so
an OME-Zarr reader opens the store as an image (tests/test_ome_zarr.py: ome-zarr-py's). One
chunk holds all three channels of a ``chunk_px``² tile, so a region is still read as one
chunk per tile, and patches go to the network channel first as they are stored.

Group attributes live under the key ``wsiseg``: format version, pipeline version, source
slide (path, size, mtime, content fingerprint), frame, workflow, stage status, model cards
and refine rounds. Completed chunks are recorded in the ``tiled`` array rather than in the
attributes (a departure from DESIGN.md): each tiling task marks its own chunk, so parallel
writers never race on one attribute document, and a marker is written only after its chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from wsiseg import __version__, journal
from wsiseg.atomic import atomic_write_bytes
from wsiseg.config import Workflow, workflow_from_dict
from wsiseg.errors import StoreError
from wsiseg.filecache import read_once
from wsiseg.lock import StoreLock, is_writable
from wsiseg.slide.frame import Frame

__all__ = ["GLASS_RGB", "SlideStore", "SourceInfo", "StoreError", "StoreLock", "pad_value"]

log = logging.getLogger(__name__)

#: 2: ``image`` channel first (3, H, W), an OME-Zarr image; 1 was (H, W, 3), which NGFF
#: forbids (channel after space). :meth:`SlideStore.open` refuses other formats; `wsiseg
#: tile` and `wsiseg run` rebuild such a store (the old one kept aside as ``*.stale-*``).
STORE_FORMAT = 2
_FINGERPRINT_BYTES = 1 << 20  # hash the first and last MiB: cheap, and catches rewrites

#: What ``image`` reads where nothing was tiled (glass, the slide's edge): white, as
#: glass looks in a brightfield slide and as QuPath shows it, so patches at tissue edges
#: (inference, refine windows, training) see glass, never a black block.
GLASS_RGB = 255


@dataclass(frozen=True)
class SourceInfo:
    """Identity of the slide file a store was built from."""

    path: str
    size: int
    mtime: float
    fingerprint: str

    @classmethod
    def of(cls, path: str | Path) -> SourceInfo:
        path = Path(path).resolve()
        stat = path.stat()
        return cls(str(path), stat.st_size, stat.st_mtime, file_fingerprint(path))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime": self.mtime,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceInfo:
        return cls(str(d["path"]), int(d["size"]), float(d["mtime"]), str(d["fingerprint"]))


def file_fingerprint(path: Path) -> str:
    """sha256 of the file size, its first MiB and its last MiB (hex)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


class SlideStore:
    """An open slide store. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        # Array handles, opened once per store object: opening one reads its metadata from
        # disk (≈ 0.4 ms; a refine round asks ~15 times). A handle holds no pixels, and the
        # arrays' shapes and chunks never change.
        self._arrays: dict[str, zarr.Array] = {}
        self._tissue: np.ndarray | None = None

    # -- creation / opening ---------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        frame: Frame,
        source: SourceInfo,
        workflow: Workflow,
        tissue: np.ndarray,
        slide_info: dict[str, Any],
    ) -> SlideStore:
        """Create a new, empty store (overwriting nothing: ``path`` must not exist)."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: already exists")
        rows, cols = frame.working_shape
        chunk = workflow.tiling.chunk_px
        group = zarr.open_group(str(path), mode="w-", zarr_format=3)
        group.create_array(
            "image", shape=(3, rows, cols), chunks=(3, chunk, chunk), dtype="uint8",
            fill_value=GLASS_RGB, dimension_names=("c", "y", "x"),
        )
        for name, dtype in (("guide", "uint8"), ("refined", "uint8"), ("scribbles", "int8")):
            group.create_array(
                name, shape=(rows, cols), chunks=(chunk, chunk), dtype=dtype, fill_value=0,
                dimension_names=("y", "x"),
            )
        grid = chunk_grid_shape(frame.working_shape, chunk)
        group.create_array("tiled", shape=grid, chunks=(1, 1), dtype="uint8", fill_value=0)
        tissue_arr = group.create_array(
            "tissue", shape=tissue.shape, chunks=tissue.shape, dtype="bool", fill_value=False,
        )
        tissue_arr[...] = tissue
        attrs = {
            "format": STORE_FORMAT,
            "version": __version__,
            "created": _now(),
            "source": source.to_dict(),
            "slide": slide_info,
            "frame": frame.to_dict(),
            "workflow": workflow.to_dict(),
            "stages": {"tiling": "pending", "guide": "pending"},
            "models": {},
            "rounds": [],
        }
        group.attrs.update({"wsiseg": attrs, "ome": _ome_multiscales(frame)})
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r+") -> SlideStore:
        """Open an existing store; a missing, foreign or newer-format store is a StoreError."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a wsiseg slide store (no zarr.json)")
        if journal.needs_recovery(path):
            recover_interrupted(path)
        try:
            group = zarr.open_group(str(path), mode=mode)
        except Exception as exc:  # zarr raises several types for a damaged group
            raise StoreError(f"{path}: cannot open the slide store ({exc})") from None
        attrs = group.attrs.get("wsiseg")
        if not isinstance(attrs, dict):
            raise StoreError(f"{path}: a zarr group, but not a wsiseg slide store")
        fmt = attrs.get("format")
        if fmt != STORE_FORMAT:
            raise StoreError(
                f"{path}: store format {fmt} is not the format {STORE_FORMAT} of wsiseg "
                f"{__version__}; rebuild it with `wsiseg tile` (or --force)"
            )
        return cls(path, group)

    def reload(self, *, recover: bool = False) -> None:
        """Read the store's attributes again (after another process, or a rolled-back
        transaction, changed them: zarr keeps a group's attributes in memory);
        ``recover``: first roll back an interrupted change (the caller holds the lock)."""
        if recover and journal.needs_recovery(self.path):
            recover_interrupted(self.path, locked=True)
        mode = "r" if self.group.store.read_only else "r+"
        self.group = zarr.open_group(str(self.path), mode=mode)
        self._arrays.clear()
        self._tissue = None

    # -- attributes -----------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs["wsiseg"])

    def update_attrs(self, **changes: Any) -> None:
        """Replace top-level keys of the ``wsiseg`` attributes (single writer only).

        The group's ``zarr.json`` is written as zarr writes it (the same document), but
        with the C JSON encoder and by an atomic replace: zarr copies the attributes deep
        (``dataclasses.asdict``) and indents them with the pure-Python encoder, O(history)
        in Python, so that a refine round's write of a store with 62 rounds cost 12 ms, 46
        ms with 300 and 140 with 1 000 (a live session's strokes); 1.5, 4 and 13 ms this way.
        zarr's own write where it would refuse (read-only) or where the group is not a
        plain zarr v3 group at the root of a local store."""
        attrs = self.attrs
        attrs.update(changes)
        metadata = self.group.metadata
        store = self.group.store
        if (store.read_only or metadata.consolidated_metadata is not None
                or not isinstance(store, LocalStore) or metadata.zarr_format != 3
                or self.group.store_path.path != ""):
            self.group.attrs["wsiseg"] = attrs  # zarr's own write (or its refusal)
            return
        document = {"attributes": {**metadata.attributes, "wsiseg": attrs},
                    "zarr_format": metadata.zarr_format, "node_type": "group"}
        atomic_write_bytes(self.path / "zarr.json", json.dumps(document, allow_nan=True).encode())
        metadata.attributes["wsiseg"] = attrs  # what zarr's update keeps in memory too

    def set_stage(self, stage: str, status: str) -> None:
        stages = dict(self.attrs["stages"])
        stages[stage] = status
        self.update_attrs(stages=stages)

    def stage(self, stage: str) -> str:
        return str(self.attrs["stages"].get(stage, "pending"))

    @property
    def frame(self) -> Frame:
        return Frame.from_dict(self.attrs["frame"])

    @property
    def workflow(self) -> Workflow:
        return workflow_from_dict(self.attrs["workflow"], source=f"{self.path} (stored workflow)")

    @property
    def source(self) -> SourceInfo:
        return SourceInfo.from_dict(self.attrs["source"])

    @property
    def chunk_px(self) -> int:
        return int(self.array("image").chunks[-1])

    @property
    def tissue_mask(self) -> np.ndarray:
        """bool (h, w) at the workflow's mask resolution, read-only: written when the store
        is created, never after, so read once per store object (a refine round asks 3–4
        times) and kept by the process while its files are the same ones
        (:func:`wsiseg.filecache.read_once`: a server opens the store anew for each stroke;
        2.5 ms a read for the 1024² mask of a 67-Mpx slide)."""
        if self._tissue is None:
            self._tissue = read_once(self.path / "tissue", lambda: np.asarray(
                self.array("tissue")[...], dtype=bool))
        return self._tissue

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]  # type: ignore[assignment]
        return self._arrays[name]

    def __getitem__(self, name: str) -> zarr.Array:
        return self.array(name)


def pad_value(array: zarr.Array | np.ndarray) -> int:
    """What a read of ``array`` beyond its edge should see: white glass for an RGB
    ``image`` (3-D), the fill value (0 for a numpy array) otherwise."""
    return GLASS_RGB if array.ndim == 3 else int(getattr(array, "fill_value", 0))


def chunk_grid_shape(shape: tuple[int, int], chunk_px: int) -> tuple[int, int]:
    """Number of (chunk rows, chunk cols) covering ``shape`` = (rows, cols)."""
    return -(-shape[0] // chunk_px), -(-shape[1] // chunk_px)


def source_changed(store: SlideStore, slide_path: Path) -> str | None:
    """Why the store no longer matches ``slide_path`` (None when it still does).

    Size or content fingerprint differing means the slide was rewritten. An mtime alone
    differing (a copy, a touch) is checked against the fingerprint and then accepted.
    """
    return source_differs(store.source, slide_path)


def source_differs(old: SourceInfo, slide_path: Path) -> str | None:
    """Why ``slide_path`` is no longer the slide ``old`` describes (None when it still is);
    see :func:`source_changed`."""
    stat = slide_path.stat()
    if stat.st_size != old.size:
        return f"size changed ({old.size} → {stat.st_size} bytes)"
    if stat.st_mtime != old.mtime and file_fingerprint(slide_path) != old.fingerprint:
        return "content changed (fingerprint differs)"
    return None


def retire_store(path: Path) -> Path:
    """Move a stale store aside (never delete work): ``<name>.stale-<timestamp>``."""
    target = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, target)
    return target


def remove_store(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _ome_multiscales(frame: Frame) -> dict[str, Any]:
    """OME-Zarr (NGFF 0.5) metadata of ``image``: one scale level, axes (c, y, x) with y and
    x in micrometres at the working µm/px, and the three channels as red, green, blue.

    NGFF orders axes time, channel, space; ``omero`` tells viewers to show the channels as
    one RGB image (each channel its colour, full 0–255 window) rather than three greys.
    """
    mpp = frame.working_mpp
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": "image",
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": [
                    {
                        "path": "image",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, mpp, mpp]}
                        ],
                    }
                ],
            }
        ],
        "omero": {
            "channels": [
                {"label": label, "color": color, "active": True,
                 "window": {"min": 0, "max": 255, "start": 0, "end": 255}}
                for label, color in (("red", "FF0000"), ("green", "00FF00"),
                                     ("blue", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        },
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def recover_interrupted(path: Path, *, locked: bool = False) -> None:
    """Roll back a change to the store ``path`` that was interrupted (kill -9, power loss),
    saying so; ``locked``: the caller holds the store lock already.

    A store whose lock is held is being changed right now: its journal is that process's,
    and left alone. A read-only store with an interrupted change cannot be rolled back.
    """
    if not locked:
        if not is_writable(path):
            if not journal.pending(path):
                return  # only leftovers of a journal never started: nothing to roll back
            raise StoreError(
                f"{path}: a change to this store was interrupted and it cannot be rolled back "
                "here: store is read-only; run any wsiseg command on it where it is writable"
            )
        try:
            with StoreLock(path, "recover"):
                recover_interrupted(path, locked=True)
        except StoreError as exc:
            if "another wsiseg process" not in str(exc):
                raise
        return
    said = journal.recover(path)
    if said is not None:
        log.warning("%s: %s was interrupted and has been rolled back: the store and its "
                    "published files are as before it; run it again", path, said)
