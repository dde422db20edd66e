"""A served refine round, or undo, and what the server answers about it.

The POSTed body is written to a file in the server's own scratch folder (never beside the
stores) and handed to :func:`wsiseg.refine.refine_round` exactly as ``wsiseg refine`` hands
it a QuPath export, so the round's files are the command's. The file is removed afterwards;
the round's history entry keeps its sha-256, so the same body posted twice is "nothing new",
as the same export refined twice is.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg import rounds
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.refine import Refiner, refine_round
from wsiseg.serve.registry import Slide
from wsiseg.session import make_refiner
from wsiseg.store import SlideStore, StoreError

#: What a refused body is called in the one-line reason (instead of the scratch file's path).
BODY_NAME = "request body"


class RoundRefused(Exception):
    """A request the store refused, with the HTTP status and the one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class RefinerChoice:
    """The command-line choice of refiner; models are loaded once per workflow, on first
    use (a run directory normally has one workflow)."""

    refinenet: str | None = None
    refiner: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        self._loaded: dict[str, tuple[Refiner, str, str]] = {}
        self._lock = threading.Lock()

    def get(self, wf: Workflow) -> tuple[Refiner, str, str]:
        key = json.dumps(wf.to_dict(), sort_keys=True, default=str)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = make_refiner(wf, refinenet=self.refinenet,
                                                 refiner=self.refiner, device=self.device)
            return self._loaded[key]


class Scratch:
    """The server's folder for POSTed bodies while their round runs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._n = itertools.count(1)

    def write(self, slide_id: str, body: bytes) -> Path:
        path = self.folder / f"{slide_id}.posted-{os.getpid()}-{next(self._n)}.geojson"
        path.write_bytes(body)
        return path


def serve_round(
    slide: Slide, body: bytes, choice: RefinerChoice, scratch: Scratch, queued_s: float,
    contours: str = "all",
) -> dict[str, Any]:
    """One refine round from a POSTed QuPath export (on the slide's queue). ``contours``:
    ``"all"`` answers the latest contours whole; ``"changed"`` only the features the round
    added (the removed ones are listed in ``changed``), so that the answer, and the
    client's parsing of it, follow the change and not the slide."""
    t0 = time.perf_counter()
    store = _open(slide)
    refiner, kind, runtime = choice.get(store.workflow)
    network_s = [0.0]

    def timed_refiner(st: SlideStore, windows, window_px: int):
        t = time.perf_counter()
        try:
            return refiner(st, windows, window_px)
        finally:
            network_s[0] += time.perf_counter() - t

    previous = _current_round(store)
    old_ids = _ids_of(store, previous)
    path = scratch.write(slide.id, body)
    try:
        t1 = time.perf_counter()
        result = refine_round(store, path, slide.out_dir, slide.id, timed_refiner, kind,
                              runtime=runtime)
        round_s = time.perf_counter() - t1
    except StoreError as exc:  # another process holds the store
        raise RoundRefused(409, _reason(exc, path)) from None
    except WsisegError as exc:
        raise RoundRefused(422, _reason(exc, path)) from None
    finally:
        path.unlink(missing_ok=True)
    answer = {
        "slide": slide.id, "round": result.round, "previous_round": previous,
        "refined": result.new_pixels > 0, "refiner": kind,
        "new_pixels": result.new_pixels, "windows": len(result.windows),
        "tumor_mm2_before": result.tumor_mm2_before, "tumor_mm2": result.tumor_mm2_after,
    }
    if result.new_pixels == 0:
        answer["message"] = f"nothing new to refine (round {result.round} stays current)"
    answer |= _contours_answer(slide, store, old_ids, result.round, contours == "changed")
    answer["timings"] = {
        "queued_s": round(queued_s, 4), "network_s": round(network_s[0], 4),
        "round_s": round(round_s, 4), "refine_round_s": round(result.seconds, 4),
        "served_s": round(time.perf_counter() - t0, 4),
    }
    return answer


def serve_undo(slide: Slide, queued_s: float, contours: str = "all") -> dict[str, Any]:
    """Back to the previous round, as ``wsiseg undo`` (on the slide's queue). ``contours``
    as for :func:`serve_round`: ``"changed"`` answers only the features of the round now
    current that the undone round had not."""
    store = _open(slide)
    previous = _current_round(store)
    old_ids = _ids_of(store, previous)
    try:
        current = rounds.undo(store, slide.out_dir, slide.id)
    except WsisegError as exc:  # nothing to undo, or another process holds the store
        raise RoundRefused(409, str(exc)) from None
    store = _open(slide)
    answer = {"slide": slide.id, "round": current, "previous_round": previous,
              "tumor_mm2": (store.attrs.get("measurements") or {}).get("tumor_mm2")}
    answer |= _contours_answer(slide, store, old_ids, current, contours == "changed")
    answer["timings"] = {"queued_s": round(queued_s, 4)}
    return answer


def history(slide: Slide) -> list[dict[str, Any]]:
    """The rounds as ``wsiseg history`` lists them (the store's record of each)."""
    out = []
    for r in _open(slide, "r").attrs.get("rounds") or []:
        out.append({k: r[k] for k in (
            "round", "time", "kind", "refiner", "scribbles", "new_pixels", "windows",
            "tumor_mm2_before", "tumor_mm2", "seconds", "refine_seconds") if k in r})
    return out


def _contours_answer(
    slide: Slide, store: SlideStore, old_ids: set[str], current: int,
    only_added: bool = False,
) -> dict[str, Any]:
    """The latest contours (as ``<slide>.geojson`` holds them; ``only_added``: only the
    features new in round ``current``, their text as the file holds it) and which features
    changed from ``old_ids`` (the feature ids of the round before) to round ``current``."""
    new_ids = _ids_of(store, current)
    added = new_ids - old_ids
    if only_added:
        texts = rounds.round_feature_texts(store, current, added)
        text = '{"type":"FeatureCollection","features":[' + ",".join(texts) + "]}"
    else:
        text = slide.round_file(None).read_text(encoding="utf-8")
    return {
        "contours": RawJSON(text),
        "changed": {"added": sorted(added), "removed": sorted(old_ids - new_ids)},
    }


class RawJSON(str):
    """JSON text placed into an answer as it is: the contours file, never parsed and
    re-encoded (its size grows with the slide)."""


def answer_bytes(answer: dict[str, Any]) -> bytes:
    """The answer as JSON, :class:`RawJSON` values spliced in verbatim (``answer`` always
    has ordinary keys too: ``slide``, ``round``)."""
    rest = json.dumps({k: v for k, v in answer.items() if not isinstance(v, RawJSON)})
    spliced = "".join(f", {json.dumps(k)}: {v}" for k, v in answer.items()
                      if isinstance(v, RawJSON))
    return (rest[:-1] + spliced + "}").encode()


def _ids_of(store: SlideStore, round_k: int) -> set[str]:
    return set(rounds.load_round_ids(store, round_k))


def _open(slide: Slide, mode: str = "r+") -> SlideStore:
    try:
        return slide.open(mode)
    except StoreError as exc:
        raise RoundRefused(503, str(exc)) from None


def _current_round(store: SlideStore) -> int:
    history = store.attrs.get("rounds") or []
    if not history:
        raise RoundRefused(409, f"{store.path.name}: this slide was never run; "
                                "`wsiseg run` it before refining")
    return int(history[-1]["round"])


def _reason(exc: Exception, path: Path) -> str:
    """The command's one-line reason, naming the request body instead of the scratch file."""
    return str(exc).replace(str(path), BODY_NAME).splitlines()[0] if str(exc) else BODY_NAME

