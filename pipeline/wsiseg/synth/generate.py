"""Generating slides: one slide or a cohort, with its truth, written atomically into a folder.

A synthetic slide is drawn in two stages: a *layout* of low-resolution maps
(:mod:`wsiseg.synth.layout`), then *textures* drawn per tile from it
(:mod:`wsiseg.synth.render`), written as a pyramidal TIFF (:mod:`wsiseg.synth.write`); the
ground truth (:mod:`wsiseg.synth.truth`) is traced from the same layout. The truth files go
to a ``truth/`` subfolder, where a slide glob (``DIR/*.tif*``) does not pick them up as slides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.atomic import atomic_path
from wsiseg.errors import WsisegError
from wsiseg.synth.layout import make_layout
from wsiseg.synth.render import make_style
from wsiseg.synth.truth import write_truth_geojson, write_truth_mask
from wsiseg.synth.write import write_slide

__all__ = ["TRUTH_DIR", "SyntheticSlide", "synthesize_cohort", "synthesize_slide"]

MIN_SIZE_PX = 256
TRUTH_DIR = "truth"  # subfolder of a cohort's folder holding the truth files


@dataclass(frozen=True)
class SyntheticSlide:
    """One generated slide and its ground truth.

    Attributes
    ----------
    slide_path
        ``<out>/<slide_id>.tiff``: pyramidal tiled JPEG TIFF that OpenSlide opens with mpp.
    truth_mask_path
        ``<out>/truth/<slide_id>.truth.tiff``: uint8 {0, 255} tumor mask at ``truth_mpp``, tiled.
        Pixel ``(r, c)`` covers level-0 pixels ``[c·s, (c+1)·s) × [r·s, (r+1)·s)`` with
        ``s = truth_mpp / mpp``; the last row and column may reach past the slide.
    truth_geojson_path
        ``<out>/truth/<slide_id>.truth.geojson``: the tumor regions as QuPath annotations (class
        ``"Tumor"``), level-0 pixel coordinates.
    level0_size
        ``(width, height)`` of level 0 in pixels.
    mpp
        Level-0 resolution in µm/px.
    truth_mpp
        Resolution of the truth mask in µm/px.
    """

    slide_path: Path
    truth_mask_path: Path
    truth_geojson_path: Path
    level0_size: tuple[int, int]
    mpp: float
    truth_mpp: float


def synthesize_slide(
    out_dir: Path,
    slide_id: str,
    size: tuple[int, int],
    mpp: float,
    seed: int,
    *,
    truth_mpp: float = 2.0,
    tumor: bool = True,
) -> SyntheticSlide:
    """Write one synthetic slide into `out_dir`, its truth mask and GeoJSON into ``out_dir/truth``.

    The truth files live in a subfolder so that ``wsiseg run out_dir/*.tif*`` finds the
    slides only (the truth mask is a TIFF too).

    Parameters
    ----------
    out_dir
        Output folder (created if missing).
    slide_id
        File stem of the outputs.
    size
        Level-0 ``(width, height)`` in pixels, each ≥ 256.
    mpp
        Level-0 resolution in µm/px (> 0).
    seed
        Seed; the same ``(seed, size, mpp, truth_mpp, tumor)`` gives byte-identical files.
    truth_mpp
        Resolution of the truth mask in µm/px (> 0).
    tumor
        Whether the slide has tumor regions (the hard cases are drawn either way).

    Returns
    -------
    SyntheticSlide
        Paths and geometry of what was written.

    Raises
    ------
    WsisegError
        On a size below 256 px, a non-positive mpp, or an output folder that cannot be written.
    """
    width, height = _check_args(size, mpp, truth_mpp)
    out_dir = Path(out_dir)
    _ensure_writable(out_dir)
    truth_dir = out_dir / TRUTH_DIR
    _ensure_writable(truth_dir)

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    layout = make_layout((width * mpp, height * mpp), rng, tumor=tumor)
    style = make_style(rng)

    slide = SyntheticSlide(
        slide_path=out_dir / f"{slide_id}.tiff",
        truth_mask_path=truth_dir / f"{slide_id}.truth.tiff",
        truth_geojson_path=truth_dir / f"{slide_id}.truth.geojson",
        level0_size=(width, height),
        mpp=float(mpp),
        truth_mpp=float(truth_mpp),
    )
    with _one_blas_thread():
        _write_atomically(
            slide.truth_geojson_path, lambda p: write_truth_geojson(p, layout, mpp, slide_id)
        )
        _write_atomically(
            slide.truth_mask_path,
            lambda p: write_truth_mask(p, layout, (width, height), mpp, truth_mpp),
        )
        description = json.dumps(
            {"generator": "wsiseg.synth", "seed": int(seed), "mpp": float(mpp), "tumor": tumor}
        )
        _write_atomically(
            slide.slide_path,
            lambda p: write_slide(p, layout, style, (width, height), mpp, description),
        )
    return slide


def synthesize_cohort(
    out_dir: Path,
    n_slides: int,
    size: tuple[int, int],
    mpp: float = 0.5,
    seed: int = 0,
    *,
    truth_mpp: float = 2.0,
) -> list[SyntheticSlide]:
    """Write `n_slides` synthetic slides ``synth-000``, ``synth-001``, ... into `out_dir`.

    The seed of slide ``i`` is derived from ``(seed, i)``, so a cohort's first slides do not
    change when `n_slides` grows. All slides have tumor.

    Returns
    -------
    list of SyntheticSlide
        One per slide, in id order.
    """
    if n_slides < 0:
        raise WsisegError(f"--slides: must be ≥ 0, got {n_slides}")
    _check_args(size, mpp, truth_mpp)
    slides = []
    for i in range(n_slides):
        slide_seed = int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        slides.append(
            synthesize_slide(out_dir, f"synth-{i:03d}", size, mpp, slide_seed, truth_mpp=truth_mpp)
        )
    return slides


def _check_args(size: tuple[int, int], mpp: float, truth_mpp: float) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise WsisegError(f"--size: expected WxH, got {size!r}") from exc
    if width < MIN_SIZE_PX or height < MIN_SIZE_PX:
        raise WsisegError(f"--size: {width}x{height} is too small (each side ≥ {MIN_SIZE_PX} px)")
    if not (math.isfinite(mpp) and mpp > 0):
        raise WsisegError(f"--mpp: must be a positive number of µm/px, got {mpp}")
    if not (math.isfinite(truth_mpp) and truth_mpp > 0):
        raise WsisegError(f"truth_mpp: must be a positive number of µm/px, got {truth_mpp}")
    return width, height


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsisegError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from exc
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK | os.X_OK):
        raise WsisegError(f"{out_dir}: output folder is not writable")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside `path`, then rename it to `path`."""
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise WsisegError(f"{path}: cannot write ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Keep BLAS to one thread while drawing tiles.

    Tiles are drawn in parallel already and their matrix products are tiny; BLAS threads on
    top only wait on each other (tens of ms per product on a busy machine). threadpoolctl is
    optional: without it BLAS keeps its own setting.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with scikit-learn (via tiatoolbox)
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield
