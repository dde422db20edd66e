"""``wsiseg export``: the chosen outputs of one round of one store, or of many stores."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from wsiseg.atomic import atomic_write_bytes, ensure_out_dir
from wsiseg.contours import uint8_threshold
from wsiseg.errors import UsageError, WsisegError
from wsiseg.export._files import read_lock
from wsiseg.export.measurements import (
    measurement_conflicts,
    measurement_row,
    write_measurements_csv,
)
from wsiseg.export.ome_tiff import write_ome_tiff
from wsiseg.export.pixels import refined_of_round, resolve_round
from wsiseg.rounds import round_geojson_path
from wsiseg.store import SlideStore

EXPORT_KINDS = ("mask", "prob", "geojson", "measurements")
DEFAULT_WHAT = frozenset({"mask", "geojson", "measurements"})
MEASUREMENTS_CSV = "measurements.csv"


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
    ensure_out_dir(out_dir)
    slide_id = slide_id_of(store_path)
    with read_lock(store_path):
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
                changed = measurement_conflicts(paths["measurements"], [row])
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
            atomic_write_bytes(paths["geojson"], record.read_bytes())
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
