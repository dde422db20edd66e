"""The OpenVINO conversion cache of :mod:`wsiseg.runtime`: weights → ``openvino.Model``.

``$XDG_CACHE_HOME/wsiseg/openvino/`` (default ``~/.cache/wsiseg/openvino``) holds one entry
per key — the weights' sha256, the model card, the input channels and size, the OpenVINO and
torch versions and :data:`CACHE_FORMAT` — as ``<role>-<key hash>.xml`` / ``.bin`` (the model)
and ``.json`` (the key and both files' sha256, written last). Files are written under
temporary names and renamed into place, under a file lock, so concurrent workers convert
once and a reader never sees half a file. An entry whose record does not match the key,
whose files do not match their sha256, or whose model does not map ``[?, C, ?, ?]`` to
``[?, 1, ?, ?]`` is refused (one warning line) and rebuilt, never trusted.

The converted model is the card's network followed by a sigmoid, batch and spatial
dimensions dynamic. Nothing is downloaded.

Beside each entry, :func:`compiled_model` keeps the model compiled for this CPU
(``<name>-<kind>-<hash>.blob`` and its record ``.blob.json``), imported by later loads,
which then do not read the converted entry at all (GuideNet's whole load: 0.18–0.21 →
0.13–0.16 s). A blob is compiled for one CPU, so the CPU's name and capabilities are in its
key with OpenVINO's version and the inference precision asked for; the runtime settings
(threads, streams, pinning) apply at import. A blob whose bytes do not match its recorded
sha256, or that OpenVINO refuses, is compiled and written again: OpenVINO's own
``CACHE_DIR`` imports a corrupted blob without a word (docs/benchmarks.md §8, session 16).
A cache folder this process cannot write costs the compilation, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import torch

from wsiseg.atomic import atomic_write_bytes
from wsiseg.nets import ModelCard, load_weights, weights_hash

log = logging.getLogger(__name__)

#: Bumped whenever what a cache entry holds changes (the conversion, or a graph built from
#: it before compiling, such as ``runtime_openvino._with_rgb_input``): older entries are
#: then rebuilt.
CACHE_FORMAT = 1

_BUILD_LOCK = threading.Lock()  # one conversion at a time in this process (threads share it)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wsiseg/openvino`` (default ``~/.cache/wsiseg/openvino``)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "wsiseg" / "openvino"


def cache_key(card: ModelCard, digest: str) -> dict[str, Any]:
    """What a cached conversion depends on (the entry is named by its sha256)."""
    import openvino as ov

    return {
        "format": CACHE_FORMAT, "weights_sha256": digest, "card": card.to_dict(),
        "input": [card.in_channels, card.patch_px, card.patch_px],
        "openvino": ov.get_version(), "torch": torch.__version__,
    }


def cached_openvino_model(path: Path, card: ModelCard, digest: str) -> Any:
    """The OpenVINO model of a weights file, from the cache or converted (and cached).

    Returns
    -------
    openvino.Model
        Input ``[?, C, ?, ?]``, output ``[?, 1, ?, ?]`` (sigmoid included).
    """
    key = cache_key(card, digest)
    name = entry_name(card, digest)
    folder = cache_dir()
    model = _read_entry(folder, name, key, card)
    if model is not None:
        return model

    folder.mkdir(parents=True, exist_ok=True)
    with _BUILD_LOCK, filelock.FileLock(str(folder / f"{name}.lock"), timeout=1800):
        model = _read_entry(folder, name, key, card)  # another process may have built it
        if model is None:
            log.info("converting %s to OpenVINO (once; cached in %s)", path.name, folder)
            model = _convert(path, card)
            _write_entry(folder, name, key, model)
    return model


def entry_name(card: ModelCard, digest: str) -> str:
    """The cache entry's file name (no suffix) of a weights file's conversion."""
    key = cache_key(card, digest)
    return f"{card.role}-{_sha256_bytes(json.dumps(key, sort_keys=True).encode())[:24]}"


def compiled_model(core: Any, build: Callable[[], Any], config: dict[str, Any], entry: str,
                   kind: str) -> Any:
    """``core.compile_model(build(), "CPU", config)``, imported from the cache when it can be.

    Parameters
    ----------
    core : openvino.Core
    build : callable
        Returns the ``openvino.Model`` to compile; called only when no good blob is cached.
    config : dict
        The compile properties; its ``INFERENCE_PRECISION_HINT`` is part of the key.
    entry : str
        :func:`entry_name` of the converted model ``build`` starts from.
    kind : str
        Which graph of that entry ``build`` returns (e.g. ``"float"``, ``"rgb"``).
    """
    import openvino as ov

    key = {"format": CACHE_FORMAT, "entry": entry, "kind": kind,
           "precision": str(config.get("INFERENCE_PRECISION_HINT", "")),
           "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
           "capabilities": [str(c) for c in
                            core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")],
           "openvino": ov.get_version()}
    folder = cache_dir()
    blob = folder / f"{entry}-{kind}-{_sha256_bytes(json.dumps(key).encode())[:12]}.blob"
    record = blob.with_name(blob.name + ".json")
    refused = None  # the bytes of a blob refused here: not to be kept below
    try:
        data = _read_blob(blob, record, key)
        if data is not None:
            refused = data
            return core.import_model(io.BytesIO(data), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - a damaged blob, or one OpenVINO refuses
        lines = [line for line in str(exc).splitlines() if line.strip()]
        log.warning("OpenVINO cache entry %s refused (%s); compiling again", blob,
                    lines[-1][:200] if lines else type(exc).__name__)
    compiled = core.compile_model(build(), "CPU", config)
    exported = io.BytesIO()
    compiled.export_model(exported)
    try:
        _write_blob(blob, record, key, exported.getvalue(), refused)
    except OSError as exc:  # a cache folder this process cannot write: not cached
        log.warning("OpenVINO compiled model not cached in %s (%s)", blob.parent,
                    exc.strerror or type(exc).__name__)
    return compiled


def _write_blob(blob: Path, record: Path, key: dict[str, Any], data: bytes,
                refused: bytes | None) -> None:
    """Write ``data`` and its record, the record last, unless another process wrote a good
    blob meanwhile: two compilations of one model can export different bytes, so processes
    compiling at once write in turn (under a lock), and the later one keeps the earlier's."""
    blob.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(f"{blob}.lock", timeout=600):
        try:
            found = _read_blob(blob, record, key)
        except Exception:  # noqa: BLE001 - damaged: written again below
            found = None
        if found is not None and found != refused:
            return
        with contextlib.suppress(FileNotFoundError):
            record.unlink()  # no record while the blob changes
        atomic_write_bytes(blob, data)
        atomic_write_bytes(record, json.dumps({"key": key, "sha256": _sha256_bytes(data)})
                           .encode())


