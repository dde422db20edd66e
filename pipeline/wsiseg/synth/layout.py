"""The layout of a generated slide: low-resolution tissue, tumor and hard-case maps.

A layout is a few small float maps (tissue, tumor, lymphoid aggregates, stroma-like tumor,
stain variation, fibre orientation) made from seeded smooth noise and shapes, at
``layout_mpp`` µm/px (8 µm/px, coarser for huge slides so a map stays ≤ 4 Mpx). Every map is
read through one bilinear interpolant (nodes at pixel centres): the textures
(:mod:`wsiseg.synth.render`) and the ground truth (:mod:`wsiseg.synth.truth`, the tumor map
thresholded at 0.5) both read it, so they agree with each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import transform

_LAYOUT_MPP = 8.0
_LAYOUT_MAX_PX = 4_000_000

# Layout map indices.
TISSUE, TUMOR, LYMPH, STROMA_TUMOR, STAIN, ORIENT = range(6)


@dataclass(frozen=True)
class Layout:
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


def make_layout(size_um: tuple[float, float], rng: np.random.Generator, *, tumor: bool) -> Layout:
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
    tissue = maps[TISSUE]
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
    tumor_map = maps[TUMOR]
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
    lymph = maps[LYMPH]
    ndimage.gaussian_filter(lymph_bin.astype(np.float32), 10.0 / mpp, output=lymph)
    lymph *= tissue
    lymph *= 1.0 - np.clip(tumor_map * 2.0, 0.0, 1.0)
    tumor_area_um2 = float(tumor_bin.sum()) * mpp * mpp
    n_stroma = int(np.clip(round(3.5 * tumor_area_um2 / 1e6 * rng.uniform(0.7, 1.3)), 1, 30))
    where = _depth_um(tumor_bin, mpp) > 90.0
    radius_px = (50.0 * blob_um / mpp, 150.0 * blob_um / mpp)
    stroma_bin = _blobs(rng, where, n_stroma, radius_px, distortion)
    ndimage.gaussian_filter(stroma_bin.astype(np.float32), 15.0 / mpp, output=maps[STROMA_TUMOR])
    del where, core, distortion

    maps[STAIN] = np.clip(_smooth_noise(rng, (rows, cols), 400.0 / mpp) * 0.5, -1.0, 1.0)
    orient = maps[ORIENT]
    orient[:] = _smooth_noise(rng, (rows, cols), 150.0 / mpp)
    orient *= -6.0
    np.exp(orient, out=orient)
    orient += 1.0
    np.reciprocal(orient, out=orient)
    # Flush the filters' far tails to zero: denormal floats make every later product crawl.
    maps[np.abs(maps) < 1e-6] = 0.0
    return Layout(maps=maps, mpp=mpp)


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


def sample_layout(
    layout: Layout, y_um: np.ndarray, x_um: np.ndarray, channels: Sequence[int]
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
