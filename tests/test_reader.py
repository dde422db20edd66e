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


def _openslide_pixels(path, level0_xy, level, size):
    """What OpenSlide itself returns for the read, composited over white."""
    import openslide

    from wsiseg.slide.reader import _rgba_over_white

    with openslide.OpenSlide(str(path)) as slide:
        return _rgba_over_white(np.asarray(slide.read_region(level0_xy, level, size)))


_REGIONS = [((0, 0), (500, 400)), ((137, 251), (700, 333)), ((-50, -20), (300, 200)),
            ((2100, 2900), (300, 200)), ((5000, 5000), (10, 10))]


def test_svs_tiles_are_cut_by_tifffile_with_openslides_very_pixels(monkeypatch):
    path = real(CMU_SVS)
    reader = open_slide(path)
    want = {r: _openslide_pixels(path, r[0], 0, r[1]) for r in _REGIONS}

    def no_openslide(*args, **kwargs):
        raise AssertionError("OpenSlide was asked for an SVS region")

    monkeypatch.setattr(reader._slide, "read_region", no_openslide)
    for (xy, size), pixels in want.items():
        got = reader.read_region(xy, 0, size)
        assert got.shape == (size[1], size[0], 3) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, pixels)


def test_generated_tiff_levels_read_as_openslide_reads_them(synth_slides):
    path = synth_slides[0].slide_path
    reader = open_slide(path)
    assert reader.info.vendor == "generic-tiff"
    for level, ds in enumerate(reader.info.level_downsamples):
        for x, y in [(0, 0), (333, 517), (-7, 9)]:
            level0_xy = (round(x * ds), round(y * ds))
            np.testing.assert_array_equal(reader.read_region(level0_xy, level, (301, 203)),
                                          _openslide_pixels(path, level0_xy, level, (301, 203)))


def test_a_level_position_between_pixels_is_left_to_openslide():
    from wsiseg.slide.tiff_tiles import level_origin

    assert level_origin((4000, 8000), 4.0) == (1000, 2000)
    assert level_origin((4002, 8000), 4.0) is None  # between level pixels
    # a fractional downsample: what source_box asks for level pixel (1000, 2000)
    assert level_origin((4000, 8001), 4.000337) == (1000, 2000)
    assert level_origin((4001, 8001), 4.000337) is None
    assert level_origin((17, -3), 1.0) == (17, -3)


def test_a_fractional_level_is_cut_on_its_own_pixel_grid(tmp_path):
    import tifffile

    from wsiseg.slide.resample import source_box

    rng = np.random.default_rng(3)
    sizes = [(4001, 3001), (1000, 750)]  # downsample 4.00117: an SVS-like level 1
    levels = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    path = tmp_path / "fractional.svs"
    with tifffile.TiffWriter(path) as tif:
        for (w, h), pixels in zip(sizes, levels, strict=True):
            tif.write(pixels, tile=(256, 256), photometric="rgb", compression="jpeg",
                      metadata=None, description=f"Aperio Image Library v12.0.15\r\n"
                      f"4001x3001 [0,0 {w}x{h}] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5")
    reader = open_slide(path)
    assert reader.info.vendor == "aperio" and reader.info.level_downsamples[1] != 4
    with tifffile.TiffFile(path) as tif:
        decoded = tif.pages[1].asarray()  # the level's own pixels
    for box in [(0, 0, 100, 80), (37, 91, 120, 200), (700, 900, 50, 90)]:
        level, level0_xy, size, (row, col), _ = source_box(reader.info, 8.0, box)
        assert level == 1
        got = reader.read_region(level0_xy, level, size)
        want = np.full_like(got, 255)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + size[1], 750), min(col + size[0], 1000)
        want[r0 - row:r1 - row, c0 - col:c1 - col] = decoded[r0:r1, c0:c1]
        np.testing.assert_array_equal(got, want)


def test_reads_past_the_edge_are_white_and_keep_the_fast_path(monkeypatch):
    reader = open_slide(real(CMU_SVS))
    for xy in [(2221, 0), (0, 2968), (5000, 5000), (-300, -300)]:
        assert (reader.read_region(xy, 0, (10, 10)) == 255).all()
    monkeypatch.setattr(reader._slide, "read_region", lambda *a: 1 / 0)  # OpenSlide not asked
    assert reader.read_region((2210, 2960), 0, (20, 20))[:7, :10].min() < 255


def test_a_tile_outside_the_file_is_refused(tmp_path, synth_slides):
    import tifffile

    source = synth_slides[0].slide_path
    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        tag = tif.pages[0].tags["TileOffsets"]
        offsets = list(tif.pages[0].dataoffsets)
    offsets[3] = len(data) + 10
    packed = np.asarray(offsets, dtype="<u4" if tag.dtype == 4 else "<u8").tobytes()
    data[tag.valueoffset: tag.valueoffset + len(packed)] = packed
    broken = tmp_path / "far.tiff"
    broken.write_bytes(bytes(data))
    with pytest.raises(SlideError, match=r"far\.tiff: read failed"):
        open_slide(broken).read_region((0, 0), 0, (1000, 300))


def test_a_tile_cut_short_is_refused_as_openslide_refuses_it(tmp_path):
    import tifffile

    source = real(CMU_SVS)
    with tifffile.TiffFile(source) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    data = bytearray(source.read_bytes())
    data[offset + 100: offset + count] = b"\xff\xd9" + bytes(count - 102)  # EOI, then nothing
    broken = tmp_path / "broken.svs"
    broken.write_bytes(bytes(data))
    reader = open_slide(broken)
    reader.read_region((0, 0), 0, (200, 200))  # tiles before the broken one still read
    with pytest.raises(SlideError, match=r"broken\.svs: read failed"):
        reader.read_region((0, 0), 0, (2220, 2967))


def test_threads_sharing_one_reader_get_the_pixels_of_serial_reads(synth_slides):
    from concurrent.futures import ThreadPoolExecutor

    reader = open_slide(synth_slides[1].slide_path)
    boxes = [((x, y), (517, 389)) for x in range(0, 4000, 611) for y in range(0, 3000, 701)]
    serial = [reader.read_region(xy, 0, size) for xy, size in boxes]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda box: reader.read_region(box[0], 0, box[1]), boxes))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
