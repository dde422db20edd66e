"""Augmenting training patches: random flips / quarter-turns and HED stain jitter."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray


def random_dihedral(
    arrays: Sequence[np.ndarray], rng: np.random.Generator
) -> list[np.ndarray]:
    """One random flip/quarter-turn (of the 8) applied alike to (H, W, ...) arrays."""
    k = int(rng.integers(4))
    flip = bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(0, 1))
        if flip:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(a))
    return out


def hed_jitter(
    rgb: NDArray[np.uint8], rng: np.random.Generator, *, sigma: float = 0.05,
    bias: float = 0.02,
) -> NDArray[np.uint8]:
    """Stain (HED) colour jitter: each of haematoxylin, eosin and DAB scaled by
    ``U(1 − sigma, 1 + sigma)`` and shifted by ``U(−bias, bias)`` (Tellez et al. 2018).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)

    Returns
    -------
    ndarray of uint8, shape (H, W, 3)
    """
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    out = hed2rgb(hed)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def augment(
    img: NDArray[np.uint8], mask: np.ndarray, rng: np.random.Generator
) -> tuple[NDArray[np.uint8], np.ndarray]:
    """Random dihedral transform (same for image and mask) and HED colour jitter (image only).

    Parameters
    ----------
    img : ndarray of uint8, shape (H, W, 3)
    mask : ndarray, shape (H, W) or (H, W, C)
        Any per-pixel array that must stay aligned with ``img`` (dtype kept).
    rng : numpy.random.Generator

    Returns
    -------
    (img, mask)
        New arrays of the same shapes and dtypes.
    """
    img, mask = random_dihedral([img, mask], rng)
    return hed_jitter(img, rng), mask
