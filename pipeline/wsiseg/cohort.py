"""Many slides: slide ids, the per-slide run, the cohort summary.

A slide is *done* only when its store says so and all of its outputs exist; a rerun skips
done slides (``--force`` redoes them). One slide's failure never stops the others: it
becomes a row of ``summary.csv`` with a one-line reason, and the exit status is 1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsiseg.config import Workflow, load_workflow
from wsiseg.errors import UsageError, WsisegError
from wsiseg.store import SlideStore, StoreError, file_fingerprint

log = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "slide", "slide_id", "status", "reason", "tissue_mm2", "tumor_mm2", "tumor_fraction",
    "seconds",
)


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path
    workflow: str | None = None
    guidenet: str | None = None
    mpp: float | None = None
    device: str = "auto"
    force: bool = False
    scheduler: str | None = None
    tta: bool = False
    export_mask: bool = False
    progress: bool = True


@dataclass
class SlideRow:
    slide: str
    slide_id: str
    status: str  # "done" | "skipped" (already done) | "failed"
    reason: str = ""
    tissue_mm2: float | None = None
    tumor_mm2: float | None = None
    tumor_fraction: float | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def csv_row(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("extra")
        return {k: "" if d[k] is None else str(d[k]) for k in SUMMARY_FIELDS}


# -- slide ids --------------------------------------------------------------------------------
def assign_slide_ids(slides: Sequence[Path], out_dir: Path) -> dict[Path, str]:
    """Store names: the file stem, made unique when two slides would share one.

    Two slides with the same stem in different folders get ``<stem>-<8 hex of the path>``.
    A stem whose existing store belongs to another slide (another fingerprint) does too,
    so a store is never taken over by a different slide.
    """
    by_stem: dict[str, list[Path]] = {}
    for path in slides:
        by_stem.setdefault(_stem(path), []).append(path)
    ids: dict[Path, str] = {}
    for stem, paths in by_stem.items():
        for path in paths:
            unique = len(paths) == 1 and not _store_of_other_slide(out_dir / f"{stem}.zarr", path)
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


def _store_of_other_slide(store_path: Path, slide: Path) -> bool:
    if not store_path.exists():
        return False
    try:
        source = SlideStore.open(store_path, mode="r").source
    except StoreError:
        return False
    if Path(source.path) == slide.resolve():
        return False
    try:
        return file_fingerprint(slide) != source.fingerprint
    except OSError:
        return True


def ensure_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsiseg-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise WsisegError(f"{out_dir}: cannot write the output directory ({reason})") from None


# -- tile ------------------------------------------------------------------------------------
def tile_cohort(
    slides: Sequence[str], out_dir: Path, *, workflow: str | None = None,
    mpp: float | None = None, force: bool = False,
) -> int:
    """``wsiseg tile``: build the slide stores; a row per slide on stdout."""
    from wsiseg.store import retire_store
    from wsiseg.tiling import tile_slide

    wf = load_workflow(workflow)
    ensure_out_dir(out_dir)
    paths = [Path(s) for s in slides]
    ids = assign_slide_ids(paths, out_dir)
    status = 0
    for path in paths:
        store_path = out_dir / f"{ids[path]}.zarr"
        try:
            if force and store_path.exists():
                retire_store(store_path)
            t0 = time.perf_counter()
            result = tile_slide(path, store_path, wf, mpp=mpp, progress=True)
            print(
                f"{path}: {store_path} ({result.chunks_total} tissue chunks, "
                f"{result.chunks_written} written, {time.perf_counter() - t0:.1f} s)"
            )
        except WsisegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


# -- run -------------------------------------------------------------------------------------
def run_cohort(slides: Sequence[str], options: RunOptions) -> int:
    """``wsiseg run``: every slide to store + GeoJSON + thumbnail; ``summary.csv``."""
    from tqdm import tqdm

    from wsiseg.nets import load_weights, missing_weights_error

    wf = load_workflow(options.workflow)
    if not options.guidenet:
        raise UsageError(str(missing_weights_error("guidenet")))
    ensure_out_dir(options.out_dir)
    model, card = load_weights(Path(options.guidenet), role="guidenet", workflow=wf)
    paths = [Path(s) for s in slides]
    ids = assign_slide_ids(paths, options.out_dir)
    rows: list[SlideRow] = []
    bar = tqdm(paths, desc="slides", unit="slide", disable=not options.progress, file=sys.stderr)
    for path in bar:
        bar.set_postfix_str(path.name)
        rows.append(run_one(path, ids[path], wf, model, card, options))
        write_summary(options.out_dir / "summary.csv", rows)
    failed = [r for r in rows if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.reason}", file=sys.stderr)
    done = len(rows) - len(failed)
    print(f"{done} of {len(rows)} slides done; summary: {options.out_dir / 'summary.csv'}")
    return 1 if failed else 0


def slide_outputs(out_dir: Path, slide_id: str, export_mask: bool = False) -> list[Path]:
    paths = [out_dir / f"{slide_id}.geojson", out_dir / f"{slide_id}.png"]
    if export_mask:
        paths.append(out_dir / f"{slide_id}.r0.mask.ome.tif")
    return paths


def run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions
) -> SlideRow:
    """Run one slide; never raises (a failure is a row with its reason)."""
    t0 = time.perf_counter()
    try:
        row = _run_one(slide, slide_id, wf, model, card, options)
    except WsisegError as exc:
        row = SlideRow(str(slide), slide_id, "failed", reason=str(exc))
    except Exception as exc:  # a bug or an unforeseen file problem: still one row
        log.debug("%s", traceback.format_exc())
        row = SlideRow(str(slide), slide_id, "failed",
                       reason=f"{slide}: {type(exc).__name__}: {exc}".splitlines()[0])
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


def _run_one(
    slide: Path, slide_id: str, wf: Workflow, model, card, options: RunOptions
) -> SlideRow:
    from wsiseg.infer import infer_to_store, resolve_device
    from wsiseg.nets import normalise_rgb, weights_hash
    from wsiseg.store import retire_store, source_changed
    from wsiseg.tiling import tile_slide

    out_dir = options.out_dir
    store_path = out_dir / f"{slide_id}.zarr"
    if not slide.is_file():
        from wsiseg.slide.reader import open_slide

        open_slide(slide)  # raises the one-line reason (missing, directory, ...)
    if store_path.exists() and not options.force:
        done = _done_row(store_path, slide, slide_id, out_dir, options.export_mask)
        if done is not None:
            return done
    if options.force and store_path.exists():
        retire_store(store_path)
    store = tile_slide(slide, store_path, wf, mpp=options.mpp).store
    if source_changed(store, slide):  # pragma: no cover - tile_slide rebuilt it
        raise WsisegError(f"{slide}: changed while running")
    if store.stage("guide") != "done":
        store.set_stage("export", "pending")
        device = resolve_device(options.device)
        model.to(device)
        stats = infer_to_store(
            store["image"], [store["guide"], store["refined"]],
            model=model, normalise=lambda t: normalise_rgb(t, card), tissue=store.tissue_mask,
            patch_px=wf.guidenet.patch_px, stride_px=wf.guidenet.stride_px,
            batch_size=wf.guidenet.batch_size, device=device, band_px=store.chunk_px,
            tta=options.tta, clip_to_tissue=True,
        )
        store.update_attrs(models={"guidenet": {
            "card": card.to_dict(), "sha256": weights_hash(Path(options.guidenet)),
            "path": str(Path(options.guidenet).resolve()),
        }}, inference={"patches": stats.patches, "forward_s": round(stats.forward_s, 3),
                       "total_s": round(stats.total_s, 3), "tta": options.tta})
        store.set_stage("guide", "done")
    m = publish_run(store, out_dir, slide_id, export_mask=options.export_mask)
    return SlideRow(str(slide), slide_id, "done", tissue_mm2=m.tissue_mm2,
                    tumor_mm2=m.tumor_mm2, tumor_fraction=m.tumor_fraction)


def publish_run(store: SlideStore, out_dir: Path, slide_id: str, export_mask: bool = False):
    """Round 0 of a store whose ``guide``/``refined`` are complete: GeoJSON, thumbnail,
    measurements; the slide counts as done only after this."""
    from wsiseg.outputs import measurements, write_round_geojson, write_thumbnail

    _, polygons = write_round_geojson(store, out_dir, slide_id, 0)
    write_thumbnail(store, out_dir / f"{slide_id}.png", polygons)
    m = measurements(store, polygons, 0)
    if not store.attrs.get("rounds"):
        store.update_attrs(rounds=[{
            "round": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "run",
            "tumor_mm2": m.tumor_mm2, "windows": 0, "scribbles": {},
            "measurements": asdict(m),
        }])
    store.update_attrs(measurements=asdict(m))
    if export_mask:
        from wsiseg.export import export_store

        export_store(store.path, round_k=0, what={"mask"}, out_dir=out_dir, force=True)
    store.set_stage("export", "done")  # last: only now does the slide count as done
    return m


def _done_row(
    store_path: Path, slide: Path, slide_id: str, out_dir: Path, export_mask: bool
) -> SlideRow | None:
    from wsiseg.store import source_changed

    try:
        store = SlideStore.open(store_path, mode="r")
    except StoreError:
        return None
    if store.stage("export") != "done" or source_changed(store, slide):
        return None
    if not all(p.exists() for p in slide_outputs(out_dir, slide_id, export_mask)):
        return None
    m = store.attrs.get("measurements", {})
    return SlideRow(str(slide), slide_id, "skipped", reason="already done",
                    tissue_mm2=m.get("tissue_mm2"), tumor_mm2=m.get("tumor_mm2"),
                    tumor_fraction=m.get("tumor_fraction"))


def write_summary(path: Path, rows: Sequence[SlideRow]) -> None:
    """Write ``summary.csv`` atomically, keeping rows of slides not in this run."""
    previous: dict[str, dict[str, str]] = {}
    if path.exists():
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r.get("slide_id"):
                    previous[r["slide_id"]] = {k: r.get(k, "") for k in SUMMARY_FIELDS}
    for row in rows:
        previous[row.slide_id] = row.csv_row()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for key in sorted(previous):
        writer.writerow(previous[key])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary.", suffix=".csv")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
