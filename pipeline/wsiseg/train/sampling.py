"""Sampling training patches: class-balanced windows from labelled slides, and the slide split."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError
from wsiseg.train.labels import BLOCK_PX, LabelledSlide

#: A sampled patch should be at least this labelled (a few tries, then any patch is kept).
_MIN_LABELLED_FRACTION = 0.5
_TRIES_PER_PATCH = 8


def sample_patches(
    slides: Sequence[LabelledSlide],
    patch_px: int,
    n: int,
    *,
    rng: np.random.Generator,
    tumor_fraction_range: tuple[float, float] | None = None,
    balance: bool = True,
) -> tuple[NDArray[np.uint8], NDArray[np.float32], NDArray[np.bool_]]:
    """Random labelled patches, read window by window from the slides.

    A patch is centred on a random pixel of a random block (``BLOCK_PX``² working px) drawn
    in proportion to its count of the wanted class: with ``balance``, tumor and non-tumor
    blocks half the time each (as far as both exist); otherwise in proportion to labelled
    pixels. A few tries are spent on finding a patch at least half labelled.

    Parameters
    ----------
    slides : sequence of LabelledSlide
    patch_px : int
        Patch edge, working pixels.
    n : int
        Number of patches wanted.
    rng : numpy.random.Generator
    tumor_fraction_range : (float, float), optional
        Keep only patches whose tumor fraction (of their labelled pixels) lies within
        ``[low, high]`` (RefineNet: (0.2, 0.8)); such patches are looked for around blocks
        that hold both classes. Fewer than ``n`` come back when they are rare (after
        ``50 n`` tries).
    balance : bool
        Draw tumor and non-tumor centres equally often.

    Returns
    -------
    images : ndarray of uint8, shape (m, P, P, 3)
    masks : ndarray of float32, shape (m, P, P)
        1 tumor, 0 elsewhere.
    valid : ndarray of bool, shape (m, P, P)
        Labelled pixels (the loss counts only these).
        ``m == n`` except as said under ``tumor_fraction_range``.

    Raises
    ------
    WsisegError
        No labelled pixel in any slide, or no patch within ``tumor_fraction_range``.
    """
    if not slides:
        raise WsisegError("no training data: the training set is empty")
    pools = _block_pools(slides, mixed=tumor_fraction_range is not None)
    if not any(len(p[0]) for p in pools.values()):
        raise WsisegError(
            f"no labelled pixel in {', '.join(s.name for s in slides[:3])}"
            f"{' ...' if len(slides) > 3 else ''}"
        )
    images = np.empty((n, patch_px, patch_px, 3), np.uint8)
    masks = np.empty((n, patch_px, patch_px), np.float32)
    valid = np.empty((n, patch_px, patch_px), bool)
    filtered = tumor_fraction_range is not None
    low, high = tumor_fraction_range or (0.0, 1.0)
    max_tries = 50 * n if filtered else (_TRIES_PER_PATCH + 1) * n
    got = tries = 0
    while got < n and tries < max_tries:
        patch = None
        for _ in range(_TRIES_PER_PATCH):
            tries += 1
            kind = _pick_kind(pools, balance, rng, filtered)
            rgb, label = _draw_patch(slides, pools[kind], patch_px, rng)
            labelled = label >= 0
            enough = labelled.mean() >= _MIN_LABELLED_FRACTION
            if filtered:
                tumor = (label == 1).sum() / max(1, labelled.sum())
                if enough and low <= tumor <= high:
                    patch = rgb, label
                    break
                if tries >= max_tries:
                    break
            else:
                patch = rgb, label  # the last try is kept even if mostly unlabelled
                if enough:
                    break
        if patch is not None:
            images[got], masks[got], valid[got] = patch[0], patch[1] == 1, patch[1] >= 0
            got += 1
    if got == 0:
        raise WsisegError(
            f"no {patch_px} px patch with {100 * low:.0f}–{100 * high:.0f} % tumor in "
            f"{', '.join(s.name for s in slides[:3])}{' ...' if len(slides) > 3 else ''}"
        )
    return images[:got], masks[:got], valid[:got]


def _block_pools(
    slides: Sequence[LabelledSlide], *, mixed: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per kind (tumor / other / mixed / any): (block ids (k, 3) slide,row,col; weights)."""
    ids: dict[str, list[np.ndarray]] = {"tumor": [], "other": [], "mixed": [], "any": []}
    weights: dict[str, list[np.ndarray]] = {k: [] for k in ids}
    for s, slide in enumerate(slides):
        tumor, other = slide.block_counts()
        for kind, w in (
            ("tumor", tumor),
            ("other", other),
            ("any", tumor + other),
            ("mixed", np.minimum(tumor, other) if mixed else np.zeros_like(tumor)),
        ):
            r, c = np.nonzero(w)
            ids[kind].append(np.stack([np.full(len(r), s), r, c], axis=1))
            weights[kind].append(w[r, c].astype(np.float64))
    out = {}
    for kind in ids:
        block_ids = np.concatenate(ids[kind]) if ids[kind] else np.empty((0, 3), np.int64)
        w = np.concatenate(weights[kind]) if weights[kind] else np.empty(0)
        out[kind] = (block_ids, w / w.sum() if w.size and w.sum() > 0 else w)
    return out


