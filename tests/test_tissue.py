"""Tests for wsiseg.slide.tissue: the mask is skimage's HSV + Otsu rule, in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage
from skimage import color, filters, morphology

from wsiseg.slide.tissue import tissue_mask

from conftest import CAMELYON, CMU_SVS, real

PARAMS = {"mpp": 16.0, "min_saturation": 0.05, "min_area_um2": 20_000.0}


def reference_mask(rgb: np.ndarray, *, mpp: float, min_saturation: float,
                   min_area_um2: float) -> np.ndarray:
    """The rule written the plain way: skimage's float64 HSV of the whole image, then Otsu."""
    hsv = color.rgb2hsv(rgb)
    saturation, value = hsv[..., 1], hsv[..., 2]
    usable = value >= 0.2
    if not usable.any():
        return np.zeros(rgb.shape[:2], dtype=bool)
    sat = saturation[usable]
    threshold = min_saturation
    if np.ptp(sat) > 0:
        threshold = max(float(filters.threshold_otsu(sat)), min_saturation)
    mask = morphology.closing((saturation > threshold) & usable, morphology.disk(2))
    min_px = max(1, int(round(min_area_um2 / mpp**2)))
    mask = morphology.remove_small_objects(mask, max_size=min_px - 1)
    holes = ndimage.binary_fill_holes(mask) & ~mask
    return mask | (holes & ~morphology.remove_small_objects(holes, max_size=min_px - 1))


def real_thumbnails() -> list[np.ndarray]:
    with openslide.OpenSlide(real(CMU_SVS)) as slide:
        svs = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"))
    patches = [np.asarray(Image.open(p).convert("RGB"))
               for p in sorted((real(CAMELYON) / "images").glob("*.jpg"))[:4]]
    return [svs, *patches]


def test_the_mask_is_the_plain_rules_mask_on_real_slides():
    for rgb in real_thumbnails():
        for params in (PARAMS, {**PARAMS, "mpp": 2.0, "min_saturation": 0.0}):
            expected = reference_mask(rgb, **params)
            got = tissue_mask(rgb, **params)
            assert got.dtype == bool and got.shape == rgb.shape[:2]
            assert np.array_equal(got, expected)


@pytest.mark.parametrize("rgb", [
    np.zeros((40, 30, 3), np.uint8),                  # black: nothing usable
    np.full((40, 30, 3), 240, np.uint8),              # blank glass
    np.full((40, 30, 3), (200, 90, 160), np.uint8),   # one colour: no Otsu, the floor decides
    np.full((1, 1, 3), (200, 90, 160), np.uint8),
    np.random.default_rng(3).integers(0, 256, (64, 48, 3)).astype(np.uint8),
], ids=["black", "glass", "flat-colour", "one-pixel", "noise"])
def test_edge_cases_agree_with_the_plain_rule(rgb):
    assert np.array_equal(tissue_mask(rgb, **PARAMS), reference_mask(rgb, **PARAMS))


def test_working_memory_is_a_few_bytes_per_pixel():
    # Coloured tissue blobs on glass, 1024² px; skimage's float64 HSV of it alone is 24 B/px
    # and the plain rule peaked at ~100 B/px.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:1024, :1024]
    blobs = (np.sin(xx / 47.0) + np.cos(yy / 61.0) + 0.3 * rng.standard_normal(xx.shape)) > 0.4
    rgb = np.full((1024, 1024, 3), 235, np.uint8)
    rgb[blobs] = rng.integers(60, 220, (int(blobs.sum()), 3))
    tracemalloc.start()
    try:
        mask = tissue_mask(rgb, **PARAMS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.2 < mask.mean() < 0.8
    assert peak / rgb.shape[0] / rgb.shape[1] < 24


@pytest.mark.parametrize("rgb", [
    np.zeros((8, 8, 4), np.uint8),    # RGBA: alpha would count as a channel
    np.zeros((8, 8, 3), np.uint16),   # 16-bit: the (max, min) codes would overflow
    np.zeros((8, 8), np.uint8),
])
def test_anything_but_uint8_rgb_is_refused(rgb):
    with pytest.raises(ValueError, match="expected uint8 RGB"):
        tissue_mask(rgb, **PARAMS)
