"""``wsiseg train guidenet --scribbles-only``: GuideNet from scribbles alone (Scribble2Label).

Scribble2Label (Lee et al., MICCAI 2020) trains a segmenter from a handful of scribbles:

- the *scribbled-pixel loss* ``L_sp`` — cross-entropy on the scribbled pixels only;
- every ``γ`` epochs the network predicts every training image *un-augmented*, and an
  exponential moving average of those predictions is kept, ``y_n = α f(x) + (1 − α) y_{n−1}``
  (``y_0 = f(x)``);
- after a warm-up, unscribbled pixels whose average is consistent — ``y > τ`` (tumor) or
  ``y < 1 − τ`` (non-tumor) — are pseudo-labels, and ``L = L_sp + λ L_up`` with ``L_up`` the
  cross-entropy on them. Defaults are the paper's: ``τ = 0.8, α = 0.2, γ = 5, λ = 0.5``.

The paper's image set is here a fixed *pool* of ``pool_patches`` patches of
``guidenet.patch_px`` drawn around the scribbles (tumor and non-tumor scribbles equally often),
so the averages have a fixed home and memory stays bounded whatever the slides' size. A
scribbled pixel is never pseudo-labelled: its own label always wins (:func:`pseudo_labels`).

Scribbles come from

- QuPath GeoJSON exports of the slides (``scribbles=``): classes mapped to tumor / non-tumor /
  ignore with the workflow's table and rasterised as ``wsiseg refine`` does; our own exported
  contours are not scribbles;
- ground truth (generated slides with ``truth=``, and the masks of patch folders): the
  human-like simulator of Interactive Scribble Segmentation
  (:func:`wsiseg.scribbles.simulate.human_scribbles`) draws strokes inside the tumor and inside
  the non-tumor part of the labelled area (:func:`scribble_labels_from_truth`); the truth is
  then used for nothing but the reported validation IoU and pseudo-label accuracy.

Optionally (``random_walk_seeds``, Can et al. 2018), each pool patch's scribbles are first
grown into seed regions: scikit-image's random walker from the scribbles, and the pixels whose
probability of one class is at least ``random_walk_threshold`` join the scribbled set.

The loop, time budget, checkpoints and model card are those of :mod:`wsiseg.train.loop`. There
are no full labels to pick the best epoch by: the weights written are those of the epoch with
the best IoU on the held-out items' scribbled pixels (a truth, when known, is only reported).
The averages live beside the checkpoint (``<stem>.s2l.safetensors``) so an interrupted run
resumes with them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from wsiseg import __version__
from wsiseg.atomic import atomic_path
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.train.data import LabelledSlide, augment, max_cached, split_slides
from wsiseg.train.guidenet import base_card, card_summary, predict, resolve_workflow
from wsiseg.train.loop import (
    Budget,
    TrainResult,
    TrainState,
    autocast_dtype,
    batchnorm_for_short_runs,
    check_out_path,
    checkpoint_path,
    load_checkpoint,
    resolve_training_device,
    run_loop,
    save_checkpoint,
)
from wsiseg.train.losses import bce_loss, iou_counts

__all__ = [
    "ScribbleTrainResult",
    "pseudo_labels",
    "random_walk_labels",
    "scribble_labels_from_truth",
    "train_guidenet_scribbles_only",
    "update_average",
]

#: Edge of the blocks whose scribble counts steer where pool patches are centred.
_BLOCK_PX = 16

_EMA_KEY = "wsiseg_s2l"


@dataclass
class ScribbleTrainResult(TrainResult):
    """:class:`~wsiseg.train.loop.TrainResult` plus the pseudo-labels after every average.

    ``pseudo`` has one entry per average: ``epoch`` (completed epochs when it was taken),
    ``averaged`` (n), ``fraction`` (share of the pool's unscribbled pixels with a pseudo-label),
    ``accuracy`` (share of those that agree with the truth, NaN without truth) and
    ``contradictions`` (scribbled pixels whose training target differs from their scribble).
    """

    pseudo: list[dict[str, float]] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The pieces, on arrays


def scribble_labels_from_truth(
    truth: NDArray[np.bool_],
    labelled: NDArray[np.bool_] | None = None,
    *,
    rng: np.random.Generator,
    radius_px: int = 2,
    spacing_px: float = 16.0,
    tile_px: int = 64,
) -> NDArray[np.int8]:
    """Human-like scribbles drawn from a ground truth, as a training label raster.

    :func:`wsiseg.scribbles.simulate.human_scribbles` inside the tumor and inside the labelled
    non-tumor area, each clipped to its class.

    Parameters
    ----------
    truth : ndarray of bool, shape (H, W)
    labelled : ndarray of bool, shape (H, W), optional
        Where the truth is known (default: everywhere); no scribble is drawn elsewhere.
    rng : numpy.random.Generator
    radius_px, spacing_px, tile_px
        See :func:`~wsiseg.scribbles.simulate.human_scribbles`.

    Returns
    -------
    ndarray of int8, shape (H, W)
        1 tumor scribble, 0 non-tumor scribble, −1 not scribbled (the labels convention of
        :class:`~wsiseg.train.data.LabelledSlide`).
    """
    from wsiseg.scribbles.simulate import human_scribbles

    truth = np.asarray(truth, bool)
    known = np.ones(truth.shape, bool) if labelled is None else np.asarray(labelled, bool)
    tumor, other = truth & known, ~truth & known
    out = np.full(truth.shape, -1, np.int8)
    kw = {"rng": rng, "radius_px": radius_px, "spacing_px": spacing_px, "tile_px": tile_px}
    out[human_scribbles(other, **kw) & other] = 0
    out[human_scribbles(tumor, **kw) & tumor] = 1
    return out


def update_average(
    average: NDArray[np.floating] | None, prediction: NDArray[np.floating], alpha: float
) -> NDArray[np.float32]:
    """Scribble2Label's prediction ensemble: ``α · prediction + (1 − α) · average``.

    The first call (``average`` None) returns the prediction itself (``y_0 = f(x)``).
    """
    prediction = np.asarray(prediction, np.float32)
    if average is None:
        return prediction.copy()
    return (alpha * prediction + (1.0 - alpha) * np.asarray(average, np.float32)).astype(
        np.float32
    )


def pseudo_labels(
    average: NDArray[np.floating], scribbles: NDArray[np.integer], tau: float
) -> NDArray[np.int8]:
    """Pseudo-labels of the unscribbled pixels where the average prediction is consistent.

    Parameters
    ----------
    average : ndarray of float, shape (..., H, W)
        Averaged tumor probability.
    scribbles : ndarray of int, same shape
        1 tumor, 0 non-tumor, −1 not scribbled.
    tau : float
        Consistency threshold in (0.5, 1).

    Returns
    -------
    ndarray of int8, same shape
        1 where ``average > tau``, 0 where ``average < 1 − tau``, −1 elsewhere — and −1 on
        every scribbled pixel: there the scribble is the label, whatever the average says.
    """
    average = np.asarray(average)
    scribbles = np.asarray(scribbles)
    out = np.full(average.shape, -1, np.int8)
    out[average > tau] = 1
    out[average < 1.0 - tau] = 0
    out[scribbles >= 0] = -1
    return out


def random_walk_labels(
    rgb: NDArray[np.uint8],
    scribbles: NDArray[np.integer],
    *,
    threshold: float = 0.9,
    beta: float = 130.0,
) -> NDArray[np.int8]:
    """Scribbles grown into random-walker seed regions (Can et al. 2018).

    scikit-image's random walker is seeded with the tumor and non-tumor scribbles; unscribbled
    pixels whose probability of one class reaches ``threshold`` take that class. Scribbled
    pixels keep their label. A patch with scribbles of one class only is returned unchanged
    (the walker would give that class to every pixel).

    Parameters
    ----------
    rgb : ndarray of uint8, shape (H, W, 3)
    scribbles : ndarray of int, shape (H, W)
        1 tumor, 0 non-tumor, −1 not scribbled.
    threshold : float
        Probability a pixel needs to join a class (the paper: 0.99 cardiac, 0.90 prostate).
    beta : float
        Random-walker edge weight.

    Returns
    -------
    ndarray of int8, shape (H, W)
        Same convention as ``scribbles``.
    """
    from skimage.segmentation import random_walker

    scribbles = np.asarray(scribbles, np.int8)
    out = scribbles.copy()
    if not ((scribbles == 1).any() and (scribbles == 0).any()):
        return out
    seeds = np.zeros(scribbles.shape, np.int32)
    seeds[scribbles == 1] = 1
    seeds[scribbles == 0] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # Solved directly: with seeds this sparse the conjugate gradient is slow and, at
        # scikit-image's tolerance, far from the solution (see wsiseg.evaluate.refiners).
        prob = random_walker(np.asarray(rgb, np.float32) / 255.0, seeds, beta=beta, mode="bf",
                             channel_axis=-1, return_full_prob=True)
    free = scribbles < 0
    out[free & (prob[0] >= threshold)] = 1
    out[free & (prob[1] >= threshold)] = 0
    return out


# --------------------------------------------------------------------------------------------
# Data


@dataclass
class _Item:
    """One slide or patch: its scribble labels and, when known, its truth labels."""

    scribbles: LabelledSlide  # label: 1 tumor scribble, 0 non-tumor scribble, −1 none
    truth: LabelledSlide | None


def _items_from_patch_folder(folder: Path, seed: int, index: int) -> list[_Item]:
    from wsiseg.train.data import patch_pairs_from_folder

    images, masks = patch_pairs_from_folder(folder)
    items = []
    for k, (rgb, mask) in enumerate(zip(images, masks, strict=True)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C81, index, k]))
        name = f"{folder.name}[{k}]"
        labels = scribble_labels_from_truth(mask, rng=rng)
        items.append(_Item(
            LabelledSlide(store=None, label=labels, image=rgb, name=name),
            LabelledSlide(store=None, label=mask.astype(np.int8), image=rgb, name=name),
        ))
    return items


def _items_from_truth(
    slides: Sequence[Path], truth: Sequence[Path] | Path, cache_dir: Path, wf: Workflow,
    mpp: float | None, seed: int, progress: bool,
) -> list[_Item]:
    from wsiseg.train.data import labelled_slides_from_annotations

    truths = labelled_slides_from_annotations(slides, truth, cache_dir, wf, mpp=mpp,
                                              progress=progress)
    items = []
    for k, t in enumerate(truths):
        full = np.asarray(t.label[...])
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C82, k]))
        # A pathologist scribbles non-tumor on tissue, not on the glass between it: simulated
        # strokes stay on the store's tissue mask, so they fall on stroma and its look-alikes.
        labelled = (full >= 0) & _tissue_at(t.store, full.shape)
        labels = scribble_labels_from_truth(full == 1, labelled, rng=rng)
        items.append(_Item(LabelledSlide(store=t.store, label=labels, name=t.name), t))
    return items


def _tissue_at(store, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """The store's low-resolution tissue mask, nearest-neighbour at ``shape`` (working px)."""
    tissue = store.tissue_mask
    rows = (np.arange(shape[0]) * tissue.shape[0]) // shape[0]
    cols = (np.arange(shape[1]) * tissue.shape[1]) // shape[1]
    return tissue[np.ix_(rows, cols)]


def _items_from_exports(
    slides: Sequence[Path], exports: Sequence[Path] | Path, cache_dir: Path, wf: Workflow,
    mpp: float | None, progress: bool,
) -> list[_Item]:
    """Slide stores and scribble label rasters from QuPath exports (checked before tiling)."""
    from wsiseg.qupath import ClassMapping, Label, is_wsiseg_feature, read_annotations
    from wsiseg.slide.reader import open_slide
    from wsiseg.tiling import make_frame, tile_slide
    from wsiseg.train.data import _stem, match_annotations

    mapping = ClassMapping.from_workflow(wf.scribbles)
    plans = []
    for slide, export in match_annotations(slides, exports):
        reader = open_slide(slide)
        try:
            frame = make_frame(reader.info, wf, mpp)
        finally:
            reader.close()
        shapes = []
        for a in read_annotations(export):
            if is_wsiseg_feature(a, ai_class_name=wf.contours.class_name):
                continue  # our own contours are predictions, not scribbles
            label = mapping.label_of(a.class_name)
            if label in (Label.TUMOR, Label.NON_TUMOR):
                shapes.append((frame.transform_geometry(a.geometry, "qupath", "working"),
                               int(label)))
        if not shapes:
            raise WsisegError(
                f"{export}: no tumor or non-tumor scribbles (tumor classes: "
                f"{', '.join(wf.scribbles.tumor)}; non-tumor: {', '.join(wf.scribbles.non_tumor)})"
            )
        plans.append((slide, export, shapes))
    cache_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for slide, export, shapes in plans:
        store = tile_slide(slide, cache_dir / f"{_stem(slide)}.zarr", wf, mpp=mpp,
                           progress=progress).store
        labels = _scribble_raster(store, shapes, wf)
        if not (labels >= 0).any():
            raise WsisegError(f"{export}: no scribble lies on the tissue of {slide}")
        items.append(_Item(LabelledSlide(store=store, label=labels, name=slide.name), None))
    return items


def _scribble_raster(store, shapes, wf: Workflow) -> NDArray[np.int8]:
    """Scribble labels (1, 0, −1) of the tissue chunks, rasterised where scribbles are.

    In memory at the working resolution (int8: 1 byte per working pixel); only the chunks that
    scribbles touch are drawn.
    """
    import shapely

    from wsiseg.scribbles.raster import rasterize_labels

    rows, cols = store.frame.working_shape
    chunk = store.chunk_px
    tiled = np.asarray(store["tiled"][...], dtype=bool)
    out = np.full((rows, cols), -1, np.int8)
    tree = shapely.STRtree([g for g, _ in shapes])
    draw = {"line_width_px": max(1.0, wf.scribbles.line_width_um / wf.working_mpp),
            "point_radius_px": max(1.0, wf.scribbles.point_radius_um / wf.working_mpp)}
    for i, j in zip(*np.nonzero(tiled), strict=True):
        r0, c0 = int(i) * chunk, int(j) * chunk
        h, w = min(chunk, rows - r0), min(chunk, cols - c0)
        hits = tree.query(shapely.box(c0, r0, c0 + w, r0 + h))
        if hits.size == 0:
            continue
        drawn = rasterize_labels([shapes[k] for k in hits], (r0, c0, h, w), **draw)
        window = out[r0 : r0 + h, c0 : c0 + w]
        window[drawn > 0] = 1
        window[drawn < 0] = 0
    return out


def _pick_patches(
    items: Sequence[_Item], patch_px: int, n: int, rng: np.random.Generator
) -> tuple[NDArray[np.uint8], NDArray[np.int8], NDArray[np.int8] | None]:
    """``n`` patches centred on scribbled blocks, tumor and non-tumor scribbles equally often.

    Returns RGB uint8 (n, P, P, 3), scribble labels int8 (n, P, P) and truth labels int8
    (n, P, P) — None unless every item has a truth.
    """
    pools = {}
    for kind in ("tumor", "other"):
        ids, weights = [], []
        for s, item in enumerate(items):
            tumor, other = item.scribbles.block_counts(_BLOCK_PX)
            counts = tumor if kind == "tumor" else other
            r, c = np.nonzero(counts)
            ids.append(np.stack([np.full(len(r), s), r, c], axis=1))
            weights.append(counts[r, c].astype(np.float64))
        block_ids = np.concatenate(ids)
        w = np.concatenate(weights)
        if w.size:
            pools[kind] = (block_ids, w / w.sum())
    kinds = sorted(pools)
    with_truth = all(item.truth is not None for item in items)
    images = np.empty((n, patch_px, patch_px, 3), np.uint8)
    scribbles = np.empty((n, patch_px, patch_px), np.int8)
    truth = np.empty((n, patch_px, patch_px), np.int8) if with_truth else None
    for k in range(n):
        block_ids, w = pools[kinds[k % len(kinds)]]
        s, br, bc = block_ids[rng.choice(len(block_ids), p=w)]
        item = items[int(s)]
        rows, cols = item.scribbles.shape
        r0 = _origin(int(br) * _BLOCK_PX + int(rng.integers(_BLOCK_PX)), rows, patch_px)
        c0 = _origin(int(bc) * _BLOCK_PX + int(rng.integers(_BLOCK_PX)), cols, patch_px)
        images[k], scribbles[k] = item.scribbles.read(r0, c0, patch_px)
        if truth is not None:
            truth[k] = item.truth.read(r0, c0, patch_px)[1]
    return images, scribbles, truth


def _origin(centre: int, length: int, patch_px: int) -> int:
    """A window centred on ``centre``, kept inside the slide when it fits."""
    if length >= patch_px:
        return min(max(centre - patch_px // 2, 0), length - patch_px)
    return -((patch_px - length) // 2)


# --------------------------------------------------------------------------------------------
# Training


def train_guidenet_scribbles_only(
    *,
    slides: Sequence[Path] = (),
    scribbles: Sequence[Path] | Path | None = None,
    truth: Sequence[Path] | Path | None = None,
    patch_folders: Sequence[Path] = (),
    out: Path,
    workflow: Workflow | str | Path | None = None,
    epochs: int = 20,
    steps_per_epoch: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    tau: float = 0.8,
    alpha: float = 0.2,
    gamma: int = 5,
    lam: float = 0.5,
    warmup_epochs: int = 5,
    random_walk_seeds: bool = False,
    random_walk_threshold: float = 0.9,
    pool_patches: int = 256,
    val_patches: int = 16,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    max_minutes: float | None = None,
    max_steps: int | None = None,
    cache_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    mpp: float | None = None,
    threads: int | None = None,
    weight_decay: float = 1e-4,
) -> ScribbleTrainResult:
    """Train GuideNet from scribbles alone (Scribble2Label; see the module docstring).

    Parameters
    ----------
    slides : sequence of Path
        Slides, with either ``scribbles`` or ``truth`` (matched by name as in
        :func:`wsiseg.train.data.match_annotations`).
    scribbles : Path or sequence of Path, optional
        QuPath GeoJSON exports of the pathologist's scribbles (files or folders).
    truth : Path or sequence of Path, optional
        Ground truth (GeoJSON or masks) of the slides, from which scribbles are simulated —
        for generated slides and experiments; the truth itself is never trained on.
    patch_folders : sequence of Path
        ``images/`` + ``masks/`` pairs; scribbles are simulated from the masks.
    out : Path
        ``*.safetensors`` to write: the weights of the epoch with the best held-out scribble
        IoU, with a model card saying ``training: scribbles-only`` and the hyperparameters.
    tau, alpha, gamma, lam, warmup_epochs
        Consistency threshold τ, EMA weight α, averaging interval γ (epochs), pseudo-label
        loss weight λ, and the epochs before pseudo-labels are used (the first average is
        taken after ``gamma`` epochs, so pseudo-labels start at ``max(warmup_epochs, gamma)``).
    random_walk_seeds : bool
        Grow each pool patch's scribbles with confident random-walker labels first.
    random_walk_threshold : float
        Probability a pixel needs to join a random-walker seed region.
    pool_patches : int
        Patches of the fixed training pool (capped at 1 GiB of pool memory).
    val_patches : int
        Validation patches, centred on the held-out items' scribbles.

    The other parameters are those of :func:`wsiseg.train.guidenet.train_guidenet`.

    Returns
    -------
    ScribbleTrainResult
        ``history`` entries carry ``val_iou`` (against the truth when every validation item
        has one, else on the held-out scribbled pixels), ``val_scribble_iou`` and the latest
        pseudo-label ``pseudo_fraction``.

    Raises
    ------
    WsisegError
        Bad options or inputs (before any training): no data, slides with neither or both of
        ``scribbles`` and ``truth``, scribbles of one class only across the training set, and
        the errors of the data readers.
    """
    started = time.monotonic()
    out = check_out_path(out)
    wf = resolve_workflow(workflow)
    budget = Budget(epochs, steps_per_epoch, max_steps, max_minutes)
    _check_options(tau=tau, alpha=alpha, gamma=gamma, lam=lam, warmup_epochs=warmup_epochs,
                   batch_size=batch_size, pool_patches=pool_patches,
                   random_walk_threshold=random_walk_threshold)
    slides = [Path(s) for s in slides]
    patch_folders = [Path(p) for p in patch_folders]
    if not slides and not patch_folders:
        raise WsisegError("no training data: give slides with --annotations (scribble "
                          "exports, or ground truth to simulate scribbles from), or "
                          "--patch-folder DIR")
    if slides and (scribbles is None) == (truth is None):
        raise WsisegError("slides need either their scribble exports or their ground truth "
                          "(to simulate scribbles from), not both or neither")
    if not slides and (scribbles is not None or truth is not None):
        raise WsisegError("scribble or truth annotations given without slides (--slides)")
    card0 = base_card(wf, "guidenet")
    dev = resolve_training_device(device, threads)
    cache = Path(cache_dir) if cache_dir else out.parent / "wsiseg-train-cache"

    # Every input is read and checked before any training.
    from_patches: list[_Item] = []
    for index, folder in enumerate(patch_folders):
        from_patches += _items_from_patch_folder(folder, seed, index)
    if slides and truth is not None:
        from_slides = _items_from_truth(slides, truth, cache, wf, mpp, seed, progress)
    elif slides:
        from_slides = _items_from_exports(slides, scribbles, cache, wf, mpp, progress)
    else:
        from_slides = []
    split_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
    train_items, val_items = [], []
    for group in (from_slides, from_patches):
        tr, va = split_slides([i.scribbles for i in group], val_fraction, split_rng)
        by_id = {id(i.scribbles): i for i in group}
        train_items += [by_id[id(s)] for s in tr]
        val_items += [by_id[id(s)] for s in va]
    counts = np.sum([np.array([b.sum() for b in i.scribbles.block_counts(_BLOCK_PX)])
                     for i in train_items], axis=0)
    if counts[0] == 0 or counts[1] == 0:
        missing = "tumor" if counts[0] == 0 else "non-tumor"
        raise WsisegError(f"no {missing} scribbles in the training set: scribbles-only "
                          f"training needs both tumor and non-tumor scribbles")
    validation = val_items or train_items
    patch_px = card0.patch_px
    hyper = {"tau": tau, "alpha": alpha, "gamma": gamma, "lambda": lam,
             "warmup_epochs": warmup_epochs, "pool_patches": pool_patches,
             "random_walk_seeds": (
                 {"threshold": random_walk_threshold, "beta": wf.refinenet.randomwalk_beta}
                 if random_walk_seeds else None)}
    provenance_data = {
        "slides": [str(s) for s in slides],
        "scribbles": _paths(scribbles), "truth": _paths(truth),
        "patch_folders": [str(p) for p in patch_folders],
        "scribble_source": ("qupath exports" if scribbles is not None else
                            "simulated from ground truth (human-like simulator)"),
        "train": [i.scribbles.name for i in train_items][:50],
        "validation": ([i.scribbles.name for i in val_items][:50] if val_items
                       else "training data (nothing held out)"),
    }
    config = {"role": "guidenet-scribbles-only", "card": card_summary(card0),
              "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
              "train": provenance_data["train"], **hyper}

    torch.manual_seed(seed)
    from wsiseg.nets import build_model, load_card, normalise_rgb, save_weights

    model = build_model(card0).to(dev)
    batchnorm_for_short_runs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    amp = autocast_dtype(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x52C]))
    ckpt = checkpoint_path(out)
    ema_path = out.with_name(f"{out.stem}.s2l.safetensors")
    state = TrainState()
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, optimizer, config=config, rng=rng, scaler=scaler)
    resumed_from = state.step

    # The pool and the validation patches depend on the seed only, so a resumed run has them.
    pool_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9001]))
    n_pool = max_cached(patch_px, 3 + 1 + 1 + 4 + 1, max(pool_patches, batch_size))
    images, scribbled, truth_pool = _pick_patches(train_items, patch_px, n_pool, pool_rng)
    if random_walk_seeds:
        for k in range(len(images)):
            scribbled[k] = random_walk_labels(images[k], scribbled[k],
                                              threshold=random_walk_threshold,
                                              beta=wf.refinenet.randomwalk_beta)
    val_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    val_images, val_scribbles, val_truth = _pick_patches(validation, patch_px,
                                                         max(1, val_patches), val_rng)
    ema = _Average(ema_path, config)
    if resume and ckpt.exists():
        ema.load()
    else:
        ema.clear()
    pseudo_log: list[dict[str, float]] = list(ema.log)

    def to_input(rgb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(dev, non_blocking=True)
        return normalise_rgb(x.permute(0, 3, 1, 2), card0)

    def current_pseudo() -> NDArray[np.int8] | None:
        if ema.average is None or state.epoch < warmup_epochs:
            return None
        return pseudo_labels(ema.average, scribbled, tau)

    pseudo = current_pseudo()

    def average_now(epoch: int) -> None:
        """Take an average at the start of every γ-th epoch (once per epoch)."""
        nonlocal pseudo
        if 0 < epoch < budget.epochs and epoch % gamma == 0 and ema.epoch != epoch:
            probs = predict(model, images, to_input, amp, dev, batch_size=max(batch_size, 8))
            ema.update(probs, alpha, epoch)
            labels = pseudo_labels(ema.average, scribbled, tau)
            entry = _pseudo_stats(labels, scribbled, truth_pool, epoch, ema.count)
            ema.log.append(entry)
            pseudo_log.append(entry)
            ema.save()
        pseudo = current_pseudo()

    def step() -> float:
        model.train()
        idx = rng.integers(len(images), size=batch_size)
        rgb = np.empty((batch_size, patch_px, patch_px, 3), np.uint8)
        target = np.empty((batch_size, patch_px, patch_px, 4), np.float32)
        for b, i in enumerate(idx):
            pl = pseudo[i] if pseudo is not None else np.full(scribbled[i].shape, -1, np.int8)
            stack = np.stack([scribbled[i] == 1, scribbled[i] >= 0, pl == 1, pl >= 0], axis=-1)
            rgb[b], target[b] = augment(images[i], stack.astype(np.float32), rng)
        x = to_input(rgb)
        y = torch.from_numpy(target).to(dev)
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        logits = logits.float()
        loss = bce_loss(logits, y[..., 0], y[..., 1] > 0.5)
        if pseudo is not None:
            loss = loss + lam * bce_loss(logits, y[..., 2], y[..., 3] > 0.5)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())

    # Best held-out scribble IoU so far (of a resumed run: the one in its history).
    best_scribble_iou = [max((h.get("val_scribble_iou", -1.0) for h in state.history),
                             default=-1.0)]

    def validate() -> dict[str, float]:
        probs = predict(model, val_images, to_input, amp, dev, batch_size=max(batch_size, 8))
        pred = probs >= card0.threshold
        inter, union = iou_counts(pred, val_scribbles == 1, val_scribbles >= 0)
        metrics = {"val_scribble_iou": 1.0 if union == 0 else inter / union}
        if val_truth is not None:
            inter, union = iou_counts(pred, val_truth == 1, val_truth >= 0)
            metrics["val_truth_iou"] = 1.0 if union == 0 else inter / union
        metrics["val_iou"] = metrics.get("val_truth_iou", metrics["val_scribble_iou"])
        if pseudo_log:
            metrics["pseudo_fraction"] = pseudo_log[-1]["fraction"]
        # The epoch is chosen by the held-out scribbles, never by the truth (when there is
        # one, it is only reported); a tie goes to the later epoch, which saw more
        # pseudo-labels.
        if metrics["val_scribble_iou"] >= best_scribble_iou[0] or not out.exists():
            best_scribble_iou[0] = metrics["val_scribble_iou"]
            save_weights(model, _card(card0, wf, state, metrics, hyper, provenance_data, dev,
                                      batch_size, lr, seed, val_truth is not None), out)
        return metrics

    def save(s: TrainState) -> None:
        save_checkpoint(ckpt, model, optimizer, s, config=config, rng=rng, scaler=scaler)

    if state.step_in_epoch == 0:
        average_now(state.epoch)  # a resumed run may start on an averaging epoch
    stopped = run_loop(
        model=model, optimizer=optimizer, state=state, budget=budget, step=step,
        validate=validate, on_best=lambda metrics: None, on_epoch_start=average_now, save=save,
        progress=progress, desc="train guidenet (scribbles only)", started=started,
    )
    if not out.exists():  # no validation in this run (resumed after the last epoch)
        validate()
    return ScribbleTrainResult(
        weights=out, card=load_card(out), best_val_iou=state.best_val_iou,
        epochs_run=state.epoch, seconds=time.monotonic() - started, history=state.history,
        steps=state.step, resumed_from_step=resumed_from, stopped=stopped, pseudo=pseudo_log,
    )


