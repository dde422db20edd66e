"""A round's contours as the next round reads them: ``rounds/r<k>.geojson`` and its index.

``rounds/r<k>.index.npz`` lies beside the GeoJSON (whose size grows with the slide) and holds
what the next refine round and the server need without parsing it: each feature's id,
geometry (WKB, QuPath frame), byte range in the GeoJSON and area on tissue (working px², NaN
when not known yet). Kept features are then copied verbatim into the next round's file,
only new ones are measured, and the server's lists of ids and of added features read the
ids and byte ranges alone. Plain arrays, loaded without pickle (``np.load`` reads each
array only when it is used); an index that does not match its GeoJSON (size, mtime) is
ignored and the GeoJSON parsed instead. :mod:`wsiseg.rounds` writes both, in a round's
transaction, and the process keeps what it wrote for its next round (a server's next
stroke), for as long as both files are the ones written.

A feature's WKB is written once, into the *block* of the round that made it; later
indexes refer to that block by its digest (:mod:`wsiseg.wkb_blocks`), so a round writes
the geometry of its new features only (not 4.2 MB a stroke on a 67-Mpx slide). A block
missing or not the one referred to makes the index unusable: the GeoJSON is parsed instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely

from wsiseg.atomic import atomic_link, atomic_writer
from wsiseg.errors import WsisegError
from wsiseg.outputs import tissue_covered_px
from wsiseg.qupath import Annotation, annotation_features, is_wsiseg_feature, read_annotations
from wsiseg.store import SlideStore
from wsiseg.wkb_blocks import BLOCK_ARRAYS, OWN_BLOCK, WkbRef, block_arrays, feature_wkb


def round_geojson_path(store: SlideStore, round_k: int) -> Path:
    return store.path / "rounds" / f"r{round_k}.geojson"


@dataclass
class RoundContours:
    """A round's exported contours, as the next refine round uses them.

    ``geometries`` are in QuPath-frame level-0 px (as exported, before QuPath's 0.01 px
    snap), one per feature. ``feature_bytes`` gives features' JSON back.
    """

    ids: list[str]
    geometries: np.ndarray  # of shapely geometries
    _annotations: list[Annotation] | None = None  # when parsed from the GeoJSON (no index)
    _source: Path | None = None
    _offsets: np.ndarray | None = None  # int64 (n + 1): byte ranges in _source
    _stamp: list[int] | None = None  # _source's (size, mtime_ns) when the index matched it
    #: float64 (n,): each feature's area on tissue, working px² (NaN: not known)
    covered_px: np.ndarray | None = None
    _working: np.ndarray | None = None  # working_geometries, once computed
    _wkb: list[bytes] | None = None  # each geometry's WKB as the index holds it
    _wkb_refs: list[WkbRef] | None = None  # ... and where (when read from or written to one)
    _data: bytes | None = None  # _source's bytes, when this process wrote them

    def covered_of(self, store: SlideStore, indices: list[int]) -> np.ndarray:
        """The area on tissue (working px²) of these features: recorded in the index, or
        measured now for those without (a round 0 written before inference had measured)."""
        known = (np.full(len(self.ids), np.nan) if self.covered_px is None
                 else self.covered_px)[np.asarray(indices, dtype=np.intp)]
        missing = np.flatnonzero(~np.isfinite(known))
        if len(missing):
            geoms = self.working_geometries(store)[np.asarray(indices, dtype=np.intp)[missing]]
            parts, owner = shapely.get_parts(geoms, return_index=True)
            known[missing] = np.bincount(owner, weights=tissue_covered_px(store, parts),
                                         minlength=len(missing))
        return known

    def by_id(self) -> dict[str, shapely.Geometry]:
        return dict(zip(self.ids, self.geometries, strict=True))

    def working_geometries(self, store: SlideStore) -> np.ndarray:
        """The features' geometries in working px (one per feature, possibly multi-part);
        transformed once (a round asks twice: comparing the export's AI contours, and
        re-contouring)."""
        if self._working is None:
            self._working = store.frame.transform_geometry(self.geometries, "qupath", "working")
        return self._working

    def working_if_known(self) -> np.ndarray | None:
        """:meth:`working_geometries` when already computed, else None."""
        return self._working

    def wkb_of(self, indices: list[int]) -> list[bytes]:
        """These features' geometries as WKB: the index's bytes when read from one (a
        round keeps most features: copied, not encoded again), else encoded now."""
        if self._wkb is not None:
            return [self._wkb[i] for i in indices]
        return list(shapely.to_wkb(self.geometries[np.asarray(indices, dtype=np.intp)]))

    def wkb_refs_of(self, indices: list[int]) -> list[WkbRef | None]:
        """Where these features' WKB lies in an index's block (None: in none known, so the
        next index writes it)."""
        if self._wkb_refs is None:
            return [None] * len(indices)
        return [self._wkb_refs[i] for i in indices]

    def feature_bytes(self, indices: list[int]) -> list[bytes]:
        """The Feature JSON texts (UTF-8) of these features: byte for byte as written when
        read through the index, written anew from the parsed annotations otherwise."""
        if self._annotations is not None:
            chosen = [self._annotations[i] for i in indices]
            return [text.encode() for _, _, text in annotation_features(chosen)]
        # one read at most (none when this process wrote the file); only the kept
        # features are sliced, from the file these byte ranges were made for
        data = self._source.read_bytes() if self._data is None else self._data
        st = self._source.stat()
        if [st.st_size, st.st_mtime_ns] != self._stamp or len(data) != st.st_size:
            raise WsisegError(f"{self._source}: changed since its contours were read")
        off = self._offsets.tolist()
        return [data[off[i] : off[i + 1] - 1] for i in indices]


def write_round_index(
    store: SlideStore, round_k: int, ids: list[str], wkb: list[bytes],
    offsets: list[int], covered_px: Sequence[float] | None = None, twin: int | None = None,
    refs: Sequence[WkbRef | None] | None = None,
) -> list[WkbRef]:
    """Write ``rounds/r<k>.index.npz`` for the GeoJSON just written (see the module doc);
    ``wkb``: each feature's geometry (QuPath frame) as WKB; ``refs``: where an earlier
    round's index holds it already (None: nowhere, it goes into this round's block).
    ``twin``: a round whose GeoJSON file round k's shares (a hard link: no contour
    changed); when that round's index holds the very arrays too, round k's index is a hard
    link to it, not written. Returns where each feature's WKB now lies.

    See :mod:`wsiseg.wkb_blocks` for where each feature's WKB goes."""
    blocks, placed, own = block_arrays(round_k, wkb, refs)
    geojson = round_geojson_path(store, round_k)
    st = geojson.stat()
    arrays = {
        "ids": np.asarray(ids, dtype=str), "offsets": np.asarray(offsets, dtype=np.int64),
        **blocks,
        "geojson": np.asarray([st.st_size, st.st_mtime_ns], dtype=np.int64),
        "covered_px": np.asarray(np.full(len(ids), np.nan) if covered_px is None
                                 else covered_px, dtype=np.float64),
    }
    path = _index_path(store, round_k)
    # With no geometry of its own, the twin's index is this one whatever its own block
    # holds: the same features, byte ranges and places (its block among them).
    same = [name for name in arrays if own or name not in OWN_BLOCK]
    if twin is not None and _holds_arrays(_index_path(store, twin), arrays, same) and (
            atomic_link(_index_path(store, twin), path)):
        return placed
    with atomic_writer(path) as f:
        np.savez(f, **arrays)
    return placed


def _feature_wkb(store: SlideStore, z: dict[str, np.ndarray]
                 ) -> tuple[list[bytes], list[WkbRef] | None] | None:
    """The WKB of an index's features and where each lies (:func:`feature_wkb`); None:
    the index is unusable."""
    return feature_wkb(z, len(z["ids"]), lambda round_j: _index_arrays(
        _index_path(store, round_j), None, ("block", "block_end")))


def _holds_arrays(index: Path, arrays: dict[str, np.ndarray],
                  names: list[str] | None = None) -> bool:
    """Whether the index file ``index`` has the arrays ``arrays`` has and holds these
    ``names`` of them (None: all) exactly (NaN equal to NaN)."""
    try:
        with np.load(index, allow_pickle=False) as z:
            if sorted(z.files) != sorted(arrays):
                return False
            for name in arrays if names is None else names:
                value, held = arrays[name], z[name]
                if held.dtype != value.dtype or not np.array_equal(
                        held, value, equal_nan=value.dtype.kind == "f"):
                    return False
    except Exception:  # missing, cut short, damaged (zipfile, EOF, key errors): written anew
        return False
    return True


def load_round_contours(store: SlideStore, round_k: int) -> RoundContours:
    """A round's contours: those this process last read or wrote for it while its files are
    unchanged (:func:`remember_written_round`), else from its index, else parsed from its
    GeoJSON when the index is missing or does not match the file."""
    recent = _recall(store, round_k)
    if recent is not None:
        return recent
    geojson = round_geojson_path(store, round_k)
    if not geojson.exists():
        raise WsisegError(f"{store.path}: round {round_k} has no stored contours ({geojson.name})")
    files_stamp = _files_stamp(store, round_k)  # before reading: a later change misses
    st = geojson.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    z = _index_arrays(_index_path(store, round_k), stamp, ("ids", "offsets"),
                      ("covered_px", "wkb", "wkb_end", *BLOCK_ARRAYS))
    found = _feature_wkb(store, z) if z is not None else None
    if z is not None and found is not None:
        parts, refs = found
        contours = RoundContours(ids=z["ids"].tolist(),
                                 geometries=np.asarray(shapely.from_wkb(parts)),
                                 _source=geojson, _offsets=z["offsets"], _stamp=stamp,
                                 covered_px=z.get("covered_px"), _wkb=parts, _wkb_refs=refs)
        _remember(store, round_k, contours, files_stamp)
        return contours
    ours = [a for a in read_annotations(geojson) if a.id and is_wsiseg_feature(a)]
    return RoundContours(ids=[a.id for a in ours],
                         geometries=np.asarray([a.geometry for a in ours], dtype=object),
                         _annotations=ours)


