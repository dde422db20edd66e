"""Training: bad input is refused before any training, short runs learn and write a card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiseg.config import load_workflow
from wsiseg.errors import WsisegError

from conftest import CAMELYON, real

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_wf():
    return load_workflow("demo")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small generated slides with truth GeoJSON (4.0 µm/px → 512×384 working px)."""
    from wsiseg.synth import synthesize_cohort

    return synthesize_cohort(tmp_path_factory.mktemp("train-synth"), 3, (4096, 3072), seed=3)


@pytest.fixture(scope="module")
def guidenet_run(cohort, tmp_path_factory, demo_wf):
    from wsiseg.train import train_guidenet

    out = tmp_path_factory.mktemp("guide") / "guidenet.safetensors"
    result = train_guidenet(
        slides=[s.slide_path for s in cohort],
        annotations=[s.truth_geojson_path for s in cohort],
        out=out, workflow=demo_wf, epochs=3, steps_per_epoch=12, batch_size=4, seed=0,
        device="cpu", cache_dir=out.parent / "cache", progress=False, val_patches=8,
    )
    return result


def test_guidenet_training_lowers_the_loss_and_writes_a_loadable_card(guidenet_run, demo_wf):
    from wsiseg.nets import load_weights

    result = guidenet_run
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.epochs_run == 3 and result.steps == 36
    assert 0.0 <= result.best_val_iou <= 1.0
    assert result.best_val_iou == max(h["val_iou"] for h in result.history)
    model, card = load_weights(result.weights, role="guidenet", workflow=demo_wf)
    assert card.role == "guidenet" and card.in_channels == 3
    assert card.patch_px == demo_wf.guidenet.patch_px and card.working_mpp == demo_wf.working_mpp
    assert card.metrics["val_iou"] == pytest.approx(result.best_val_iou, abs=1e-4)
    text = json.dumps(card.provenance)
    assert "synth-000" in text  # the card says what it was trained on
    with torch.no_grad():
        y = model(torch.zeros(1, 3, card.patch_px, card.patch_px))
    assert y.shape == (1, 1, card.patch_px, card.patch_px)


def test_training_resumes_from_its_checkpoint(guidenet_run, cohort, demo_wf, tmp_path):
    from wsiseg.train import train_guidenet
    from wsiseg.train.loop import checkpoint_path

    out = tmp_path / "g.safetensors"
    kwargs = dict(
        slides=[s.slide_path for s in cohort], annotations=[s.truth_geojson_path for s in cohort],
        out=out, workflow=demo_wf, epochs=2, steps_per_epoch=4, batch_size=2, seed=1,
        device="cpu", cache_dir=guidenet_run.weights.parent / "cache", progress=False,
        val_patches=4,
    )
    first = train_guidenet(**kwargs, max_steps=5)  # "interrupted" after 5 of 8 steps
    assert first.stopped == "max_steps" and first.steps == 5
    assert checkpoint_path(out).exists()
    second = train_guidenet(**kwargs)
    assert second.resumed_from_step == 5 and second.steps == 8 and second.epochs_run == 2
    # The first run's validations are kept; the second adds the end of epoch 2.
    assert second.history[: len(first.history)] == first.history
    assert second.history[-1]["epoch"] == 2 and second.history[-1]["step"] == 8


def test_refinenet_training_writes_a_six_channel_card(guidenet_run, cohort, demo_wf, tmp_path):
    from wsiseg.nets import load_weights
    from wsiseg.train import train_refinenet

    result = train_refinenet(
        guidenet=guidenet_run.weights, slides=[s.slide_path for s in cohort],
        annotations=[s.truth_geojson_path for s in cohort], out=tmp_path / "r.safetensors",
        workflow=demo_wf, epochs=2, steps_per_epoch=4, batch_size=2, seed=0, device="cpu",
        cache_dir=guidenet_run.weights.parent / "cache", progress=False, val_patches=4,
    )
    assert result.steps == 8 and all(np.isfinite(h["train_loss"]) for h in result.history)
    _, card = load_weights(result.weights, role="refinenet", workflow=demo_wf)
    assert card.in_channels == 6 and card.patch_px == demo_wf.refinenet.window_px
    assert card.scribble_encoding  # the encoding shared with `wsiseg refine` is recorded


