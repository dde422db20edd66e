"""Windows for the interactive evaluation: RGB, ground truth and GuideNet's start.

Two sources:

- :func:`windows_from_patch_folder` — a folder of image/mask patch pairs (``images/`` +
  ``masks/``, as :func:`wsiseg.train.inputs.patch_pairs_from_folder` reads), taken as being at the
  working resolution; GuideNet weights make the starting probability of each whole patch;
- :func:`windows_from_store` — a slide store after ``wsiseg run`` (its ``image`` and ``guide``
  arrays) and the slide's ground truth (GeoJSON, mask image or a generated slide's
  ``*.truth.tiff``, read by :class:`wsiseg.evaluate.truth.TruthSource`).

Both cut the image into a grid of ``window_px`` windows that covers it with the least overlap
(:func:`grid_origins`). :func:`select_windows` then keeps the paper's kind of window — GuideNet
IoU within 0.50–0.75 — and caps their number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from wsiseg.errors import WsisegError
from wsiseg.evaluate.interactive import EvalWindow

__all__ = [
    "PAPER_IOU_RANGE",
    "grid_origins",
    "guidenet_probability",
    "select_windows",
    "windows_from_arrays",
    "windows_from_patch_folder",
    "windows_from_store",
]

#: DeepScribble evaluates on patches whose GuideNet IoU lies in 0.50–0.75.
PAPER_IOU_RANGE = (0.50, 0.75)

_NET_MULTIPLE = 32


def grid_origins(length: int, window_px: int) -> list[int]:
    """Origins of ``ceil(length / window_px)`` windows spread evenly over ``[0, length)``.

    The first starts at 0, the last ends at ``length``; overlaps are as small as the count
    allows. A length below one window gives the single origin 0.
    """
    if length <= window_px:
        return [0]
    count = math.ceil(length / window_px)
    return [int(v) for v in np.linspace(0, length - window_px, count).round()]


def windows_from_arrays(
    name: str,
    rgb: NDArray[np.uint8],
    truth: NDArray[np.bool_],
    guide: NDArray[np.floating],
    *,
    window_px: int,
) -> list[EvalWindow]:
    """Cut an image, its truth and its GuideNet probability into grid windows.

    Parameters
    ----------
    name : str
        Image name; windows are named ``<name>@row,col``.
    rgb : ndarray of uint8, shape (H, W, 3)
    truth : ndarray of bool, shape (H, W)
    guide : ndarray, shape (H, W)
        Probability: float in [0, 1], or uint8 × 255 as the slide store holds it.
    window_px : int
        Window edge; an image smaller than a window gives one window of the image's size.

    Raises
    ------
    WsisegError
        Sizes that differ.
    """
    rgb, truth, guide = np.asarray(rgb), np.asarray(truth, bool), np.asarray(guide)
    if truth.shape != rgb.shape[:2] or guide.shape != rgb.shape[:2]:
        raise WsisegError(
            f"{name}: image {rgb.shape[1]} × {rgb.shape[0]} px, truth {truth.shape[1]} × "
            f"{truth.shape[0]} and guide {guide.shape[1]} × {guide.shape[0]} differ in size"
        )
    return _grid_windows(name, lambda sl: rgb[sl], truth, guide, window_px)


def _grid_windows(
    name: str,
    read_rgb: Callable[[tuple[slice, slice]], NDArray[np.uint8]],
    truth: NDArray[np.bool_],
    guide: NDArray[np.floating],
    window_px: int,
) -> list[EvalWindow]:
    """The grid windows of :func:`windows_from_arrays`; ``read_rgb`` gives the (h, w, 3)
    RGB under a (rows, cols) slice, so a store's image is read window by window."""
    prob = guide.astype(np.float32) / 255.0 if guide.dtype == np.uint8 else guide
    out = []
    for r in grid_origins(truth.shape[0], window_px):
        for c in grid_origins(truth.shape[1], window_px):
            sl = (slice(r, r + window_px), slice(c, c + window_px))
            out.append(EvalWindow(name=f"{name}@{r},{c}",
                                  rgb=np.ascontiguousarray(read_rgb(sl)),
                                  truth=truth[sl].copy(),
                                  guide=np.asarray(prob[sl], np.float32).copy()))
    return out


def guidenet_probability(model, card, rgb: NDArray[np.uint8], device) -> NDArray[np.float32]:
    """GuideNet's tumor probability of a whole image in one pass (the U-Net is convolutional).

    The image is reflect-padded to a multiple of 32 on the bottom and right; the padding is
    cropped from the output.

    Returns
    -------
    ndarray of float32, shape (H, W)
    """
    import torch

    from wsiseg.infer import as_network
    from wsiseg.nets import normalise_rgb

    net = as_network(model, device)  # a runtime Network, or a bare torch module (logits)
    rows, cols = rgb.shape[:2]
    pad_r, pad_c = -rows % _NET_MULTIPLE, -cols % _NET_MULTIPLE
    mode = "reflect" if pad_r < rows and pad_c < cols else "edge"
    padded = np.pad(rgb, ((0, pad_r), (0, pad_c), (0, 0)), mode=mode)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(padded)).to(net.device)[None]
        x = x.permute(0, 3, 1, 2)
        # An OpenVINO GuideNet normalises uint8 inside its compiled model: the same graph
        # `wsiseg run` uses, compiled (or imported from the cache) once.
        out = net.rgb(x) if net.takes_rgb else net(normalise_rgb(x, card))
        prob = out[0, 0].float().cpu().numpy()
    return prob[:rows, :cols]


