from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from wsiseg.cohort import assign_slide_ids, ensure_out_dir
from wsiseg.config import load_workflow
from wsiseg.errors import WsisegError
from wsiseg.store import SlideStore
from wsiseg.tiling import NoTissueError, clear_reader_cache, tile_slide, tissue_chunks

from conftest import CMU_SVS, DICOM_J2K, DICOM_JPEG, DICOM_TINY, NDPI, REPO, real


def coarse_workflow(chunk_px: int = 128, working_mpp: float = 8.0):
    wf = load_workflow()
    return wf.replace(
        working_mpp=working_mpp, tiling=dataclasses.replace(wf.tiling, chunk_px=chunk_px)
    )


@pytest.mark.parametrize(
    ("path", "size", "mpp"),
    [
        (CMU_SVS, (2220, 2967), 0.499),
        (NDPI, (3968, 4864), 0.2281750559028887),
        (DICOM_JPEG, (957, 715), 16.783),
        (DICOM_J2K, (957, 715), 16.783),
    ],
)
def test_real_slides_tile_at_the_working_size(tmp_path, small_workflow, path, size, mpp):
    # The DICOM files are coarser than 2 µm/px (upsampled 8×): default chunks keep them quick.
    wf = small_workflow if mpp < 2.0 else load_workflow()
    result = tile_slide(real(path), tmp_path / "s.zarr", wf)
    store = result.store
    expected = (size[1] * mpp / 2.0, size[0] * mpp / 2.0)  # rows, cols
    channels, rows, cols = store["image"].shape  # RGB channel first (OME-Zarr)
    assert channels == 3
    assert abs(rows - expected[0]) <= 1 and abs(cols - expected[1]) <= 1
    assert store.stage("tiling") == "done"
    assert result.chunks_written == result.chunks_total > 0
    # Every tissue chunk is marked, nothing else.
    marked = np.asarray(store["tiled"][...], dtype=bool)
    todo = tissue_chunks(store.tissue_mask, (rows, cols), store.chunk_px)
    np.testing.assert_array_equal(marked, todo)
    attrs = store.attrs
    assert attrs["source"]["size"] == path.stat().st_size
    assert attrs["frame"]["working_mpp"] == 2.0
    assert store.group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "image"


def test_tiled_pixels_are_the_area_average_of_the_slide(tmp_path, small_workflow):
    """With an exact 4× reduction, the working image is the 4×4 block mean of level 0."""
    from skimage.transform import downscale_local_mean

    from wsiseg.slide.reader import open_slide

    # --mpp 0.5 makes the scale exactly 2.0 / 0.5 = 4 level-0 px per working px.
    store = tile_slide(real(CMU_SVS), tmp_path / "s.zarr", small_workflow, mpp=0.5).store
    reader = open_slide(CMU_SVS)
    full = reader.read_region((0, 0), 0, reader.info.level0_size).astype(float)
    expected = downscale_local_mean(full, (4, 4, 1))
    got = np.moveaxis(np.asarray(store["image"][...]), 0, -1).astype(float)
    rows, cols = got.shape[:2]
    chunk = store.chunk_px
    marked = np.asarray(store["tiled"][...]).astype(bool)
    assert marked.sum() >= 2
    for i, j in zip(*np.nonzero(marked), strict=True):
        r1, c1 = min((i + 1) * chunk, rows - 1), min((j + 1) * chunk, cols - 1)
        sl = np.s_[i * chunk : r1, j * chunk : c1]  # the last row/col pads past level 0
        assert np.abs(got[sl] - expected[sl]).max() <= 1.0


def test_rerun_skips_completed_chunks(tmp_path, small_workflow):
    first = tile_slide(real(CMU_SVS), tmp_path / "s.zarr", small_workflow)
    again = tile_slide(CMU_SVS, tmp_path / "s.zarr", small_workflow)
    assert first.chunks_written > 0 and again.chunks_written == 0


