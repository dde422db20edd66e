"""``wsiseg demo``: the whole loop on a generated cohort, on CPU, in minutes.

1. generate slides with ground truth (:mod:`wsiseg.synth`): some to train, some to test;
2. train a small GuideNet and RefineNet within a time budget (:mod:`wsiseg.train`);
3. ``wsiseg run`` the test slides;
4. play the pathologist: a few correction scribbles on each slide's largest errors, written
   as a QuPath GeoJSON export (the scribble simulator of :mod:`wsiseg.scribbles.simulate`);
5. ``wsiseg refine`` with RefineNet, and print IoU against the ground truth before and after,
   with the GeoJSON files to open in QuPath.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsiseg.config import load_workflow, workflows_dir


@dataclass(frozen=True)
class DemoOptions:
    out_dir: Path
    train_slides: int = 4
    test_slides: int = 2
    size: tuple[int, int] = (4096, 3072)  # level-0 px at 0.5 µm/px
    mpp: float = 0.5
    minutes_guidenet: float = 3.0
    minutes_refinenet: float = 2.5
    strokes: int = 3  # correction scribbles per slide
    seed: int = 0
    workflow: str | None = None


def _log(text: str) -> None:
    print(text, flush=True)


def run_demo(options: DemoOptions) -> int:
    from wsiseg.cohort import RunOptions, ensure_out_dir, run_cohort
    from wsiseg.session import refine_store
    from wsiseg.synth import synthesize_cohort
    from wsiseg.train.guidenet import train_guidenet
    from wsiseg.train.refinenet import train_refinenet

    t0 = time.perf_counter()
    out = options.out_dir
    ensure_out_dir(out)
    workflow = options.workflow or (
        "demo" if (workflows_dir() / "demo.yaml").exists() else "default"
    )
    wf = load_workflow(workflow)
    n = options.train_slides + options.test_slides
    _log(f"[1/5] generating {n} slides ({options.size[0]}x{options.size[1]} px at "
         f"{options.mpp} µm/px) in {out / 'slides'}")
    slides = synthesize_cohort(out / "slides", n, options.size, mpp=options.mpp,
                               seed=options.seed)
    train, test = slides[: options.train_slides], slides[options.train_slides :]

    _log(f"[2/5] training GuideNet for at most {options.minutes_guidenet:g} min "
         f"(workflow {wf.name}: {wf.working_mpp} µm/px, {wf.guidenet.patch_px} px patches)")
    common = dict(
        slides=[s.slide_path for s in train],
        annotations=[s.truth_geojson_path for s in train],
        workflow=workflow, cache_dir=out / "train-cache", seed=options.seed,
        device="cpu", progress=sys.stderr.isatty(),
    )
    guide = train_guidenet(out=out / "guidenet.safetensors",
                           max_minutes=options.minutes_guidenet, **common)
    _log(f"      GuideNet: validation IoU {guide.best_val_iou:.3f} after "
         f"{guide.epochs_run} epochs, {guide.seconds:.0f} s")
    _log(f"[3/5] training RefineNet for at most {options.minutes_refinenet:g} min")
    refine = train_refinenet(guidenet=guide.weights, out=out / "refinenet.safetensors",
                             max_minutes=options.minutes_refinenet, **common)
    _log(f"      RefineNet: validation IoU {refine.best_val_iou:.3f}, {refine.seconds:.0f} s")

    _log(f"[4/5] wsiseg run on {len(test)} test slides")
    run_out = out / "run"
    status = run_cohort([str(s.slide_path) for s in test], RunOptions(
        out_dir=run_out, workflow=workflow, guidenet=str(guide.weights), device="cpu",
        progress=sys.stderr.isatty()))
    if status != 0:
        _log("      some slides failed: see summary.csv")

    _log(f"[5/5] simulated pathologist: {options.strokes} correction scribbles per slide, "
         "then wsiseg refine with RefineNet")
    rows = []
    for i, s in enumerate(test):
        slide_id = s.slide_path.stem
        store_path = run_out / f"{slide_id}.zarr"
        before = slide_iou(store_path, s.truth_mask_path)
        export = run_out / f"{slide_id}.scribbles.geojson"
        write_simulated_export(store_path, s.truth_mask_path, export,
                               strokes=options.strokes, seed=options.seed + i)
        refine_store(store_path, export, refinenet=str(refine.weights), device="cpu")
        after = slide_iou(store_path, s.truth_mask_path)
        rows.append((slide_id, before, after, run_out / f"{slide_id}.geojson"))

    _log("")
    _log(f"{'slide':<12} {'IoU GuideNet':>12} {'IoU refined':>12}  GeoJSON for QuPath")
    for slide_id, before, after, geojson in rows:
        _log(f"{slide_id:<12} {before:>12.3f} {after:>12.3f}  {geojson}")
    _log(f"\nslides: {out / 'slides'} (open a .tiff in QuPath, then drag its .geojson on it)")
    _log(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


def slide_iou(store_path: Path, truth_mask_path: Path) -> float:
    """Tumor IoU of the store's current ``refined`` against the ground truth."""
    from wsiseg.contours import tumor_mask
    from wsiseg.store import SlideStore
    from wsiseg.synth import read_truth_mask

    store = SlideStore.open(store_path, mode="r")
    pred = tumor_mask(np.asarray(store["refined"][...]), store.workflow.contours.threshold)
    truth = read_truth_mask(truth_mask_path, pred.shape)
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


def write_simulated_export(
    store_path: Path, truth_mask_path: Path, export: Path, *, strokes: int, seed: int
) -> Path:
    """A QuPath-style export of correction scribbles on the largest current errors."""
    import shapely

    from wsiseg.contours import tumor_mask, tumor_polygons
    from wsiseg.qupath import Annotation, write_annotations
    from wsiseg.scribbles.simulate import correction_scribble
    from wsiseg.store import SlideStore
    from wsiseg.synth import read_truth_mask

    store = SlideStore.open(store_path, mode="r")
    pred = tumor_mask(np.asarray(store["refined"][...]), store.workflow.contours.threshold)
    truth = read_truth_mask(truth_mask_path, pred.shape)
    rng = np.random.default_rng(seed)
    scribbles = np.zeros(pred.shape, dtype=np.int8)
    current = pred.copy()
    for _ in range(strokes):
        stroke = correction_scribble(truth, current, rng=rng)
        if not stroke.any():
            break
        scribbles[stroke != 0] = stroke[stroke != 0]
        current[stroke > 0] = True  # the next stroke goes to the next largest error
        current[stroke < 0] = False
    annotations = []
    for label, name, color in ((1, "Tumor", (200, 0, 0)), (-1, "Stroma", (150, 200, 150))):
        polys = tumor_polygons((scribbles == label).astype(np.uint8) * 255, simplify_px=0)
        if polys:
            geom = store.frame.transform_geometry(shapely.union_all(polys), "working", "qupath")
            annotations.append(Annotation(geom, name, color=color))
    write_annotations(export, annotations)
    return export
