"""Generated slides: OpenSlide-readable pyramids, deterministic, with consistent ground truth."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage
from shapely.geometry import shape

from wsiseg.errors import WsisegError
from wsiseg.synth import (
    TRUTH_DIR,
    SyntheticSlide,
    layout,
    read_truth_mask,
    render,
    synthesize_cohort,
    synthesize_slide,
    truth,
    write,
)

openslide = pytest.importorskip("openslide")

WORKING_MPP = 2.0


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _outputs(slide: SyntheticSlide) -> list[Path]:
    return [slide.slide_path, slide.truth_mask_path, slide.truth_geojson_path]


def _rgb_at(slide: SyntheticSlide, mpp: float) -> np.ndarray:
    """The slide at `mpp` µm/px (from the finest level at or below it, block-averaged): float."""
    with openslide.OpenSlide(slide.slide_path) as osr:
        factor = mpp / slide.mpp
        level = max(i for i, ds in enumerate(osr.level_downsamples) if ds <= factor + 1e-6)
        size = osr.level_dimensions[level]
        rgb = np.asarray(osr.read_region((0, 0), level, size).convert("RGB"), dtype=np.float32)
        block = round(factor / osr.level_downsamples[level])
    rows, cols = rgb.shape[0] // block, rgb.shape[1] // block
    return rgb[: rows * block, : cols * block].reshape(rows, block, cols, block, 3).mean((1, 3))


def _windows(a: np.ndarray, win: int = 16) -> np.ndarray:
    """(rows, cols) → (rows // win, win, cols // win, win) blocks."""
    rows, cols = a.shape[0] // win, a.shape[1] // win
    return a[: rows * win, : cols * win].reshape(rows, win, cols, win)


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Not-near-white pixels (smoothed a little): the tissue as a thumbnail shows it."""
    return ndimage.uniform_filter(rgb.mean(-1), 5) < 225


# --------------------------------------------------------------------------------------------
# The slide file


def test_slide_opens_in_openslide_with_mpp_and_pyramid(synth_slides: list[SyntheticSlide]):
    slide = synth_slides[0]
    assert slide.slide_path.name == "synth-000.tiff"
    assert slide.level0_size == (4096, 3072)
    assert (slide.mpp, slide.truth_mpp) == (0.5, 2.0)
    with openslide.OpenSlide(slide.slide_path) as osr:
        props = osr.properties
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.5)
        assert osr.dimensions == (4096, 3072)
        assert osr.level_count >= 2
        assert osr.level_dimensions[1] == (1024, 768)
        assert osr.level_downsamples[1] == pytest.approx(4.0)
        assert max(osr.level_dimensions[-1]) <= 1024
        assert props["openslide.level[0].tile-width"] == str(render.TILE_PX)
        region = np.asarray(osr.read_region((0, 0), 0, (64, 64)).convert("RGB"))
    # The corner is background: near-white, with slight noise.
    assert 230 < region.mean() < 250
    assert 0 < region.std() < 8


def test_tiff_is_tiled_jpeg_pyramid(synth_slides: list[SyntheticSlide]):
    with tifffile.TiffFile(synth_slides[0].slide_path) as tif:
        pages = list(tif.pages)
        assert len(pages) >= 2
        for page in pages:
            assert page.is_tiled
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert (page.tilelength, page.tilewidth) == (render.TILE_PX, render.TILE_PX)
            assert page.samplesperpixel == 3


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    first = synthesize_slide(tmp_path / "a", "s", (1024, 768), 0.5, seed=5)
    again = synthesize_slide(tmp_path / "b", "s", (1024, 768), 0.5, seed=5)
    other = synthesize_slide(tmp_path / "c", "s", (1024, 768), 0.5, seed=6)
    assert [_md5(p) for p in _outputs(first)] == [_md5(p) for p in _outputs(again)]
    assert _md5(first.slide_path) != _md5(other.slide_path)
    assert _md5(first.truth_mask_path) != _md5(other.truth_mask_path)
    # Nothing but the outputs is left behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.tiff", TRUTH_DIR]
    assert sorted(p.name for p in (tmp_path / "a" / TRUTH_DIR).iterdir()) == [
        "s.truth.geojson",
        "s.truth.tiff",
    ]


def test_slide_glob_finds_the_slides_only(synth_slides: list[SyntheticSlide]):
    # `wsiseg run DIR/*.tif*` must not take the truth masks (TIFFs too) for slides.
    out_dir = synth_slides[0].slide_path.parent
    assert sorted(out_dir.glob("*.tif*")) == [s.slide_path for s in synth_slides]
    for s in synth_slides:
        assert s.truth_mask_path.parent == out_dir / TRUTH_DIR
        assert s.truth_geojson_path.parent == out_dir / TRUTH_DIR


def test_cohort_ids_and_distinct_slides(synth_slides: list[SyntheticSlide]):
    assert [s.slide_path.stem for s in synth_slides] == ["synth-000", "synth-001"]
    assert _md5(synth_slides[0].slide_path) != _md5(synth_slides[1].slide_path)


# --------------------------------------------------------------------------------------------
# Ground truth


def test_truth_mask_is_plausible_and_inside_tissue(synth_slides: list[SyntheticSlide]):
    for slide in synth_slides:
        rgb = _rgb_at(slide, WORKING_MPP)
        tissue = _tissue(rgb)
        truth = read_truth_mask(slide.truth_mask_path, tissue.shape)
        assert truth.dtype == bool and truth.shape == tissue.shape
        assert 0.35 < tissue.mean() < 0.75, "tissue should leave background around it"
        assert 0.12 < truth.sum() / tissue.sum() < 0.45
        assert (truth & ~tissue).sum() <= 0.005 * truth.sum()


def test_truth_mask_file_is_tiled_uint8_at_truth_mpp(synth_slides: list[SyntheticSlide]):
    slide = synth_slides[0]
    with tifffile.TiffFile(slide.truth_mask_path) as tif:
        page = tif.pages.first
        assert page.is_tiled and page.dtype == np.uint8
        assert page.shape == (768, 1024)  # 3072×4096 level-0 px at 0.5 → 2.0 µm/px
        assert set(np.unique(page.asarray()).tolist()) == {0, 255}


def test_read_truth_mask_resamples_to_any_shape(synth_slides: list[SyntheticSlide]):
    path = synth_slides[0].truth_mask_path
    native = tifffile.imread(path) > 0
    assert np.array_equal(read_truth_mask(path, native.shape), native)
    doubled = read_truth_mask(path, (1536, 2048))
    assert np.array_equal(doubled[::2, ::2], native)
    for shape_ in [(192, 256), (100, 133), (1000, 1333)]:
        resampled = read_truth_mask(path, shape_)
        assert resampled.shape == shape_
        assert resampled.mean() == pytest.approx(native.mean(), abs=0.01)
    with pytest.raises(WsisegError, match="truth"):
        read_truth_mask(path.with_name("missing.truth.tiff"), (10, 10))


def test_geojson_is_valid_qupath_annotations_matching_the_mask(
    synth_slides: list[SyntheticSlide],
):
    for slide in synth_slides:
        data = json.loads(slide.truth_geojson_path.read_text())
        assert data["type"] == "FeatureCollection"
        assert data["features"]
        geometries = []
        for feature in data["features"]:
            uuid.UUID(feature["id"])
            assert feature["properties"]["objectType"] == "annotation"
            assert feature["properties"]["classification"] == {
                "name": "Tumor",
                "color": [200, 0, 0],
            }
            assert feature["geometry"]["type"] == "Polygon"
            for ring in feature["geometry"]["coordinates"]:
                assert len(ring) >= 4 and ring[0] == ring[-1]
                assert all(round(v, 2) == v for xy in ring for v in xy)
            geometry = shape(feature["geometry"])
            assert geometry.is_valid
            geometries.append(geometry)
        union = shapely.union_all(geometries)
        width, height = slide.level0_size
        assert shapely.box(0, 0, width, height).contains(union)

        # Same area as the mask, and the same place: sample mask pixel centres.
        mask = tifffile.imread(slide.truth_mask_path) > 0
        scale = slide.truth_mpp / slide.mpp
        assert union.area / scale**2 == pytest.approx(mask.sum(), rel=0.02)
        rng = np.random.default_rng(0)
        rows = rng.integers(0, mask.shape[0], 20000)
        cols = rng.integers(0, mask.shape[1], 20000)
        inside = shapely.contains_xy(union, (cols + 0.5) * scale, (rows + 0.5) * scale)
        assert (inside == mask[rows, cols]).mean() > 0.995


def test_slide_without_tumor_has_empty_truth(tmp_path: Path):
    slide = synthesize_slide(tmp_path, "normal", (1024, 1024), 0.5, seed=3, tumor=False)
    assert not (tifffile.imread(slide.truth_mask_path) > 0).any()
    data = json.loads(slide.truth_geojson_path.read_text())
    assert data == {"type": "FeatureCollection", "features": []}
    assert _tissue(_rgb_at(slide, WORKING_MPP)).any()


def test_geojson_keeps_holes():
    """A ring of tumor around normal tissue comes out as one polygon with a hole."""
    rows, cols = np.mgrid[0:80, 0:80]
    radius = np.hypot(rows - 40, cols - 40)
    maps = np.zeros((6, 80, 80), dtype=np.float32)
    maps[layout.TUMOR] = np.clip((radius - 10) / 4, 0, 1) * np.clip((30 - radius) / 4, 0, 1)
    polygons = list(truth.truth_polygons(layout.Layout(maps=maps, mpp=8.0)).geoms)
    assert len(polygons) == 1 and len(polygons[0].interiors) == 1
    assert polygons[0].is_valid


# --------------------------------------------------------------------------------------------
# Appearance


def test_tumor_texture_differs_from_normal_tissue(synth_slides: list[SyntheticSlide]):
    for slide in synth_slides:
        rgb = _rgb_at(slide, WORKING_MPP)
        tissue = _tissue(rgb)
        truth = read_truth_mask(slide.truth_mask_path, tissue.shape)
        # Away from the fuzzy borders.
        tumor = ndimage.binary_erosion(truth, iterations=4)
        normal = ndimage.binary_erosion(tissue & ~truth, iterations=4)
        darkness = 255.0 - rgb.mean(-1)
        assert darkness[tumor].mean() > darkness[normal].mean() + 12
        # More purple (haematoxylin) than pink (eosin): blue gains on red.
        purple = rgb[..., 2] - rgb[..., 0]
        assert purple[tumor].mean() > purple[normal].mean() + 10
        # Hard cases: some normal windows are darker than some tumor windows, so colour
        # alone cannot separate them.
        mean_dark = _windows(darkness).mean((1, 3))
        tumor_windows = mean_dark[_windows(tumor).all((1, 3))]
        normal_windows = mean_dark[_windows(normal).all((1, 3))]
        assert (normal_windows > np.percentile(tumor_windows, 10)).sum() >= 5


def test_textures_are_scaled_in_micrometres(tmp_path: Path):
    """The same tissue at 0.25 and 0.5 µm/px looks alike at 2 µm/px."""
    fine = synthesize_slide(tmp_path, "fine", (4096, 4096), 0.25, seed=11)
    coarse = synthesize_slide(tmp_path, "coarse", (2048, 2048), 0.5, seed=11)
    fine_rgb, coarse_rgb = _rgb_at(fine, WORKING_MPP), _rgb_at(coarse, WORKING_MPP)
    assert fine_rgb.shape == coarse_rgb.shape == (512, 512, 3)
    truth = read_truth_mask(coarse.truth_mask_path, (512, 512))
    assert np.array_equal(truth, read_truth_mask(fine.truth_mask_path, (512, 512)))
    assert truth.any()
    tissue = _tissue(coarse_rgb)
    for region in [truth, tissue & ~truth, ~tissue]:
        assert np.abs(fine_rgb[region].mean(0) - coarse_rgb[region].mean(0)).max() < 6


# --------------------------------------------------------------------------------------------
# Errors and atomicity


@pytest.mark.parametrize(
    ("size", "mpp", "match"),
    [((255, 1024), 0.5, "255x1024"), ((1024, 100), 0.5, "1024x100"), ((512, 512), 0.0, "mpp")],
)
def test_bad_arguments_raise(tmp_path: Path, size, mpp, match):
    with pytest.raises(WsisegError, match=match):
        synthesize_slide(tmp_path, "s", size, mpp, seed=0)
    assert not list(tmp_path.iterdir())


def test_negative_mpp_and_slide_count_raise(tmp_path: Path):
    with pytest.raises(WsisegError, match="mpp"):
        synthesize_cohort(tmp_path, 1, (512, 512), mpp=-0.5)
    with pytest.raises(WsisegError, match="slides"):
        synthesize_cohort(tmp_path, -1, (512, 512))


def test_unwritable_out_dir_raises_naming_it(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out_dir in [blocker, blocker / "sub"]:
        with pytest.raises(WsisegError, match=str(out_dir)):
            synthesize_slide(out_dir, "s", (512, 512), 0.5, seed=0)


def test_failure_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(write, "render_tile", broken)
    with pytest.raises(RuntimeError, match="boom"):
        synthesize_slide(tmp_path, "s", (512, 512), 0.5, seed=0)
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert "s.tiff" not in names
    assert not [n for n in names if n.endswith(".part")]


# --------------------------------------------------------------------------------------------
# Memory


_MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from wsiseg.synth import synthesize_slide
out = Path(sys.argv[1])
synthesize_slide(out, "warm", (512, 512), 0.5, seed=1)  # libraries, threads, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
synthesize_slide(out, "big", (int(sys.argv[2]), int(sys.argv[3])), 0.5, seed=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024}))
"""


@pytest.mark.parametrize(
    "size",
    [(16384, 4096), pytest.param((16384, 16384), marks=pytest.mark.slow)],
    ids=["16384x4096", "16384x16384"],
)
def test_memory_stays_bounded_for_large_slides(tmp_path: Path, size: tuple[int, int]):
    env = dict(os.environ, PYTHONPATH=str(Path(render.__file__).resolve().parents[2]))
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(size[0]), str(size[1])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    growth_mb = json.loads(result.stdout.strip().splitlines()[-1])["growth_mb"]
    raw_mb = size[0] * size[1] * 3 / 2**20
    # Layout maps (bounded) and a few tiles in flight, never the image: measured about
    # 35 MB for 16384×4096 (192 MB raw) and 80 MB for 16384×16384 (768 MB raw).
    assert growth_mb < min(0.3 * raw_mb, 150), f"peak RSS grew {growth_mb:.0f} MB"
    with openslide.OpenSlide(tmp_path / "big.tiff") as osr:
        assert osr.dimensions == size
