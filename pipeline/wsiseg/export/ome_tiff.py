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

OME-TIFF layout: BigTIFF, tiled (``tile_px``², zlib/deflate), level 0 at the working
resolution with its physical pixel size (OME ``PhysicalSizeX/Y`` in µm and TIFF resolution in
pixels per cm), lower levels (÷2 each, down to one tile) in SubIFDs — max of 2×2 for the mask
(a focus stays visible when zoomed out), mean for the probability. The slide frame (level-0
size and mpp, working mpp, OpenSlide bounds offset) is stored as JSON in the OME image
``Description`` and as a ``wsiseg.frame`` MapAnnotation; :func:`read_export_frame` turns it
back into a :class:`~wsiseg.slide.frame.Frame`, whose ``working_to_level0`` maps mask pixels
onto the slide.

Memory is a few tiles whatever the slide size: level 0 is read tile by tile (through
:func:`refined_of_round` for past rounds) and each level's tiles are reduced into a compressed
scratch zarr next to the output, from which the next level is read; the file is written to a
temporary name and renamed when complete.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import tempfile
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from numpy.typing import NDArray

from wsiseg.contours import uint8_threshold
from wsiseg.errors import UsageError, WsisegError
from wsiseg.rounds import polygons_of_round, round_geojson_path
from wsiseg.slide.frame import Frame
from wsiseg.store import SlideStore, StoreLock

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

EXPORT_KINDS = ("mask", "prob", "geojson", "measurements")
DEFAULT_WHAT = frozenset({"mask", "geojson", "measurements"})
MEASUREMENT_FIELDS = (
    "slide_id", "round", "tissue_mm2", "tumor_mm2", "tumor_fraction", "foci",
    "largest_focus_mm2",
)
MEASUREMENTS_CSV = "measurements.csv"
OME_FRAME_NAMESPACE = "wsiseg.frame"
MASK_TUMOR = 255  # mask value of tumor pixels (background 0)
_BACKUP_CACHE_BYTES = 64 << 20  # decoded undo boxes kept while tiles cross them
_ENCODE_BUFFER_TILES = 16  # tiles tifffile may hold while encoding in parallel


# -- any round's pixels ----------------------------------------------------------------------
class RoundPixels:
    """``refined`` as it was after round ``round_k``, read block by block.

    The store's ``refined`` holds the latest round. Every refine round k kept the pixels it
    overwrote in ``history/r<k>`` (:mod:`wsiseg.rounds`); reading a block overlays, for
    k = latest … round_k + 1 (the order ``wsiseg undo`` restores them), the parts of those
    backup boxes that intersect the block. Nothing of size H × W is ever held: one block, plus
    decoded backup boxes (at most ``_BACKUP_CACHE_BYTES``).

    Attributes
    ----------
    shape : (int, int)
        (H, W) working pixels.
    dtype : numpy.dtype
        uint8 (probability × 255).
    chunks : (int, int)
        The chunk shape of ``refined``: reads aligned to it decode each chunk once.
    """

    def __init__(self, store: SlideStore, round_k: int) -> None:
        self.store = store
        self.round = round_k
        self.base = store["refined"]
        self.shape: tuple[int, int] = (int(self.base.shape[0]), int(self.base.shape[1]))
        self.dtype = np.dtype(self.base.dtype)
        self.chunks: tuple[int, int] = (int(self.base.chunks[0]), int(self.base.chunks[1]))
        # (round, box index, (row0, col0, rows, cols)) in the order they are applied
        self._boxes: list[tuple[int, int, tuple[int, int, int, int]]] = []
        later = sorted((k for k in _round_numbers(store) if k > round_k), reverse=True)
        for k in later:
            try:
                group = store.group["history"][f"r{k}"]
            except KeyError:
                raise WsisegError(
                    f"{store.path}: round {k} has no undo record (history/r{k}), so round "
                    f"{round_k} cannot be rebuilt"
                ) from None
            for i, box in enumerate(group.attrs["boxes"]):
                if box["refined"]:
                    r0, c0, rows, cols = (int(v) for v in box["region"])
                    self._boxes.append((k, i, (r0, c0, rows, cols)))
        self._cache: OrderedDict[tuple[int, int], NDArray[np.uint8]] = OrderedDict()
        self._cache_bytes = 0

    def __getitem__(self, key: Any) -> NDArray[np.uint8]:
        (r0, r1), (c0, c1) = _block_bounds(key, self.shape)
        block = np.array(self.base[r0:r1, c0:c1], dtype=self.dtype)  # a copy we may overlay
        for k, i, (br0, bc0, brows, bcols) in self._boxes:
            ir0, ir1 = max(r0, br0), min(r1, br0 + brows)
            ic0, ic1 = max(c0, bc0), min(c1, bc0 + bcols)
            if ir1 <= ir0 or ic1 <= ic0:
                continue
            pixels = self._backup(k, i)
            block[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0] = pixels[
                ir0 - br0 : ir1 - br0, ic0 - bc0 : ic1 - bc0
            ]
        return block

    def _backup(self, k: int, i: int) -> NDArray[np.uint8]:
        """The decoded ``refined`` backup box i of round k (each is a single zarr chunk)."""
        cached = self._cache.get((k, i))
        if cached is not None:
            self._cache.move_to_end((k, i))
            return cached
        pixels = np.asarray(self.store.group["history"][f"r{k}"][f"refined_{i}"][...])
        if pixels.nbytes <= _BACKUP_CACHE_BYTES:
            self._cache[(k, i)] = pixels
            self._cache_bytes += pixels.nbytes
            while self._cache_bytes > _BACKUP_CACHE_BYTES:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= dropped.nbytes
        return pixels