def _check_options(**o: Any) -> None:
    if not 0.5 < o["tau"] < 1.0:
        raise WsisegError(f"--tau must lie in (0.5, 1), got {o['tau']}")
    if not 0.0 < o["alpha"] <= 1.0:
        raise WsisegError(f"--alpha must lie in (0, 1], got {o['alpha']}")
    if o["gamma"] < 1:
        raise WsisegError(f"--gamma must be at least 1 epoch, got {o['gamma']}")
    if o["lam"] < 0:
        raise WsisegError(f"--lambda must not be negative, got {o['lam']}")
    if o["warmup_epochs"] < 0:
        raise WsisegError(f"--warmup-epochs must not be negative, got {o['warmup_epochs']}")
    if o["batch_size"] < 1:
        raise WsisegError(f"--batch-size must be at least 1, got {o['batch_size']}")
    if o["pool_patches"] < 1:
        raise WsisegError(f"--pool-patches must be at least 1, got {o['pool_patches']}")
    if not 0.5 < o["random_walk_threshold"] <= 1.0:
        raise WsisegError(f"--random-walk-threshold must lie in (0.5, 1], got "
                          f"{o['random_walk_threshold']}")


def _paths(value: Sequence[Path] | Path | None) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str | Path):
        return str(value)
    return [str(v) for v in value]


