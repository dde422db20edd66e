"""Tests of wsiseg.export: any round's mask / probability as pyramidal OME-TIFF, GeoJSON,
measurements; all from the slide store alone.

One store is built per module from the real CMU SVS (copied, then deleted, so every export
runs without its slide): ``refined`` gets a synthetic blob probability as round 0, and a
random-walker refine round on two scribbles makes round 1.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
import tifffile
from scipy import ndimage as ndi
from skimage.measure import block_reduce
from skimage.transform import resize

from wsiseg import outputs, rounds
from wsiseg.contours import tumor_polygons, uint8_threshold
from wsiseg.errors import UsageError, WsisegError
from wsiseg.export import (
    MEASUREMENT_FIELDS,
    export_store,
    export_stores,
    parse_what,
    pyramid_shapes,
    read_export_frame,
    refined_of_round,
    write_ome_tiff,
)
from wsiseg.store import STORE_FORMAT, SlideStore

from conftest import CMU_SVS, real

TILE_PX = 128  # small tiles: the 740 × 554 working image gets a 4-level pyramid
SLIDE_ID = "cmu"


@dataclasses.dataclass
class Built:
    store_path: Path
    run_out: Path  # where `run` and the refine round published their GeoJSON
    round0: np.ndarray  # refined after round 0 (uint8)
    round1: np.ndarray  # refined after round 1
    run_measurements: outputs.SlideMeasurements  # as `wsiseg run` computes them for summary
    refine_regions: list[tuple[int, int, int, int]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from wsiseg.config import load_workflow
    from wsiseg.qupath import Annotation, write_annotations
    from wsiseg.refine import randomwalk_refiner, refine_round
    from wsiseg.tiling import tile_slide

    tmp = tmp_path_factory.mktemp("export")
    slide = tmp / "cmu.svs"
    shutil.copyfile(real(CMU_SVS), slide)
    wf = load_workflow()
    wf = wf.replace(tiling=dataclasses.replace(wf.tiling, chunk_px=256))
    run_out = tmp / "run"
    run_out.mkdir()
    store = tile_slide(slide, run_out / f"{SLIDE_ID}.zarr", wf, workers=2).store

    # round 0: smooth random blobs on the tissue, as GuideNet + `wsiseg run` would leave them
    rows, cols = store.frame.working_shape
    tissue = resize(store.tissue_mask.astype(float), (rows, cols), order=0) > 0.5
    field = ndi.gaussian_filter(np.random.default_rng(0).standard_normal((rows, cols)), 12)
    prob = np.clip(0.5 + 0.35 * field / field.std(), 0.0, 1.0) * tissue
    round0 = np.rint(prob * 255).astype(np.uint8)
    store["guide"][...] = round0
    store["refined"][...] = round0
    store.set_stage("guide", "done")
    _, polygons = rounds.write_round_geojson(store, run_out, SLIDE_ID, 0)
    run_measurements = outputs.measurements(store, polygons, 0)
    store.update_attrs(rounds=[{"round": 0, "time": "2025-01-01T00:00:00", "kind": "run",
                                "tumor_mm2": run_measurements.tumor_mm2}])

    # round 1: a tumor scribble on background tissue, a non-tumor one across a tumor blob
    inner = ndi.binary_erosion(tissue, iterations=30)
    bg = np.argwhere((round0 < 60) & inner)
    fg = np.argwhere((round0 > 200) & inner)
    (r_bg, c_bg), (r_fg, c_fg) = bg[len(bg) // 2], fg[len(fg) // 2]
    strokes = [(shapely.LineString([(c_bg - 20, r_bg), (c_bg + 20, r_bg)]).buffer(3), "Tumor"),
               (shapely.LineString([(c_fg - 20, r_fg), (c_fg + 20, r_fg)]).buffer(3), "Stroma")]
    scribbles = tmp / "scribbles.geojson"
    write_annotations(scribbles, [
        Annotation(geometry=store.frame.transform_geometry(g, "working", "qupath"),
                   class_name=name)
        for g, name in strokes
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random walker's probability-range warning
        result = refine_round(store, scribbles, run_out, SLIDE_ID,
                              randomwalk_refiner(130.0, 0.4), "randomwalk")
    assert result.round == 1
    round1 = np.asarray(store["refined"][...])
    regions = [tuple(r) for r in store.attrs["rounds"][-1]["regions"]]
    slide.unlink()  # the slide "moved": everything below works from the store alone
    return Built(run_out / f"{SLIDE_ID}.zarr", run_out, round0, round1, run_measurements,
                 regions)


def _expected_mask(refined: np.ndarray, store: SlideStore) -> np.ndarray:
    theta = store.workflow.contours.threshold
    return np.where(refined >= uint8_threshold(theta), 255, 0).astype(np.uint8)


def _read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {(r["slide_id"], r["round"]): r for r in csv.DictReader(f)}


def _copy_store(built: Built, tmp_path: Path) -> Path:
    path = tmp_path / f"{SLIDE_ID}.zarr"
    shutil.copytree(built.store_path, path)
    return path


# -- pixels of any round -----------------------------------------------------------------------
def test_the_fixture_has_two_different_rounds_and_no_slide(built: Built) -> None:
    store = SlideStore.open(built.store_path, mode="r")
    assert not Path(store.source.path).exists()  # every export here runs without the slide
    assert [r["round"] for r in store.attrs["rounds"]] == [0, 1]
    assert (built.round0 != built.round1).sum() > 1000
    assert (_expected_mask(built.round0, store) != _expected_mask(built.round1, store)).any()


def test_refined_of_round_rebuilds_each_round_in_any_blocks(built: Built) -> None:
    store = SlideStore.open(built.store_path, mode="r")
    for k, expected in ((0, built.round0), (1, built.round1)):
        pixels = refined_of_round(store, k)
        assert pixels.shape == expected.shape and pixels.dtype == np.uint8
        assert pixels.chunks == (256, 256)
        np.testing.assert_array_equal(pixels[...], expected)
        # blocks that cut through the refined region's edges
        for r0, c0, r1, c1 in [(0, 0, 97, 131), (250, 160, 700, 554), (300, 200, 301, 201)]:
            np.testing.assert_array_equal(pixels[r0:r1, c0:c1], expected[r0:r1, c0:c1])
    with pytest.raises(TypeError):
        refined_of_round(store, 0)[::2, :]
    with pytest.raises(WsisegError, match=r"round 7 does not exist; rounds: 0, 1"):
        refined_of_round(store, 7)


def test_a_record_too_large_for_the_cache_is_decoded_once_per_box(
        built: Built, tmp_path: Path, monkeypatch) -> None:
    """Boxes that fit the cache one by one but not together: each is decoded once, not once
    per block that crosses it."""
    import wsiseg.export.pixels as pixels

    store = SlideStore.open(_copy_store(built, tmp_path))
    rows, cols = store.frame.working_shape
    boxes = [(0, 0, rows // 2, cols // 2), (rows // 2, cols // 2, rows - rows // 2,
                                             cols - cols // 2)]
    rounds.save_backup(store, 2, [
        rounds.Backup(b, np.asarray(store["refined"][b[0]:b[0] + b[2], b[1]:b[1] + b[3]]),
                      np.asarray(store["scribbles"][b[0]:b[0] + b[2], b[1]:b[1] + b[3]]))
        for b in boxes])
    store.update_attrs(rounds=[*store.attrs["rounds"], {"round": 2, "kind": "refine",
                                                         "time": "t", "tumor_mm2": 0.0}])
    monkeypatch.setattr(pixels, "_BACKUP_CACHE_BYTES", (rows - rows // 2) * (cols - cols // 2))
    decoded = []
    real_load = pixels.load_backup
    monkeypatch.setattr(pixels, "load_backup", lambda st, k: decoded.append(k) or real_load(st, k))
    round1 = refined_of_round(store, 1)
    step = 64
    tiles = np.block([[round1[r:r + step, c:c + step] for c in range(0, cols, step)]
                      for r in range(0, rows, step)])
    np.testing.assert_array_equal(tiles, built.round1)
    assert decoded == [2, 2]


def test_refined_of_round_undoes_later_rounds_newest_first(built: Built, tmp_path: Path) -> None:
    """A faked round 2 whose box overlaps round 1's: round 0 needs r2 then r1 applied."""
    store = SlideStore.open(_copy_store(built, tmp_path))
    r0, c0, rows, cols = built.refine_regions[0]
    box = (r0 + rows // 2, max(0, c0 - 50), rows // 2 + 20, cols // 2)
    sl = np.s_[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    rounds.save_backup(store, 2, [rounds.Backup(box, np.asarray(store["refined"][sl]),
                                                np.asarray(store["scribbles"][sl]))])
    round2 = built.round1.copy()
    round2[sl] = 255 - round2[sl]
    store["refined"][...] = round2
    store.update_attrs(rounds=[*store.attrs["rounds"], {"round": 2, "kind": "refine",
                                                         "time": "t", "tumor_mm2": 0.0}])
    for k, expected in ((0, built.round0), (1, built.round1), (2, round2)):
        np.testing.assert_array_equal(refined_of_round(store, k)[...], expected)
        np.testing.assert_array_equal(refined_of_round(store, k)[100:600, 90:400],
                                      expected[100:600, 90:400])
    # the same from a record written as a group (one array per box and kind), as before
    del store.group["history"]["r2"]
    legacy = store.group["history"].create_group("r2")
    for key in ("refined", "scribbles"):
        legacy.create_array(f"{key}_0", shape=(box[2], box[3]), dtype="uint8",
                            chunks=(box[2], box[3]), fill_value=0)[...] = (
            built.round1[sl] if key == "refined" else np.asarray(store["scribbles"][sl]))
    legacy.attrs["boxes"] = [{"region": list(box), "refined": True}]
    for k, expected in ((0, built.round0), (1, built.round1), (2, round2)):
        np.testing.assert_array_equal(refined_of_round(store, k)[...], expected)
    # a later round whose undo record is gone: the round cannot be rebuilt, and says so
    del store.group["history"]["r2"]
    with pytest.raises(WsisegError, match=r"round 2 has no undo record.*round 1 cannot"):
        refined_of_round(store, 1)


# -- OME-TIFF ------------------------------------------------------------------------------------
@pytest.mark.parametrize("round_k", [0, 1])
def test_mask_and_prob_round_trip_from_the_store_alone(
    built: Built, tmp_path: Path, round_k: int
) -> None:
    store = SlideStore.open(built.store_path, mode="r")
    refined = built.round0 if round_k == 0 else built.round1
    written = export_store(built.store_path, round_k=round_k, what={"mask", "prob"},
                           out_dir=tmp_path, tile_px=TILE_PX)
    mask_path = tmp_path / f"{SLIDE_ID}.r{round_k}.mask.ome.tif"
    prob_path = tmp_path / f"{SLIDE_ID}.r{round_k}.prob.ome.tif"
    assert written == [mask_path, prob_path]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mask_path.name, prob_path.name])

    mpp = store.frame.working_mpp
    shapes = pyramid_shapes(refined.shape, TILE_PX)
    assert len(shapes) == 4
    for path, level0, reduce in (
        (mask_path, _expected_mask(refined, store), np.max),
        (prob_path, refined, None),
    ):
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome and tif.is_bigtiff
            series = tif.series[0]
            assert [lv.shape for lv in series.levels] == shapes
            np.testing.assert_array_equal(series.asarray(), level0)  # identical
            page = tif.pages.first
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE_PX, TILE_PX)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert 1e4 * den / num == pytest.approx(mpp)  # µm per pixel
            level1 = series.levels[1].asarray()
            if reduce is np.max:  # a focus of one pixel stays visible when zoomed out
                np.testing.assert_array_equal(level1, block_reduce(level0, (2, 2), np.max))
                assert set(np.unique(level1)) <= {0, 255}
                # level 2 comes from level 1's scratch copy, not from level 0
                np.testing.assert_array_equal(series.levels[2].asarray(),
                                              block_reduce(level0, (4, 4), np.max))
            else:
                padded = np.pad(level0, [(0, n % 2) for n in level0.shape], mode="edge")
                np.testing.assert_allclose(level1, block_reduce(padded, (2, 2), np.mean),
                                           atol=0.5 + 1e-9)
            sub = series.levels[1].pages[0]
            num, den = sub.tags["XResolution"].value
            assert 1e4 * den / num == pytest.approx(2 * mpp)
            ome = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = ome["Pixels"]
        assert (pixels["SizeX"], pixels["SizeY"], pixels["Type"]) == (
            refined.shape[1], refined.shape[0], "uint8")
        assert pixels["PhysicalSizeX"] == pytest.approx(mpp)
        assert pixels["PhysicalSizeY"] == pytest.approx(mpp)
        assert pixels["PhysicalSizeXUnit"] == "µm"
        meta = json.loads(ome["Description"])["wsiseg"]
        assert meta["round"] == round_k and meta["slide_id"] == SLIDE_ID
        assert meta["frame"] == store.frame.to_dict()


