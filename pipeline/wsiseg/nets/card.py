"""The model card: what a weights file is for and how to use it, validated from JSON or YAML.

Role, architecture, encoder, input channels, patch size, working resolution, normalisation,
scribble encoding, threshold, provenance and metrics. The card templates live in
``models/<role>.yaml``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from wsiseg.scribbles.encode import SCRIBBLE_KINDS

ROLES: tuple[str, ...] = ("guidenet", "refinenet")

#: Input channels each role takes, and what they are.
ROLE_CHANNELS: dict[str, tuple[int, str]] = {
    "guidenet": (3, "RGB"),
    "refinenet": (6, "RGB, GuideNet probability, FG and BG scribble distance maps"),
}


@dataclass(frozen=True)
class ModelCard:
    """How to build, feed and trust one network; embedded in every weights file.

    Attributes
    ----------
    role : str
        ``"guidenet"`` or ``"refinenet"``.
    architecture : str
        segmentation-models-pytorch class name, ``"Unet"``.
    encoder : str
        smp encoder name, ``"efficientnet-b0"``.
    in_channels : int
        3 (GuideNet: RGB) or 6 (RefineNet: RGB, guide, FG and BG distance).
    classes : int
        Output logit maps; always 1 (tumor).
    patch_px : int
        Edge of the square input the network was trained on, working pixels (GuideNet patch,
        RefineNet window).
    working_mpp : float
        Resolution the network was trained at, µm per pixel.
    normalisation : dict
        ``{"mean": [r, g, b], "std": [r, g, b]}`` applied to RGB / 255.
    scribble_encoding : dict
        RefineNet: ``{"kind": "distance", "max_distance_px": 64.0, "channels": ["rgb",
        "guide", "fg_dist", "bg_dist"]}``; GuideNet: ``{}``.
    threshold : float
        Probability at or above which a pixel is tumor.
    provenance : dict
        Training data, seed, command, creation time, wsiseg version; ``{"init": "random",
        "seed": s}`` for random weights from :func:`init_weights`.
    metrics : dict
        Validation metrics, e.g. ``{"val_iou": 0.87}``.
    """

    role: str
    architecture: str
    encoder: str
    in_channels: int
    classes: int
    patch_px: int
    working_mpp: float
    normalisation: dict[str, Any]
    scribble_encoding: dict[str, Any]
    threshold: float
    provenance: dict[str, Any]
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (a deep copy), in field order."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        """Validated card from a plain dict (YAML template or weights metadata).

        Raises
        ------
        ValueError
            Unknown or missing key, or a value of the wrong type or range; the message names
            the key, e.g. ``in_channels: expected a positive integer, got 0``.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a model card must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(f"{key}: unknown key (expected one of {', '.join(names)})")
        for key in names:
            if key not in d:
                raise ValueError(f"{key}: missing key")
        role = _string(d["role"], "role")
        if role not in ROLES:
            raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
        classes = _positive_int(d["classes"], "classes")
        if classes != 1:
            raise ValueError(f"classes: expected 1 (one tumor logit map), got {classes}")
        threshold = _number(d["threshold"], "threshold")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: expected a number in [0, 1], got {threshold}")
        card = cls(
            role=role,
            architecture=_string(d["architecture"], "architecture"),
            encoder=_string(d["encoder"], "encoder"),
            in_channels=_positive_int(d["in_channels"], "in_channels"),
            classes=classes,
            patch_px=_positive_int(d["patch_px"], "patch_px"),
            working_mpp=_positive_number(d["working_mpp"], "working_mpp"),
            normalisation=_normalisation(d["normalisation"]),
            scribble_encoding=_scribble_encoding(d["scribble_encoding"], role),
            threshold=threshold,
            provenance=_json_mapping(d["provenance"], "provenance"),
            metrics=_json_mapping(d["metrics"], "metrics"),
        )
        return card


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _positive_number(value: Any, key: str) -> float:
    number = _number(value, key)
    if number <= 0:
        raise ValueError(f"{key}: expected a positive number, got {value!r}")
    return number


def _json_mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    try:
        # The card travels as JSON; a value JSON cannot hold must fail here, not at save.
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{key}: not JSON-serialisable ({exc})") from None


def _normalisation(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ValueError(f"normalisation: expected a mapping with keys mean and std, got {value!r}")
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        triple = value[key]
        if not isinstance(triple, list | tuple) or len(triple) != 3:
            raise ValueError(f"normalisation.{key}: expected 3 numbers (R, G, B), got {triple!r}")
        out[key] = [_number(v, f"normalisation.{key}") for v in triple]
    if min(out["std"]) <= 0:
        raise ValueError(f"normalisation.std: expected positive numbers, got {out['std']}")
    return out


def _scribble_encoding(value: Any, role: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"scribble_encoding: expected a mapping, got {value!r}")
    if role == "guidenet":
        if value:
            raise ValueError(f"scribble_encoding: GuideNet sees no scribbles; expected {{}}, "
                             f"got {value!r}")
        return {}
    expected = {"kind", "max_distance_px", "channels"}
    if set(value) != expected:
        raise ValueError(f"scribble_encoding: expected keys {', '.join(sorted(expected))}, "
                         f"got {', '.join(sorted(value)) or 'none'}")
    kind = _string(value["kind"], "scribble_encoding.kind")
    if kind not in SCRIBBLE_KINDS:
        raise ValueError(f"scribble_encoding.kind: expected one of {', '.join(SCRIBBLE_KINDS)}, "
                         f"got {kind!r}")
    channels = value["channels"]
    if not isinstance(channels, list | tuple) or not all(
        isinstance(c, str) and c for c in channels
    ):
        raise ValueError(f"scribble_encoding.channels: expected a list of names, got {channels!r}")
    return {
        "kind": kind,
        "max_distance_px": _positive_number(
            value["max_distance_px"], "scribble_encoding.max_distance_px"
        ),
        "channels": list(channels),
    }
