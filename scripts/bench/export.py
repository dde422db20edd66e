"""Benchmark ``wsiseg export``: time and peak memory of the OME-TIFF export at two slide sizes.

Builds two synthetic slide stores (no slide file, no network): one of ``--size`` working
pixels square and one of twice the edge (4× the area), each with two rounds so that the
exported round 0 is rebuilt through the undo records (:func:`wsiseg.export.refined_of_round`).
Each export runs in a fresh child process that reports its peak resident memory above the
memory it had before the export; memory must stay flat when the area grows 4×.

    .venv/bin/python scripts/bench/export.py --size 8192 --what mask,prob --work /tmp/bench

Prints a Markdown table and the command line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK_PX = 512


def build_store(path: Path, edge_px: int, seed: int = 0) -> None:
    """A store of edge_px² working px: smooth blobs in ``refined``, rounds 0 and 1."""
    from wsiseg import rounds
    from wsiseg.config import load_workflow
    from wsiseg.slide.frame import Frame
    from wsiseg.store import SlideStore, SourceInfo

    wf = load_workflow()
    level0_mpp = 0.25
    scale = wf.working_mpp / level0_mpp
    frame = Frame(level0_size=(round(edge_px * scale),) * 2, level0_mpp=level0_mpp,
                  working_mpp=wf.working_mpp)
    tissue_px = max(1, round(edge_px * wf.working_mpp / wf.tissue.mask_mpp))
    store = SlideStore.create(
        path, frame=frame, source=SourceInfo("(benchmark)", 0, 0.0, ""), workflow=wf,
        tissue=np.ones((tissue_px, tissue_px), bool), slide_info={"benchmark": True},
    )
    rows, cols = frame.working_shape
    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, 4)
    refined = store["refined"]
    for r in range(0, rows, CHUNK_PX):  # one chunk at a time: the builder is bounded too
        for c in range(0, cols, CHUNK_PX):
            y = np.arange(r, min(r + CHUNK_PX, rows))[:, None]
            x = np.arange(c, min(c + CHUNK_PX, cols))[None, :]
            p = 0.5 + 0.3 * np.sin(x / 173 + phases[0]) * np.cos(y / 211 + phases[1]) \
                + 0.2 * np.sin((x + y) / 67 + phases[2])
            refined[r : r + y.shape[0], c : c + x.shape[1]] = np.clip(
                np.rint(p * 255), 0, 255).astype(np.uint8)
    # round 1: eight 1024² boxes changed, their round-0 pixels kept as the undo record
    boxes = [(int(rng.integers(0, rows - 1024)), int(rng.integers(0, cols - 1024)), 1024, 1024)
             for _ in range(8)]
    backups = []
    for r0, c0, h, w in boxes:
        sl = np.s_[r0 : r0 + h, c0 : c0 + w]
        backups.append(rounds.Backup((r0, c0, h, w), np.asarray(refined[sl]),
                                     np.asarray(store["scribbles"][sl])))
    rounds.save_backup(store, 1, backups)
    for r0, c0, h, w in boxes:
        sl = np.s_[r0 : r0 + h, c0 : c0 + w]
        refined[sl] = 255 - np.asarray(refined[sl])
    store.update_attrs(rounds=[{"round": 0, "time": "", "kind": "run", "tumor_mm2": 0.0},
                               {"round": 1, "time": "", "kind": "refine", "tumor_mm2": 0.0}])
    store.set_stage("guide", "done")


def child(store: Path, out: Path, what: str, round_k: int) -> None:
    """Run one export in this process; print JSON with seconds and peak memory."""
    import psutil

    from wsiseg.export import export_store, parse_what

    base_mib = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    written = export_store(store, round_k=round_k, what=parse_what(what), out_dir=out,
                           force=True)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({
        "seconds": seconds, "peak_above_start_mib": peak_mib - base_mib,
        "output_mib": sum(p.stat().st_size for p in written) / 2**20,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="edge of the first slide, "
                        "working px (the second has twice the edge)")
    parser.add_argument("--what", default="mask,prob")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (temp dir)")
    parser.add_argument("--child", nargs=4, metavar=("STORE", "OUT", "WHAT", "ROUND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        store, out, what, round_k = args.child
        child(Path(store), Path(out), what, int(round_k))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="wsiseg-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for edge in (args.size, 2 * args.size):
        store = work / f"bench-{edge}.zarr"
        if not store.exists():
            t0 = time.perf_counter()
            build_store(store, edge)
            print(f"built {store} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        out = work / f"out-{edge}"
        out.mkdir(exist_ok=True)
        for round_k in (0, 1):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(store), str(out), args.what,
                 str(round_k)], check=True, capture_output=True, text=True,
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append((edge, round_k, r))
    print(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}` (what: {args.what})\n")
    print("| working px | Mpx | round | seconds | Mpx/s | peak memory above start (MiB) "
          "| output (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for edge, round_k, r in results:
        mpx = edge * edge / 1e6
        print(f"| {edge}×{edge} | {mpx:.0f} | {round_k} | {r['seconds']:.1f} | "
              f"{mpx / r['seconds']:.0f} | {r['peak_above_start_mib']:.0f} | "
              f"{r['output_mib']:.1f} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
