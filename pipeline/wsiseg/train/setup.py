"""One training run's set-up, shared by the three trainers: model, optimiser, scaler, checkpoint.

GuideNet, RefineNet and Scribble2Label training all build their network from a model card,
put it on the device (channels-last on CUDA, where convolutions run faster in that layout),
train it with AdamW under mixed precision (float16 and a ``GradScaler`` on CUDA, float32 on
CPU) and resume from the checkpoint beside the weights. :func:`start_run` does all of that
in one place; :class:`TrainingRun` offers the pieces a step, a validation and the end of the
run need.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.config import Workflow, load_workflow
from wsiseg.errors import WsisegError
from wsiseg.nets import ModelCard, build_model, load_card, normalise_rgb
from wsiseg.train.loop import (
    TrainResult,
    TrainState,
    autocast_dtype,
    batchnorm_for_short_runs,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["TrainingRun", "base_card", "card_summary", "resolve_workflow", "start_run"]


def resolve_workflow(workflow: Workflow | str | Path | None) -> Workflow:
    """A workflow as given, or loaded from a preset name / YAML path (None: the default)."""
    return workflow if isinstance(workflow, Workflow) else load_workflow(workflow)


def base_card(workflow: Workflow, role: str) -> ModelCard:
    """The workflow's card template for ``role`` with its patch size and working mpp."""
    template = getattr(workflow, role).model
    card = load_card(template)
    if card.role != role:
        raise WsisegError(f"{template}: model card is for {card.role}, not {role}")
    patch_px = workflow.guidenet.patch_px if role == "guidenet" else workflow.refinenet.window_px
    if patch_px % 32:
        key = "guidenet.patch_px" if role == "guidenet" else "refinenet.window_px"
        raise WsisegError(
            f"{workflow.source}: {key} {patch_px} must be a multiple of 32 for the U-Net"
        )
    return dataclasses.replace(card, patch_px=patch_px, working_mpp=workflow.working_mpp)


def card_summary(card: ModelCard) -> dict[str, Any]:
    """The card fields a checkpoint must agree on to be resumed."""
    return {k: getattr(card, k) for k in ("architecture", "encoder", "in_channels", "patch_px",
                                          "working_mpp")}


@dataclass
class TrainingRun:
    """A network being trained, with its optimiser, scaler, checkpoint and state.

    Attributes
    ----------
    model : torch.nn.Module
        On ``device``, channels-last on CUDA, batch norm set for short runs.
    optimizer : torch.optim.AdamW
    scaler : torch.amp.GradScaler
        Enabled only when ``amp`` is float16.
    device : torch.device
    amp : torch.dtype or None
        Autocast dtype (None: float32 throughout).
    checkpoint : Path
        ``<out stem>.checkpoint.safetensors``.
    state : TrainState
        Loaded from the checkpoint when the run resumes.
    resumed_from_step : int
        ``state.step`` at the start of this call (0 for a fresh run).
    config : dict
        What a checkpoint must match to be resumed.
    rng : numpy.random.Generator
        The run's generator, saved in and restored from the checkpoint.
    started : float
        ``time.monotonic()`` at the start of the call.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: torch.dtype | None
    checkpoint: Path
    state: TrainState
    resumed_from_step: int
    config: dict[str, Any]
    rng: np.random.Generator
    started: float

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def rgb_input(self, rgb: np.ndarray, card: ModelCard) -> torch.Tensor:
        """uint8 (N, P, P, 3) patches → the normalised float (N, 3, P, P) input on the device."""
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, non_blocking=True)
        return normalise_rgb(x.permute(0, 3, 1, 2), card).contiguous(
            memory_format=self.memory_format
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits of ``x``, under autocast."""
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return self.model(x).float()

    def optimise(self, loss: torch.Tensor) -> float:
        """One optimiser step on ``loss`` (through the scaler); returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def predict(
        self,
        images: np.ndarray,
        to_input: Callable[[np.ndarray], torch.Tensor],
        *,
        batch_size: int,
    ) -> np.ndarray:
        """Probabilities (float32 (N, P, P)) of uint8 (N, P, P, 3) patches, in eval mode."""
        self.model.eval()
        out = np.empty(images.shape[:3], np.float32)
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                logits = self.forward(to_input(images[i : i + batch_size]))
                out[i : i + batch_size] = torch.sigmoid(logits)[:, 0].cpu().numpy()
        self.model.train()
        return out

    def save(self, state: TrainState) -> None:
        """Write the checkpoint (atomically; see :mod:`wsiseg.train.loop`)."""
        save_checkpoint(self.checkpoint, self.model, self.optimizer, state, config=self.config,
                        rng=self.rng, scaler=self.scaler)

    def result(self, out: Path, stopped: str, cls: type[TrainResult] = TrainResult,
               **extra: Any) -> TrainResult:
        """What the run produced: the best weights ``out`` with their card, and the history."""
        state = self.state
        return cls(
            weights=out, card=load_card(out), best_val_iou=state.best_val_iou,
            epochs_run=state.epoch, seconds=time.monotonic() - self.started,
            history=state.history, steps=state.step, resumed_from_step=self.resumed_from_step,
            stopped=stopped, **extra,
        )


def start_run(
    card: ModelCard,
    device: torch.device,
    *,
    out: Path,
    seed: int,
    lr: float,
    weight_decay: float,
    config: dict[str, Any],
    rng: np.random.Generator,
    resume: bool,
    started: float,
) -> TrainingRun:
    """Build the network of ``card`` and its optimiser; resume from the checkpoint if asked.

    ``torch`` is seeded with ``seed`` just before the weights are drawn, so a run's initial
    weights depend on the seed alone.

    Raises
    ------
    WsisegError
        A checkpoint that cannot be read or was written with another configuration.
    """
    torch.manual_seed(seed)
    model = build_model(card).to(device)
    batchnorm_for_short_runs(model)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    ckpt = checkpoint_path(out)
    state = TrainState()
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, optimizer, config=config, rng=rng, scaler=scaler)
    return TrainingRun(
        model=model, optimizer=optimizer, scaler=scaler, device=device, amp=amp,
        checkpoint=ckpt, state=state, resumed_from_step=state.step, config=config, rng=rng,
        started=started,
    )
