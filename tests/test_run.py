"""`wsiseg run` end to end (issue 3): outputs, GeoJSON validity, bad input, resume."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from wsiseg.cli import main
from wsiseg.contours import polygon_stats
from wsiseg.qupath import read_annotations
from wsiseg.store import SlideStore

from conftest import CMU_SVS, real
from qupath_rules import validate_feature_collection


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> dict[str, Path]:
    from wsiseg.nets import init_weights

    d = tmp_path_factory.mktemp("weights")
    init_weights("guidenet", d / "g.safetensors", seed=1)
    init_weights("refinenet", d / "r.safetensors", seed=1)
    return {"guidenet": d / "g.safetensors", "refinenet": d / "r.safetensors"}


@pytest.fixture(scope="session")
def cmu_out(tmp_path_factory, weights) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    status = main(["run", str(real(CMU_SVS)), "--out", str(out),
                   "--guidenet", str(weights["guidenet"])])
    assert status == 0
    return out


def summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open() as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def check_geojson(path: Path, store: SlideStore) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == "FeatureCollection"
    assert validate_feature_collection(data, bounds=store.frame.level0_size) == []
    for f in data["features"]:
        props = f["properties"]
        assert props["objectType"] == "annotation" and props["isLocked"] is True
        assert props["classification"]["name"] == "Tumor (AI)"
        assert props["metadata"]["source"] == "wsiseg" and props["metadata"]["round"] == "0"
        assert all(np.isfinite(v) for v in props["measurements"].values())
    return data


def test_run_on_the_real_svs(cmu_out):
    slide_id = "cmu-1-small-region"
    for name in (f"{slide_id}.geojson", f"{slide_id}.r0.geojson", f"{slide_id}.png",
                 "summary.csv"):
        assert (cmu_out / name).is_file()
    store = SlideStore.open(cmu_out / f"{slide_id}.zarr", mode="r")
    assert store.stage("guide") == "done" and store.stage("export") == "done"
    data = check_geojson(cmu_out / f"{slide_id}.geojson", store)
    assert data["features"], "random weights still give some tumor on this slide"
    row = summary(cmu_out)[slide_id]
    assert row["status"] == "done"
    assert float(row["tissue_mm2"]) > 0 and 0 <= float(row["tumor_fraction"]) <= 1.0
    # guide == refined after a run; glass outside the tissue mask is 0
    guide = np.asarray(store["guide"][...])
    np.testing.assert_array_equal(guide, np.asarray(store["refined"][...]))
    tissue = store.tissue_mask
    rows, cols = guide.shape
    rr = np.minimum((np.arange(rows) + 0.5) * tissue.shape[0] / rows, tissue.shape[0] - 1)
    cc = np.minimum((np.arange(cols) + 0.5) * tissue.shape[1] / cols, tissue.shape[1] - 1)
    from scipy import ndimage

    grown = ndimage.binary_dilation(tissue)
    outside = ~grown[np.ix_(rr.astype(int), cc.astype(int))]
    assert outside.any() and (guide[outside] == 0).all()


def test_polygons_with_holes_survive_the_reader(cmu_out):
    slide_id = "cmu-1-small-region"
    store = SlideStore.open(cmu_out / f"{slide_id}.zarr", mode="r")
    from wsiseg.outputs import round_contours

    polygons, _ = round_contours(store)
    annotations = read_annotations(cmu_out / f"{slide_id}.geojson")
    assert len(annotations) == len(polygons)
    assert any(len(p.interiors) for p in polygons), "the test needs a polygon with holes"
    slide_box = shapely.box(0, 0, *store.frame.level0_size)
    for poly, ann in zip(polygons, annotations, strict=True):
        expected = shapely.intersection(
            store.frame.transform_geometry(poly, "working", "level0"), slide_box)
        assert ann.geometry.area == pytest.approx(expected.area, rel=1e-4, abs=1.0)
        holes = sum(len(p.interiors) for p in shapely.get_parts(ann.geometry))
        assert holes == sum(len(p.interiors) for p in shapely.get_parts(expected))
        # mean over the component's pixels (all at or above θ = 0.5), close to the mean over
        # the pixel centres inside the simplified outline
        mean = ann.measurements["Mean tumor probability"]
        assert 128 / 255 - 1e-4 <= mean <= 1.0
        inside = polygon_stats(store["refined"], poly)["mean_probability"]
        assert mean == pytest.approx(inside, abs=0.03)


def test_run_on_a_generated_slide(synth_slides, weights, tmp_path):
    out = tmp_path / "out"
    slide = synth_slides[0].slide_path
    assert main(["run", str(slide), "--out", str(out), "--guidenet",
                 str(weights["guidenet"]), "--export", "mask"]) == 0
    slide_id = slide.stem
    store = SlideStore.open(out / f"{slide_id}.zarr", mode="r")
    check_geojson(out / f"{slide_id}.geojson", store)
    assert (out / f"{slide_id}.r0.mask.ome.tif").is_file()
    assert summary(out)[slide_id]["status"] == "done"


def test_a_bad_file_among_good_slides(cmu_out, weights, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(cmu_out, out)  # the good slide is already done here
    bad = tmp_path / "notes.svs"
    bad.write_text("not a slide")
    status = main(["run", str(CMU_SVS), str(bad), "--out", str(out), "--guidenet",
                   str(weights["guidenet"])])
    assert status == 1
    rows = summary(out)
    assert rows["cmu-1-small-region"]["status"] == "skipped"  # done before: not redone
    assert rows["notes"]["status"] == "failed" and "notes.svs" in rows["notes"]["reason"]
    assert "notes.svs" in capsys.readouterr().err


def test_a_failure_after_inference_leaves_no_thread_behind(weights, tmp_path, capsys,
                                                          monkeypatch):
    """Tracing fails once the network is done and the thumbnail's read has started beside
    it: the slide is one failed row, not a hang, and no thread of the slide is left."""
    import threading

    from wsiseg.contours import RowStreamTracer

    def broken(self: RowStreamTracer) -> None:
        raise RuntimeError("tracing broke")

    monkeypatch.setattr(RowStreamTracer, "result", broken)
    before = set(threading.enumerate())
    out = tmp_path / "out"
    assert main(["run", str(real(CMU_SVS)), "--out", str(out), "--guidenet",
                 str(weights["guidenet"])]) == 1
    row = summary(out)["cmu-1-small-region"]
    assert row["status"] == "failed" and "tracing broke" in row["reason"]
    assert "tracing broke" in capsys.readouterr().err
    left = [t.name for t in set(threading.enumerate()) - before
            if t.name.startswith("wsiseg-")]
    assert left == []


@pytest.mark.parametrize("kind", ["role", "corrupt", "pickle"])
def test_bad_weights_are_refused_before_any_slide(weights, tmp_path, capsys, kind):
    if kind == "role":
        path = weights["refinenet"]
    elif kind == "corrupt":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(weights["guidenet"].read_bytes()[:4096])
    else:
        path = tmp_path / "model.safetensors"
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    out = tmp_path / "out"
    status = main(["run", str(CMU_SVS), "--out", str(out), "--guidenet", str(path)])
    assert status == 1
    err = capsys.readouterr().err
    assert path.name in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob("*.zarr"))


def test_weights_that_fail_to_load_are_one_error_while_slides_wait(weights, tmp_path, capsys,
                                                                    monkeypatch):
    # The card is sound, so the network loads on a thread beside the first slide's tiling;
    # its failure (here NaN values, found when the tensors are read) still stops the run with
    # one line, instead of failing every slide with it.
    import torch
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached conversion
    path = tmp_path / "nan.safetensors"
    with open(weights["guidenet"], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    tensors = load_file(weights["guidenet"])
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata=header["__metadata__"])
    second = tmp_path / "second.svs"
    shutil.copy(CMU_SVS, second)
    out = tmp_path / "out"
    status = main(["run", str(CMU_SVS), str(second), "--out", str(out), "--guidenet", str(path)])
    assert status != 0
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith("slides:")]  # not the progress bar
    assert len(err) == 1 and "nan.safetensors" in err[0] and "non-finite" in err[0]
    assert not list(out.glob("*.geojson"))


def test_no_weights_says_how_to_get_them(tmp_path, capsys):
    status = main(["run", str(CMU_SVS), "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert "wsiseg train" in err and "wsiseg demo" in err


def test_interrupted_run_resumes_without_redoing_inference(cmu_out, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cmu_out, out)
    slide_id = "cmu-1-small-region"
    store = SlideStore.open(out / f"{slide_id}.zarr")
    # As if killed after inference, before the outputs were written.
    store.set_stage("export", "pending")
    (out / f"{slide_id}.geojson").unlink()
    inference_before = store.attrs["inference"]
    guide_mtime = max(p.stat().st_mtime for p in (out / f"{slide_id}.zarr" / "guide").rglob("*"))
    assert main(["run", str(CMU_SVS), "--out", str(out), "--guidenet",
                 str(weights["guidenet"])]) == 0
    store = SlideStore.open(out / f"{slide_id}.zarr", mode="r")
    assert store.attrs["inference"] == inference_before
    assert max(p.stat().st_mtime
               for p in (out / f"{slide_id}.zarr" / "guide").rglob("*")) == guide_mtime
    again = (out / f"{slide_id}.geojson").read_bytes()
    assert again == (cmu_out / f"{slide_id}.geojson").read_bytes()
    assert summary(out)[slide_id]["status"] == "done"
