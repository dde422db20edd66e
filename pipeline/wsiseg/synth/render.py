"""Generated H&E-like slides with ground truth, for tests and the demo.

A synthetic slide is drawn in two stages:

1. a *layout*: a few small, low-resolution float maps (tissue, tumor, lymphoid aggregates,
   stroma-like tumor, stain variation, fibre orientation) made from seeded smooth noise and
   shapes, at ``layout_mpp`` µm/px (8 µm/px, coarser for huge slides so a map stays ≤ 4 Mpx);
2. *textures*, drawn procedurally per tile from the layout, the slide key and the tile's
   global position in µm, so that any tile of any pyramid level can be drawn alone.

Every layout map is read through one bilinear interpolant (nodes at pixel centres). The ground
truth is that interpolant of the tumor map thresholded at 0.5: sampled at ``truth_mpp`` for the
mask and traced as iso-lines for the GeoJSON, so the two agree with each other and with the
place where the texture is half tumor, half normal.

Textures are a Beer–Lambert stain model: per pixel a haematoxylin and an eosin concentration,
``rgb = I0 · exp(-(h·H + e·E))``. Normal tissue is eosin stroma with sparse spindle nuclei;
tumor is purple cytoplasm with large, crowded, pleomorphic nuclei; the hard cases are
lymphoid aggregates (crowded small dark nuclei, normal) and stroma-like tumor (sparse nuclei,
tumor). Nuclei live on warped grids of cells (one nucleus at most per cell, kept inside it),
so a pixel needs only its own cell. All sizes are in µm; levels coarser than
``_DETAIL_MAX_MPP`` draw the expected nuclear coverage instead of single nuclei, which keeps
them close to an area-downsampled finer level.

The slide is a generic tiled pyramidal TIFF (JPEG, YCbCr 4:2:0, 256² tiles, downsample 4 per
level down to ≤ 1024 px) with its resolution in pixels per centimetre, which OpenSlide 4
reports as ``openslide.mpp-x``/``mpp-y``. tifffile is handed tile generators, so memory stays at
a few tiles whatever the slide size.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
import shapely
import tifffile
from scipy import ndimage, sparse
from skimage import measure, transform

from wsiseg.errors import WsisegError

__all__ = [
    "SyntheticSlide",
    "read_truth_mask",
    "synthesize_cohort",
    "synthesize_slide",
]

TILE_PX = 256
JPEG_QUALITY = 85
LEVEL_DOWNSAMPLE = 4
SMALLEST_LEVEL_PX = 1024
MIN_SIZE_PX = 256

TUMOR_CLASS = "Tumor"
TUMOR_COLOR = (200, 0, 0)

_LAYOUT_MPP = 8.0
_LAYOUT_MAX_PX = 4_000_000
# Finer levels draw single nuclei; coarser ones draw their expected coverage (a nucleus is
# then about one pixel or less, and single ones would alias into speckle).
_DETAIL_MAX_MPP = 2.5
_NUCLEUS_EDGE_UM = 0.5  # anti-aliasing ramp of a nucleus at fine levels
_WARP_UM = 4.5  # amplitude of the smooth warp that keeps nuclei off a visible grid
_WARP_LATTICE_UM = 18.0
_FIBRE_PERIOD_UM = 7.0
_PIXEL_NOISE_SD = 2.2  # grey levels
_NOISE_TEXTURE_PX = 3 * TILE_PX
_BUFFER_TILES = 16  # tiles handed to the encoder at a time

# Layout map indices.
_TISSUE, _TUMOR, _LYMPH, _STROMA_TUMOR, _STAIN, _ORIENT = range(6)

# Stain optical densities per unit concentration (rows: haematoxylin, eosin; columns: R, G, B),
# close to the usual Macenko estimates; each slide jitters them a little.
_STAIN_OD = np.array([[0.56, 0.72, 0.41], [0.20, 0.82, 0.53]], dtype=np.float64)


@dataclass(frozen=True)
class SyntheticSlide:
    """One generated slide and its ground truth.

    Attributes
    ----------
    slide_path
        ``<out>/<slide_id>.tiff``: pyramidal tiled JPEG TIFF that OpenSlide opens with mpp.
    truth_mask_path
        ``<out>/<slide_id>.truth.tiff``: uint8 {0, 255} tumor mask at ``truth_mpp``, tiled.
        Pixel ``(r, c)`` covers level-0 pixels ``[c·s, (c+1)·s) × [r·s, (r+1)·s)`` with
        ``s = truth_mpp / mpp``; the last row and column may reach past the slide.
    truth_geojson_path
        ``<out>/<slide_id>.truth.geojson``: the tumor regions as QuPath annotations (class
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


# --------------------------------------------------------------------------------------------
# Public API


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
    """Write one synthetic slide, its truth mask and its truth GeoJSON into `out_dir`.

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

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    layout = _make_layout((width * mpp, height * mpp), rng, tumor=tumor)
    style = _make_style(rng)

    slide = SyntheticSlide(
        slide_path=out_dir / f"{slide_id}.tiff",
        truth_mask_path=out_dir / f"{slide_id}.truth.tiff",
        truth_geojson_path=out_dir / f"{slide_id}.truth.geojson",
        level0_size=(width, height),
        mpp=float(mpp),
        truth_mpp=float(truth_mpp),
    )
    with _one_blas_thread():
        _write_atomically(
            slide.truth_geojson_path, lambda p: _write_truth_geojson(p, layout, mpp, slide_id)
        )
        _write_atomically(
            slide.truth_mask_path,
            lambda p: _write_truth_mask(p, layout, (width, height), mpp, truth_mpp),
        )
        description = json.dumps(
            {"generator": "wsiseg.synth", "seed": int(seed), "mpp": float(mpp), "tumor": tumor}
        )
        _write_atomically(
            slide.slide_path,
            lambda p: _write_slide(p, layout, style, (width, height), mpp, description),
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


def read_truth_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a truth mask resampled to a working grid.

    The working grid of `shape` ``(rows, cols)`` spans the slide's level-0 extent (read from
    the mask's description; the whole mask if it has none). Each working pixel is tumor when
    at least half of its area is tumor in the mask (area majority; nearest when upsampling).

    Parameters
    ----------
    path
        A ``*.truth.tiff`` written by :func:`synthesize_slide`.
    shape
        ``(rows, cols)`` of the working grid.

    Returns
    -------
    numpy.ndarray
        bool, shape `shape`.
    """
    path = Path(path)
    rows, cols = (int(v) for v in shape)
    if rows < 1 or cols < 1:
        raise WsisegError(f"{path}: cannot resample the truth mask to shape {tuple(shape)}")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            mask = page.asarray() > 127
            meta = _parse_json(page.description)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise WsisegError(f"{path}: cannot read the truth mask ({exc})") from exc
    if mask.ndim != 2:
        raise WsisegError(f"{path}: truth mask is not a 2-D image (shape {mask.shape})")
    src_rows, src_cols = mask.shape
    # Extent of the working grid in mask pixels.
    extent_rows, extent_cols = float(src_rows), float(src_cols)
    if meta and "level0_size" in meta and "truth_px_level0" in meta:
        level0_w, level0_h = meta["level0_size"]
        extent_cols = level0_w / meta["truth_px_level0"]
        extent_rows = level0_h / meta["truth_px_level0"]
    weights_r = _area_weights(rows, extent_rows, src_rows)
    weights_c = _area_weights(cols, extent_cols, src_cols)
    # Tumor share of each working pixel, built from strips of mask rows so that the float
    # copy never exceeds a strip.
    fraction = np.zeros((rows, cols), dtype=np.float32)
    strip = 1024
    for r0 in range(0, src_rows, strip):
        block = mask[r0 : r0 + strip].astype(np.float32)
        across = (weights_c @ block.T).T  # (strip rows, cols)
        fraction += weights_r[:, r0 : r0 + strip] @ across
    return fraction >= 0.5


# --------------------------------------------------------------------------------------------
# Arguments and files


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
    # Not mkstemp: its files are private (0600); the outputs get the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WsisegError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _parse_json(text: str | None) -> dict | None:
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _area_weights(n_out: int, extent: float, n_src: int) -> sparse.csr_array:
    """Sparse (n_out, n_src) share of each output cell covered by each source cell.

    Output cell ``i`` spans source coordinates ``[i, i+1) · extent / n_out``; source cells
    past `n_src` count as empty.
    """
    step = extent / n_out
    lo = np.arange(n_out, dtype=np.float64) * step
    src = np.floor(lo).astype(np.int64)[:, None] + np.arange(math.ceil(step) + 1)[None, :]
    overlap = np.minimum(lo[:, None] + step, src + 1) - np.maximum(lo[:, None], src)
    keep = (overlap > 0) & (src < n_src)
    out = np.broadcast_to(np.arange(n_out)[:, None], src.shape)[keep]
    shares = (overlap[keep] / step).astype(np.float32)
    return sparse.csr_array((shares, (out, src[keep])), shape=(n_out, n_src))


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class _Layout:
    """Low-resolution maps of one slide.

    ``maps`` is float32 (6, rows, cols); node ``(r, c)`` sits at ``((c+0.5)·mpp, (r+0.5)·mpp)``
    µm. Channels: tissue [0, 1], tumor [0, 1] (truth is ≥ 0.5), lymphoid aggregates [0, 1],
    stroma-like tumor [0, 1], stain variation [-1, 1], fibre orientation [0, 1].
    """

    maps: np.ndarray
    mpp: float


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation, float32 of `shape`.

    Drawn on a grid coarse enough for the filter to stay cheap, then resized.
    """
    factor = max(1.0, sigma_px / 4.0)
    small = (max(2, math.ceil(shape[0] / factor) + 2), max(2, math.ceil(shape[1] / factor) + 2))
    coarse = rng.standard_normal(small, dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma_px / factor, mode="wrap")
    if factor > 1.0:
        noise = transform.resize(coarse, shape, order=1, mode="edge", anti_aliasing=False)
        noise = noise.astype(np.float32, copy=False)
    else:
        noise = np.ascontiguousarray(coarse[: shape[0], : shape[1]])
    noise -= noise.mean(dtype=np.float64)
    noise /= max(float(noise.std(dtype=np.float64)), 1e-9)
    return noise


def _depth_um(mask: np.ndarray, mpp: float) -> np.ndarray:
    """Distance to the nearest pixel outside `mask`, in µm: float32."""
    return (ndimage.distance_transform_edt(mask) * mpp).astype(np.float32)


def _keep_large_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _blobs(
    rng: np.random.Generator,
    candidates: np.ndarray,
    count: int,
    radius_px: tuple[float, float],
    distortion: np.ndarray,
) -> np.ndarray:
    """Union of `count` distorted discs centred on random `candidates` pixels (bool map)."""
    out = np.zeros(candidates.shape, dtype=bool)
    where = np.flatnonzero(candidates)
    if where.size == 0:
        return out
    rows, cols = candidates.shape
    for _ in range(count):
        r0, c0 = divmod(int(where[rng.integers(where.size)]), cols)
        radius = rng.uniform(*radius_px)
        half = math.ceil(radius * 1.6) + 1
        rs = slice(max(0, r0 - half), min(rows, r0 + half + 1))
        cs = slice(max(0, c0 - half), min(cols, c0 + half + 1))
        rr, cc = np.ogrid[rs, cs]
        field = 1.0 - ((rr - r0) ** 2 + (cc - c0) ** 2) / radius**2 + 0.35 * distortion[rs, cs]
        out[rs, cs] |= field > 0
    return out


def _make_layout(size_um: tuple[float, float], rng: np.random.Generator, *, tumor: bool) -> _Layout:
    """Draw the layout maps of a slide of `size_um` = (width, height) µm."""
    width_um, height_um = size_um
    mpp = max(_LAYOUT_MPP, math.sqrt(width_um * height_um / _LAYOUT_MAX_PX))
    rows, cols = math.ceil(height_um / mpp) + 1, math.ceil(width_um / mpp) + 1
    y_um = ((np.arange(rows, dtype=np.float32) + 0.5) * mpp)[:, None]
    x_um = ((np.arange(cols, dtype=np.float32) + 0.5) * mpp)[None, :]
    short_um = min(width_um, height_um)

    # Tissue: one or two distorted ellipses, clear of the slide border. A piece is
    # ((centre x, centre y), (half width, half height)) as fractions of the slide.
    jitter = rng.uniform(-1.0, 1.0, size=4)
    if rng.random() < 0.5:
        half = rng.uniform(0.36, 0.44, size=2)
        pieces = [((0.5 + 0.04 * jitter[0], 0.5 + 0.04 * jitter[1]), (half[0], half[1]))]
    else:
        along, across = rng.uniform(0.18, 0.22), rng.uniform(0.36, 0.44)
        shrink = rng.uniform(0.75, 1.0, size=2)
        pieces = [
            ((0.27 + 0.02 * jitter[0], 0.5 + 0.05 * jitter[1]), (along, across)),
            ((0.73 + 0.02 * jitter[2], 0.5 + 0.05 * jitter[3]),
             (along * shrink[0], across * shrink[1])),
        ]  # fmt: skip
        if height_um > width_um:  # side by side along the long side
            pieces = [((cy, cx), (ry, rx)) for (cx, cy), (rx, ry) in pieces]
    maps = np.empty((6, rows, cols), dtype=np.float32)
    field = np.full((rows, cols), -np.inf, dtype=np.float32)
    for (cx, cy), (rx, ry) in pieces:
        piece = ((x_um - cx * width_um) / (rx * width_um)) ** 2
        piece = 1.0 - piece - ((y_um - cy * height_um) / (ry * height_um)) ** 2
        np.maximum(field, piece, out=field)
    del piece
    field += 0.30 * _smooth_noise(rng, (rows, cols), 0.09 * short_um / mpp)
    field += 0.08 * _smooth_noise(rng, (rows, cols), 0.025 * short_um / mpp)
    margin_um = 0.025 * short_um
    inside_y = (y_um > margin_um) & (y_um < height_um - margin_um)
    inside_x = (x_um > margin_um) & (x_um < width_um - margin_um)
    tissue_bin = (field > 0) & inside_y & inside_x
    del field
    tissue_bin = _keep_large_components(tissue_bin, 0.03 * tissue_bin.sum())
    tissue_area_um2 = float(tissue_bin.sum()) * mpp * mpp

    # Lumens: a few white holes in the tissue (vessels, fat), some of which land in tumor.
    distortion = _smooth_noise(rng, (rows, cols), 30.0 / mpp)
    n_holes = int(min(40, rng.poisson(1.2 * tissue_area_um2 / 1e6)))
    deep = _depth_um(tissue_bin, mpp) > 150.0
    tissue_bin &= ~_blobs(rng, deep, n_holes, (20.0 / mpp, 70.0 / mpp), distortion)
    tissue = maps[_TISSUE]
    ndimage.gaussian_filter(tissue_bin.astype(np.float32), 4.0 / mpp, output=tissue)

    # Tumor: high values of smooth noise inside the tissue core, a set share of the tissue.
    core = _depth_um(tissue_bin, mpp) > min(120.0, 0.04 * short_um)
    tumor_bin = np.zeros((rows, cols), dtype=bool)
    if tumor and core.any():
        share = rng.uniform(0.18, 0.34)
        scale_px = 0.07 * math.sqrt(max(tissue_area_um2, 1.0)) / mpp
        noise = _smooth_noise(rng, (rows, cols), scale_px)
        noise += 0.35 * _smooth_noise(rng, (rows, cols), scale_px / 4)
        values = noise[core]
        wanted = share * tissue_bin.sum()
        threshold = (
            -np.inf if values.size <= wanted else np.quantile(values, 1 - wanted / values.size)
        )
        tumor_bin = core & (noise > threshold)
        del noise, values
        min_px = min((150.0 / mpp) ** 2, 0.02 * tissue_bin.sum())
        tumor_bin = _keep_large_components(tumor_bin, max(4.0, min_px))
    tumor_map = maps[_TUMOR]
    ndimage.gaussian_filter(tumor_bin.astype(np.float32), 12.0 / mpp, output=tumor_map)
    tumor_map *= tissue

    # Hard cases: lymphoid aggregates (crowded small nuclei) away from tumor; stroma-like
    # patches (sparse nuclei) inside tumor. Counts grow with the area (per mm²); sizes are
    # in µm but stay small on small slides.
    blob_um = min(1.0, 0.08 * short_um / 180.0)
    n_lymph = int(np.clip(round(1.2 * tissue_area_um2 / 1e6 * rng.uniform(0.7, 1.3)), 2, 40))
    where = core & (_depth_um(~tumor_bin, mpp) > 250.0)
    radius_px = (60.0 * blob_um / mpp, 180.0 * blob_um / mpp)
    lymph_bin = _blobs(rng, where, n_lymph, radius_px, distortion)
    lymph = maps[_LYMPH]
    ndimage.gaussian_filter(lymph_bin.astype(np.float32), 10.0 / mpp, output=lymph)
    lymph *= tissue
    lymph *= 1.0 - np.clip(tumor_map * 2.0, 0.0, 1.0)
    tumor_area_um2 = float(tumor_bin.sum()) * mpp * mpp
    n_stroma = int(np.clip(round(3.5 * tumor_area_um2 / 1e6 * rng.uniform(0.7, 1.3)), 1, 30))
    where = _depth_um(tumor_bin, mpp) > 90.0
    radius_px = (50.0 * blob_um / mpp, 150.0 * blob_um / mpp)
    stroma_bin = _blobs(rng, where, n_stroma, radius_px, distortion)
    ndimage.gaussian_filter(stroma_bin.astype(np.float32), 15.0 / mpp, output=maps[_STROMA_TUMOR])
    del where, core, distortion

    maps[_STAIN] = np.clip(_smooth_noise(rng, (rows, cols), 400.0 / mpp) * 0.5, -1.0, 1.0)
    orient = maps[_ORIENT]
    orient[:] = _smooth_noise(rng, (rows, cols), 150.0 / mpp)
    orient *= -6.0
    np.exp(orient, out=orient)
    orient += 1.0
    np.reciprocal(orient, out=orient)
    # Flush the filters' far tails to zero: denormal floats make every later product crawl.
    maps[np.abs(maps) < 1e-6] = 0.0
    return _Layout(maps=maps, mpp=mpp)


def _layout_weights(
    coords_um: np.ndarray, layout_mpp: float, n_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear weights of sample coordinates on layout nodes.

    Returns ``(weights, nodes)``: float32 (len(coords), k) and the int node indices (k,),
    clamped to ``[0, n_nodes)`` (edge extension).
    """
    q = coords_um / layout_mpp - 0.5
    base = np.floor(q).astype(np.int64)
    frac = (q - base).astype(np.float32)
    first = int(base.min())
    k = int(base.max()) - first + 2
    weights = np.zeros((coords_um.size, k), dtype=np.float32)
    idx = np.arange(coords_um.size)
    weights[idx, base - first] = 1.0 - frac
    weights[idx, base - first + 1] += frac
    nodes = np.clip(np.arange(first, first + k), 0, n_nodes - 1)
    return weights, nodes


def _bilinear_index(
    coords_um: np.ndarray, layout_mpp: float, n_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left node index (clamped to ``[0, n_nodes - 2]``) and weight of the right node."""
    q = coords_um / layout_mpp - 0.5
    base = np.floor(q).astype(np.int64)
    frac = (q - base).astype(np.float32)
    frac = np.where(base < 0, 0.0, np.where(base > n_nodes - 2, 1.0, frac)).astype(np.float32)
    return np.clip(base, 0, n_nodes - 2), frac


def _sample_layout(
    layout: _Layout, y_um: np.ndarray, x_um: np.ndarray, channels: Sequence[int]
) -> np.ndarray:
    """Bilinear samples of layout `channels` on the grid ``y_um × x_um``: (c, len(y), len(x)).

    Coordinates past the map edge take the edge value.
    """
    maps = layout.maps
    channels = np.asarray(channels)
    wy, ny = _layout_weights(y_um, layout.mpp, maps.shape[1])
    wx, nx = _layout_weights(x_um, layout.mpp, maps.shape[2])
    if wy.shape[1] <= 48 and wx.shape[1] <= 48:
        # Few nodes (fine levels): two small matrix products.
        crop = maps[channels[:, None, None], ny[None, :, None], nx[None, None, :]]
        return wy[None] @ crop @ np.ascontiguousarray(wx.T)[None]
    # Many nodes (coarse levels): the weight matrices would be mostly zeros; gather instead.
    by, fy = _bilinear_index(y_um, layout.mpp, maps.shape[1])
    bx, fx = _bilinear_index(x_um, layout.mpp, maps.shape[2])
    r0, c0 = int(by.min()), int(bx.min())
    sub = maps[:, r0 : int(by.max()) + 2, c0 : int(bx.max()) + 2][channels]
    top, bottom = sub[:, by - r0], sub[:, by - r0 + 1]
    rows = top + (bottom - top) * fy[None, :, None]
    left, right = rows[:, :, bx - c0], rows[:, :, bx - c0 + 1]
    return left + (right - left) * fx[None, None, :]


# --------------------------------------------------------------------------------------------
# Textures


def _hash_uniform(iy: np.ndarray, ix: np.ndarray, key: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 from integer lattice coordinates and keys (splitmix64 finaliser).

    `iy`, `ix` and `key` broadcast together; a key array gives independent draws per key.
    """
    iy64 = np.asarray(iy, dtype=np.int64).astype(np.uint64)
    ix64 = np.asarray(ix, dtype=np.int64).astype(np.uint64)
    keys = np.array(np.asarray(key, dtype=object) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = iy64 * np.uint64(0x9E3779B97F4A7C15) ^ ix64 * np.uint64(0xC2B2AE3D27D4EB4F)
        z = z ^ keys
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)


def _lattice_weights(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Smoothstep weights of coordinates `q` (lattice units) on integer nodes: (W, nodes)."""
    base = np.floor(q).astype(np.int64)
    frac = (q - base).astype(np.float32)
    frac = frac * frac * (3.0 - 2.0 * frac)
    frac[frac < 1e-6] = 0.0  # no denormals
    first = int(base.min())
    k = int(base.max()) - first + 2
    weights = np.zeros((q.size, k), dtype=np.float32)
    idx = np.arange(q.size)
    weights[idx, base - first] = 1.0 - frac
    weights[idx, base - first + 1] += frac
    return weights, np.arange(first, first + k)


def _value_noise(
    y_um: np.ndarray, x_um: np.ndarray, lattice_um: tuple[float, float], key: int
) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the grid ``y_um × x_um``, continuous across tiles."""
    wy, ny = _lattice_weights(y_um / lattice_um[0])
    wx, nx = _lattice_weights(x_um / lattice_um[1])
    values = _hash_uniform(ny[:, None], nx[None, :], key) * 2.0 - 1.0
    return wy @ values @ np.ascontiguousarray(wx.T)


@dataclass(frozen=True)
class _NucleusKind:
    """Size, shape and stain of one kind of nucleus (lengths in µm)."""

    major_um: tuple[float, float]  # semi-major axis: min, max
    aspect: tuple[float, float]  # minor / major: min, max
    haematoxylin: tuple[float, float]
    eosin: float
    rim: float  # vesicular nuclei: share of haematoxylin lost at the centre

    def mean_area_um2(self) -> float:
        a0, a1 = self.major_um[0], self.major_um[1] - self.major_um[0]
        mean_sq = a0 * a0 + a0 * a1 + a1 * a1 / 3.0
        return math.pi * mean_sq * (self.aspect[0] + self.aspect[1]) / 2.0

    def mean_haematoxylin(self) -> float:
        return (self.haematoxylin[0] + self.haematoxylin[1]) / 2.0 * (1.0 - self.rim / 2.0)


_TUMOR_NUCLEUS = _NucleusKind((3.5, 5.0), (0.62, 0.95), (1.25, 1.85), 0.12, 0.35)
_LYMPH_NUCLEUS = _NucleusKind((2.3, 2.8), (0.85, 1.0), (1.9, 2.2), 0.08, 0.0)
_STROMA_NUCLEUS = _NucleusKind((3.0, 5.2), (0.26, 0.40), (1.05, 1.35), 0.15, 0.08)


@dataclass(frozen=True)
class _NucleusLayer:
    """A warped grid of cells holding at most one nucleus each."""

    cell_um: float
    offset_um: tuple[float, float]
    # "crowded": tumor and lymphocyte nuclei; "lymphoid": lymphocytes only (a fine grid
    # that packs lymphoid aggregates); "stroma": spindle nuclei of normal stroma.
    population: str
    key: int

    @property
    def dense(self) -> bool:
        return self.population != "stroma"


# Grids of different pitch overlap so crowded nuclei do not line up.
_LAYERS = (
    _NucleusLayer(12.0, (0.0, 0.0), "crowded", key=101),
    _NucleusLayer(15.0, (4.1, 7.3), "crowded", key=202),
    _NucleusLayer(7.5, (1.7, 3.9), "lymphoid", key=404),
    _NucleusLayer(17.0, (2.3, 9.1), "stroma", key=303),
)
_TUMOR_PRESENCE = 0.75  # per dense layer, in solid tumor
_STROMA_TUMOR_PRESENCE = 0.10
_LYMPH_PRESENCE = 0.85
_STROMA_PRESENCE = 0.42


def _presence(
    layer: _NucleusLayer,
    tissue: np.ndarray,
    tumor: np.ndarray,
    lymph: np.ndarray,
    stroma_tumor: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probability that a cell holds a nucleus, and the share of them that are lymphocytes."""
    if layer.population == "lymphoid":
        solid = tumor * (1.0 - stroma_tumor)
        presence = tissue * _LYMPH_PRESENCE * lymph * (1.0 - solid)
        return presence, np.ones_like(presence)
    if layer.population == "crowded":
        solid = tumor * (1.0 - stroma_tumor)
        p_tumor = tumor * (
            _TUMOR_PRESENCE * (1.0 - stroma_tumor) + _STROMA_TUMOR_PRESENCE * stroma_tumor
        )
        p_lymph = _LYMPH_PRESENCE * lymph * (1.0 - solid)
        total = p_tumor + p_lymph
        return tissue * total, p_lymph / np.maximum(total, 1e-6)
    stroma_like = (1.0 - tumor * (1.0 - stroma_tumor)) * (1.0 - lymph)
    return tissue * _STROMA_PRESENCE * stroma_like, None


@dataclass(frozen=True)
class _Style:
    """Per-slide colour: stain ODs (2, 3), background intensity, noise texture, hash key."""

    stain_od: np.ndarray
    background: float
    noise: np.ndarray  # float32 (_NOISE_TEXTURE_PX, _NOISE_TEXTURE_PX, 3), grey levels
    fibre_angles: tuple[float, float]  # radians, the two directions collagen runs in
    key: int


def _make_style(rng: np.random.Generator) -> _Style:
    od = _STAIN_OD * rng.uniform(0.92, 1.08, size=(2, 1)) + rng.uniform(-0.03, 0.03, size=(2, 3))
    noise = rng.standard_normal((_NOISE_TEXTURE_PX, _NOISE_TEXTURE_PX, 3)).astype(np.float32)
    first_angle = rng.uniform(0.0, math.pi)
    return _Style(
        stain_od=od.astype(np.float32),
        background=float(rng.uniform(238.0, 244.0)),
        noise=noise * np.float32(_PIXEL_NOISE_SD),
        fibre_angles=(first_angle, first_angle + rng.uniform(0.35, 0.65) * math.pi),
        key=int(rng.integers(0, 2**62)),
    )


def _draw_nuclei(
    layout: _Layout,
    style: _Style,
    layer: _NucleusLayer,
    y_um: np.ndarray,
    x_um: np.ndarray,
    warp: tuple[np.ndarray, np.ndarray],
    pixel_um: float,
    haem: np.ndarray,
    eosin: np.ndarray,
) -> None:
    """Composite one layer of single nuclei over `haem` and `eosin` (T, T), in place.

    `y_um`, `x_um` (float64, (T,)) are the tile's pixel centres; `warp` (float32, (T, T) each)
    displaces the cell grid by a few µm.
    """
    cell = layer.cell_um
    # Cell coordinates relative to the first cell the tile can touch, so the per-pixel work
    # stays in float32 however far the tile is from the origin.
    gy = (y_um - layer.offset_um[0]) / cell
    gx = (x_um - layer.offset_um[1]) / cell
    reach = _WARP_UM / cell
    iy0 = math.floor(gy[0] - reach)
    ix0 = math.floor(gx[0] - reach)
    cy = np.arange(iy0, math.floor(gy[-1] + reach) + 1)
    cx = np.arange(ix0, math.floor(gx[-1] + reach) + 1)
    at_cell = _sample_layout(
        layout, (cy + 0.5) * cell + layer.offset_um[0], (cx + 0.5) * cell + layer.offset_um[1],
        (_TISSUE, _TUMOR, _LYMPH, _STROMA_TUMOR, _ORIENT),
    )  # fmt: skip
    tissue, tumor, lymph, stroma_tumor, orient = at_cell
    presence, lymph_share = _presence(layer, tissue, tumor, lymph, stroma_tumor)
    if float(presence.max()) <= 0.0:
        return
    key = style.key ^ (layer.key * 0x100000001B3)
    keys = np.array([key + j for j in range(8)], dtype=object)[:, None, None]
    u = _hash_uniform(cy[None, :, None], cx[None, None, :], keys)
    present = u[0] < presence

    if layer.dense:
        is_lymph = u[1] < lymph_share
        kinds = [(_TUMOR_NUCLEUS, ~is_lymph), (_LYMPH_NUCLEUS, is_lymph)]
        angle = u[4] * np.float32(math.pi)
    else:
        kinds = [(_STROMA_NUCLEUS, np.ones_like(present))]
        # Spindle nuclei lie along the local fibres (bands of phase angle θ run along θ + 90°).
        angle = np.where(orient > 0.5, style.fibre_angles[0], style.fibre_angles[1])
        angle = angle + (np.pi / 2) + (u[4] - 0.5) * 0.5
    major = np.zeros_like(u[0])
    aspect = np.zeros_like(u[0])
    h_nucleus = np.zeros_like(u[0])
    e_nucleus = np.zeros_like(u[0])
    rim = np.zeros_like(u[0])
    for kind, where in kinds:
        lo, hi = kind.major_um
        major = np.where(where, lo + u[2] * (hi - lo), major)
        lo, hi = kind.aspect
        aspect = np.where(where, lo + u[3] * (hi - lo), aspect)
        lo, hi = kind.haematoxylin
        h_nucleus = np.where(where, lo + u[5] * (hi - lo), h_nucleus)
        e_nucleus = np.where(where, kind.eosin, e_nucleus)
        rim = np.where(where, kind.rim, rim)
    minor = major * aspect
    # Keep the nucleus (with its soft edge) inside its cell.
    slack = np.maximum(cell / 2 - major - _NUCLEUS_EDGE_UM, 0.0)
    centre_y = (u[6] - 0.5) * 2.0 * slack
    centre_x = (u[7] - 0.5) * 2.0 * slack
    cos, sin = np.cos(angle), np.sin(angle)
    # Quadratic form of the ellipse in cell units: d² = qa·dx² + qb·dx·dy + qc·dy².
    inv_a2, inv_b2 = cell * cell / (major * major), cell * cell / (minor * minor)
    edge_um = max(pixel_um, _NUCLEUS_EDGE_UM)
    # Absent cells get their nucleus far outside the cell, where no pixel can reach it.
    params = np.stack(
        [
            np.where(present, 0.5 + centre_y / cell, 1e3),
            np.where(present, 0.5 + centre_x / cell, 1e3),
            cos * cos * inv_a2 + sin * sin * inv_b2,
            2.0 * cos * sin * (inv_a2 - inv_b2),
            sin * sin * inv_a2 + cos * cos * inv_b2,
            # (1 - d²)·b/2 approximates the depth inside the edge along the minor axis.
            minor / (2.0 * edge_um),
            h_nucleus,
            e_nucleus,
            rim,
        ]
    ).astype(np.float32)
    params = params.reshape(params.shape[0], -1)

    ly = ((gy - iy0).astype(np.float32))[:, None] + warp[0] * np.float32(1.0 / cell)
    lx = ((gx - ix0).astype(np.float32))[None, :] + warp[1] * np.float32(1.0 / cell)
    ly_cell = np.floor(ly)
    lx_cell = np.floor(lx)
    flat = ly_cell.astype(np.intp) * cx.size + lx_cell.astype(np.intp)
    dy = ly - ly_cell
    dy -= params[0].take(flat)
    dx = lx - lx_cell
    dx -= params[1].take(flat)
    d2 = params[2].take(flat) * dx * dx
    d2 += params[3].take(flat) * dx * dy
    d2 += params[4].take(flat) * dy * dy
    depth = np.float32(1.0) - d2
    alpha = depth * params[5].take(flat)
    alpha += np.float32(0.5)
    np.clip(alpha, 0.0, 1.0, out=alpha)
    h = params[6].take(flat)
    if layer.dense:  # vesicular tumor nuclei: paler centre, darker rim
        np.clip(depth, 0.0, 1.0, out=depth)
        h *= np.float32(1.0) - params[8].take(flat) * depth
    h -= haem
    h *= alpha
    haem += h
    e = params[7].take(flat)
    e -= eosin
    e *= alpha
    eosin += e


def _mean_nuclei(
    layer: _NucleusLayer, maps: np.ndarray, haem: np.ndarray, eosin: np.ndarray
) -> None:
    """Composite the expected coverage of one nucleus layer (coarse levels), in place."""
    presence, lymph_share = _presence(
        layer, maps[_TISSUE], maps[_TUMOR], maps[_LYMPH], maps[_STROMA_TUMOR]
    )
    area = layer.cell_um**2
    if layer.dense:
        kinds = [(_TUMOR_NUCLEUS, 1.0 - lymph_share), (_LYMPH_NUCLEUS, lymph_share)]
    else:
        kinds = [(_STROMA_NUCLEUS, 1.0)]
    for kind, share in kinds:
        coverage = presence * share * np.float32(min(1.0, kind.mean_area_um2() / area))
        haem += coverage * (kind.mean_haematoxylin() - haem)
        eosin += coverage * (kind.eosin - eosin)


def _fibres(
    style: _Style,
    y_um: np.ndarray,
    x_um: np.ndarray,
    orient: np.ndarray,
    warp: np.ndarray,
    mottle: np.ndarray,
    pixel_um: float,
) -> np.ndarray:
    """Wavy collagen bundles in [-1, 1], (T, T) float32; zero where too fine for the level.

    Two families of parallel bands at the slide's two fibre angles, blended by the layout's
    orientation map, bent by `warp` (µm) and faded in and out by a smooth noise.
    """
    strength = min(1.0, max(0.0, 2.0 - pixel_um / (_FIBRE_PERIOD_UM / 6)))
    fibre = np.zeros(orient.shape, dtype=np.float32)
    if strength == 0.0:
        return fibre
    # Bending by more than a period makes the bands wavy rather than straight.
    bend = warp * np.float32(1.3 / _FIBRE_PERIOD_UM * 2 * math.pi) + mottle * np.float32(1.2)
    # A narrow blend between the two families: where they overlap they interfere into a grid.
    first = np.clip((orient - 0.5) * 6.0 + 0.5, 0.0, 1.0)
    for angle, weight in zip(style.fibre_angles, (first, 1.0 - first), strict=True):
        # Phases modulo one period, per axis, so float32 keeps its precision far from 0.
        py = np.mod(y_um * (math.sin(angle) / _FIBRE_PERIOD_UM), 1.0) * (2 * math.pi)
        px = np.mod(x_um * (math.cos(angle) / _FIBRE_PERIOD_UM), 1.0) * (2 * math.pi)
        phase = py.astype(np.float32)[:, None] + px.astype(np.float32)[None, :] + bend
        fibre += weight * np.sin(phase)
    fade = _value_noise(y_um, x_um, (14.0, 14.0), style.key + 31)
    return fibre * np.clip(0.6 + fade, 0.0, 1.0) * np.float32(strength)


def _render_tile(
    layout: _Layout, style: _Style, pixel_um: float, level: int, row: int, col: int
) -> np.ndarray:
    """Draw tile (`row`, `col`) of the level with `pixel_um` µm/px: uint8 (TILE_PX, TILE_PX, 3)."""
    t = TILE_PX
    y_um = (row * t + np.arange(t, dtype=np.float64) + 0.5) * pixel_um
    x_um = (col * t + np.arange(t, dtype=np.float64) + 0.5) * pixel_um
    tile_key = _hash_uniform(np.array([row]), np.array([col]), style.key + 7919 * (level + 1))
    offset = int(tile_key[0] * 2**24)
    oy, ox = (offset >> 12) % (2 * t), (offset & 0xFFF) % (2 * t)
    noise = style.noise[oy : oy + t, ox : ox + t]

    maps = _sample_layout(layout, y_um, x_um, range(6))
    tissue = maps[_TISSUE]
    if float(tissue.max()) < 1e-3:
        return np.clip(style.background + noise, 0, 255).astype(np.uint8)
    tumor, lymph, stroma_tumor = maps[_TUMOR], maps[_LYMPH], maps[_STROMA_TUMOR]
    stain, orient = maps[_STAIN], maps[_ORIENT]

    # Ground substance: fibrous eosin stroma, purple tumor cytoplasm, lymphoid background.
    key = style.key
    if pixel_um <= _DETAIL_MAX_MPP:
        mottle = _value_noise(y_um, x_um, (7.0, 7.0), key + 13)
    else:  # finer than a pixel: averages out
        mottle = np.float32(0.0)
    solid = tumor * (1.0 - stroma_tumor)
    haem = 0.09 + 0.22 * solid + 0.12 * lymph + 0.03 * mottle
    eosin = 0.42 * (1.0 + 0.15 * mottle) * solid + 0.56 * (1.0 - solid)
    eosin *= 1.0 - 0.35 * lymph

    if pixel_um <= _DETAIL_MAX_MPP:
        lattice = (_WARP_LATTICE_UM, _WARP_LATTICE_UM)
        warp = (
            _value_noise(y_um, x_um, lattice, key + 21) * np.float32(_WARP_UM),
            _value_noise(y_um, x_um, lattice, key + 22) * np.float32(_WARP_UM),
        )
        fibre = _fibres(style, y_um, x_um, orient, warp[0], mottle, pixel_um)
        eosin += (0.56 * 0.45) * fibre * (1.0 - solid) * (1.0 - lymph)
        for layer in _LAYERS:
            _draw_nuclei(layout, style, layer, y_um, x_um, warp, pixel_um, haem, eosin)
    else:
        for layer in _LAYERS:
            _mean_nuclei(layer, maps, haem, eosin)

    haem *= tissue * (1.0 - 0.10 * stain)
    eosin *= tissue * (1.0 + 0.18 * stain)
    od = style.stain_od
    rgb = np.empty((t, t, 3), dtype=np.float32)
    for ch in range(3):
        rgb[..., ch] = np.exp(-(haem * od[0, ch] + eosin * od[1, ch]))
    rgb *= np.float32(style.background)
    rgb += noise
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Writers


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    sizes = [(width, height)]
    while max(sizes[-1]) > SMALLEST_LEVEL_PX:
        ds = LEVEL_DOWNSAMPLE ** len(sizes)
        sizes.append((max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))))
    return sizes


def _ordered_map(
    func: Callable[[tuple[int, int]], np.ndarray], items: Iterable[tuple[int, int]], workers: int
) -> Iterator[np.ndarray]:
    """``map(func, items)`` on a thread pool, in order, with a bounded look-ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(func, item))
            if len(pending) >= 4 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _workers() -> int:
    """Threads for drawing (and, separately, encoding) tiles: the usable cores, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def _write_slide(
    path: Path,
    layout: _Layout,
    style: _Style,
    size: tuple[int, int],
    mpp: float,
    description: str,
) -> None:
    width, height = size
    levels = _level_sizes(width, height)
    workers = _workers()
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**29) as tif:
        for level, (lw, lh) in enumerate(levels):
            pixel_um = mpp * LEVEL_DOWNSAMPLE**level
            grid = itertools.product(range(-(-lh // TILE_PX)), range(-(-lw // TILE_PX)))

            def draw(rc: tuple[int, int], pixel_um: float = pixel_um, level: int = level):
                return _render_tile(layout, style, pixel_um, level, *rc)

            px_per_cm = 1e4 / pixel_um
            tif.write(
                data=_ordered_map(draw, grid, workers),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                photometric="rgb",  # stored as YCbCr 4:2:0 JPEG
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                description=description if level == 0 else None,
                metadata=None,
                software="wsiseg",
                maxworkers=workers,
                # tifffile otherwise buffers up to 256 MB of tiles per batch.
                buffersize=_BUFFER_TILES * TILE_PX * TILE_PX * 3,
            )


def _truth_grid(size: tuple[int, int], mpp: float, truth_mpp: float) -> tuple[int, int, float]:
    """(rows, cols, level-0 px per truth px) of the truth mask of a slide."""
    scale = truth_mpp / mpp
    return math.ceil(size[1] / scale), math.ceil(size[0] / scale), scale


def _write_truth_mask(
    path: Path, layout: _Layout, size: tuple[int, int], mpp: float, truth_mpp: float
) -> None:
    rows, cols, scale = _truth_grid(size, mpp, truth_mpp)

    def tiles() -> Iterator[np.ndarray]:
        for r in range(-(-rows // TILE_PX)):
            y_um = (r * TILE_PX + np.arange(TILE_PX) + 0.5) * truth_mpp
            for c in range(-(-cols // TILE_PX)):
                x_um = (c * TILE_PX + np.arange(TILE_PX) + 0.5) * truth_mpp
                tumor = _sample_layout(layout, y_um, x_um, [_TUMOR])[0]
                yield np.where(tumor >= 0.5, 255, 0).astype(np.uint8)

    description = json.dumps(
        {
            "generator": "wsiseg.synth",
            "level0_size": list(size),
            "mpp": mpp,
            "truth_mpp": truth_mpp,
            "truth_px_level0": scale,
        }
    )
    px_per_cm = 1e4 / truth_mpp
    with tifffile.TiffWriter(path, bigtiff=rows * cols > 2**31) as tif:
        tif.write(
            data=tiles(),
            shape=(rows, cols),
            dtype=np.uint8,
            tile=(TILE_PX, TILE_PX),
            photometric="minisblack",
            compression="zlib",
            resolution=(px_per_cm, px_per_cm),
            resolutionunit="CENTIMETER",
            description=description,
            metadata=None,
            software="wsiseg",
            buffersize=_BUFFER_TILES * TILE_PX * TILE_PX,
        )


def _truth_polygons(layout: _Layout) -> shapely.MultiPolygon:
    """Tumor regions (the layout's 0.5 iso-line) as polygons in µm."""
    tumor = np.pad(layout.maps[_TUMOR], 1)  # zero border: every contour closes
    rings = []
    for contour in measure.find_contours(tumor, 0.5):
        if len(contour) < 4:
            continue
        # contour is (row, col) on padded nodes; node (r, c) sits at ((c+0.5)·mpp, (r+0.5)·mpp).
        xy = (contour[:, ::-1] - 1.0 + 0.5) * layout.mpp
        ring = shapely.Polygon(xy)
        if ring.area > 0:
            rings.append(shapely.make_valid(ring))
    if not rings:
        return shapely.MultiPolygon()
    # Nested rings alternate outer / hole: even-odd union.
    area = reduce(lambda a, b: a.symmetric_difference(b), sorted(rings, key=lambda g: -g.area))
    polygons = [g for g in getattr(area, "geoms", [area]) if isinstance(g, shapely.Polygon)]
    polygons = [p for p in polygons if not p.is_empty and p.area > 0]
    return shapely.MultiPolygon(polygons)


def _ring_coords(ring: shapely.LinearRing) -> list[list[float]]:
    """Closed ring as ``[[x, y], ...]`` rounded to 0.01 px (QuPath's own grid)."""
    coords = [[round(x, 2), round(y, 2)] for x, y in ring.coords]
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    return coords


def _geojson_polygons(polygons: shapely.MultiPolygon, scale: float) -> list[list]:
    """GeoJSON Polygon coordinates of `polygons` scaled by `scale`, valid after rounding."""
    snapped = shapely.set_precision(shapely.transform(polygons, lambda xy: xy * scale), 0.01)
    out = []
    for part in shapely.get_parts(snapped):
        if not isinstance(part, shapely.Polygon) or part.is_empty:
            continue
        part = shapely.geometry.polygon.orient(part, 1.0)
        rings = [_ring_coords(part.exterior)] + [_ring_coords(r) for r in part.interiors]
        if any(len(r) < 4 for r in rings):
            continue
        # QuPath rejects the whole file over one invalid polygon: check what is written.
        if not shapely.Polygon(rings[0], rings[1:]).is_valid:
            raise RuntimeError(f"synthetic truth polygon became invalid: {part.wkt[:80]}")
        out.append(rings)
    return out


def _write_truth_geojson(path: Path, layout: _Layout, mpp: float, slide_id: str) -> None:
    name_space = uuid.UUID("5a1de000-0000-4000-8000-000000000000")
    features = [
        {
            "type": "Feature",
            # Deterministic ids keep the files byte-identical per seed.
            "id": str(uuid.uuid5(name_space, f"{slide_id}:{i}")),
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": TUMOR_CLASS, "color": list(TUMOR_COLOR)},
            },
        }
        for i, rings in enumerate(_geojson_polygons(_truth_polygons(layout), 1.0 / mpp))
    ]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh, allow_nan=False)