def load_round_ids(store: SlideStore, round_k: int) -> list[str]:
    """A round's feature ids: the index's ids alone (no geometry decoded) when it matches
    its GeoJSON, else those :func:`load_round_contours` parses."""
    recent = _recall(store, round_k)
    if recent is not None:
        return list(recent.ids)
    geojson = round_geojson_path(store, round_k)
    if geojson.exists():
        st = geojson.stat()
        z = _index_arrays(_index_path(store, round_k), [st.st_size, st.st_mtime_ns], ("ids",))
        if z is not None:
            return z["ids"].tolist()
    return load_round_contours(store, round_k).ids


def round_feature_texts(store: SlideStore, round_k: int, wanted: set[str]) -> list[str]:
    """The Feature JSON texts of a round's features whose id is in ``wanted``, in file
    order, byte for byte as the round's GeoJSON holds them: sliced by the index's byte
    ranges (one read of the file, none when this process wrote it: a server's answer to a
    stroke; no geometry decoded), else parsed and written anew."""
    recent = _recall(store, round_k)
    if recent is not None and recent._offsets is not None:
        chosen = [i for i, feature_id in enumerate(recent.ids) if feature_id in wanted]
        with contextlib.suppress(WsisegError, OSError):  # changed or gone just now: see below
            return [text.decode() for text in recent.feature_bytes(chosen)]
    geojson = round_geojson_path(store, round_k)
    if geojson.exists():
        data = geojson.read_bytes()
        st = geojson.stat()
        z = _index_arrays(_index_path(store, round_k), [len(data), st.st_mtime_ns],
                          ("ids", "offsets"))
        if z is not None:
            ids, off = z["ids"].tolist(), z["offsets"]
            return [data[off[i] : off[i + 1] - 1].decode()
                    for i, feature_id in enumerate(ids) if feature_id in wanted]
    contours = load_round_contours(store, round_k)
    return [text.decode() for text in contours.feature_bytes(
        [i for i, f in enumerate(contours.ids) if f in wanted])]


