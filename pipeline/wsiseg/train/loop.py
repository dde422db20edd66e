"""The training loop both networks share: epochs, time budget, validation, best weights,
resumable checkpoints, progress.

A checkpoint is one ``.safetensors`` file beside the weights (``<out stem>.checkpoint
.safetensors``): the model's and the optimiser's tensors and torch's random state as tensors,
and everything else (step, epoch, history, numpy's generator state, optimiser settings, the
run's configuration) as JSON under the metadata key ``wsiseg_checkpoint``. Nothing is ever
pickled or unpickled. It is written atomically at the end of every epoch, every
``checkpoint_every_s`` seconds, when a step or time budget ends the run, and on Ctrl-C; a rerun
with the same configuration continues from it (step counter, epoch, best IoU and random state
included), a rerun with another configuration is refused with the reason.

The best weights (highest validation IoU so far) are the ``out`` file itself, with the model
card, rewritten whenever validation improves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.atomic import atomic_path
from wsiseg.errors import WsisegError

CHECKPOINT_KEY = "wsiseg_checkpoint"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    weights : Path
        The best weights (``.safetensors`` with model card).
    card : ModelCard
        The card written into ``weights``.
    best_val_iou : float
        Best validation IoU seen (also ``card.metrics["val_iou"]``).
    epochs_run : int
        Epochs completed in all runs together (a resumed run continues the count).
    seconds : float
        Wall time of this call.
    history : list of dict
        One entry per validation: epoch, step, train_loss, val_iou (and more), seconds.
    steps : int
        Optimiser steps in all runs together.
    resumed_from_step : int
        Step the run continued from (0 for a fresh run).
    stopped : str
        Why the run ended: ``"done"``, ``"time budget"``, ``"max_steps"``.
    """

    weights: Path
    card: Any
    best_val_iou: float
    epochs_run: int
    seconds: float
    history: list[dict]
    steps: int = 0
    resumed_from_step: int = 0
    stopped: str = "done"


@dataclass
class TrainState:
    """Progress of a run, saved in its checkpoint (JSON-able)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps in all
    step_in_epoch: int = 0
    best_val_iou: float = -1.0
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training wall time of all runs
    loss_sum: float = 0.0  # of the current epoch so far
    loss_count: int = 0


@dataclass(frozen=True)
class Budget:
    """When to stop: epochs × steps, an optional step cap and an optional time budget."""

    epochs: int
    steps_per_epoch: int
    max_steps: int | None = None
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch"):
            if getattr(self, name) < 1:
                raise WsisegError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 0:
            raise WsisegError("--max-steps must not be negative")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise WsisegError(f"--max-minutes must be positive, got {self.max_minutes}")


def checkpoint_path(out: Path) -> Path:
    """The checkpoint file of weights ``out``: ``<stem>.checkpoint.safetensors`` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.checkpoint.safetensors")


def check_out_path(out: Path) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WsisegError(f"{out}: weights are written as .safetensors files only")
    if out.is_dir():
        raise WsisegError(f"{out}: is a directory")
    return out


