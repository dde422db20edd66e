"""The inference runtime (issue 17): OpenVINO against the torch reference, the conversion
cache, the fallback, and `wsiseg run` on both runtimes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsiseg import runtime, runtime_cache, runtime_openvino
from wsiseg.nets import init_weights, load_weights, normalise_rgb
from wsiseg.runtime import load_network, torch_network

from conftest import CAMELYON, CMU_SVS, real

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """$XDG_CACHE_HOME of this module's tests: each network is converted once for all."""
    return tmp_path_factory.mktemp("xdg-shared")


@pytest.fixture()
def cache(shared_cache, monkeypatch) -> Path:
    """The shared conversion cache (its folder of entries)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    return shared_cache / "wsiseg" / "openvino"


@pytest.fixture()
def own_cache(tmp_path, weights, shared_cache, monkeypatch) -> Path:
    """A private copy of the shared cache, holding both networks' converted entries (not
    their compiled blobs, which would spare a load from reading them), to damage."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    for role in ("guidenet", "refinenet"):
        load_network(weights[role], device="cpu", runtime="openvino")
    shutil.copytree(shared_cache, tmp_path / "xdg",
                    ignore=shutil.ignore_patterns("*.lock", "*.blob", "*.blob.json"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "wsiseg" / "openvino"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runtime-weights")
    init_weights("guidenet", d / "g.safetensors", seed=5)
    init_weights("refinenet", d / "r.safetensors", seed=5)
    return {"guidenet": d / "g.safetensors", "refinenet": d / "r.safetensors"}


@pytest.fixture(scope="module")
def he_patches() -> torch.Tensor:
    """Four real H&E patches, 256² crops of the Camelyon images, normalised as GuideNet's
    input: (4, 3, 256, 256) float32."""
    files = sorted((real(CAMELYON) / "images").glob("*.jpg"))[:4]
    rgb = np.stack([np.asarray(Image.open(f).convert("RGB"))[128:384, 128:384] for f in files])
    card = load_weights_card()
    return normalise_rgb(torch.from_numpy(rgb), card).contiguous()


def load_weights_card():
    from wsiseg.nets import load_card

    return load_card("guidenet")


def counted_conversions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    original = runtime_cache._convert

    def convert(path, card):
        calls.append(Path(path))
        return original(path, card)

    monkeypatch.setattr(runtime_cache, "_convert", convert)
    return calls


def reference(weights: Path, role: str, x: torch.Tensor) -> np.ndarray:
    model, card = load_weights(weights, role=role)
    return torch_network(model, "cpu", card=card)(x).numpy()


# ------------------------------------------------------------------------------- numerics


def test_openvino_f32_equals_torch_on_real_he_patches(weights, he_patches, cache):
    net = load_network(weights["guidenet"], role="guidenet", device="cpu",
                       runtime="openvino", precision="f32")
    assert (net.runtime, net.precision) == ("openvino", "f32")
    prob = net(he_patches)
    assert isinstance(prob, torch.Tensor) and prob.shape == (4, 1, 256, 256)
    ref = reference(weights["guidenet"], "guidenet", he_patches)
    assert np.abs(prob.numpy() - ref).max() < 1e-4
    # numpy in, numpy out; any batch size (the batch dimension is dynamic)
    one = net(he_patches[:1].numpy())
    assert isinstance(one, np.ndarray) and np.abs(one - ref[:1]).max() < 1e-4


@pytest.mark.skipif(not runtime.cpu_has_bf16(), reason="this CPU has no bf16")
def test_openvino_bf16_within_5e_3_of_torch(weights, he_patches, cache):
    net = load_network(weights["guidenet"], role="guidenet", device="cpu")  # auto → bf16
    assert (net.runtime, net.precision) == ("openvino", "bf16")
    ref = reference(weights["guidenet"], "guidenet", he_patches)
    assert np.abs(net(he_patches).numpy() - ref).max() < 5e-3


def he_rgb() -> torch.Tensor:
    """The same four real H&E patches as uint8 RGB, (4, 3, 256, 256) with channels-last
    strides, as the patch reader hands them to the network."""
    files = sorted((real(CAMELYON) / "images").glob("*.jpg"))[:4]
    rgb = np.stack([np.asarray(Image.open(f).convert("RGB"))[128:384, 128:384] for f in files])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2)


@pytest.mark.parametrize("precision,tolerance", [("f32", 1e-4), ("bf16", 5e-3)])
def test_openvino_guidenet_normalises_uint8_rgb_inside_the_model(weights, he_patches, cache,
                                                                  precision, tolerance):
    from wsiseg.infer.network import dihedral_mean, forward_batch

    if precision == "bf16" and not runtime.cpu_has_bf16():
        pytest.skip("this CPU has no bf16")
    net = load_network(weights["guidenet"], role="guidenet", device="cpu",
                       runtime="openvino", precision=precision)
    assert net.takes_rgb
    ref = reference(weights["guidenet"], "guidenet", he_patches)  # torch's normalise_rgb
    prob = net.rgb(he_rgb())
    assert prob.shape == (4, 1, 256, 256) and np.abs(prob.numpy() - ref).max() < tolerance

    def never(_):
        raise AssertionError("the network normalises uint8 RGB itself")

    by_batch = forward_batch(net, never, he_rgb(), tta=False)
    assert np.abs(by_batch.numpy() - ref[:, 0]).max() < tolerance
    model, _ = load_weights(weights["guidenet"], role="guidenet")
    reference_net = torch_network(model, "cpu")
    ref_tta = dihedral_mean(lambda t: reference_net(t)[:, 0], he_patches)
    tta = forward_batch(net, never, he_rgb(), tta=True)
    assert np.abs(tta.numpy() - ref_tta.numpy()).max() < tolerance
    with pytest.raises(runtime.WsisegError, match="uint8 RGB"):
        net.rgb(he_patches)  # float input is not pixels


def test_float_input_networks_do_not_take_rgb(weights, cache):
    refinenet = load_network(weights["refinenet"], role="refinenet", device="cpu",
                             runtime="openvino")
    torch_guidenet = load_network(weights["guidenet"], role="guidenet", device="cpu",
                                  runtime="torch")
    assert not refinenet.takes_rgb and not torch_guidenet.takes_rgb
    with pytest.raises(runtime.WsisegError, match="float input"):
        torch_guidenet.rgb(he_rgb())


def test_refinenet_six_channels_openvino_equals_torch(weights, he_patches, cache):
    from wsiseg.scribbles.encode import encode_refine_input

    rgb = np.asarray(Image.open(sorted((real(CAMELYON) / "images").glob("*.jpg"))[0])
                     .convert("RGB"))[:384, :384]
    guide = np.full((384, 384), 128, np.uint8)
    scribbles = np.zeros((384, 384), np.int8)
    scribbles[100:110, 50:300] = 1
    scribbles[300:305, 20:200] = -1
    x = encode_refine_input(rgb, guide, scribbles, max_distance_px=64.0)[None]
    net = load_network(weights["refinenet"], role="refinenet", device="cpu",
                       runtime="openvino", precision="f32")
    assert np.abs(net(x) - reference(weights["refinenet"], "refinenet",
                                     torch.from_numpy(x))).max() < 1e-4


# ---------------------------------------------------------------------------------- cache


def test_second_load_reads_the_cache(weights, cache, monkeypatch):
    load_network(weights["guidenet"], device="cpu", runtime="openvino")
    calls = counted_conversions(monkeypatch)
    load_network(weights["guidenet"], device="cpu", runtime="openvino", precision="f32")
    assert calls == []
    assert len(list(cache.glob("guidenet-*.xml"))) == 1


def test_cache_rebuilt_when_the_weights_change_by_one_byte(tmp_path, weights, he_patches,
                                                           own_cache, monkeypatch):
    path = tmp_path / "g.safetensors"
    path.write_bytes(weights["guidenet"].read_bytes())
    calls = counted_conversions(monkeypatch)
    before = load_network(path, device="cpu", runtime="openvino", precision="f32")(he_patches)
    assert calls == []  # the same bytes: the entry of weights["guidenet"]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one byte of the last tensor's data: still a valid file, same card
    path.write_bytes(bytes(data))
    after = load_network(path, device="cpu", runtime="openvino", precision="f32")
    assert len(calls) == 1
    assert len(list(own_cache.glob("guidenet-*.xml"))) == 2
    assert np.abs(after(he_patches).numpy()
                  - reference(path, "guidenet", he_patches)).max() < 1e-4
    assert not torch.equal(before, after(he_patches))


def _entry(cache: Path, role: str) -> tuple[Path, Path, Path]:
    (xml,) = cache.glob(f"{role}-*.xml")
    return xml, xml.with_suffix(".bin"), xml.with_suffix(".json")


def test_stale_entry_of_the_wrong_shape_is_refused_and_rebuilt(weights, he_patches, own_cache,
                                                               monkeypatch, caplog):
    r_xml, r_bin, _ = _entry(own_cache, "refinenet")
    g_xml, g_bin, g_json = _entry(own_cache, "guidenet")
    # GuideNet's entry now holds the 6-channel RefineNet, with a record whose sha256 match
    # the files: only the shape check can tell.
    g_xml.write_bytes(r_xml.read_bytes())
    g_bin.write_bytes(r_bin.read_bytes())
    record = json.loads(g_json.read_text())
    record["xml_sha256"] = runtime.weights_hash(g_xml)
    record["bin_sha256"] = runtime.weights_hash(g_bin)
    g_json.write_text(json.dumps(record))
    calls = counted_conversions(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        net = load_network(weights["guidenet"], device="cpu", runtime="openvino",
                           precision="f32")
    assert len(calls) == 1
    assert "refused" in caplog.text and "expected [?,3,?,?]" in caplog.text
    assert np.abs(net(he_patches).numpy()
                  - reference(weights["guidenet"], "guidenet", he_patches)).max() < 1e-4
    load_network(weights["guidenet"], device="cpu", runtime="openvino")
    assert len(calls) == 1  # the rebuilt entry is trusted


@pytest.mark.parametrize("damage", ["truncated bin", "record of another key", "garbage xml",
                                    "no record"])
def test_corrupt_entry_is_rebuilt_never_trusted(tmp_path, weights, own_cache, monkeypatch,
                                                damage):
    import openvino as ov

    xml, binary, record = _entry(own_cache, "guidenet")
    # OpenVINO maps the .bin file: read the good model from copies, not from what is damaged.
    shutil.copy(xml, tmp_path / "good.xml")
    shutil.copy(binary, tmp_path / "good.bin")
    good = ov.Core().read_model(str(tmp_path / "good.xml"), str(tmp_path / "good.bin"))
    if damage == "truncated bin":
        binary.write_bytes(binary.read_bytes()[:1000])
    elif damage == "record of another key":
        data = json.loads(record.read_text())
        data["key"]["weights_sha256"] = "0" * 64
        record.write_text(json.dumps(data))
    elif damage == "garbage xml":
        xml.write_text("<net>not a model</net>")
    else:
        record.unlink()
    calls: list[Path] = []

    def convert(path, card):  # the conversion itself is tested above; here only its call
        calls.append(path)
        return good

    monkeypatch.setattr(runtime_cache, "_convert", convert)
    load_network(weights["guidenet"], device="cpu", runtime="openvino")
    assert len(calls) == 1
    load_network(weights["guidenet"], device="cpu", runtime="openvino")
    assert len(calls) == 1  # rewritten whole: trusted again


# ------------------------------------------------------------------------------- fallback


def test_failing_openvino_falls_back_to_torch_with_one_warning(weights, cache, monkeypatch,
                                                              caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no CPU plugin\nsecond line")

    monkeypatch.setattr(runtime_openvino, "compiled_model", broken)  # every load uses it
    with caplog.at_level(logging.WARNING):
        net = load_network(weights["guidenet"], device="cpu")
    assert (net.runtime, net.precision) == ("torch", "f32")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "torch runtime" in warnings[0].getMessage()


def test_missing_openvino_falls_back_to_torch_with_one_warning(weights, cache):
    """OpenVINO that cannot be imported (``wsiseg.runtime`` imports it with itself), in a
    fresh process: the module still imports, and GuideNet runs on torch after one warning
    line that says why."""
    import subprocess
    import sys

    code = ("import logging, sys; sys.modules['openvino'] = None; "
            "logging.basicConfig(format='%(levelname)s %(message)s'); "
            "from wsiseg.runtime import load_network; "
            f"net = load_network({str(weights['guidenet'])!r}, device='cpu'); "
            "print('runtime', net.runtime)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["runtime", "torch"]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr[-2000:]
    assert "(ImportError: import of openvino halted" in warnings[0]
    assert "torch runtime" in warnings[0]


def test_a_bad_choice_stops_wsiseg_run_before_any_slide(tmp_path, weights, monkeypatch,
                                                       capsys):
    """``--precision bf16`` where the CPU has none: one error line, and no output folder or
    slide store begun (the check used to run on the loading thread, beside the first slide's
    tiling)."""
    from wsiseg.cli import main

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    out = tmp_path / "out"
    status = main(["run", str(real(CMU_SVS)), "--out", str(out), "--guidenet",
                   str(weights["guidenet"]), "--workers", "0", "--device", "cpu",
                   "--precision", "bf16"])
    assert status != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision bf16: this CPU has no bf16 support" in err[0]
    assert not out.exists()


def test_bad_choices_are_one_line_errors(weights):
    from wsiseg.errors import WsisegError

    with pytest.raises(WsisegError, match="--runtime onnx"):
        load_network(weights["guidenet"], runtime="onnx")
    with pytest.raises(WsisegError, match="--precision fp8"):
        load_network(weights["guidenet"], precision="fp8")
    with pytest.raises(WsisegError, match="holds guidenet weights"):
        load_network(weights["guidenet"], role="refinenet")


# ----------------------------------------------------------------------- wsiseg run, both


def test_run_on_the_real_svs_with_both_runtimes_agrees(tmp_path, weights, cache):
    """`wsiseg run` masks: OpenVINO f32 and torch agree (IoU ≥ 0.995); OpenVINO's default
    (bf16 where the CPU has it) differs only where the probability lies within 2/255 of the
    threshold. Random weights put nearly every pixel within a few 1/255 of 0.5, so with them
    bf16's rounding flips ~2 % of a small mask; trained weights are far from the threshold
    almost everywhere (docs/benchmarks.md)."""
    import csv

    from wsiseg.cli import main
    from wsiseg.store import SlideStore

    slide = real(CMU_SVS)
    probs = {}
    for name, precision in (("torch", "auto"), ("openvino", "f32"), ("openvino", "auto")):
        out = tmp_path / f"{name}-{precision}"
        assert main(["run", str(slide), "--out", str(out), "--guidenet",
                     str(weights["guidenet"]), "--workers", "0", "--runtime", name,
                     "--precision", precision]) == 0
        store = SlideStore.open(out / f"{slide.stem}.zarr", mode="r")
        used = store.attrs["inference"]
        assert used["runtime"] == name
        with (out / "summary.csv").open() as f:
            (row,) = csv.DictReader(f)
        assert (row["runtime"], row["precision"]) == (name, used["precision"])
        probs[name, precision] = np.asarray(store["guide"][...]).astype(np.int16)
    reference_prob = probs["torch", "auto"]
    ref = reference_prob >= 128
    assert ref.any()
    for key in (("openvino", "f32"), ("openvino", "auto")):
        mask = probs[key] >= 128
        iou = (ref & mask).sum() / (ref | mask).sum()
        if key[1] == "f32":
            assert iou >= 0.995, (key, iou)
        far = np.abs(reference_prob - 127.5) > 2
        assert np.array_equal(mask[far], ref[far]), (key, iou)
