"""Correction scribbles: one where a prediction is most wrong, and the mix RefineNet trains on.

They come from the papers' two simulators, plain functions on (H, W) masks seeded through a
:class:`numpy.random.Generator` passed in (same seed → identical output):

- :func:`deepscribble_scribbles` — DeepScribble §2.2.3: for every false-positive and
  false-negative region, distance transform → keep the core → skeletonise ("the user generally
  draws on the centre of the mislabelled region").
- :func:`human_scribbles` — Interactive Scribble Segmentation §2.3: per connected component,
  points sampled tile by tile from distance × dilated skeleton with a minimum spacing, minimum
  spanning tree with the length outside the label costing 3×, edge-drop augmentation, longest
  paths fitted with B-splines and drawn with a round brush of radius 2.

On top of them (:mod:`wsiseg.scribbles.deepscribble`, :mod:`wsiseg.scribbles.human`):
:func:`correction_scribble` (the iterative-training / interactive-evaluation rule of §2.4:
one scribble where the prediction is most wrong) and :func:`simulate_scribbles` (the
per-sample mix RefineNet training draws from). ``wsiseg scribbles simulate`` draws them over a
mask (:mod:`wsiseg.scribbles.preview`).

Label rasters follow the slide store's convention: int8, +1 tumor, −1 non-tumor, 0 none.
Coordinates inside are ``(row, col)`` pixels of the array.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.morphology import disk

from wsiseg.scribbles._masks import EIGHT, pair_masks
from wsiseg.scribbles.deepscribble import deepscribble_scribbles, limit_scribble_size
from wsiseg.scribbles.human import human_scribbles

__all__ = ["correction_scribble", "human_corrections", "simulate_scribbles"]


def correction_scribble(
    truth: NDArray[np.bool_],
    prediction: NDArray,
    *,
    rng: np.random.Generator,
    radius_px: int = 2,
    min_error_fraction: float = 0.01,
) -> NDArray[np.int8]:
    """One correction scribble where the prediction is wrong (ISS §2.4, iterative training).

    1. Errors are ``FP = prediction & ~truth`` and ``FN = truth & ~prediction`` (a float
       prediction is thresholded at 0.5, the paper's "difference thresholded at 0.5"). If
       ``|FP| + |FN| < min_error_fraction × H × W`` nothing is added. The paper measures the
       1 % against "the segmentation area"; for pathology patches, where either class can
       fill most of the patch, the patch area is the stable reference, so that is used here.
    2. More FP than FN → a negative (−1) scribble, otherwise positive (+1), as in the paper.
    3. The temporary label is the largest 8-connected error region of that kind, dilated by
       "the approximate radius of the ground truth segmentation" — ``√(area / π)`` of the truth
       class the scribble asserts — but at most the region's own ``√(area / π)``: in a patch
       where tumor covers half of 384², the paper's radius alone (≈150 px) would spread the
       scribble over the whole class instead of the error. The dilated region is clipped to the
       truth class and only its parts touching the error region are kept.
    4. :func:`human_scribbles` on the temporary label, clipped to the truth class. If it draws
       nothing (a region too small for a stroke), a dot of ``radius_px`` at the region's
       deepest pixel, so an error above the threshold always gets a scribble.

    Parameters
    ----------
    truth : (H, W) bool
        Ground truth tumor mask.
    prediction : (H, W) bool or float
        Current prediction (float: probability).
    rng : numpy.random.Generator
        Source of all randomness.
    radius_px : int
        Brush radius in pixels.
    min_error_fraction : float
        Errors below this fraction of the patch get no scribble.

    Returns
    -------
    (H, W) int8
        The additional scribble, +1 or −1 on its pixels (all one sign), 0 elsewhere; it lies
        inside the truth class it asserts.
    """
    truth, pred = pair_masks(truth, prediction)
    out = np.zeros(truth.shape, dtype=np.int8)
    fn = truth & ~pred
    fp = pred & ~truth
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn + n_fp == 0 or n_fn + n_fp < min_error_fraction * truth.size:
        return out
    sign, errors, asserted = (-1, fp, ~truth) if n_fp > n_fn else (1, fn, truth)

    labels, n = ndimage.label(errors, structure=EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    region = labels == int(np.argmax(sizes)) + 1
    grow_px = min(np.sqrt(asserted.sum() / np.pi), np.sqrt(region.sum() / np.pi))
    temp = (ndimage.distance_transform_edt(~region) <= grow_px) & asserted
    parts, _ = ndimage.label(temp, structure=EIGHT)
    touching = np.unique(parts[region])
    temp = np.isin(parts, touching[touching > 0])

    stroke = human_scribbles(temp, rng=rng, radius_px=radius_px) & asserted
    if not stroke.any():
        depth = ndimage.distance_transform_edt(region)
        r, c = np.unravel_index(np.argmax(depth), depth.shape)
        stroke[r, c] = True
        if radius_px > 0:
            stroke = ndimage.binary_dilation(stroke, structure=disk(radius_px)) & asserted
    out[stroke] = sign
    return out


def simulate_scribbles(
    truth: NDArray[np.bool_],
    prediction: NDArray,
    *,
    rng: np.random.Generator,
    mix: float = 0.5,
    max_fraction: float | None = None,
    confirm_prob: float = 0.3,
    radius_px: int = 2,
) -> NDArray[np.int8]:
    """Correction scribbles for one RefineNet training sample.

    With probability ``mix``: :func:`deepscribble_scribbles`. Otherwise human-like ones: a
    :func:`human_scribbles` stroke set inside the false-negative regions (+1) and inside the
    false-positive regions (−1), each clipped to the truth class it asserts; and, with
    probability ``confirm_prob``, one stroke on a correctly predicted region (tumor or
    non-tumor at random), as a pathologist sometimes marks what is already right — so the
    network learns that a scribble does not always mean "flip this".

    Parameters
    ----------
    truth : (H, W) bool
        Ground truth tumor mask.
    prediction : (H, W) bool or float
        GuideNet's prediction (float: probability, thresholded at 0.5).
    rng : numpy.random.Generator
        Source of all randomness.
    mix : float
        Probability of DeepScribble's automatic scribbles.
    max_fraction : float, optional
        Cap on scribbled pixels as a fraction of the patch (DeepScribble's interactive protocol
        uses 0.0005); strokes are dropped or trimmed to stay under it.
    confirm_prob : float
        Probability of the extra stroke on a correct region (human-like branch only).
    radius_px : int
        Brush radius of human-like strokes.

    Returns
    -------
    (H, W) int8
        +1 tumor, −1 non-tumor, 0 none; never a label that contradicts ``truth``.
    """
    truth, pred = pair_masks(truth, prediction)
    if rng.random() < mix:
        out = deepscribble_scribbles(truth, pred, rng=rng)
    else:
        out = human_corrections(truth, pred, rng=rng, radius_px=radius_px)
        if rng.random() < confirm_prob:
            choices = [(s, m) for s, m in ((1, truth & pred), (-1, ~truth & ~pred)) if m.any()]
            if choices:
                sign, correct = choices[rng.integers(len(choices))]
                asserted = truth if sign > 0 else ~truth
                strokes = human_scribbles(correct, rng=rng, radius_px=radius_px) & asserted
                pieces, n = ndimage.label(strokes, structure=EIGHT)
                if n:
                    out[(pieces == rng.integers(1, n + 1)) & (out == 0)] = sign
    if max_fraction is not None:
        out = limit_scribble_size(out, int(max_fraction * out.size), rng=rng)
    return out


def human_corrections(
    truth: NDArray[np.bool_],
    pred: NDArray[np.bool_],
    *,
    rng: np.random.Generator,
    radius_px: int,
) -> NDArray[np.int8]:
    """Human-like strokes on every FN (+1) and FP (−1) region, clipped to the truth class."""
    out = np.zeros(truth.shape, dtype=np.int8)
    out[human_scribbles(truth & ~pred, rng=rng, radius_px=radius_px) & truth] = 1
    out[human_scribbles(pred & ~truth, rng=rng, radius_px=radius_px) & ~truth] = -1
    return out
