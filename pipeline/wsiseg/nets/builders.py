"""The networks a model card describes, and their normalised RGB input.

Both networks are segmentation-models-pytorch U-Nets; they know nothing of slides or zarr:
they map ``(N, C, H, W)`` float tensors to ``(N, 1, H, W)`` logits.
"""

from __future__ import annotations

import functools

import torch

from wsiseg.errors import WsisegError
from wsiseg.nets.card import ModelCard


def build_model(card: ModelCard) -> torch.nn.Module:
    """The untrained network a card describes (never downloads encoder weights).

    Returns
    -------
    torch.nn.Module
        Maps ``(N, card.in_channels, H, W)`` float32 to ``(N, 1, H, W)`` logits; H and W
        must be multiples of 32.
    """
    import segmentation_models_pytorch as smp  # heavy import: only when a network is built

    widths = {} if card.decoder_channels is None else {
        "decoder_channels": tuple(card.decoder_channels)
    }
    try:
        return smp.create_model(
            card.architecture,
            encoder_name=card.encoder,
            encoder_weights=None,
            in_channels=card.in_channels,
            classes=card.classes,
            **widths,
        )
    except (KeyError, TypeError, ValueError) as exc:  # TypeError: widths it does not take
        raise WsisegError(
            f"model card: cannot build {card.architecture} with encoder {card.encoder} "
            f"({str(exc).strip().splitlines()[0]})"
        ) from None


def normalise_rgb(rgb: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """RGB pixels → the network's normalised float input, on the tensor's own device.

    Parameters
    ----------
    rgb : torch.Tensor of uint8, shape (N, H, W, 3) or (N, 3, H, W)
        A (N, 3, H, W) view of channels-last memory keeps that layout (no copy on permute).
    card : ModelCard
        Its ``normalisation`` mean and std apply to ``rgb / 255``.

    Returns
    -------
    torch.Tensor of float32, shape (N, 3, H, W)
        ``(rgb / 255 − mean) / std`` per channel.
    """
    if rgb.dtype != torch.uint8:
        raise TypeError(f"normalise_rgb expects uint8 RGB in 0..255, got {rgb.dtype}")
    if rgb.ndim != 4 or 3 not in (rgb.shape[1], rgb.shape[3]):
        raise ValueError(f"normalise_rgb expects (N, H, W, 3) or (N, 3, H, W), got "
                         f"{tuple(rgb.shape)}")
    nchw = rgb if rgb.shape[1] == 3 else rgb.permute(0, 3, 1, 2)
    scale, shift = _affine(
        tuple(card.normalisation["mean"]), tuple(card.normalisation["std"]), rgb.device
    )
    return nchw.to(torch.float32).mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def _affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) scale and shift with ``x * scale + shift == (x / 255 - mean) / std``."""
    # Cached per device so a CUDA batch loop does not copy two tiny tensors every batch;
    # made outside inference mode so training may use them too.
    with torch.inference_mode(False):
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(1, 3, 1, 1).to(device)
        shift = (-mean_t / std_t).to(torch.float32).view(1, 3, 1, 1).to(device)
    return scale, shift
