"""Scribble simulators: where strokes may lie, signs, size cap, determinism, real masks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk
from skimage.transform import resize

from wsiseg.errors import WsisegError
from wsiseg.scribbles import human, preview
from wsiseg.scribbles._masks import inner_distance
from wsiseg.scribbles.deepscribble import deepscribble_scribbles, limit_scribble_size
from wsiseg.scribbles.human import human_scribbles
from wsiseg.scribbles.preview import preview_png
from wsiseg.scribbles.simulate import correction_scribble, simulate_scribbles

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CAMELYON_MASKS = SHARED / "data" / "real" / "patches" / "he_tumor_masks" / "camelyon" / "masks"
REAL_MASK_NAMES = ["10072.jpg", "10676.jpg", "10698.jpg"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _shapes() -> dict[str, np.ndarray]:
    """Synthetic labels: convex, ring, concave, thin, several components, touching the edge."""
    shapes = {}
    blob = np.zeros((160, 160), dtype=bool)
    blob[20:140, 30:130] = True
    shapes["rectangle"] = blob
    ring = np.zeros((160, 160), dtype=bool)
    ring[20:141, 20:141] = disk(60).astype(bool) & ~np.pad(disk(45), 15).astype(bool)
    shapes["ring"] = ring
    ell = np.zeros((160, 160), dtype=bool)
    ell[10:150, 10:40] = True
    ell[120:150, 10:150] = True
    shapes["L"] = ell
    thin = np.zeros((160, 160), dtype=bool)
    thin[80, 10:150] = True
    thin[np.arange(20, 140), np.arange(20, 140)] = True
    shapes["thin"] = thin
    many = np.zeros((160, 160), dtype=bool)
    many[5:40, 5:60] = True
    many[70:150, 90:155] = True
    many[100:104, 10:14] = True  # 16 px: too small to scribble
    shapes["many"] = many
    shapes["full"] = np.ones((96, 128), dtype=bool)
    return shapes


def _real_masks(size: int = 256) -> list[np.ndarray]:
    if not CAMELYON_MASKS.is_dir():
        pytest.skip(f"real Camelyon masks missing: {CAMELYON_MASKS}")
    masks = []
    for name in REAL_MASK_NAMES:
        grey = np.asarray(Image.open(CAMELYON_MASKS / name).convert("L"))
        masks.append(resize(grey > 127, (size, size), order=0, anti_aliasing=False).astype(bool))
    return masks


def _shifted_prediction(truth: np.ndarray) -> np.ndarray:
    """A plausible wrong prediction: grown, shifted, with a spurious blob and a hole."""
    pred = np.roll(ndimage.binary_dilation(truth, iterations=4), (9, -6), axis=(0, 1))
    h, w = truth.shape
    pred[h // 8 : h // 4, w // 8 : w // 4] = True
    pred[h // 2 : h // 2 + h // 10, w // 2 : w // 2 + w // 10] = False
    return pred


def _within(mask: np.ndarray, radius: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, structure=disk(radius)) if radius else mask


# ---------------------------------------------------------------------------------- human


@pytest.mark.parametrize("name", list(_shapes()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_human_strokes_stay_within_brush_radius_of_label(name: str, seed: int) -> None:
    label = _shapes()[name]
    for radius in (2, 3):
        strokes = human_scribbles(label, rng=_rng(seed), radius_px=radius)
        assert strokes.dtype == bool and strokes.shape == label.shape
        assert strokes.any()
        assert not (strokes & ~_within(label, radius)).any()


@pytest.mark.parametrize("name", list(_shapes()))
def test_human_centre_lines_never_leave_label(name: str) -> None:
    label = _shapes()[name]
    for seed in range(4):
        centre = human_scribbles(label, rng=_rng(seed), radius_px=0)
        assert centre.any()
        assert not (centre & ~label).any()


def test_human_scribbles_every_sizeable_component_and_skips_specks() -> None:
    label = _shapes()["many"]
    components, n = ndimage.label(label)
    sizes = np.bincount(components.ravel())[1:]
    for seed in range(3):
        # Radius 2: components under the brush's square, 5 × 5 = 25 px, are skipped.
        strokes = human_scribbles(label, rng=_rng(seed), radius_px=2)
        hit = set(np.unique(components[strokes]).tolist()) - {0}
        assert hit == {k + 1 for k in range(n) if sizes[k] >= 25}


def test_human_large_component_gets_a_stroke_not_a_dot() -> None:
    label = _shapes()["rectangle"]
    for seed in range(5):
        centre = human_scribbles(label, rng=_rng(seed), radius_px=0)
        rows, cols = np.nonzero(centre)
        assert max(np.ptp(rows), np.ptp(cols)) >= 16  # at least one point spacing long


def test_human_empty_and_tiny_labels_give_nothing() -> None:
    assert not human_scribbles(np.zeros((64, 64), bool), rng=_rng()).any()
    speck = np.zeros((64, 64), bool)
    speck[30:33, 30:33] = True
    assert not human_scribbles(speck, rng=_rng()).any()


def test_human_deterministic_per_seed() -> None:
    label = _shapes()["L"] | _shapes()["many"]
    a = human_scribbles(label, rng=_rng(7))
    b = human_scribbles(label, rng=_rng(7))
    c = human_scribbles(label, rng=_rng(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_sampled_points_keep_minimum_spacing_and_lie_inside() -> None:
    label = _shapes()["rectangle"] | _shapes()["L"]
    distance = inner_distance(label)
    density = distance * human._ridge(label, 4)
    for seed in range(5):
        points = human._sample_points(distance, density, rng=_rng(seed), spacing_px=16, tile_px=32)
        assert len(points) >= 3
        assert label[points[:, 0].astype(int), points[:, 1].astype(int)].all()
        gaps = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
        assert gaps[np.triu_indices(len(points), k=1)].min() > 16


def test_edge_drop_keeps_every_point_connected_and_paths_cover_edges() -> None:
    rng = _rng(11)
    points = rng.uniform(0, 100, size=(20, 2))
    edges = human._spanning_edges(points, np.ones((101, 101), bool), 3.0)
    assert len(edges) == 19  # a spanning tree
    dropped_counts = set()
    for _ in range(30):
        kept = human._drop_edges(edges, 20, rng=rng, prob=1.0)
        dropped_counts.add(len(edges) - len(kept))
        assert (np.bincount(kept.ravel(), minlength=20) >= 1).all()
        paths = human._longest_paths(kept, 20)
        covered = sorted(
            tuple(sorted(p)) for path in paths for p in zip(path[:-1], path[1:], strict=True)
        )
        assert covered == sorted(tuple(sorted(e)) for e in kept.tolist())
        assert [len(p) for p in paths] == sorted((len(p) for p in paths), reverse=True)
    assert dropped_counts <= {1, 2, 3} and len(dropped_counts) >= 2
    assert len(human._drop_edges(edges, 20, rng=rng, prob=0.0)) == 19


def test_spanning_tree_avoids_crossing_outside_the_label() -> None:
    # Two arms of a U: the direct hop across the gap costs 3× outside; the tree goes round.
    label = np.zeros((100, 100), bool)
    label[10:90, 10:25] = True
    label[10:90, 75:90] = True
    label[75:90, 10:90] = True
    points = np.array([[15.0, 17.0], [15.0, 82.0], [82.0, 17.0], [82.0, 82.0]])
    edges = {tuple(sorted(e)) for e in human._spanning_edges(points, label, 3.0).tolist()}
    assert (0, 1) not in edges
    assert edges == {(0, 2), (1, 3), (2, 3)}


# ---------------------------------------------------------------------------- DeepScribble


def test_deepscribble_scribbles_lie_in_their_error_regions() -> None:
    for truth in [_shapes()["rectangle"], _shapes()["L"] | _shapes()["many"]]:
        pred = _shifted_prediction(truth)
        for seed in range(3):
            out = deepscribble_scribbles(truth, pred, rng=_rng(seed))
            assert out.dtype == np.int8
            assert (out[out != 0] ** 2 == 1).all()
            assert not ((out > 0) & ~(truth & ~pred)).any()
            assert not ((out < 0) & ~(pred & ~truth)).any()
            assert (out > 0).any() and (out < 0).any()


def test_deepscribble_marks_the_core_of_each_region_and_skips_specks() -> None:
    truth = np.zeros((128, 128), bool)
    truth[10:60, 10:120] = True  # missed entirely: one FN region
    truth[100:103, 100:103] = True  # 9-px FN speck
    pred = np.zeros_like(truth)
    pred[80:120, 10:50] = True  # FP region
    out = deepscribble_scribbles(truth, pred, rng=_rng(), threshold_jitter=0.0)
    depth_fn = inner_distance(truth & ~pred)
    depth_fp = inner_distance(pred & ~truth)
    assert (depth_fn[out > 0] > 0.5 * depth_fn.max()).all()
    assert (depth_fp[out < 0] > 0.5 * depth_fp.max()).all()
    assert (out[10:60, 10:120] > 0).any() and (out[80:120, 10:50] < 0).any()
    assert not out[98:106, 98:106].any()


def test_deepscribble_nothing_without_errors_and_size_cap() -> None:
    truth = _shapes()["L"]
    assert not deepscribble_scribbles(truth, truth, rng=_rng()).any()
    out = deepscribble_scribbles(truth, _shifted_prediction(truth), rng=_rng(), max_pixels=20)
    assert 0 < np.count_nonzero(out) <= 20


def test_deepscribble_deterministic_per_seed() -> None:
    truth = _shapes()["ring"] | _shapes()["many"]
    pred = _shifted_prediction(truth)
    a = deepscribble_scribbles(truth, pred, rng=_rng(1))
    np.testing.assert_array_equal(a, deepscribble_scribbles(truth, pred, rng=_rng(1)))
    assert (a != deepscribble_scribbles(truth, pred, rng=_rng(2))).any()


# ------------------------------------------------------------------------------ correction


def test_correction_empty_below_one_percent_error() -> None:
    truth = np.zeros((200, 200), bool)
    truth[50:150, 50:150] = True
    pred = truth.copy()
    pred[50:55, 50:120] = False  # 350 px = 0.875 % of the patch
    assert not correction_scribble(truth, pred, rng=_rng()).any()
    pred[50:60, 50:120] = False  # 700 px = 1.75 %
    assert correction_scribble(truth, pred, rng=_rng()).any()


@pytest.mark.parametrize("seed", range(4))
def test_correction_takes_the_majority_sign_and_stays_in_its_class(seed: int) -> None:
    truth = np.zeros((200, 200), bool)
    truth[40:160, 40:160] = True
    shrunk = np.zeros_like(truth)
    shrunk[70:130, 70:130] = True  # FN only
    grown = np.zeros_like(truth)
    grown[20:180, 20:180] = True  # FP only
    fn_out = correction_scribble(truth, shrunk, rng=_rng(seed))
    assert fn_out.dtype == np.int8
    assert set(np.unique(fn_out)) == {0, 1}
    assert not ((fn_out > 0) & ~truth).any()
    fp_out = correction_scribble(truth, grown, rng=_rng(seed))
    assert set(np.unique(fp_out)) == {-1, 0}
    assert not ((fp_out < 0) & truth).any()
    # Mixed: more FP than FN → negative.
    mixed = grown.copy()
    mixed[90:100, 90:100] = False
    assert set(np.unique(correction_scribble(truth, mixed, rng=_rng(seed)))) == {-1, 0}


def test_correction_lands_near_the_largest_error_region() -> None:
    truth = np.zeros((256, 256), bool)
    truth[20:236, 20:236] = True
    pred = truth.copy()
    pred[30:90, 30:90] = False  # large FN region
    pred[200:210, 200:210] = False  # small FN region
    out = correction_scribble(truth, pred, rng=_rng(), radius_px=2)
    region = truth & ~pred
    region[200:210, 200:210] = False
    # Dilation by at most the region's own radius (√(3600/π) ≈ 34 px) plus the brush.
    reach = ndimage.distance_transform_edt(~region) <= 34 + 2
    assert (out > 0).any() and not ((out != 0) & ~reach).any()


def test_correction_accepts_probabilities_and_is_deterministic() -> None:
    truth = _shapes()["L"]
    prob = np.where(_shifted_prediction(truth), 0.8, 0.2)
    a = correction_scribble(truth, prob, rng=_rng(4))
    np.testing.assert_array_equal(a, correction_scribble(truth, prob > 0.5, rng=_rng(4)))
    assert a.any()
    assert any((a != correction_scribble(truth, prob, rng=_rng(s))).any() for s in (5, 6))


# -------------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("mix", [0.0, 1.0, 0.5])
def test_simulate_never_contradicts_truth(mix: float) -> None:
    truth = _shapes()["L"] | _shapes()["many"]
    pred = _shifted_prediction(truth)
    for seed in range(4):
        out = simulate_scribbles(truth, pred, rng=_rng(seed), mix=mix, confirm_prob=1.0)
        assert out.dtype == np.int8 and out.any()
        assert not ((out > 0) & ~truth).any()
        assert not ((out < 0) & truth).any()


def test_simulate_branches_differ_in_kind() -> None:
    truth = _shapes()["rectangle"]
    pred = _shifted_prediction(truth)
    auto = simulate_scribbles(truth, pred, rng=_rng(), mix=1.0)
    human = simulate_scribbles(truth, pred, rng=_rng(), mix=0.0, confirm_prob=0.0)
    errors = truth ^ pred
    assert not ((auto != 0) & ~errors).any()  # DeepScribble: skeletons inside the errors
    assert np.count_nonzero(human) > np.count_nonzero(auto)  # brush strokes are wider


@pytest.mark.parametrize("fraction", [0.0005, 0.002])
def test_simulate_respects_the_size_cap(fraction: float) -> None:
    truth = _shapes()["L"] | _shapes()["ring"]
    pred = _shifted_prediction(truth)
    cap = int(fraction * truth.size)
    for seed in range(4):
        for mix in (0.0, 1.0):
            out = simulate_scribbles(truth, pred, rng=_rng(seed), mix=mix, max_fraction=fraction)
            assert 0 < np.count_nonzero(out) <= cap


def test_simulate_deterministic_per_seed() -> None:
    truth = _shapes()["L"] | _shapes()["many"]
    pred = _shifted_prediction(truth)
    a = simulate_scribbles(truth, pred, rng=_rng(9))
    np.testing.assert_array_equal(a, simulate_scribbles(truth, pred, rng=_rng(9)))
    assert (a != simulate_scribbles(truth, pred, rng=_rng(10))).any()


# ---------------------------------------------------------------------------------- limit


def test_limit_scribble_size_keeps_a_signed_subset_under_the_cap() -> None:
    scribbles = np.zeros((100, 100), np.int8)
    scribbles[10:14, 5:95] = 1
    scribbles[50:54, 5:60] = -1
    scribbles[80:83, 20:30] = 1
    for cap in (0, 7, 50, 300, 10_000):
        out = limit_scribble_size(scribbles, cap, rng=_rng(cap))
        assert out.dtype == np.int8
        assert np.count_nonzero(out) == min(cap, np.count_nonzero(scribbles))
        assert (out[out != 0] == scribbles[out != 0]).all()
    # A trimmed stroke stays one piece.
    out = limit_scribble_size(scribbles, 40, rng=_rng(1))
    for value in (-1, 1):
        assert ndimage.label(out == value, structure=np.ones((3, 3)))[1] <= 1
    with pytest.raises(ValueError):
        limit_scribble_size(scribbles, -1, rng=_rng())


def test_limit_scribble_size_bool_and_deterministic() -> None:
    strokes = human_scribbles(_shapes()["L"] | _shapes()["ring"], rng=_rng())
    a = limit_scribble_size(strokes, 60, rng=_rng(3))
    assert a.dtype == bool and a.sum() == 60 and not (a & ~strokes).any()
    np.testing.assert_array_equal(a, limit_scribble_size(strokes, 60, rng=_rng(3)))
    assert (a != limit_scribble_size(strokes, 60, rng=_rng(4))).any()


# ------------------------------------------------------------------------------ real masks


def test_real_camelyon_masks_satisfy_the_invariants() -> None:
    for k, truth in enumerate(_real_masks(256)):
        pred = _shifted_prediction(truth)
        for label in (truth, ~truth):
            strokes = human_scribbles(label, rng=_rng(k))
            assert strokes.any() and not (strokes & ~_within(label, 2)).any()
            centre = human_scribbles(label, rng=_rng(k), radius_px=0)
            assert centre.any() and not (centre & ~label).any()
        auto = deepscribble_scribbles(truth, pred, rng=_rng(k))
        assert not ((auto > 0) & ~(truth & ~pred)).any()
        assert not ((auto < 0) & ~(pred & ~truth)).any()
        fix = correction_scribble(truth, pred, rng=_rng(k))
        n_fp, n_fn = (pred & ~truth).sum(), (truth & ~pred).sum()
        assert set(np.unique(fix)) == {0, -1 if n_fp > n_fn else 1}
        out = simulate_scribbles(truth, pred, rng=_rng(k), mix=0.0, max_fraction=0.0005)
        assert 0 < np.count_nonzero(out) <= int(0.0005 * truth.size)
        assert not ((out > 0) & ~truth).any() and not ((out < 0) & truth).any()


def test_human_scribbles_fast_on_a_384_patch() -> None:
    truth = _real_masks(384)[0]
    human_scribbles(truth, rng=_rng())  # warm-up (imports, caches)
    times = []
    for seed in range(5):
        t0 = time.perf_counter()
        human_scribbles(truth, rng=_rng(seed))
        times.append(time.perf_counter() - t0)
    # Typically ~30 ms; the bound leaves room for a loaded shared machine.
    assert np.median(times) < 0.5


# --------------------------------------------------------------------------------- preview


def test_preview_png_draws_tumor_red_inside_and_non_tumor_green_outside(tmp_path: Path) -> None:
    if not CAMELYON_MASKS.is_dir():
        pytest.skip(f"real Camelyon masks missing: {CAMELYON_MASKS}")
    mask_path = CAMELYON_MASKS / REAL_MASK_NAMES[0]
    out = tmp_path / "sub" / "preview.png"
    preview_png(mask_path, out, seed=1)
    rgb = np.asarray(Image.open(out).convert("RGB"))
    truth = np.asarray(Image.open(mask_path).convert("L")) > 127
    assert rgb.shape[:2] == truth.shape
    red = np.all(rgb == preview._RED, axis=2)
    green = np.all(rgb == preview._GREEN, axis=2)
    assert red.any() and green.any()
    assert not (red & ~truth).any() and not (green & truth).any()
    assert [p.name for p in out.parent.iterdir()] == ["preview.png"]  # no temp file left
    again = tmp_path / "again.png"
    preview_png(mask_path, again, seed=1)
    assert again.read_bytes() == out.read_bytes()


def test_preview_png_with_prediction(tmp_path: Path) -> None:
    truth = _shapes()["L"]
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    pred = _shifted_prediction(truth)
    Image.fromarray(pred.astype(np.uint8) * 255).save(tmp_path / "pred.tif")
    preview_png(tmp_path / "mask.png", tmp_path / "p.png", prediction_path=tmp_path / "pred.tif")
    rgb = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    red = np.all(rgb == preview._RED, axis=2)
    green = np.all(rgb == preview._GREEN, axis=2)
    assert red.any() and green.any()
    assert not (red & ~truth).any() and not (green & truth).any()
    assert np.all(rgb == preview._BLUE, axis=2).any()


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_preview_png_bad_inputs_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(WsisegError, match="broken.png"):
        preview_png(bad, tmp_path / "out.png")
    with pytest.raises(WsisegError, match="missing.png"):
        preview_png(tmp_path / "missing.png", tmp_path / "out.png")
    bad_tiff = tmp_path / "broken.tif"
    bad_tiff.write_bytes(b"II*\x00garbage")
    with pytest.raises(WsisegError, match="broken.tif"):
        preview_png(bad_tiff, tmp_path / "out.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "pred.png")
    with pytest.raises(WsisegError, match="pred.png"):
        preview_png(
            tmp_path / "mask.png", tmp_path / "out.png", prediction_path=tmp_path / "pred.png"
        )
    assert not (tmp_path / "out.png").exists()
