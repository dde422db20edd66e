"""Refiners of one window for the interactive evaluation: ``(rgb, guide, scribbles) → prob``.

Every method of DeepScribble's Table 1 that wsiseg has is a plain callable on one window:

- :func:`refinenet_refiner` — RefineNet weights, through :func:`wsiseg.refine.refinenet_refiner`
  (the code ``wsiseg refine`` runs, so the six-channel encoding is the one of training);
- :func:`randomwalk_refiner` — scikit-image's random walker through
  :func:`wsiseg.refine.randomwalk_refiner`, seeded by the scribbles and by confident GuideNet
  pixels as ``wsiseg refine --refiner randomwalk`` does, or by the scribbles alone (the paper's
  baseline) with ``confident_margin=None``;
- :func:`watershed_refiner` — :func:`skimage.segmentation.watershed` on the Sobel gradient of the
  window, with the random walker's seeds;
- :func:`guidenet_refiner` — GuideNet alone, the floor: the prediction never changes.

A test passes any callable of the same shape (an oracle returning the truth, say).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from wsiseg.config import Workflow
    from wsiseg.nets import ModelCard

__all__ = [
    "Refiner",
    "guidenet_refiner",
    "randomwalk_refiner",
    "refinenet_refiner",
    "scribble_seeds",
    "watershed_refiner",
]

Refiner = Callable[[NDArray[np.uint8], NDArray[np.float32], NDArray[np.int8]], NDArray[np.floating]]
"""``refiner(rgb, guide, scribbles) → prob``: RGB uint8 (H, W, 3), GuideNet probability float32
(H, W) in [0, 1], accumulated scribbles int8 (H, W) (+1 tumor, −1 non-tumor, 0 none) → tumor
probability float (H, W) in [0, 1]."""

# The U-Net halves its input five times.
_NET_MULTIPLE = 32


def guidenet_refiner() -> Refiner:
    """GuideNet alone: returns the GuideNet probability whatever the scribbles (the floor)."""

    def refine(rgb, guide, scribbles):
        return np.asarray(guide, np.float32).copy()

    return refine


def refinenet_refiner(
    weights: Path,
    *,
    device: str = "cpu",
    workflow: Workflow | None = None,
    runtime: str = "auto",
    precision: str = "auto",
) -> tuple[Refiner, ModelCard]:
    """RefineNet on one window, as ``wsiseg refine`` runs it.

    The GuideNet probability is quantised to uint8 (× 255) first, as the slide store holds it.
    A window whose sides are not multiples of 32 is zero-padded to the next multiple (the
    padding is cropped from the output).

    Parameters
    ----------
    weights : Path
        RefineNet ``.safetensors`` with model card.
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    workflow : Workflow, optional
        When given, the card must fit it (window size, working mpp, distance saturation).
    runtime, precision : str
        See :func:`wsiseg.runtime.load_network` (OpenVINO on CPU by default).

    Returns
    -------
    refiner : Refiner
    card : ModelCard
        The weights' card (its ``threshold`` is the one to apply to the output).

    Raises
    ------
    WsisegError
        Missing or bad weights, or weights that do not fit ``workflow``.
    """
    from wsiseg.refine import refinenet_refiner as store_refiner
    from wsiseg.runtime import load_network

    net = load_network(Path(weights), role="refinenet", workflow=workflow, device=device,
                       runtime=runtime, precision=precision)
    card = net.card
    inner = store_refiner(net, batch_size=1)

    def refine(rgb, guide, scribbles):
        return _on_window(inner, rgb, guide, scribbles, multiple=_NET_MULTIPLE)

    return refine, card


def randomwalk_refiner(*, beta: float = 130.0, confident_margin: float | None = 0.4) -> Refiner:
    """scikit-image's random walker on one window.

    With a ``confident_margin`` it is exactly ``wsiseg refine --refiner randomwalk``
    (:func:`wsiseg.refine.randomwalk_refiner`: seeds from the scribbles and from GuideNet
    pixels within the margin of 0 or 1, conjugate gradient with a Jacobi preconditioner).
    With ``confident_margin=None`` it is the paper's RW baseline: seeded by the scribbles
    alone, which labels the whole window with the one class while only one class has been
    scribbled. Seeds that sparse leave the conjugate gradient with a badly conditioned system
    (16.7 s for a 192² window, measured), so the linear system is then solved directly
    (``mode="bf"``, 0.39 s, same probabilities to 1e-2).

    Parameters
    ----------
    beta : float
        Random-walker edge weight (the workflow's ``refinenet.randomwalk_beta``).
    confident_margin : float or None
        The workflow's ``refinenet.confident_margin``, or None for scribbles only.
    """
    if confident_margin is not None:
        from wsiseg.refine import randomwalk_refiner as store_refiner

        inner = store_refiner(beta, float(confident_margin))

        def refine_like_pipeline(rgb, guide, scribbles):
            seeds = scribble_seeds(guide, scribbles, confident_margin)
            if (seeds > 0).all():
                # Nothing left for the walker: skimage then returns the seed labels one-hot
                # (H, W, 2) instead of probabilities, which refine.py would misread.
                return (seeds == 1).astype(np.float32)
            return _on_window(inner, rgb, guide, scribbles, multiple=1)

        return refine_like_pipeline

    from skimage.segmentation import random_walker

    def refine_from_scribbles(rgb, guide, scribbles):
        seeds = scribble_seeds(guide, scribbles, None)
        present = np.unique(seeds[seeds > 0])
        if present.size < 2:
            return _one_class(seeds, present, guide)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prob = random_walker(np.asarray(rgb, np.float32) / 255.0, seeds, beta=beta,
                                 mode="bf", channel_axis=-1, return_full_prob=True)
        return np.clip(prob[0], 0.0, 1.0).astype(np.float32)

    return refine_from_scribbles


def watershed_refiner(*, confident_margin: float | None = 0.4) -> Refiner:
    """Marker watershed on the window's Sobel gradient, seeded like the random walker.

    The gradient is the Sobel magnitude of the grey image (:func:`skimage.color.rgb2gray`);
    the markers are :func:`scribble_seeds`. Tumor probability is 1 on the basins flooded from
    tumor seeds, 0 elsewhere. With seeds of one class only, the whole window is that class;
    with none (no scribble and no confident pixel), the GuideNet probability is returned.

    Parameters
    ----------
    confident_margin : float or None
        See :func:`randomwalk_refiner`.
    """
    from skimage.color import rgb2gray
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    def refine(rgb, guide, scribbles):
        seeds = scribble_seeds(guide, scribbles, confident_margin)
        present = np.unique(seeds[seeds > 0])
        if present.size < 2:
            return _one_class(seeds, present, guide)
        gradient = sobel(rgb2gray(np.asarray(rgb)))
        return (watershed(gradient, seeds) == 1).astype(np.float32)

    return refine


def baseline_refiners(
    *, beta: float, margins: Sequence[float], kinds: Sequence[str] = ("randomwalk", "watershed",
                                                                     "guidenet"),
) -> dict[str, Refiner]:
    """The non-learnt methods of the table by name, in the table's order.

    For each of ``kinds``: ``randomwalk`` and ``watershed`` each seeded as ``wsiseg refine``
    seeds them (scribbles plus GuideNet pixels within each of ``margins`` of 0 or 1) and by the
    scribbles alone (the paper's baselines); ``guidenet``, GuideNet alone (the floor).
    """
    methods: dict[str, Refiner] = {}
    if "randomwalk" in kinds:
        for m in margins:
            methods[f"RW (scribbles + GuideNet ±{m:g})"] = randomwalk_refiner(
                beta=beta, confident_margin=m)
        methods["RW (scribbles only)"] = randomwalk_refiner(beta=beta, confident_margin=None)
    if "watershed" in kinds:
        for m in margins:
            methods[f"WS (scribbles + GuideNet ±{m:g})"] = watershed_refiner(confident_margin=m)
        methods["WS (scribbles only)"] = watershed_refiner(confident_margin=None)
    if "guidenet" in kinds:
        methods["GuideNet alone"] = guidenet_refiner()
    return methods


def scribble_seeds(
    guide: NDArray[np.floating], scribbles: NDArray[np.int8], confident_margin: float | None
) -> NDArray[np.int32]:
    """Seed labels (1 tumor, 2 non-tumor, 0 free) from scribbles and confident GuideNet pixels.

    The rule of :func:`wsiseg.refine.randomwalk_refiner`: pixels with probability ≥ 1 − margin
    are tumor, ≤ margin non-tumor, and scribbles override both. ``confident_margin=None``:
    scribbles only.
    """
    guide = np.asarray(guide, np.float32)
    seeds = np.zeros(guide.shape, np.int32)
    if confident_margin is not None:
        seeds[guide >= 1.0 - confident_margin] = 1
        seeds[guide <= confident_margin] = 2
    seeds[scribbles > 0] = 1
    seeds[scribbles < 0] = 2
    return seeds


def _one_class(seeds, present, guide) -> NDArray[np.float32]:
    """Seeds of one class: the whole window is that class; of none: GuideNet's probability."""
    if present.size == 0:
        return np.asarray(guide, np.float32).copy()
    return np.full(seeds.shape, 1.0 if present[0] == 1 else 0.0, np.float32)


def _on_window(inner, rgb, guide, scribbles, *, multiple: int) -> NDArray[np.float32]:
    """Run a :data:`wsiseg.refine.Refiner` (store, windows, window_px) on one array window.

    The window is handed over as a minimal store (a mapping of the three arrays it reads,
    ``image`` channel first as a store holds it), at origin (0, 0), with a square size
    rounded up to ``multiple``; ``refine.read_window`` pads beyond the arrays (white RGB,
    zero otherwise), and the padding is cropped from the result.
    """
    rgb = np.asarray(rgb, np.uint8)
    guide = np.asarray(guide)
    if guide.dtype != np.uint8:
        guide = np.clip(np.rint(guide.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    rows, cols = guide.shape
    size = math.ceil(max(rows, cols) / multiple) * multiple
    store = {"image": np.moveaxis(rgb, -1, 0), "guide": guide,
             "scribbles": np.asarray(scribbles, np.int8)}
    prob = inner(store, [(0, 0)], size)[0]
    return np.asarray(prob, np.float32)[:rows, :cols]
