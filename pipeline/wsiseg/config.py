"""Workflow presets (YAML) loaded into a typed, validated configuration.

A workflow is named (``default`` → ``workflows/default.yaml``) or given as a path (anything
with a path separator, a leading ``.`` or a ``.yaml``/``.yml`` ending). Every key is checked
by pydantic against the dataclasses below: an unknown key, a missing key or a value of the
wrong type or range raises :class:`ConfigError` with the dotted key and the file, e.g.
``workflows/x.yaml: guidenet.patch_px: expected a positive integer, got -3``. Values are not
coerced: ``"3"`` is no integer, ``3.7`` no integer, ``1`` no boolean (an integer is a number).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass

from wsiseg.errors import WsisegError
from wsiseg.validation import (
    STRICT,
    Count,
    Flag,
    Fraction,
    Name,
    Positive,
    PositiveInt,
    keys,
    one_line,
)


class ConfigError(WsisegError):
    """A workflow file or value is invalid."""


MPP_RANGE = (0.05, 100.0)
"""Microns per pixel a slide or a workflow may have, level 0 or working (µm/px)."""

MPP_WHY = ("light microscopy resolves about 0.2 µm and slide scanners write 0.1–1 µm/px; "
           "coarser than 100 µm/px is a thumbnail, finer than 0.05 a wrong unit")


def mpp_problem(value: float) -> str | None:
    """Why ``value`` (µm/px) is no slide resolution, or None when it is in :data:`MPP_RANGE`."""
    lo, hi = MPP_RANGE
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"expected a number of µm per pixel in {lo:g}–{hi:g}, got {value!r}"
    if not (math.isfinite(value) and lo <= value <= hi):
        return f"{value:g} µm/px is outside {lo:g}–{hi:g} µm/px ({MPP_WHY})"
    return None


def _slide_mpp(value: float) -> float:
    if (problem := mpp_problem(value)) is not None:
        raise ValueError(problem)
    return value


# NaN and ±inf are refused (STRICT) but in an mpp, whose range says why itself.
Mpp = Annotated[float, Strict(), Field(allow_inf_nan=True), AfterValidator(_slide_mpp)]
Channel8 = Annotated[int, Strict(), Field(ge=0, le=255)]


@dataclass(frozen=True, config=STRICT)
class TilingConfig:
    chunk_px: PositiveInt = 512
    workers: Count = 0


@dataclass(frozen=True, config=STRICT)
class TissueConfig:
    mask_mpp: Mpp = 16.0
    min_saturation: Fraction = 0.05
    min_area_um2: Positive = 50000.0


@dataclass(frozen=True, config=STRICT)
class GuideNetConfig:
    model: Name = "guidenet"
    patch_px: PositiveInt = 256
    stride_px: PositiveInt = 192
    batch_size: PositiveInt = 16
    threshold: Fraction = 0.5


@dataclass(frozen=True, config=STRICT)
class RefineNetConfig:
    model: Name = "refinenet"
    window_px: PositiveInt = 384
    context_px: Count = 64
    batch_size: PositiveInt = 4
    randomwalk_beta: Positive = 130.0
    confident_margin: Fraction = 0.4


@dataclass(frozen=True, config=STRICT)
class ContoursConfig:
    threshold: Fraction = 0.5
    simplify_px: Fraction = 1.0  # at most 1 working pixel
    min_area_um2: Positive = 2000.0
    class_name: Name = "Tumor (AI)"
    color: tuple[Channel8, Channel8, Channel8] = (255, 0, 255)


@dataclass(frozen=True, config=STRICT)
class ScribblesConfig:
    tumor: tuple[Name, ...] = ("Tumor", "Tumour")
    non_tumor: tuple[Name, ...] = (
        "Stroma", "Background", "Other", "Necrosis", "Immune cells", "Normal",
    )
    ignore: tuple[Name, ...] = ("Region*", "Ignore*")
    match_base_class: Flag = True
    line_width_um: Positive = 8.0
    point_radius_um: Positive = 8.0
    max_distance_px: Positive = 64.0


@dataclass(frozen=True, config=STRICT)
class InferenceConfig:
    """How the networks run for inference (see :mod:`wsiseg.runtime`); ``--runtime`` and
    ``--precision`` override these."""

    runtime: Literal["auto", "openvino", "torch"] = "auto"  # auto: OpenVINO on CPU, torch on CUDA
    precision: Literal["auto", "f32", "bf16"] = "auto"  # auto: bf16 where the CPU has it


@dataclass(frozen=True, config=STRICT)
class Workflow:
    """One workflow preset. ``source`` is the file it came from (not a YAML key)."""

    name: Name = "default"
    working_mpp: Mpp = 2.0
    tiling: TilingConfig = dataclasses.field(default_factory=TilingConfig)
    tissue: TissueConfig = dataclasses.field(default_factory=TissueConfig)
    guidenet: GuideNetConfig = dataclasses.field(default_factory=GuideNetConfig)
    refinenet: RefineNetConfig = dataclasses.field(default_factory=RefineNetConfig)
    contours: ContoursConfig = dataclasses.field(default_factory=ContoursConfig)
    scribbles: ScribblesConfig = dataclasses.field(default_factory=ScribblesConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    # Excluded from the dump (so from to_dict and the keys a file may have), not compared.
    source: str = dataclasses.field(default=Field("<defaults>", exclude=True), compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists), without ``source``."""
        return _WORKFLOW.dump_python(self, mode="json")

    def replace(self, **changes: Any) -> Workflow:
        return dataclasses.replace(self, **changes)


