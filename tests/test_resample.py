"""Resampling with OpenCV (issue 17): seam-free boxes, and the antialiased bilinear result."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from wsiseg.slide.resample import read_box


class ArrayReader:
    """A one-level 'slide' in memory, read as OpenSlide reads: any box, edges replicated."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        h, w = image.shape[:2]
        self.info = SimpleNamespace(level_downsamples=(1.0,), level_dimensions=((w, h),))

    def read_region(self, level0_xy, level, size):
        (x, y), (w, h) = level0_xy, size
        rows = np.clip(np.arange(y, y + h), 0, self.image.shape[0] - 1)
        cols = np.clip(np.arange(x, x + w), 0, self.image.shape[1] - 1)
        return self.image[np.ix_(rows, cols)]


def smooth_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((*shape, 3)).astype(np.float32) * 255
    return np.clip(ndimage.gaussian_filter(noise, sigma=(3, 3, 0)) * 3 - 255, 0, 255).astype(
        np.uint8)


@pytest.mark.parametrize("downsample", [2.0, 1.6, 2.7, 4.0, 0.75])
def test_boxes_meet_without_seams(downsample):
    """Any split of the output into boxes gives the very same pixels as one box."""
    reader = ArrayReader(smooth_image((700, 900)))
    rows, cols = int(700 / downsample) - 4, int(900 / downsample) - 4
    whole = read_box(reader, downsample, (0, 0, rows, cols))
    tiled = np.zeros_like(whole)
    for r0 in range(0, rows, 67):
        for c0 in range(0, cols, 53):
            box = (r0, c0, min(67, rows - r0), min(53, cols - c0))
            tiled[r0 : r0 + box[2], c0 : c0 + box[3]] = read_box(reader, downsample, box)
    np.testing.assert_array_equal(tiled, whole)


@pytest.mark.parametrize("downsample", [1.6, 2.7, 0.75])
def test_matches_the_scipy_antialiased_bilinear_reference(downsample):
    """Within 2/255 of scipy.ndimage's block mean + Gaussian + bilinear (the former path):
    cv2.remap rounds sampling positions to 1/32 px."""
    image = smooth_image((400, 500), seed=1)
    rows, cols = int(400 / downsample) - 8, int(500 / downsample) - 8
    got = read_box(ArrayReader(image), downsample, (0, 0, rows, cols)).astype(int)
    img = image.astype(np.float32)
    block = max(1, math.floor(downsample))
    if block > 1:
        h, w = img.shape[0] // block * block, img.shape[1] // block * block
        img = img[:h, :w].reshape(h // block, block, w // block, block, 3).mean(axis=(1, 3))
    rest = downsample / block
    if rest > 1:
        img = ndimage.gaussian_filter(img, sigma=((rest - 1) / 2, (rest - 1) / 2, 0),
                                      mode="nearest")
    offset = 0.5 * rest - 0.5
    ref = ndimage.affine_transform(img, (rest, rest, 1.0), offset=(offset, offset, 0.0),
                                   output_shape=(rows, cols, 3), order=1, mode="nearest")
    ref = np.clip(np.rint(ref), 0, 255).astype(int)
    inner = (slice(4, -4), slice(4, -4))  # away from the image's own border
    assert np.abs(got[inner] - ref[inner]).max() <= 2
