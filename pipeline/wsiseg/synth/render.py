"""Textures of a generated slide: one H&E-like RGB tile drawn from the layout, alone.

Textures are drawn procedurally per tile from the layout (:mod:`wsiseg.synth.layout`), the
slide key and the tile's global position in µm, so that any tile of any pyramid level can be
drawn alone. They are a Beer–Lambert stain model: per pixel a haematoxylin and an eosin
concentration, ``rgb = I0 · exp(-(h·H + e·E))``. Normal tissue is eosin stroma with sparse
spindle nuclei; tumor is purple cytoplasm with large, crowded, pleomorphic nuclei; the hard
cases are lymphoid aggregates (crowded small dark nuclei, normal) and stroma-like tumor
(sparse nuclei, tumor). Nuclei live on warped grids of cells (one nucleus at most per cell,
kept inside it), so a pixel needs only its own cell. All sizes are in µm; levels coarser than
``_DETAIL_MAX_MPP`` draw the expected nuclear coverage instead of single nuclei, which keeps
them close to an area-downsampled finer level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsiseg.synth.layout import (
    LYMPH,
    ORIENT,
    STAIN,
    STROMA_TUMOR,
    TISSUE,
    TUMOR,
    Layout,
    sample_layout,
)

# The tile drawn at a time; also the TIFF tile of the slide and of the truth mask.
TILE_PX = 256
# Finer levels draw single nuclei; coarser ones draw their expected coverage (a nucleus is
# then about one pixel or less, and single ones would alias into speckle).
_DETAIL_MAX_MPP = 2.5
_NUCLEUS_EDGE_UM = 0.5  # anti-aliasing ramp of a nucleus at fine levels
_WARP_UM = 4.5  # amplitude of the smooth warp that keeps nuclei off a visible grid
_WARP_LATTICE_UM = 18.0
_FIBRE_PERIOD_UM = 7.0
_PIXEL_NOISE_SD = 2.2  # grey levels
_NOISE_TEXTURE_PX = 3 * TILE_PX

# Stain optical densities per unit concentration (rows: haematoxylin, eosin; columns: R, G, B),
# close to the usual Macenko estimates; each slide jitters them a little.
_STAIN_OD = np.array([[0.56, 0.72, 0.41], [0.20, 0.82, 0.53]], dtype=np.float64)


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
class Style:
    """Per-slide colour: stain ODs (2, 3), background intensity, noise texture, hash key."""

    stain_od: np.ndarray
    background: float
    noise: np.ndarray  # float32 (_NOISE_TEXTURE_PX, _NOISE_TEXTURE_PX, 3), grey levels
    fibre_angles: tuple[float, float]  # radians, the two directions collagen runs in
    key: int


def make_style(rng: np.random.Generator) -> Style:
    od = _STAIN_OD * rng.uniform(0.92, 1.08, size=(2, 1)) + rng.uniform(-0.03, 0.03, size=(2, 3))
    noise = rng.standard_normal((_NOISE_TEXTURE_PX, _NOISE_TEXTURE_PX, 3)).astype(np.float32)
    first_angle = rng.uniform(0.0, math.pi)
    return Style(
        stain_od=od.astype(np.float32),
        background=float(rng.uniform(238.0, 244.0)),
        noise=noise * np.float32(_PIXEL_NOISE_SD),
        fibre_angles=(first_angle, first_angle + rng.uniform(0.35, 0.65) * math.pi),
        key=int(rng.integers(0, 2**62)),
    )


def _draw_nuclei(
    layout: Layout,
    style: Style,
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
    at_cell = sample_layout(
        layout, (cy + 0.5) * cell + layer.offset_um[0], (cx + 0.5) * cell + layer.offset_um[1],
        (TISSUE, TUMOR, LYMPH, STROMA_TUMOR, ORIENT),
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
        layer, maps[TISSUE], maps[TUMOR], maps[LYMPH], maps[STROMA_TUMOR]
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
    style: Style,
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


def render_tile(
    layout: Layout, style: Style, pixel_um: float, level: int, row: int, col: int
) -> np.ndarray:
    """Draw tile (`row`, `col`) of the level with `pixel_um` µm/px: uint8 (TILE_PX, TILE_PX, 3)."""
    t = TILE_PX
    y_um = (row * t + np.arange(t, dtype=np.float64) + 0.5) * pixel_um
    x_um = (col * t + np.arange(t, dtype=np.float64) + 0.5) * pixel_um
    tile_key = _hash_uniform(np.array([row]), np.array([col]), style.key + 7919 * (level + 1))
    offset = int(tile_key[0] * 2**24)
    oy, ox = (offset >> 12) % (2 * t), (offset & 0xFFF) % (2 * t)
    noise = style.noise[oy : oy + t, ox : ox + t]

    maps = sample_layout(layout, y_um, x_um, range(6))
    tissue = maps[TISSUE]
    if float(tissue.max()) < 1e-3:
        return np.clip(style.background + noise, 0, 255).astype(np.uint8)
    tumor, lymph, stroma_tumor = maps[TUMOR], maps[LYMPH], maps[STROMA_TUMOR]
    stain, orient = maps[STAIN], maps[ORIENT]

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
