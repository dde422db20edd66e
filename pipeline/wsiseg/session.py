"""The pathologist's loop on one slide store: ``refine``, ``history``, ``undo``.

Thin glue between the CLI and :mod:`wsiseg.refine` / :mod:`wsiseg.rounds`: it opens the
store, picks the refiner, and prints what happened.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.errors import UsageError, WsisegError
from wsiseg.store import SlideStore

if TYPE_CHECKING:
    from wsiseg.config import Workflow
    from wsiseg.refine import Refiner


def slide_id_of(store_path: Path) -> str:
    name = store_path.name
    return name[: -len(".zarr")] if name.endswith(".zarr") else name


def make_refiner(
    wf: Workflow, *, refinenet: str | None = None, refiner: str | None = None,
    device: str = "auto", tta: bool = False, runtime: str | None = None,
    precision: str | None = None,
) -> tuple[Refiner, str, str]:
    """The refiner ``wsiseg refine`` uses for these options, its network loaded once:
    ``(refiner, kind, note)``, kind ``"refinenet"`` or ``"randomwalk"``, note the runtime and
    precision RefineNet runs with (``""`` for the random walker). ``wsiseg serve`` keeps it
    warm across rounds."""
    from wsiseg.refine import randomwalk_refiner, refinenet_refiner

    kind = refiner or ("refinenet" if refinenet else None)
    if kind is None:
        from wsiseg.nets import missing_weights_error

        raise UsageError(
            f"{missing_weights_error('refinenet')} (or use --refiner randomwalk, no weights)"
        )
    if kind == "refinenet":
        if not refinenet:
            raise UsageError("--refiner refinenet needs --refinenet WEIGHTS")
        from wsiseg.runtime import load_network

        # runtime / precision: the command line's, else the workflow's (OpenVINO on CPU).
        net = load_network(Path(refinenet), role="refinenet", workflow=wf, device=device,
                           runtime=runtime or wf.inference.runtime,
                           precision=precision or wf.inference.precision)
        return (refinenet_refiner(net, wf.refinenet.batch_size, tta=tta), kind,
                f"{net.runtime} {net.precision}")
    if tta:
        raise UsageError("--tta needs the RefineNet refiner (the random walker has no "
                         "network to augment)")
    return (randomwalk_refiner(wf.refinenet.randomwalk_beta, wf.refinenet.confident_margin),
            kind, "")


def refine_store(
    store_path: Path, scribbles: Path, *, refinenet: str | None = None,
    refiner: str | None = None, out_dir: Path | None = None, device: str = "auto",
    tta: bool = False, runtime: str | None = None, precision: str | None = None,
) -> int:
    from wsiseg.refine import refine_round

    store = SlideStore.open(store_path)
    if not scribbles.is_file():
        raise WsisegError(f"{scribbles}: no such scribble file")
    fn, kind, kind_note = make_refiner(store.workflow, refinenet=refinenet, refiner=refiner,
                                       device=device, tta=tta, runtime=runtime,
                                       precision=precision)
    out = out_dir or store_path.parent
    result = refine_round(store, scribbles, out, slide_id_of(store_path), fn, kind,
                          runtime=kind_note)
    if line := ai_contours_line(result):
        print(line)
    if result.new_pixels == 0:
        print(f"{scribbles}: nothing new to refine (round {result.round} stays current)")
        return 0
    print(
        f"round {result.round}: {result.new_pixels} new scribble px, {len(result.windows)} "
        f"windows refined ({kind}{f' {kind_note}' if kind_note else ''}"
        f"{', TTA ×8' if tta else ''}, {result.refine_s:.2f} s of "
        f"{result.seconds:.2f} s); tumor "
        f"{result.tumor_mm2_before:.3f} → {result.tumor_mm2_after:.3f} mm²; {result.geojson}"
    )
    return 0


def ai_contours_line(result) -> str:
    """What the export did to our contours, e.g. "AI contours: 1 edited, 2 contours deleted
    (their area is non-tumor), 6 matched by overlap (QuPath replaced their ids)"; "" if
    nothing."""
    parts = []
    if result.edited_ai:
        parts.append(f"{result.edited_ai} edited")
    if result.deleted_ai:
        n = result.deleted_ai
        parts.append(f"{n} contour{'s' if n != 1 else ''} deleted (their area is non-tumor)")
    if result.matched_by_overlap:
        parts.append(f"{result.matched_by_overlap} matched by overlap (QuPath replaced their "
                     "ids)")
    return f"AI contours: {', '.join(parts)}" if parts else ""


def print_history(store_path: Path) -> int:
    store = SlideStore.open(store_path, mode="r")
    rounds = store.attrs.get("rounds") or []
    if not rounds:
        print(f"{store_path}: no rounds yet (run `wsiseg run` first)", file=sys.stderr)
        return 1
    print(f"{'round':>5}  {'time':<24} {'kind':<8} {'tumor':>6} {'non-tumor':>9} "
          f"{'ignored':>7} {'windows':>7} {'tumor mm² before → after':>26}")
    for r in rounds:
        s = r.get("scribbles") or {}
        before = r.get("tumor_mm2_before", r.get("tumor_mm2", 0.0))
        print(f"{r['round']:>5}  {r['time']:<24} {r.get('refiner', r['kind']):<8} "
              f"{s.get('tumor', 0):>6} {s.get('non_tumor', 0):>9} {s.get('ignored', 0):>7} "
              f"{r.get('windows', 0):>7} {before:>12.4f} → {r.get('tumor_mm2', 0.0):.4f}")
    return 0


def undo_store(store_path: Path, out_dir: Path | None = None) -> int:
    from wsiseg.rounds import undo

    store = SlideStore.open(store_path)
    current = undo(store, out_dir or store_path.parent, slide_id_of(store_path))
    print(f"{store_path}: back at round {current}")
    return 0
