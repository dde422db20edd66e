"""Accuracy of GuideNet and RefineNet on held-out data, with DeepScribble's ablation.

Not a test: it trains networks for minutes. Two data sets, each split into training and
held-out test data:

- ``synth``: generated slides (``wsiseg.synth``), trained from their truth GeoJSON like a
  user's QuPath annotations; test slides go through ``wsiseg run`` (the blended GuideNet map
  of the real pipeline) and are cut into RefineNet windows.
- ``camelyon``: the real CAMELYON H&E patches with tumor masks in
  ``../shared/data/real/patches/he_tumor_masks/camelyon`` (16 pairs of 512²), taken as being
  at the working resolution; test patches are cut into RefineNet windows.

On the test windows where GuideNet's IoU lies in 0.50–0.75 (the paper's selection), one round
of simulated correction scribbles (``simulate_scribbles``, the same scribbles for every
variant) is given to each RefineNet variant of the ablation — I (RGB + scribble distance, no
guide), I+P (RGB + guide, no scribbles), I+P+S (raw scribbles), I+P+D (distance maps, the
product) — and the mean IoU per variant is printed next to GuideNet's.

    uv run python scripts/bench/accuracy.py --out /tmp/acc
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from wsiseg.config import load_workflow

VARIANTS = {  # name: (use_guide, scribble_kind)
    "I": (False, "distance"),
    "I+P": (True, "none"),
    "I+P+S": (True, "raw"),
    "I+P+D": (True, "distance"),
}
GUIDE_IOU_RANGE = (0.50, 0.75)
REPO = Path(__file__).resolve().parents[2]
CAMELYON = REPO.parent / "shared" / "data" / "real" / "patches" / "he_tumor_masks" / "camelyon"


def iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    if valid is not None:
        pred, truth = pred & valid, truth & valid
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


def windows_of(
    rgb: np.ndarray, guide: np.ndarray, truth: np.ndarray, valid: np.ndarray, window_px: int,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Half-overlapping windows (rgb uint8 (P, P, 3), guide float, truth bool, valid bool) of
    one image; ``rgb`` is (3, H, W), channel first as a store holds it (read window by
    window when it is the store's array)."""
    out = []
    rows, cols = guide.shape
    step = window_px // 2
    for r in range(0, max(1, rows - window_px + 1), step):
        for c in range(0, max(1, cols - window_px + 1), step):
            sl = (slice(r, r + window_px), slice(c, c + window_px))
            if guide[sl].shape != (window_px, window_px) or valid[sl].mean() < 0.5:
                continue
            out.append((np.moveaxis(np.asarray(rgb[(slice(None), *sl)]), 0, -1), guide[sl],
                        truth[sl], valid[sl]))
    return out


def refine_windows(weights: Path, windows, scribbles: list[np.ndarray]) -> list[np.ndarray]:
    """Run one RefineNet variant on windows with given scribbles (its card says the encoding)."""
    import torch

    from wsiseg.nets import load_weights
    from wsiseg.scribbles.encode import encode_refine_input

    model, card = load_weights(weights, role="refinenet")
    model.eval()
    enc = card.scribble_encoding
    zero_guide = enc.get("channels", ["rgb", "guide"])[1] == "zero"
    out = []
    with torch.inference_mode():
        for (rgb, guide, _, _), scrib in zip(windows, scribbles, strict=True):
            x = encode_refine_input(
                rgb, guide, scrib, max_distance_px=float(enc["max_distance_px"]),
                scribble_kind=str(enc["kind"]), mean=tuple(card.normalisation["mean"]),
                std=tuple(card.normalisation["std"]),
            )
            if zero_guide:
                x[3] = 0.0
            prob = torch.sigmoid(model(torch.from_numpy(x)[None]))[0, 0].numpy()
            out.append(prob >= card.threshold)
    return out


def evaluate(name: str, windows, refiners: dict[str, Path], seed: int,
             iou_range: tuple[float, float]) -> dict:
    """Mean IoU of GuideNet and of each RefineNet variant after one round of scribbles, on the
    windows whose GuideNet IoU lies in ``iou_range``."""
    from wsiseg.scribbles.simulate import simulate_scribbles

    guide_ious = [iou(g >= 0.5, t, v) for _, g, t, v in windows]
    keep = [w for w, i in zip(windows, guide_ious, strict=True)
            if iou_range[0] <= i <= iou_range[1]]
    result = {"data": name, "GuideNet IoU range": f"{iou_range[0]:.2f}–{iou_range[1]:.2f}",
              "windows": len(keep)}
    if not keep:
        return result
    rng = np.random.default_rng(seed)
    scribbles = []
    for _, g, t, v in keep:
        s = simulate_scribbles(t, g, rng=rng)
        s[~v] = 0
        scribbles.append(s)
    result["GuideNet"] = float(np.mean([iou(g >= 0.5, t, v) for _, g, t, v in keep]))
    for variant, weights in refiners.items():
        preds = refine_windows(weights, keep, scribbles)
        result[variant] = float(np.mean(
            [iou(p, t, v) for p, (_, _, t, v) in zip(preds, keep, strict=True)]
        ))
    return result


