"""Losses and the training metric: BCE (+ soft Dice) over labelled pixels, and IoU."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

_EPS = 1.0


def _flat(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None):
    if logits.ndim == 4 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    weight = (
        torch.ones_like(target, dtype=torch.float32) if valid is None
        else valid.to(torch.float32)
    )
    return logits.float(), target.float(), weight


def bce_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy averaged over the labelled pixels.

    Parameters
    ----------
    logits : torch.Tensor, shape (N, H, W) or (N, 1, H, W)
    target : torch.Tensor, shape (N, H, W)
        1 tumor, 0 non-tumor (float).
    valid : torch.Tensor of bool, shape (N, H, W), optional
        Pixels that count (unlabelled ones do not); all when None.

    Returns
    -------
    torch.Tensor
        Scalar; 0 when no pixel counts.
    """
    logits, target, weight = _flat(logits, target, valid)
    per_px = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_px * weight).sum() / weight.sum().clamp_min(1.0)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``1 − soft Dice`` of the tumor class over the labelled pixels of the whole batch.

    Smoothed by 1 in numerator and denominator, so a batch without tumor asks for a
    prediction without tumor instead of dividing by zero. Shapes as for :func:`bce_loss`.
    """
    logits, target, weight = _flat(logits, target, valid)
    prob = torch.sigmoid(logits) * weight
    target = target * weight
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + _EPS) / (prob.sum() + target.sum() + _EPS)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """GuideNet's loss: :func:`bce_loss` + :func:`soft_dice_loss` (shapes as there)."""
    return bce_loss(logits, target, valid) + soft_dice_loss(logits, target, valid)


def iou(pred_bool: ArrayLike, target_bool: ArrayLike, valid: ArrayLike | None = None) -> float:
    """Intersection over union of the tumor class (1.0 when both are empty).

    Parameters
    ----------
    pred_bool, target_bool : array-like of bool, same shape
    valid : array-like of bool, optional
        Only these pixels count.

    Returns
    -------
    float
        ``|pred ∩ target| / |pred ∪ target|`` over the counted pixels.
    """
    intersection, union = iou_counts(pred_bool, target_bool, valid)
    return 1.0 if union == 0 else intersection / union


def iou_counts(
    pred_bool: ArrayLike, target_bool: ArrayLike, valid: ArrayLike | None = None
) -> tuple[int, int]:
    """``(|pred ∩ target|, |pred ∪ target|)`` in pixels, to pool IoU over many patches."""
    pred = np.asarray(pred_bool, dtype=bool)
    target = np.asarray(target_bool, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        pred, target = pred & valid, target & valid
    return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred | target))
