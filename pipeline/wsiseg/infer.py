"""GuideNet over every tissue patch of a slide, blended, streamed into the slide store.

The patch grid is fixed and global: origins at ``0, S, 2S, …`` on each axis plus a last
origin aligned to the border (``H - P``), so every pixel is covered; an image smaller than a
patch is zero-padded to one patch. Only patches whose window meets tissue (in the
low-resolution tissue mask) are computed, each exactly once.

The slide is processed in horizontal bands of ``band_px`` rows (one zarr chunk row). Band
``r`` holds the patches whose origin row lies in ``[r·B, (r+1)·B)``; their weighted
probabilities accumulate into float32 buffers covering rows ``[r·B, (r+1)·B + P)``. Once band
``r`` is done no later patch touches its rows, so they are final: ``round(255·acc/wsum)`` is
written as whole chunk rows and the ``P`` overflow rows are carried into the next band.
Memory is ``O(W × (B + P))``, independent of the slide height.

Three things run at once so the network never waits: a reader thread decodes image chunk
rows (each once) and cuts batches of patches, the calling thread runs the network and blends
(on the network's device), and a writer thread encodes finished bands into the outputs.

The network is a :class:`wsiseg.runtime.Network` (OpenVINO on CPU, torch on CUDA; see
:func:`wsiseg.runtime.load_network`); a bare torch module is run as the torch runtime.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from wsiseg.errors import WsisegError
from wsiseg.runtime import Network, resolve_device, torch_network

__all__ = ["resolve_device"]  # re-exported: it moved to wsiseg.runtime

#: Smallest blending weight: border pixels covered by a single patch still normalise.
WINDOW_FLOOR = 1e-3

# Batches decoded ahead of the network, and finished bands queued for writing. Each bounds
# memory (a batch is B·P²·3 bytes, a band W·band_px bytes).
_PREFETCH_BATCHES = 4
_PENDING_WRITES = 2


class ReadableImage(Protocol):
    """An ``(H, W, 3)`` uint8 array that can be sliced (numpy array or zarr array)."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


class WritableMap(Protocol):
    """An ``(H, W)`` uint8 array that can be assigned by slices (numpy array or zarr array)."""

    shape: tuple[int, ...]

    def __setitem__(self, key: Any, value: Any) -> None: ...


@dataclass
class InferStats:
    """Timings of one :func:`infer_to_store` run, in seconds.

    ``forward_s`` is the network's own time (normalisation, forward pass, sigmoid; device time
    on CUDA); ``read_s`` and ``write_s`` are spent in the background threads, so they overlap
    the forward pass; ``wait_s`` is the time the network waited for input batches.
    """

    patches: int = 0
    forward_s: float = 0.0
    total_s: float = 0.0
    read_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0

    @property
    def efficiency(self) -> float:
        """``forward_s / total_s``: 1 when the run costs no more than the network itself."""
        return self.forward_s / self.total_s if self.total_s > 0 else 0.0