def test_patch_pairs_from_the_real_camelyon_folder(tmp_path, demo_wf):
    from wsiseg.nets import load_weights
    from wsiseg.train import train_guidenet
    from wsiseg.train.inputs import patch_pairs_from_folder

    images, masks = patch_pairs_from_folder(real(CAMELYON))
    assert len(images) == len(masks) > 1
    pairs = zip(images, masks, strict=True)
    assert all(i.shape[:2] == m.shape and m.dtype == bool for i, m in pairs)
    assert any(m.any() for m in masks) and any((~m).any() for m in masks)
    result = train_guidenet(
        patch_folders=[CAMELYON], out=tmp_path / "c.safetensors", workflow=demo_wf, epochs=1,
        steps_per_epoch=3, batch_size=2, device="cpu", progress=False, val_patches=2,
        cache_dir=tmp_path / "cache",
    )
    _, card = load_weights(result.weights, role="guidenet", workflow=demo_wf)
    assert "camelyon" in json.dumps(card.provenance)


# -- bad input: a clear error before any training ---------------------------------------------
def _train(tmp_path: Path, demo_wf, **kwargs):
    from wsiseg.train import train_guidenet

    return train_guidenet(
        out=tmp_path / "w.safetensors", workflow=demo_wf, epochs=1, steps_per_epoch=1,
        device="cpu", progress=False, cache_dir=tmp_path / "cache", **kwargs
    )


def test_an_empty_training_set_is_refused(tmp_path, demo_wf):
    with pytest.raises(WsisegError, match="no training data"):
        _train(tmp_path, demo_wf)


def test_mismatched_slide_and_annotation_names(cohort, tmp_path, demo_wf):
    other = tmp_path / "unrelated.geojson"
    shutil.copy(cohort[1].truth_geojson_path, other)
    with pytest.raises(WsisegError, match="unrelated.geojson|synth-000") as err:
        _train(tmp_path, demo_wf, slides=[cohort[0].slide_path], annotations=[other])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "w.safetensors").exists()


def test_annotations_off_the_slide(cohort, tmp_path, demo_wf):
    doc = json.loads(cohort[0].truth_geojson_path.read_text())
    for feature in doc["features"]:
        feature["geometry"] = {
            "type": "Polygon",
            "coordinates": [[[1e6, 1e6], [1e6 + 500, 1e6], [1e6 + 500, 1e6 + 500], [1e6, 1e6]]],
        }
    bad = tmp_path / "synth-000.geojson"
    bad.write_text(json.dumps(doc))
    with pytest.raises(WsisegError, match="synth-000.geojson") as err:
        _train(tmp_path, demo_wf, slides=[cohort[0].slide_path], annotations=[bad])
    assert "overlap" in str(err.value) or "outside" in str(err.value)


def test_a_slide_without_tumor_annotations(cohort, tmp_path, demo_wf):
    doc = json.loads(cohort[0].truth_geojson_path.read_text())
    for feature in doc["features"]:
        feature["properties"]["classification"] = {"name": "Stroma"}
    bad = tmp_path / "synth-000.geojson"
    bad.write_text(json.dumps(doc))
    with pytest.raises(WsisegError, match="synth-000.geojson.*[Tt]umor|[Tt]umor.*synth-000"):
        _train(tmp_path, demo_wf, slides=[cohort[0].slide_path], annotations=[bad])


def test_a_mask_of_the_wrong_shape(cohort, tmp_path, demo_wf):
    from PIL import Image

    bad = tmp_path / "synth-000_mask.png"
    Image.fromarray(np.full((100, 400), 255, np.uint8)).save(bad)  # 4:1, slide is 4:3
    with pytest.raises(WsisegError, match="synth-000_mask.png"):
        _train(tmp_path, demo_wf, slides=[cohort[0].slide_path], annotations=[bad])


def test_a_patch_folder_with_a_mask_of_the_wrong_size(tmp_path, demo_wf):
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / "p" / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "p/images/a.png")
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "p/masks/a.png")
    with pytest.raises(WsisegError, match="a.png: mask is 64 × 32 px"):
        _train(tmp_path, demo_wf, patch_folders=[tmp_path / "p"])


def test_weights_are_not_overwritten_by_a_failed_run(cohort, tmp_path, demo_wf):
    (tmp_path / "w.safetensors").write_bytes(b"precious")
    with pytest.raises(WsisegError):
        _train(tmp_path, demo_wf, slides=[cohort[0].slide_path], annotations=[tmp_path / "nope"])
    assert (tmp_path / "w.safetensors").read_bytes() == b"precious"


def test_the_train_command_on_patch_pairs(tmp_path, capsys):
    from wsiseg.cli import main

    out = tmp_path / "w.safetensors"
    argv = ["train", "guidenet", "--patch-folder", str(real(CAMELYON)), "--out", str(out),
            "--workflow", "demo", "--epochs", "1", "--steps-per-epoch", "2",
            "--batch-size", "2", "--device", "cpu"]
    assert main(argv) == 0
    assert "best validation IoU" in capsys.readouterr().out and out.exists()
    assert main(["train", "guidenet", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: no training data: give slides with --annotations, or --patch-folder DIR"
    )
