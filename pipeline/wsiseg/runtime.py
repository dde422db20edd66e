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
U-Net followed by a sigmoid, nothing more: normalisation and blending stay with the caller —
except that an OpenVINO GuideNet also takes uint8 RGB, ``net.rgb(pixels)`` with
``net.takes_rgb``, and normalises it inside the compiled model (no float copy per batch).

Runtimes
--------
``openvino``
    The default on CPU (:mod:`wsiseg.runtime_openvino`). The torch module built from the
    card is converted once with ``openvino.convert_model`` (batch and spatial dimensions
    dynamic) and cached on disk (see below); later loads import the model compiled for this
    CPU (0.13–0.16 s in all).
``torch``
    The default on CUDA and the reference everywhere (eager, channels-last; on CUDA under
    autocast). A missing or failing OpenVINO falls back to it with one warning line.

Precision (``auto`` | ``f32`` | ``bf16``): ``auto`` is bf16 where the CPU has it (OpenVINO's
``INFERENCE_PRECISION_HINT``; bf16 or fp16 autocast on CUDA as before) and f32 elsewhere
(torch on CPU). ``net.precision`` says what a network really runs at: ``f32``, ``bf16`` or
``fp16``.

Cache
-----
Conversions are kept in ``$XDG_CACHE_HOME/wsiseg/openvino/`` (default
``~/.cache/wsiseg/openvino``), keyed by the weights' sha256, the card, the input size and the
OpenVINO version, and beside them the models compiled for this CPU; a corrupt or stale entry
is rebuilt, never trusted (:mod:`wsiseg.runtime_cache`). Nothing is downloaded.

Threads: OpenVINO runs one stream with ``threads`` inference threads (default: the cores
this process may use, or ``WSISEG_INFER_THREADS``), not pinned to cores; torch uses its own
thread setting (a cohort worker sets both from its share of the cores).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wsiseg.errors import WsisegError
from wsiseg.nets import ModelCard, load_weights, weights_card, weights_hash
from wsiseg.runtime_cache import cached_openvino_model

# OpenVINO is imported with this module, on the importing thread (see resolve_choice)
from wsiseg.runtime_openvino import NO_OPENVINO, cpu_has_bf16, openvino_runners

if TYPE_CHECKING:
    from wsiseg.config import Workflow

log = logging.getLogger(__name__)

RUNTIMES: tuple[str, ...] = ("auto", "openvino", "torch")
PRECISIONS: tuple[str, ...] = ("auto", "f32", "bf16")

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
    takes_rgb : bool
        Whether :meth:`rgb` runs the card's normalisation inside the compiled model (OpenVINO
        GuideNet): uint8 pixels go straight in, with no float copy made by the caller.
    """

    card: ModelCard | None
    runtime: str
    precision: str
    device: torch.device
    weights_sha256: str = ""
    _run: Any = field(default=None, repr=False)
    _run_rgb: Any = field(default=None, repr=False)

    def __call__(self, x: Any) -> Any:
        """Probabilities of a batch; numpy in → numpy out, torch in → torch out."""
        return self._run(x)

    @property
    def takes_rgb(self) -> bool:
        return self._run_rgb is not None

    def rgb(self, pixels: Any) -> Any:
        """Probabilities of uint8 RGB pixels, ``(N, 3, H, W)`` (any strides), normalised with
        the card's mean and std inside the compiled model; see :attr:`takes_rgb`."""
        if self._run_rgb is None:
            raise WsisegError(f"{self.runtime} network: takes float input, not uint8 RGB")
        return self._run_rgb(pixels)

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
    dev, runtime = resolve_choice(device, runtime, precision)
    path = Path(weights)
    if runtime == "openvino":
        card = weights_card(path, role=role, workflow=workflow)  # no tensors read yet
        digest = weights_hash(path)
        try:
            if NO_OPENVINO is not None:  # a fresh error: the module's keeps no frames
                raise ImportError(str(NO_OPENVINO)) from None
            hint = _openvino_precision(precision)
            model = functools.cache(lambda: cached_openvino_model(path, card, digest))
            run, run_rgb = openvino_runners(model, card, hint, threads or default_threads(),
                                            digest)
            return Network(card, "openvino", hint, torch.device("cpu"), digest, run, run_rgb)
        except WsisegError:
            raise
        except Exception as exc:  # noqa: BLE001 - a missing or broken OpenVINO, any error
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("OpenVINO cannot run %s (%s: %s); using the torch runtime instead",
                        path.name, type(exc).__name__, first[:200])
    module, card = load_weights(path, role=role, workflow=workflow, device="cpu")
    return torch_network(module, dev, card=card, precision=precision,
                         weights_sha256=weights_hash(path))


def resolve_choice(
    device: str | torch.device = "auto", runtime: str = "auto", precision: str = "auto",
) -> tuple[torch.device, str]:
    """The device and runtime :func:`load_network` uses for these choices, checked.

    A driver calls it before its first slide, on its own thread: a bad choice is then one
    error before any work, and OpenVINO is imported there, with this module. Imported on the
    thread that loads GuideNet beside the first slide's tissue mask, its import held the GIL
    and started inference 0.2 s later on a 3-Mpx slide (docs/benchmarks.md §8).

    Returns
    -------
    device : torch.device
    runtime : str
        ``"openvino"`` or ``"torch"`` (``auto`` resolved: OpenVINO on CPU, torch on CUDA).

    Raises
    ------
    WsisegError
        An unknown runtime or precision; OpenVINO asked for on CUDA; bf16 asked for on a CPU
        without it; see :func:`resolve_device`.
    """
    if runtime not in RUNTIMES:
        raise WsisegError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise WsisegError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if runtime == "openvino" and dev.type != "cpu":
        raise WsisegError(f"--runtime openvino runs on the CPU, not {dev}; use --device cpu "
                          f"or --runtime torch")
    if precision == "bf16" and dev.type == "cpu" and not cpu_has_bf16():
        raise WsisegError("--precision bf16: this CPU has no bf16 support; use auto or f32")
    if runtime == "auto":
        runtime = "openvino" if dev.type == "cpu" else "torch"
    return dev, runtime


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


def _openvino_precision(precision: str) -> str:
    """OpenVINO's inference precision for a checked choice (see :func:`resolve_choice`)."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "f32"
    return precision
