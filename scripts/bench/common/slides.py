"""The slide cache: generated slides drawn once and kept, slide copies, random weights."""

from __future__ import annotations

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
