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
  (:func:`wsiseg.scribbles.human.human_scribbles`) draws strokes inside the tumor and inside
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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from wsiseg import __version__
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.nets import save_weights
from wsiseg.train.augment import augment
from wsiseg.train.labels import BLOCK_PX
from wsiseg.train.loop import (
    Budget,
    TrainResult,
    TrainState,
    check_out_path,
    resolve_training_device,
    run_loop,
)
from wsiseg.train.losses import bce_loss, iou_counts
from wsiseg.train.pseudo import (
    PredictionAverage,
    pseudo_labels,
    pseudo_stats,
    random_walk_labels,
)
from wsiseg.train.sampling import max_cached, split_slides
from wsiseg.train.scribbled import (
    ScribbledItem,
    items_from_exports,
    items_from_patch_folder,
    items_from_truth,
    pick_patches,
)
from wsiseg.train.setup import base_card, card_summary, resolve_workflow, start_run

__all__ = ["ScribbleTrainResult", "train_guidenet_scribbles_only"]


@dataclass
class ScribbleTrainResult(TrainResult):
    """:class:`~wsiseg.train.loop.TrainResult` plus the pseudo-labels after every average.

    ``pseudo`` has one entry per average: ``epoch`` (completed epochs when it was taken),
    ``averaged`` (n), ``fraction`` (share of the pool's unscribbled pixels with a pseudo-label),
    ``accuracy`` (share of those that agree with the truth, NaN without truth) and
    ``contradictions`` (scribbled pixels whose training target differs from their scribble).
    """

    pseudo: list[dict[str, float]] = dataclasses.field(default_factory=list)



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
        :func:`wsiseg.train.inputs.match_annotations`).
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
    from_patches: list[ScribbledItem] = []
    for index, folder in enumerate(patch_folders):
        from_patches += items_from_patch_folder(folder, seed, index)
    if slides and truth is not None:
        from_slides = items_from_truth(slides, truth, cache, wf, mpp, seed, progress)
    elif slides:
        from_slides = items_from_exports(slides, scribbles, cache, wf, mpp, progress)
    else:
        from_slides = []
    split_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
    train_items, val_items = [], []
    for group in (from_slides, from_patches):
        tr, va = split_slides([i.scribbles for i in group], val_fraction, split_rng)
        by_id = {id(i.scribbles): i for i in group}
        train_items += [by_id[id(s)] for s in tr]
        val_items += [by_id[id(s)] for s in va]
    counts = np.sum([np.array([b.sum() for b in i.scribbles.block_counts(BLOCK_PX)])
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

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x52C]))
    run = start_run(card0, dev, out=out, seed=seed, lr=lr, weight_decay=weight_decay,
                    config=config, rng=rng, resume=resume, started=started)
    state = run.state
    ema_path = out.with_name(f"{out.stem}.s2l.safetensors")

    # The pool and the validation patches depend on the seed only, so a resumed run has them.
    pool_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9001]))
    n_pool = max_cached(patch_px, 3 + 1 + 1 + 4 + 1, max(pool_patches, batch_size))
    images, scribbled, truth_pool = pick_patches(train_items, patch_px, n_pool, pool_rng)
    if random_walk_seeds:
        for k in range(len(images)):
            scribbled[k] = random_walk_labels(images[k], scribbled[k],
                                              threshold=random_walk_threshold,
                                              beta=wf.refinenet.randomwalk_beta)
    val_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    val_images, val_scribbles, val_truth = pick_patches(validation, patch_px,
                                                         max(1, val_patches), val_rng)
    ema = PredictionAverage(ema_path, config)
    if resume and run.checkpoint.exists():
        ema.load()
    else:
        ema.clear()
    pseudo_log: list[dict[str, float]] = list(ema.log)

    def to_input(rgb: np.ndarray) -> torch.Tensor:
        return run.rgb_input(rgb, card0)

    def current_pseudo() -> NDArray[np.int8] | None:
        if ema.average is None or state.epoch < warmup_epochs:
            return None
        return pseudo_labels(ema.average, scribbled, tau)

    pseudo = current_pseudo()

    def average_now(epoch: int) -> None:
        """Take an average at the start of every γ-th epoch (once per epoch)."""
        nonlocal pseudo
        if 0 < epoch < budget.epochs and epoch % gamma == 0 and ema.epoch != epoch:
            probs = run.predict(images, to_input, batch_size=max(batch_size, 8))
            ema.update(probs, alpha, epoch)
            labels = pseudo_labels(ema.average, scribbled, tau)
            entry = pseudo_stats(labels, scribbled, truth_pool, epoch, ema.count)
            ema.log.append(entry)
            pseudo_log.append(entry)
            ema.save()
        pseudo = current_pseudo()

    def step() -> float:
        run.model.train()
        idx = rng.integers(len(images), size=batch_size)
        rgb = np.empty((batch_size, patch_px, patch_px, 3), np.uint8)
        target = np.empty((batch_size, patch_px, patch_px, 4), np.float32)
        for b, i in enumerate(idx):
            pl = pseudo[i] if pseudo is not None else np.full(scribbled[i].shape, -1, np.int8)
            stack = np.stack([scribbled[i] == 1, scribbled[i] >= 0, pl == 1, pl >= 0], axis=-1)
            rgb[b], target[b] = augment(images[i], stack.astype(np.float32), rng)
        y = torch.from_numpy(target).to(dev)
        logits = run.forward(to_input(rgb))
        loss = bce_loss(logits, y[..., 0], y[..., 1] > 0.5)
        if pseudo is not None:
            loss = loss + lam * bce_loss(logits, y[..., 2], y[..., 3] > 0.5)
        return run.optimise(loss)

    # Best held-out scribble IoU so far (of a resumed run: the one in its history).
    best_scribble_iou = [max((h.get("val_scribble_iou", -1.0) for h in state.history),
                             default=-1.0)]

    def validate() -> dict[str, float]:
        probs = run.predict(val_images, to_input, batch_size=max(batch_size, 8))
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
            save_weights(run.model, _card(card0, wf, state, metrics, hyper, provenance_data, dev,
                                      batch_size, lr, seed, val_truth is not None), out)
        return metrics

    if state.step_in_epoch == 0:
        average_now(state.epoch)  # a resumed run may start on an averaging epoch
    stopped = run_loop(
        model=run.model, optimizer=run.optimizer, state=state, budget=budget, step=step,
        validate=validate, on_best=lambda metrics: None, on_epoch_start=average_now,
        save=run.save,
        progress=progress, desc="train guidenet (scribbles only)", started=started,
    )
    if not out.exists():  # no validation in this run (resumed after the last epoch)
        validate()
    return run.result(out, stopped, ScribbleTrainResult, pseudo=pseudo_log)


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
