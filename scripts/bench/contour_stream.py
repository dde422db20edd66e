"""The contours of a map traced row by row as it is written: what is left for the end.

``wsiseg run`` traces each row of chunks of the probability map as soon as GuideNet has
written it (:class:`wsiseg.contours.RowStreamTracer`); what :meth:`result` still does after
the last row is on the run's serial tail. This traces two generated maps in 256² chunks, every
row announced at once, and prints the whole time and the time of ``result()`` after every
row's trace has finished (best of ``--repeat``):

- ``speckle``: 2048 × 1536 px, 45 % of the pixels tumor at random (37 000 components, about
  2 000 of them spanning chunks);
- ``discs``: 6000 × 2600 px, 80 discs of 20–500 px radius (tumors spanning chunks).

    .venv/bin/python scripts/bench/contour_stream.py

To compare with another commit, run it again with ``PYTHONPATH=<worktree>/pipeline``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    speckle = (rng.random((2048, 1536)) < 0.45).astype(np.uint8) * 255
    discs = np.zeros((6000, 2600), np.uint8)
    yy, xx = np.mgrid[:6000, :2600]
    for _ in range(80):
        cy, cx, r = rng.integers(0, 6000), rng.integers(0, 2600), rng.integers(20, 500)
        discs[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 200
    return {"speckle": speckle, "discs": discs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    from wsiseg.contours import RowStreamTracer

    rows = []
    for name, prob in maps().items():
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            with RowStreamTracer(prob, chunk_px=args.chunk, simplify_px=1.0,
                                 min_area_px=10) as tracer:
                tracer.rows_final(prob.shape[0])
                for future in tracer._futures:  # every row traced: only result() is left
                    future.result()
                t1 = time.perf_counter()
                polygons, _ = tracer.result()
            t2 = time.perf_counter()
            if best is None or t2 - t0 < best[0]:
                best = (t2 - t0, t2 - t1, len(polygons))
        rows.append([name, f"{prob.shape[1]}×{prob.shape[0]}", best[2], f"{best[0]:.3f}",
                     f"{best[1]:.3f}"])
    common.print_report("Contours traced as the map is written: what is left for the end", [
        ("", common.markdown_table(["map", "size", "polygons", "whole s", "result() s"],
                                   rows))], [f"{args.chunk}² chunks, best of {args.repeat}."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
