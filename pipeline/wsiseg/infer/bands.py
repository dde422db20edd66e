"""The threads around the network: patch reader, band blender and band writer."""

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

from wsiseg.errors import WsisegError
from wsiseg.infer.grid import blend_window

# Batches decoded ahead of the network, and finished bands queued for writing. Each bounds
# memory (a batch is B·3·P² bytes, a band W·band_px bytes).
_PREFETCH_BATCHES = 4
_PENDING_WRITES = 2




class ReadableImage(Protocol):
    """A ``(3, H, W)`` uint8 RGB array, channel first as the store holds it, that can be
    sliced (numpy array or zarr array)."""

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




# ------------------------------------------------------------------------------ the reader


@dataclass
class Batch:
    origins: NDArray[np.int64]  # (n, 2) row, col
    pixels: torch.Tensor  # (n, 3, P, P) uint8, pinned on CUDA


class PatchReader:
    """Background thread: decodes image row blocks once each and cuts batches of patches.

    Origins arrive in row-major order, so a decoded row block is dropped as soon as the
    current batch starts below it; at most ``(S + P) / rows_per_read + 2`` blocks are held.
    Blocks and batches are channel first, as stored and as the network takes them: each
    patch is copied once, from its block straight into the batch.
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
        self.height, self.width = int(image.shape[1]), int(image.shape[2])
        # Decode only the columns some patch needs.
        self.col0 = int(origins[:, 1].min())
        self.col1 = min(int(origins[:, 1].max()) + patch_px, self.width)
        self.read_s = 0.0
        self._blocks: dict[int, NDArray[np.uint8]] = {}  # row block → decoded (3, rows, cols)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_BATCHES)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wsiseg-infer-reader", daemon=True)

    def __enter__(self) -> PatchReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # a reader blocked on a full queue notices within 0.1 s
        self._thread.join()

    def __iter__(self) -> Iterator[Batch]:
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

    def _cut(self, origins: NDArray[np.int64]) -> Batch:
        t0 = time.perf_counter()
        size, block = self.patch_px, self.rows_per_read
        first = int(origins[0, 0]) // block
        last = (min(int(origins[-1, 0]) + size, self.height) - 1) // block
        for key in [k for k in self._blocks if k < first]:
            del self._blocks[key]
        for key in range(first, last + 1):
            if key not in self._blocks:
                rows = slice(key * block, min((key + 1) * block, self.height))
                self._blocks[key] = np.asarray(self.image[:, rows, self.col0 : self.col1])
        pixels = torch.empty((len(origins), 3, size, size), dtype=torch.uint8,
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
                src = self._blocks[key][:, r - key * block : r_end - key * block, c0:c1]
                out[i, :, r - row : r_end - row, : c1 - c0] = src
                r = r_end
        self.read_s += time.perf_counter() - t0
        return Batch(origins=origins, pixels=pixels)


# -------------------------------------------------------------------------- the band buffer


class BandBlender:
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


class BandWriter:
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
            band = band * mask_rows(self.clip, row0, row1, self.height, self.width)
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


def mask_rows(
    mask: NDArray[np.bool_], row0: int, row1: int, height: int, width: int
) -> NDArray[np.bool_]:
    """Rows [row0, row1) of a low-resolution mask, upsampled (nearest) to (height, width)."""
    mh, mw = mask.shape
    rr = np.minimum(((np.arange(row0, row1) + 0.5) * mh / height).astype(np.int64), mh - 1)
    cc = np.minimum(((np.arange(width) + 0.5) * mw / width).astype(np.int64), mw - 1)
    return mask[np.ix_(rr, cc)]
