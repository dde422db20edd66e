"""DeepScribble's interactive protocol with a simulated pathologist: NoI@85/90, SPI, IoU curves.

For every window (RGB, ground truth, GuideNet's starting probability) and every method:

1. interaction 0 is GuideNet's prediction (probability ≥ ``threshold``);
2. each interaction, the simulated pathologist looks at the current prediction, takes its
   largest error region — the largest 8-connected component of the false positives and of the
   false negatives together — and draws one correction scribble on it
   (:func:`correction_on_largest_error`, built on the Interactive Scribble Segmentation
   simulator :func:`wsiseg.scribbles.simulate.correction_scribble`), at most
   ``max_scribble_fraction`` of the window's pixels (DeepScribble: < 0.05 %, "< 80 pixels");
3. the scribble is added to the accumulated ones (:func:`wsiseg.scribbles.raster
   .merge_scribbles`, as a refine round does) and the method is run again on the window with
   all of them; its time is the response time of the interaction;
4. up to ``max_interactions`` (20) interactions, IoU recorded after each.

Per method: NoI@85 and NoI@90 — the first interaction whose IoU reaches the target, 0 when
GuideNet's start already does, and ``max_interactions`` for a window that never reaches it (the
paper's rule) — the share of windows that reach 85 % within the interactions, the total
response time and the seconds per interaction (SPI). Each method gets its own scribbles (the
user corrects what that method got wrong), from a generator seeded by ``(seed, window)``: the
first scribble of a window is the same for every method, since they all start from GuideNet.

Methods are plain callables (:data:`wsiseg.evaluate.refiners.Refiner`); the report
(:mod:`wsiseg.evaluate.report`) is a CSV and a Markdown table in the layout of the paper's
Table 1, the IoU-per-interaction curve as CSV and PNG (matplotlib).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from wsiseg.errors import WsisegError
from wsiseg.evaluate.refiners import Refiner
from wsiseg.scribbles._masks import EIGHT
from wsiseg.scribbles.deepscribble import limit_scribble_size
from wsiseg.scribbles.raster import merge_scribbles
from wsiseg.scribbles.simulate import correction_scribble

__all__ = [
    "EvalWindow",
    "InteractiveResult",
    "MethodTrace",
    "correction_on_largest_error",
    "evaluate_interactive",
    "number_of_interactions",
    "percent_label",
]



@dataclass(frozen=True, eq=False)
class EvalWindow:
    """One window of the evaluation.

    Attributes
    ----------
    name : str
        Where it comes from (``<image>@row,col``), for the per-window CSV.
    rgb : ndarray of uint8, shape (H, W, 3)
    truth : ndarray of bool, shape (H, W)
        Ground-truth tumor mask.
    guide : ndarray of float32, shape (H, W)
        GuideNet's tumor probability in [0, 1]: the starting prediction.
    """

    name: str
    rgb: NDArray[np.uint8]
    truth: NDArray[np.bool_]
    guide: NDArray[np.float32]

    def __post_init__(self) -> None:
        rgb, truth, guide = np.asarray(self.rgb), np.asarray(self.truth), np.asarray(self.guide)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise WsisegError(f"{self.name}: RGB must be uint8 (H, W, 3), got {rgb.dtype} "
                              f"{rgb.shape}")
        if truth.shape != rgb.shape[:2] or guide.shape != rgb.shape[:2]:
            raise WsisegError(
                f"{self.name}: image {rgb.shape[1]} × {rgb.shape[0]} px, truth "
                f"{truth.shape[::-1]} and guide {guide.shape[::-1]} differ in size"
            )
        object.__setattr__(self, "truth", truth.astype(bool, copy=False))
        object.__setattr__(self, "guide", np.clip(guide.astype(np.float32, copy=False), 0, 1))


@dataclass
class MethodTrace:
    """What one method did on every window.

    Attributes
    ----------
    iou : ndarray of float64, shape (n_windows, K + 1)
        IoU after 0 (GuideNet), 1, ..., K interactions.
    seconds : ndarray of float64, shape (n_windows, K)
        Response time of the method at each interaction.
    scribble_px : ndarray of int64, shape (n_windows, K)
        Pixels of the scribble added at each interaction (0: nothing left to correct).
    """

    iou: NDArray[np.float64]
    seconds: NDArray[np.float64]
    scribble_px: NDArray[np.int64]


@dataclass
class InteractiveResult:
    """Traces of every method, and the protocol's settings."""

    windows: list[str]
    methods: dict[str, MethodTrace]
    targets: tuple[float, ...]
    max_interactions: int
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per method: the paper's Table 1 columns and a few more.

        Keys: ``method``, ``windows``, ``reach@85`` (share reaching the first target),
        ``NoI@85``, ``NoI@90`` (one per target), ``total_s``, ``spi_s``, ``iou_start``,
        ``iou_end`` (mean IoU at 0 and K interactions), ``scribble_px`` (mean per interaction).
        """
        rows = []
        first = self.targets[0]
        for name, trace in self.methods.items():
            row: dict[str, Any] = {"method": name, "windows": len(self.windows)}
            reached = (trace.iou >= first).any(axis=1)
            share = float(reached.mean()) if len(reached) else math.nan
            row[f"reach@{percent_label(first)}"] = share
            for t in self.targets:
                noi = [number_of_interactions(curve, t) for curve in trace.iou]
                row[f"NoI@{percent_label(t)}"] = float(np.mean(noi)) if noi else math.nan
            total = float(trace.seconds.sum())
            row["total_s"] = total
            row["spi_s"] = total / trace.seconds.size if trace.seconds.size else math.nan
            row["iou_start"] = float(trace.iou[:, 0].mean()) if len(trace.iou) else math.nan
            row["iou_end"] = float(trace.iou[:, -1].mean()) if len(trace.iou) else math.nan
            row["scribble_px"] = float(trace.scribble_px.mean()) if trace.scribble_px.size else 0.0
            rows.append(row)
        return rows

    def mean_curve(self, method: str) -> NDArray[np.float64]:
        """Mean IoU over the windows after 0..K interactions, float64 (K + 1,)."""
        return self.methods[method].iou.mean(axis=0)


def number_of_interactions(ious: Sequence[float], target: float) -> int:
    """NoI: the first interaction whose IoU reaches ``target``.

    Parameters
    ----------
    ious : sequence of float, length K + 1
        IoU after 0 (the starting prediction), 1, ..., K interactions.
    target : float

    Returns
    -------
    int
        0 when the start already reaches it; K when it is never reached (the paper counts a
        window that never gets there as the maximum, 20).
    """
    ious = np.asarray(ious, dtype=np.float64)
    hits = np.flatnonzero(ious >= target)
    return int(hits[0]) if hits.size else len(ious) - 1


def correction_on_largest_error(
    truth: NDArray[np.bool_],
    prediction: NDArray[np.bool_],
    *,
    rng: np.random.Generator,
    max_pixels: int,
    radius_px: int = 1,
) -> NDArray[np.int8]:
    """One correction scribble on the prediction's largest error region.

    The region is the largest 8-connected component among the false positives and the false
    negatives together; the scribble is :func:`wsiseg.scribbles.simulate.correction_scribble`
    drawn for that region alone (a human-like stroke through it, tumor on a false negative,
    non-tumor on a false positive), then cut to ``max_pixels``
    (:func:`wsiseg.scribbles.deepscribble.limit_scribble_size`: a contiguous piece of the stroke).

    Parameters
    ----------
    truth, prediction : ndarray of bool, shape (H, W)
    rng : numpy.random.Generator
    max_pixels : int
        Most pixels the scribble may have (≥ 1).
    radius_px : int
        Brush radius.

    Returns
    -------
    ndarray of int8, shape (H, W)
        +1 or −1 on the scribble (one sign; always inside the truth class it asserts), 0
        elsewhere; all 0 when the prediction has no error.
    """
    truth = np.asarray(truth, bool)
    prediction = np.asarray(prediction, bool)
    best: NDArray[np.bool_] | None = None
    best_size = 0
    for errors in (truth & ~prediction, prediction & ~truth):
        labels, n = ndimage.label(errors, structure=EIGHT)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes))
        if sizes[k] > best_size:
            best, best_size = labels == k + 1, int(sizes[k])
    if best is None:
        return np.zeros(truth.shape, np.int8)
    # A prediction whose only error is that region: the simulator then scribbles it, and only it.
    only_this = truth ^ best
    stroke = correction_scribble(
        truth, only_this, rng=rng, radius_px=radius_px, min_error_fraction=0.0
    )
    return limit_scribble_size(stroke, max(1, int(max_pixels)), rng=rng)


def evaluate_interactive(
    windows: Sequence[EvalWindow],
    methods: Mapping[str, Refiner],
    *,
    max_interactions: int = 20,
    targets: Sequence[float] = (0.85, 0.90),
    max_scribble_fraction: float = 0.0005,
    brush_radius_px: int = 1,
    threshold: float = 0.5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> InteractiveResult:
    """Run the interactive protocol (see the module docstring) for every method and window.

    Parameters
    ----------
    windows : sequence of EvalWindow
        Windows with ground truth and GuideNet's starting probability.
    methods : mapping of str to Refiner
        Name → ``refiner(rgb, guide, scribbles) → probability`` (float (H, W) in [0, 1]).
    max_interactions : int
        Interactions per window (K; the paper's 20).
    targets : sequence of float
        IoU targets for NoI (the paper's 0.85 and 0.90); the first one also gives the share of
        windows reaching it.
    max_scribble_fraction : float
        Largest scribble per interaction as a fraction of the window's pixels (0.0005: 73 px in
        a 384² window, 18 px in the demo workflow's 192²; at least 1 px).
    brush_radius_px : int
        Brush radius of the simulated strokes (1: a 3-px-wide brush, about the QuPath line
        width of the workflows at their working resolution).
    threshold : float
        Probability at or above which a pixel is tumor (GuideNet's and the refiners' output).
    seed : int
        Seeds the simulated pathologist.
    progress : callable, optional
        Called with one line per finished window and method.

    Returns
    -------
    InteractiveResult

    Raises
    ------
    WsisegError
        No windows, no methods, or a method returning a map of the wrong shape.
    """
    if not windows:
        raise WsisegError("interactive evaluation: no windows to evaluate")
    if not methods:
        raise WsisegError("interactive evaluation: no methods to evaluate")
    if max_interactions < 1:
        raise WsisegError(f"--interactions must be at least 1, got {max_interactions}")
    if not 0.0 < max_scribble_fraction <= 1.0:
        raise WsisegError(f"--max-scribble-fraction must lie in (0, 1], got "
                          f"{max_scribble_fraction}")
    targets = tuple(float(t) for t in targets)
    if not targets or not all(0.0 < t <= 1.0 for t in targets):
        raise WsisegError(f"IoU targets must lie in (0, 1], got {targets}")
    n, k_max = len(windows), int(max_interactions)
    traces = {
        name: MethodTrace(
            iou=np.zeros((n, k_max + 1)), seconds=np.zeros((n, k_max)),
            scribble_px=np.zeros((n, k_max), np.int64),
        )
        for name in methods
    }
    for w, window in enumerate(windows):
        truth = window.truth
        max_pixels = max(1, math.floor(max_scribble_fraction * truth.size))
        for name, refine in methods.items():
            trace = traces[name]
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), w]))
            scribbles = np.zeros(truth.shape, np.int8)
            prediction = window.guide >= threshold
            trace.iou[w, 0] = _iou(prediction, truth)
            for k in range(1, k_max + 1):
                new = correction_on_largest_error(
                    truth, prediction, rng=rng, max_pixels=max_pixels, radius_px=brush_radius_px
                )
                trace.scribble_px[w, k - 1] = int(np.count_nonzero(new))
                scribbles = merge_scribbles(scribbles, new)
                t0 = time.perf_counter()
                prob = np.asarray(refine(window.rgb, window.guide, scribbles))
                trace.seconds[w, k - 1] = time.perf_counter() - t0
                if prob.shape != truth.shape:
                    raise WsisegError(
                        f"method {name}: returned a map of shape {prob.shape} for window "
                        f"{window.name} of shape {truth.shape}"
                    )
                prediction = prob >= threshold
                trace.iou[w, k] = _iou(prediction, truth)
            if progress is not None:
                progress(
                    f"{window.name} {name}: IoU {trace.iou[w, 0]:.3f} → {trace.iou[w, -1]:.3f}, "
                    f"NoI@{percent_label(targets[0])} "
                    f"{number_of_interactions(trace.iou[w], targets[0])}"
                )
    settings = {
        "max_scribble_fraction": max_scribble_fraction,
        "brush_radius_px": brush_radius_px,
        "threshold": threshold,
        "seed": seed,
    }
    return InteractiveResult(
        windows=[w.name for w in windows], methods=traces, targets=targets,
        max_interactions=k_max, settings=settings,
    )



# --------------------------------------------------------------------------------------------
# Helpers


def _iou(prediction: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    union = np.count_nonzero(prediction | truth)
    return 1.0 if union == 0 else np.count_nonzero(prediction & truth) / union


def percent_label(target: float) -> str:
    """``0.85`` → ``"85"`` (the NoI@85 column names)."""
    return f"{100 * target:g}"
