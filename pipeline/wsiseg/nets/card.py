"""The model card: what a weights file is for and how to use it, validated from JSON or YAML.

Role, architecture, encoder, input channels, patch size, working resolution, normalisation,
scribble encoding, threshold, provenance and metrics, and the decoder's widths where they are
not smp's default. The card templates live in
``models/<role>.yaml``. Keys, types and ranges are declared below and checked by pydantic
(strict: no ``"3"`` → 3, no ``true`` → 1, no NaN or infinity).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass
from typing_extensions import TypedDict  # pydantic needs it before Python 3.12

from wsiseg.scribbles.encode import SCRIBBLE_KINDS
from wsiseg.validation import STRICT, Fraction, Name, Number, Positive, PositiveInt, one_line

Role = Literal["guidenet", "refinenet"]
ROLES: tuple[str, ...] = get_args(Role)

#: Input channels each role takes, and what they are.
ROLE_CHANNELS: dict[str, tuple[int, str]] = {
    "guidenet": (3, "RGB"),
    "refinenet": (6, "RGB, GuideNet probability, FG and BG scribble distance maps"),
}


def _one_logit_map(classes: int) -> int:
    if classes != 1:
        raise ValueError(f"expected 1 (one tumor logit map), got {classes}")
    return classes


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    try:
        # The card travels as JSON; a value JSON cannot hold must fail here, not at save.
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON-serialisable ({exc})") from None


def _scribble_kind(kind: str) -> str:
    if kind not in SCRIBBLE_KINDS:
        raise ValueError(f"expected one of {', '.join(SCRIBBLE_KINDS)}, got {kind!r}")
    return kind


JsonMapping = Annotated[dict[str, Any], AfterValidator(_json_copy)]


class Normalisation(TypedDict):
    """Applied to RGB / 255: ``(rgb / 255 - mean) / std``, per channel R, G, B."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    mean: Annotated[list[Number], Field(min_length=3, max_length=3)]
    std: Annotated[list[Positive], Field(min_length=3, max_length=3)]


class ScribbleEncoding(TypedDict, total=False):
    """RefineNet's scribble channels (all three keys); GuideNet's is empty."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    kind: Annotated[Name, AfterValidator(_scribble_kind)]
    max_distance_px: Positive
    channels: list[Name]


@dataclass(frozen=True, config=STRICT)
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
    decoder_channels : list of int or None
        The U-Net decoder's five block widths, deepest first; None (and absent from the
        dict) is smp's default ``[256, 128, 64, 32, 16]``, the width of every card written
        before the key existed.
    """

    role: Role
    architecture: Name
    encoder: Name
    in_channels: PositiveInt
    classes: Annotated[PositiveInt, AfterValidator(_one_logit_map)]
    patch_px: PositiveInt
    working_mpp: Positive
    normalisation: Normalisation
    scribble_encoding: ScribbleEncoding
    threshold: Fraction
    provenance: JsonMapping
    metrics: JsonMapping
    decoder_channels: Annotated[list[PositiveInt], Field(min_length=5, max_length=5)] | None = (
        None
    )

    @field_validator("scribble_encoding")
    @classmethod
    def _encoding_fits_role(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        role = info.data.get("role")  # absent when the role itself was wrong
        if role == "guidenet" and value:
            raise ValueError(f"GuideNet sees no scribbles; expected {{}}, got {value!r}")
        expected = set(ScribbleEncoding.__annotations__)
        if role == "refinenet" and set(value) != expected:
            raise ValueError(f"expected keys {', '.join(sorted(expected))}, "
                             f"got {', '.join(sorted(value)) or 'none'}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (a deep copy), in field order; an unset decoder is left out.

        Leaving it out keeps a default-width card's dict, and so its weights' metadata and
        runtime-cache key, what they were before the key existed.
        """
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if d["decoder_channels"] is None:
            del d["decoder_channels"]
        return d

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
        try:
            return _CARD.validate_python(d)
        except ValidationError as exc:
            raise ValueError(one_line(exc, ModelCard)) from None


_CARD = TypeAdapter(ModelCard)
