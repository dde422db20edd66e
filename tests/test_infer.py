"""Tests for wsiseg.infer: patch grid, tissue selection, blending, banded streaming into zarr."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from wsiseg.errors import WsisegError
from wsiseg.infer import (
    WINDOW_FLOOR,
    InferStats,
    blend_window,
    infer_to_store,
    patch_origins,
    predict_patches,
    resolve_device,
    tissue_patch_mask,
)

CPU = torch.device("cpu")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


class ConstantModel(torch.nn.Module):
    """One constant logit everywhere; counts what it sees."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit
        self.calls = 0
        self.pixels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.pixels += x.shape[0] * x.shape[2] * x.shape[3]
        return torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), self.logit)


class RedModel(torch.nn.Module):
    """Per pixel: probability = red / 255, so the blended guide must equal the red channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logit(x[:, :1])


class OriginRecorder(torch.nn.Module):
    """Decodes each patch's origin from its top-left pixel (see :func:`_coordinate_image`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = torch.round(x[:, :, 0, 0] * 255).long()
        for r, g, b in corner.tolist():
            self.seen.append(((b // 16) * 256 + r, (b % 16) * 256 + g))
        return torch.zeros((x.shape[0], 1, x.shape[2], x.shape[3]))


class ConvModel(torch.nn.Module):
    """Fixed 3×3 conv stack with zero padding: translation-equivariant away from borders."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 1, 3, padding=1)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_(gain * torch.randn(conv.weight.shape, generator=gen))
                conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x - 0.5)))


class RampModel(torch.nn.Module):
    """Logit depends on the position inside the patch: not invariant under any transform."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        rows = torch.linspace(-3, 3, h).view(1, 1, h, 1)
        cols = torch.linspace(-1, 2, w).view(1, 1, 1, w)
        return (rows * 1.0 + cols * cols).expand(n, 1, h, w).contiguous()


class Recording:
    """Wraps an array and records the shape of every slice read or written."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads: list[tuple[int, ...]] = []
        self.writes: list[tuple[int, ...]] = []

    def __getitem__(self, key: Any) -> Any:
        out = np.asarray(self.array[key])
        self.reads.append(out.shape)
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        self.writes.append(np.shape(value))
        self.array[key] = value


def _chw(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (3, H, W): RGB channel first, as the slide store holds it."""
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))


def _coordinate_image(height: int, width: int) -> np.ndarray:
    """RGB (3, H, W) whose pixel encodes its own (row, col): R, G low bytes, B the high
    nibbles."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256]).astype(np.uint8)


def _run(image: Any, tissue: np.ndarray, model: torch.nn.Module, **kw: Any) -> np.ndarray:
    """infer_to_store over ``image`` (3, H, W) into a fresh (H, W) output."""
    params = dict(patch_px=32, stride_px=24, batch_size=5, band_px=64)
    params.update(kw)
    out = np.full(image.shape[1:], 77, dtype=np.uint8)  # 77: proves every pixel is written
    infer_to_store(
        image, [out], model=model, normalise=_normalise, tissue=tissue, device=CPU, **params
    )
    return out


def _zarr_store(tmp_path: Any, image: np.ndarray, chunk: int) -> zarr.Group:
    """A group laid out as a slide store: ``image`` (3, H, W) as given, empty outputs."""
    group = zarr.open_group(tmp_path / "slide.zarr", mode="w")
    height, width = image.shape[1:]
    arr = group.create_array(
        "image", shape=image.shape, chunks=(3, chunk, chunk), dtype="uint8", fill_value=255
    )
    arr[:] = image
    for name in ("guide", "refined"):
        group.create_array(
            name, shape=(height, width), chunks=(chunk, chunk), dtype="uint8", fill_value=0
        )
    return group


# --------------------------------------------------------------------------------- device


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == CPU
    with pytest.raises(WsisegError, match="expected auto, cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(WsisegError, match="CUDA is not available"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize(
    ("shape", "patch", "stride"), [((100, 77), 32, 24), ((64, 64), 32, 32), ((33, 200), 32, 7)]
)
def test_grid_covers_every_pixel(shape: tuple[int, int], patch: int, stride: int) -> None:
    origins = patch_origins(shape, patch, stride)
    assert origins.dtype == np.int64 and origins.shape[1] == 2
    covered = np.zeros(shape, dtype=int)
    for r, c in origins:
        covered[r : r + patch, c : c + patch] += 1
    assert covered.min() >= 1
    assert (origins[:, 0] + patch <= shape[0]).all() and (origins[:, 1] + patch <= shape[1]).all()
    assert shape[0] - patch in origins[:, 0] and shape[1] - patch in origins[:, 1]
    assert np.all(np.diff(origins[:, 0]) >= 0)  # row-major: bands come in order
    rows = np.unique(origins[:, 0])
    assert np.all(np.diff(rows[:-1]) == stride)  # the regular grid, then the border origin


def test_grid_of_small_image_is_one_padded_patch() -> None:
    assert patch_origins((20, 30), 32, 24).tolist() == [[0, 0]]
    assert patch_origins((20, 50), 32, 24).tolist() == [[0, 0], [0, 18]]


def test_stride_larger_than_patch_is_refused() -> None:
    with pytest.raises(WsisegError, match="stride_px"):
        patch_origins((100, 100), 32, 40)


def test_tissue_patch_mask_matches_geometric_overlap() -> None:
    rng = np.random.default_rng(1)
    shape, patch = (100, 90), 20
    tissue = rng.random((7, 11)) > 0.85  # fractional scales 100/7 and 90/11
    origins = patch_origins(shape, patch, 15)
    got = tissue_patch_mask(origins, patch, tissue, shape)
    sy, sx = Fraction(shape[0], tissue.shape[0]), Fraction(shape[1], tissue.shape[1])
    want = []
    for r, c in origins.tolist():
        hit = False
        for i, j in zip(*np.nonzero(tissue), strict=True):
            if i * sy < r + patch and (i + 1) * sy > r and j * sx < c + patch and (j + 1) * sx > c:
                hit = True
        want.append(hit)
    assert got.tolist() == want
    assert 0 < got.sum() < len(origins)


def test_blend_window() -> None:
    window = blend_window(32)
    assert window.shape == (32, 32) and window.dtype == np.float32
    assert window.min() >= WINDOW_FLOOR and window.max() <= 1
    assert window[0, 0] == pytest.approx(WINDOW_FLOOR)
    assert np.array_equal(window, window.T) and np.array_equal(window, window[::-1, ::-1])
    assert window[15, 15] > 0.99


# ------------------------------------------------------------------------------ blending


def test_constant_model_is_constant_inside_tissue_patches_and_zero_outside() -> None:
    shape, patch, stride = (150, 140), 32, 24
    tissue = np.zeros((15, 14), dtype=bool)
    tissue[2:4, 3:5] = True
    tissue[11, 12] = True
    model = ConstantModel(logit=0.7)
    out = _run(np.zeros((3, *shape), np.uint8), tissue, model, patch_px=patch, stride_px=stride)
    origins = patch_origins(shape, patch, stride)
    kept = origins[tissue_patch_mask(origins, patch, tissue, shape)]
    covered = np.zeros(shape, dtype=bool)
    for r, c in kept:
        covered[r : r + patch, c : c + patch] = True
    value = round(255 / (1 + np.exp(-0.7)))
    assert np.all(out[covered] == value)
    assert np.all(out[~covered] == 0)
    assert 0 < covered.mean() < 0.5
    assert model.pixels == len(kept) * patch * patch  # only tissue patches, each once


def test_per_pixel_model_is_reproduced_exactly() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)
    out = _run(_chw(image), np.ones((10, 10), bool), RedModel())
    assert np.array_equal(out, image[..., 0])


def test_image_smaller_than_patch() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = _run(_chw(image), np.ones((2, 3), bool), RedModel(), patch_px=32, stride_px=24,
               band_px=8)
    assert np.array_equal(out, image[..., 0])


class PatchRecorder(torch.nn.Module):
    """Keeps every normalised patch it sees; answers 0.5 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return torch.zeros_like(x[:, :1])


def test_a_patch_past_a_small_slides_edge_sees_white_glass() -> None:
    # A slide smaller than one patch: the part of the patch beyond the slide is glass (white),
    # never black (issue 15 point 6: the network never saw black edges in training).
    image = np.full((3, 20, 30), 90, dtype=np.uint8)
    model = PatchRecorder()
    _run(image, np.ones((2, 3), bool), model, patch_px=32, stride_px=24, band_px=8)
    (patch,) = [p for batch in model.seen for p in batch]
    assert torch.all(patch[:, :20, :30] == 90 / 255)
    assert torch.all(patch[:, 20:, :] == 1.0) and torch.all(patch[:, :, 30:] == 1.0)


def _reference_blend(
    image: np.ndarray, model: torch.nn.Module, patch: int, stride: int
) -> np.ndarray:
    """The blend computed naively over the whole image, one patch at a time."""
    acc = np.zeros(image.shape[:2])
    wsum = np.zeros(image.shape[:2])
    window = blend_window(patch).astype(np.float64)
    for r, c in patch_origins(image.shape[:2], patch, stride):
        x = torch.from_numpy(image[r : r + patch, c : c + patch]).permute(2, 0, 1)[None]
        with torch.no_grad():
            prob = torch.sigmoid(model(_normalise(x)))[0, 0].double().numpy()
        acc[r : r + patch, c : c + patch] += window * prob
        wsum[r : r + patch, c : c + patch] += window
    return np.round(255 * acc / wsum).astype(int)


@pytest.mark.parametrize("band_px", [48, 20])  # 20: patches span several bands
def test_conv_model_matches_naive_blend(band_px: int) -> None:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (150, 140, 3), dtype=np.uint8)
    model = ConvModel().eval()
    out = _run(_chw(image), np.ones((3, 3), bool), model, band_px=band_px).astype(int)
    want = _reference_blend(image, model, 32, 24)
    assert want.std() > 50
    assert np.abs(out - want).max() <= 1  # float32 vs float64 rounding only
    assert (out != want).mean() < 1e-3