def _pick_kind(
    pools: dict[str, tuple[np.ndarray, np.ndarray]], balance: bool, rng: np.random.Generator,
    mixed: bool,
) -> str:
    if mixed and len(pools["mixed"][0]) and rng.random() < 0.75:
        return "mixed"
    if balance:
        kinds = [k for k in ("tumor", "other") if len(pools[k][0])]
        return kinds[int(rng.integers(len(kinds)))]
    return "any"


def _draw_patch(
    slides: Sequence[LabelledSlide], pool: tuple[np.ndarray, np.ndarray], patch_px: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    block_ids, weights = pool
    s, br, bc = block_ids[rng.choice(len(block_ids), p=weights)]
    slide = slides[int(s)]
    rows, cols = slide.shape
    centre_r = int(br) * BLOCK_PX + int(rng.integers(BLOCK_PX))
    centre_c = int(bc) * BLOCK_PX + int(rng.integers(BLOCK_PX))
    row0 = clip_origin(centre_r - patch_px // 2, rows, patch_px)
    col0 = clip_origin(centre_c - patch_px // 2, cols, patch_px)
    return slide.read(row0, col0, patch_px)


def clip_origin(origin: int, length: int, patch_px: int) -> int:
    """Keep a window inside the slide when it fits, else centre the slide in it."""
    if length >= patch_px:
        return min(max(origin, 0), length - patch_px)
    return -((patch_px - length) // 2)


def split_slides(
    slides: Sequence[LabelledSlide], val_fraction: float, rng: np.random.Generator
) -> tuple[list[LabelledSlide], list[LabelledSlide]]:
    """Hold out ``round(val_fraction × n)`` slides (at least 1 when there are 2 or more and
    ``val_fraction > 0``; at least 1 is kept for training). With a single slide, validation
    uses the training slide (the caller says so in the model card).
    """
    slides = list(slides)
    if not 0.0 <= val_fraction < 1.0:
        raise WsisegError(f"--val-fraction must lie in [0, 1), got {val_fraction}")
    if len(slides) < 2 or val_fraction == 0:
        return slides, []
    n_val = min(len(slides) - 1, max(1, round(val_fraction * len(slides))))
    order = rng.permutation(len(slides))
    val = sorted(order[:n_val].tolist())
    return [s for k, s in enumerate(slides) if k not in val], [slides[k] for k in val]


def max_cached(patch_px: int, bytes_per_px: int, cap: int, limit_bytes: float = 1 << 30) -> int:
    """How many patches a cache may hold: ``cap``, or fewer to stay under ``limit_bytes``."""
    return max(1, min(cap, math.floor(limit_bytes / (patch_px * patch_px * bytes_per_px))))
