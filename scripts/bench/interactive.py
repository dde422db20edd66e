"""Interactive evaluation (DeepScribble Table 1) and scribble-only vs fully supervised GuideNet.

Not a test: it trains networks and runs the 20-interaction protocol for minutes. Three
sub-commands, each meant to stay under ~10 minutes on a 2-core CPU:

``train-camelyon``
    GuideNet and RefineNet on the training split of the real CAMELYON patches
    (``../shared/data/real/patches/he_tumor_masks/camelyon``: 16 pairs of 512²; 11 for
    training, 5 held out, the split of ``accuracy.py``), demo workflow, for a fixed number of
    steps each.

``interactive --data camelyon|synth``
    The protocol of :mod:`wsiseg.evaluate.interactive` with RefineNet, the random walker and
    the watershed (each both as ``wsiseg refine`` seeds them — scribbles plus confident
    GuideNet pixels — and from the scribbles alone, as the paper's baselines), and GuideNet
    alone. Windows (the RefineNet window size) come from the held-out CAMELYON patches, or
    from generated slides run through ``wsiseg run`` with the given GuideNet; the paper's
    selection keeps those whose GuideNet IoU lies in 0.50–0.75.

``scribbles --data camelyon|synth``
    GuideNet trained from simulated scribbles alone (Scribble2Label) against the fully
    supervised GuideNet, with the same steps, on the same training data; IoU on the held-out
    patches / slides.

Examples (from the repository root)::

    python scripts/bench/interactive.py train-camelyon --out /tmp/ie/camelyon
    python scripts/bench/interactive.py interactive --data camelyon --out /tmp/ie/camelyon \\
        --guidenet /tmp/ie/camelyon/guidenet.safetensors \\
        --refinenet /tmp/ie/camelyon/refinenet.safetensors
    python scripts/bench/interactive.py interactive --data synth --out /tmp/ie/synth \\
        --guidenet demo-out/guidenet.safetensors --refinenet demo-out/refinenet.safetensors
    python scripts/bench/interactive.py scribbles --data camelyon --out /tmp/ie/camelyon \\
        --full /tmp/ie/camelyon/guidenet.safetensors
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CAMELYON = REPO.parent / "shared" / "data" / "real" / "patches" / "he_tumor_masks" / "camelyon"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


# -- data ------------------------------------------------------------------------------------
def camelyon_split(seed: int = 0) -> tuple[list, list, list, list, list[str]]:
    """Images and masks of the training and held-out CAMELYON patches (accuracy.py's split)."""
    from wsiseg.train.inputs import patch_pairs_from_folder

    images, masks = patch_pairs_from_folder(CAMELYON)
    names = sorted(p.stem for p in (CAMELYON / "images").iterdir())
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = max(1, len(images) // 3)
    test, train = order[:n_test], order[n_test:]
    return ([images[i] for i in train], [masks[i] for i in train],
            [images[i] for i in test], [masks[i] for i in test], [names[i] for i in test])


def write_patch_folder(folder: Path, images, masks) -> Path:
    from PIL import Image

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for k, (rgb, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(rgb).save(folder / "images" / f"{k:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{k:03d}.png")
    return folder


def synth_test_stores(out: Path, guidenet: Path, n: int, size: str, seed: int, wf):
    """Generated held-out slides run through ``wsiseg run``: (store path, truth path) pairs."""
    from wsiseg.cohort import RunOptions, run_cohort
    from wsiseg.synth import synthesize_cohort

    w, h = (int(v) for v in size.split("x"))
    slides = synthesize_cohort(out / "test-slides", n, (w, h), seed=seed)
    run_dir = out / f"run-{guidenet.stem}"
    run_cohort([str(s.slide_path) for s in slides], RunOptions(
        out_dir=run_dir, workflow=wf.name, guidenet=str(guidenet), device="cpu",
        progress=False))
    return [(run_dir / f"{s.slide_path.stem}.zarr", s.truth_mask_path) for s in slides]


# -- sub-commands ----------------------------------------------------------------------------
def train_camelyon(args: argparse.Namespace) -> int:
    from wsiseg.config import load_workflow
    from wsiseg.train import train_guidenet, train_refinenet

    wf = load_workflow(args.workflow)
    tr_img, tr_mask, *_ = camelyon_split(args.seed)
    folder = write_patch_folder(args.out / "train-patches", tr_img, tr_mask)
    common = dict(patch_folders=[folder], workflow=wf, seed=args.seed, device="cpu",
                  progress=False, cache_dir=args.out / "cache", threads=args.threads,
                  steps_per_epoch=25)
    t0 = time.perf_counter()
    if args.guidenet is None:
        g = train_guidenet(out=args.out / "guidenet.safetensors",
                           epochs=max(1, args.guidenet_steps // 25), **common)
        log(f"GuideNet: val IoU {g.best_val_iou:.3f}, {g.steps} steps, {g.seconds:.0f} s")
        guidenet, trained = g.weights, {"steps": g.steps, "val_iou": g.best_val_iou,
                                        "s": g.seconds}
    else:
        guidenet, trained = args.guidenet, {"weights": str(args.guidenet)}
    r = train_refinenet(guidenet=guidenet, out=args.out / "refinenet.safetensors",
                        epochs=max(1, args.refinenet_steps // 25), **common)
    log(f"RefineNet: val IoU {r.best_val_iou:.3f} (GuideNet on the same windows "
        f"{r.card.metrics.get('val_guide_iou', float('nan')):.3f}), {r.steps} steps, "
        f"{r.seconds:.0f} s")
    summary = {"command": command_line(), "minutes": (time.perf_counter() - t0) / 60,
               "guidenet": trained,
               "refinenet": {"steps": r.steps, "val_iou": r.best_val_iou, "s": r.seconds,
                             "val_guide_iou": r.card.metrics.get("val_guide_iou")}}
    (args.out / "train.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def interactive(args: argparse.Namespace) -> int:
    import torch

    from wsiseg.config import load_workflow
    from wsiseg.evaluate import (
        baseline_refiners,
        evaluate_interactive,
        refinenet_refiner,
        select_windows,
        write_interactive_report,
    )
    from wsiseg.evaluate.windows import (
        guidenet_probability,
        windows_from_arrays,
        windows_from_store,
    )

    torch.set_num_threads(args.threads)
    wf = load_workflow(args.workflow)
    t0 = time.perf_counter()
    refine_nn, card = refinenet_refiner(args.refinenet, device="cpu")
    window_px = card.patch_px
    if args.data == "camelyon":
        from wsiseg.nets import load_weights

        *_, te_img, te_mask, names = camelyon_split(args.seed)
        model, gcard = load_weights(args.guidenet, role="guidenet")
        windows = []
        for name, rgb, mask in zip(names, te_img, te_mask, strict=True):
            prob = guidenet_probability(model, gcard, rgb, torch.device("cpu"))
            windows += windows_from_arrays(f"camelyon/{name}", rgb, mask, prob,
                                           window_px=window_px)
    else:
        windows = []
        for store, truth in synth_test_stores(args.out, args.guidenet, args.slides,
                                              args.size, args.seed + 1000, wf):
            windows += windows_from_store(store, truth, window_px=window_px)
    lo, hi = (float(v) for v in args.iou_range.split(","))
    chosen = select_windows(windows, iou_range=(lo, hi), max_windows=args.windows,
                            min_tumor_fraction=args.min_tumor, seed=args.seed)
    log(f"{len(chosen)} of {len(windows)} windows of {window_px} px with GuideNet IoU "
        f"in {lo:.2f}–{hi:.2f} and ≥ {100 * args.min_tumor:g} % tumor")
    margins = ([float(m) for m in args.margins.split(",")] if args.margins
               else [wf.refinenet.confident_margin])
    methods = {"RefineNet": refine_nn,
               **baseline_refiners(beta=wf.refinenet.randomwalk_beta, margins=margins)}
    if args.methods:
        keep = [m.strip() for m in args.methods.split(",")]
        methods = {k: v for k, v in methods.items() if any(k.startswith(m) for m in keep)}
    result = evaluate_interactive(chosen, methods, max_interactions=args.interactions,
                                  threshold=card.threshold, seed=args.seed,
                                  progress=log if args.verbose else None)
    title = (f"{args.data}: {len(chosen)} windows of {window_px}², GuideNet IoU "
             f"{lo:.2f}–{hi:.2f}" + (f", ≥ {100 * args.min_tumor:g} % tumor"
                                     if args.min_tumor else ""))
    paths = write_interactive_report(result, args.out / "interactive", title=title,
                                     stem=f"interactive-{args.data}")
    print(paths["table_md"].read_text())
    print(f"{(time.perf_counter() - t0) / 60:.1f} min; command: {command_line()}")
    print("files: " + ", ".join(str(p) for p in paths.values()))
    return 0


def scribbles(args: argparse.Namespace) -> int:
    import torch

    from wsiseg.config import load_workflow
    from wsiseg.evaluate import iou_dice, paip_score
    from wsiseg.evaluate.windows import guidenet_probability
    from wsiseg.nets import load_weights
    from wsiseg.train import train_guidenet
    from wsiseg.train.pseudo import scribble_labels_from_truth
    from wsiseg.train.scribble2label import train_guidenet_scribbles_only

    torch.set_num_threads(args.threads)
    wf = load_workflow(args.workflow)
    t0 = time.perf_counter()
    steps_per_epoch = 25
    epochs = max(1, args.steps // steps_per_epoch)
    common = dict(workflow=wf, seed=args.seed, device="cpu", progress=False,
                  cache_dir=args.out / "cache", threads=args.threads,
                  steps_per_epoch=steps_per_epoch, epochs=epochs, resume=False)
    if args.data == "camelyon":
        tr_img, tr_mask, te_img, te_mask, names = camelyon_split(args.seed)
        data = {"patch_folders": [write_patch_folder(args.out / "train-patches", tr_img,
                                                     tr_mask)]}
        truth_data = data
        # Scribbled share of the training pixels (the scribbles the trainer will draw).
        rng = np.random.default_rng(0)
        share = np.mean([(scribble_labels_from_truth(m, rng=rng) >= 0).mean() for m in tr_mask])
        tests = list(zip(names, te_img, te_mask, strict=True))
    else:
        from wsiseg.synth import read_truth_mask, synthesize_cohort

        w, h = (int(v) for v in args.size.split("x"))
        train = synthesize_cohort(args.out / "slides", args.train_slides, (w, h), seed=args.seed)
        data = {"slides": [s.slide_path for s in train]}
        truth_data = {**data, "annotations": [s.truth_geojson_path for s in train]}
        share = float("nan")
        tests = []
        from wsiseg.store import SlideStore

        pairs = synth_test_stores(args.out, args.full or Path(args.guidenet), args.slides,
                                  args.size, args.seed + 1000, wf)
        for store_path, truth_path in pairs:
            store = SlideStore.open(store_path, mode="r")
            rgb = np.moveaxis(np.asarray(store["image"][...]), 0, -1)  # small generated slides
            tests.append((store_path.stem, rgb, read_truth_mask(truth_path, rgb.shape[:2])))
    full = Path(args.full) if args.full else None
    if full is None:
        full = args.out / "guidenet-full.safetensors"
        r = train_guidenet(out=full, **truth_data, **common)
        log(f"full: {r.steps} steps, {r.seconds:.0f} s, val IoU {r.best_val_iou:.3f}")
    s2l_out = args.out / "guidenet-scribbles.safetensors"
    kwargs = dict(gamma=args.gamma, warmup_epochs=args.warmup, tau=args.tau,
                  alpha=args.alpha, lam=args.lam, random_walk_seeds=args.random_walk,
                  pool_patches=args.pool)
    if args.data == "camelyon":
        s = train_guidenet_scribbles_only(out=s2l_out, **data, **kwargs, **common)
    else:
        s = train_guidenet_scribbles_only(out=s2l_out, **data,
                                          truth=truth_data["annotations"], **kwargs, **common)
    log(f"scribbles only: {s.steps} steps, {s.seconds:.0f} s; pseudo-labels "
        + ", ".join(f"e{p['epoch']} {p['fraction']:.2f} (acc {p['accuracy']:.3f})"
                    for p in s.pseudo))
    rows = []
    for label, weights in (("fully supervised", full), ("scribbles only (S2L)", s2l_out)):
        model, card = load_weights(weights, role="guidenet", workflow=wf)
        ious, dices = [], []
        inter = union = 0
        for _, rgb, truth in tests:
            pred = guidenet_probability(model, card, rgb, torch.device("cpu")) >= card.threshold
            iou, dice = iou_dice(pred, truth)
            ious.append(iou)
            dices.append(dice)
            inter += int((pred & truth).sum())
            union += int((pred | truth).sum())
        rows.append({"GuideNet": label, "steps": s.steps if "S2L" in label else None,
                     "mean IoU": float(np.mean(ious)), "pooled IoU": inter / max(1, union),
                     "mean Dice": float(np.mean(dices)), "PAIP score": paip_score(ious),
                     "per item IoU": [round(v, 3) for v in ious]})
    print(f"| GuideNet ({args.data}, {len(tests)} held-out) | mean IoU | pooled IoU | "
          "mean Dice | PAIP score |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['GuideNet']} | {r['mean IoU']:.3f} | {r['pooled IoU']:.3f} | "
              f"{r['mean Dice']:.3f} | {r['PAIP score']:.3f} |")
    print(f"\nscribbled share of training pixels: {share:.4f}; pseudo-labels per average: "
          + json.dumps(s.pseudo))
    print(f"{(time.perf_counter() - t0) / 60:.1f} min; command: {command_line()}")
    (args.out / f"scribbles-{args.data}.json").write_text(json.dumps(
        {"rows": rows, "pseudo": s.pseudo, "history": s.history, "share": share,
         "command": command_line()}, indent=1, default=str))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("train-camelyon", "interactive", "scribbles"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--workflow", default="demo")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1 is fastest on a shared CPU)")
        if name != "train-camelyon":
            p.add_argument("--data", choices=["camelyon", "synth"], required=True)
            p.add_argument("--slides", type=int, default=3, help="held-out generated slides")
            p.add_argument("--size", default="8192x6144", help="generated slides' level-0 WxH")
    p = sub.choices["train-camelyon"]
    p.add_argument("--guidenet-steps", type=int, default=300)
    p.add_argument("--refinenet-steps", type=int, default=150)
    p.add_argument("--guidenet", type=Path, default=None,
                   help="a GuideNet trained before on the same split: train RefineNet only")
    p = sub.choices["interactive"]
    p.add_argument("--guidenet", type=Path, required=True)
    p.add_argument("--refinenet", type=Path, required=True)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--interactions", type=int, default=20)
    p.add_argument("--iou-range", default="0.50,0.75")
    p.add_argument("--min-tumor", type=float, default=0.0,
                   help="least tumor share of a window's truth")
    p.add_argument("--margins", default="",
                   help="GuideNet confidence margins of the seeded RW/WS (default: the "
                        "workflow's refinenet.confident_margin)")
    p.add_argument("--methods", default="", help="comma-separated name prefixes (default all)")
    p.add_argument("--verbose", action="store_true")
    p = sub.choices["scribbles"]
    p.add_argument("--full", type=Path, help="fully supervised GuideNet to compare (else "
                                             "trained here with the same steps)")
    p.add_argument("--guidenet", type=Path, help="synth: GuideNet that makes the test stores")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-slides", type=int, default=4)
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tau", type=float, default=0.8)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--pool", type=int, default=256)
    p.add_argument("--random-walk", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return {"train-camelyon": train_camelyon, "interactive": interactive,
            "scribbles": scribbles}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