def test_shifted_image_gives_shifted_map_without_seams() -> None:
    rng = np.random.default_rng(4)
    big = rng.integers(0, 256, (190, 170, 3), dtype=np.uint8)
    dy, dx = 5, 3  # the grid stays put, so patch and band borders cross the content
    tissue = np.ones((4, 4), bool)
    model = ConvModel(gain=0.3).eval()
    base = _run(_chw(big[10:170, 10:150]), tissue, model, stride_px=16).astype(int)
    moved = _run(_chw(big[10 + dy : 170 + dy, 10 + dx : 150 + dx]), tissue, model, stride_px=16)
    # Same content at base[y + dy, x + dx] and moved[y, x]; compare away from image borders.
    # What remains is the network's own zero padding at patch borders, faded by the window.
    margin = 4
    a = base[dy + margin : -margin, dx + margin : -margin]
    b = moved[margin : -(dy + margin), margin : -(dx + margin)].astype(int)
    assert a.std() > 20  # the map has structure, so equality is not trivial
    assert np.abs(a - b).max() <= 2
    assert np.abs(a - b).mean() < 0.2


def test_every_tissue_patch_is_computed_exactly_once() -> None:
    shape, patch, stride = (300, 280), 32, 24
    tissue = np.zeros((30, 28), bool)
    tissue[5:20, 3:9] = True
    tissue[25:, 20:] = True
    model = OriginRecorder()
    _run(_coordinate_image(*shape), tissue, model, patch_px=patch, stride_px=stride, batch_size=7)
    origins = patch_origins(shape, patch, stride)
    kept = origins[tissue_patch_mask(origins, patch, tissue, shape)]
    assert sorted(model.seen) == sorted(map(tuple, kept.tolist()))
    assert 0 < len(kept) < len(origins)


