"""Weights as ``.safetensors`` with the model card inside: save, load (checked), init, hash.

Weights are ``.safetensors`` files only — a pickle is never loaded (no ``torch.load``). Each
file carries its *model card* (:class:`~wsiseg.nets.card.ModelCard`) as one JSON string under
the metadata key ``wsiseg_card``, so a weights file alone says how to use it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from wsiseg import __version__
from wsiseg.atomic import atomic_write_bytes
from wsiseg.config import repo_root
from wsiseg.errors import WsisegError
from wsiseg.nets.builders import build_model
from wsiseg.nets.card import ROLE_CHANNELS, ROLES, ModelCard

if TYPE_CHECKING:
    from wsiseg.config import Workflow

#: The safetensors metadata key holding the model card (JSON).
CARD_KEY = "wsiseg_card"

# A safetensors header is a JSON object; anything claiming more than this is not one.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WsisegError(f"{path}: weights are written as .safetensors files only")
    card = ModelCard.from_dict(card.to_dict())  # validates a card built by hand
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _check_state_dict(tensors, card, what="model")
    metadata = {CARD_KEY: json.dumps(card.to_dict(), sort_keys=True, allow_nan=False)}
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata=metadata)  # bytes: written by the one atomic write
    atomic_write_bytes(path, data)
    digest = weights_hash(path)
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

    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    path = Path(path)
    card = weights_card(path, role=role, workflow=workflow)
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


def weights_card(
    path: Path, *, role: str | None = None, workflow: Workflow | None = None
) -> ModelCard:
    """The card of a weights file, checked against the use as :func:`load_weights` checks it
    (role, channels, workflow), reading only the header: no tensor is loaded.

    Raises
    ------
    WsisegError
        As :func:`load_weights`, except for problems only the tensors show.
    """
    path = Path(path)
    if not path.is_file():
        raise WsisegError(f"{path}: weights file not found" if not path.exists()
                          else f"{path}: not a weights file (a directory?)")
    card = _card_from_header(path, _read_header(path))
    if role is not None and card.role != role:
        raise WsisegError(
            f"{path}: holds {card.role} weights but {role} weights are needed; "
            f"pass a {role} .safetensors file"
        )
    _check_channels(card, str(path))
    if workflow is not None:
        _check_workflow(card, workflow, path)
    return card


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