def _pseudo_stats(
    labels: NDArray[np.int8], scribbled: NDArray[np.int8], truth: NDArray[np.int8] | None,
    epoch: int, count: int,
) -> dict[str, float]:
    """Share of unscribbled pixels pseudo-labelled, their accuracy, and contradictions."""
    free = scribbled < 0
    labelled = labels >= 0
    fraction = float(labelled[free].mean()) if free.any() else 0.0
    accuracy = math.nan
    if truth is not None:
        judged = labelled & (truth >= 0)
        if judged.any():
            accuracy = float((labels[judged] == truth[judged]).mean())
    # The training target: the scribble where there is one, else the pseudo-label.
    target = np.where(scribbled >= 0, scribbled, labels)
    contradictions = int(np.count_nonzero((scribbled >= 0) & (target != scribbled)))
    return {"epoch": epoch, "averaged": count, "fraction": round(fraction, 6),
            "accuracy": round(accuracy, 6) if math.isfinite(accuracy) else math.nan,
            "contradictions": contradictions}


def _card(card0, wf: Workflow, state: TrainState, metrics: dict[str, float],
          hyper: dict[str, Any], data: dict[str, Any], dev: torch.device, batch_size: int,
          lr: float, seed: int, val_truth: bool):
    provenance = {
        "training": "scribbles-only",
        "method": "Scribble2Label (Lee et al. 2020): partial cross-entropy on scribbles + "
                  "λ · cross-entropy on EMA pseudo-labels",
        "hyperparameters": hyper,
        "selection": "epoch with the best IoU on held-out scribbled pixels",
        "trained": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wsiseg_version": __version__,
        "seed": seed,
        "device": dev.type,
        "training_data": data,
        "workflow": {"name": wf.name, "source": wf.source, **wf.to_dict()},
        "batch_size": batch_size,
        "lr": lr,
        "loss": "bce on scribbled pixels + lambda * bce on pseudo-labelled pixels",
        "augmentation": "dihedral + HED jitter",
    }
    clean = {k: round(float(v), 4) for k, v in metrics.items()
             if isinstance(v, int | float) and math.isfinite(v)}
    return dataclasses.replace(card0, provenance=provenance, metrics={
        **clean, "val_iou_on": "truth" if val_truth else "held-out scribbled pixels",
        "epoch": state.epoch + (1 if state.step_in_epoch else 0), "step": state.step,
    })


