"""Download the wheels wsiseg needs on the GPU machine (Python 3.12, torch with CUDA, offline).

The GPU machine's image already holds torch, torchvision, numpy, scipy, pillow, pyyaml, tqdm,
safetensors, psutil, timm, huggingface-hub, imageio, lazy-loader, networkx, fsspec, click,
cloudpickle, toolz, msgpack, sortedcontainers, jinja2, packaging, pathspec and pluggy
(``/work/.library/device/KINDS.md``). This script fetches the rest of what wsiseg imports,
with ``pip download --no-deps --only-binary=:all:`` for CPython 3.12 on manylinux x86-64, at
the versions of the environment that runs it (the project's locked ones), into
``scripts/gpu/wheels/`` (git-ignored), and prints each wheel's size and the total.

The folder travels to the GPU machine with the working tree (``carry``), whose limit is 64 MiB
in all. The core set is 56 MiB; what TIAToolbox 2.1 imports and the image lacks adds 4.6 MiB
(SimpleITK excepted: 50 MB, imported by TIAToolbox for registration only, which
``scripts/bench/gpu.py`` stubs), 60.7 MiB in all, 62.4 with the working tree as of writing.
``--no-tiatoolbox`` leaves TIAToolbox out (the comparison (c) is then skipped there);
``--skip scikit-image`` saves 13 MiB where the image's scikit-image is already ≥ 0.26.

    .venv/bin/python scripts/gpu/gather_wheels.py
    .venv/bin/python scripts/gpu/gather_wheels.py --no-tiatoolbox --skip scikit-image
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 64

#: What wsiseg imports that the GPU image lacks (or may hold at too old a version).
CORE = [
    "openslide-bin", "openslide-python",                 # slide reading
    "segmentation-models-pytorch",                       # the networks (timm is there)
    "zarr", "numcodecs", "google-crc32c", "donfig",      # the slide store
    "dask", "distributed", "partd", "locket", "tblib", "zict", "tornado",  # orchestration
    "shapely",                                           # contours, GeoJSON
    "imagecodecs", "tifffile",                           # JPEG tiles (synth), OME-TIFF export
    "scikit-image",                                      # ≥ 0.26 (the image's may be older)
    "hatchling", "trove-classifiers",                    # to build wsiseg itself, offline
]
#: What TIAToolbox 2.1's SemanticSegmentor import chain adds (SimpleITK left out: stubbed).
TIATOOLBOX = [
    "tiatoolbox", "umap-learn", "pynndescent", "universal-pathlib", "jmespath", "defusedxml",
    "cffi", "pycparser",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> str:
    """The canonical project name of a wheel file (``shapely-2.1.2-cp312-...`` → shapely)."""
    return canonical(path.name.split("-")[0])


def pinned(name: str) -> str:
    """``name==version`` of this environment, or the bare name (latest) when not installed."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def pip_command() -> list[str]:
    """pip of this interpreter, else the first ``pip3``/``pip`` on PATH (only downloads)."""
    probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            return [found]
    raise SystemExit("no pip found: run this with a Python that has pip, or put pip on PATH")


def tree_mib() -> float:
    """Size of what else travels: tracked and untracked-not-ignored files of the checkout."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                             "-z"], capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for rel in listed:
        path = REPO / rel.decode()
        if rel and path.is_file():
            total += path.stat().st_size
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "gpu" / "wheels")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--tiatoolbox", action=argparse.BooleanOptionalAction, default=True,
                        help="add TIAToolbox's import chain, SimpleITK excepted (default: yes)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME",
                        help="leave a project out (repeatable), e.g. one the image has")
    args = parser.parse_args(argv)

    skip = {canonical(s) for s in args.skip}
    names = [n for n in CORE + (TIATOOLBOX if args.tiatoolbox else [])
             if canonical(n) not in skip]
    wanted = {canonical(n) for n in names}
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):  # one version of each project, nothing left over
        if wheel_project(old) not in wanted:
            old.unlink()
    specs = [pinned(n) for n in names]
    for spec in specs:  # a changed pin replaces the old wheel
        name, _, version = spec.partition("==")
        for old in args.out.glob("*.whl"):
            if wheel_project(old) == canonical(name) and version and \
                    f"-{version}-" not in old.name:
                old.unlink()
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [*pip_command(), "download", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp", *platforms,
           "--dest", str(args.out), *specs]
    print("$ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)

    wheels = sorted(args.out.glob("*.whl"), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in wheels) / 2**20
    for p in wheels:
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.name}")
    tree = tree_mib()
    print(f"{total:8.2f} MiB  total, {len(wheels)} wheels in {args.out}")
    print(f"{tree:8.2f} MiB  the rest of the working tree; together {total + tree:.1f} of the "
          f"{LIMIT_MIB} MiB a device call carries")
    if total + tree > LIMIT_MIB:
        print(f"warning: over {LIMIT_MIB} MiB; leave something out with --skip", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
