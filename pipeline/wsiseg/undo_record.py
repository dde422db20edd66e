"""What a refine round overwrote: its undo record ``history/r<k>`` in the slide store.

For every box a round changed ((row0, col0, rows, cols), working px) the record keeps the
``scribbles`` pixels from before it and, where the round refined, the ``refined`` ones.
``wsiseg undo`` writes them back (:func:`wsiseg.rounds.undo`), and
:mod:`wsiseg.export.pixels` overlays them to rebuild any earlier round.

A record is one zarr array, ``history/r<k>``: 1-D bytes, for each box its ``refined``
pixels (when kept) then its ``scribbles`` pixels, each in C order, box after box, in one
chunk; the array's attributes list each box's region, whether ``refined`` was kept and the
byte where its pixels start (``boxes``), and each kind's dtype (``dtypes``). Creating a
zarr node through zarr's API costs ~8 ms (metadata written through its event loop), and a
stroke's round has 2–3 boxes: as a group of one array per box and kind the record took
~25 ms of each served stroke, as one array ~8 ms. Records written as such a group (arrays
``refined_<i>``, ``scribbles_<i>``, the boxes in the group's attributes) are read as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zarr

from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore


@dataclass(frozen=True)
class Backup:
    """Pixels of one box before a round; ``refined`` None when the round did not touch it."""

    region: tuple[int, int, int, int]  # (row0, col0, rows, cols), working px
    refined: np.ndarray | None  # (rows, cols), the store's ``refined`` dtype (uint8)
    scribbles: np.ndarray  # (rows, cols), the store's ``scribbles`` dtype (int8 labels)


def save_backup(store: SlideStore, round_k: int, backups: list[Backup]) -> None:
    """Write round k's undo record (replacing one a failed attempt at round k left)."""
    group = store.group.require_group("history")
    name = f"r{round_k}"
    if name in group:
        del group[name]  # left by a round that failed before it was recorded
    dtypes: dict[str, str] = {}
    boxes, parts, size = [], [], 0
    for b in backups:
        rows, cols = b.region[2], b.region[3]
        boxes.append({"region": [int(v) for v in b.region], "refined": b.refined is not None,
                      "offset": size})
        for kind, data in (("refined", b.refined), ("scribbles", b.scribbles)):
            if data is None:
                continue
            if data.shape != (rows, cols) or dtypes.setdefault(kind, data.dtype.str) != \
                    data.dtype.str:
                raise ValueError(f"{kind} backup of {b.region}: {data.dtype} {data.shape}, "
                                 f"expected ({rows}, {cols}) of one dtype per kind")
            parts.append(np.ascontiguousarray(data).view(np.uint8).ravel())
            size += len(parts[-1])
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    record = group.create_array(name, shape=flat.shape, dtype=np.uint8,
                                chunks=(max(1, len(flat)),), fill_value=0,
                                attributes={"boxes": boxes, "dtypes": dtypes})
    record[...] = flat


def load_backup(store: SlideStore, round_k: int) -> list[Backup]:
    """Round k's undo record: the pixels of each box it changed, from before it."""
    node = _record(store, round_k)
    boxes = node.attrs["boxes"]
    if isinstance(node, zarr.Group):  # written before: one array per box and kind
        return [Backup(tuple(box["region"]),
                       np.asarray(node[f"refined_{i}"][...]) if box["refined"] else None,
                       np.asarray(node[f"scribbles_{i}"][...]))
                for i, box in enumerate(boxes)]
    flat = np.asarray(node[...])
    dtypes = {kind: np.dtype(code) for kind, code in node.attrs["dtypes"].items()}
    out = []
    for box in boxes:
        region = tuple(int(v) for v in box["region"])
        start = int(box["offset"])
        pixels = {}
        for kind in ("refined", "scribbles") if box["refined"] else ("scribbles",):
            size = region[2] * region[3] * dtypes[kind].itemsize
            pixels[kind] = flat[start : start + size].view(dtypes[kind]).reshape(region[2:])
            start += size
        out.append(Backup(region, pixels.get("refined"), pixels["scribbles"]))
    return out


def backup_regions(store: SlideStore, round_k: int) -> list[tuple[tuple[int, int, int, int],
                                                                   bool]]:
    """The boxes of round k's undo record, each with whether its ``refined`` pixels were
    kept, without reading the pixels."""
    return [(tuple(int(v) for v in box["region"]), bool(box["refined"]))
            for box in _record(store, round_k).attrs["boxes"]]


def _record(store: SlideStore, round_k: int) -> zarr.Array | zarr.Group:
    try:
        return store.group["history"][f"r{round_k}"]
    except KeyError:
        raise WsisegError(f"{store.path}: round {round_k} has no undo record "
                          f"(history/r{round_k})") from None