def refined_of_round(store: SlideStore, round_k: int) -> RoundPixels:
    """The ``refined`` probability (uint8 × 255, (H, W)) as it was after round ``round_k``.

    Returns an array-like with ``.shape``, ``.dtype``, ``.chunks`` and numpy slicing
    ``[r0:r1, c0:c1]``; see :class:`RoundPixels`. ``round_k`` must be a round of the store
    (:func:`resolve_round`).
    """
    resolve_round(store, round_k)
    return RoundPixels(store, round_k)


def resolve_round(store: SlideStore, round_k: int | None) -> int:
    """``round_k`` checked against the store's rounds; ``None`` means the latest round."""
    numbers = _round_numbers(store)
    if not numbers:
        raise WsisegError(f"{store.path}: the store has no rounds yet; `wsiseg run` it first")
    if round_k is None:
        return numbers[-1]
    if round_k not in numbers:
        listed = ", ".join(str(k) for k in numbers)
        raise WsisegError(f"{store.path}: round {round_k} does not exist; rounds: {listed}")
    return int(round_k)


def _round_numbers(store: SlideStore) -> list[int]:
    return [int(r["round"]) for r in store.attrs.get("rounds") or []]


def _block_bounds(key: Any, shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``[r0:r1, c0:c1]`` (or ``[...]``) as ((r0, r1), (c0, c1)), clipped to ``shape``."""
    if key is Ellipsis:
        key = (slice(None), slice(None))
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
        raise TypeError(f"index with [r0:r1, c0:c1] only, got {key!r}")
    out = []
    for k, n in zip(key, shape, strict=True):
        start, stop, step = k.indices(n)
        if step != 1:
            raise TypeError(f"index with unit steps only, got {key!r}")
        out.append((start, max(start, stop)))
    return out[0], out[1]


# -- OME-TIFF ----------------------------------------------------------------------------------
def pyramid_shapes(shape: tuple[int, int], tile_px: int) -> list[tuple[int, int]]:
    """(rows, cols) of each level: level 0 is ``shape``, each next one ÷2 (rounded up), down
    to the first level that fits in one tile."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while max(shapes[-1]) > tile_px:
        rows, cols = shapes[-1]
        shapes.append((-(-rows // 2), -(-cols // 2)))
    return shapes


def _quarters(block: NDArray[np.uint8], pad_mode: str) -> list[NDArray[np.uint8]]:
    """The four phases of a block's 2×2 cells, an odd edge padded first.

    Strided slices rather than :func:`skimage.measure.block_reduce`, whose generic block view
    is ~40× slower on a 512² tile and would dominate the export.
    """
    pad = ((0, block.shape[0] % 2), (0, block.shape[1] % 2))
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode=pad_mode)
    return [block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]]


def _reduce_max(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Max of each 2×2 cell (an odd edge padded with background)."""
    return np.maximum.reduce(_quarters(block, "constant"))


def _reduce_mean(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Mean of each 2×2 cell, rounded half up (an odd edge averages with itself)."""
    total = np.add.reduce([q.astype(np.uint16) for q in _quarters(block, "edge")])
    return ((total + 2) // 4).astype(np.uint8)


def write_ome_tiff(
    array_like: Any,
    path: Path,
    *,
    mpp: float,
    frame_dict: Mapping[str, Any],
    kind: str,
    threshold_u8: int | None = None,
    tile_px: int = 512,
    name: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a (H, W) uint8 map as a tiled, pyramidal OME-TIFF in bounded memory.

    Parameters
    ----------
    array_like : ArrayLike2D
        (H, W) uint8 probability × 255 at the working resolution, with numpy slicing
        (``zarr.Array``, :class:`RoundPixels`, ``numpy.ndarray``); read one tile at a time.
    path : Path
        Output file (``*.ome.tif``); written to a temporary name, then renamed.
    mpp : float
        µm per pixel of ``array_like`` (the working mpp).
    frame_dict : mapping
        :meth:`Frame.to_dict` of the slide, stored so the image maps back onto the slide.
    kind : {"mask", "prob"}
        ``"mask"``: pixels ``>= threshold_u8`` become 255, the others 0; lower levels take the
        max of 2×2. ``"prob"``: values as they are; lower levels take the mean of 2×2.
    threshold_u8 : int, optional
        Required for ``"mask"``: :func:`wsiseg.contours.uint8_threshold` of θ.
    tile_px : int
        TIFF tile edge (a multiple of 16).
    name : str, optional
        OME image name.
    extra : mapping, optional
        More JSON-able fields for the ``Description`` (slide id, round, ...).

    Returns
    -------
    Path
        ``path``.
    """
    if kind not in ("mask", "prob"):
        raise ValueError(f"kind must be 'mask' or 'prob', got {kind!r}")
    if kind == "mask" and threshold_u8 is None:
        raise ValueError("a mask needs threshold_u8")
    if tile_px < 16 or tile_px % 16:
        raise ValueError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    if len(array_like.shape) != 2 or np.dtype(array_like.dtype) != np.uint8:
        raise ValueError(
            f"expected a (H, W) uint8 array, got {array_like.dtype} {tuple(array_like.shape)}"
        )
    path = Path(path)
    shapes = pyramid_shapes(tuple(array_like.shape), tile_px)
    thr = None if threshold_u8 is None or kind == "prob" else int(threshold_u8)
    if thr is not None:

        def convert(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
            return np.where(block >= thr, np.uint8(MASK_TUMOR), np.uint8(0))

        reduce = _reduce_max
    else:

        def convert(block: NDArray[np.uint8]) -> NDArray[np.uint8]:
            return block

        reduce = _reduce_mean

    description = {
        "wsiseg": {
            "kind": kind,
            "values": "0 background, 255 tumor" if kind == "mask" else "probability × 255",
            "threshold_u8": thr,
            "frame": dict(frame_dict),
            **dict(extra or {}),
        }
    }
    metadata = {
        "axes": "YX",
        "Name": name or path.name,
        "Description": json.dumps(description, ensure_ascii=False),
        "PhysicalSizeX": float(mpp),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": float(mpp),
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": ["tumor" if kind == "mask" else "tumor probability"]},
        "MapAnnotation": {
            "Namespace": OME_FRAME_NAMESPACE,
            "Value": {k: json.dumps(v) for k, v in dict(frame_dict).items()},
        },
    }
    tile_bytes = tile_px * tile_px
    options: dict[str, Any] = {
        "tile": (tile_px, tile_px),
        "compression": "zlib",
        "photometric": "minisblack",
        "resolutionunit": "CENTIMETER",
        "dtype": np.uint8,
        "maxworkers": min(4, os.cpu_count() or 1),
        "buffersize": _ENCODE_BUFFER_TILES * tile_bytes,
    }

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with (
            tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.levels.") as work,
            tifffile.TiffWriter(tmp_name, bigtiff=True, ome=True) as tif,
        ):
            source: Any = array_like
            for level, shape in enumerate(shapes):
                following = None
                if level + 1 < len(shapes):
                    following = _scratch_level(Path(work) / f"l{level + 1}", shapes[level + 1],
                                               tile_px // 2)
                step_mpp = mpp * 2**level
                tiles = _level_tiles(source, shape, tile_px, convert if level == 0 else None,
                                     reduce, following)
                if level == 0:
                    tif.write(tiles, shape=shape, subifds=len(shapes) - 1, metadata=metadata,
                              resolution=(1e4 / step_mpp, 1e4 / step_mpp), **options)
                else:
                    tif.write(tiles, shape=shape, subfiletype=1, metadata=None,
                              resolution=(1e4 / step_mpp, 1e4 / step_mpp), **options)
                source = following
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would make shared outputs unreadable
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return path


def _scratch_level(where: Path, shape: tuple[int, int], chunk_px: int) -> zarr.Array:
    """A compressed on-disk array for one pyramid level; chunks are half a tile so each tile
    of the level above fills exactly one chunk (no read-modify-write)."""
    return zarr.create_array(
        store=str(where), shape=shape, chunks=(chunk_px, chunk_px), dtype="uint8",
        fill_value=0, zarr_format=3,
    )


def _level_tiles(
    source: Any,
    shape: tuple[int, int],
    tile_px: int,
    convert: Callable[[NDArray[np.uint8]], NDArray[np.uint8]] | None,
    reduce: Callable[[NDArray[np.uint8]], NDArray[np.uint8]],
    following: zarr.Array | None,
) -> Iterator[NDArray[np.uint8]]:
    """The level's tiles in TIFF order (row-major), each reduced into the next level as it
    passes. Edge tiles are smaller; tifffile zero-pads them."""
    rows, cols = shape
    for r in range(0, rows, tile_px):
        for c in range(0, cols, tile_px):
            block = np.asarray(source[r : r + tile_px, c : c + tile_px])
            if convert is not None:
                block = convert(block)
            if following is not None:
                small = reduce(block)
                following[r // 2 : r // 2 + small.shape[0], c // 2 : c // 2 + small.shape[1]] = (
                    small
                )
                del small
            yield np.ascontiguousarray(block)


def read_export_frame(path: Path) -> Frame:
    """The slide :class:`Frame` stored in an exported OME-TIFF (see :func:`write_ome_tiff`).

    Level 0 of the image is the frame's working grid: ``frame.working_to_level0`` maps its
    pixel coordinates onto the slide's level-0 pixels (``working_to_qupath`` onto QuPath's).
    """
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            ome = tif.ome_metadata
        if not ome:
            raise ValueError("no OME-XML")
        image = tifffile.xml2dict(ome)["OME"]["Image"]
        if isinstance(image, list):
            image = image[0]
        frame = json.loads(image["Description"])["wsiseg"]["frame"]
        return Frame.from_dict(frame)
    except (OSError, ValueError, KeyError, TypeError, tifffile.TiffFileError) as exc:
        raise WsisegError(f"{path}: not a wsiseg export with a slide frame ({exc})") from None


# -- measurements ------------------------------------------------------------------------------
def measurement_row(store: SlideStore, slide_id: str, round_k: int) -> dict[str, str]:
    """The ``measurements.csv`` row of one round: :func:`wsiseg.outputs.measurements` of the
    round's stored polygons, formatted as ``summary.csv`` formats numbers (``str``)."""
    from wsiseg.outputs import measurements

    m = asdict(measurements(store, polygons_of_round(store, round_k), round_k))
    m["slide_id"] = slide_id
    return {k: str(m[k]) for k in MEASUREMENT_FIELDS}


def _read_measurements(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    if not path.exists():
        return rows
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"slide_id", "round"} <= set(reader.fieldnames):
                raise WsisegError(
                    f"{path}: exists but is not a wsiseg measurements table (no slide_id, round "
                    f"columns); move it away or choose another --out"
                )
            for r in reader:
                rows[(r["slide_id"], r["round"])] = {k: r.get(k) or "" for k in MEASUREMENT_FIELDS}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsisegError(f"{path}: cannot read the measurements table ({exc})") from None
    return rows


def _measurement_conflicts(path: Path, rows: Iterable[dict[str, str]]) -> list[str]:
    """Rows of ``path`` that the new rows would change (same slide and round, other figures)."""
    old = _read_measurements(path)
    return [
        f"{r['slide_id']} round {r['round']}"
        for r in rows
        if (r["slide_id"], r["round"]) in old and old[(r["slide_id"], r["round"])] != r
    ]


def write_measurements_csv(path: Path, rows: Iterable[dict[str, str]]) -> Path:
    """Merge rows into ``measurements.csv`` (keyed by slide and round), written atomically.

    Rows of other slides and rounds are kept; rows are sorted by slide id, then round.
    """
    merged = _read_measurements(path)
    for r in rows:
        merged[(r["slide_id"], r["round"])] = dict(r)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MEASUREMENT_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(merged, key=lambda k: (k[0], _as_int(k[1]))):
        writer.writerow(merged[key])
    _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


# -- one store, many stores --------------------------------------------------------------------
def export_paths(out_dir: Path, slide_id: str, round_k: int) -> dict[str, Path]:
    """Where each kind of output of one round goes."""
    return {
        "mask": out_dir / f"{slide_id}.r{round_k}.mask.ome.tif",
        "prob": out_dir / f"{slide_id}.r{round_k}.prob.ome.tif",
        "geojson": out_dir / f"{slide_id}.r{round_k}.geojson",
        "measurements": out_dir / MEASUREMENTS_CSV,
    }


def parse_what(text: str | Iterable[str] | None) -> set[str]:
    """``"mask,prob"`` (or an iterable of names) → a checked set; None → the default set."""
    if text is None:
        return set(DEFAULT_WHAT)
    items = text.split(",") if isinstance(text, str) else list(text)
    what = {w.strip() for w in items if w.strip()}
    unknown = sorted(what - set(EXPORT_KINDS))
    if unknown or not what:
        raise UsageError(
            f"--what: unknown output {', '.join(unknown) or '(none)'}; choose from "
            f"{','.join(EXPORT_KINDS)}"
        )
    return what


def export_store(
    store_path: Path,
    *,
    round_k: int | None = None,
    what: Iterable[str] | str = DEFAULT_WHAT,
    out_dir: Path | None = None,
    force: bool = False,
    tile_px: int = 512,
) -> list[Path]:
    """Export one round of one slide store; returns the files written.

    Parameters
    ----------
    store_path : Path
        ``<slide-id>.zarr``; the slide id is its name without ``.zarr``.
    round_k : int, optional
        The round to export; the latest when None.
    what : iterable of {"mask", "prob", "geojson", "measurements"}
    out_dir : Path, optional
        Output folder (created if needed); the store's folder when None.
    force : bool
        Replace existing outputs of the same round. Without it an existing OME-TIFF, a
        GeoJSON with other content, or a ``measurements.csv`` row of the same slide and round
        with other figures is an error and nothing is written. Identical existing outputs are
        not a conflict.
    tile_px : int
        OME-TIFF tile edge in pixels.

    Raises
    ------
    WsisegError
        One line naming the store or file: not a store / older format, a round that does not
        exist, an output that exists, an output folder that cannot be written.
    """
    from wsiseg.session import slide_id_of

    store_path = Path(store_path)
    what = parse_what(what if isinstance(what, str) else list(what))
    store = SlideStore.open(store_path, mode="r")
    out_dir = Path(out_dir) if out_dir is not None else store_path.parent
    _ensure_out_dir(out_dir)
    slide_id = slide_id_of(store_path)
    with _read_lock(store_path):
        k = resolve_round(store, round_k)
        paths = export_paths(out_dir, slide_id, k)

        # everything that can fail is checked before anything is written
        record = round_geojson_path(store, k)
        if "geojson" in what and not record.exists():
            raise WsisegError(f"{store_path}: round {k} has no stored contours ({record.name})")
        row = measurement_row(store, slide_id, k) if "measurements" in what else None
        if not force:
            taken = [paths[w] for w in ("mask", "prob") if w in what and paths[w].exists()]
            if "geojson" in what and paths["geojson"].exists() and (
                paths["geojson"].read_bytes() != record.read_bytes()
            ):
                taken.append(paths["geojson"])
            if taken:
                names = ", ".join(p.name for p in taken)
                raise WsisegError(f"{out_dir}: {names} already exist; use --force to replace")
            if row is not None:
                changed = _measurement_conflicts(paths["measurements"], [row])
                if changed:
                    raise WsisegError(
                        f"{paths['measurements']}: already has other figures for "
                        f"{', '.join(changed)}; use --force to replace them"
                    )
        pixels = refined_of_round(store, k) if {"mask", "prob"} & what else None

        written: list[Path] = []
        frame = store.frame
        extra = {"slide_id": slide_id, "round": k, "store": str(store_path.resolve())}
        for kind in ("mask", "prob"):
            if kind in what:
                written.append(write_ome_tiff(
                    pixels, paths[kind], mpp=frame.working_mpp, frame_dict=frame.to_dict(),
                    kind=kind,
                    threshold_u8=uint8_threshold(store.workflow.contours.threshold),
                    tile_px=tile_px, name=f"{slide_id} round {k} tumor {kind}", extra=extra,
                ))
        if "geojson" in what:
            _atomic_write_bytes(paths["geojson"], record.read_bytes())
            written.append(paths["geojson"])
        if row is not None:
            written.append(write_measurements_csv(paths["measurements"], [row]))
        return written


def export_stores(
    store_paths: Iterable[Path | str],
    *,
    round_k: int | None = None,
    what: Iterable[str] | str | None = None,
    out_dir: Path | None = None,
    force: bool = False,
) -> int:
    """``wsiseg export``: export every store; one bad store does not stop the others.

    Prints each file written on stdout and each failure as one line on stderr. Returns the
    exit status: 0 when every store was exported, 1 otherwise.
    """
    kinds = parse_what(what)
    status = 0
    for store_path in (Path(p) for p in store_paths):
        try:
            for p in export_store(store_path, round_k=round_k, what=kinds, out_dir=out_dir,
                                  force=force):
                print(p)
        except WsisegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
        except Exception as exc:  # a bug or an unforeseen file problem: still one line
            if os.environ.get("WSISEG_DEBUG"):
                traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"error: {store_path}: {reason}", file=sys.stderr)
            status = 1
    return status


# -- files -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _read_lock(store_path: Path) -> Iterator[None]:
    """Hold the store lock so no refine or undo changes ``refined`` mid-export; a store on a
    read-only file system cannot be changed anyway and is exported without it."""
    try:
        lock = StoreLock(store_path, "export")
        lock.__enter__()
    except PermissionError:
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
