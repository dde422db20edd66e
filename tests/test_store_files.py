"""Files readable as the umask says (15.7), white glass (15.6), outputs ↔ rounds without
an import cycle (18), and the run's thumbnail PNG holding exactly the drawn pixels."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_txn import scribble_export
from wsiseg.atomic import atomic_copy, atomic_write_bytes, atomic_writer, temporaries_of
from wsiseg.cli import main
from wsiseg.refine import read_window, refine_round
from wsiseg.store import GLASS_RGB, SlideStore, StoreError
from wsiseg.tiling import tile_slide

from conftest import CMU_SVS, REPO, real
from storekit import blobs, run_store

SLIDE_ID = "cmu"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask():
    """Set the process umask for a test, restoring it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_write_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "a.txt"
    atomic_write_bytes(path, b"one")
    assert mode_of(path) == 0o666 & ~mask
    atomic_copy(path, tmp_path / "b.txt")
    assert mode_of(tmp_path / "b.txt") == 0o666 & ~mask
    assert (tmp_path / "b.txt").read_bytes() == b"one"


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.geojson"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half")
        raise RuntimeError
    assert path.read_bytes() == b"old" and temporaries_of(path) == []


def _refiner(store, windows, window_px):
    return [np.full((window_px, window_px), 0.9, np.float32) for _ in windows]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_published_files_follow_the_umask(tmp_path, small_workflow, umask, mask):
    """`<slide>.geojson`, `.r<k>.geojson`, the thumbnail and the export files: 0644 under the
    usual umask 022 (they were 0600: QuPath said "access denied" to other users)."""
    umask(mask)
    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    export = scribble_export(store, tmp_path / "s.geojson")
    assert refine_round(store, export, out, SLIDE_ID, _refiner, "fixed").round == 1
    exported = tmp_path / "exported"
    assert main(["export", str(store.path), "--out", str(exported),
                 "--what", "mask,geojson,measurements"]) == 0
    files = [out / f"{SLIDE_ID}.geojson", out / f"{SLIDE_ID}.r0.geojson",
             out / f"{SLIDE_ID}.r1.geojson", out / f"{SLIDE_ID}.png",
             store.path / "rounds" / "r1.geojson", store.path / "rounds" / "r1.index.npz",
             *sorted(exported.iterdir())]
    assert len(files) >= 8
    want = 0o666 & ~mask
    assert {f.name: oct(mode_of(f)) for f in files} == {f.name: oct(want) for f in files}


# -- white glass -------------------------------------------------------------------------------
@pytest.fixture()
def fine_workflow(small_workflow):
    """64 px chunks: the small CMU region then has glass chunks beside tissue chunks."""
    import dataclasses

    return small_workflow.replace(tiling=dataclasses.replace(small_workflow.tiling, chunk_px=64))


def _edge_chunk(store: SlideStore) -> tuple[int, int]:
    """(row, col) of an untiled chunk with a tiled neighbour to its right or below."""
    tiled = np.asarray(store["tiled"][...], bool)
    for i, j in zip(*np.nonzero(~tiled), strict=True):
        if j + 1 < tiled.shape[1] and tiled[i, j + 1]:
            return int(i), int(j)
    raise AssertionError("no tissue edge between chunks")


