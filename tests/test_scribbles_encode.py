"""Scribble raster → FG/BG distance maps → RefineNet's six-channel input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import morphology

from wsiseg.scribbles.encode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCRIBBLE_KINDS,
    distance_maps,
    distance_maps_window,
    encode_refine_batch,
    encode_refine_input,
    scribble_maps,
    window_with_margin,
)

from conftest import CAMELYON, real

MAX_DISTANCE = 16.0


def two_scribbles(shape: tuple[int, int] = (60, 80)) -> np.ndarray:
    scribbles = np.zeros(shape, np.int8)
    scribbles[10, 5:30] = 1  # a horizontal tumor stroke
    scribbles[40:55, 60] = -1  # a vertical non-tumor stroke
    return scribbles


def camelyon_patch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real H&E patch, a blurred 'GuideNet' probability from its mask, and scribbles on
    the skeletons of the eroded tumor and non-tumor regions (DeepScribble's automatic style)."""
    folder = real(CAMELYON)
    rgb = np.asarray(Image.open(folder / "images" / "10670.jpg").convert("RGB"))
    mask = np.asarray(Image.open(folder / "masks" / "10670.jpg").convert("L")) > 127
    guide = ndimage.gaussian_filter(mask.astype(np.float32), 6.0)
    scribbles = np.zeros(mask.shape, np.int8)
    scribbles[morphology.skeletonize(ndimage.binary_erosion(mask, iterations=20))] = 1
    scribbles[morphology.skeletonize(ndimage.binary_erosion(~mask, iterations=20))] = -1
    assert (scribbles == 1).any() and (scribbles == -1).any()
    return rgb, guide, scribbles


# -- distance maps --------------------------------------------------------------------------


def test_distance_maps_are_one_on_scribbles_and_fall_linearly() -> None:
    scribbles = two_scribbles()
    maps = distance_maps(scribbles, max_distance_px=MAX_DISTANCE)
    assert maps.shape == (2, 60, 80) and maps.dtype == np.float32
    fg, bg = maps
    assert (fg[scribbles == 1] == 1).all() and (bg[scribbles == -1] == 1).all()
    assert (fg[scribbles != 1] < 1).all() and (bg[scribbles != -1] < 1).all()
    assert fg.min() >= 0 and bg.min() >= 0
    # Straight above the stroke's middle: 1 − d / max, decreasing, exactly 0 from max on.
    column = fg[10:40, 15]
    np.testing.assert_allclose(column[:16], 1 - np.arange(16) / MAX_DISTANCE, rtol=0, atol=1e-6)
    assert (np.diff(column[:17]) < 0).all()
    assert (column[16:] == 0).all()
    # Euclidean, beyond the stroke's end: distance to (10, 29) from (13, 33) is 5.
    assert fg[13, 33] == pytest.approx(1 - 5 / MAX_DISTANCE)
    # Everything at least max_distance away is exactly 0.
    far = ndimage.distance_transform_edt(scribbles != 1) >= MAX_DISTANCE
    assert far.any() and (fg[far] == 0).all()


def test_distance_maps_are_zero_for_an_absent_class() -> None:
    only_tumor = np.where(two_scribbles() == 1, 1, 0).astype(np.int8)
    fg, bg = distance_maps(only_tumor, max_distance_px=MAX_DISTANCE)
    assert fg.max() == 1 and not bg.any()
    assert not distance_maps(np.zeros((7, 9), np.int8), max_distance_px=4.0).any()


def test_distance_maps_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="max_distance_px"):
        distance_maps(two_scribbles(), max_distance_px=0.0)
    with pytest.raises(ValueError, match="scribbles"):
        distance_maps(np.zeros((2, 3, 4), np.int8), max_distance_px=4.0)
    with pytest.raises(ValueError, match="scribbles"):
        distance_maps(np.zeros((3, 4), np.uint8), max_distance_px=4.0)