def mask_to_level0_scale(path: Path) -> tuple[float, float]:
    """Level-0 pixels per mask pixel along (x, y), from the export's stored frame."""
    frame = read_export_frame(path)
    x, y = frame.working_to_level0([[1.0, 1.0]])[0]
    return float(x), float(y)


def test_the_mask_maps_back_onto_the_slide(built: Built, tmp_path: Path) -> None:
    store = SlideStore.open(built.store_path, mode="r")
    (path,) = export_store(built.store_path, what={"mask"}, out_dir=tmp_path, tile_px=TILE_PX)
    frame = read_export_frame(path)
    assert frame == store.frame
    with tifffile.TiffFile(path) as tif:
        rows, cols = tif.series[0].shape
    assert frame.working_shape == (rows, cols)
    sx, sy = mask_to_level0_scale(path)
    assert sx == sy == pytest.approx(store.frame.working_mpp / store.frame.level0_mpp)
    # the mask's far corner lands on the slide's far corner (within one mask pixel)
    w0, h0 = store.frame.level0_size
    assert abs(cols * sx - w0) < sx and abs(rows * sy - h0) < sy
    # and a contour of round 1 (QuPath frame) lands on mask pixels that are tumor
    mask = tifffile.imread(path)
    poly = rounds.polygons_of_round(store, 1)[0]
    centre = frame.transform_geometry(poly.representative_point(), "working", "qupath")
    x, y = frame.qupath_to_working([[centre.x, centre.y]])[0]
    assert mask[int(y), int(x)] == 255