def test_changed_slide_is_rebuilt_and_old_store_kept(tmp_path, small_workflow):
    slide = tmp_path / "slide.svs"
    shutil.copy(real(CMU_SVS), slide)
    store_path = tmp_path / "out" / "slide.zarr"
    store_path.parent.mkdir()
    tile_slide(slide, store_path, small_workflow)
    with slide.open("ab") as f:  # a rewritten slide: other size and content
        f.write(b"\0" * 1024)
    clear_reader_cache()
    result = tile_slide(slide, store_path, small_workflow)
    assert result.chunks_written == result.chunks_total
    assert result.store.source.size == slide.stat().st_size
    stale = list(store_path.parent.glob("slide.zarr.stale-*"))
    assert len(stale) == 1  # the old store is moved aside, not deleted


def test_touched_slide_is_not_rebuilt(tmp_path, small_workflow):
    slide = tmp_path / "slide.svs"
    shutil.copy(real(CMU_SVS), slide)
    tile_slide(slide, tmp_path / "s.zarr", small_workflow)
    os.utime(slide, (time.time() + 100, time.time() + 100))
    assert tile_slide(slide, tmp_path / "s.zarr", small_workflow).chunks_written == 0


def test_blank_slide_reports_no_tissue(tmp_path, small_workflow):
    with pytest.raises(NoTissueError, match=r"sm_image\.dcm: no tissue"):
        tile_slide(real(DICOM_TINY), tmp_path / "blank.zarr", small_workflow)
    assert not (tmp_path / "blank.zarr").exists()  # nothing half written


def test_missing_mpp_names_the_option(tmp_path, small_workflow):
    from conftest import REAL

    path = real(REAL / "patches" / "he_no_mask" / "target_image.png")
    with pytest.raises(WsisegError, match="--mpp"):
        tile_slide(path, tmp_path / "t.zarr", small_workflow)
    assert not (tmp_path / "t.zarr").exists()
    store = tile_slide(path, tmp_path / "t.zarr", small_workflow, mpp=0.5).store
    assert store["image"].shape == (3, 250, 250)


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WsisegError, match="cannot write the output directory"):
        ensure_out_dir(blocker / "out")


def test_same_stem_in_two_folders_gets_two_stores(tmp_path, small_workflow):
    a, b = tmp_path / "a" / "slide.svs", tmp_path / "b" / "slide.svs"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copy(real(CMU_SVS), p)
    with b.open("ab") as f:
        f.write(b"other scan")
    out = tmp_path / "out"
    ids = assign_slide_ids([a, b], out)
    assert ids[a] != ids[b] and ids[a].startswith("slide-")
    # A later run with only one of them must not take over the other's store.
    tile_slide(a, out / "slide.zarr", small_workflow)
    assert assign_slide_ids([b], out)[b] != "slide"
    assert assign_slide_ids([a], out)[a] == "slide"


KILL_SCRIPT = """
import dataclasses, sys
from wsiseg.config import load_workflow
from wsiseg.tiling import tile_slide
wf = load_workflow()
wf = wf.replace(working_mpp=8.0, tiling=dataclasses.replace(wf.tiling, chunk_px=128, workers=1))
tile_slide(sys.argv[1], sys.argv[2], wf)
"""


def test_kill_9_mid_run_then_restart_gives_identical_image(tmp_path):
    slide = real(DICOM_JPEG)
    wf = load_workflow()
    wf = wf.replace(working_mpp=8.0, tiling=dataclasses.replace(wf.tiling, chunk_px=128, workers=1))
    clean = tile_slide(slide, tmp_path / "clean.zarr", wf).store
    killed = tmp_path / "killed.zarr"
    env = dict(os.environ, PYTHONPATH=str(REPO / "pipeline"))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(slide), str(killed)], env=env)
    markers = killed / "tiled" / "c"
    deadline = time.time() + 120
    while time.time() < deadline:
        if markers.exists() and sum(1 for _ in markers.rglob("*")) > 25:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = SlideStore.open(killed)
    n_marked = int(np.asarray(partial["tiled"][...]).sum())
    total = int(np.asarray(clean["tiled"][...]).sum())
    assert 0 < n_marked < total, "the kill must land mid-run"
    assert partial.stage("tiling") != "done"
    result = tile_slide(slide, killed, wf)
    assert result.chunks_written == total - n_marked
    np.testing.assert_array_equal(
        np.asarray(result.store["image"][...]), np.asarray(clean["image"][...])
    )


