"""The inference runtime: a weights file (model card inside) → one callable network.

Every place a network runs for inference (``wsiseg run``, ``wsiseg refine``, the interactive
evaluation, the cohort workers, a server) loads it here, once, and calls it::

    from wsiseg.runtime import load_network
    net = load_network("guidenet.safetensors", role="guidenet", workflow=wf,
                       device="auto", runtime="auto", precision="auto")
    prob = net(x)      # (N, C, H, W) float32 → (N, 1, H, W) float32 tumor probability
    net.card, net.runtime, net.precision, net.device, net.weights_sha256

``x`` may be a numpy array or a torch tensor; the result is of the same kind (a torch result
lies on ``net.device``). H and W are multiples of 32; any N. The network is the model card's
U-Net followed by a sigmoid, nothing more: normalisation and blending stay with the caller.

Runtimes
--------
``openvino``
    The default on CPU. The torch module built from the card is converted once with
    ``openvino.convert_model`` (batch and spatial dimensions dynamic) and cached on disk (see
    below); later loads read the cached model (≈ 0.2 s with compilation).
``torch``
    The default on CUDA and the reference everywhere (eager, channels-last; on CUDA under
    autocast). A missing or failing OpenVINO falls back to it with one warning line.

Precision (``auto`` | ``f32`` | ``bf16``): ``auto`` is bf16 where the CPU has it (OpenVINO's
``INFERENCE_PRECISION_HINT``; bf16 or fp16 autocast on CUDA as before) and f32 elsewhere
(torch on CPU). ``net.precision`` says what a network really runs at: ``f32``, ``bf16`` or
``fp16``.

Cache
-----
``$XDG_CACHE_HOME/wsiseg/openvino/`` (default ``~/.cache/wsiseg/openvino``), one entry per key
— the weights' sha256, the card, the input channels and size, the OpenVINO version and this
module's format — as ``<key>.xml``, ``<key>.bin`` and ``<key>.json`` (the key and both files'
sha256, written last). Files are written to temporary names and renamed, under a file lock,
so concurrent workers convert once. An entry whose record does not match the key, whose
files do not match their sha256, or whose model has the wrong input or output shape is
rebuilt, never trusted. Nothing is downloaded.

Threads: OpenVINO runs one stream with ``threads`` inference threads (default: the cores
this process may use, or ``WSISEG_INFER_THREADS``); torch uses its own thread setting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsiseg.errors import WsisegError
from wsiseg.nets import ModelCard, load_weights, weights_card, weights_hash

if TYPE_CHECKING:
    from wsiseg.config import Workflow

log = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = ("auto", "openvino", "torch")
PRECISIONS: tuple[str, ...] = ("auto", "f32", "bf16")

#: Bumped whenever what a cache entry holds changes: older entries are then rebuilt.
CACHE_FORMAT = 1

_BUILD_LOCK = threading.Lock()  # one conversion at a time in this process (threads share it)


# ----------------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """The torch device for ``--device``: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.

    Raises
    ------
    WsisegError
        Unknown device name, or CUDA asked for where there is none.
    """
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise WsisegError(f"--device {device}: expected auto, cpu or cuda") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise WsisegError(f"--device {device}: expected auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise WsisegError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda}); use --device cpu or auto"
        )
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise WsisegError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    return resolved


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- networks


@dataclass
class Network:
    """A loaded network: ``(N, C, H, W)`` float32 → ``(N, 1, H, W)`` probability.

    Attributes
    ----------
    card : ModelCard or None
        None only for a bare torch module wrapped by :func:`torch_network`.
    runtime : str
        ``"openvino"`` or ``"torch"``.
    precision : str
        ``"f32"``, ``"bf16"`` or ``"fp16"``: what the network computes in.
    device : torch.device
        Where a torch result lies (always CPU for OpenVINO).
    weights_sha256 : str
        sha256 of the weights file ("" for a wrapped module).
    """

    card: ModelCard | None
    runtime: str
    precision: str
    device: torch.device
    weights_sha256: str = ""
    _run: Any = field(default=None, repr=False)

    def __call__(self, x: Any) -> Any:
        """Probabilities of a batch; numpy in → numpy out, torch in → torch out."""
        return self._run(x)

    def describe(self) -> dict[str, str]:
        """What a store's attributes and ``summary.csv`` record of this network."""
        return {"runtime": self.runtime, "precision": self.precision,
                "device": str(self.device)}


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "f32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type != "cuda":  # auto on CPU: torch stays the f32 reference
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def torch_network(
    module: torch.nn.Module, device: torch.device | str = "cpu", *,
    card: ModelCard | None = None, precision: str = "auto", weights_sha256: str = "",
) -> Network:
    """Wrap a torch module mapping ``(N, C, H, W)`` to logits (``(N, 1, H, W)``, or
    ``(N, H, W)``) as a :class:`Network`; the module is moved to ``device``, eval mode and
    channels-last (in place)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape throughout: pick the fastest
    module = module.to(device=device, memory_format=torch.channels_last).eval()
    dtype = _autocast_dtype(device, precision)
    names = {None: "f32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def run(x: Any) -> Any:
        as_numpy = isinstance(x, np.ndarray)
        t = torch.from_numpy(x) if as_numpy else x
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            out = module(t.to(device, non_blocking=True))
            if out.ndim == 3:
                out = out[:, None]
            if out.shape[1] != 1:
                raise WsisegError(f"network: expected 1 output channel, got {out.shape[1]}")
            prob = torch.sigmoid(out.float())
        return prob.cpu().numpy() if as_numpy else prob

    return Network(card, "torch", names[dtype], device, weights_sha256, run)


def _openvino_network(model: Any, card: ModelCard, precision: str, threads: int,
                      digest: str) -> Network:
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        # One stream using every core the caller grants: batches arrive one at a time, and
        # the reading / writing threads are light (see docs/benchmarks.md).
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one request, reused; callers on several threads take turns

    def run(x: Any) -> Any:
        as_numpy = isinstance(x, np.ndarray)
        array = x if as_numpy else x.detach().cpu().numpy()
        array = np.ascontiguousarray(array, dtype=np.float32)
        with lock:
            request.infer({0: array}, share_inputs=True)
            prob = request.get_output_tensor(0).data.copy()  # the request reuses its buffer
        return prob if as_numpy else torch.from_numpy(prob)

    return Network(card, "openvino", precision, torch.device("cpu"), digest, run)


# ------------------------------------------------------------------------------- entry point


def load_network(
    weights: str | Path,
    *,
    role: str | None = None,
    workflow: Workflow | None = None,
    device: str | torch.device = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
) -> Network:
    """Load a weights file for inference on the chosen runtime.

    Parameters
    ----------
    weights : path
        ``.safetensors`` with a model card.
    role, workflow
        Checked against the card exactly as :func:`wsiseg.nets.load_weights` checks them.
    device : str or torch.device
        ``auto``, ``cpu`` or ``cuda[:N]``.
    runtime : str
        ``auto`` (OpenVINO on CPU, torch on CUDA), ``openvino`` or ``torch``.
    precision : str
        ``auto``, ``f32`` or ``bf16`` (see the module docstring).
    threads : int, optional
        OpenVINO inference threads (default ``WSISEG_INFER_THREADS``, else the usable cores).

    Raises
    ------
    WsisegError
        Bad weights or card; an unknown runtime or precision; OpenVINO asked for on CUDA;
        bf16 asked for on a CPU without it.
    """
    if runtime not in RUNTIMES:
        raise WsisegError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise WsisegError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    path = Path(weights)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if runtime == "openvino" and dev.type != "cpu":
        raise WsisegError(f"--runtime openvino runs on the CPU, not {dev}; use --device cpu "
                          f"or --runtime torch")
    if runtime == "auto":
        runtime = "openvino" if dev.type == "cpu" else "torch"
    if runtime == "openvino":
        card = weights_card(path, role=role, workflow=workflow)  # no tensors read yet
        digest = weights_hash(path)
        try:
            hint = _openvino_precision(precision)
            model = cached_openvino_model(path, card, digest)
            return _openvino_network(model, card, hint, threads or default_threads(), digest)
        except WsisegError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing or broken OpenVINO, any error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("OpenVINO cannot run %s (%s: %s); using the torch runtime instead",
                        path.name, type(exc).__name__, first[:200])
    module, card = load_weights(path, role=role, workflow=workflow, device="cpu")
    if precision == "bf16" and dev.type == "cpu" and not cpu_has_bf16():
        raise WsisegError("--precision bf16: this CPU has no bf16 support; use auto or f32")
    return torch_network(module, dev, card=card, precision=precision,
                         weights_sha256=weights_hash(path))


def default_threads() -> int:
    """OpenVINO inference threads: ``WSISEG_INFER_THREADS`` if set, else the usable cores."""
    env = os.environ.get("WSISEG_INFER_THREADS", "").strip()
    if env:
        try:
            if int(env) > 0:
                return int(env)
        except ValueError:
            pass
        raise WsisegError(f"WSISEG_INFER_THREADS={env}: expected a positive integer")
    return usable_cores()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as OpenVINO sees it."""
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO: read the CPU's flags (Linux)
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def _openvino_precision(precision: str) -> str:
    has_bf16 = cpu_has_bf16()
    if precision == "bf16" and not has_bf16:
        raise WsisegError("--precision bf16: this CPU has no bf16 support; use auto or f32")
    if precision == "auto":
        return "bf16" if has_bf16 else "f32"
    return precision


# ------------------------------------------------------------------------------------ cache


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
    import filelock

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
