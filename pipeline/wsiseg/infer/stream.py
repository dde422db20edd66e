"""GuideNet over a slide's tissue patches, streamed band by band into the store."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from wsiseg.errors import WsisegError
from wsiseg.infer.bands import (
    BandBlender,
    BandWriter,
    InferStats,
    PatchReader,
    ReadableImage,
    WritableMap,
)
from wsiseg.infer.grid import check_grid, patch_origins, tissue_patch_mask
from wsiseg.infer.network import as_network, forward_batch
from wsiseg.runtime import Network


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
    image : array-like, shape (3, H, W), uint8
        RGB at working resolution, channel first as the store holds it (zarr array or numpy
        array).
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
    reader = PatchReader(image, origins, patch_px, batch_size, rows_per_read, pin=on_cuda)
    # Glass is never tumor: with clip_to_tissue, probabilities outside the tissue mask (grown
    # by one mask pixel so coarse mask edges do not cut tumor borders) are written as 0.
    clip = ndimage.binary_dilation(tissue) if clip_to_tissue else None
    writer = BandWriter(outputs, clip, width, height, on_rows)
    blender = BandBlender(height, width, patch_px, band_px, device, writer)
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
                    prob = forward_batch(network, normalise, pixels, tta)
                    end.record()
                    timings.append((start, end))
                else:
                    t0 = time.perf_counter()
                    prob = forward_batch(network, normalise, pixels, tta)
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
    """Rows per chunk of a zarr (``(3, C, C)``) or dask (``((3,), (C, …), …)``) array;
    else None."""
    chunks = getattr(image, "chunks", None)
    first = chunks[1] if chunks and len(chunks) > 1 else None
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
    check_grid(patch_px, stride_px)
    if batch_size <= 0:
        raise WsisegError(f"guidenet.batch_size: must be positive, got {batch_size}")
    if band_px <= 0:
        raise WsisegError(f"tiling.chunk_px: must be positive, got {band_px}")
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3 or shape[0] != 3 or shape[1] == 0 or shape[2] == 0:
        raise WsisegError(f"slide store image: expected shape (3, H, W), got {shape}")
    dtype = getattr(image, "dtype", None)
    if dtype is not None and np.dtype(dtype) != np.uint8:
        raise WsisegError(f"slide store image: expected uint8, got {dtype}")
    for output in outputs:
        if tuple(int(n) for n in output.shape) != shape[1:]:
            raise WsisegError(
                f"slide store output: shape {tuple(output.shape)} does not match image "
                f"{shape[1:]}"
            )
    return shape[1], shape[2]
