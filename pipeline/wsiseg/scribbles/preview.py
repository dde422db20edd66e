"""``wsiseg scribbles simulate``: simulated scribbles drawn over a mask image, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from skimage.segmentation import find_boundaries

from wsiseg.atomic import atomic_writer
from wsiseg.errors import WsisegError
from wsiseg.scribbles.human import human_scribbles
from wsiseg.scribbles.simulate import human_corrections

__all__ = ["preview_png"]

# Preview colours (RGB).
_GREY_TUMOR, _GREY_OTHER = 170, 70
_RED, _GREEN, _BLUE = (230, 20, 20), (20, 200, 20), (40, 90, 255)


def preview_png(
    mask_path: Path, out_png: Path, *, seed: int = 0, prediction_path: Path | None = None
) -> None:
    """Draw simulated scribbles over a mask image and write a PNG.

    Without a prediction: human-like scribbles inside the mask (tumor) and inside its
    complement (non-tumor). With one: human-like correction strokes on its false negatives
    (tumor) and false positives (non-tumor), and the prediction's outline in blue. The PNG shows
    the mask in grey (light = tumor), red = tumor strokes, green = non-tumor strokes; it is
    written atomically.

    Parameters
    ----------
    mask_path : Path
        Mask image (PNG, JPEG, TIFF, ...); a pixel whose grey value is > 127 is tumor (JPEG
        masks are blurred at the edges, the midpoint splits them).
    out_png : Path
        PNG to write; its folder is created if needed.
    seed : int
        Random seed.
    prediction_path : Path, optional
        Predicted mask image of the same size, read the same way.

    Raises
    ------
    WsisegError
        A mask or prediction that cannot be read, is empty, or does not match in size.
    """
    truth = _read_mask(Path(mask_path))
    rng = np.random.default_rng(seed)
    canvas = np.where(truth, _GREY_TUMOR, _GREY_OTHER).astype(np.uint8)
    rgb = np.repeat(canvas[..., None], 3, axis=2)
    if prediction_path is None:
        tumor = human_scribbles(truth, rng=rng) & truth
        other = human_scribbles(~truth, rng=rng) & ~truth
    else:
        pred = _read_mask(Path(prediction_path))
        if pred.shape != truth.shape:
            raise WsisegError(
                f"{prediction_path}: prediction is {pred.shape[1]}×{pred.shape[0]} px, "
                f"mask {mask_path} is {truth.shape[1]}×{truth.shape[0]} px"
            )
        labels = human_corrections(truth, pred, rng=rng, radius_px=2)
        tumor, other = labels > 0, labels < 0
        rgb[find_boundaries(pred, mode="inner")] = _BLUE
    rgb[tumor] = _RED
    rgb[other] = _GREEN
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out_png) as f:
        Image.fromarray(rgb).save(f, format="PNG")


def _read_mask(path: Path) -> NDArray[np.bool_]:
    """A mask image as bool (grey > 127), or WsisegError naming the file."""
    if not path.is_file():
        raise WsisegError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
    except Exception as exc:  # PIL raises many types for unreadable files
        grey = _read_tiff_grey(path, exc)
    if grey.ndim != 2 or grey.size == 0:
        raise WsisegError(f"{path}: not a 2-D mask image (shape {grey.shape})")
    return grey > 127


def _read_tiff_grey(path: Path, pil_error: Exception) -> NDArray[np.uint8]:
    """TIFFs PIL cannot open (tiled, BigTIFF, exotic compression) through tifffile."""
    if path.suffix.lower() not in {".tif", ".tiff"}:
        raise WsisegError(f"{path}: cannot read mask image ({pil_error})") from pil_error
    import tifffile

    try:
        data = np.asarray(tifffile.imread(path))
    except Exception as exc:
        raise WsisegError(f"{path}: cannot read mask image ({exc})") from exc
    if data.ndim == 3:
        data = data.max(axis=2) if data.shape[2] <= 4 else data[0]
    if data.dtype == bool:
        return data.astype(np.uint8) * 255
    return np.clip(data, 0, 255).astype(np.uint8)
