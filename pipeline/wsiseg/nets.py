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
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from wsiseg import __version__
from wsiseg.config import repo_root
from wsiseg.errors import WsisegError
from wsiseg.scribbles.encode import SCRIBBLE_KINDS

if TYPE_CHECKING:
    from wsiseg.config import Workflow

ROLES: tuple[str, ...] = ("guidenet", "refinenet")

#: Input channels each role takes, and what they are.
ROLE_CHANNELS: dict[str, tuple[int, str]] = {
    "guidenet": (3, "RGB"),
    "refinenet": (6, "RGB, GuideNet probability, FG and BG scribble distance maps"),
}

#: The safetensors metadata key holding the model card (JSON).
CARD_KEY = "wsiseg_card"

# A safetensors header is a JSON object; anything claiming more than this is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


# ------------------------------------------------------------------------------- model card


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


def load_card(name_or_path: str | Path) -> ModelCard:
    """A model card by name (``models/<name>.yaml``), from a YAML file, or from weights.

    Parameters
    ----------
    name_or_path : str or Path
        ``"guidenet"`` / ``"refinenet"`` (the templates in ``models/``), a ``.yaml`` path, or
        a ``.safetensors`` weights file (its embedded card).

    Raises
    ------
    WsisegError
        Unknown name, missing or unreadable file, or an invalid card (naming file and key).
    """
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        models = repo_root() / "models"
        path = models / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in models.glob("*.yaml"))
            raise WsisegError(
                f"{name_or_path}: no such model card (known: {', '.join(known) or 'none'})"
            )
    if not path.is_file():
        raise WsisegError(f"{path}: model card not found")
    if path.suffix == ".safetensors":
        return _card_from_header(path, _read_header(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WsisegError(f"{path}: not valid YAML ({first})") from None
    try:
        return ModelCard.from_dict(data)
    except ValueError as exc:
        raise WsisegError(f"{path}: model card: {exc}") from None


# ------------------------------------------------------------------------------- networks


def build_model(card: ModelCard) -> torch.nn.Module:
    """The untrained network a card describes (never downloads encoder weights).

    Returns
    -------
    torch.nn.Module
        Maps ``(N, card.in_channels, H, W)`` float32 to ``(N, 1, H, W)`` logits; H and W
        must be multiples of 32.
    """
    import segmentation_models_pytorch as smp  # heavy import: only when a network is built

    try:
        return smp.create_model(
            card.architecture,
            encoder_name=card.encoder,
            encoder_weights=None,
            in_channels=card.in_channels,
            classes=card.classes,
        )
    except (KeyError, ValueError) as exc:
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


# -------------------------------------------------------------------------------- weights


def save_weights(model: torch.nn.Module, card: ModelCard, path: Path) -> str:
    """Write ``model``'s state dict with ``card`` embedded, atomically.

    Parameters
    ----------
    model : torch.nn.Module
        Built by :func:`build_model` from ``card`` (any device; ``torch.compile`` wrappers
        are unwrapped).
    card : ModelCard
    path : Path
        Must end in ``.safetensors``; parent folders are created.

    Returns
    -------
    str
        sha256 hex digest of the written file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WsisegError(f"{path}: weights are written as .safetensors files only")
    card = ModelCard.from_dict(card.to_dict())  # validates a card built by hand
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _check_state_dict(tensors, card, what="model")
    metadata = {CARD_KEY: json.dumps(card.to_dict(), sort_keys=True, allow_nan=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp, metadata=metadata)
        digest = weights_hash(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest


def load_weights(
    path: Path,
    *,
    role: str | None = None,
    workflow: Workflow | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, ModelCard]:
    """Load a ``.safetensors`` weights file and its card, checked against the use.

    Parameters
    ----------
    path : Path
    role : str, optional
        ``"guidenet"`` or ``"refinenet"``: the card's role must match.
    workflow : Workflow, optional
        The card's patch size (``guidenet.patch_px`` / ``refinenet.window_px``), working mpp
        and (RefineNet) scribble ``max_distance_px`` must match the workflow's.
    device : str or torch.device

    Returns
    -------
    model : torch.nn.Module
        In eval mode on ``device``.
    card : ModelCard

    Raises
    ------
    WsisegError
        Missing file; not a safetensors file (pickle, zip, text, truncated); no or invalid
        card; wrong role or channel count; mismatch with the workflow; tensors that do not fit
        the card's architecture. The message names the file and what to do.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise WsisegError(f"{path}: weights file not found")
    if not path.is_file():
        raise WsisegError(f"{path}: not a weights file (a directory?)")
    card = _card_from_header(path, _read_header(path))
    if role is not None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if card.role != role:
            raise WsisegError(
                f"{path}: holds {card.role} weights but {role} weights are needed; "
                f"pass a {role} .safetensors file"
            )
    _check_channels(card, str(path))
    if workflow is not None:
        _check_workflow(card, workflow, path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types; report, never pickle
        raise _not_safetensors(path, str(exc).strip().splitlines()[0]) from None
    try:
        _check_state_dict(tensors, card, what="tensors")
    except ValueError as exc:
        raise WsisegError(f"{path}: {exc}") from None
    _check_finite(tensors, path)
    model = build_model(card)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), card


def init_weights(
    role: str, out: Path, *, seed: int = 0, workflow: Workflow | None = None
) -> ModelCard:
    """Write randomly initialised weights (smoke tests only), deterministic per seed.

    Parameters
    ----------
    role : str
        ``"guidenet"`` or ``"refinenet"``.
    out : Path
        ``.safetensors`` file to write (atomically).
    seed : int
        Seeds torch's generator for the initialisation; the same seed writes the same bytes.
    workflow : Workflow, optional
        Takes the card template (``<role>.model``), patch size, working mpp and scribble
        ``max_distance_px`` from it; without one, the ``models/<role>.yaml`` template as is.

    Returns
    -------
    ModelCard
        The card written, with provenance ``{"init": "random", "seed": seed, ...}``.
    """
    if role not in ROLES:
        raise WsisegError(f"{role}: unknown model role (expected one of {', '.join(ROLES)})")
    template = role if workflow is None else getattr(workflow, role).model
    card = load_card(template)
    if card.role != role:
        raise WsisegError(f"{template}: model card is for {card.role}, not {role}")
    _check_channels(card, str(template))
    if workflow is not None:
        patch_px = (
            workflow.guidenet.patch_px if role == "guidenet" else workflow.refinenet.window_px
        )
        encoding = card.scribble_encoding
        if encoding:
            encoding = {**encoding, "max_distance_px": workflow.scribbles.max_distance_px}
        card = replace(card, patch_px=patch_px, working_mpp=workflow.working_mpp,
                       scribble_encoding=encoding)
    # No creation time: the same seed must give the same bytes.
    card = replace(
        card,
        provenance={"init": "random", "seed": seed, "wsiseg_version": __version__},
        metrics={},
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's generator as it was
        torch.manual_seed(seed)
        model = build_model(card)
    save_weights(model, card, Path(out))
    return card


def weights_hash(path: Path) -> str:
    """sha256 hex digest of a file (show the first 12 characters for short)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_weights_error(role: str) -> WsisegError:
    """The error when a command needs ``role`` weights and none were given."""
    return WsisegError(
        f"no {role} weights given (--{role} FILE.safetensors): train them with "
        f"`wsiseg train {role} ...`, get small demo weights with `wsiseg demo`, or, for smoke "
        f"tests only, write random ones with "
        f"`wsiseg models init --role {role} --out {role}.safetensors`"
    )


# -------------------------------------------------------------------------------- helpers


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, after checking the file is one (nothing is unpickled)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_safetensors(path, f"only {size} bytes")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes < 2 or header_bytes > _MAX_HEADER_BYTES:
            raise _not_safetensors(path, _sniff(head))
        if header_bytes > size - 8:
            raise _not_safetensors(
                path, f"truncated: the header needs {header_bytes} bytes, {size - 8} left"
            )
        raw = f.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _not_safetensors(path, _sniff(head) + "; the header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    data_bytes = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            data_bytes = max(data_bytes, int(end))
        except (KeyError, TypeError, ValueError):
            raise _not_safetensors(path, f"malformed entry for tensor {name!r}") from None
    if 8 + header_bytes + data_bytes != size:
        raise _not_safetensors(
            path, f"truncated or damaged: the header describes "
            f"{8 + header_bytes + data_bytes} bytes, the file has {size}"
        )
    return header


def _sniff(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    if head[:1] == b"\x80":
        return "it is a Python pickle, which is never loaded"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive, e.g. a torch.save checkpoint, which is never loaded"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it is a text file"
    return "unrecognised header"


def _not_safetensors(path: Path, why: str) -> WsisegError:
    return WsisegError(
        f"{path}: not a safetensors weights file ({why}); weights must be .safetensors with a "
        f"wsiseg model card (`wsiseg train` or `wsiseg models init` write them)"
    )


def _card_from_header(path: Path, header: dict[str, Any]) -> ModelCard:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or CARD_KEY not in metadata:
        raise WsisegError(
            f"{path}: safetensors file has no wsiseg model card (metadata key {CARD_KEY!r}); "
            f"write weights with `wsiseg train` or `wsiseg models init`"
        )
    try:
        data = json.loads(metadata[CARD_KEY])
    except (TypeError, json.JSONDecodeError) as exc:
        raise WsisegError(f"{path}: model card is not valid JSON ({exc})") from None
    try:
        return ModelCard.from_dict(data)
    except ValueError as exc:
        raise WsisegError(f"{path}: model card: {exc}") from None


def _check_channels(card: ModelCard, where: str) -> None:
    expected, meaning = ROLE_CHANNELS[card.role]
    if card.in_channels != expected:
        raise WsisegError(
            f"{where}: {card.role} card says {card.in_channels} input channels but a "
            f"{card.role} takes {expected} ({meaning}); fix the card or retrain"
        )


def _check_workflow(card: ModelCard, workflow: Workflow, path: Path) -> None:
    name = workflow.name
    if not math.isclose(card.working_mpp, workflow.working_mpp, rel_tol=1e-6):
        raise WsisegError(
            f"{path}: {card.role} trained at {card.working_mpp:g} µm/px but workflow "
            f"'{name}' works at {workflow.working_mpp:g}; use a workflow with working_mpp "
            f"{card.working_mpp:g} or retrain"
        )
    if card.role == "guidenet":
        key, patch_px = "guidenet.patch_px", workflow.guidenet.patch_px
    else:
        key, patch_px = "refinenet.window_px", workflow.refinenet.window_px
    if card.patch_px != patch_px:
        raise WsisegError(
            f"{path}: {card.role} trained on {card.patch_px} px inputs but workflow '{name}' "
            f"has {key} {patch_px}; use a workflow with {key} {card.patch_px} or retrain"
        )
    encoding = card.scribble_encoding
    wf_distance = workflow.scribbles.max_distance_px
    if encoding and not math.isclose(encoding["max_distance_px"], wf_distance, rel_tol=1e-6):
        raise WsisegError(
            f"{path}: {card.role} trained with scribble distance maps saturating at "
            f"{encoding['max_distance_px']:g} px but workflow '{name}' has "
            f"scribbles.max_distance_px {wf_distance:g}; use a workflow with "
            f"scribbles.max_distance_px {encoding['max_distance_px']:g} or retrain"
        )


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse weights with NaN or infinite values: they run to an all-zero map silently."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise WsisegError(
                f"{path}: tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity); "
                "these weights are broken (a diverged training?): retrain or use another file"
            )


def _check_state_dict(tensors: dict[str, torch.Tensor], card: ModelCard, what: str) -> None:
    """Raise ValueError unless ``tensors`` has exactly the card's network's keys and shapes."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in build_model(card).state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & tensors.keys()
                   if tuple(tensors[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} of the wrong shape, e.g. {k!r} "
                        f"{tuple(tensors[k].shape)} instead of {expected[k]}")
    if problems:
        raise ValueError(
            f"{what} do not fit the card's {card.architecture}/{card.encoder} with "
            f"{card.in_channels} input channels ({'; '.join(problems)})"
        )
