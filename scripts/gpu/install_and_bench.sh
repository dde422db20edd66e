#!/usr/bin/env bash
# Install wsiseg offline on the GPU machine from scripts/gpu/wheels/ and run the GPU benchmark.
#
#   bash scripts/gpu/install_and_bench.sh [arguments of scripts/bench/gpu.py ...]
#
# 1. Picks the wheels whose project is missing here, or installed at a version that does not
#    satisfy wsiseg's or the other wheels' requirements (the image's own packages are kept
#    otherwise), and installs them with `pip install --no-deps --no-index` into $WSISEG_SITE
#    (default /tmp/wsiseg-site), put first on PYTHONPATH: nothing of the image is changed.
# 2. Installs wsiseg itself there with --no-deps (built offline by the hatchling wheel); if
#    that fails, runs it from the checkout (PYTHONPATH=pipeline) instead.
# 3. Checks the imports, then runs scripts/bench/gpu.py with the given arguments; the report
#    is printed and also written to $WSISEG_RESULT (default $OUT/gpu-bench.md when $OUT is
#    set, else /tmp/gpu-bench.md).
#
# Environment: PYTHON (default python3), WSISEG_WHEELS (default scripts/gpu/wheels),
# WSISEG_SITE, WSISEG_BENCH_CACHE (generated slides; default /tmp/wsiseg-bench-cache).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${WSISEG_WHEELS:-$HERE/wheels}
SITE=${WSISEG_SITE:-/tmp/wsiseg-site}
RESULT=${WSISEG_RESULT:-${OUT:-/tmp}/gpu-bench.md}
export WSISEG_BENCH_CACHE=${WSISEG_BENCH_CACHE:-/tmp/wsiseg-bench-cache}
export PYTHONUNBUFFERED=1

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: run scripts/gpu/gather_wheels.py where there is a network," \
         "and carry scripts/gpu/wheels" >&2
    exit 2
fi
"$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF

# -- 1. the wheels this machine needs -------------------------------------------------------
mapfile -t NEEDED < <("$PY" - "$WHEELS" "$REPO/pyproject.toml" <<'EOF'
import importlib.metadata as md
import re
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

wheels, pyproject = Path(sys.argv[1]), Path(sys.argv[2])
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
requirements = [Requirement(r) for r in
                tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
files = sorted(wheels.glob("*.whl"))
for path in files:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                requirements.append(Requirement(line.split(":", 1)[1].strip()))
for path in files:
    name, version = canon(path.name.split("-")[0]), path.name.split("-")[1]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        print(path)  # missing
        continue
    if Version(have) == Version(version):
        continue
    specs = [r.specifier for r in requirements if canon(r.name) == name
             and (r.marker is None or r.marker.evaluate({"extra": ""}))]
    if all(s.contains(have, prereleases=True) for s in specs):
        print(f"keeping {name} {have} of the image (wheel: {version})", file=sys.stderr)
    else:
        print(path)  # too old or too new for some requirement
EOF
)
if ((${#NEEDED[@]})); then
    echo "installing ${#NEEDED[@]} wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${NEEDED[@]}"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. wsiseg itself -----------------------------------------------------------------------
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --upgrade --target "$SITE" "$REPO"; then
    echo "could not build wsiseg offline; running it from the checkout" >&2
    export PYTHONPATH="$REPO/pipeline:$PYTHONPATH"
fi

# -- 3. check, then benchmark ---------------------------------------------------------------
"$PY" - <<'EOF'
import openslide, segmentation_models_pytorch, shapely, skimage, zarr, dask, distributed
import wsiseg
print(f"wsiseg {wsiseg.__version__} from {wsiseg.__file__}; openslide "
      f"{openslide.__library_version__}, smp {segmentation_models_pytorch.__version__}, "
      f"zarr {zarr.__version__}, scikit-image {skimage.__version__}, shapely "
      f"{shapely.__version__}, dask {dask.__version__}")
EOF
cd "$REPO"
"$PY" scripts/bench/gpu.py "$@" | tee "$RESULT"
echo "report: $RESULT"