def test_ome_xml_is_well_formed_ome(built: Built, tmp_path: Path) -> None:
    (path,) = export_store(built.store_path, what={"mask"}, out_dir=tmp_path, tile_px=TILE_PX)
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    ome = tifffile.xml2dict(xml)["OME"]
    annotation = ome["StructuredAnnotations"]["MapAnnotation"]
    assert annotation["Namespace"] == "wsiseg.frame"
    # xml2dict turns numeric text into numbers already
    values = {m["K"]: json.loads(v) if isinstance(v := m["value"], str) else v
              for m in annotation["Value"]["M"]}
    assert values["working_mpp"] == 2.0 and values["level0_size"] == [2220, 2967]
    assert ome["Image"]["Pixels"]["TiffData"]["IFD"] == 0


def test_ome_xml_validates_against_the_ome_schema(built: Built, tmp_path: Path) -> None:
    """Needs lxml and the OME 2016-06 schema file (no network here): ``WSISEG_OME_XSD``."""
    pytest.importorskip("lxml", reason="lxml is not installed: OME-XML not schema-validated")
    xsd = os.environ.get("WSISEG_OME_XSD")
    if not xsd or not Path(xsd).is_file():
        pytest.skip("OME schema ome.xsd not available offline (set WSISEG_OME_XSD=path); "
                    "xmlschema is not installed either")
    (path,) = export_store(built.store_path, what={"mask"}, out_dir=tmp_path, tile_px=TILE_PX)
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    assert tifffile.OmeXml.validate(xml, omexsd=Path(xsd).read_bytes()) is True


