"""Evaluation: the interactive protocol on cases whose answer is known, and mask scores."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from wsiseg.errors import WsisegError
from wsiseg.evaluate import (
    EvalWindow,
    evaluate_interactive,
    evaluate_masks,
    format_mask_table,
    guidenet_refiner,
    iou_dice,
    number_of_interactions,
    paip_score,
    randomwalk_refiner,
    watershed_refiner,
    windows_from_patch_folder,
    write_interactive_report,
)
from wsiseg.evaluate.interactive import correction_on_largest_error
from wsiseg.evaluate.windows import grid_origins, select_windows

from conftest import CAMELYON, CMU_SVS, real


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(rr - centre[0], cc - centre[1]) <= radius


def two_tone(truth: np.ndarray, seed: int = 0) -> np.ndarray:
    """Purple where the truth is tumor, pink elsewhere, with a little noise."""
    rng = np.random.default_rng(seed)
    rgb = np.where(truth[..., None], [110, 50, 150], [235, 175, 205]).astype(float)
    return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


def window(name: str = "w", shift: int = 14, size: int = 96) -> EvalWindow:
    """A tumor disc and a GuideNet guess shifted sideways (IoU about 0.5–0.6)."""
    truth = disc((size, size), (size / 2, size / 2), size / 4)
    guess = disc((size, size), (size / 2, size / 2 + shift), size / 4)
    return EvalWindow(name, two_tone(truth), truth, np.where(guess, 0.9, 0.1).astype(np.float32))


def oracle(w: EvalWindow):
    return lambda rgb, guide, scribbles: w.truth.astype(np.float32)


# -- the protocol ----------------------------------------------------------------------------
def test_an_oracle_reaches_85_percent_after_one_interaction_and_guidenet_never_does():
    w = window()
    start = np.count_nonzero((w.guide >= 0.5) & w.truth) / np.count_nonzero((w.guide >= 0.5)
                                                                            | w.truth)
    assert 0.3 < start < 0.85
    result = evaluate_interactive(
        [w], {"oracle": oracle(w), "GuideNet": guidenet_refiner()}, max_interactions=20
    )
    rows = {r["method"]: r for r in result.summary()}
    assert rows["oracle"]["NoI@85"] == 1 and rows["oracle"]["NoI@90"] == 1
    assert rows["oracle"]["reach@85"] == 1.0
    np.testing.assert_allclose(result.methods["oracle"].iou[0, 1:], 1.0)
    # The floor never changes: never reaches a target, counted as 20 (the paper's rule).
    assert rows["GuideNet"]["NoI@85"] == 20 and rows["GuideNet"]["NoI@90"] == 20
    assert rows["GuideNet"]["reach@85"] == 0.0
    np.testing.assert_allclose(result.methods["GuideNet"].iou[0], start)
    assert result.methods["GuideNet"].seconds.shape == (1, 20)


def test_number_of_interactions():
    curve = [0.5, 0.7, 0.86, 0.91]
    assert number_of_interactions(curve, 0.85) == 2
    assert number_of_interactions(curve, 0.90) == 3
    assert number_of_interactions(curve, 0.95) == 3  # never: the maximum
    assert number_of_interactions([0.9, 0.2], 0.85) == 0  # the start already does


def test_scribbles_respect_the_size_limit_and_correct_the_largest_error():
    truth = np.zeros((384, 384), bool)
    truth[100:300, 50:250] = True
    pred = truth.copy()
    pred[100:300, 50:120] = False  # 14 000 px of tumor missed: the largest error
    pred[10:40, 300:380] = True  # 2 400 px false positive
    limit = math.floor(0.0005 * truth.size)  # DeepScribble: < 0.05 % of the patch (73 px)
    for seed in range(5):
        s = correction_on_largest_error(truth, pred, rng=np.random.default_rng(seed),
                                        max_pixels=limit)
        assert 0 < np.count_nonzero(s) <= limit
        assert set(np.unique(s[s != 0])) == {1}  # a tumor scribble, on tumor
        assert truth[s != 0].all()
    # When the false positive is the largest region, the scribble says non-tumor.
    pred2 = truth.copy()
    pred2[0:90, 0:384] = True
    s = correction_on_largest_error(truth, pred2, rng=np.random.default_rng(0), max_pixels=limit)
    assert set(np.unique(s[s != 0])) == {-1} and not truth[s != 0].any()
    # Nothing wrong: nothing drawn.
    assert not correction_on_largest_error(truth, truth, rng=np.random.default_rng(0),
                                           max_pixels=limit).any()


def test_every_interaction_of_a_run_stays_under_the_limit():
    w = window(size=128)
    result = evaluate_interactive([w], {"WS": watershed_refiner(confident_margin=None)},
                                  max_interactions=4, max_scribble_fraction=0.002)
    px = result.methods["WS"].scribble_px
    assert px.max() <= math.floor(0.002 * 128 * 128) and px[0, 0] > 0


def test_watershed_and_random_walker_follow_the_scribbles():
    truth = disc((64, 64), (32, 32), 16)
    rgb = two_tone(truth)
    guide = np.full(truth.shape, 0.5, np.float32)  # GuideNet unsure everywhere
    scribbles = np.zeros(truth.shape, np.int8)
    scribbles[30:34, 28:36] = 1
    scribbles[2:5, 2:60] = -1
    for refine in (watershed_refiner(confident_margin=None),
                   randomwalk_refiner(beta=130.0, confident_margin=None)):
        prob = refine(rgb, guide, scribbles)
        assert prob.shape == truth.shape
        iou, _ = iou_dice(prob >= 0.5, truth)
        assert iou > 0.9
    # Every pixel seeded (GuideNet confident everywhere): the seeds are the answer.
    confident = np.where(truth, 0.95, 0.05).astype(np.float32)
    prob = randomwalk_refiner(beta=130.0, confident_margin=0.4)(rgb, confident, scribbles)
    assert prob.shape == truth.shape and iou_dice(prob >= 0.5, truth)[0] == 1.0
    # One class scribbled and no confident GuideNet pixels: the whole window is that class.
    only_tumor = np.where(scribbles > 0, 1, 0).astype(np.int8)
    assert watershed_refiner(confident_margin=None)(rgb, guide, only_tumor).min() == 1.0


def test_report_files_in_the_papers_layout(tmp_path):
    w = window()
    result = evaluate_interactive([w, window("v", shift=10)],
                                  {"oracle": oracle(w), "GuideNet": guidenet_refiner()},
                                  max_interactions=3)
    paths = write_interactive_report(result, tmp_path / "report")
    table = paths["table_md"].read_text()
    assert "| Method | ≤3 @85 | NoI@85 | NoI@90 | Time, s | SPI, s |" in table
    assert "| DeepScribble (RefineNet) | 0.8 | 6.4 | 5.9 | 36 | 0.6 |" in table  # paper's row
    with paths["summary_csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["oracle", "GuideNet"]
    with paths["curve_csv"].open() as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 2 * 4
    assert paths["curve_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob(".*"))  # no temporary files left


def test_bad_windows_and_methods():
    truth = np.zeros((32, 32), bool)
    with pytest.raises(WsisegError, match="differ in size"):
        EvalWindow("bad", np.zeros((32, 30, 3), np.uint8), truth, np.zeros((32, 32), np.float32))
    with pytest.raises(WsisegError, match="no windows"):
        evaluate_interactive([], {"GuideNet": guidenet_refiner()})
    w = window()
    with pytest.raises(WsisegError, match="returned a map of shape"):
        evaluate_interactive([w], {"bad": lambda r, g, s: np.zeros((3, 3))}, max_interactions=1)


def test_window_grid_and_selection():
    assert grid_origins(512, 192) == [0, 160, 320]
    assert grid_origins(100, 192) == [0]
    ws = [window("a", shift=10), window("b", shift=0), window("c", shift=40)]  # IoU .58, 1, .05
    chosen = select_windows(ws, iou_range=(0.5, 0.75))
    assert [w.name for w in chosen] == ["a"]
    with pytest.raises(WsisegError, match="no window has a GuideNet IoU"):
        select_windows([ws[1]], iou_range=(0.5, 0.75))
    # A tumor-free window with false positives (IoU 0) is left out by a tumor minimum.
    empty = EvalWindow("e", ws[0].rgb, np.zeros_like(ws[0].truth), ws[0].guide)
    assert [w.name for w in select_windows([empty, ws[0]], iou_range=(0.0, 0.85))] == ["e", "a"]
    assert [w.name for w in select_windows([empty, ws[0]], iou_range=(0.0, 0.85),
                                           min_tumor_fraction=0.05)] == ["a"]


def _camelyon_crops(folder: Path, n: int = 2, size: int = 96) -> Path:
    """The first ``n`` real CAMELYON pairs, cropped to ``size``² around their centre."""
    src = real(CAMELYON)
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for path in sorted((src / "images").iterdir())[:n]:
        for sub in ("images", "masks"):
            with Image.open(src / sub / path.name) as im:
                w, h = im.size
                box = ((w - size) // 2, (h - size) // 2, (w + size) // 2, (h + size) // 2)
                im.crop(box).save(folder / sub / f"{path.stem}.png")
    return folder


def test_windows_from_a_real_patch_folder_with_guidenet(tmp_path):
    from wsiseg.config import load_workflow
    from wsiseg.nets import init_weights

    folder = _camelyon_crops(tmp_path / "patches")
    weights = tmp_path / "g.safetensors"
    init_weights("guidenet", weights, workflow=load_workflow("demo"))
    ws = windows_from_patch_folder(folder, weights, window_px=64)
    assert len(ws) == 2 * 4  # 96 px → 2 × 2 windows of 64 per patch
    assert all(w.rgb.shape == (64, 64, 3) and w.guide.dtype == np.float32 for w in ws)
    assert all(w.guide.min() >= 0.0 and w.guide.max() <= 1.0 for w in ws)


def test_bad_patch_folders(tmp_path):
    weights = tmp_path / "none.safetensors"
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(WsisegError, match="no image/mask pairs") as e:
        windows_from_patch_folder(tmp_path / "empty", weights, window_px=64)
    assert "\n" not in str(e.value)
    folder = _camelyon_crops(tmp_path / "p", n=1)
    mask = next((folder / "masks").iterdir())
    Image.new("L", (50, 40)).save(mask)
    with pytest.raises(WsisegError, match="mask is 50 × 40 px but its image is 96 × 96"):
        windows_from_patch_folder(folder, weights, window_px=64)


# -- mask scores -----------------------------------------------------------------------------
def test_iou_dice_and_the_paip_cutoff():
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 px
    truth[0, 1:4] = True
    truth[1, :3] = True  # 6 px, 3 shared
    assert iou_dice(pred, truth) == pytest.approx((3 / 7, 6 / 10))
    assert iou_dice(np.zeros((2, 2)), np.zeros((2, 2))) == (1.0, 1.0)
    assert paip_score([0.64, 0.66]) == pytest.approx(0.33)  # 0.64 → 0, 0.66 kept
    assert paip_score([0.65]) == pytest.approx(0.65)
    assert math.isnan(paip_score([]))


def _mask_png(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return path


def test_two_mask_images(tmp_path):
    truth = np.zeros((40, 50), bool)
    truth[10:30, 10:30] = True  # 400 px
    pred = np.zeros((40, 50), bool)
    pred[10:30, 20:40] = True  # 400 px, 200 shared
    _mask_png(tmp_path / "pred" / "S1.png", pred)
    _mask_png(tmp_path / "truth" / "S1_mask.png", truth)
    _mask_png(tmp_path / "pred" / "S2.png", truth)
    _mask_png(tmp_path / "truth" / "S2_mask.png", truth)
    report = evaluate_masks([tmp_path / "pred"], tmp_path / "truth",
                            out_csv=tmp_path / "scores.csv")
    by_name = {s.name: s for s in report.scores}
    assert by_name["S1"].iou == pytest.approx(200 / 600)
    assert by_name["S1"].dice == pytest.approx(0.5)
    assert by_name["S1"].paip_jaccard == 0.0  # below 0.65
    assert by_name["S2"].iou == 1.0
    assert report.paip == pytest.approx(0.5)
    assert report.mean_iou == pytest.approx((1 / 3 + 1) / 2)
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["name"] for r in rows] == ["S1", "S2", "mean"]
    assert "PAIP 2019 score" in format_mask_table(report)


def test_bad_mask_inputs(tmp_path):
    _mask_png(tmp_path / "pred" / "S1.png", np.zeros((40, 50), bool))
    _mask_png(tmp_path / "truth" / "S1.png", np.zeros((41, 50), bool))
    with pytest.raises(WsisegError, match="truth mask is 50 × 41 px but the predicted mask "
                                          "is 50 × 40 px") as e:
        evaluate_masks([tmp_path / "pred" / "S1.png"], tmp_path / "truth")
    assert "\n" not in str(e.value)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(WsisegError, match="no slide stores"):
        evaluate_masks([tmp_path / "nothing"], tmp_path / "truth")
    with pytest.raises(WsisegError, match="no annotation file named like it"):
        evaluate_masks([tmp_path / "pred" / "S1.png"], tmp_path / "nothing")


def test_a_slide_store_against_geojson_truth(tmp_path):
    """refined = a box; truth = the box shifted by half its width, minus an Ignore* box."""
    from wsiseg.config import load_workflow

    from storekit import feature, run_store, write_export

    wf = load_workflow()
    rows_cols = {}

    def prob(rows: int, cols: int) -> np.ndarray:
        rows_cols["shape"] = (rows, cols)
        p = np.zeros((rows, cols), np.uint8)
        p[100:200, 100:200] = 255
        return p

    store = run_store(real(CMU_SVS), tmp_path / "out", "cmu", wf, prob)
    to_qupath = store.frame.transform_geometry
    truth_box = shapely.box(150, 100, 250, 200)  # x 150–250, y 100–200 (working px)
    ignore_box = shapely.box(230, 100, 250, 200)  # 20 px of truth-only area left out
    export = write_export(tmp_path / "cmu.geojson", [
        feature(to_qupath(truth_box, "working", "qupath"), "Tumor"),
        feature(to_qupath(ignore_box, "working", "qupath"), "Ignore*"),
        feature(to_qupath(shapely.box(300, 300, 320, 320), "working", "qupath"), "Stroma"),
    ])
    report = evaluate_masks([store.path], export, array="refined")
    s = report.scores[0]
    # pred 10 000 px, truth 8 000 counted px, overlap 5 000.
    assert s.predicted_px == 10_000 and s.truth_px == 8_000
    assert s.iou == pytest.approx(5_000 / 13_000, abs=1e-3)
    rows, cols = rows_cols["shape"]
    assert s.counted_px == rows * cols - 2_000
    # A mask image with the slide's aspect ratio works too; another aspect ratio does not.
    mask = np.zeros((rows, cols), bool)
    mask[100:200, 100:200] = True
    report = evaluate_masks([store.path], _mask_png(tmp_path / "m" / "cmu_mask.png", mask))
    assert report.scores[0].iou == 1.0
    shutil.rmtree(tmp_path / "m")
    bad = _mask_png(tmp_path / "m" / "cmu_mask.png", np.zeros((rows, 2 * cols), bool))
    with pytest.raises(WsisegError, match="aspect ratio"):
        evaluate_masks([store.path], bad)


# -- the command line ------------------------------------------------------------------------
def test_eval_masks_cli(tmp_path, capsys):
    from wsiseg.cli import main

    truth = np.zeros((40, 50), bool)
    truth[10:30, 10:30] = True
    pred = np.zeros((40, 50), bool)
    pred[10:30, 20:40] = True
    _mask_png(tmp_path / "pred" / "S1.png", pred)
    _mask_png(tmp_path / "truth" / "S1_mask.png", truth)
    argv = ["eval", "masks", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
            "--csv", str(tmp_path / "s.csv")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "S1" in out and "0.333" in out and "PAIP 2019 score" in out
    assert (tmp_path / "s.csv").is_file()
    assert main(["eval", "masks", str(tmp_path / "missing"), "--truth", str(tmp_path)]) == 1
    assert "missing: prediction not found" in capsys.readouterr().err


def test_eval_interactive_cli_on_real_patches(tmp_path, capsys):
    from wsiseg.cli import main
    from wsiseg.config import load_workflow
    from wsiseg.nets import init_weights

    folder = _camelyon_crops(tmp_path / "patches", n=1, size=192)
    weights = tmp_path / "g.safetensors"
    init_weights("guidenet", weights, workflow=load_workflow("demo"))
    argv = ["eval", "interactive", "--patch-folder", str(folder), "--guidenet", str(weights),
            "--methods", "randomwalk,guidenet", "--iou-range", "0,1", "--interactions", "2",
            "--workflow", "demo", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "RW (scribbles only)" in out and "GuideNet alone" in out and "NoI@85" in out
    rows = list(csv.DictReader((tmp_path / "out" / "interactive.csv").open()))
    assert {r["method"] for r in rows} == {
        "RW (scribbles + GuideNet ±0.4)", "RW (scribbles only)", "GuideNet alone"}
    assert (tmp_path / "out" / "interactive_curve.png").stat().st_size > 0
    # RefineNet asked for without weights; an unknown method; a bad range: usage errors.
    assert main(argv[:-2] + ["--methods", "refinenet", "--out", str(tmp_path / "o")]) == 2
    assert "--refinenet WEIGHTS" in capsys.readouterr().err
    assert main(argv[:-2] + ["--methods", "magic", "--out", str(tmp_path / "o")]) == 2
    assert "unknown magic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv[:-2] + ["--iou-range", "0.9,0.1", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
