"""The HTTP routes of ``wsiseg serve`` (FastAPI; the schema is at ``/openapi.json``).

Data routes (token-guarded, see :mod:`wsiseg.serve.guard`)::

    GET  /slides                              the slides: id, source, size, rounds, tumor area
    GET  /slides/{id}                         one of them
    GET  /slides/{id}/contours[?round=K]      the bytes of <id>.geojson / <id>.r<K>.geojson
    POST /slides/{id}/scribbles[?contours=changed]  a QuPath export → one refine round
    POST /slides/{id}/undo[?contours=changed]       back to the previous round
    GET  /slides/{id}/history                 the rounds, with timings
    GET  /slides/{id}/thumbnail               <id>.png of the run
    GET  /slides/{id}/{image|heatmap}.dzi     Deep Zoom descriptors, and their tiles at
    GET  /slides/{id}/{image|heatmap}_files/{level}/{col}_{row}.{jpeg|png}
    GET  /report.html                         the run's report.html, slides linked to viewers

Page routes (open; they hold no slide data): ``/`` the slide list, ``/view/{id}`` the viewer,
``/static/...`` their scripts and the OpenSeadragon build.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from wsiseg import __version__
from wsiseg.serve import page
from wsiseg.serve.guard import BodyTooLarge
from wsiseg.serve.queue import SlideQueues
from wsiseg.serve.registry import Slide, SlideRegistry, describe
from wsiseg.serve.report_page import served_report
from wsiseg.serve.rounds import (
    RefinerChoice,
    RoundRefused,
    Scratch,
    answer_bytes,
    history,
    serve_round,
    serve_undo,
)
from wsiseg.serve.tiles import LAYERS, TileCache, TileSource
from wsiseg.serve.warm import TraceWarmer

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
GEOJSON = "application/geo+json"
#: ``?contours=``: the answer holds all of the now current round's contours, or only the
#: features it has that the round before had not (the removed ones are in ``changed``).
ContoursQuery = Annotated[Literal["all", "changed"], Query(
    description="the answer's contours: all of the now current round's, or only the "
                "features it added (the removed ones are in `changed`)")]


@dataclass
class ServerState:
    """Everything the routes share: built once at start."""

    registry: SlideRegistry
    choice: RefinerChoice
    scratch: Scratch
    queues: SlideQueues = field(default_factory=SlideQueues)
    tiles: TileCache = field(default_factory=TileCache)
    sources: dict[tuple[str, str], TileSource] = field(default_factory=dict)
    sources_lock: threading.Lock = field(default_factory=threading.Lock)
    warmer: TraceWarmer = field(default_factory=TraceWarmer)


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # off the event loop: both wait for work in progress (a round, a warm-up) to end
        await asyncio.to_thread(state.queues.close)
        await asyncio.to_thread(state.warmer.close)

    app = FastAPI(title="wsiseg serve", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan,
                  description="Live refinement of wsiseg tumor contours from QuPath or a "
                              "browser; see `wsiseg serve --help`.")
    app.state.wsiseg = state

    def slide_or_404(slide_id: str) -> Slide:
        slide = state.registry.get(slide_id)
        if slide is None:
            raise HTTPException(404, f"no slide {slide_id!r} is served here")
        return slide

    @app.exception_handler(RoundRefused)
    async def refused(_: Request, exc: RoundRefused) -> JSONResponse:
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One line per problem, without echoing the request back.
        lines = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never a traceback in an answer; the server's log has it.
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"},
                            status_code=500)

    # -- slides ---------------------------------------------------------------------------
    @app.get("/slides", summary="The served slides")
    def list_slides() -> list[dict[str, Any]]:
        return [describe(s) for s in state.registry.slides.values()]

    @app.get("/slides/{slide_id}", summary="One served slide")
    def one_slide(slide_id: str) -> dict[str, Any]:
        return describe(slide_or_404(slide_id))

    @app.get("/slides/{slide_id}/contours", summary="A round's contours (QuPath GeoJSON)",
             response_class=Response, responses={200: {"content": {GEOJSON: {}}}})
    def contours(
        slide_id: str, request: Request,
        round: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,  # noqa: A002
    ) -> Response:
        slide = slide_or_404(slide_id)
        state.warmer.warm(slide)  # a client opening the slide: strokes will follow
        known = {int(r["round"]) for r in history(slide)}
        if round is not None and round not in known:
            raise HTTPException(404, f"slide {slide_id!r} has no round {round}")
        path = slide.round_file(round)
        if not path.is_file():
            raise HTTPException(404, f"{path.name}: not found")
        return _file_with_etag(request, path, GEOJSON)

    @app.post("/slides/{slide_id}/scribbles", summary="One refine round from a QuPath export",
              openapi_extra={"requestBody": {"required": True, "content": {
                  GEOJSON: {"schema": {"type": "object"}},
                  "application/json": {"schema": {"type": "object"}}}}})
    async def scribbles(slide_id: str, request: Request,
                        contours: ContoursQuery = "all") -> Response:
        slide = slide_or_404(slide_id)
        body = await request.body()
        answer = await state.queues.run(
            slide.id, lambda queued_s: serve_round(slide, body, state.choice, state.scratch,
                                                   queued_s, contours))
        return Response(answer_bytes(answer), media_type="application/json")

    @app.post("/slides/{slide_id}/undo", summary="Back to the previous round")
    async def undo(slide_id: str, contours: ContoursQuery = "all") -> Response:
        slide = slide_or_404(slide_id)
        answer = await state.queues.run(
            slide.id, lambda queued_s: serve_undo(slide, queued_s, contours))
        return Response(answer_bytes(answer), media_type="application/json")

    @app.get("/slides/{slide_id}/history", summary="The slide's rounds")
    def round_history(slide_id: str) -> list[dict[str, Any]]:
        return history(slide_or_404(slide_id))

    @app.get("/slides/{slide_id}/thumbnail", summary="The run's thumbnail (PNG)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def thumbnail(slide_id: str, request: Request) -> Response:
        slide = slide_or_404(slide_id)
        path = slide.out_dir / f"{slide.id}.png"
        if not path.is_file():
            raise HTTPException(404, f"{path.name}: not found")
        return _file_with_etag(request, path, "image/png")

    # -- Deep Zoom ------------------------------------------------------------------------
    def source(slide: Slide, layer: str) -> TileSource:
        # The image never changes with rounds: its tiles stay cached (and their ETags valid).
        version = slide.version("image" if layer == "image" else None)
        with state.sources_lock:  # one read-only handle per slide, layer and version
            src = state.sources.get((slide.id, layer))
            if src is None or src.version != version:
                src = TileSource(slide.open("r"), layer, version, state.tiles, slide.id)
                state.sources[(slide.id, layer)] = src
        return src

    @app.get("/slides/{slide_id}/{layer}.dzi", summary="Deep Zoom descriptor",
             response_class=Response, responses={200: {"content": {"application/xml": {}}}})
    def dzi(slide_id: str, layer: str) -> Response:
        slide = slide_or_404(slide_id)
        if layer not in LAYERS:
            raise HTTPException(404, f"no layer {layer!r} (image, heatmap)")
        src = source(slide, layer)
        return Response(src.pyramid.dzi(src.format), media_type="application/xml",
                        headers={"Cache-Control": "no-cache"})

    @app.get("/slides/{slide_id}/{layer}_files/{level}/{tile}", summary="Deep Zoom tile",
             response_class=Response,
             responses={200: {"content": {"image/jpeg": {}, "image/png": {}}}})
    def tile(slide_id: str, layer: str, level: int, tile: str, request: Request) -> Response:
        slide = slide_or_404(slide_id)
        if layer not in LAYERS:
            raise HTTPException(404, f"no layer {layer!r} (image, heatmap)")
        col, row = _tile_name(tile, LAYERS[layer][1])
        src = source(slide, layer)
        etag = src.etag(level, col, row)
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        data = src.encoded(level, col, row)
        if data is None:
            raise HTTPException(404, "no such tile")
        return Response(data, media_type=f"image/{src.format}", headers=headers)

    # -- pages ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(page.index_html(), media_type="text/html")

    @app.get("/report.html", summary="The run's report, each slide linked to its viewer",
             response_class=Response, responses={200: {"content": {"text/html": {}}}})
    def report() -> Response:
        text = served_report(state.registry)
        if text is None:
            raise HTTPException(404, "this run has no report.html")
        return Response(text, media_type="text/html")

    @app.get("/view/{slide_id}", include_in_schema=False)
    def viewer(slide_id: str) -> Response:
        # the page holds no slide data; its script fetches the contours (and so warms them)
        slide = slide_or_404(slide_id)
        return Response(page.viewer_html(slide.id), media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    return app


def _tile_name(name: str, fmt: str) -> tuple[int, int]:
    stem, dot, ext = name.rpartition(".")
    parts = stem.split("_")
    if not dot or ext != fmt or len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise HTTPException(404, f"no such tile {name!r} (expected <col>_<row>.{fmt})")
    return int(parts[0]), int(parts[1])


def _file_with_etag(request: Request, path: Path, media_type: str) -> Response:
    st = path.stat()
    etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, headers=headers)