def test_no_tissue_computes_nothing() -> None:
    model = ConstantModel(logit=2.0)
    out = _run(np.zeros((3, 100, 100), np.uint8), np.zeros((10, 10), bool), model)
    assert model.calls == 0
    assert (out == 77).all()  # nothing written at all


def test_band_buffers_and_reads_do_not_grow_with_height() -> None:
    patch, band, width = 32, 64, 96
    blocks = []
    for height in (200, 700):
        image = Recording(np.zeros((3, height, width), np.uint8))
        out = Recording(np.zeros((height, width), np.uint8))
        infer_to_store(
            image, [out], model=ConstantModel(1.0), normalise=_normalise,
            tissue=np.ones((4, 4), bool), patch_px=patch, stride_px=24, batch_size=4,
            device=CPU, band_px=band,
        )
        largest = max(r * c for *_, r, c in image.reads + out.writes)
        assert largest <= (band + patch) * width
        assert sum(r for _, r, _ in image.reads) == height  # every row decoded once
        assert sum(r for r, *_ in out.writes) == height
        blocks.append(largest)
    assert blocks[0] == blocks[1]


def test_tta_with_rotation_invariant_model_is_unchanged() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)
    plain = _run(_chw(image), np.ones((5, 5), bool), RedModel())
    tta = _run(_chw(image), np.ones((5, 5), bool), RedModel(), tta=True)
    assert np.array_equal(plain, tta)


