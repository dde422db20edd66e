"""Workflow presets (YAML) loaded into a typed, validated configuration.

A workflow is named (``default`` → ``workflows/default.yaml``) or given as a path (anything
with a path separator, a leading ``.`` or a ``.yaml``/``.yml`` ending). Every key
is checked: an unknown key, a missing key or a value of the wrong type or range raises
:class:`ConfigError` with the dotted key and the file, e.g.
``workflows/x.yaml: guidenet.patch_px: expected a positive integer, got -3``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wsiseg.errors import WsisegError


class ConfigError(WsisegError):
    """A workflow file or value is invalid."""


@dataclass(frozen=True)
class TilingConfig:
    chunk_px: int = 512
    workers: int = 0


@dataclass(frozen=True)
class TissueConfig:
    mask_mpp: float = 16.0
    min_saturation: float = 0.05
    min_area_um2: float = 50000.0


@dataclass(frozen=True)
class GuideNetConfig:
    model: str = "guidenet"
    patch_px: int = 256
    stride_px: int = 192
    batch_size: int = 16
    threshold: float = 0.5


@dataclass(frozen=True)
class RefineNetConfig:
    model: str = "refinenet"
    window_px: int = 384
    context_px: int = 64
    batch_size: int = 4
    randomwalk_beta: float = 130.0
    confident_margin: float = 0.4


@dataclass(frozen=True)
class ContoursConfig:
    threshold: float = 0.5
    simplify_px: float = 1.0
    min_area_um2: float = 2000.0
    class_name: str = "Tumor (AI)"
    color: tuple[int, int, int] = (255, 0, 255)


@dataclass(frozen=True)
class ScribblesConfig:
    tumor: tuple[str, ...] = ("Tumor", "Tumour")
    non_tumor: tuple[str, ...] = (
        "Stroma", "Background", "Other", "Necrosis", "Immune cells", "Normal",
    )
    ignore: tuple[str, ...] = ("Region*", "Ignore*")
    match_base_class: bool = True
    line_width_um: float = 8.0
    point_radius_um: float = 8.0
    max_distance_px: float = 64.0


@dataclass(frozen=True)
class InferenceConfig:
    """How the networks run for inference (see :mod:`wsiseg.runtime`); ``--runtime`` and
    ``--precision`` override these."""

    runtime: str = "auto"  # auto (OpenVINO on CPU, torch on CUDA) | openvino | torch
    precision: str = "auto"  # auto (bf16 where the CPU has it) | f32 | bf16


@dataclass(frozen=True)
class Workflow:
    """One workflow preset. ``source`` is the file it came from (not a YAML key)."""

    name: str = "default"
    working_mpp: float = 2.0
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tissue: TissueConfig = field(default_factory=TissueConfig)
    guidenet: GuideNetConfig = field(default_factory=GuideNetConfig)
    refinenet: RefineNetConfig = field(default_factory=RefineNetConfig)
    contours: ContoursConfig = field(default_factory=ContoursConfig)
    scribbles: ScribblesConfig = field(default_factory=ScribblesConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    source: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists), without ``source``."""
        out = _to_plain(dataclasses.asdict(self))
        out.pop("source", None)
        return out

    def replace(self, **changes: Any) -> Workflow:
        return dataclasses.replace(self, **changes)


_POSITIVE = {
    "working_mpp", "chunk_px", "mask_mpp", "min_area_um2", "patch_px", "stride_px",
    "batch_size", "window_px", "line_width_um", "point_radius_um", "max_distance_px",
    "randomwalk_beta",
}
_UNIT_INTERVAL = {"threshold", "min_saturation", "confident_margin"}
_CHOICES = {
    "inference.runtime": ("auto", "openvino", "torch"),
    "inference.precision": ("auto", "f32", "bf16"),
}

_MPP_KEYS = {"working_mpp", "mask_mpp"}

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
    wf = _build(Workflow, data, prefix="", source=source)
    wf = dataclasses.replace(wf, source=source)
    if wf.guidenet.stride_px > wf.guidenet.patch_px:
        raise ConfigError(f"{source}: guidenet.stride_px: must not exceed guidenet.patch_px")
    if wf.contours.simplify_px > 1.0:
        raise ConfigError(f"{source}: contours.simplify_px: must be at most 1 working pixel")
    return wf


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{source}: {prefix}{key}: unknown key (expected one of {', '.join(fields)})"
            )
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in data:
            continue  # defaults fill what a preset leaves out
        kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    leaf = key.rsplit(".", 1)[-1]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.", source=source)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key, source) for a, v in zip(args, value, strict=True))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{source}: {key}: unsupported type")  # pragma: no cover
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        if leaf in _POSITIVE and value <= 0:
            raise ConfigError(f"{source}: {key}: expected a positive integer, got {value}")
        if value < 0:
            raise ConfigError(f"{source}: {key}: expected a non-negative integer, got {value}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        value = float(value)
        if leaf in _POSITIVE and not value > 0:
            raise ConfigError(f"{source}: {key}: expected a positive number, got {value}")
        if leaf in _UNIT_INTERVAL and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{source}: {key}: expected a number in [0, 1], got {value}")
        if leaf in _MPP_KEYS and (problem := mpp_problem(value)) is not None:
            raise ConfigError(f"{source}: {key}: {problem}")
        return value
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{source}: {key}: expected a non-empty string, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{source}: {key}: expected one of {', '.join(_CHOICES[key])}, "
                              f"got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {hint}")  # pragma: no cover


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
