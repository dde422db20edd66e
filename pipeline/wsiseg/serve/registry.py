"""The slides one server serves: found once at start, looked up by id afterwards.

A slide id is the store's name without ``.zarr`` (what ``wsiseg run`` calls the slide, and
the prefix of its ``<id>.geojson``). Requests name slides by id; an id is only ever a key of
:attr:`SlideRegistry.slides`, never part of a path, so no request can reach a file the
registry did not list at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.errors import UsageError
from wsiseg.session import slide_id_of
from wsiseg.store import SlideStore, StoreError


@dataclass(frozen=True)
class Slide:
    """One served slide: its store and the folder its round files are published to."""

    id: str
    store_path: Path
    out_dir: Path

    def open(self, mode: str = "r+") -> SlideStore:
        return SlideStore.open(self.store_path, mode=mode)

    def version(self, array: str | None = None) -> str:
        """Changes whenever the store's attributes do (every round and undo, served or run
        by the CLI): ``<size>-<mtime ns>`` of its ``zarr.json``; with ``array``, that
        array's ``zarr.json`` instead (``image`` keeps its version across rounds)."""
        path = self.store_path / (f"{array}/zarr.json" if array else "zarr.json")
        st = os.stat(path)
        return f"{st.st_size:x}-{st.st_mtime_ns:x}"

    def round_file(self, round_k: int | None) -> Path:
        """The published GeoJSON of a round (``None``: the latest), as ``wsiseg refine``
        names it; the store's own record when the published copy is not beside it."""
        if round_k is None:
            return self.out_dir / f"{self.id}.geojson"
        published = self.out_dir / f"{self.id}.r{round_k}.geojson"
        if published.is_file():
            return published
        return self.store_path / "rounds" / f"r{round_k}.geojson"


class SlideRegistry:
    """Slides by id, from a run directory (its ``*.zarr``) and/or store paths."""

    def __init__(self, slides: list[Slide]):
        self.slides: dict[str, Slide] = {}
        for s in slides:
            if s.id in self.slides:
                raise UsageError(f"two stores are both slide {s.id!r}: "
                                 f"{self.slides[s.id].store_path} and {s.store_path}")
            self.slides[s.id] = s

    @classmethod
    def from_paths(cls, paths: list[Path]) -> SlideRegistry:
        """Each path a run directory (every ``*.zarr`` in it) or one store."""
        found: list[Slide] = []
        for path in paths:
            path = Path(path).resolve()
            if path.suffix == ".zarr" or (path / "zarr.json").is_file():
                stores = [path]
            elif path.is_dir():
                stores = sorted(p for p in path.glob("*.zarr") if (p / "zarr.json").is_file())
            else:
                raise UsageError(f"{path}: neither a run directory nor a slide store")
            for store_path in stores:
                SlideStore.open(store_path, mode="r")  # a damaged store stops the start
                found.append(Slide(slide_id_of(store_path), store_path, store_path.parent))
        if not found:
            raise UsageError(f"no slide stores in {', '.join(map(str, paths))} "
                             "(run `wsiseg run` first)")
        return cls(found)

    def get(self, slide_id: str) -> Slide | None:
        return self.slides.get(slide_id)


def describe(slide: Slide) -> dict[str, Any]:
    """What ``GET /slides`` says of a slide (its store opened read-only)."""
    try:
        store = slide.open("r")
        attrs = store.attrs
    except StoreError as exc:
        return {"id": slide.id, "error": str(exc)}
    frame = store.frame
    history = attrs.get("rounds") or []
    m = attrs.get("measurements") or {}
    base = f"/slides/{slide.id}"
    return {
        "id": slide.id,
        "source": attrs.get("source", {}).get("path"),
        "size": list(frame.level0_size),  # level-0 (width, height), px
        "working_size": list(frame.working_size),
        "level0_mpp": frame.level0_mpp,
        "working_mpp": frame.working_mpp,
        # working px → QuPath frame: x · scale − offset (what the browser page draws in)
        "qupath_scale": frame.scale,
        "bounds_offset": list(frame.bounds_offset),
        "round": int(history[-1]["round"]) if history else None,
        "rounds": len(history),
        "tumor_mm2": m.get("tumor_mm2"),
        "tissue_mm2": m.get("tissue_mm2"),
        "version": slide.version(),
        "links": {
            "contours": f"{base}/contours", "history": f"{base}/history",
            "scribbles": f"{base}/scribbles", "undo": f"{base}/undo",
            "image": f"{base}/image.dzi", "heatmap": f"{base}/heatmap.dzi",
            "thumbnail": f"{base}/thumbnail", "viewer": f"/view/{slide.id}",
        },
    }