def _read_blob(blob: Path, record_path: Path, key: dict[str, Any]) -> bytes | None:
    """The blob's bytes if its record matches ``key`` and its sha256; None when there is
    none yet; ValueError when it does not check out."""
    try:
        record = json.loads(record_path.read_text())
        data = blob.read_bytes()
    except FileNotFoundError:
        return None
    if not isinstance(record, dict):
        raise ValueError("its record is not a JSON object")
    if record.get("key") != json.loads(json.dumps(key)):
        raise ValueError("its record is for another key")
    if _sha256_bytes(data) != record.get("sha256"):
        raise ValueError("its bytes do not match their recorded sha256")
    return data


class _Probability(torch.nn.Module):
    """The card's network followed by a sigmoid: what the converted model computes."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def _convert(path: Path, card: ModelCard) -> Any:
    import openvino as ov

    module, _ = load_weights(path, role=card.role)
    example = torch.zeros(1, card.in_channels, card.patch_px, card.patch_px)
    with torch.no_grad():
        return ov.convert_model(_Probability(module).eval(), example_input=example,
                                input=[ov.PartialShape([-1, card.in_channels, -1, -1])])


def _write_entry(folder: Path, name: str, key: dict[str, Any], model: Any) -> None:
    """Save ``model`` as ``<name>.xml/.bin`` and its record ``<name>.json`` (last), each
    renamed into place from a temporary name, so a reader never sees a half-written file."""
    import openvino as ov

    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}.") as tmp:
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        record = {"key": key, "xml_sha256": weights_hash(Path(tmp) / "model.xml"),
                  "bin_sha256": weights_hash(Path(tmp) / "model.bin")}
        (Path(tmp) / "record.json").write_text(json.dumps(record, sort_keys=True))
        with contextlib.suppress(FileNotFoundError):
            (folder / f"{name}.json").unlink()  # no record while the files change
        os.replace(Path(tmp) / "model.xml", folder / f"{name}.xml")
        os.replace(Path(tmp) / "model.bin", folder / f"{name}.bin")
        os.replace(Path(tmp) / "record.json", folder / f"{name}.json")


def _read_entry(folder: Path, name: str, key: dict[str, Any], card: ModelCard) -> Any | None:
    """The cached model if its record, files and shapes all check out; else None."""
    import openvino as ov

    xml, binary, record_path = (folder / f"{name}{s}" for s in (".xml", ".bin", ".json"))
    try:
        record = json.loads(record_path.read_text())
        if record.get("key") != json.loads(json.dumps(key)):
            raise ValueError("its record is for another key")
        if (weights_hash(xml) != record.get("xml_sha256")
                or weights_hash(binary) != record.get("bin_sha256")):
            raise ValueError("its files do not match their recorded sha256")
        model = ov.Core().read_model(str(xml), str(binary))
        _check_shapes(model, card)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - corrupt JSON, XML, weights: rebuild
        log.warning("OpenVINO cache entry %s refused (%s); converting again",
                    folder / name, str(exc).splitlines()[0][:200] if str(exc) else exc)
        return None
    return model


def _check_shapes(model: Any, card: ModelCard) -> None:
    """Raise ValueError unless ``model`` maps ``[?, C, ?, ?]`` to ``[?, 1, ?, ?]``."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"{len(model.inputs)} inputs and {len(model.outputs)} outputs, "
                         f"not 1 and 1")
    for what, shape, channels in (("input", model.inputs[0].partial_shape, card.in_channels),
                                  ("output", model.outputs[0].partial_shape, 1)):
        if (shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic
                or shape[1].get_length() != channels):
            raise ValueError(f"{what} {shape}, expected [?,{channels},?,?]")


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