class RecordingArray:
    """A 2-D array wrapper that records the size of every read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.largest = 0

    def __getitem__(self, key: Any) -> np.ndarray:
        block = self.array[key]
        self.largest = max(self.largest, block.size)
        return block


def test_write_ome_tiff_reads_one_tile_at_a_time(tmp_path: Path) -> None:
    data = (np.random.default_rng(1).random((1000, 700)) * 255).astype(np.uint8)
    source = RecordingArray(data)
    path = write_ome_tiff(source, tmp_path / "x.ome.tif", mpp=0.5, frame_dict={"a": 1},
                          kind="prob", tile_px=256)
    assert source.largest <= 256 * 256
    np.testing.assert_array_equal(tifffile.imread(path), data)
    assert [p.name for p in tmp_path.iterdir()] == ["x.ome.tif"]  # no scratch left behind
    with pytest.raises(ValueError, match="threshold_u8"):
        write_ome_tiff(data, tmp_path / "y.ome.tif", mpp=0.5, frame_dict={}, kind="mask")


# -- GeoJSON and measurements ------------------------------------------------------------------
def test_geojson_is_the_rounds_own_file(built: Built, tmp_path: Path) -> None:
    for k in (0, 1):
        (path,) = export_store(built.store_path, round_k=k, what={"geojson"}, out_dir=tmp_path)
        assert path == tmp_path / f"{SLIDE_ID}.r{k}.geojson"
        assert path.read_bytes() == (built.run_out / f"{SLIDE_ID}.r{k}.geojson").read_bytes()
    # exporting round 0 must not touch the "latest" file
    assert not (tmp_path / f"{SLIDE_ID}.geojson").exists()
    # the default output folder is the store's: identical files there are no conflict
    assert export_store(built.store_path, round_k=0, what={"geojson"})[0] == (
        built.run_out / f"{SLIDE_ID}.r0.geojson")


def test_measurements_agree_with_run_polygons_and_the_mask(built: Built, tmp_path: Path) -> None:
    store = SlideStore.open(built.store_path, mode="r")
    wf = store.workflow
    for k in (0, 1):
        export_store(built.store_path, round_k=k, what={"measurements", "mask"},
                     out_dir=tmp_path, tile_px=TILE_PX)
    table = _read_csv(tmp_path / "measurements.csv")
    assert list(table) == [(SLIDE_ID, "0"), (SLIDE_ID, "1")]
    with (tmp_path / "measurements.csv").open() as f:
        assert next(csv.reader(f)) == list(MEASUREMENT_FIELDS)
    # round 0 is exactly what `wsiseg run` put into summary.csv
    run = built.run_measurements
    row0 = table[(SLIDE_ID, "0")]
    for key in ("tissue_mm2", "tumor_mm2", "tumor_fraction", "foci", "largest_focus_mm2"):
        assert row0[key] == str(getattr(run, key))
    for k in (0, 1):
        row = table[(SLIDE_ID, str(k))]
        stored = outputs.measurements(store, rounds.polygons_of_round(store, k), k)
        assert row == {**{f: str(v) for f, v in dataclasses.asdict(stored).items()
                          if f in MEASUREMENT_FIELDS}, "slide_id": SLIDE_ID, "round": str(k)}
        # ... and what the exported mask itself says
        mask = tifffile.imread(tmp_path / f"{SLIDE_ID}.r{k}.mask.ome.tif") == 255
        min_area_px = wf.contours.min_area_um2 / wf.working_mpp**2
        direct = outputs.measurements(store, tumor_polygons(
            mask, threshold=wf.contours.threshold, simplify_px=wf.contours.simplify_px,
            min_area_px=min_area_px, chunk_px=store.chunk_px), k)
        assert row["foci"] == str(direct.foci)
        assert float(row["tumor_mm2"]) == pytest.approx(direct.tumor_mm2, abs=2e-4)
        labels, n = ndi.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        kept = sizes[sizes >= min_area_px]
        assert int(row["foci"]) == len(kept) and n > len(kept)  # small fragments dropped
        pixel_mm2 = kept.sum() * wf.working_mpp**2 / 1e6
        assert float(row["tumor_mm2"]) == pytest.approx(pixel_mm2, rel=0.03)  # simplified
        assert float(row["largest_focus_mm2"]) == pytest.approx(
            kept.max() * wf.working_mpp**2 / 1e6, rel=0.03)
        tissue_mm2 = store.tissue_mask.sum() * wf.tissue.mask_mpp**2 / 1e6
        assert float(row["tissue_mm2"]) == pytest.approx(tissue_mm2, abs=1e-4)


def test_measurements_merge_rows_of_several_stores(built: Built, tmp_path: Path) -> None:
    other = tmp_path / "stores" / "second.zarr"
    shutil.copytree(built.store_path, other)
    out = tmp_path / "out"
    status = export_stores([built.store_path, other], what="measurements", out_dir=out)
    assert status == 0
    assert list(_read_csv(out / "measurements.csv")) == [(SLIDE_ID, "1"), ("second", "1")]
    assert export_stores([other], round_k=0, what="measurements", out_dir=out) == 0
    assert list(_read_csv(out / "measurements.csv")) == [
        (SLIDE_ID, "1"), ("second", "0"), ("second", "1")]


# -- bad input -----------------------------------------------------------------------------------
def test_a_store_of_an_older_format_is_refused_clearly(built: Built, tmp_path: Path) -> None:
    path = _copy_store(built, tmp_path)
    store = SlideStore.open(path)
    store.update_attrs(format=0)
    with pytest.raises(WsisegError,
                       match=rf"cmu\.zarr: store format 0 is not the format {STORE_FORMAT} "):
        export_store(path, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_round_that_does_not_exist(built: Built, tmp_path: Path) -> None:
    with pytest.raises(WsisegError, match=r"cmu\.zarr: round 5 does not exist; rounds: 0, 1$"):
        export_store(built.store_path, round_k=5, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs_need_force(built: Built, tmp_path: Path) -> None:
    what = {"mask", "geojson", "measurements"}
    export_store(built.store_path, what=what, out_dir=tmp_path, tile_px=TILE_PX)
    mask = tmp_path / f"{SLIDE_ID}.r1.mask.ome.tif"
    before = mask.stat().st_mtime_ns
    with pytest.raises(WsisegError, match=r"cmu\.r1\.mask\.ome\.tif already exist.*--force"):
        export_store(built.store_path, what=what, out_dir=tmp_path, tile_px=TILE_PX)
    assert mask.stat().st_mtime_ns == before
    # a changed GeoJSON or measurements row is a conflict too; identical ones are not
    geojson = tmp_path / f"{SLIDE_ID}.r1.geojson"
    geojson.write_text("{}")
    with pytest.raises(WsisegError, match=r"cmu\.r1\.geojson already exist"):
        export_store(built.store_path, what={"geojson"}, out_dir=tmp_path)
    table = tmp_path / "measurements.csv"
    table.write_text(table.read_text().replace(f"{SLIDE_ID},1,", f"{SLIDE_ID},1,9"))
    with pytest.raises(WsisegError, match=r"measurements\.csv: already has other figures for "
                                          r"cmu round 1"):
        export_store(built.store_path, what={"measurements"}, out_dir=tmp_path)
    written = export_store(built.store_path, what=what, out_dir=tmp_path, force=True,
                           tile_px=TILE_PX)
    assert len(written) == 3 and mask.stat().st_mtime_ns != before
    assert geojson.read_bytes() == rounds.round_geojson_path(
        SlideStore.open(built.store_path, mode="r"), 1).read_bytes()
    assert not _read_csv(table)[(SLIDE_ID, "1")]["tissue_mm2"].startswith("9")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_one_bad_store_does_not_stop_the_others(
    built: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "gone.zarr"
    status = export_stores([missing, built.store_path], what="geojson", out_dir=tmp_path)
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone.zarr" in err[0] and "not a wsiseg slide store" in err[0]
    assert (tmp_path / f"{SLIDE_ID}.r1.geojson").exists()


def test_what_is_checked() -> None:
    assert parse_what("mask, prob") == {"mask", "prob"}
    assert parse_what(None) == {"mask", "geojson", "measurements"}
    with pytest.raises(UsageError, match="unknown output tiff"):
        parse_what("mask,tiff")
