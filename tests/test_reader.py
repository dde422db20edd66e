from __future__ import annotations

import shutil

import numpy as np
import pytest

from wsiseg.config import load_workflow
from wsiseg.slide.reader import SlideError, best_level_for, open_slide
from wsiseg.tiling import make_frame

from conftest import CMU_SVS, DICOM_J2K, DICOM_JPEG, DICOM_TINY, NDPI, REAL, real


@pytest.mark.parametrize(
    ("path", "vendor", "size", "mpp"),
    [
        (CMU_SVS, "aperio", (2220, 2967), 0.499),
        (NDPI, "hamamatsu", (3968, 4864), 0.22818),
        (DICOM_JPEG, "dicom", (957, 715), 16.783),
        (DICOM_J2K, "dicom", (957, 715), 16.783),
        (DICOM_TINY, "dicom", (50, 50), 0.499),
    ],
)
def test_real_slides_open_with_openslide(path, vendor, size, mpp):
    reader = open_slide(real(path))
    info = reader.info
    assert info.backend == "openslide"
    assert info.vendor == vendor
    assert info.level0_size == size
    assert info.mpp == pytest.approx(mpp, rel=1e-4)
    region = reader.read_region((0, 0), 0, (32, 16))
    assert region.shape == (16, 32, 3) and region.dtype == np.uint8
    text = info.describe()
    assert "openslide" in text and f"{size[0]} x {size[1]}" in text


def test_ndpi_levels_and_best_level():
    info = open_slide(real(NDPI)).info
    assert len(info.level_dimensions) == 7
    assert best_level_for(info, 8.8) == 3  # downsample 8 is the nearest level above 8.8
    assert best_level_for(info, 0.5) == 0


def test_plain_image_falls_back_to_tiatoolbox():
    path = real(REAL / "patches" / "he_no_mask" / "histo.jpg")
    reader = open_slide(path)
    assert reader.info.backend == "tiatoolbox"
    assert reader.info.level0_size == (500, 300)
    assert reader.read_region((0, 0), 0, (20, 10)).shape == (10, 20, 3)


def test_no_mpp_is_an_error_naming_the_option():
    path = real(REAL / "patches" / "he_no_mask" / "histo.jpg")
    info = open_slide(path).info
    wf = load_workflow()
    with pytest.raises(SlideError, match=r"histo\.jpg.*--mpp"):
        make_frame(info, wf)
    frame = make_frame(info, wf, mpp=0.5)
    assert frame.working_size == (125, 75)


def test_bad_files(tmp_path):
    with pytest.raises(SlideError, match="missing.svs: no such file"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="notes.svs"):
        open_slide(text)
    empty = tmp_path / "empty.tiff"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty.tiff"):
        open_slide(empty)
    unsupported = tmp_path / "table.csv"
    unsupported.write_text("a,b\n1,2\n")
    with pytest.raises(SlideError, match="table.csv"):
        open_slide(unsupported)


def test_truncated_slide_is_a_clear_error(tmp_path):
    truncated = tmp_path / "cut.svs"
    data = real(CMU_SVS).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="cut.svs"):
        reader = open_slide(truncated)
        # Some truncations only show when the missing tiles are read.
        w, h = reader.info.level0_size
        reader.read_region((0, 0), 0, (w, h))


def test_slide_copied_elsewhere_still_reads(tmp_path):
    copy = tmp_path / "copy.svs"
    shutil.copy(real(CMU_SVS), copy)
    assert open_slide(copy).info.level0_size == (2220, 2967)


def test_transparent_pixels_are_white_glass():
    # OpenSlide gives premultiplied RGBA; beyond the slide's edge alpha is 0 (no tissue).
    slide = open_slide(real(CMU_SVS))
    width, height = slide.info.level_dimensions[0]
    region = slide.read_region((width - 8, height - 8), 0, (16, 16))
    assert region.shape == (16, 16, 3) and region.dtype == np.uint8
    assert (region[8:, :] == 255).all() and (region[:, 8:] == 255).all()
    assert region.flags.c_contiguous


def test_partial_alpha_composites_premultiplied_colour_over_white():
    from wsiseg.slide.reader import _rgba_over_white

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    rgba[..., :3] = np.minimum(rgba[..., :3], rgba[..., 3:])  # premultiplied: colour ≤ alpha
    want = np.minimum(rgba[..., :3].astype(int) + 255 - rgba[..., 3:].astype(int), 255)
    np.testing.assert_array_equal(_rgba_over_white(rgba), want)
    rgba[..., 3] = 255
    np.testing.assert_array_equal(_rgba_over_white(rgba[:, ::2]), rgba[:, ::2, :3])
