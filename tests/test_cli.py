"""The command line: exit codes, one-line errors, and the refine loop through `wsiseg`."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from wsiseg.cli import main
from wsiseg.store import SlideStore

from conftest import CMU_SVS, NDPI, real
from storekit import blobs, feature, run_store, write_export


def test_info_prints_what_the_slide_says(capsys):
    assert main(["info", str(real(CMU_SVS)), str(real(NDPI))]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "2220 x 2967" in out and "0.499" in out
    assert "hamamatsu" in out and "levels:          7" in out and "openslide" in out


def test_info_on_a_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.svs"
    bad.write_text("no")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.svs" in err[0]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])
    assert e.value.code == 2


def test_refine_with_refinenet_history_and_undo(tmp_path, small_workflow, capsys):
    from wsiseg.nets import init_weights

    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, "cmu", small_workflow, blobs)
    weights = tmp_path / "r.safetensors"
    init_weights("refinenet", weights, seed=3)
    before = np.asarray(store["refined"][...]).copy()
    tissue = store.tissue_mask
    rr, cc = np.nonzero(tissue)
    rows, cols = store.frame.working_shape
    x = (cc[len(cc) // 2] + 0.5) * cols / tissue.shape[1]
    y = (rr[len(rr) // 2] + 0.5) * rows / tissue.shape[0]
    geom = store.frame.transform_geometry(shapely.box(x - 10, y - 10, x + 10, y + 10),
                                          "working", "qupath")
    export = write_export(tmp_path / "s.geojson", [feature(geom, "Tumor")])
    store_arg = str(out / "cmu.zarr")
    assert main(["refine", store_arg, "--scribbles", str(export),
                 "--refinenet", str(weights)]) == 0
    assert "round 1" in capsys.readouterr().out
    assert not np.array_equal(np.asarray(SlideStore.open(out / "cmu.zarr")["refined"][...]),
                              before)
    assert main(["history", store_arg]) == 0
    history = capsys.readouterr().out
    assert "refinenet" in history and history.count("\n") == 3
    entry = SlideStore.open(out / "cmu.zarr").attrs["rounds"][-1]
    assert entry["runtime"].split()[0] in ("openvino", "torch")  # what RefineNet ran on
    assert main(["undo", store_arg]) == 0
    np.testing.assert_array_equal(
        np.asarray(SlideStore.open(out / "cmu.zarr")["refined"][...]), before)


def test_refine_without_weights_or_refiner_is_a_usage_error(tmp_path, small_workflow, capsys):
    out = tmp_path / "out"
    run_store(real(CMU_SVS), out, "cmu", small_workflow, blobs)
    export = write_export(tmp_path / "s.geojson", [feature(shapely.box(0, 0, 5, 5), "Tumor")])
    assert main(["refine", str(out / "cmu.zarr"), "--scribbles", str(export)]) == 2
    assert "randomwalk" in capsys.readouterr().err


def test_refine_on_a_missing_store_is_one_line(tmp_path, capsys):
    export = write_export(tmp_path / "s.geojson", [])
    assert main(["refine", str(tmp_path / "nope.zarr"), "--scribbles", str(export),
                 "--refiner", "randomwalk"]) == 1
    assert "nope.zarr" in capsys.readouterr().err


def test_refine_with_tta_averages_eight_views_and_needs_refinenet(tmp_path, small_workflow,
                                                                   capsys):
    import torch

    from wsiseg.nets import init_weights, load_weights
    from wsiseg.refine import refinenet_refiner
    from wsiseg.runtime import torch_network

    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, "cmu", small_workflow, blobs)
    weights = tmp_path / "r.safetensors"
    init_weights("refinenet", weights, seed=3)
    model, card = load_weights(weights, role="refinenet")
    net = torch_network(model, torch.device("cpu"), card=card)
    window_px = 64
    plain = refinenet_refiner(net, 1)(store, [(0, 0)], window_px)
    tta = refinenet_refiner(net, 1, tta=True)(store, [(0, 0)], window_px)
    assert tta[0].shape == plain[0].shape == (window_px, window_px)
    assert not np.allclose(tta[0], plain[0])  # a random network is not rotation invariant

    export = write_export(tmp_path / "s.geojson", [feature(shapely.box(0, 0, 5, 5), "Tumor")])
    assert main(["refine", str(out / "cmu.zarr"), "--scribbles", str(export),
                 "--refiner", "randomwalk", "--tta"]) == 2
    assert "--tta needs the RefineNet refiner" in capsys.readouterr().err
