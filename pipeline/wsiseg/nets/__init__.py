"""GuideNet and RefineNet: builders, model cards, and ``.safetensors`` weights.

Both networks are segmentation-models-pytorch U-Nets with an EfficientNet-B0 encoder and one
logit map out. GuideNet sees RGB patches (3 channels, 256² at 2.0 µm/px by default); RefineNet
sees RGB, the GuideNet probability and the FG/BG scribble distance maps (6 channels, 384²).

Weights are ``.safetensors`` files only — a pickle is never loaded (no ``torch.load``). Each
file carries its *model card* (:class:`ModelCard`) as one JSON string under the metadata key
``wsiseg_card``, so a weights file alone says how to use it: role, architecture, encoder, input
channels, patch size, working resolution, normalisation, scribble encoding, threshold,
provenance and metrics. The card templates live in ``models/<role>.yaml``.

The networks know nothing of slides or zarr: they map ``(N, C, H, W)`` float tensors to
``(N, 1, H, W)`` logits.

:mod:`~wsiseg.nets.card` (the model card), :mod:`~wsiseg.nets.builders` (the networks and
their input normalisation), :mod:`~wsiseg.nets.weights` (``.safetensors`` in and out).
"""

from wsiseg.nets.builders import build_model, normalise_rgb
from wsiseg.nets.card import ROLE_CHANNELS, ROLES, ModelCard
from wsiseg.nets.weights import (
    CARD_KEY,
    init_weights,
    load_card,
    load_weights,
    missing_weights_error,
    save_weights,
    weights_card,
    weights_hash,
)

__all__ = [
    "CARD_KEY",
    "ROLES",
    "ROLE_CHANNELS",
    "ModelCard",
    "build_model",
    "init_weights",
    "load_card",
    "load_weights",
    "missing_weights_error",
    "normalise_rgb",
    "save_weights",
    "weights_card",
    "weights_hash",
]