def _index_arrays(index: Path, stamp: list[int] | None, required: tuple[str, ...],
                  optional: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
    """These arrays of an index made for the GeoJSON of this (size, mtime_ns) ``stamp`` (None:
    for any: a block read for a later round); None when the index is missing, stale, or
    cannot be read (cut short, damaged): it is derived data, and the GeoJSON is read
    instead."""
    try:
        with np.load(index, allow_pickle=False) as z:
            if not {"geojson", *required} <= set(z.files) or (
                    stamp is not None and z["geojson"].tolist() != stamp):
                return None
            return {name: z[name] for name in (*required, *optional) if name in z.files}
    except Exception:  # FileNotFoundError, zipfile.BadZipFile, EOFError, ...
        return None


def _index_path(store: SlideStore, round_k: int) -> Path:
    return store.path / "rounds" / f"r{round_k}.index.npz"


# Per store, the contours of the round this process read or wrote last: a server's next
# stroke on a slide reuses them instead of decoding and transforming every feature again
# (16 ms per stroke on a 67-Mpx slide whose tumors have 150 000 vertices). An entry counts
# only while the GeoJSON and the index are the files it was made from: the same inode,
# size, mtime and ctime (both are replaced by a rename, never rewritten in place).
_RECENT: OrderedDict[str, tuple[int, tuple[int, ...], RoundContours]] = OrderedDict()
_RECENT_LOCK = threading.Lock()
_RECENT_STORES = 8


def remember_written_round(
    store: SlideStore, round_k: int, ids: list[str], geometries: np.ndarray,
    wkb: list[bytes], offsets: list[int], covered_px: Sequence[float],
    working: np.ndarray | None = None, data: bytes | None = None,
    wkb_refs: list[WkbRef] | None = None,
) -> None:
    """Keep round k's contours, just written (its GeoJSON, then :func:`write_round_index`
    with these arguments), for its next load; ``working``: the geometries in working px,
    when known; ``data``: the GeoJSON's bytes (its features are then sliced from them, not
    read again); ``wkb_refs``: where the index put each WKB (what it returned)."""
    files_stamp = _files_stamp(store, round_k)
    if files_stamp is None:
        return
    geojson_size, geojson_mtime_ns = files_stamp[1:3]
    contours = RoundContours(
        ids=list(ids), geometries=geometries, _source=round_geojson_path(store, round_k),
        _offsets=np.asarray(offsets, dtype=np.int64), _stamp=[geojson_size, geojson_mtime_ns],
        covered_px=np.asarray(covered_px, dtype=np.float64), _working=working, _wkb=list(wkb),
        _wkb_refs=wkb_refs, _data=data)
    _remember(store, round_k, contours, files_stamp)


def forget_round_contours(store: SlideStore, round_k: int) -> None:
    """Drop what :func:`remember_written_round` kept for round k (a round rolled back)."""
    with _RECENT_LOCK:
        hit = _RECENT.get(str(store.path.resolve()))
        if hit is not None and hit[0] == round_k:
            del _RECENT[str(store.path.resolve())]


def _remember(store: SlideStore, round_k: int, contours: RoundContours,
              files_stamp: tuple[int, ...] | None) -> None:
    if files_stamp is None:
        return
    key = str(store.path.resolve())
    with _RECENT_LOCK:
        _RECENT[key] = (round_k, files_stamp, contours)
        _RECENT.move_to_end(key)
        while len(_RECENT) > _RECENT_STORES:
            _RECENT.popitem(last=False)


def _recall(store: SlideStore, round_k: int) -> RoundContours | None:
    with _RECENT_LOCK:
        hit = _RECENT.get(str(store.path.resolve()))
    if hit is None or hit[0] != round_k or hit[1] != _files_stamp(store, round_k):
        return None
    return hit[2]


def _files_stamp(store: SlideStore, round_k: int) -> tuple[int, ...] | None:
    """Round k's GeoJSON and index as (inode, size, mtime, ctime) each; None if missing."""
    try:
        stats = [round_geojson_path(store, round_k).stat(), _index_path(store, round_k).stat()]
    except FileNotFoundError:
        return None
    return tuple(v for st in stats
                 for v in (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
