"""Malformed QuPath GeoJSON for the scribble reader: seeds, mutations and one check.

Shared by ``scripts/fuzz/scribbles.py`` (many files, counts) and ``tests/test_qupath_fuzz.py``
(a bounded number, under hypothesis). A file goes through what ``wsiseg refine`` does before
it writes anything: :func:`wsiseg.refine.load_scribbles` (which reads it with
:func:`wsiseg.qupath.read_annotations_report`), then :func:`wsiseg.refine.rasterize_new`.
The outcome is ``"accepted"``, ``"refused"`` (a :class:`wsiseg.errors.WsisegError` whose
message is one line naming the file) or ``"other"`` (anything else: the defect to find).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import random
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from scipy import ndimage

from wsiseg import rounds
from wsiseg.cohort import publish_run
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.refine import load_scribbles, rasterize_new
from wsiseg.store import SlideStore
from wsiseg.tiling import tile_slide

# Values a mutation puts in place of a node: type swaps, non-finite and huge numbers, text
# where numbers belong, and the cases issue 20 reproduced.
PALETTE: list[Any] = [
    {"a": 1}, [], {}, [{"type": []}], {"type": {"a": 1}}, None, True, False, 0, -1, 0.5,
    1e308, math.inf, -math.inf, math.nan, 10**30, 10**400, "", "NaN", "Infinity", "x" * 300,
    "\ud800", "Feature", "FeatureCollection", "GeometryCollection", "Polygon", "MultiPolygon",
    "LineString", "Point", "annotation", "detection", "Tumor", "Stroma", "Tumor: Positive",
    [math.inf, 0, 0], [math.nan, 0, 0], [255, 0], [256, -1, 3], [1.5, 2.5, 3.5],
    [[1, 2]], [[[1, 2], [3, 4]]], [[[0, 0], [10, 0], [10, 10], [0, 0]]], [[[[1, 2]]]],
    {"type": "GeometryCollection", "geometries": [{"type": "Point", "coordinates": [5, 5]}]},
    {"type": "Polygon", "coordinates": [[[500, 500], [900, 500], [900, 900], [500, 500]]]},
    {"name": "Tumor", "color": [200, 0, 0]}, {"names": [{"a": 1}, None, 3]},
    {"z": 1, "t": 0}, {"z": {"a": 1}}, [1, [2, [3, [4]]]],
]

_TYPE_NAMES = ["Feature", "FeatureCollection", "GeometryCollection", "Polygon",
               "MultiPolygon", "LineString", "MultiLineString", "Point", "MultiPoint"]


# -- seeds ------------------------------------------------------------------------------------
def seed_files(qupath_dir: Path, own: list[Path] = ()) -> list[bytes]:
    """Bytes of every file in ``qupath_dir`` (QuPath's own writer) and of ``own`` outputs."""
    paths = sorted(p for p in qupath_dir.iterdir() if p.is_file() and p.suffix != ".md")
    return [p.read_bytes() for p in [*paths, *own]]


def placed_on_tissue(data: bytes, store: SlideStore) -> bytes | None:
    """A plain-JSON seed with its coordinates scaled into the tissue's bounding box (QuPath
    frame), so its scribbles reach the rasteriser; None for a seed that is not plain JSON."""
    doc = _parse(data)
    if doc is None:
        return None
    parents = {id(p): p for p, _ in _nodes(doc) if isinstance(p, dict)}
    if isinstance(doc, dict):
        parents[id(doc)] = doc
    arrays = [p["coordinates"] for p in parents.values()
              if isinstance(p.get("coordinates"), list)]
    xy = np.asarray([p for a in arrays for p in _points(a)], dtype=float).reshape(-1, 2)
    if not len(xy):
        return None
    x0, y0, x1, y1 = store.frame.transform_geometry(
        tissue_box(store), "working", "qupath").bounds
    lo, span = xy.min(axis=0), np.maximum(np.ptp(xy, axis=0), 1e-9)
    target_lo, target_span = np.asarray([x0, y0]), np.asarray([x1 - x0, y1 - y0])

    def move(a: list) -> None:
        for i, item in enumerate(a):
            if isinstance(item, list) and len(item) >= 2 and all(
                isinstance(v, int | float) for v in item[:2]
            ):
                moved = (np.asarray(item[:2], dtype=float) - lo) / span * target_span + target_lo
                a[i] = [round(float(v), 2) for v in moved] + item[2:]
            elif isinstance(item, list):
                move(item)

    for a in arrays:
        if len(a) >= 2 and all(isinstance(v, int | float) for v in a[:2]):  # a Point
            a[:2] = ((np.asarray(a[:2], dtype=float) - lo) / span * target_span
                     + target_lo).round(2).tolist()
        else:
            move(a)
    return _dumps(doc)


def tissue_box(store: SlideStore) -> shapely.Geometry:
    """The window of a third of the slide's size with the most tissue (working px)."""
    mask = store.tissue_mask.astype(np.int64)
    h, w = max(1, mask.shape[0] // 3), max(1, mask.shape[1] // 3)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = (integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w])
    r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
    sy, sx = np.asarray(store.frame.working_shape) / np.asarray(mask.shape)
    return shapely.box(c * sx, r * sy, (c + w) * sx, (r + h) * sy)


def _points(a: list) -> list[list[float]]:
    if len(a) >= 2 and all(isinstance(v, int | float) for v in a[:2]):
        return [a[:2]]
    return [p for item in a if isinstance(item, list) for p in _points(item)]


def deep_cases() -> dict[str, bytes]:
    """Deeply nested files (issue 20): each must be read or refused in one line."""
    poly = {"type": "Polygon", "coordinates": [[[800, 800], [1200, 800], [1200, 1200],
                                                [800, 800]]]}
    cls = {"classification": {"name": "Tumor", "color": [200, 0, 0]}}

    # Written as text: json.dumps itself cannot write what is nested this deeply.
    poly_text, cls_text = json.dumps(poly), json.dumps(cls)[1:-1]
    leaf = f'{{"type":"Feature","geometry":{poly_text},"properties":{{{cls_text}}}}}'

    def children(depth: int) -> bytes:
        head = f'{{"type":"Feature","geometry":{poly_text},"properties":{{{cls_text},' \
               '"childObjects":['
        text = head * depth + leaf + "]}}" * depth
        return f'{{"type":"FeatureCollection","features":[{text}]}}'.encode()

    def collections(depth: int) -> bytes:
        geometry = '{"type":"GeometryCollection","geometries":[' * depth + poly_text \
            + "]}" * depth
        return f'{{"type":"Feature","geometry":{geometry},"properties":{{{cls_text}}}}}'.encode()

    def arrays(depth: int) -> bytes:
        return ("[" * depth + leaf + "]" * depth).encode()

    return {
        "children-20": children(20), "children-400": children(400),
        "collections-20": collections(20), "collections-900": collections(900),
        "arrays-200": arrays(200), "arrays-900": arrays(900),
        "brackets-100000": b"[" * 100_000, "objects-100000": b'{"a":' * 100_000,
        "brackets-closed-100000": b"[" * 100_000 + b"]" * 100_000,
    }


# -- mutations --------------------------------------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three random mutations of a file, then maybe a gzip or zip container."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        data = rng.choice(_MUTATIONS)(data, rng)
    roll = rng.random()
    if roll < 0.08:
        data = gzip.compress(data, mtime=0)
        if rng.random() < 0.3:
            data = _flip(data, rng) if rng.random() < 0.5 else _truncate(data, rng)
    elif roll < 0.16:
        data = _zip(data, rng)
    return data


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.choice(
            [rng.randrange(256), *b'{}[]",:0-.eE\\ ntf9']
        )
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)]


