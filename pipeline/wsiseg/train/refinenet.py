"""``wsiseg train refinenet``: the scribble-driven corrector (DeepScribble's RefineNet).

Windows of ``refinenet.window_px`` working pixels whose tumor fraction lies in 20–80 % are
cut from the RefineNet training slides and GuideNet is run on them once (cached, a quarter
redrawn every epoch). Every step draws a batch with a random flip/quarter-turn, HED jitter of
the RGB, and fresh correction scribbles against GuideNet's prediction — DeepScribble's
automatic ones or the human-like simulator, chosen per sample with probability
``scribble_mix`` (:func:`wsiseg.scribbles.simulate.simulate_scribbles`). The six-channel input
comes from :func:`wsiseg.scribbles.encode.encode_refine_batch`, the encoding ``wsiseg refine``
uses, with the card's normalisation and ``max_distance_px``. In ``second_pass_prob`` of the
steps a second pass follows (Interactive Scribble Segmentation's iterative training): one
correction scribble where the first prediction is still wrong is added to the scribble
raster, the input re-encoded, and a second forward pass adds its loss. Loss: BCE.

The ablation variants of DeepScribble (I, I+P, I+P+S, I+P+D) are ``use_guide=False``
(guide channel all zero) and ``scribble_kind`` ``"none"`` / ``"raw"`` / ``"distance"``; the
card records both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from wsiseg.config import Workflow
from wsiseg.errors import WsisegError
from wsiseg.nets import load_weights, normalise_rgb, save_weights, weights_hash
from wsiseg.scribbles.encode import SCRIBBLE_KINDS, encode_refine_batch
from wsiseg.scribbles.raster import merge_scribbles
from wsiseg.scribbles.simulate import correction_scribble, simulate_scribbles
from wsiseg.train.augment import hed_jitter, random_dihedral
from wsiseg.train.guidenet import REFRESH_FRACTION, guidenet_card, load_training_data
from wsiseg.train.labels import LabelledSlide
from wsiseg.train.loop import (
    Budget,
    TrainResult,
    autocast_dtype,
    check_out_path,
    resolve_training_device,
    run_loop,
)
from wsiseg.train.losses import bce_loss, iou_counts
from wsiseg.train.sampling import max_cached, sample_patches
from wsiseg.train.setup import base_card, card_summary, resolve_workflow, start_run

__all__ = ["TUMOR_FRACTION_RANGE", "TrainResult", "refine_windows", "train_refinenet"]

#: DeepScribble keeps RefineNet patches whose tumor fraction lies within 20–80 %.
TUMOR_FRACTION_RANGE = (0.2, 0.8)


@dataclasses.dataclass
class RefineWindows:
    """RefineNet training windows with GuideNet's prediction (arrays of equal length N)."""

    rgb: np.ndarray  # uint8 (N, P, P, 3)
    truth: np.ndarray  # bool (N, P, P)
    valid: np.ndarray  # bool (N, P, P)
    guide: np.ndarray  # uint8 (N, P, P), probability × 255 as in the slide store

    def __len__(self) -> int:
        return len(self.rgb)


def refine_windows(
    slides: Sequence[LabelledSlide],
    window_px: int,
    n: int,
    *,
    rng: np.random.Generator,
    guide_fn,
) -> RefineWindows:
    """``n`` windows with 20–80 % tumor and their GuideNet probabilities.

    ``guide_fn`` maps uint8 (k, P, P, 3) RGB to float (k, P, P) probabilities.
    """
    rgb, mask, valid = sample_patches(
        slides, window_px, n, rng=rng, tumor_fraction_range=TUMOR_FRACTION_RANGE
    )
    prob = guide_fn(rgb)
    guide = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return RefineWindows(rgb=rgb, truth=mask > 0.5, valid=valid, guide=guide)