class _Average:
    """The pool's averaged predictions, kept beside the checkpoint for resumed runs."""

    def __init__(self, path: Path, config: dict[str, Any]):
        self.path = path
        self.config = json.dumps(config, sort_keys=True)
        self.average: NDArray[np.float32] | None = None
        self.count = 0
        self.epoch = -1
        self.log: list[dict[str, float]] = []

    def update(self, probs: NDArray[np.float32], alpha: float, epoch: int) -> None:
        self.average = update_average(self.average, probs, alpha)
        self.count += 1
        self.epoch = epoch

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def save(self) -> None:
        from safetensors.numpy import save_file

        meta = {"config": self.config, "count": self.count, "epoch": self.epoch,
                "log": self.log}
        with atomic_path(self.path) as tmp:
            save_file({"average": self.average.astype(np.float16)}, tmp,
                      metadata={_EMA_KEY: json.dumps(meta)})

    def load(self) -> None:
        """Averages of the run being resumed (none if absent or made with other settings)."""
        from safetensors import safe_open

        if not self.path.exists():
            return
        try:
            with safe_open(str(self.path), framework="numpy") as f:
                meta = json.loads((f.metadata() or {})[_EMA_KEY])
                average = f.get_tensor("average")
        except Exception:  # noqa: BLE001 - a damaged file: the averages start over
            return
        if meta.get("config") != self.config:
            return
        self.average = average.astype(np.float32)
        self.count, self.epoch = int(meta["count"]), int(meta["epoch"])
        self.log = list(meta.get("log", []))