def _splice(data: bytes, rng: random.Random) -> bytes:
    """Delete, duplicate or move a random span."""
    if len(data) < 2:
        return data + data
    a = rng.randrange(len(data))
    b = min(len(data), a + rng.randint(1, 64))
    kind = rng.randrange(3)
    if kind == 0:
        return data[:a] + data[b:]
    if kind == 1:
        return data[:b] + data[a:b] + data[b:]
    c = rng.randrange(len(data))
    return data[:c] + data[a:b] + data[c:]


def _structural(data: bytes, rng: random.Random) -> bytes:
    """Parse, replace / delete / wrap a random node (or a ``type``), write back."""
    doc = _parse(data)  # a fresh parse: mutating it leaves the caller's seeds alone
    if doc is None:
        return _flip(data, rng)
    nodes = _nodes(doc)
    if rng.random() < 0.5:  # mostly properties and types: files that may still be read
        nodes = [(p, k) for p, k in nodes if not isinstance(p, list)] or nodes
    parent, key = rng.choice(nodes)
    roll = rng.random()
    if parent is None:
        doc = rng.choice(PALETTE)
    elif roll < 0.3 and isinstance(parent, dict) and "type" in parent:
        parent["type"] = rng.choice([*PALETTE, *_TYPE_NAMES])
    elif roll < 0.45:
        if isinstance(parent, dict):
            parent.pop(key, None)
        else:
            del parent[key]
    elif roll < 0.55:
        parent[key] = [parent[key]] if rng.random() < 0.5 else {"type": parent[key]}
    else:
        parent[key] = copy.deepcopy(rng.choice(PALETTE))
    try:
        return _dumps(doc, indent=rng.choice([None, None, 2]))
    except RecursionError:  # nested past what json.dumps writes: mutate the bytes instead
        return _flip(data, rng)


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError):
        return None


