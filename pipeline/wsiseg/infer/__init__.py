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

Modules: :mod:`~wsiseg.infer.grid` (the patch grid and blending window),
:mod:`~wsiseg.infer.network` (a batch through the network, TTA), :mod:`~wsiseg.infer.bands`
(reader, blender and writer threads), :mod:`~wsiseg.infer.stream` (:func:`infer_to_store`).
"""

from wsiseg.infer.bands import InferStats, ReadableImage, WritableMap
from wsiseg.infer.grid import WINDOW_FLOOR, blend_window, patch_origins, tissue_patch_mask
from wsiseg.infer.network import (
    _autocast_dtype,
    as_network,
    dihedral_mean,
    predict_patches,
    prepare_model,
)
from wsiseg.infer.stream import infer_to_store
from wsiseg.runtime import resolve_device

__all__ = [
    "WINDOW_FLOOR",
    "InferStats",
    "ReadableImage",
    "WritableMap",
    "_autocast_dtype",
    "as_network",
    "blend_window",
    "dihedral_mean",
    "infer_to_store",
    "patch_origins",
    "predict_patches",
    "prepare_model",
    "resolve_device",
    "tissue_patch_mask",
]