_WORKFLOW = TypeAdapter(Workflow)


def repo_root() -> Path:
    """The checkout's root (editable install) where ``workflows/`` and ``models/`` live."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "workflows").is_dir() and (parent / "models").is_dir():
            return parent
    return here.parent / "_data"  # installed wheel: data force-included next to the package


def workflows_dir() -> Path:
    return repo_root() / "workflows"


def load_workflow(name_or_path: str | Path | None = None) -> Workflow:
    """Load a workflow by preset name (``workflows/<name>.yaml``) or YAML path.

    Parameters
    ----------
    name_or_path : str or Path or None
        ``None`` loads ``default``.

    Raises
    ------
    ConfigError
        Unknown preset, unreadable YAML, or any invalid key (named with its dotted path).
    """
    if name_or_path is None:
        name_or_path = "default"
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and not _looks_like_path(name_or_path):
        # A preset name wins over a file or folder of that name in the working directory.
        path = workflows_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in workflows_dir().glob("*.yaml"))
            hint = (f"; for the file in this folder write ./{name_or_path}"
                    if Path(name_or_path).is_file() else "")
            raise ConfigError(
                f"{name_or_path}: no such workflow preset (known: {', '.join(known)}){hint}"
            )
    if not path.is_file():
        raise ConfigError(f"{name_or_path}: workflow file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a workflow must be a mapping of keys to values")
    return workflow_from_dict(data, source=str(path))


def _looks_like_path(text: str) -> bool:
    """A ``--workflow`` argument that names a file: a separator, a leading ``.``, a YAML end."""
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return (any(s in text for s in separators) or text.startswith(".")
            or text.lower().endswith((".yaml", ".yml")))


def workflow_from_dict(data: dict[str, Any], source: str = "<dict>") -> Workflow:
    """Build a validated :class:`Workflow` from a plain dict (as stored in a slide store)."""
    if isinstance(data, dict) and "source" in data:  # a field, but never a key of the file
        known = ", ".join(keys(Workflow))
        raise ConfigError(f"{source}: source: unknown key (expected one of {known})")
    try:
        wf = _WORKFLOW.validate_python({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {one_line(exc, Workflow)}") from None
    # Across keys, so on what a file says (`replace` may shrink patch_px alone for a trial).
    if wf.guidenet.stride_px > wf.guidenet.patch_px:
        raise ConfigError(f"{source}: guidenet.stride_px: must not exceed guidenet.patch_px "
                          f"({wf.guidenet.stride_px} > {wf.guidenet.patch_px})")
    return wf


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