# -- RefineNet input ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCRIBBLE_KINDS)
def test_encode_refine_input_channels(kind: str) -> None:
    rng = np.random.default_rng(0)
    scribbles = two_scribbles()
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    guide = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    x = encode_refine_input(rgb, guide, scribbles, max_distance_px=MAX_DISTANCE, scribble_kind=kind)

    assert x.shape == (6, 60, 80) and x.dtype == np.float32
    for c in range(3):
        expected = (rgb[..., c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(x[c], expected, atol=1e-5)
    np.testing.assert_allclose(x[3], guide / 255.0, atol=1e-6)
    assert x[3:].min() >= 0 and x[3:].max() <= 1
    fg, bg = x[4], x[5]
    if kind == "none":
        assert not fg.any() and not bg.any()
    elif kind == "raw":
        np.testing.assert_array_equal(fg, scribbles == 1)
        np.testing.assert_array_equal(bg, scribbles == -1)
    else:
        np.testing.assert_array_equal(x[4:], distance_maps(scribbles, max_distance_px=MAX_DISTANCE))


def test_scribble_kinds_differ_only_in_the_scribble_channels() -> None:
    rng = np.random.default_rng(1)
    scribbles = two_scribbles()
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    guide = rng.random((60, 80))
    x = {
        k: encode_refine_input(rgb, guide, scribbles, max_distance_px=MAX_DISTANCE, scribble_kind=k)
        for k in SCRIBBLE_KINDS
    }
    np.testing.assert_array_equal(x["distance"][:4], x["raw"][:4])
    np.testing.assert_array_equal(x["distance"][:4], x["none"][:4])
    for fg_or_bg in (4, 5):
        d, r, n = (x[k][fg_or_bg] for k in ("distance", "raw", "none"))
        assert d.sum() > r.sum() > n.sum() == 0
        assert not np.array_equal(d, r)
        np.testing.assert_array_equal(d == 1, r == 1)  # both are 1 exactly on the scribbles
    np.testing.assert_array_equal(
        x["raw"][4:], scribble_maps(scribbles, max_distance_px=MAX_DISTANCE, scribble_kind="raw")
    )


def test_encode_accepts_float_guide_and_custom_normalisation() -> None:
    rgb = np.full((4, 5, 3), 255, np.uint8)
    guide = np.linspace(0, 1, 20, dtype=np.float64).reshape(4, 5)
    x = encode_refine_input(
        rgb,
        guide,
        np.zeros((4, 5), np.int8),
        max_distance_px=3.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    np.testing.assert_allclose(x[:3], 1.0)
    np.testing.assert_allclose(x[3], guide, atol=1e-7)


def test_encode_rejects_mismatched_or_bad_input() -> None:
    rgb = np.zeros((60, 80, 3), np.uint8)
    guide = np.zeros((60, 80), np.uint8)
    scribbles = two_scribbles()
    kwargs = {"max_distance_px": MAX_DISTANCE}
    with pytest.raises(ValueError, match="shapes differ"):
        encode_refine_input(rgb, guide[:, :79], scribbles, **kwargs)
    with pytest.raises(ValueError, match="shapes differ"):
        encode_refine_input(rgb, guide, scribbles[:59], **kwargs)
    with pytest.raises(ValueError, match="shapes differ"):
        encode_refine_input(rgb[:, :70], guide, scribbles, **kwargs)
    with pytest.raises(ValueError, match="rgb"):
        encode_refine_input(rgb[..., :2], guide, scribbles, **kwargs)
    with pytest.raises(ValueError, match="rgb"):
        encode_refine_input(rgb.astype(np.float32), guide, scribbles, **kwargs)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_refine_input(rgb, guide.astype(np.float32) + 2, scribbles, **kwargs)
    with pytest.raises(ValueError, match="guide"):
        encode_refine_input(rgb, guide.astype(np.int32), scribbles, **kwargs)
    with pytest.raises(ValueError, match="scribble_kind"):
        encode_refine_input(rgb, guide, scribbles, scribble_kind="dist", **kwargs)


def test_encode_batch_equals_one_by_one() -> None:
    rgb, guide, scribbles = camelyon_patch()
    windows = [(0, 0), (128, 200), (256, 256)]
    rgbs = np.stack([rgb[r : r + 256, c : c + 256] for r, c in windows])
    guides = np.stack([guide[r : r + 256, c : c + 256] for r, c in windows])
    labels = np.stack([scribbles[r : r + 256, c : c + 256] for r, c in windows])
    batch = encode_refine_batch(rgbs, guides, labels, max_distance_px=64.0)
    assert batch.shape == (3, 6, 256, 256) and batch.dtype == np.float32
    for i in range(3):
        single = encode_refine_input(rgbs[i], guides[i], labels[i], max_distance_px=64.0)
        np.testing.assert_array_equal(batch[i], single)
    with pytest.raises(ValueError, match="batch"):
        encode_refine_batch(rgbs, guides[:2], labels, max_distance_px=64.0)


# -- windows of a large slide ---------------------------------------------------------------


@pytest.mark.parametrize("max_distance", [64.0, 10.5])
def test_window_helper_equals_whole_array_then_crop(max_distance: float) -> None:
    _, _, scribbles = camelyon_patch()
    whole = distance_maps(scribbles, max_distance_px=max_distance)
    reads: list[tuple[int, int, int, int]] = []

    def read(row0: int, col0: int, rows: int, cols: int) -> np.ndarray:
        reads.append((row0, col0, rows, cols))
        return scribbles[row0 : row0 + rows, col0 : col0 + cols]

    margin = int(np.ceil(max_distance))
    for window in [(100, 150, 96, 128), (0, 0, 64, 64), (448, 400, 64, 112), (0, 0, 512, 512)]:
        row0, col0, rows, cols = window
        maps = distance_maps_window(read, window, max_distance, scribbles.shape)
        assert maps.shape == (2, rows, cols) and maps.dtype == np.float32
        np.testing.assert_array_equal(maps, whole[:, row0 : row0 + rows, col0 : col0 + cols])
        # It read the window grown by the margin, clipped to the array.
        top, left = max(0, row0 - margin), max(0, col0 - margin)
        assert reads[-1] == (
            top,
            left,
            min(512, row0 + rows + margin) - top,
            min(512, col0 + cols + margin) - left,
        )


def test_scribbles_just_outside_a_window_count() -> None:
    scribbles = np.zeros((100, 100), np.int8)
    scribbles[50, 20] = 1  # 10 px left of the window below
    window = (40, 30, 20, 20)
    maps = distance_maps_window(
        lambda r, c, h, w: scribbles[r : r + h, c : c + w], window, 16.0, scribbles.shape
    )
    assert maps[0, 10, 0] == pytest.approx(1 - 10 / 16)
    # Without the margin the window would see no scribble at all.
    assert not distance_maps(scribbles[40:60, 30:50], max_distance_px=16.0).any()


def test_window_with_margin_clips_and_locates_the_window() -> None:
    grown, (rows, cols) = window_with_margin((5, 90, 10, 10), 7.2, (50, 100))
    assert grown == (0, 82, 23, 18)
    array = np.arange(50 * 100).reshape(50, 100)
    crop = array[grown[0] : grown[0] + grown[2], grown[1] : grown[1] + grown[3]][rows, cols]
    np.testing.assert_array_equal(crop, array[5:15, 90:100])
    with pytest.raises(ValueError, match="does not fit"):
        window_with_margin((45, 0, 10, 10), 4, (50, 100))
    with pytest.raises(ValueError, match="returned shape"):
        distance_maps_window(
            lambda r, c, h, w: np.zeros((h, w + 1), np.int8), (0, 0, 5, 5), 2, (9, 9)
        )


def test_real_patch_encoding_is_bounded_and_finite() -> None:
    rgb, guide, scribbles = camelyon_patch()
    x = encode_refine_input(rgb, guide, scribbles, max_distance_px=64.0)
    assert x.shape == (6, 512, 512) and np.isfinite(x).all()
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        assert lo[c] - 1e-5 <= x[c].min() and x[c].max() <= hi[c] + 1e-5
    # Tumor pixels are nearer to tumor scribbles than to non-tumor ones, on average.
    mask = guide > 0.5
    assert x[4][mask].mean() > x[5][mask].mean()
    assert x[5][~mask].mean() > x[4][~mask].mean()


@pytest.mark.parametrize("max_distance", [10.5, 64.0, 300.0])
def test_distance_maps_are_scipys_exact_euclidean_maps_bit_for_bit(max_distance: float) -> None:
    """OpenCV computes the distances (10x faster); the maps are still, to the last bit, those
    of scipy's exact Euclidean transform, on any shape and scribble density."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        rows, cols = (int(n) for n in rng.integers(1, 300, 2))
        scribbles = np.zeros((rows, cols), np.int8)
        for label in (1, -1):
            scribbles[rng.random((rows, cols)) < rng.choice([0.0005, 0.005, 0.05])] = label
        want = np.zeros((2, rows, cols), np.float32)
        for channel, label in enumerate((1, -1)):
            if (scribbles == label).any():
                distance = ndimage.distance_transform_edt(scribbles != label)
                want[channel] = np.clip(1.0 - distance / max_distance, 0.0, 1.0)
        np.testing.assert_array_equal(distance_maps(scribbles, max_distance_px=max_distance),
                                      want)
