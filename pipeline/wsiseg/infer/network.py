"""The network on a batch of patches: device and layout, a runtime Network, TTA."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from wsiseg.runtime import Network, torch_network


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` in eval mode and channels-last layout (in place).

    Channels-last is the fast layout for convolutions on CUDA (tensor cores) and on CPU
    (oneDNN) alike; :func:`forward_batch` hands the torch runtime its patches in that layout.
    On CUDA, cuDNN may pick its fastest kernels for the one patch shape used throughout.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device=device, memory_format=torch.channels_last).eval()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16






def as_network(model: Network | torch.nn.Module, device: torch.device) -> Network:
    """A :class:`wsiseg.runtime.Network` as is; a bare torch module (logits out) wrapped as
    the torch runtime on ``device`` (the reference path, and what tests pass)."""
    if isinstance(model, Network):
        return model
    return torch_network(model, device)


def forward_batch(
    network: Network,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    batch_nchw: torch.Tensor,
    tta: bool,
) -> torch.Tensor:
    """(N, 3, P, P) uint8 → (N, P, P) float32 probabilities (on the network's device).

    ``normalise`` applies where the network takes float input; a network that
    :attr:`~wsiseg.runtime.Network.takes_rgb` (OpenVINO GuideNet) normalises with its card's
    mean and std inside the compiled model, and gets the uint8 pixels as they are.
    """
    if network.takes_rgb:
        x, predict = batch_nchw, network.rgb
    else:
        if network.runtime == "torch":
            # torch's convolutions run channels-last (see prepare_model): convert the uint8
            # pixels, a quarter of the bytes of the float input normalise makes from them
            # (and keeps in their layout).
            batch_nchw = batch_nchw.contiguous(memory_format=torch.channels_last)
        x, predict = normalise(batch_nchw), network
    if not tta:
        return predict(x)[:, 0]
    return dihedral_mean(lambda t: predict(t)[:, 0], x)


def dihedral_mean(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Test-time augmentation: the mean of ``predict`` over the 8 flips / 90° rotations.

    ``x`` is (N, C, H, W) with square H = W; ``predict`` maps it to (N, H, W) probabilities.
    Each prediction is mapped back before averaging, so every channel of ``x`` (RGB, guide,
    scribble distances) moves with the image.
    """
    total = torch.zeros(x.shape[0], x.shape[2], x.shape[3], device=x.device)
    for flip in (False, True):
        xf = torch.flip(x, dims=(3,)) if flip else x
        for k in range(4):
            prob = torch.rot90(predict(torch.rot90(xf, k, dims=(2, 3))), -k, dims=(1, 2))
            total += torch.flip(prob, dims=(2,)) if flip else prob
    return total / 8


def predict_patches(
    model: Network | torch.nn.Module,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    batch_uint8: NDArray[np.uint8],
    device: torch.device,
    *,
    tta: bool = False,
) -> NDArray[np.float32]:
    """Tumor probabilities of a batch of RGB patches (the network's own work, nothing else).

    Parameters
    ----------
    model : Network or torch.nn.Module
        GuideNet from :func:`wsiseg.runtime.load_network`, or a bare torch module mapping
        ``(N, 3, P, P)`` float to ``(N, 1, P, P)`` logits (run as the torch runtime).
    normalise : callable
        ``(N, 3, P, P)`` uint8 tensor → float tensor in the same memory layout, e.g.
        ``nets.normalise_rgb`` bound to the model card.
    batch_uint8 : ndarray of uint8, shape (N, 3, P, P)
        RGB patches channel first, as the slide store holds them.
    device : torch.device
    tta : bool
        Average over the 8 dihedral transforms (flips and quarter turns).

    Returns
    -------
    ndarray of float32, shape (N, P, P)
        Sigmoid of the logits.
    """
    network = as_network(model, device)
    pin = network.device.type == "cuda"
    x = torch.from_numpy(np.ascontiguousarray(batch_uint8))
    with torch.inference_mode():
        x = x.pin_memory() if pin else x
        prob = forward_batch(network, normalise, x.to(network.device, non_blocking=pin), tta)
        return prob.cpu().numpy()