# --------------------------------------------------------------------------- device, model


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` in eval mode and channels-last layout (in place).

    Channels-last suits the NHWC patches as decoded (no transposing copy) and is the fast
    layout for convolutions on CUDA (tensor cores) and on CPU (oneDNN) alike. On CUDA, cuDNN
    may pick its fastest kernels for the one patch shape used throughout.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device=device, memory_format=torch.channels_last).eval()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ------------------------------------------------------------------------------ patch grid


def _axis_origins(length: int, patch_px: int, stride_px: int) -> NDArray[np.int64]:
    last = max(length - patch_px, 0)
    origins = np.arange(0, last + 1, stride_px, dtype=np.int64)
    if origins[-1] != last:
        origins = np.append(origins, np.int64(last))
    return origins


def _check_grid(patch_px: int, stride_px: int) -> None:
    if patch_px <= 0 or stride_px <= 0:
        raise WsisegError(
            f"guidenet.patch_px ({patch_px}) and guidenet.stride_px ({stride_px}) "
            "must be positive"
        )
    if stride_px > patch_px:
        raise WsisegError(
            f"guidenet.stride_px ({stride_px}) exceeds guidenet.patch_px ({patch_px}): "
            "patches would leave gaps"
        )


def patch_origins(shape: tuple[int, int], patch_px: int, stride_px: int) -> NDArray[np.int64]:
    """Top-left corners of the global patch grid over an image.

    Parameters
    ----------
    shape : (int, int)
        Image ``(H, W)`` in working pixels.
    patch_px, stride_px : int
        Patch edge ``P`` and stride ``S`` (``0 < S ≤ P``), working pixels.

    Returns
    -------
    ndarray of int64, shape (N, 2)
        ``(row, col)`` origins in row-major order: ``0, S, 2S, …`` on each axis plus the
        border-aligned ``H - P`` (``W - P``) so every pixel is covered. A side shorter than
        ``P`` has the single origin 0 (the patch is zero-padded).
    """
    _check_grid(patch_px, stride_px)
    rows = _axis_origins(int(shape[0]), patch_px, stride_px)
    cols = _axis_origins(int(shape[1]), patch_px, stride_px)
    grid_rows, grid_cols = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1)


def tissue_patch_mask(
    origins: NDArray[np.int64],
    patch_px: int,
    tissue: NDArray[np.bool_],
    shape: tuple[int, int],
) -> NDArray[np.bool_]:
    """Which patches meet tissue.

    Parameters
    ----------
    origins : ndarray of int64, shape (N, 2)
        Patch ``(row, col)`` origins in working pixels.
    patch_px : int
        Patch edge in working pixels.
    tissue : ndarray of bool, shape (h, w)
        Low-resolution tissue mask of the whole image; one tissue pixel spans
        ``(H / h, W / w)`` working pixels (fractional scales are fine).
    shape : (int, int)
        Working image ``(H, W)``.

    Returns
    -------
    ndarray of bool, shape (N,)
        True where any tissue pixel overlapping the patch window (clipped to the image) is set.
    """
    tissue = np.asarray(tissue)
    if tissue.ndim != 2 or tissue.size == 0:
        raise WsisegError(f"tissue mask: expected a non-empty 2-D array, got shape {tissue.shape}")
    height, width = int(shape[0]), int(shape[1])
    mask_h, mask_w = tissue.shape
    origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
    # Summed-area table: the tissue count inside any window in O(1).
    table = np.zeros((mask_h + 1, mask_w + 1), dtype=np.int64)
    table[1:, 1:] = tissue.astype(bool).cumsum(0, dtype=np.int64).cumsum(1)

    def span(start: NDArray[np.int64], length: int, mask_len: int) -> tuple[NDArray, NDArray]:
        stop = np.minimum(start + patch_px, length)
        # Exact integer floor/ceil of working → tissue pixel coordinates.
        lo = (start * mask_len) // length
        hi = -((-stop * mask_len) // length)
        lo = np.clip(lo, 0, mask_len)
        return lo, np.clip(np.maximum(hi, lo + 1), 0, mask_len)

    r0, r1 = span(origins[:, 0], height, mask_h)
    c0, c1 = span(origins[:, 1], width, mask_w)
    count = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return count > 0


def blend_window(patch_px: int) -> NDArray[np.float32]:
    """2-D Hann (raised-cosine) blending window with a small positive floor.

    Returns
    -------
    ndarray of float32, shape (P, P)
        Peak 1 at the centre, falling smoothly to :data:`WINDOW_FLOOR` at the borders, so
        overlapping patches fade into each other without seams.
    """
    centres = (np.arange(patch_px, dtype=np.float64) + 0.5) / patch_px
    hann = np.sin(np.pi * centres) ** 2
    return np.maximum(np.outer(hann, hann), WINDOW_FLOOR).astype(np.float32)


# --------------------------------------------------------------------------------- network


def as_network(model: Network | torch.nn.Module, device: torch.device) -> Network:
    """A :class:`wsiseg.runtime.Network` as is; a bare torch module (logits out) wrapped as
    the torch runtime on ``device`` (the reference path, and what tests pass)."""
    if isinstance(model, Network):
        return model
    return torch_network(model, device)


def _forward(
    network: Network,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    batch_nhwc: torch.Tensor,
    tta: bool,
) -> torch.Tensor:
    """(N, P, P, 3) uint8 → (N, P, P) float32 probabilities (on the network's device)."""
    # The NHWC → NCHW permute is a view with channels-last strides: no copy.
    x = normalise(batch_nhwc.permute(0, 3, 1, 2))
    if not tta:
        return network(x)[:, 0]
    return dihedral_mean(lambda t: network(t)[:, 0], x)


def dihedral_mean(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Test-time augmentation: the mean of ``predict`` over the 8 flips / 90° rotations.

    ``x`` is (N, C, H, W) with square H = W; ``predict`` maps it to (N, H, W) probabilities.
    Each prediction is mapped back before averaging, so every channel of ``x`` (RGB, guide,
    scribble distances) moves with the image.
    """
    total = torch.zeros(x.shape[0], x.shape[2], x.shape[3], device=x.device)
    for flip in (False, True):
        xf = torch.flip(x, dims=(3,)) if flip else x
        for k in range(4):
            prob = torch.rot90(predict(torch.rot90(xf, k, dims=(2, 3))), -k, dims=(1, 2))
            total += torch.flip(prob, dims=(2,)) if flip else prob
    return total / 8


def predict_patches(
    model: Network | torch.nn.Module,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    batch_uint8: NDArray[np.uint8],
    device: torch.device,
    *,
    tta: bool = False,
) -> NDArray[np.float32]:
    """Tumor probabilities of a batch of RGB patches (the network's own work, nothing else).

    Parameters
    ----------
    model : Network or torch.nn.Module
        GuideNet from :func:`wsiseg.runtime.load_network`, or a bare torch module mapping
        ``(N, 3, P, P)`` float to ``(N, 1, P, P)`` logits (run as the torch runtime).
    normalise : callable
        ``(N, 3, P, P)`` uint8 tensor (channels-last strides) → float tensor, e.g.
        ``nets.normalise_rgb`` bound to the model card.
    batch_uint8 : ndarray of uint8, shape (N, P, P, 3)
    device : torch.device
    tta : bool
        Average over the 8 dihedral transforms (flips and quarter turns).

    Returns
    -------
    ndarray of float32, shape (N, P, P)
        Sigmoid of the logits.
    """
    network = as_network(model, device)
    pin = network.device.type == "cuda"
    x = torch.from_numpy(np.ascontiguousarray(batch_uint8))
    with torch.inference_mode():
        x = x.pin_memory() if pin else x
        prob = _forward(network, normalise, x.to(network.device, non_blocking=pin), tta)
        return prob.cpu().numpy()


# ------------------------------------------------------------------------------ the reader


@dataclass
class _Batch:
    origins: NDArray[np.int64]  # (n, 2) row, col
    pixels: torch.Tensor  # (n, P, P, 3) uint8, pinned on CUDA


class _PatchReader:
    """Background thread: decodes image row blocks once each and cuts batches of patches.

    Origins arrive in row-major order, so a decoded row block is dropped as soon as the
    current batch starts below it; at most ``(S + P) / rows_per_read + 2`` blocks are held.
    """

    _DONE = object()

    def __init__(
        self,
        image: ReadableImage,
        origins: NDArray[np.int64],
        patch_px: int,
        batch_size: int,
        rows_per_read: int,
        pin: bool,
    ) -> None:
        self.image = image
        self.origins = origins
        self.patch_px = patch_px
        self.batch_size = batch_size
        self.rows_per_read = rows_per_read
        self.pin = pin
        self.height, self.width = int(image.shape[0]), int(image.shape[1])
        # Decode only the columns some patch needs.
        self.col0 = int(origins[:, 1].min())
        self.col1 = min(int(origins[:, 1].max()) + patch_px, self.width)
        self.read_s = 0.0
        self._blocks: dict[int, NDArray[np.uint8]] = {}  # row block index → decoded rows
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wsiseg-infer-reader", daemon=True)

    def __enter__(self) -> _PatchReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # a reader blocked on a full queue notices within 0.1 s
        self._thread.join()

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                for start in range(0, len(self.origins), self.batch_size):
                    if self._stop.is_set():
                        return
                    batch = self._cut(self.origins[start : start + self.batch_size])
                    if not self._put(batch):
                        return
            self._put(self._DONE)
        except BaseException as error:  # handed to the consuming thread, which re-raises
            self._put(error)

    def _cut(self, origins: NDArray[np.int64]) -> _Batch:
        t0 = time.perf_counter()
        size, block = self.patch_px, self.rows_per_read
        first = int(origins[0, 0]) // block
        last = (min(int(origins[-1, 0]) + size, self.height) - 1) // block
        for key in [k for k in self._blocks if k < first]:
            del self._blocks[key]
        for key in range(first, last + 1):
            if key not in self._blocks:
                rows = slice(key * block, min((key + 1) * block, self.height))
                self._blocks[key] = np.asarray(self.image[rows, self.col0 : self.col1])
        pixels = torch.empty((len(origins), size, size, 3), dtype=torch.uint8,
                             pin_memory=self.pin)
        if self.height < size or self.width < size:
            pixels.fill_(255)  # a slide smaller than a patch: beyond its edge is white glass
        out = pixels.numpy()
        for i, (row, col) in enumerate(origins.tolist()):
            c0 = col - self.col0
            c1 = min(c0 + size, self.col1 - self.col0)
            r = row
            stop = min(row + size, self.height)
            while r < stop:  # the patch may span several decoded blocks
                key = r // block
                r_end = min((key + 1) * block, stop)
                src = self._blocks[key][r - key * block : r_end - key * block, c0:c1]
                out[i, r - row : r_end - row, : c1 - c0] = src
                r = r_end
        self.read_s += time.perf_counter() - t0
        return _Batch(origins=origins, pixels=pixels)


# -------------------------------------------------------------------------- the band buffer


class _BandBlender:
    """Weighted accumulation over one band of rows plus the ``P`` rows it spills into.

    The buffers live where the probabilities are: torch tensors on CUDA (blending costs no
    transfer and queues behind the network), numpy arrays on CPU (single-threaded, so the
    many small slice updates do not wait on the network's thread pool).
    """

    def __init__(
        self,
        height: int,
        width: int,
        patch_px: int,
        band_px: int,
        device: torch.device,
        write: Callable[[int, int, Any, Any], None],
    ) -> None:
        self.height, self.width, self.patch_px, self.band_px = height, width, patch_px, band_px
        self.on_cuda = device.type == "cuda"
        shape = (band_px + patch_px, max(width, patch_px))
        window = blend_window(patch_px)
        if self.on_cuda:
            self.acc: Any = torch.zeros(shape, dtype=torch.float32, device=device)
            self.window: Any = torch.from_numpy(window).to(device)
        else:
            self.acc, self.window = np.zeros(shape, dtype=np.float32), window
        self.wsum = self.acc * 0
        self.write = write
        self.band = 0  # index of the band whose rows start the buffer
        self.touched_until = 0  # absolute row below which patches have written (exclusive)
        self.dirty = False

    def add(self, origins: NDArray[np.int64], prob: torch.Tensor) -> None:
        """Accumulate patches ``(n, P, P)`` at ``origins`` (row-major order)."""
        weighted = (prob if self.on_cuda else prob.numpy()) * self.window
        size = self.patch_px
        for i, (row, col) in enumerate(origins.tolist()):
            band = row // self.band_px
            while self.band < band:
                self._finish_band()
            r = row - self.band * self.band_px
            self.acc[r : r + size, col : col + size] += weighted[i]
            self.wsum[r : r + size, col : col + size] += self.window
            self.touched_until = max(self.touched_until, row + size)
            self.dirty = True

    def close(self) -> None:
        """Finish every band that still holds accumulated rows."""
        while self.dirty:
            self._finish_band()

    def _finish_band(self) -> None:
        band_px, size = self.band_px, self.patch_px
        row0 = self.band * band_px
        row1 = min(row0 + band_px, self.height)
        if self.dirty and row0 < row1 and self.touched_until > row0:
            acc = self.acc[: row1 - row0, : self.width]
            wsum = self.wsum[: row1 - row0, : self.width]
            if self.on_cuda:
                prob = torch.where(wsum > 0, acc / wsum.clamp_min(1e-30), 0.0)
                _check_finite(bool(torch.isfinite(prob).all()), row0, row1)
                band = torch.round(prob * 255).clamp_(0, 255).to(torch.uint8)
                host = torch.empty(band.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(band, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record()
                self.write(row0, row1, host.numpy(), landed)
            else:
                prob = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
                _check_finite(bool(np.isfinite(prob).all()), row0, row1)
                band = np.rint(prob * 255).clip(0, 255).astype(np.uint8)
                self.write(row0, row1, band, None)
        if self.dirty and self.touched_until > row0 + band_px:
            # Carry the spill rows to the top of the buffer; the rest starts empty.
            for buf in (self.acc, self.wsum):
                spill = buf[band_px : band_px + size]
                buf[:size] = spill.clone() if self.on_cuda else spill.copy()
                buf[size:] = 0
        elif self.dirty:
            self.acc[:] = 0
            self.wsum[:] = 0
            self.dirty = False
        self.band += 1


def _check_finite(finite: bool, row0: int, row1: int) -> None:
    # NaN would be written as 0 (no tumor) without a word: stop the slide with the reason.
    if not finite:
        raise WsisegError(f"GuideNet's probabilities are not finite (NaN or infinity) in "
                          f"working rows {row0}–{row1}: broken weights or input; slide stopped")


# ------------------------------------------------------------------------------ the writer


class _BandWriter:
    """Writes finished bands into every output on one background thread."""

    def __init__(
        self, outputs: Sequence[WritableMap], clip: NDArray[np.bool_] | None = None,
        width: int = 0, height: int = 0, on_rows: Callable[[int], None] | None = None,
    ) -> None:
        self.outputs = outputs
        self.clip, self.width, self.height = clip, width, height
        self.on_rows = on_rows
        self.write_s = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsiseg-infer-writer")
        self._pending: deque[Future[None]] = deque()

    def __call__(self, row0: int, row1: int, band: NDArray[np.uint8], event: Any) -> None:
        while len(self._pending) >= _PENDING_WRITES:  # bound the bands held in memory
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, row0, row1, band, event))

    def _write(self, row0: int, row1: int, band: NDArray[np.uint8], event: Any) -> None:
        if event is not None:
            event.synchronize()  # the device → host copy has landed
        t0 = time.perf_counter()
        if self.clip is not None:
            band = band * _mask_rows(self.clip, row0, row1, self.height, self.width)
        for output in self.outputs:
            output[row0:row1, :] = band
        self.write_s += time.perf_counter() - t0
        if self.on_rows is not None:  # bands finish in order: every row above is final too
            self.on_rows(row1)

    def close(self, wait: bool = True) -> None:
        try:
            while wait and self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=not wait)


def _mask_rows(
    mask: NDArray[np.bool_], row0: int, row1: int, height: int, width: int
) -> NDArray[np.bool_]:
    """Rows [row0, row1) of a low-resolution mask, upsampled (nearest) to (height, width)."""
    mh, mw = mask.shape
    rr = np.minimum(((np.arange(row0, row1) + 0.5) * mh / height).astype(np.int64), mh - 1)
    cc = np.minimum(((np.arange(width) + 0.5) * mw / width).astype(np.int64), mw - 1)
    return mask[np.ix_(rr, cc)]


# ----------------------------------------------------------------------------- entry point


def infer_to_store(
    image: ReadableImage,
    outputs: Sequence[WritableMap],
    *,
    model: Network | torch.nn.Module,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    tissue: NDArray[np.bool_],
    patch_px: int,
    stride_px: int,
    batch_size: int,
    device: torch.device,
    band_px: int,
    progress: Callable[[int], None] | None = None,
    tta: bool = False,
    clip_to_tissue: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> InferStats:
    """Run GuideNet over every tissue patch of ``image`` and write the blended probabilities.

    Parameters
    ----------
    image : array-like, shape (H, W, 3), uint8
        RGB at working resolution (zarr array or numpy array).
    outputs : sequence of array-like, shape (H, W), uint8
        Written with identical data, ``round(255 · p)``, e.g. ``[store["guide"],
        store["refined"]]``. Bands of rows without any tissue patch are not written (they
        keep the fill value 0), so the outputs should start empty.
    model : Network or torch.nn.Module
        GuideNet from :func:`wsiseg.runtime.load_network` (OpenVINO or torch), or a bare
        torch module ``(N, 3, P, P) → (N, 1, P, P)`` logits, run as the torch runtime on
        ``device`` (moved there in eval mode and channels-last, in place).
    normalise : callable
        ``(N, 3, P, P)`` uint8 tensor → float tensor on the same device.
    tissue : ndarray of bool, shape (h, w)
        Low-resolution tissue mask of the whole image.
    patch_px, stride_px : int
        Patch edge ``P`` and stride ``S`` in working pixels, ``0 < S ≤ P``.
    batch_size : int
        Patches per forward pass.
    device : torch.device
        From :func:`resolve_device`; a :class:`Network` runs where it was loaded. On CUDA
        batches are copied pinned and asynchronously, and blending happens on the device.
    band_px : int
        Rows per band; the outputs' chunk height (or a multiple) keeps writes chunk-aligned.
    progress : callable, optional
        Called with the number of patches done since the previous call.
    tta : bool
        Average each patch over the 8 dihedral transforms before blending.
    clip_to_tissue : bool
        Write 0 outside the tissue mask (grown by one mask pixel): glass is never tumor.
    on_rows : callable, optional
        Called with ``row1`` (on the writer thread) once rows ``[0, row1)`` of every output
        are written and final, e.g. :meth:`wsiseg.contours.RowStreamTracer.rows_final`.

    Returns
    -------
    InferStats
    """
    t_start = time.perf_counter()
    height, width = _check_inputs(image, outputs, patch_px, stride_px, batch_size, band_px)
    origins = patch_origins((height, width), patch_px, stride_px)
    origins = origins[tissue_patch_mask(origins, patch_px, tissue, (height, width))]
    stats = InferStats(patches=len(origins))
    if len(origins) == 0:
        stats.total_s = time.perf_counter() - t_start
        return stats

    network = as_network(model, device)
    device = network.device
    on_cuda = device.type == "cuda"
    rows_per_read = _chunk_rows(image) or band_px
    reader = _PatchReader(image, origins, patch_px, batch_size, rows_per_read, pin=on_cuda)
    # Glass is never tumor: with clip_to_tissue, probabilities outside the tissue mask (grown
    # by one mask pixel so coarse mask edges do not cut tumor borders) are written as 0.
    clip = ndimage.binary_dilation(tissue) if clip_to_tissue else None
    writer = _BandWriter(outputs, clip, width, height, on_rows)
    blender = _BandBlender(height, width, patch_px, band_px, device, writer)
    timings: list[tuple[Any, Any]] = []  # CUDA events around each forward pass
    ok = False
    try:
        with reader, torch.inference_mode():
            batches = iter(reader)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                stats.wait_s += time.perf_counter() - t_wait
                if batch is None:
                    break
                pixels = batch.pixels.to(device, non_blocking=on_cuda)
                if on_cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record()
                    prob = _forward(network, normalise, pixels, tta)
                    end.record()
                    timings.append((start, end))
                else:
                    t0 = time.perf_counter()
                    prob = _forward(network, normalise, pixels, tta)
                    stats.forward_s += time.perf_counter() - t0
                blender.add(batch.origins, prob)
                if progress is not None:
                    progress(len(batch.origins))
            blender.close()
        ok = True
    finally:
        writer.close(wait=ok)
    if on_cuda:
        torch.cuda.synchronize(device)
        stats.forward_s = sum(s.elapsed_time(e) for s, e in timings) / 1000.0
    stats.read_s, stats.write_s = reader.read_s, writer.write_s
    stats.total_s = time.perf_counter() - t_start
    return stats


def _chunk_rows(image: ReadableImage) -> int | None:
    """Rows per chunk of a zarr (``(C, C, 3)``) or dask (``((C, …), …)``) array; else None."""
    chunks = getattr(image, "chunks", None)
    first = chunks[0] if chunks else None
    if isinstance(first, tuple):
        first = first[0] if first else None
    return int(first) if first else None


def _check_inputs(
    image: ReadableImage,
    outputs: Sequence[WritableMap],
    patch_px: int,
    stride_px: int,
    batch_size: int,
    band_px: int,
) -> tuple[int, int]:
    _check_grid(patch_px, stride_px)
    if batch_size <= 0:
        raise WsisegError(f"guidenet.batch_size: must be positive, got {batch_size}")
    if band_px <= 0:
        raise WsisegError(f"tiling.chunk_px: must be positive, got {band_px}")
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3 or shape[2] != 3 or shape[0] == 0 or shape[1] == 0:
        raise WsisegError(f"slide store image: expected shape (H, W, 3), got {shape}")
    dtype = getattr(image, "dtype", None)
    if dtype is not None and np.dtype(dtype) != np.uint8:
        raise WsisegError(f"slide store image: expected uint8, got {dtype}")
    for output in outputs:
        if tuple(int(n) for n in output.shape) != shape[:2]:
            raise WsisegError(
                f"slide store output: shape {tuple(output.shape)} does not match image "
                f"{shape[:2]}"
            )
    return shape[0], shape[1]