def train_refinenet(
    *,
    guidenet: Path,
    slides: Sequence[Path] = (),
    annotations: Sequence[Path] | Path | None = None,
    patch_folders: Sequence[Path] = (),
    out: Path,
    workflow: Workflow | str | Path | None = None,
    epochs: int = 20,
    steps_per_epoch: int = 100,
    batch_size: int = 4,
    lr: float = 1e-3,
    scribble_mix: float = 0.5,
    second_pass_prob: float = 0.3,
    seed: int = 0,
    device: str = "auto",
    max_minutes: float | None = None,
    cache_dir: Path | None = None,
    resume: bool = True,
    progress: bool = True,
    scribble_kind: str = "distance",
    use_guide: bool = True,
    val_fraction: float = 0.2,
    mpp: float | None = None,
    max_steps: int | None = None,
    cache_patches: int = 256,
    val_patches: int = 16,
    threads: int | None = None,
    weight_decay: float = 1e-4,
) -> TrainResult:
    """Train RefineNet on the output of a trained GuideNet; write the best weights to ``out``.

    Parameters
    ----------
    guidenet : Path
        GuideNet ``.safetensors`` (its card must fit the workflow: working mpp).
    scribble_mix : float
        Probability of DeepScribble's automatic scribbles per sample (else human-like).
    second_pass_prob : float
        Share of steps with the iterative second pass (0.3 in the paper).
    scribble_kind : {"distance", "raw", "none"}
        Scribble channels: distance maps (I+P+D), binary maps (I+P+S) or zeros (I+P).
    use_guide : bool
        False feeds an all-zero guide channel (ablation "I").
    cache_patches, val_patches
        Training windows held in memory (GuideNet is run on each once), validation windows.

    The other parameters are those of :func:`wsiseg.train.guidenet.train_guidenet`; the
    window size is the workflow's ``refinenet.window_px`` and the scribble distance maps
    saturate at its ``scribbles.max_distance_px``.

    Returns
    -------
    TrainResult
        ``card.metrics`` has ``val_iou`` (RefineNet with simulated scribbles) and
        ``val_guide_iou`` (GuideNet alone, same windows).

    Raises
    ------
    WsisegError
        Bad inputs or options (before any training); GuideNet weights that do not fit.
    """
    started = time.monotonic()
    out = check_out_path(out)
    wf = resolve_workflow(workflow)
    budget = Budget(epochs, steps_per_epoch, max_steps, max_minutes)
    if scribble_kind not in SCRIBBLE_KINDS:
        raise WsisegError(
            f"--scribble-kind must be one of {', '.join(SCRIBBLE_KINDS)}, got {scribble_kind!r}"
        )
    for name, value in (("scribble-mix", scribble_mix), ("second-pass-prob", second_pass_prob)):
        if not 0.0 <= value <= 1.0:
            raise WsisegError(f"--{name} must lie in [0, 1], got {value}")
    if batch_size < 1:
        raise WsisegError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_training_device(device, threads)

    guidenet = Path(guidenet)
    g_model, g_card = load_weights(guidenet, role="guidenet", device=dev)
    if abs(g_card.working_mpp - wf.working_mpp) > 1e-6 * wf.working_mpp:
        raise WsisegError(
            f"{guidenet}: GuideNet works at {g_card.working_mpp:g} µm/px but workflow "
            f"'{wf.name}' at {wf.working_mpp:g}; use the workflow it was trained with"
        )
    card0 = base_card(wf, "refinenet")
    card0 = dataclasses.replace(card0, scribble_encoding={
        "kind": scribble_kind,
        "max_distance_px": float(wf.scribbles.max_distance_px),
        "channels": _channel_names(scribble_kind, use_guide),
    })
    max_distance = float(card0.scribble_encoding["max_distance_px"])
    mean, std = tuple(card0.normalisation["mean"]), tuple(card0.normalisation["std"])
    window_px = card0.patch_px

    data = load_training_data(
        slides=slides, annotations=annotations, patch_folders=patch_folders,
        cache_dir=Path(cache_dir) if cache_dir else out.parent / "wsiseg-train-cache",
        workflow=wf, val_fraction=val_fraction, seed=seed, mpp=mpp, progress=progress,
    )
    g_sha = weights_hash(guidenet)
    config = {
        "role": "refinenet", "card": card_summary(card0), "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "seed": seed, "train": data.provenance["train"],
        "guidenet_sha256": g_sha, "scribble_kind": scribble_kind, "use_guide": use_guide,
        "scribble_mix": scribble_mix, "second_pass_prob": second_pass_prob,
    }

    amp = autocast_dtype(dev)
    g_model.eval()

    def guide_fn(rgb: np.ndarray) -> np.ndarray:
        probs = np.empty(rgb.shape[:3], np.float32)
        step_n = max(1, wf.guidenet.batch_size)
        with torch.inference_mode():
            for i in range(0, len(rgb), step_n):
                x = torch.from_numpy(np.ascontiguousarray(rgb[i : i + step_n])).to(dev)
                x = normalise_rgb(x.permute(0, 3, 1, 2), g_card)
                with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                    logits = g_model(x)
                probs[i : i + step_n] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        return probs

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4EF1]))
    run = start_run(card0, dev, out=out, seed=seed, lr=lr, weight_decay=weight_decay,
                    config=config, rng=rng, resume=resume, started=started)
    state = run.state
    model = run.model

    n_cache = max_cached(window_px, 3 + 1 + 1 + 1, max(cache_patches, batch_size))
    pool = refine_windows(data.train, window_px, n_cache, rng=rng, guide_fn=guide_fn)
    val_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7A1]))
    val = refine_windows(data.val_or_train, window_px, max(1, val_patches), rng=val_rng,
                         guide_fn=guide_fn)
    val_scribbles = np.stack([
        _scribbles_for(t, g, v, rng=val_rng, mix=scribble_mix, simulate=simulate_scribbles)
        for t, g, v in zip(val.truth, val.guide, val.valid, strict=True)
    ])

    def encode(rgb: np.ndarray, guide: np.ndarray, scribbles: np.ndarray) -> torch.Tensor:
        x = encode_refine_batch(rgb, guide, scribbles, max_distance_px=max_distance,
                                scribble_kind=scribble_kind, mean=mean, std=std)
        if not use_guide:
            x[:, 3] = 0.0
        x = torch.from_numpy(x).to(dev, non_blocking=True)
        return x.contiguous(memory_format=run.memory_format)

    forward = run.forward

    x_val = encode(val.rgb, val.guide, val_scribbles)

    def refresh(epoch: int) -> None:
        k = min(len(pool), max(1, round(REFRESH_FRACTION * len(pool))))
        slots = rng.choice(len(pool), size=k, replace=False)
        new = refine_windows(data.train, window_px, k, rng=rng, guide_fn=guide_fn)
        m = len(new)
        for name in ("rgb", "truth", "valid", "guide"):
            getattr(pool, name)[slots[:m]] = getattr(new, name)

    def step() -> float:
        model.train()
        idx = rng.integers(len(pool), size=batch_size)
        rgb = np.empty((batch_size, window_px, window_px, 3), np.uint8)
        truth = np.empty((batch_size, window_px, window_px), bool)
        valid = np.empty_like(truth)
        guide = np.empty((batch_size, window_px, window_px), np.uint8)
        scribbles = np.zeros((batch_size, window_px, window_px), np.int8)
        for b, i in enumerate(idx):
            rgb_b, truth[b], valid[b], guide[b] = random_dihedral(
                [pool.rgb[i], pool.truth[i], pool.valid[i], pool.guide[i]], rng
            )
            rgb[b] = hed_jitter(rgb_b, rng)
            scribbles[b] = _scribbles_for(truth[b], guide[b], valid[b], rng=rng,
                                          mix=scribble_mix, simulate=simulate_scribbles)
        y = torch.from_numpy(truth).to(dev, dtype=torch.float32)
        v = torch.from_numpy(valid).to(dev)
        logits = forward(encode(rgb, guide, scribbles))
        loss = bce_loss(logits, y, v)
        if rng.random() < second_pass_prob:
            first = (torch.sigmoid(logits.detach())[:, 0] >= 0.5).cpu().numpy()
            for b in range(batch_size):
                extra = correction_scribble(truth[b], first[b], rng=rng)
                extra[~valid[b]] = 0
                scribbles[b] = merge_scribbles(scribbles[b], extra)
            logits2 = forward(encode(rgb, guide, scribbles))
            loss = 0.5 * (loss + bce_loss(logits2, y, v))
        return run.optimise(loss)

    def validate() -> dict[str, float]:
        model.eval()
        probs = np.empty(val.truth.shape, np.float32)
        with torch.inference_mode():
            for i in range(0, len(val), batch_size):
                probs[i : i + batch_size] = torch.sigmoid(
                    forward(x_val[i : i + batch_size])
                )[:, 0].cpu().numpy()
        model.train()
        inter, union = iou_counts(probs >= card0.threshold, val.truth, val.valid)
        g_inter, g_union = iou_counts(val.guide >= round(255 * g_card.threshold), val.truth,
                                      val.valid)
        return {
            "val_iou": 1.0 if union == 0 else inter / union,
            "val_guide_iou": 1.0 if g_union == 0 else g_inter / g_union,
        }

    def write_best(metrics: dict[str, float]) -> None:
        card = guidenet_card(card0, wf, data, state, metrics, config, dev, seed)
        provenance = {
            **card.provenance,
            "guidenet": {"path": str(guidenet), "sha256": g_sha, "metrics": g_card.metrics},
            "scribble_mix": scribble_mix,
            "second_pass_prob": second_pass_prob,
            "use_guide": use_guide,
            "loss": "bce",
            "window_tumor_fraction": list(TUMOR_FRACTION_RANGE),
        }
        save_weights(model, dataclasses.replace(card, provenance=provenance), out)

    stopped = run_loop(
        model=model, optimizer=run.optimizer, state=state, budget=budget, step=step,
        validate=validate, on_best=write_best, on_epoch_start=refresh, save=run.save,
        progress=progress, desc="train refinenet", started=started,
    )
    if not out.exists():
        metrics = validate()
        state.best_val_iou = max(state.best_val_iou, metrics["val_iou"])
        write_best(metrics)
    return run.result(out, stopped)


def _scribbles_for(
    truth: np.ndarray, guide: np.ndarray, valid: np.ndarray, *, rng: np.random.Generator,
    mix: float, simulate,
) -> np.ndarray:
    """Correction scribbles for one window (none on unlabelled pixels)."""
    scribbles = simulate(truth, guide.astype(np.float32) / 255.0, rng=rng, mix=mix)
    scribbles[~valid] = 0
    return scribbles


def _channel_names(kind: str, use_guide: bool) -> list[str]:
    scribble = {"distance": ["fg_dist", "bg_dist"], "raw": ["fg_scribble", "bg_scribble"],
                "none": ["zero", "zero"]}[kind]
    return ["rgb", "guide" if use_guide else "zero", *scribble]
