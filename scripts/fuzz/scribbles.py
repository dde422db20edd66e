"""Fuzz the scribble reader: N mutated QuPath exports through the refine path; print counts.

Seeds are the files QuPath 0.6's own writer produced (``../shared/fixtures/qupath/written-0.6``)
and our own outputs (the round-0 GeoJSON of a store, gzip-compressed too), as they are and
with their coordinates moved onto the store's tissue (so most reach the rasteriser). Each
file is a seed
with one to three mutations (byte flips, truncation, spliced spans, a node or a ``type``
replaced by another JSON value, gzip / zip containers, see ``fuzzkit.py``); the deep-nesting
cases of issue 20 run first. Every file goes through ``load_scribbles`` → ``rasterize_new``
against a store tiled from the real CMU-1 region (or a generated slide when that is missing).

    nice .venv/bin/python scripts/fuzz/scribbles.py --n 100000 --keep fuzz-failures/

Prints ``files, accepted, refused, other exceptions``; the last must be 0. ``--keep`` saves
each file that raised something else, with the exception, for a test case.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzkit  # noqa: E402

from wsiseg.config import load_workflow  # noqa: E402
from wsiseg.synth import synthesize_cohort  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUPATH_WRITTEN = REPO.parent / "shared" / "fixtures" / "qupath" / "written-0.6"
CMU_SVS = REPO.parent / "shared" / "data" / "real" / "svs" / "cmu-1-small-region.svs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="mutated files (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="save files that raised another type")
    parser.add_argument("--every", type=int, default=5000, help="progress line every N files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="wsiseg-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        slide = CMU_SVS if CMU_SVS.exists() else _synth_slide(tmp)
        store = fuzzkit.make_store(slide, tmp / "out", load_workflow())
        own = tmp / "out" / "fuzz.geojson"
        own_gz = tmp / "own.geojson.gz"
        own_gz.write_bytes(gzip.compress(own.read_bytes(), mtime=0))
        seeds = fuzzkit.seed_files(QUPATH_WRITTEN, [own, own_gz])
        seeds += [d for d in (fuzzkit.placed_on_tissue(x, store) for x in seeds) if d]
        checker = fuzzkit.Checker(store)
        kinds: collections.Counter[str] = collections.Counter()
        keep = Path(args.keep) if args.keep else None
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
        path = tmp / "export.geojson"
        rng = random.Random(args.seed)
        cases = [(name, data) for name, data in fuzzkit.deep_cases().items()]
        cases += [(f"mutant-{i}", None) for i in range(args.n)]
        start = time.monotonic()
        for i, (name, data) in enumerate(cases):
            if data is None:
                data = fuzzkit.mutate(rng.choice(seeds), rng)
            path.write_bytes(data)
            outcome, detail = checker.check(path)
            if outcome == "other":
                kinds[detail.split(":")[0]] += 1
                print(f"{name}: {detail}", file=sys.stderr)
                if keep:
                    (keep / f"{name}.geojson").write_bytes(data)
                    (keep / f"{name}.txt").write_text(detail + "\n")
            if args.every and (i + 1) % args.every == 0:
                print(f"  {i + 1} files, {time.monotonic() - start:.0f} s: {checker.counts}",
                      file=sys.stderr, flush=True)
    c = checker.counts
    print(f"files {c['files']}, accepted {c['accepted']}, refused {c['refused']}, "
          f"other exceptions {c['other']} ({time.monotonic() - start:.0f} s, seed {args.seed})")
    for kind, n in kinds.most_common():
        print(f"  {kind}: {n}")
    return 1 if c["other"] else 0


def _synth_slide(tmp: Path) -> Path:
    return synthesize_cohort(tmp / "synth", 1, (4096, 3072), mpp=0.5, seed=7)[0].slide_path


if __name__ == "__main__":
    sys.exit(main())
