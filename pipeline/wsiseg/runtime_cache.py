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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import filelock
import torch

from wsiseg.nets import ModelCard, load_weights, weights_hash

log = logging.getLogger(__name__)

#: Bumped whenever what a cache entry holds changes: older entries are then rebuilt.
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
    name = f"{card.role}-{_sha256_bytes(json.dumps(key, sort_keys=True).encode())[:24]}"
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
