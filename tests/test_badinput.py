"""Odd values and quiet defaults (issue 20.4–20.6, 20.8; issue 15.10's smaller items): each
test here failed before its fix."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
import torch
from safetensors.torch import load_file, save_file

from wsiseg import tiling
from wsiseg.cli import main
from wsiseg.cohort import RunOptions, one_slide, run_cohort
from wsiseg.config import load_workflow
from wsiseg.errors import WsisegError
from wsiseg.infer import infer_to_store
from wsiseg.logs import configure_logging
from wsiseg.nets import CARD_KEY, init_weights, load_weights
from wsiseg.outputs import measurements
from wsiseg.slide.reader import SlideError, SlideInfo, cached_reader, open_slide
from wsiseg.tiling import make_frame, tile_slide

from conftest import CMU_SVS, DICOM_JPEG, NDPI, REPO, real


# -- 20.4: --mpp --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "1e-9", "1e6", "-1", "0"])
@pytest.mark.parametrize("command", ["tile", "run", "synth"])
def test_odd_mpp_is_a_one_line_usage_error_with_the_range(tmp_path, capsys, value, command):
    args = {"tile": ["tile", str(tmp_path / "none.svs"), "--out", str(tmp_path)],
            "run": ["run", str(tmp_path / "none.svs"), "--out", str(tmp_path)],
            "synth": ["synth", str(tmp_path / "s"), "--slides", "1"]}[command]
    assert main([*args, f"--mpp={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--mpp" in err and "0.05–100 µm/px" in err
    assert not (tmp_path / "s").exists()


def test_an_absurd_mpp_in_the_file_is_refused_naming_the_slide():
    info = SlideInfo("odd.tif", "openslide", None, ((1000, 1000),), (1.0,), 1e-9, None, (0, 0))
    with pytest.raises(SlideError, match=r"odd\.tif: the file's mpp .*0\.05–100 µm/px"):
        make_frame(info, load_workflow())


def test_a_coarse_dicom_is_said_to_be_upscaled_once(caplog):
    reader = open_slide(real(DICOM_JPEG))  # 16.8 µm/px
    wf = load_workflow("demo")  # 4 µm/px working
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        make_frame(reader.info, wf)
        make_frame(reader.info, wf)
    lines = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(lines) == 1 and "upscaled 4.2×" in lines[0] and "jpeg.dicom" in lines[0]


# -- 20.5: presets ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_workflow_default_with_a_default_file_in_the_working_directory(
    tmp_path, monkeypatch, capsys, kind
):
    monkeypatch.chdir(tmp_path)
    if kind == "file":
        Path("default").write_text("just: a note\n")
    else:
        Path("default").mkdir()
    out = tmp_path / "g.safetensors"
    assert main(["models", "init", "--role", "guidenet", "--out", str(out),
                 "--workflow", "default"]) == 0


# -- 20.6: non-finite weights and probabilities --------------------------------------------------
def test_nan_weights_are_refused_at_load_naming_the_file_and_tensor(tmp_path):
    path = tmp_path / "g.safetensors"
    init_weights("guidenet", path)
    tensors = load_file(path)
    with open(path, "rb") as f:  # keep the card: only the values are broken
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[3]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata=header["__metadata__"])
    assert CARD_KEY in header["__metadata__"]
    with pytest.raises(WsisegError, match=rf"g\.safetensors: tensor '{name}' holds .*non-finite"):
        load_weights(path, role="guidenet")


class _NanModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), float("nan"))


def test_non_finite_probabilities_stop_the_slide_with_the_reason():
    image = np.full((3, 96, 96), 128, dtype=np.uint8)  # RGB channel first, as stored
    out = np.zeros((96, 96), dtype=np.uint8)
    with pytest.raises(WsisegError, match="probabilities are not finite"):
        infer_to_store(image, [out], model=_NanModel(), normalise=lambda t: t.float(),
                       tissue=np.ones((6, 6), bool), patch_px=32, stride_px=24, batch_size=4,
                       device=torch.device("cpu"), band_px=32)


# -- 20.8: quiet by default ----------------------------------------------------------------------
def _emit() -> None:
    logging.getLogger("distributed.scheduler").setLevel(logging.INFO)
    logging.getLogger("distributed.scheduler").info("State start")
    logging.getLogger("wsiseg.cohort").info("wsiseg info line")
    logging.getLogger("wsiseg.cohort").warning("wsiseg warning line")
    logging.getLogger().warning("OME objective power extraction failed")


def test_without_v_only_our_warnings_reach_the_terminal(capsys):
    configure_logging(False)
    try:
        _emit()
    finally:
        configure_logging(False)
    err = capsys.readouterr().err
    assert "wsiseg warning line" in err
    assert "State start" not in err and "wsiseg info line" not in err
    assert "WARNING root" not in err


def test_with_v_our_info_and_library_warnings_show_but_not_dask_chatter(capsys):
    configure_logging(True)
    try:
        _emit()
    finally:
        configure_logging(False)
    err = capsys.readouterr().err
    assert "wsiseg info line" in err and "WARNING root" in err
    assert "State start" not in err


def test_ome_tiff_info_prints_no_root_warnings(tmp_path):
    path = tmp_path / "s.ome.tif"
    rgb = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    tifffile.imwrite(path, rgb, photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    done = subprocess.run([sys.executable, "-m", "wsiseg.cli", "info", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert "backend:         tiatoolbox" in done.stdout
    assert "WARNING" not in done.stderr


def test_with_v_a_failed_slides_traceback_is_shown(tmp_path, monkeypatch, caplog):
    weights = tmp_path / "g.safetensors"
    init_weights("guidenet", weights)

    def broken(*args, **kwargs):
        raise RuntimeError("an unforeseen bug")

    monkeypatch.setattr(one_slide, "_run_one", broken)
    options = RunOptions(out_dir=tmp_path / "out", guidenet=str(weights), workers=0,
                         progress=False)
    with caplog.at_level(logging.INFO, logger="wsiseg"):
        assert run_cohort([str(real(CMU_SVS))], options) == 1
    text = caplog.text
    assert "Traceback (most recent call last)" in text and "an unforeseen bug" in text


# -- 15.10: reader cache, tumor fraction ----------------------------------------------------------
def test_a_cached_reader_is_reopened_when_the_slide_is_replaced(tmp_path):
    slide = tmp_path / "slide.svs"
    shutil.copy(real(CMU_SVS), slide)
    first = cached_reader(slide)
    assert cached_reader(slide) is first
    first_size = first.info.level0_size
    replacement = tmp_path / "new.svs"
    shutil.copy(real(NDPI), replacement)
    os.replace(replacement, slide)  # a rescan written under the same name
    again = cached_reader(slide)
    assert again is not first and again.info.level0_size != first_size
    assert again.info.level0_size == open_slide(slide).info.level0_size


def test_tumor_fraction_never_exceeds_one(tmp_path, small_workflow):
    store = tile_slide(real(CMU_SVS), tmp_path / "cmu.zarr", small_workflow).store
    rows, cols = store.frame.working_shape
    everywhere = [shapely.box(0, 0, cols, rows)]  # tumor traced beyond the tissue mask too
    m = measurements(store, everywhere, 0)
    assert m.tumor_mm2 > m.tissue_mm2  # the slide is larger than its tissue
    assert m.tumor_fraction == 1.0
    inside = measurements(store, [shapely.box(0, 0, cols / 2, rows)], 0)
    assert 0 < inside.tumor_fraction < 1


def test_a_slide_replaced_during_tiling_is_refused_then_rebuilt(tmp_path, small_workflow,
                                                                 monkeypatch):
    slide = tmp_path / "slide.svs"
    shutil.copy(real(CMU_SVS), slide)
    replaced = []
    original = tiling.read_box

    def read_then_rescan(reader, downsample, box):
        if not replaced:  # the scanner writes a new file under the same name mid-tiling
            replaced.append(True)
            copy = tmp_path / "rescan.svs"
            shutil.copy(real(CMU_SVS), copy)
            with copy.open("ab") as f:
                f.write(b"\0" * 4096)
            os.replace(copy, slide)
        return original(reader, downsample, box)

    monkeypatch.setattr(tiling, "read_box", read_then_rescan)
    with pytest.raises(SlideError, match=r"slide\.svs: changed while it was being tiled"):
        tile_slide(slide, tmp_path / "out" / "slide.zarr", small_workflow)
    monkeypatch.setattr(tiling, "read_box", original)
    result = tile_slide(slide, tmp_path / "out" / "slide.zarr", small_workflow)
    assert result.chunks_written == result.chunks_total
    assert result.store.source.size == slide.stat().st_size
