"""Benchmark test-time augmentation: IoU of GuideNet with and without TTA against ground truth.

Generates slides with ground truth (:func:`wsiseg.synth.synthesize_cohort`), tiles them, runs
:func:`wsiseg.infer.infer_to_store` twice per slide (``tta=False`` / ``tta=True``: the mean
over the 8 flips / rotations) and compares ``probability >= θ`` with the truth mask resampled
to the working grid (:func:`wsiseg.synth.read_truth_mask`). Prints a Markdown table and the
command line. Heavy: not run in CI.

    .venv/bin/python scripts/bench/tta.py --guidenet models/guidenet.safetensors \\
        --slides 2 --size 8192x6144 --device auto

Without ``--guidenet`` it uses randomly initialised weights (``wsiseg models init``), which
checks the plumbing and the timing only: the IoU of an untrained network means nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """IoU and Dice of two bool masks (1.0 each when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    union = float(np.logical_or(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidenet", type=Path, help="GuideNet .safetensors (default: random)")
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--size", type=_size, default=(8192, 6144), metavar="WxH",
                        help="level-0 size of each generated slide")
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--workflow", default=None, help="preset or YAML (the weights' own)")
    args = parser.parse_args(argv)

    from wsiseg.config import load_workflow
    from wsiseg.contours import tumor_mask
    from wsiseg.infer import infer_to_store, resolve_device
    from wsiseg.nets import init_weights, load_weights, normalise_rgb
    from wsiseg.synth import read_truth_mask, synthesize_cohort
    from wsiseg.tiling import tile_slide

    wf = load_workflow(args.workflow)
    work = args.work or Path(tempfile.mkdtemp(prefix="wsiseg-bench-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = args.guidenet
    if weights is None:
        weights = work / "guidenet-random.safetensors"
        init_weights("guidenet", weights, seed=args.seed, workflow=wf)
    device = resolve_device(args.device)
    model, card = load_weights(weights, role="guidenet", workflow=wf, device=device)
    theta = wf.contours.threshold

    t0 = time.perf_counter()
    slides = synthesize_cohort(work / "slides", args.slides, args.size, mpp=args.mpp,
                               seed=args.seed)
    print(f"generated {len(slides)} slides in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    for s in slides:
        store = tile_slide(s.slide_path, work / "stores" / f"{s.slide_path.stem}.zarr", wf).store
        shape = store.frame.working_shape
        truth = read_truth_mask(s.truth_mask_path, shape)
        result = {"slide": s.slide_path.stem, "mpx": shape[0] * shape[1] / 1e6}
        for tta in (False, True):
            prob = np.zeros(shape, np.uint8)
            stats = infer_to_store(
                store["image"], [prob], model=model,
                normalise=lambda t: normalise_rgb(t, card), tissue=store.tissue_mask,
                patch_px=wf.guidenet.patch_px, stride_px=wf.guidenet.stride_px,
                batch_size=wf.guidenet.batch_size, device=device, band_px=store.chunk_px,
                tta=tta,
            )
            iou, dice = iou_dice(tumor_mask(prob, theta), truth)
            result[tta] = (iou, dice, stats.total_s, stats.forward_s)
        rows.append(result)

    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"\n`{command}`\n\nweights: {weights} ({'given' if args.guidenet else 'random'}), "
          f"device: {device}, θ = {theta}\n")
    print("| slide | working Mpx | IoU | IoU (TTA) | Dice | Dice (TTA) | s | s (TTA) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        (i0, d0, s0, _), (i1, d1, s1, _) = r[False], r[True]
        print(f"| {r['slide']} | {r['mpx']:.1f} | {i0:.3f} | {i1:.3f} | {d0:.3f} | {d1:.3f} "
              f"| {s0:.1f} | {s1:.1f} |")
    mean = np.mean([[r[False][0], r[True][0]] for r in rows], axis=0)
    print(f"| **mean** | | **{mean[0]:.3f}** | **{mean[1]:.3f}** | | | | |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