def test_resample_on_an_integer_factor_is_the_block_average():
    from wsiseg.slide.resample import resample

    rng = np.random.default_rng(0)
    region = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(resample(region, (0, 0), 1.0, (4, 6, 20, 30)), region[4:24, 6:36])
    blocks = region.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    expected = np.clip(np.rint(blocks), 0, 255).astype(np.uint8)
    # The region starts 4 source px (2 output px) before the box, as read_box reads it.
    assert np.array_equal(resample(region, (-4, -4), 2.0, (0, 0, 28, 28)), expected[2:30, 2:30])
    # A box reaching past the region is clamped at the edge (mode "nearest"), not cut short.
    edge = resample(region, (0, 0), 2.0, (20, 20, 16, 16))
    assert edge.shape == (16, 16, 3)
    assert np.array_equal(edge[-1, -1], expected[-1, -1])


def test_background_tiling_reads_the_same_image_as_it_is_written(tmp_path, small_workflow):
    from wsiseg.tiling import BackgroundTiling

    reference = tile_slide(real(CMU_SVS), tmp_path / "a.zarr", small_workflow).store
    expected = np.asarray(reference["image"][...])
    with BackgroundTiling(CMU_SVS, tmp_path / "b.zarr", small_workflow, workers=2) as tiling:
        rows = tiling.image.shape[1]
        # Read band by band while the tiling runs, as inference does.
        bands = [np.asarray(tiling.image[:, r : r + 100, :]) for r in range(0, rows, 100)]
        result = tiling.finish()
    assert np.array_equal(np.concatenate(bands, axis=1), expected)
    assert result.chunks_written == result.chunks_total > 0
    assert result.store.stage("tiling") == "done"


def test_thumbnail_read_while_tiling_waits_for_the_tiles(tmp_path, small_workflow):
    """``wsiseg run`` reads the thumbnail through the tiling as soon as the network is done,
    while chunks may still be written: it must wait for them, never show missing tiles as
    glass."""
    from wsiseg.outputs import thumbnail_image
    from wsiseg.tiling import BackgroundTiling

    with BackgroundTiling(real(CMU_SVS), tmp_path / "t.zarr", small_workflow,
                          workers=1) as tiling:
        early = thumbnail_image(tiling.store, max_px=256, image=tiling.image)
        tiling.finish()
    assert np.array_equal(early, thumbnail_image(tiling.store, max_px=256))
    assert (early != 255).any()  # tissue, not glass


def test_background_tiling_hands_its_error_to_the_reader(tmp_path, small_workflow, monkeypatch):
    import wsiseg.tiling as tiling_module
    from wsiseg.tiling import BackgroundTiling

    real_tile_chunk = tiling_module.tile_chunk

    def failing(slide_path, store_path, downsample, i, j, chunk_px):
        if i >= 1:
            raise WsisegError(f"{slide_path}: cannot read chunk ({i}, {j})")
        return real_tile_chunk(slide_path, store_path, downsample, i, j, chunk_px)

    monkeypatch.setattr(tiling_module, "tile_chunk", failing)
    with BackgroundTiling(real(CMU_SVS), tmp_path / "s.zarr", small_workflow) as tiling:
        assert np.asarray(tiling.image[:, 0:10, :]).any()  # row 0 of chunks is fine
        with pytest.raises(WsisegError, match="cannot read chunk"):
            tiling.image[:, 300:310, :]
        with pytest.raises(WsisegError, match="cannot read chunk"):
            tiling.finish()
    assert tiling.store.stage("tiling") != "done"


def test_tiling_in_process_never_imports_distributed(tmp_path):
    # dask.compute with a scheduler *name* imports distributed to look for a client: about a
    # second of CPU holding the GIL, inside a run that has no cluster.
    code = ("import sys; from wsiseg.cli import main; "
            f"status = main(['tile', {str(CMU_SVS)!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "print(status, 'distributed' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stderr[-2000:]