def train_all(out: Path, data: dict, wf, args: argparse.Namespace) -> tuple[Path, dict]:
    """GuideNet, then the four RefineNet variants with the same number of steps each (a
    shared CPU makes equal time unfair); existing weights are reused with ``--reuse``."""
    from wsiseg.train import train_guidenet, train_refinenet

    common = dict(workflow=wf, seed=args.seed, device="cpu", progress=False,
                  cache_dir=out / "cache", steps_per_epoch=25, **data)
    weights = out / "guidenet.safetensors"
    if not (args.reuse and weights.exists()):
        g = train_guidenet(out=weights, epochs=max(1, args.guidenet_steps // 25), **common)
        print(f"  GuideNet: val IoU {g.best_val_iou:.3f}, {g.steps} steps, {g.seconds:.0f} s",
              file=sys.stderr)
    refiners = {}
    for variant, (use_guide, kind) in VARIANTS.items():
        refiners[variant] = out / f"refinenet-{variant}.safetensors"
        if args.reuse and refiners[variant].exists():
            continue
        r = train_refinenet(guidenet=weights, out=refiners[variant],
                            epochs=max(1, args.refinenet_steps // 25), use_guide=use_guide,
                            scribble_kind=kind, **common)
        print(f"  RefineNet {variant}: val IoU {r.best_val_iou:.3f}, {r.steps} steps, "
              f"{r.seconds:.0f} s", file=sys.stderr)
    return weights, refiners


def synth_windows(out: Path, guidenet: Path, test, wf) -> list:
    from skimage.transform import resize

    from wsiseg.cohort import RunOptions, run_cohort
    from wsiseg.store import SlideStore
    from wsiseg.synth import read_truth_mask

    run_cohort([str(s.slide_path) for s in test], RunOptions(
        out_dir=out / "run", workflow=wf.name, guidenet=str(guidenet), device="cpu",
        progress=False))
    windows = []
    for s in test:
        store = SlideStore.open(out / "run" / f"{s.slide_path.stem}.zarr", mode="r")
        guide = np.asarray(store["guide"][...]).astype(np.float32) / 255.0
        rgb = store["image"]  # (3, H, W), read window by window
        truth = read_truth_mask(s.truth_mask_path, guide.shape)
        valid = resize(store.tissue_mask, guide.shape, order=0) > 0  # labels on tissue only
        windows += windows_of(rgb, guide, truth, valid, wf.refinenet.window_px)
    return windows


def camelyon_windows(guidenet: Path, images, masks, wf) -> list:
    import torch

    from wsiseg.nets import load_weights, normalise_rgb

    model, card = load_weights(guidenet, role="guidenet")
    model.eval()
    windows = []
    for rgb, truth in zip(images, masks, strict=True):
        with torch.inference_mode():  # fully convolutional: the whole 512² patch at once
            x = normalise_rgb(torch.from_numpy(rgb).permute(2, 0, 1)[None], card)
            prob = torch.sigmoid(model(x))[0, 0].numpy()
        windows += windows_of(np.moveaxis(rgb, -1, 0), prob, truth, np.ones(truth.shape, bool),
                              wf.refinenet.window_px)
    return windows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--guidenet-steps", type=int, default=300)
    parser.add_argument("--refinenet-steps", type=int, default=80, help="per variant")
    parser.add_argument("--reuse", action="store_true", help="keep weights already in --out")
    parser.add_argument("--workflow", default="demo")
    parser.add_argument("--train-slides", type=int, default=4)
    parser.add_argument("--test-slides", type=int, default=3)
    parser.add_argument("--size", default="4096x3072", help="training slides' level-0 WxH")
    parser.add_argument("--test-size", default="8192x6144", help="test slides' level-0 WxH")
    parser.add_argument("--data", default="synth,camelyon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    wf = load_workflow(args.workflow)
    results = []
    t0 = time.perf_counter()
    if "synth" in args.data:
        from wsiseg.synth import synthesize_cohort

        out = args.out / "synth"
        w, h = (int(v) for v in args.size.split("x"))
        train = synthesize_cohort(out / "slides", args.train_slides, (w, h), seed=args.seed)
        w, h = (int(v) for v in args.test_size.split("x"))
        test = synthesize_cohort(out / "test-slides", args.test_slides, (w, h),
                                 seed=args.seed + 1000)
        print("synth: training", file=sys.stderr)
        guidenet, refiners = train_all(out, {
            "slides": [s.slide_path for s in train],
            "annotations": [s.truth_geojson_path for s in train]}, wf, args)
        windows = synth_windows(out, guidenet, test, wf)
        for rng_ in (GUIDE_IOU_RANGE, (0.0, 1.0)):
            results.append(evaluate("synth (held-out slides)", windows, refiners, args.seed,
                                    rng_))
    if "camelyon" in args.data and CAMELYON.is_dir():
        from wsiseg.train.inputs import patch_pairs_from_folder

        out = args.out / "camelyon"
        images, masks = patch_pairs_from_folder(CAMELYON)
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(images))
        n_test = max(1, len(images) // 3)
        test_idx, train_idx = order[:n_test], order[n_test:]
        train_dir = out / "train-patches"
        for sub in ("images", "masks"):
            (train_dir / sub).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i in train_idx:
            Image.fromarray(images[i]).save(train_dir / "images" / f"{i:03d}.png")
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(train_dir / "masks" /
                                                                  f"{i:03d}.png")
        print("camelyon: training", file=sys.stderr)
        guidenet, refiners = train_all(out, {"patch_folders": [train_dir]}, wf, args)
        windows = camelyon_windows(guidenet, [images[i] for i in test_idx],
                                   [masks[i] for i in test_idx], wf)
        for rng_ in (GUIDE_IOU_RANGE, (0.0, 1.0)):
            results.append(evaluate("camelyon (held-out patches)", windows, refiners,
                                    args.seed, rng_))

    cols = ["data", "GuideNet IoU range", "windows", "GuideNet", *VARIANTS]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(
            f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "–")) for c in cols
        ) + " |")
    print(f"\n{(time.perf_counter() - t0) / 60:.1f} min; command: python "
          + " ".join(shlex.quote(a) for a in sys.argv))
    (args.out / "accuracy.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
