"""The compiled-model cache of :mod:`wsiseg.runtime_cache`: a network compiled for this CPU
is exported once and imported by later loads, never trusted when its bytes are damaged."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg import runtime_cache
from wsiseg.nets import init_weights
from wsiseg.runtime import cpu_has_bf16, load_network

from conftest import CAMELYON, real

ov = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compiled-weights") / "g.safetensors"
    init_weights("guidenet", path, seed=7)
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "wsiseg" / "openvino"


@pytest.fixture(scope="module")
def he_rgb() -> np.ndarray:
    """Four real H&E patches, 256² crops of the Camelyon images: (4, 3, 256, 256) uint8."""
    files = sorted((real(CAMELYON) / "images").glob("*.jpg"))[:4]
    rgb = np.stack([np.asarray(Image.open(f).convert("RGB"))[128:384, 128:384] for f in files])
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def counted_compiles(monkeypatch) -> list[str]:
    """Record each ``ov.Core.compile_model`` call (its device)."""
    calls: list[str] = []
    original = ov.Core.compile_model

    def compile_model(self, model, device_name=None, config=None):
        calls.append(str(device_name))
        return original(self, model, device_name, config or {})

    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    return calls


def blob_files(cache: Path) -> tuple[Path, Path]:
    (blob,) = cache.glob("guidenet-*-rgb-*.blob")
    return blob, blob.with_name(blob.name + ".json")


def test_second_load_imports_the_blob_and_computes_the_same(weights, cache, he_rgb,
                                                             monkeypatch):
    first = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    blob, record = blob_files(cache)
    assert json.loads(record.read_text())["key"]["precision"] == "f32"
    calls = counted_compiles(monkeypatch)
    second = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert calls == []  # imported, not compiled
    assert np.array_equal(first.rgb(he_rgb), second.rgb(he_rgb))


def test_each_precision_has_its_own_blob(weights, cache):
    load_network(weights, device="cpu", runtime="openvino", precision="f32")
    if not cpu_has_bf16():
        pytest.skip("this CPU has no bf16")
    load_network(weights, device="cpu", runtime="openvino", precision="bf16")
    assert len(list(cache.glob("guidenet-*-rgb-*.blob"))) == 2


@pytest.mark.parametrize("damage", ["a byte flipped mid-blob", "truncated blob",
                                    "record of another key", "no record"])
def test_damaged_blob_is_compiled_again_never_trusted(weights, cache, he_rgb, monkeypatch,
                                                      caplog, damage):
    """OpenVINO itself imports a blob with a flipped byte and computes wrong probabilities
    (docs/benchmarks.md §8): the recorded sha256 must catch it."""
    want = load_network(weights, device="cpu", runtime="openvino", precision="f32").rgb(he_rgb)
    blob, record = blob_files(cache)
    data = bytearray(blob.read_bytes())
    if damage == "a byte flipped mid-blob":
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "truncated blob":
        blob.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "record of another key":
        entry = json.loads(record.read_text())
        entry["key"]["cpu"] = "another CPU"
        record.write_text(json.dumps(entry))
    else:
        record.unlink()
    calls = counted_compiles(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        got = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert calls == ["CPU"]
    assert np.array_equal(got.rgb(he_rgb), want)
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == (0 if damage == "no record" else 1)
    load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert calls == ["CPU"]  # written again whole: imported from now on


def test_a_blob_openvino_refuses_is_written_again(weights, cache, he_rgb, monkeypatch, caplog):
    """Garbage whose record matches it (sha256 and key): OpenVINO's import fails, so it is
    compiled and the blob written again, not kept because its sha256 checks out."""
    want = load_network(weights, device="cpu", runtime="openvino", precision="f32").rgb(he_rgb)
    blob, record = blob_files(cache)
    garbage = b"not a compiled model" * 100
    blob.write_bytes(garbage)
    entry = json.loads(record.read_text())
    entry["sha256"] = hashlib.sha256(garbage).hexdigest()
    record.write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        got = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert "refused" in caplog.text
    assert np.array_equal(got.rgb(he_rgb), want)
    assert blob.read_bytes() != garbage
    calls = counted_compiles(monkeypatch)
    load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert calls == []


def test_a_record_that_is_no_object_is_written_again(weights, cache, monkeypatch):
    load_network(weights, device="cpu", runtime="openvino", precision="f32")
    _, record = blob_files(cache)
    record.write_text("[]")
    net = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert net.runtime == "openvino"
    assert isinstance(json.loads(record.read_text()), dict)


def test_a_cache_it_cannot_write_costs_the_compile_only(weights, cache, he_rgb, monkeypatch,
                                                        caplog):
    """A read-only cache folder (another user's, say): OpenVINO still runs, uncached, with
    one warning line."""
    want = load_network(weights, device="cpu", runtime="openvino", precision="f32").rgb(he_rgb)
    blob, record = blob_files(cache)
    record.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runtime_cache, "atomic_write_bytes", refuse)
    with caplog.at_level(logging.WARNING, logger="wsiseg"):
        net = load_network(weights, device="cpu", runtime="openvino", precision="f32")
    assert net.runtime == "openvino"
    assert np.array_equal(net.rgb(he_rgb), want)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "not cached" in warning and "Permission denied" in warning
