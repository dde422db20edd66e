"""GuideNet / RefineNet builders, model cards and .safetensors weights."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wsiseg.config import load_workflow, workflow_from_dict
from wsiseg.errors import WsisegError
from wsiseg.nets import (
    CARD_KEY,
    ModelCard,
    build_model,
    init_weights,
    load_card,
    load_weights,
    missing_weights_error,
    normalise_rgb,
    save_weights,
    weights_hash,
)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def guidenet_file(weights_dir: Path) -> Path:
    path = weights_dir / "guidenet-seed0.safetensors"
    init_weights("guidenet", path, seed=0)
    return path


@pytest.fixture(scope="module")
def refinenet_file(weights_dir: Path) -> Path:
    path = weights_dir / "refinenet-seed0.safetensors"
    init_weights("refinenet", path, seed=0)
    return path


# ---------------------------------------------------------------------------- cards, builders


def test_card_templates_are_the_papers_setting():
    guide, refine = load_card("guidenet"), load_card("refinenet")
    assert (guide.role, guide.in_channels, guide.patch_px) == ("guidenet", 3, 256)
    assert (refine.role, refine.in_channels, refine.patch_px) == ("refinenet", 6, 384)
    for card in (guide, refine):
        assert (card.architecture, card.encoder, card.classes) == ("Unet", "efficientnet-b0", 1)
        assert card.working_mpp == 2.0 and card.threshold == 0.5
        assert card.normalisation["mean"] == pytest.approx([0.485, 0.456, 0.406])
    # RefineNet's decoder at about half smp's widths: same interactive IoU, 0.7x the time
    assert guide.decoder_channels is None and refine.decoder_channels == [128, 64, 32, 16, 16]
    assert guide.scribble_encoding == {}
    assert refine.scribble_encoding == {
        "kind": "distance", "max_distance_px": 64.0,
        "channels": ["rgb", "guide", "fg_dist", "bg_dist"],
    }


def test_card_dict_round_trip_and_key_errors():
    card = load_card("refinenet")
    assert ModelCard.from_dict(card.to_dict()) == card
    bad = card.to_dict() | {"colour": "red"}
    with pytest.raises(ValueError, match="colour: unknown key"):
        ModelCard.from_dict(bad)
    bad = card.to_dict()
    del bad["threshold"]
    with pytest.raises(ValueError, match="threshold: missing key"):
        ModelCard.from_dict(bad)
    with pytest.raises(ValueError, match="in_channels"):
        ModelCard.from_dict(card.to_dict() | {"in_channels": 0})
    with pytest.raises(ValueError, match="normalisation.std"):
        ModelCard.from_dict(card.to_dict() | {"normalisation": {"mean": [0, 0, 0], "std": [1]}})
    with pytest.raises(ValueError, match="role"):
        ModelCard.from_dict(card.to_dict() | {"role": "guide"})


def test_load_card_errors_name_the_file(tmp_path: Path):
    with pytest.raises(WsisegError, match="no such model card.*guidenet"):
        load_card("nosuchnet")
    path = tmp_path / "card.yaml"
    path.write_text("role: guidenet\nin_channels: 3\n")
    with pytest.raises(WsisegError, match=f"{path}: model card: .*missing key"):
        load_card(path)


# pydantic coerces in lax mode ("3" → 3, true → 1) and lets NaN through by default; a card
# travels as JSON, so each of these is refused in one line naming the key.
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"in_channels": True}, "in_channels: expected an integer, got True"),
        ({"patch_px": 384.0}, "patch_px: expected an integer, got 384.0"),
        ({"classes": True}, "classes: expected an integer, got True"),
        ({"classes": 2}, "classes: expected 1 (one tumor logit map), got 2"),
        ({"working_mpp": "2.0"}, "working_mpp: expected a number, got '2.0'"),
        ({"working_mpp": float("inf")}, "working_mpp: expected a finite number, got inf"),
        ({"threshold": float("nan")}, "threshold: expected a finite number, got nan"),
        ({"normalisation": {"mean": [0, 0, float("nan")], "std": [1, 1, 1]}},
         "normalisation.mean: expected a finite number, got nan"),
        ({"normalisation": {"mean": [0, 0, 0], "std": [1, 1, 0]}},
         "normalisation.std: expected a positive number, got 0"),
        ({"normalisation": {"mean": [0, 0, 0], "std": [1, 1, 1], "max": 1}},
         "normalisation.max: unknown key (expected one of mean, std)"),
        ({"scribble_encoding": {}}, "scribble_encoding: expected keys channels, kind, max_dis"),
        ({"scribble_encoding": {"kind": "distance", "max_distance_px": 64, "channels": [1]}},
         "scribble_encoding.channels: expected a non-empty string, got 1"),
        ({"scribble_encoding": {"kind": "blur", "max_distance_px": 64, "channels": ["rgb"]}},
         "scribble_encoding.kind: expected one of distance, raw, none, got 'blur'"),
        ({"provenance": {"loss": float("nan")}}, "provenance: not JSON-serialisable"),
        ({"metrics": []}, "metrics: expected a mapping, got []"),
    ],
)
def test_card_values_are_not_coerced(change, message):
    with pytest.raises(ValueError) as caught:
        ModelCard.from_dict(load_card("refinenet").to_dict() | change)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_card_is_frozen_and_replace_checks_the_value():
    card = load_card("guidenet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.patch_px = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="patch_px"):
        dataclasses.replace(card, patch_px=0)
    assert pickle.loads(pickle.dumps(card)) == card


@pytest.mark.parametrize(("role", "channels"), [("guidenet", 3), ("refinenet", 6)])
def test_build_and_forward(role: str, channels: int):
    model = build_model(load_card(role)).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, channels, 64, 64))
    assert logits.shape == (1, 1, 64, 64)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_a_card_names_its_decoder_widths_and_without_them_it_is_as_before(tmp_path: Path):
    default = dataclasses.replace(load_card("refinenet"), decoder_channels=None)
    assert "decoder_channels" not in default.to_dict()  # old cards: same dict, same cache key
    light = dataclasses.replace(default, decoder_channels=[64, 32, 16, 16, 16])
    assert ModelCard.from_dict(light.to_dict()) == light
    widths = [block.conv1[0].out_channels for block in build_model(light).decoder.blocks]
    assert widths == [64, 32, 16, 16, 16]
    widths = [block.conv1[0].out_channels for block in build_model(default).decoder.blocks]
    assert widths == [256, 128, 64, 32, 16]
    model = build_model(light)
    path = tmp_path / "light.safetensors"
    save_weights(model, light, path)
    loaded, card = load_weights(path, role="refinenet", workflow=load_workflow())
    assert card.decoder_channels == [64, 32, 16, 16, 16]
    with pytest.raises(ValueError, match="decoder_channels"):
        ModelCard.from_dict(default.to_dict() | {"decoder_channels": [64, 32, 16]})
    with pytest.raises(ValueError, match="decoder_channels"):
        ModelCard.from_dict(default.to_dict() | {"decoder_channels": [64, 32, 16, 16, 0]})
    # Weights written before the key existed (smp's widths, no key) load as they were.
    wide = tmp_path / "wide.safetensors"
    save_weights(build_model(default), default, wide)
    loaded, card = load_weights(wide, role="refinenet", workflow=load_workflow())
    assert card.decoder_channels is None and card == default
    assert loaded.decoder.blocks[0].conv1[0].out_channels == 256
    # A network of one width is not saved under a card of another.
    with pytest.raises(ValueError, match="decoder.blocks.0.conv1.0.weight.*instead of"):
        save_weights(model, default, tmp_path / "other.safetensors")
    assert not (tmp_path / "other.safetensors").exists()


# ------------------------------------------------------------------------------------ weights


def test_save_load_round_trip(tmp_path: Path):
    card = load_card("refinenet")
    torch.manual_seed(3)
    model = build_model(card).eval()
    path = tmp_path / "r.safetensors"
    digest = save_weights(model, card, path)
    assert digest == weights_hash(path) and len(digest) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temp file left
    loaded, loaded_card = load_weights(path, role="refinenet", workflow=load_workflow())
    assert loaded_card == card
    assert not loaded.training
    x = torch.rand(2, 6, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_card_is_in_the_safetensors_metadata(guidenet_file: Path):
    from safetensors import safe_open

    with safe_open(guidenet_file, framework="pt") as f:
        card = json.loads(f.metadata()[CARD_KEY])
    assert card["role"] == "guidenet" and card["provenance"]["init"] == "random"
    assert load_card(guidenet_file) == ModelCard.from_dict(card)


def test_init_is_deterministic_per_seed(guidenet_file: Path, weights_dir: Path):
    rng_before = torch.random.get_rng_state()
    again = weights_dir / "guidenet-seed0-again.safetensors"
    other = weights_dir / "guidenet-seed1.safetensors"
    card = init_weights("guidenet", again, seed=0)
    init_weights("guidenet", other, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    assert again.read_bytes() == guidenet_file.read_bytes()
    assert weights_hash(other) != weights_hash(guidenet_file)
    assert card.provenance["init"] == "random" and card.provenance["seed"] == 0
    assert card.metrics == {}


def test_init_takes_patch_and_mpp_from_the_workflow(tmp_path: Path):
    wf = workflow_from_dict(
        {"name": "fine", "working_mpp": 0.5, "refinenet": {"window_px": 512},
         "scribbles": {"max_distance_px": 32.0}}
    )
    path = tmp_path / "r.safetensors"
    card = init_weights("refinenet", path, seed=0, workflow=wf)
    assert (card.patch_px, card.working_mpp) == (512, 0.5)
    assert card.scribble_encoding["max_distance_px"] == 32.0
    _, loaded = load_weights(path, role="refinenet", workflow=wf)
    assert loaded == card
    with pytest.raises(WsisegError, match="trained at 0.5 µm/px but workflow 'default' works at 2"):
        load_weights(path, workflow=load_workflow())


# ------------------------------------------------------------------------------- bad weights


def test_wrong_role(guidenet_file: Path):
    with pytest.raises(WsisegError, match=f"{guidenet_file}: holds guidenet weights.*refinenet"):
        load_weights(guidenet_file, role="refinenet")


def test_wrong_channel_count(tmp_path: Path):
    card = dataclasses.replace(load_card("refinenet"), in_channels=3)
    path = tmp_path / "r3.safetensors"
    save_weights(build_model(card), card, path)
    with pytest.raises(WsisegError, match=f"{path}: .*3 input channels.*takes 6"):
        load_weights(path, role="refinenet")


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        ({"name": "hires", "working_mpp": 0.5},
         "trained at 2 µm/px but workflow 'hires' works at 0.5; use a workflow with working_mpp 2"),
        ({"name": "big", "guidenet": {"patch_px": 512, "stride_px": 384}},
         "trained on 256 px inputs but workflow 'big' has guidenet.patch_px 512"),
    ],
)
def test_workflow_mismatch(guidenet_file: Path, workflow: dict, message: str):
    wf = workflow_from_dict(workflow)
    with pytest.raises(WsisegError, match=f"{guidenet_file}: .*{message}"):
        load_weights(guidenet_file, role="guidenet", workflow=wf)


def test_refinenet_distance_mismatch(refinenet_file: Path):
    wf = workflow_from_dict({"name": "near", "scribbles": {"max_distance_px": 16.0}})
    with pytest.raises(WsisegError, match="saturating at 64 px.*max_distance_px 16"):
        load_weights(refinenet_file, role="refinenet", workflow=wf)


@pytest.mark.parametrize("keep", [0.5, 0.999, 6 / 25_000_000])
def test_truncated_file(guidenet_file: Path, tmp_path: Path, keep: float):
    data = guidenet_file.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(WsisegError, match=f"{path}: not a safetensors weights file"):
        load_weights(path)


class _Marker:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_is_never_unpickled(tmp_path: Path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "evil.safetensors"
    with path.open("wb") as f:
        pickle.dump({"state_dict": _Marker(marker)}, f)
    with pytest.raises(WsisegError, match=f"{path}: not a safetensors weights file.*pickle"):
        load_weights(path)
    with pytest.raises(WsisegError, match="pickle"):
        load_card(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "what"),
    [(b"", "only 0 bytes"), (b"hello, these are weights\n" * 4, "text file"), (None, "zip")],
)
def test_other_files_renamed_safetensors(tmp_path: Path, content: bytes | None, what: str):
    path = tmp_path / "w.safetensors"
    if content is None:
        torch.save({"w": torch.zeros(3)}, path)  # a zip checkpoint
    else:
        path.write_bytes(content)
    with pytest.raises(WsisegError, match=f"{path}: not a safetensors weights file.*{what}"):
        load_weights(path)


def test_safetensors_without_card(tmp_path: Path):
    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    with pytest.raises(WsisegError, match=f"{path}: .*has no wsiseg model card"):
        load_weights(path)


def test_tensors_that_do_not_fit_the_card(guidenet_file: Path, tmp_path: Path):
    from safetensors.torch import load_file

    tensors = load_file(guidenet_file)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, path, metadata={CARD_KEY: json.dumps(load_card("guidenet").to_dict())})
    with pytest.raises(WsisegError, match=f"{path}: tensors do not fit.*1 missing.*{dropped}"):
        load_weights(path)


def test_missing_file_and_missing_weights(tmp_path: Path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WsisegError, match=f"{path}: weights file not found"):
        load_weights(path)
    message = str(missing_weights_error("refinenet"))
    for hint in ("wsiseg train refinenet", "wsiseg demo", "wsiseg models init --role refinenet"):
        assert hint in message


def test_save_refuses_other_suffixes(tmp_path: Path):
    card = load_card("guidenet")
    with pytest.raises(WsisegError, match="safetensors files only"):
        save_weights(build_model(card), card, tmp_path / "w.pt")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ normalisation


def test_normalise_rgb_stats_and_layouts():
    card = load_card("guidenet")
    mean = np.array(card.normalisation["mean"], dtype=np.float32)
    std = np.array(card.normalisation["std"], dtype=np.float32)
    rng = np.random.default_rng(0)
    nhwc = torch.from_numpy(rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8))
    out = normalise_rgb(nhwc, card)
    assert out.shape == (2, 3, 32, 48) and out.dtype == torch.float32
    expected = (nhwc.numpy().astype(np.float32) / 255 - mean) / std
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)
    # A (N, 3, H, W) view of channels-last memory gives the same values, kept channels-last.
    view = normalise_rgb(nhwc.permute(0, 3, 1, 2), card)
    assert torch.equal(view, out)
    assert view.is_contiguous(memory_format=torch.channels_last)
    # Pixels at the mean map to 0; uniform pixels have per-channel mean ≈ (0.5 − mean) / std.
    at_mean = torch.from_numpy(np.round(mean * 255).astype(np.uint8)).view(1, 1, 1, 3)
    assert normalise_rgb(at_mean, card).abs().max() < 0.01
    per_channel = out.mean(dim=(0, 2, 3)).numpy()
    np.testing.assert_allclose(per_channel, (0.5 - mean) / std, atol=0.05)
    with pytest.raises(TypeError):
        normalise_rgb(nhwc.float(), card)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_normalise_rgb_on_cuda():
    card = load_card("guidenet")
    rgb = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    out = normalise_rgb(rgb.cuda(), card)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), normalise_rgb(rgb, card))
