"""``wsiseg eval interactive``: methods, windows, selection, the protocol and its report.

The methods named are turned into window refiners (:mod:`wsiseg.evaluate.refiners`), the
windows come from a patch folder (GuideNet predicts their start) or from slide stores matched
to their truth files by name (:mod:`wsiseg.evaluate.windows`), those whose GuideNet IoU lies
in the range are chosen, and DeepScribble's protocol runs on them
(:mod:`wsiseg.evaluate.interactive`), whose report is written to a folder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from wsiseg.config import Workflow
from wsiseg.errors import UsageError
from wsiseg.evaluate.interactive import InteractiveResult, evaluate_interactive
from wsiseg.evaluate.refiners import Refiner, baseline_refiners, refinenet_refiner
from wsiseg.evaluate.report import write_interactive_report
from wsiseg.evaluate.windows import (
    select_windows,
    windows_from_patch_folder,
    windows_from_store,
)
from wsiseg.train.inputs import match_annotations

__all__ = ["METHODS", "run_interactive_evaluation"]

METHODS = ("refinenet", "randomwalk", "watershed", "guidenet")


def run_interactive_evaluation(
    workflow: Workflow,
    *,
    methods: Sequence[str],
    out_dir: Path,
    stores: Sequence[Path] = (),
    truth: Sequence[Path] = (),
    patch_folder: Path | None = None,
    guidenet: Path | None = None,
    refinenet: Path | None = None,
    device: str = "auto",
    runtime: str | None = None,
    precision: str | None = None,
    iou_range: tuple[float, float] = (0.5, 0.75),
    min_tumor_fraction: float = 0.0,
    max_windows: int | None = None,
    max_interactions: int = 20,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> tuple[InteractiveResult, dict[str, Path]]:
    """Run the interactive protocol on the chosen windows and write its report.

    Parameters
    ----------
    workflow : Workflow
        Window size, contour threshold and the baselines' settings (a RefineNet's card
        overrides the window size and threshold).
    methods : sequence of str
        Any of :data:`METHODS`.
    out_dir : Path
        Where the report goes (:func:`write_interactive_report`).
    stores, truth
        Slide stores and their truth files or folders (matched by name) — or else:
    patch_folder, guidenet
        A patch folder and the GuideNet that predicts its windows' start.
    refinenet : Path, optional
        RefineNet weights (needed for the ``refinenet`` method).
    runtime, precision : str, optional
        See :func:`wsiseg.runtime.load_network`; default: the workflow's ``inference`` keys.
    iou_range, min_tumor_fraction, max_windows, seed
        Which windows are chosen (:func:`select_windows`).
    max_interactions : int
        Scribbles per window at most.
    log : callable, optional
        Receives one line on the windows chosen (and, with ``verbose``, progress).

    Returns
    -------
    (InteractiveResult, dict of Path)
        The result and the report's files by kind (``table_md``, ``summary_csv``, ...).

    Raises
    ------
    UsageError
        An unknown method, both or neither of stores and a patch folder, missing weights or
        truth for what was asked.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(unknown)} "
                         f"(choose from {', '.join(METHODS)})")
    if bool(patch_folder) == bool(stores):
        raise UsageError("give either --patch-folder DIR or STORE... with --truth")
    runtime = runtime or workflow.inference.runtime
    precision = precision or workflow.inference.precision
    refiners: dict[str, Refiner] = {}
    window_px, threshold = workflow.refinenet.window_px, workflow.contours.threshold
    if "refinenet" in methods:
        if not refinenet:
            raise UsageError("--refinenet WEIGHTS is needed for the refinenet method "
                             "(or leave it out of --methods)")
        refiners["RefineNet"], card = refinenet_refiner(
            Path(refinenet), device=device, runtime=runtime, precision=precision)
        window_px, threshold = card.patch_px, card.threshold
    refiners |= baseline_refiners(beta=workflow.refinenet.randomwalk_beta,
                                  margins=[workflow.refinenet.confident_margin], kinds=methods)
    if patch_folder:
        if not guidenet:
            raise UsageError("--guidenet WEIGHTS is needed to predict the patches' start")
        windows = windows_from_patch_folder(Path(patch_folder), Path(guidenet),
                                            window_px=window_px, device=device,
                                            runtime=runtime, precision=precision)
    else:
        if not truth:
            raise UsageError("--truth FILE... (or FOLDER) is needed with slide stores")
        windows = []
        for store, truth_path in match_annotations([Path(s) for s in stores],
                                                   [Path(t) for t in truth]):
            windows += windows_from_store(store, truth_path, window_px=window_px)
    lo, hi = iou_range
    chosen = select_windows(
        windows, iou_range=(lo, hi), min_tumor_fraction=min_tumor_fraction,
        max_windows=max_windows, threshold=threshold, seed=seed)
    if log is not None:
        log(f"{len(chosen)} of {len(windows)} windows of {window_px}² px with GuideNet IoU "
            f"{lo:.2f}–{hi:.2f}")
    result = evaluate_interactive(
        chosen, refiners, max_interactions=max_interactions, threshold=threshold, seed=seed,
        progress=log if verbose else None)
    title = f"{len(chosen)} windows of {window_px}², GuideNet IoU {lo:.2f}–{hi:.2f}"
    return result, write_interactive_report(result, Path(out_dir), title=title)