def _nodes(doc: Any) -> list[tuple[Any, Any]]:
    """``(parent, key)`` of every node below the top, and ``(None, None)`` for the top."""
    out: list[tuple[Any, Any]] = [(None, None)]
    stack = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else (
            enumerate(node) if isinstance(node, list) else ())
        for key, child in items:
            out.append((node, key))
            stack.append(child)
    return out


def _zip(data: bytes, rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    names = ["export.geojson", "a/b.json", "__MACOSX/._export.geojson", "notes.txt",
             "._hidden.geojson"]
    with zipfile.ZipFile(buffer, "w", rng.choice([zipfile.ZIP_STORED,
                                                  zipfile.ZIP_DEFLATED])) as archive:
        for name in rng.sample(names, rng.randint(1, 3)):
            archive.writestr(name, data)
    out = buffer.getvalue()
    if rng.random() < 0.3:
        out = _flip(out, rng) if rng.random() < 0.5 else _truncate(out, rng)
    return out


def _dumps(doc: Any, indent: int | None = None) -> bytes:
    # allow_nan: NaN / Infinity literals are what broken writers produce.
    return json.dumps(doc, indent=indent, allow_nan=True).encode("utf-8", "surrogatepass")


_MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    _flip, _truncate, _splice, _structural, _structural, _structural,
]


# -- a store to check against -----------------------------------------------------------------
def make_store(slide: Path, out_dir: Path, workflow: Workflow) -> SlideStore:
    """Tile ``slide`` and publish round 0 from a smooth random probability map."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = tile_slide(slide, out_dir / "fuzz.zarr", workflow).store
    rows, cols = store.frame.working_shape
    noise = ndimage.gaussian_filter(np.random.default_rng(0).random((rows, cols)),
                                    sigma=max(rows, cols) / 20)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-9)
    prob = np.clip(noise * 255, 0, 255).astype(np.uint8)
    store["guide"][...] = prob
    store["refined"][...] = prob
    store.set_stage("guide", "done")
    publish_run(store, out_dir, "fuzz")
    return store


# -- the check --------------------------------------------------------------------------------
class Checker:
    """Feeds files to the refine path of one store; counts outcomes.

    Parameters
    ----------
    store : SlideStore
        A store with round 0 published (its contours are what an export's AI features are
        compared with). Nothing here writes to it.
    """

    def __init__(self, store: SlideStore) -> None:
        self.store = store
        history = store.attrs.get("rounds") or []
        self.latest = (rounds.load_round_contours(store, int(history[-1]["round"]))
                       if history else None)
        self.counts = {"files": 0, "accepted": 0, "refused": 0, "other": 0}

    def check(self, path: Path) -> tuple[str, str]:
        """``(outcome, detail)``; outcome is ``accepted``, ``refused`` or ``other``."""
        self.counts["files"] += 1
        try:
            scribbles = load_scribbles(path, self.store, self.latest)
            rasterize_new(self.store, scribbles, path)
        except WsisegError as exc:
            message = str(exc)
            if "\n" in message or "\r" in message or str(path) not in message:
                outcome, detail = "other", f"bad message: {message[:300]!r}"
            else:
                outcome, detail = "refused", message
        except Exception as exc:  # noqa: BLE001 - any other type is the defect counted
            outcome, detail = "other", f"{type(exc).__name__}: {str(exc)[:300]}"
        else:
            outcome, detail = "accepted", ""
        self.counts[outcome] += 1
        return outcome, detail