def resolve_training_device(device: str, threads: int | None) -> torch.device:
    """The torch device (see :func:`wsiseg.infer.resolve_device`); sets CPU threads if given."""
    from wsiseg.infer import resolve_device

    if threads is not None:
        if threads < 1:
            raise WsisegError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return resolved


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16 (with a grad scaler); None (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


#: Batch-norm momentum while training (PyTorch convention: weight of the newest batch).
BATCHNORM_MOMENTUM = 0.1


def batchnorm_for_short_runs(model: torch.nn.Module, momentum: float = BATCHNORM_MOMENTUM) -> None:
    """Let every batch-norm layer's running statistics follow the training batches closely.

    smp's EfficientNet encoder keeps TensorFlow's 0.99 decay (PyTorch momentum 0.01): after a
    few hundred steps — a CPU budget of minutes — its running statistics still mostly hold
    their initial values, and the network in eval mode predicts almost nothing even where it
    segments well in training mode. The momentum is a module setting, not part of the weights.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    *,
    config: dict[str, Any],
    rng: np.random.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write a checkpoint atomically (see the module docstring)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, value in getattr(model, "_orig_mod", model).state_dict().items():
        tensors[f"model/{name}"] = value.detach().to("cpu").contiguous()
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, slots in optim["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{slot}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[slot] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {
        "format": CHECKPOINT_FORMAT,
        "state": asdict(state),
        "config": config,
        "numpy_rng": rng.bit_generator.state,
        "optim_param_groups": optim["param_groups"],
        "optim_scalars": scalars,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={CHECKPOINT_KEY: json.dumps(meta, allow_nan=False)})


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: dict[str, Any],
    rng: np.random.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> TrainState:
    """Restore model, optimiser, random state and progress from a checkpoint.

    Raises
    ------
    WsisegError
        Not a wsiseg checkpoint, or one made with another configuration (named).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[CHECKPOINT_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - safetensors/json/key errors: one message
        raise WsisegError(
            f"{path}: not a readable wsiseg training checkpoint ({str(exc).splitlines()[0]}); "
            f"delete it or train with --no-resume"
        ) from None
    old = meta.get("config", {})
    changed = sorted(k for k in config.keys() | old.keys() if old.get(k) != config.get(k))
    if meta.get("format") != CHECKPOINT_FORMAT or changed:
        what = ", ".join(
            f"{k}: {json.dumps(old.get(k))[:60]} → {json.dumps(config.get(k))[:60]}"
            for k in changed[:3]
        ) or "format"
        raise WsisegError(
            f"{path}: the checkpoint was made with other settings ({what}); train with "
            f"--no-resume to start over, or delete the checkpoint"
        )
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    getattr(model, "_orig_mod", model).load_state_dict(model_state, strict=True)
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, slot = key.split("/", 2)
            slots.setdefault(int(index), {})[slot] = value
    for index, values in meta["optim_scalars"].items():
        slots.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": slots, "param_groups": meta["optim_param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda/")]
    if cuda_states and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # fewer devices now: keep the fresh state
            torch.cuda.set_rng_state_all(cuda_states)
    rng.bit_generator.state = meta["numpy_rng"]
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return TrainState(**meta["state"])


# --------------------------------------------------------------------------------------------
# The loop

_CHECKPOINT_EVERY_S = 120.0


def run_loop(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    budget: Budget,
    step: Callable[[], float],
    validate: Callable[[], dict[str, float]],
    on_best: Callable[[dict[str, float]], None],
    on_epoch_start: Callable[[int], None],
    save: Callable[[TrainState], None],
    progress: bool,
    desc: str,
    started: float,
    checkpoint_every_s: float = _CHECKPOINT_EVERY_S,
) -> str:
    """Train until the epochs are done or a budget ends the run; returns why it stopped.

    ``step()`` makes one optimiser step and returns its loss; ``validate()`` returns metrics
    with ``"val_iou"``; ``on_best(metrics)`` writes the weights; ``on_epoch_start(epoch)`` may
    refresh cached patches; ``save(state)`` writes the checkpoint. Validation runs at the end
    of every epoch and when a budget ends an epoch early. ``started`` is ``time.monotonic()``
    at the start of the call (data preparation counts against ``max_minutes``).
    """
    from tqdm import tqdm

    deadline = None if budget.max_minutes is None else started + 60.0 * budget.max_minutes
    total = budget.epochs * budget.steps_per_epoch
    show = progress and not os.environ.get("WSISEG_NO_PROGRESS")
    bar = tqdm(total=total, initial=min(state.step, total), desc=desc, unit="step",
               disable=not show, file=sys.stderr, dynamic_ncols=True)
    last_save = time.monotonic()
    validate_s = 0.0
    first_epoch = state.epoch
    stopped = "done"
    run_start = time.monotonic()
    seconds_before = state.seconds

    def now_seconds() -> float:
        return seconds_before + time.monotonic() - run_start

    try:
        while state.epoch < budget.epochs:
            if state.step_in_epoch == 0 and state.epoch > first_epoch:
                on_epoch_start(state.epoch)
            while state.step_in_epoch < budget.steps_per_epoch:
                if budget.max_steps is not None and state.step >= budget.max_steps:
                    stopped = "max_steps"
                    break
                if deadline is not None and time.monotonic() + validate_s >= deadline:
                    stopped = "time budget"
                    break
                loss = step()
                state.step += 1
                state.step_in_epoch += 1
                if math.isfinite(loss):
                    state.loss_sum += loss
                    state.loss_count += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", best_iou=f"{max(state.best_val_iou, 0):.3f}")
                if time.monotonic() - last_save > checkpoint_every_s:
                    state.seconds = now_seconds()
                    save(state)
                    last_save = time.monotonic()
            if state.step_in_epoch > 0 and (state.loss_count or stopped == "done"):
                t = time.monotonic()
                metrics = validate()
                validate_s = time.monotonic() - t
                entry = {
                    "epoch": state.epoch + 1,
                    "step": state.step,
                    "train_loss": state.loss_sum / max(1, state.loss_count),
                    **metrics,
                    "seconds": round(now_seconds(), 2),
                }
                state.history.append(entry)
                if metrics["val_iou"] > state.best_val_iou:
                    state.best_val_iou = float(metrics["val_iou"])
                    on_best(metrics)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}",
                                val_iou=f"{metrics['val_iou']:.3f}")
            state.loss_sum, state.loss_count = 0.0, 0
            if stopped != "done":
                break
            state.epoch += 1
            state.step_in_epoch = 0
            state.seconds = now_seconds()
            save(state)
            last_save = time.monotonic()
    except KeyboardInterrupt:
        state.seconds = now_seconds()
        save(state)  # Ctrl-C: keep the work; a rerun continues from here
        bar.close()
        raise
    state.seconds = now_seconds()
    save(state)
    bar.close()
    return stopped
