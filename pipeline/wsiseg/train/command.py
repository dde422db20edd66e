"""``wsiseg train``: pick the trainer for the network asked for and fill in the defaults.

GuideNet from annotations or patch pairs (:func:`~wsiseg.train.guidenet.train_guidenet`),
GuideNet from scribbles alone (:func:`~wsiseg.train.scribble2label.
train_guidenet_scribbles_only`, where the annotations are the scribble exports) or RefineNet
(:func:`~wsiseg.train.refinenet.train_refinenet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wsiseg.errors import UsageError
from wsiseg.train.guidenet import train_guidenet
from wsiseg.train.loop import TrainResult
from wsiseg.train.refinenet import train_refinenet
from wsiseg.train.scribble2label import train_guidenet_scribbles_only

__all__ = ["result_line", "train_network"]


def train_network(
    network: str,
    *,
    out: Path,
    slides: Sequence[Path] = (),
    annotations: Sequence[Path] = (),
    patch_folders: Sequence[Path] = (),
    cache_dir: Path | None = None,
    batch_size: int | None = None,
    restart: bool = False,
    scribbles_only: bool = False,
    **options: Any,
) -> TrainResult:
    """Train ``network`` (``"guidenet"`` or ``"refinenet"``) and return what the run produced.

    Parameters
    ----------
    network : {"guidenet", "refinenet"}
    out : Path
        The weights to write.
    slides, annotations, patch_folders
        The training data; no annotations means none were given.
    cache_dir : Path, optional
        Slide stores and label rasters (default: ``<out stem>.cache`` beside ``out``).
    batch_size : int, optional
        Default: the trainer's own.
    restart : bool
        Ignore an existing checkpoint instead of resuming from it.
    scribbles_only : bool
        GuideNet from scribbles alone: ``annotations`` are the scribble exports.
    **options
        The trainer's other keyword arguments (schedule, device, and its own: ``tau``,
        ``alpha``, ... for scribbles only; ``guidenet``, ``scribble_mix``, ... for RefineNet).

    Raises
    ------
    UsageError
        An unknown network, or scribbles-only training asked for RefineNet.
    WsisegError
        Any error of the trainer (bad inputs are reported before training).
    """
    out = Path(out)
    data: dict[str, Any] = {
        "slides": [Path(s) for s in slides],
        "annotations": [Path(a) for a in annotations] or None,
        "patch_folders": [Path(p) for p in patch_folders],
        "out": out,
        "cache_dir": Path(cache_dir) if cache_dir else out.parent / f"{out.stem}.cache",
        "resume": not restart,
    }
    if batch_size:
        data["batch_size"] = batch_size
    if network == "guidenet" and scribbles_only:
        data["scribbles"] = data.pop("annotations")
        return train_guidenet_scribbles_only(**data, **options)
    if network == "guidenet":
        return train_guidenet(**data, **options)
    if network == "refinenet" and not scribbles_only:
        return train_refinenet(**data, **options)
    raise UsageError(f"cannot train {network!r}" + (" from scribbles alone" if scribbles_only
                                                     else "; choose guidenet or refinenet"))


def result_line(result: TrainResult) -> str:
    """One line for the terminal: the weights, their best IoU, epochs, steps, time, why stopped."""
    return (
        f"{result.weights}: best validation IoU {result.best_val_iou:.3f} after "
        f"{result.epochs_run} epochs ({result.steps} steps, {result.seconds:.0f} s, "
        f"stopped: {result.stopped})"
    )