def windows_from_patch_folder(
    folder: Path,
    guidenet: Path,
    *,
    window_px: int,
    device: str = "cpu",
    runtime: str = "auto",
    precision: str = "auto",
) -> list[EvalWindow]:
    """Windows of every image/mask pair of a patch folder, GuideNet's start included.

    Parameters
    ----------
    folder : Path
        ``folder/images/*`` and ``folder/masks/*`` matched by name (mask > 127 is tumor).
    guidenet : Path
        GuideNet ``.safetensors``; it predicts each whole patch once.
    window_px : int
        Window edge (the RefineNet card's ``patch_px`` is the natural choice).
    device : str
    runtime, precision : str
        See :func:`wsiseg.runtime.load_network`.

    Raises
    ------
    WsisegError
        Missing ``images/`` or ``masks/``, no pairs, unpaired files, a mask whose size
        differs from its image's, bad weights.
    """
    from wsiseg.runtime import load_network
    from wsiseg.train.inputs import IMAGE_SUFFIXES, patch_pairs_from_folder

    folder = Path(folder)
    images, masks = patch_pairs_from_folder(folder)
    # The pairs come in the order of their sorted names (every image has its mask by now).
    names = sorted(p.stem for p in (folder / "images").iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES)
    net = load_network(Path(guidenet), role="guidenet", device=device, runtime=runtime,
                       precision=precision)
    out: list[EvalWindow] = []
    for name, rgb, truth in zip(names, images, masks, strict=True):
        prob = guidenet_probability(net, net.card, rgb, net.device)
        out += windows_from_arrays(f"{folder.name}/{name}", rgb, truth, prob,
                                   window_px=window_px)
    return out


def windows_from_store(
    store_path: Path,
    truth_path: Path,
    *,
    window_px: int,
    array: str = "guide",
) -> list[EvalWindow]:
    """Windows of a slide store (``image`` and GuideNet's ``guide``) with the slide's truth.

    Parameters
    ----------
    store_path : Path
        ``<slide-id>.zarr`` written by ``wsiseg run``.
    truth_path : Path
        Ground truth: QuPath GeoJSON (tumor classes of the store's workflow), a mask image
        covering the slide, or a generated slide's ``*.truth.tiff``.
    window_px : int
    array : {"guide", "refined"}
        The starting probability.

    Raises
    ------
    WsisegError
        Not a slide store, a store never run, an unreadable or mismatched truth file.
    """
    from wsiseg.evaluate.truth import TruthSource
    from wsiseg.store import SlideStore

    store = SlideStore.open(Path(store_path), mode="r")
    if store.stage("guide") != "done":
        raise WsisegError(f"{store_path}: GuideNet never ran on this store; `wsiseg run` it first")
    if array not in ("guide", "refined"):
        raise WsisegError(f"array must be guide or refined, got {array!r}")
    truth_source = TruthSource.open(Path(truth_path), store=store)
    rows, cols = store.frame.working_shape
    truth, counted = truth_source.window((0, 0, rows, cols))
    if not counted.all():
        # Ignore*/Region* annotations: the protocol scores whole windows, so uncounted
        # pixels count as what the truth says there (non-tumor).
        truth = truth & counted
    image = store["image"]  # (3, H, W): read window by window, never the whole slide

    def read_rgb(sl: tuple[slice, slice]) -> NDArray[np.uint8]:
        return np.moveaxis(np.asarray(image[(slice(None), *sl)]), 0, -1)

    guide = np.asarray(store[array][...])
    return _grid_windows(Path(store_path).stem, read_rgb, truth, guide, window_px)


def select_windows(
    windows: Sequence[EvalWindow],
    *,
    iou_range: tuple[float, float] | None = PAPER_IOU_RANGE,
    min_tumor_fraction: float = 0.0,
    max_windows: int | None = None,
    threshold: float = 0.5,
    seed: int = 0,
) -> list[EvalWindow]:
    """Windows whose GuideNet IoU lies in ``iou_range``, at most ``max_windows`` of them.

    Parameters
    ----------
    windows : sequence of EvalWindow
    iou_range : (float, float) or None
        Inclusive bounds of GuideNet's IoU (at ``threshold``); None keeps every window that
        has tumor in its truth or its prediction.
    min_tumor_fraction : float
        Least share of the window that is tumor in the truth. With a range reaching down to
        0, windows without tumor would count, where IoU stays 0 until the last false-positive
        pixel is gone (any method that paints the whole window non-tumor then "wins").
    max_windows : int, optional
        A random subset of this size (seeded) when more qualify, in the original order.
    threshold : float
    seed : int

    Raises
    ------
    WsisegError
        No window qualifies (the message gives the IoU range found).
    """
    ious = []
    for w in windows:
        pred = w.guide >= threshold
        union = np.count_nonzero(pred | w.truth)
        ious.append(np.nan if union == 0 else np.count_nonzero(pred & w.truth) / union)
    ious_arr = np.asarray(ious, dtype=np.float64)
    keep = ~np.isnan(ious_arr)
    keep &= np.array([w.truth.mean() >= min_tumor_fraction for w in windows], dtype=bool)
    if iou_range is not None:
        keep &= (ious_arr >= iou_range[0]) & (ious_arr <= iou_range[1])
    chosen = np.flatnonzero(keep)
    if chosen.size == 0:
        found = ious_arr[~np.isnan(ious_arr)]
        span = f"{found.min():.2f}–{found.max():.2f}" if found.size else "none with tumor"
        raise WsisegError(
            f"no window has a GuideNet IoU within {iou_range[0]:.2f}–{iou_range[1]:.2f} and "
            f"≥ {100 * min_tumor_fraction:g} % tumor (of {len(windows)} windows: IoU {span})"
            if iou_range is not None
            else f"none of {len(windows)} windows has tumor in its truth or prediction"
        )
    if max_windows is not None and chosen.size > max_windows:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(chosen, size=max_windows, replace=False))
    return [windows[int(i)] for i in chosen]
