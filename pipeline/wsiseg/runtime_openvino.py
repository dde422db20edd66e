"""A network on OpenVINO: compiled requests, uint8 RGB normalised inside the graph.

:func:`wsiseg.runtime.load_network` wraps what :func:`openvino_runners` returns in a
:class:`wsiseg.runtime.Network`; the converted and compiled models come from
:mod:`wsiseg.runtime_cache`. OpenVINO is imported with this module; where it is missing or
broken, :data:`NO_OPENVINO` holds the error and the runtime falls back to torch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import openvino as ov

    NO_OPENVINO: Exception | None = None
except Exception as exc:  # noqa: BLE001 - missing or broken: load_network warns, uses torch
    ov = None
    NO_OPENVINO = exc

from wsiseg.errors import WsisegError
from wsiseg.nets import ModelCard
from wsiseg.runtime_cache import compiled_model, entry_name


def openvino_runners(model: Callable[[], Any], card: ModelCard, precision: str, threads: int,
                     digest: str) -> tuple[Callable[[Any], Any], Callable[[Any], Any] | None]:
    """The float and the uint8-RGB callables of a :class:`wsiseg.runtime.Network` on
    OpenVINO (the second None unless the card takes RGB alone: GuideNet).

    ``model`` returns the converted ``openvino.Model``, read (or converted) only when a
    compiled one is not in the cache; ``precision`` is ``"f32"`` or ``"bf16"``; ``digest``
    the weights' sha256. The network the card takes is compiled (or imported) now, so that
    the load is paid where the caller expects it.
    """
    core = ov.Core()
    entry = entry_name(card, digest)
    config = compile_config(precision, threads)
    lock = threading.Lock()  # one request per model, reused; callers on threads take turns
    requests: dict[str, Any] = {}

    def request(kind: str) -> Any:
        """The infer request of the float (``"float"``) or uint8 (``"rgb"``) model, compiled
        on first use: a GuideNet in ``wsiseg run`` only ever needs the uint8 one."""
        if kind not in requests:
            def build() -> Any:
                return model() if kind == "float" else _with_rgb_input(model(), card)

            compiled = compiled_model(core, build, config, entry, kind)
            requests[kind] = compiled.create_infer_request()
        return requests[kind]

    def infer(kind: str, x: Any) -> Any:
        """``x`` (numpy or torch) through the ``kind`` model; the result is of ``x``'s kind."""
        as_numpy = isinstance(x, np.ndarray)
        array = x if as_numpy else x.detach().cpu().numpy()
        if kind == "float":
            array = np.ascontiguousarray(array, dtype=np.float32)
        elif array.dtype == np.uint8 and array.ndim == 4 and array.shape[1] == 3:
            array = np.ascontiguousarray(array)
        else:
            raise WsisegError(f"network: expected (N, 3, H, W) uint8 RGB, got "
                              f"{array.dtype} {tuple(array.shape)}")
        with lock:
            req = request(kind)
            req.infer({0: array}, share_inputs=True)
            prob = req.get_output_tensor(0).data.copy()  # the request reuses its buffer
        return prob if as_numpy else torch.from_numpy(prob)

    rgb_in = card.in_channels == 3  # GuideNet: RGB only, normalised by the card
    request("rgb" if rgb_in else "float")
    return (functools.partial(infer, "float"),
            functools.partial(infer, "rgb") if rgb_in else None)


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """The CPU plugin's properties a network is compiled with (``precision``: ``"f32"`` or
    ``"bf16"``; ``threads``: the cores granted)."""
    return {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        # One stream using every core the caller grants: batches arrive one at a time, and
        # the reading / writing threads are light (see docs/benchmarks.md).
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "PERFORMANCE_HINT": "LATENCY",
        # Not pinned: the cores are shared with this process's tiling, reading and writing
        # threads (and other workers); a pinned thread could not leave a busy core.
        "ENABLE_CPU_PINNING": False,
    }


def _with_rgb_input(model: Any, card: ModelCard) -> Any:
    """``model`` taking uint8 RGB ``(N, 3, H, W)``: OpenVINO's pre-processing converts and
    normalises (``(x / 255 − mean) / std``) inside the compiled graph, on its own threads,
    instead of a float copy of every batch made on the caller's thread."""
    from openvino.preprocess import PrePostProcessor

    mean = [255.0 * m for m in card.normalisation["mean"]]
    std = [255.0 * s for s in card.normalisation["std"]]
    ppp = PrePostProcessor(model.clone())
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NCHW"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).mean(mean).scale(std)
    return ppp.build()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as OpenVINO sees it."""
    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no OpenVINO (ov is None): the CPU's flags (Linux)
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
