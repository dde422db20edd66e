"""Scribble2Label: pseudo-labels from averaged predictions, never against a scribble."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsiseg.errors import WsisegError
from wsiseg.train.pseudo import (
    pseudo_labels,
    random_walk_labels,
    scribble_labels_from_truth,
    update_average,
)

from conftest import CAMELYON, real

torch = pytest.importorskip("torch")


def blob_mask(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 12)
    return noise > np.median(noise)


def two_tone(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.where(mask[..., None], [120, 60, 160], [235, 170, 200]).astype(float)
    return np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)


def patch_folder(root: Path, n: int = 4, size: int = 96, empty_masks: bool = False) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        mask = blob_mask(size, k) & ~empty_masks
        Image.fromarray(two_tone(mask, k)).save(root / "images" / f"p{k}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"p{k}.png")
    return root


@pytest.fixture(scope="module")
def small_wf():
    """The demo workflow with 64 px GuideNet patches, so a step is cheap on a CPU."""
    from wsiseg.config import load_workflow

    wf = load_workflow("demo")
    return wf.replace(guidenet=dataclasses.replace(wf.guidenet, patch_px=64))


# -- the pieces ------------------------------------------------------------------------------
def test_pseudo_labels_never_contradict_a_scribble():
    average = np.array([[0.95, 0.05, 0.5, 0.85, 0.1]], np.float32)
    scribbles = np.array([[0, 1, -1, -1, -1]], np.int8)  # the first two disagree with it
    labels = pseudo_labels(average, scribbles, tau=0.8)
    np.testing.assert_array_equal(labels, [[-1, -1, -1, 1, 0]])
    rng = np.random.default_rng(0)
    average = rng.random((3, 32, 32)).astype(np.float32)
    scribbles = rng.integers(-1, 2, (3, 32, 32)).astype(np.int8)
    labels = pseudo_labels(average, scribbles, tau=0.8)
    assert (labels[scribbles >= 0] == -1).all()
    free = scribbles < 0
    assert ((labels == 1) == (free & (average > 0.8))).all()
    assert ((labels == 0) == (free & (average < 0.2))).all()


def test_the_average_of_predictions():
    first = update_average(None, np.full((2, 2), 0.9), alpha=0.2)
    np.testing.assert_allclose(first, 0.9)  # y_0 = f(x)
    second = update_average(first, np.zeros((2, 2)), alpha=0.2)
    np.testing.assert_allclose(second, 0.72)  # 0.2 · 0 + 0.8 · 0.9


def test_scribbles_simulated_from_truth_stay_in_their_class():
    truth = real(CAMELYON)
    mask = np.asarray(Image.open(next((truth / "masks").iterdir())).convert("L")) > 127
    labelled = np.ones(mask.shape, bool)
    labelled[:, :100] = False
    labels = scribble_labels_from_truth(mask, labelled, rng=np.random.default_rng(1))
    assert (labels == 1).any() and (labels == 0).any()
    assert mask[labels == 1].all() and not mask[labels == 0].any()
    assert (labels[:, :100] == -1).all()
    assert (labels >= 0).mean() < 0.2  # scribbles, not a full label


def test_random_walker_seed_regions_grow_the_scribbles():
    mask = blob_mask(64, 3)
    rgb = two_tone(mask)
    scribbles = np.full(mask.shape, -1, np.int8)
    tumor_core = ndimage.binary_erosion(mask, iterations=6)
    other_core = ndimage.binary_erosion(~mask, iterations=6)
    scribbles[tumor_core & (np.arange(64)[None, :] % 16 == 0)] = 1
    scribbles[other_core & (np.arange(64)[None, :] % 16 == 8)] = 0
    grown = random_walk_labels(rgb, scribbles, threshold=0.9)
    assert (grown >= 0).sum() > 5 * (scribbles >= 0).sum()
    np.testing.assert_array_equal(grown[scribbles >= 0], scribbles[scribbles >= 0])
    assert (grown[grown >= 0] == mask[grown >= 0]).mean() > 0.9
    one_class = np.where(scribbles == 1, 1, -1).astype(np.int8)
    np.testing.assert_array_equal(random_walk_labels(rgb, one_class), one_class)


# -- a short run -----------------------------------------------------------------------------
def test_a_short_run_grows_pseudo_labels_and_writes_a_scribbles_only_card(tmp_path, small_wf):
    from wsiseg.nets import load_weights
    from wsiseg.train.scribble2label import train_guidenet_scribbles_only

    folder = patch_folder(tmp_path / "patches")
    out = tmp_path / "s2l.safetensors"
    threads = torch.get_num_threads()
    try:  # one thread: a small network on a shared CPU is much faster without thread sync
        result = train_guidenet_scribbles_only(
            patch_folders=[folder], out=out, workflow=small_wf, epochs=3, steps_per_epoch=4,
            batch_size=4, lr=3e-3, gamma=1, warmup_epochs=1, alpha=0.5, pool_patches=12,
            val_patches=4, device="cpu", progress=False, seed=0, threads=1,
        )
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 12 and len(result.history) == 3
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    pseudo = result.pseudo
    assert [p["epoch"] for p in pseudo] == [1, 2] and [p["averaged"] for p in pseudo] == [1, 2]
    assert pseudo[-1]["fraction"] > pseudo[0]["fraction"]  # the pseudo-labels grow
    assert pseudo[-1]["fraction"] > 0.1
    assert all(p["contradictions"] == 0 for p in pseudo)  # never against a scribble
    assert pseudo[-1]["accuracy"] > 0.8  # and mostly right (the truth is known here)
    assert result.history[-1]["pseudo_fraction"] == pseudo[-1]["fraction"]

    model, card = load_weights(out, role="guidenet", workflow=small_wf)
    assert card.provenance["training"] == "scribbles-only"
    hyper = card.provenance["hyperparameters"]
    assert hyper["tau"] == 0.8 and hyper["alpha"] == 0.5 and hyper["gamma"] == 1
    assert hyper["lambda"] == 0.5 and hyper["random_walk_seeds"] is None
    assert "simulated" in json.dumps(card.provenance["training_data"])
    assert card.metrics["val_iou_on"] == "truth"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)


# -- bad input -------------------------------------------------------------------------------
def _train(tmp_path: Path, wf, **kwargs):
    from wsiseg.train.scribble2label import train_guidenet_scribbles_only

    return train_guidenet_scribbles_only(
        out=tmp_path / "w.safetensors", workflow=wf, epochs=1, steps_per_epoch=1,
        device="cpu", progress=False, **kwargs,
    )


def test_bad_input_is_refused_before_training(tmp_path, small_wf):
    with pytest.raises(WsisegError, match="no training data"):
        _train(tmp_path, small_wf)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(WsisegError, match="no image/mask pairs") as e:
        _train(tmp_path, small_wf, patch_folders=[tmp_path / "empty"])
    assert "\n" not in str(e.value)
    negative = patch_folder(tmp_path / "negative", n=2, empty_masks=True)
    with pytest.raises(WsisegError, match="no tumor scribbles in the training set"):
        _train(tmp_path, small_wf, patch_folders=[negative], val_fraction=0.0)
    with pytest.raises(WsisegError, match="--tau must lie in"):
        _train(tmp_path, small_wf, patch_folders=[negative], tau=0.4)
    with pytest.raises(WsisegError, match="either their scribble exports or their ground truth"):
        _train(tmp_path, small_wf, slides=[tmp_path / "s.svs"])
    assert not (tmp_path / "w.safetensors").exists()


def test_train_guidenet_scribbles_only_cli(tmp_path, capsys):
    from wsiseg.cli import main
    from wsiseg.nets import load_weights

    folder = patch_folder(tmp_path / "patches", n=3, size=64)
    out = tmp_path / "s2l.safetensors"
    argv = ["train", "guidenet", "--scribbles-only", "--patch-folder", str(folder),
            "--out", str(out), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
            "--workflow", "demo", "--device", "cpu", "--gamma", "1", "--warmup-epochs", "1"]
    assert main(argv) == 0
    assert "best validation IoU" in capsys.readouterr().out
    _, card = load_weights(out, role="guidenet")
    assert card.provenance["training"] == "scribbles-only"
    assert card.provenance["hyperparameters"]["gamma"] == 1
    assert main(argv + ["--tau", "0.3"]) == 1
    assert "--tau must lie in" in capsys.readouterr().err


def test_simulated_slide_scribbles_lie_on_tissue_and_in_their_class(tmp_path, synth_slides):
    from wsiseg.config import load_workflow
    from wsiseg.train.scribbled import items_from_truth, tissue_at

    slide = synth_slides[0]
    (item,) = items_from_truth([slide.slide_path], [slide.truth_geojson_path],
                              tmp_path / "cache", load_workflow("demo"), None, 0, False)
    labels = np.asarray(item.scribbles.label[...])
    truth = np.asarray(item.truth.label[...])
    tissue = tissue_at(item.scribbles.store, labels.shape)
    assert (labels == 1).any() and (labels == 0).any()
    assert not ((labels >= 0) & ~tissue).any()  # no stroke on the glass
    assert np.all(truth[labels == 1] == 1) and np.all(truth[labels == 0] == 0)
    assert (truth >= 0)[~tissue].any()  # the glass is labelled, yet not scribbled