def test_tta_averages_the_dihedral_group() -> None:
    batch = np.zeros((2, 3, 16, 16), np.uint8)
    plain = predict_patches(RampModel(), _normalise, batch, CPU)
    tta = predict_patches(RampModel(), _normalise, batch, CPU, tta=True)
    assert tta.shape == (2, 16, 16) and tta.dtype == np.float32
    assert not np.allclose(plain[0], plain[0].T)
    for view in (tta[0].T, tta[0][::-1], tta[0][:, ::-1], np.rot90(tta[0])):
        np.testing.assert_allclose(tta[0], view, atol=1e-6)


def test_zarr_guide_and_refined_identical(tmp_path: Any) -> None:
    rng = np.random.default_rng(6)
    image = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    group = _zarr_store(tmp_path, _chw(image), chunk=64)
    tissue = np.zeros((20, 15), bool)
    tissue[:8] = True  # lower bands have no tissue
    counts: list[int] = []
    stats = infer_to_store(
        group["image"], [group["guide"], group["refined"]], model=RedModel(),
        normalise=_normalise, tissue=tissue, patch_px=32, stride_px=24, batch_size=8,
        device=CPU, band_px=64, progress=counts.append,
    )
    guide, refined = group["guide"][:], group["refined"][:]
    assert np.array_equal(guide, refined)
    assert np.array_equal(guide[:104], image[:104, :, 0])  # patch rows 0..72 meet tissue
    assert (guide[104:] == 0).all()
    assert isinstance(stats, InferStats) and stats.patches == sum(counts) > 0
    assert stats.total_s >= stats.forward_s > 0
    # Bands of rows without tissue patches are never written: their chunks do not exist.
    assert group["guide"].nchunks_initialized == 2 * 3


def test_output_shape_mismatch_is_refused() -> None:
    with pytest.raises(WsisegError, match="does not match"):
        infer_to_store(
            np.zeros((3, 50, 50), np.uint8), [np.zeros((50, 40), np.uint8)],
            model=ConstantModel(0.0), normalise=_normalise, tissue=np.ones((5, 5), bool),
            patch_px=32, stride_px=24, batch_size=4, device=CPU, band_px=64,
        )


def test_channel_last_image_is_refused() -> None:
    # The store holds RGB channel first (OME-Zarr); an (H, W, 3) array is the old layout.
    with pytest.raises(WsisegError, match=r"expected shape \(3, H, W\), got \(50, 40, 3\)"):
        _run(np.zeros((50, 40, 3), np.uint8), np.ones((5, 5), bool), RedModel())


def test_reader_error_reaches_the_caller() -> None:
    class Broken(Recording):
        def __getitem__(self, key: Any) -> Any:
            raise OSError("chunk 3 is corrupt")

    with pytest.raises(OSError, match="corrupt"):
        _run(Broken(np.zeros((3, 100, 100), np.uint8)), np.ones((5, 5), bool), RedModel())



def test_works_with_the_model_cards_normalisation() -> None:
    nets = pytest.importorskip("wsiseg.nets")
    card = nets.load_card("guidenet")
    mean = torch.tensor(card.normalisation["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card.normalisation["std"]).view(1, 3, 1, 1)

    class UndoNormalisation(torch.nn.Module):  # per pixel: probability = red / 255 again
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _logit((x * std + mean)[:, :1])

    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)
    out = np.zeros((120, 100), np.uint8)
    infer_to_store(
        _chw(image), [out], model=UndoNormalisation(),
        normalise=lambda t: nets.normalise_rgb(t, card), tissue=np.ones((3, 3), bool),
        patch_px=32, stride_px=24, batch_size=4, device=CPU, band_px=64,
    )
    assert np.array_equal(out, image[..., 0])


def test_dihedral_mean_moves_every_channel_with_the_image() -> None:
    from wsiseg.infer import dihedral_mean

    x = torch.rand(2, 6, 16, 16)
    # A pixel-wise function of the six channels commutes with every flip and rotation.
    def pointwise(t):
        return torch.sigmoid(t[:, 0] - t[:, 4] + t[:, 5])

    torch.testing.assert_close(dihedral_mean(pointwise, x), pointwise(x))
    # A position-dependent one is averaged over the 8 views: the result is symmetric.
    ramp = torch.linspace(0, 1, 16)

    def biased(t):
        return t[:, 3] * 0 + ramp[None, None, :]

    mean = dihedral_mean(biased, x)[0].numpy()
    for view in (mean.T, mean[::-1], mean[:, ::-1]):
        np.testing.assert_allclose(mean, view, atol=1e-6)
