"""The slide cache: generated slides drawn once and kept, slide copies, random weights."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from common.tables import log


def generated_slide(cache: Path, size: tuple[int, int], mpp: float, seed: int = 0):
    """A generated slide (:func:`wsiseg.synth.synthesize_slide`) of ``size`` at ``mpp``, cached.

    The same arguments return the same files without drawing them again (the generator is
    deterministic and writes atomically, so a file that exists is complete).

    Returns
    -------
    wsiseg.synth.SyntheticSlide
    """
    from wsiseg.synth import TRUTH_DIR, SyntheticSlide, synthesize_slide

    width, height = size
    slide_id = f"synth-{width}x{height}-mpp{mpp:g}-seed{seed}"
    paths = [cache / f"{slide_id}.tiff"]
    paths += [cache / TRUTH_DIR / f"{slide_id}{s}" for s in (".truth.tiff", ".truth.geojson")]
    if all(p.exists() for p in paths):
        return SyntheticSlide(*paths, level0_size=(width, height), mpp=float(mpp),
                              truth_mpp=2.0)
    t0 = time.perf_counter()
    slide = synthesize_slide(cache, slide_id, (width, height), mpp, seed)
    log(f"generated {slide.slide_path.name} ({width * height / 1e6:.0f} Mpx) in "
        f"{time.perf_counter() - t0:.1f} s")
    return slide


def slide_copies(slide: Path, folder: Path, n: int) -> list[Path]:
    """``n`` names for one slide file (hard links where possible, else copies).

    ``wsiseg run`` treats each name as its own slide (own store, own outputs), so a cohort of
    ``n`` slides costs one generation.
    """

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        dst = folder / f"slide-{i:03d}{slide.suffix}"
        if not dst.exists():
            try:
                os.link(slide, dst)
            except OSError:
                shutil.copyfile(slide, dst)
        out.append(dst)
    return out


def guidenet_weights(path: Path, seed: int = 0) -> Path:
    """Random GuideNet weights with a model card (``wsiseg models init``), written once."""
    from wsiseg.config import load_workflow
    from wsiseg.nets import init_weights

    if not path.exists():
        init_weights("guidenet", path, seed=seed, workflow=load_workflow())
    return path


def refinenet_weights(path: Path, workflow, seed: int = 0) -> Path:
    """Random RefineNet weights with a model card (``wsiseg models init``), whose output
    lies below the threshold in every window: a stroke then clears the tumor its windows
    hold, whatever the random draw.

    A round's cost follows what its windows' new mask does to the contours, so the
    benchmark must not depend on where random weights put their output: those of smp's
    default decoder gave 0.47 ± 0.01 everywhere (below 0.5, by luck), those of the lighter
    decoder (session 22) 0.50 ± 0.01, which thresholds into salt and pepper a trained
    network never draws. The segmentation head's bias is lowered by 2 (about 0.12); the
    network's time does not depend on it.
    """
    import torch

    from wsiseg.nets import init_weights, load_weights, save_weights

    init_weights("refinenet", path, seed=seed, workflow=workflow)
    model, card = load_weights(path, role="refinenet", workflow=workflow)
    with torch.no_grad():
        model.segmentation_head[0].bias -= 2.0
    provenance = {**card.provenance, "bench": "segmentation head bias - 2: every window "
                  "below the threshold"}
    save_weights(model, dataclasses.replace(card, provenance=provenance), path)
    return path


def trained_refinenet(cache: Path, size: tuple[int, int], mpp: float, workflow,
                      seed: int = 0, minutes: float = 2.0) -> Path:
    """RefineNet weights trained as ``wsiseg demo`` trains them (a GuideNet first, then
    RefineNet on its output, ``minutes`` each at most, CPU), on another generated slide of
    ``size`` at ``mpp`` (seed ``seed + 1``, so never on the slide a bench strokes), cached
    by the workflow, the two model cards and the budget.

    What a round writes and traces follows what its windows' new mask does, so a bench of
    rounds needs windows drawn as a trained network draws them: a correction stroke moves
    a tumor's border, where random weights clear a window or leave it as it was.
    """
    import hashlib

    from wsiseg.config import repo_root
    from wsiseg.train.guidenet import train_guidenet
    from wsiseg.train.refinenet import train_refinenet

    cards = hashlib.sha256(b"".join((repo_root() / "models" / f"{role}.yaml").read_bytes()
                                    for role in ("guidenet", "refinenet"))).hexdigest()[:12]
    width, height = size
    out = (cache / "trained"
           / f"{width}x{height}-mpp{mpp:g}-seed{seed + 1}-{workflow.name}-{cards}"
           f"-{minutes:g}min")
    weights = out / "refinenet.safetensors"
    if weights.exists():
        return weights
    slide = generated_slide(cache, size, mpp, seed + 1)
    # an interrupted training's checkpoints are not resumed: they would train past the
    # budget, and RefineNet's would not match a GuideNet trained again
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = dict(slides=[slide.slide_path], annotations=[slide.truth_geojson_path],
                  workflow=workflow, cache_dir=out / "train-cache", seed=seed, device="cpu",
                  progress=False, max_minutes=minutes)
    t0 = time.perf_counter()
    guide = train_guidenet(out=out / "guidenet.safetensors", **common)
    refine = train_refinenet(guidenet=guide.weights, out=out / "refinenet.tmp.safetensors",
                             **common)
    os.replace(refine.weights, weights)  # the cache holds finished weights only
    shutil.rmtree(out / "train-cache", ignore_errors=True)
    log(f"trained the bench's RefineNet in {time.perf_counter() - t0:.0f} s (GuideNet IoU "
        f"{guide.best_val_iou:.3f}, RefineNet IoU {refine.best_val_iou:.3f}): {weights}")
    return weights


def mosaic_slide(cache: Path, slide, side: int) -> Path:
    """The generated ``slide`` repeated ``side`` × ``side`` times in one slide file, cached.

    A control for "a larger slide": the same tissue and tumors, ``side²`` times the area
    and the features (a generated slide of that size has other, larger tumors). Written as
    the generator writes its slides (256² JPEG tiles, downsample 4 per level to ≤ 1024 px,
    the resolution in pixels per centimetre), each level's tiles taken from the slide's
    pixels at that level's scale (level 0 decoded once; smaller levels resampled with
    ``INTER_AREA``), so memory stays at the one slide.
    """
    import cv2
    import tifffile

    from wsiseg.synth.write import JPEG_QUALITY, _level_sizes

    width, height = slide.level0_size
    path = cache / f"{slide.slide_path.stem}-mosaic{side}x{side}.tiff"
    if path.exists():
        return path
    tile = 256
    with tifffile.TiffFile(slide.slide_path) as tif:
        base = tif.pages[0].asarray()
        description = tif.pages[0].description
    levels = _level_sizes(width * side, height * side)
    if any(w % (side * tile) or h % (side * tile) for w, h in levels):
        raise ValueError(f"{slide.slide_path.name}: its levels are not whole tiles "
                         f"{side} times over; no mosaic")
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as out:
        for level, (lw, lh) in enumerate(levels):
            copy = base if level == 0 else cv2.resize(
                base, (lw // side, lh // side), interpolation=cv2.INTER_AREA)
            ch, cw = copy.shape[:2]
            tiles = (copy[(r * tile) % ch:(r * tile) % ch + tile,
                          (c * tile) % cw:(c * tile) % cw + tile]
                     for r in range(lh // tile) for c in range(lw // tile))
            px_per_cm = 1e4 / (slide.mpp * 4**level)
            out.write(data=tiles, shape=(lh, lw, 3), dtype="uint8", tile=(tile, tile),
                      photometric="rgb", compression="jpeg",
                      compressionargs={"level": JPEG_QUALITY},
                      resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1,
                      description=description if level == 0 else None, metadata=None,
                      software="wsiseg")
    os.replace(tmp, path)
    log(f"wrote {path.name} ({side}×{side} copies) in {time.perf_counter() - t0:.1f} s")
    return path
