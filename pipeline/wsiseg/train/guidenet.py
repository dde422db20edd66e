"""``wsiseg train guidenet``: the RGB tumor segmenter (DeepScribble's GuideNet).

Patches of ``guidenet.patch_px`` working pixels are cut from the slide stores (or from patch
pairs), tumor and non-tumor balanced, and kept in a bounded in-memory cache of which a quarter
is redrawn every epoch, so a step never waits for slide reading. Every step draws a batch from
the cache with a random flip/quarter-turn and HED stain jitter. Loss: BCE + soft Dice over the
labelled pixels; AdamW; mixed precision on CUDA. After every epoch the IoU on patches of
held-out slides decides whether the weights file (with its model card) is rewritten; the run
is resumable (see :mod:`wsiseg.train.loop`).
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

from wsiseg import __version__
from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.nets import save_weights
from wsiseg.train.augment import augment
from wsiseg.train.inputs import patch_pairs_from_folder
from wsiseg.train.labels import (
    LabelledSlide,
    labelled_slides_from_annotations,
    labelled_slides_from_patches,
)
from wsiseg.train.loop import (
    Budget,
    TrainResult,
    TrainState,
    check_out_path,
    resolve_training_device,
    run_loop,
)
from wsiseg.train.losses import bce_dice_loss, iou_counts
from wsiseg.train.sampling import max_cached, sample_patches, split_slides
from wsiseg.train.setup import base_card, card_summary, resolve_workflow, start_run

__all__ = ["TrainResult", "TrainingData", "load_training_data", "train_guidenet"]

#: Share of the patch cache redrawn at the start of every epoch.
REFRESH_FRACTION = 0.25


@dataclass
class TrainingData:
    """Labelled slides split into training and validation, and where they came from."""

    train: list[LabelledSlide]
    val: list[LabelledSlide]
    provenance: dict[str, Any]

    @property
    def validation_held_out(self) -> bool:
        return bool(self.val)

    @property
    def val_or_train(self) -> list[LabelledSlide]:
        return self.val or self.train


def load_training_data(
    *,
    slides: Sequence[Path],
    annotations: Sequence[Path] | Path | None,
    patch_folders: Sequence[Path],
    cache_dir: Path,
    workflow: Workflow,
    val_fraction: float,
    seed: int,
    mpp: float | None = None,
    progress: bool = False,
) -> TrainingData:
    """Read and check every input (errors before any training), then split by slide.

    Slides and patch pairs are split separately, each holding out ``val_fraction`` of its
    items (at least one when there are two or more).

    Raises
    ------
    WsisegError
        Any bad input (see :func:`labelled_slides_from_annotations`,
        :func:`patch_pairs_from_folder`), annotations without slides, or nothing to train on.
    """
    slides = [Path(s) for s in slides]
    patch_folders = [Path(p) for p in patch_folders]
    if not slides and not patch_folders:
        raise WsisegError(
            "no training data: give slides with --annotations, or --patch-folder DIR"
        )
    if annotations is not None and not slides:
        raise WsisegError("--annotations given without slides (--slides SLIDE...)")
    if slides and annotations is None:
        raise WsisegError("slides given without --annotations (GeoJSON exports or masks)")
    # Patch folders are read first: they are cheap, and their errors come before tiling.
    pairs = []
    for folder in patch_folders:
        images, masks = patch_pairs_from_folder(folder)
        pairs += labelled_slides_from_patches(images, masks, name=folder.name)
    labelled = (
        labelled_slides_from_annotations(
            slides, annotations, cache_dir, workflow, mpp=mpp, progress=progress
        )
        if slides else []
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B117]))
    train_s, val_s = split_slides(labelled, val_fraction, rng)
    train_p, val_p = split_slides(pairs, val_fraction, rng)
    train, val = train_s + train_p, val_s + val_p
    if not train:
        raise WsisegError("no training data: the training set is empty")
    provenance = {
        "slides": [str(s) for s in slides],
        "annotations": (
            [str(a) for a in annotations] if isinstance(annotations, list | tuple)
            else (str(annotations) if annotations is not None else None)
        ),
        "patch_folders": [str(p) for p in patch_folders],
        "train": _names(train),
        "validation": _names(val) if val else "training data (nothing held out)",
    }
    return TrainingData(train=train, val=val, provenance=provenance)


def _names(items: Sequence[LabelledSlide], limit: int = 50) -> list[str]:
    names = [s.name for s in items]
    return names if len(names) <= limit else [*names[:limit], f"... ({len(names)} in all)"]


def train_guidenet(
    *,
    slides: Sequence[Path] = (),
    annotations: Sequence[Path] | Path | None = None,
    patch_folders: Sequence[Path] = (),
    out: Path,
    workflow: Workflow | str | Path | None = None,
    epochs: int = 20,
    steps_per_epoch: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "auto",
    max_minutes: float | None = None,
    cache_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    mpp: float | None = None,
    max_steps: int | None = None,
    cache_patches: int = 512,
    val_patches: int = 32,
    threads: int | None = None,
    weight_decay: float = 1e-4,
) -> TrainResult:
    """Train GuideNet and write the best weights, with model card, to ``out``.

    Parameters
    ----------
    slides, annotations
        Slides and their QuPath GeoJSON exports or mask images (files or folders; matched by
        name, see :func:`wsiseg.train.labels.labelled_slides_from_annotations`).
    patch_folders
        Folders of ``images/`` + ``masks/`` patch pairs (taken as being at the working mpp).
    out : Path
        ``*.safetensors`` weights to write; the checkpoint goes beside it
        (``<stem>.checkpoint.safetensors``).
    workflow
        Workflow (or preset name / YAML path): working mpp, ``guidenet.patch_px``, the card
        template ``guidenet.model``, class names.
    epochs, steps_per_epoch, batch_size, lr, weight_decay
        Schedule and AdamW settings (constant learning rate).
    val_fraction
        Share of slides (and of patch pairs) held out for the per-epoch validation IoU.
    seed
        Seeds the split, the sampling, augmentation and the initial weights.
    device
        ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
    max_minutes
        Time budget for the whole call (data preparation included); training stops in time
        for a last validation.
    cache_dir
        Where slide stores and label rasters are kept (default ``<out dir>/wsiseg-train-cache``).
    resume
        Continue from the checkpoint if there is one (else start over and overwrite it).
    progress
        tqdm progress bar on stderr.
    mpp
        Level-0 µm/px for slides whose files do not say.
    max_steps
        Stop after this many optimiser steps in all (runs together); resumable.
    cache_patches
        Patches held in memory (also capped at 1 GiB).
    val_patches
        Validation patches (fixed for the run).
    threads
        CPU threads for torch (default: torch's choice).

    Returns
    -------
    TrainResult

    Raises
    ------
    WsisegError
        Bad inputs or options, before any training.
    """
    started = time.monotonic()
    out = check_out_path(out)
    wf = resolve_workflow(workflow)
    budget = Budget(epochs, steps_per_epoch, max_steps, max_minutes)
    if batch_size < 1:
        raise WsisegError(f"--batch-size must be at least 1, got {batch_size}")
    card0 = base_card(wf, "guidenet")
    dev = resolve_training_device(device, threads)
    data = load_training_data(
        slides=slides, annotations=annotations, patch_folders=patch_folders,
        cache_dir=Path(cache_dir) if cache_dir else out.parent / "wsiseg-train-cache",
        workflow=wf, val_fraction=val_fraction, seed=seed, mpp=mpp, progress=progress,
    )
    patch_px = card0.patch_px
    config = {
        "role": "guidenet", "card": card_summary(card0), "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "seed": seed, "train": data.provenance["train"],
    }

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6E7]))
    run = start_run(card0, dev, out=out, seed=seed, lr=lr, weight_decay=weight_decay,
                    config=config, rng=rng, resume=resume, started=started)
    state = run.state

    n_cache = max_cached(patch_px, 3 + 4 + 1, max(cache_patches, batch_size))
    images, masks, valid = sample_patches(data.train, patch_px, n_cache, rng=rng)
    val_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    val_set = sample_patches(data.val_or_train, patch_px, max(1, val_patches), rng=val_rng)

    def refresh(epoch: int) -> None:
        k = max(1, round(REFRESH_FRACTION * len(images)))
        slots = rng.choice(len(images), size=min(k, len(images)), replace=False)
        new = sample_patches(data.train, patch_px, len(slots), rng=rng)
        images[slots], masks[slots], valid[slots] = new

    def to_input(rgb: np.ndarray) -> torch.Tensor:
        return run.rgb_input(rgb, card0)

    def step() -> float:
        run.model.train()
        idx = rng.integers(len(images), size=batch_size)
        rgb = np.empty((batch_size, patch_px, patch_px, 3), np.uint8)
        target = np.empty((batch_size, patch_px, patch_px, 2), np.float32)
        for b, i in enumerate(idx):
            both = np.stack([masks[i], valid[i]], axis=-1).astype(np.float32)
            rgb[b], target[b] = augment(images[i], both, rng)
        y = torch.from_numpy(target).to(dev)
        logits = run.forward(to_input(rgb))
        return run.optimise(bce_dice_loss(logits, y[..., 0], y[..., 1] > 0.5))

    def validate() -> dict[str, float]:
        probs = run.predict(val_set[0], to_input, batch_size=max(batch_size, 8))
        inter, union = iou_counts(probs >= card0.threshold, val_set[1] > 0.5, val_set[2])
        return {"val_iou": 1.0 if union == 0 else inter / union}

    def write_best(metrics: dict[str, float]) -> None:
        card = guidenet_card(card0, wf, data, state, metrics, config, dev, seed)
        save_weights(run.model, card, out)

    stopped = run_loop(
        model=run.model, optimizer=run.optimizer, state=state, budget=budget, step=step,
        validate=validate, on_best=write_best, on_epoch_start=refresh, save=run.save,
        progress=progress, desc="train guidenet", started=started,
    )
    if not out.exists():  # no validation in this run (e.g. resumed after the last epoch)
        metrics = validate()
        state.best_val_iou = max(state.best_val_iou, metrics["val_iou"])
        write_best(metrics)
    return run.result(out, stopped)


def guidenet_card(card0, wf: Workflow, data: TrainingData, state: TrainState,
                  metrics: dict[str, float], config: dict[str, Any], dev: torch.device,
                  seed: int):
    """The card of the current best GuideNet: provenance (data, workflow, run) and metrics."""
    provenance = {
        "trained": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wsiseg_version": __version__,
        "seed": seed,
        "device": dev.type,
        "training_data": data.provenance,
        "workflow": {"name": wf.name, "source": wf.source, **wf.to_dict()},
        "batch_size": config["batch_size"],
        "lr": config["lr"],
        "loss": "bce + soft dice",
        "augmentation": "dihedral + HED jitter",
    }
    clean = {k: round(float(v), 4) for k, v in metrics.items() if _finite(v)}
    return dataclasses.replace(
        card0,
        provenance=provenance,
        metrics={
            **clean,
            "epoch": state.epoch + (1 if state.step_in_epoch else 0),
            "step": state.step,
            "val_held_out": data.validation_held_out,
        },
    )


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