def test_a_patch_straddling_the_tissue_edge_sees_white_glass(tmp_path, fine_workflow):
    store = tile_slide(real(CMU_SVS), tmp_path / "cmu.zarr", fine_workflow).store
    chunk = store.chunk_px
    i, j = _edge_chunk(store)
    r0, c0 = i * chunk, j * chunk + chunk // 2  # half glass, half tissue chunk
    patch = np.asarray(store["image"][:, r0 : r0 + chunk, c0 : c0 + chunk])  # (3, P, P)
    glass = patch[:, :, : chunk // 2]
    assert (glass == GLASS_RGB).all(), "untiled glass reads black"
    assert (patch[:, :, chunk // 2 :] != GLASS_RGB).any()  # the tissue chunk is real pixels
    # A refine window past the slide's edge: glass too (it was zero-padded).
    rows, cols = store.frame.working_shape
    window = read_window(store["image"], (rows - 100, cols - 100), 256)
    assert window.shape == (3, 256, 256)
    assert (window[:, 100:, :] == GLASS_RGB).all() and (window[:, :, 100:] == GLASS_RGB).all()
    # Other arrays still pad with their fill value.
    assert (read_window(store["guide"], (rows - 100, cols - 100), 256)[100:] == 0).all()


def test_a_training_patch_at_the_tissue_edge_sees_white_glass(tmp_path, fine_workflow):
    from wsiseg.train.labels import LabelledSlide

    store = tile_slide(real(CMU_SVS), tmp_path / "cmu.zarr", fine_workflow).store
    chunk = store.chunk_px
    i, j = _edge_chunk(store)
    labels = np.zeros(store.frame.working_shape, np.int8)
    rgb, _ = LabelledSlide(store, labels).read(i * chunk, j * chunk + chunk // 2, chunk)
    assert (rgb[:, : chunk // 2] == GLASS_RGB).all()


def test_a_store_of_the_old_layout_is_refused_and_rebuilt(tmp_path, fine_workflow):
    # Format 1 stored image as (H, W, 3) with black glass (issues 15.6, 18); format 2 is an
    # OME-Zarr image (3, H, W) with white glass. An old store is refused in one line, left
    # as it is, and rebuilt by tiling (the old one kept aside, as for any stale store).
    store = tile_slide(real(CMU_SVS), tmp_path / "cmu.zarr", fine_workflow).store
    root = store.path / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["wsiseg"]["format"] = 1
    root.write_text(json.dumps(meta))
    before = {p: p.read_bytes() for p in store.path.rglob("zarr.json")}
    for mode in ("r", "r+"):
        with pytest.raises(StoreError, match=r"cmu\.zarr: store format 1 is not the format 2 "
                           r"of wsiseg .*; rebuild it with `wsiseg tile` \(or --force\)$"):
            SlideStore.open(store.path, mode=mode)
    assert {p: p.read_bytes() for p in store.path.rglob("zarr.json")} == before
    rebuilt = tile_slide(CMU_SVS, store.path, fine_workflow)
    assert rebuilt.chunks_written == rebuilt.chunks_total > 0
    assert rebuilt.store.attrs["format"] == 2 and rebuilt.store["image"].shape[0] == 3
    assert len(list(tmp_path.glob("cmu.zarr.stale-*"))) == 1


# -- no import cycle -----------------------------------------------------------------------------
def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Modules imported at module level, and inside functions."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names}
        else:
            continue
        (top if node.col_offset == 0 else inner).update(names)
    return top, inner


def test_outputs_renders_and_rounds_owns_the_record_without_a_cycle():
    pkg = REPO / "pipeline" / "wsiseg"
    out_top, out_inner = _imports(pkg / "outputs.py")
    rounds_top, rounds_inner = _imports(pkg / "rounds.py")
    assert not any(m.startswith("wsiseg.rounds") for m in out_top | out_inner)
    assert not any(m.startswith("wsiseg") for m in rounds_inner), "function-level imports"
    assert "wsiseg.outputs" in rounds_top
    code = "import sys, wsiseg.outputs; print('wsiseg.rounds' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(pkg.parent)), check=True)
    assert done.stdout.strip() == "False"


def test_a_store_object_reads_what_another_one_wrote_since(tmp_path, fine_workflow):
    """A store object keeps its arrays' handles open, never their pixels: what another
    process (here: another store object) writes afterwards is what it reads."""
    path = tmp_path / "cmu.zarr"
    first = tile_slide(real(CMU_SVS), path, fine_workflow).store
    chunk = first.chunk_px
    assert not np.asarray(first["refined"][:chunk, :chunk]).any()
    other = SlideStore.open(path)
    other["refined"][:chunk, :chunk] = 200
    assert (np.asarray(first["refined"][:chunk, :chunk]) == 200).all()
    assert first["refined"] is first.array("refined")  # one handle per store object


def test_thumbnail_png_holds_the_drawn_pixels_exactly(tmp_path, small_workflow):
    """The run's `<slide>.png` (encoded with OpenCV since the encoder moved off Pillow for
    speed) decodes to exactly the thumbnail with the contours drawn, on the real SVS."""
    from PIL import Image

    from wsiseg.contours.draw import draw_contours
    from wsiseg.outputs import THUMBNAIL_PX, png_bytes, round_contours, thumbnail_image

    out = tmp_path / "out"
    store = run_store(real(CMU_SVS), out, SLIDE_ID, small_workflow, blobs)
    polygons, _ = round_contours(store)
    assert polygons  # the blobs give contours to draw
    thumb = thumbnail_image(store)
    step = max(1, int(np.ceil(max(store["image"].shape[1:]) / THUMBNAIL_PX)))
    expected = draw_contours(thumb, polygons, scale=1.0 / step,
                             color=tuple(store.workflow.contours.color))
    with Image.open(out / f"{SLIDE_ID}.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), expected)
    # Odd shapes and strided views encode losslessly too.
    rng = np.random.default_rng(0)
    for image in (rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
                  rng.integers(0, 256, (37, 91, 3), dtype=np.uint8)[::2, ::3]):
        (tmp_path / "x.png").write_bytes(png_bytes(image))
        with Image.open(tmp_path / "x.png") as im:
            assert np.array_equal(np.asarray(im), image)
    # Anything but (h, w, 3) uint8 is refused, not mirrored (2-D) or narrowed (float).
    for bad in (np.zeros((4, 5), np.uint8), np.zeros((4, 5, 4), np.uint8),
                np.zeros((4, 5, 3), np.float32), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(ValueError, match="expected a non-empty"):
            png_bytes(bad)


def test_attributes_are_written_as_zarr_writes_them(tmp_path, fine_workflow):
    """``update_attrs`` writes the group's ``zarr.json`` itself (zarr's own write is
    O(history) in Python: 46 ms a round with 300 rounds): the document zarr writes, read
    back by zarr and by another store object; a store opened read-only is still refused."""
    import zarr

    path = tmp_path / "cmu.zarr"
    store = tile_slide(real(CMU_SVS), path, fine_workflow).store
    rounds = [{"round": k, "kind": "refine", "regions": [[0, k, 384, 384]], "tumor_mm2": 0.1 * k,
               "note": "ünïcode"} for k in range(40)]
    store.update_attrs(rounds=rounds, measurements={"tumor_mm2": 1.5, "missing": float("nan")})
    ours = json.loads((path / "zarr.json").read_bytes())
    assert store.attrs["rounds"] == rounds  # in memory, as written
    again = SlideStore.open(path)

    def same(a, b) -> bool:  # NaN is not equal to itself: compared as written
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    assert same(again.attrs, store.attrs) and "ome" in zarr.open_group(path).attrs
    zarr.open_group(path).attrs["wsiseg"] = again.attrs  # zarr's own write of the same
    theirs = json.loads((path / "zarr.json").read_bytes())
    assert same(ours, theirs)
    read_only = SlideStore.open(path, mode="r")
    with pytest.raises(Exception, match="read-only|read only"):
        read_only.update_attrs(rounds=[])
    assert SlideStore.open(path).attrs["rounds"] == rounds


def test_a_file_shared_with_its_twin_is_written_or_linked_once(tmp_path, monkeypatch):
    """``atomic_write_or_link``: a hard link when the twin holds the bytes (again: nothing
    done, no temporary left), a file of its own when it does not; a twin index that is
    empty or damaged is not "the same arrays" (it is written anew, never an error)."""
    from wsiseg.atomic import atomic_write_or_link
    from wsiseg.round_index import _holds_arrays

    twin, path = tmp_path / "r1.geojson", tmp_path / "r2.geojson"
    twin.write_bytes(b"contours")
    os.chmod(twin, 0o2640)  # setgid: a chmod by a user outside the group would drop it
    chmods = []
    real_chmod = os.chmod
    monkeypatch.setattr(os, "chmod", lambda *a, **k: chmods.append(a) or real_chmod(*a, **k))
    for _ in range(2):
        assert atomic_write_or_link(path, b"contours", twin)
        assert os.path.samefile(path, twin)
        assert not temporaries_of(path)
    assert chmods == [] and stat.S_IMODE(twin.stat().st_mode) == 0o2640  # not touched
    assert not atomic_write_or_link(path, b"other contours", twin)
    assert path.read_bytes() == b"other contours" and twin.read_bytes() == b"contours"
    arrays = {"ids": np.asarray(["a"]), "offsets": np.asarray([0, 5])}
    index = tmp_path / "r1.index.npz"
    np.savez(index, **arrays)
    assert _holds_arrays(index, arrays)
    assert not _holds_arrays(index, {**arrays, "offsets": np.asarray([0, 6])})
    for damaged in (b"", index.read_bytes()[:40]):
        index.write_bytes(damaged)
        assert not _holds_arrays(index, arrays)
