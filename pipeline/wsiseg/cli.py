"""Command line: one thin function per command, no logic.

Exit status: 0 when everything succeeded, 1 when some slide (or the command's input) failed,
2 for usage errors. A :class:`WsisegError` prints its one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from wsiseg import __version__
from wsiseg.config import mpp_problem
from wsiseg.errors import UsageError, WsisegError
from wsiseg.logs import configure_logging

Handler = Callable[[argparse.Namespace], int]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# -- commands -------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from wsiseg.slide.reader import open_slide

    status = 0
    for path in args.slides:
        try:
            reader = open_slide(path)
        except WsisegError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(reader.info.describe())
        reader.close()
    return status


def cmd_tile(args: argparse.Namespace) -> int:
    from wsiseg.cohort import tile_cohort

    return tile_cohort(
        args.slides, Path(args.out), workflow=args.workflow, mpp=args.mpp, force=args.force
    )


def cmd_run(args: argparse.Namespace) -> int:
    from wsiseg.cohort import RunOptions, run_cohort

    options = RunOptions(
        out_dir=args.out, workers=args.workers, threads_per_worker=args.threads_per_worker,
        workflow=args.workflow, guidenet=args.guidenet, mpp=args.mpp,
        device=args.device, force=args.force, scheduler=args.scheduler, tta=args.tta,
        export_mask=args.export == "mask" if args.export else False,
        runtime=args.runtime, precision=args.precision,
    )
    return run_cohort(args.slides, options)


def cmd_status(args: argparse.Namespace) -> int:
    from wsiseg.cohort import print_status

    return print_status(args.out_dir)


def cmd_export(args: argparse.Namespace) -> int:
    from wsiseg.export import export_stores

    return export_stores(
        args.stores, round_k=args.round, what=args.what,
        out_dir=Path(args.out) if args.out else None, force=args.force,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from wsiseg.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(
        out_dir=Path(args.out), minutes_guidenet=args.minutes, minutes_refinenet=args.minutes,
        seed=args.seed,
    ))


def cmd_synth(args: argparse.Namespace) -> int:
    from wsiseg.synth import synthesize_cohort

    slides = synthesize_cohort(
        Path(args.outdir), args.slides, args.size, mpp=args.mpp, seed=args.seed
    )
    for s in slides:
        print(f"{s.slide_path}  truth: {s.truth_geojson_path.name}, {s.truth_mask_path.name}")
    return 0


def cmd_models_init(args: argparse.Namespace) -> int:
    from wsiseg.config import load_workflow
    from wsiseg.nets import init_weights, weights_hash

    card = init_weights(
        args.role, Path(args.out), seed=args.seed, workflow=load_workflow(args.workflow)
    )
    digest = weights_hash(Path(args.out))[:12]
    print(
        f"{args.out}: random {card.role} weights ({card.in_channels} channels, "
        f"{card.patch_px} px at {card.working_mpp} µm/px), sha256 {digest}"
    )
    return 0


def cmd_scribbles_simulate(args: argparse.Namespace) -> int:
    from wsiseg.scribbles.preview import preview_png

    preview_png(
        Path(args.mask), Path(args.out), seed=args.seed,
        prediction_path=Path(args.prediction) if args.prediction else None,
    )
    print(args.out)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from wsiseg.session import refine_store

    return refine_store(
        Path(args.store), Path(args.scribbles), refinenet=args.refinenet, refiner=args.refiner,
        out_dir=Path(args.out) if args.out else None, device=args.device, tta=args.tta,
        runtime=args.runtime, precision=args.precision,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from wsiseg.serve.main import ServeOptions, serve

    return serve(ServeOptions(
        paths=[Path(p) for p in args.paths], host=args.host, port=args.port,
        refinenet=args.refinenet, refiner=args.refiner, device=args.device, token=args.token,
        max_body_mb=args.max_body_mb,
    ))


def cmd_history(args: argparse.Namespace) -> int:
    from wsiseg.session import print_history

    return print_history(Path(args.store))


def cmd_undo(args: argparse.Namespace) -> int:
    from wsiseg.session import undo_store

    return undo_store(Path(args.store), out_dir=Path(args.out) if args.out else None)


def cmd_train(args: argparse.Namespace) -> int:
    from wsiseg.train.command import result_line, train_network

    if args.train_command == "guidenet":
        own = {k: getattr(args, k) for k in ("tau", "alpha", "gamma", "lam", "warmup_epochs",
                                             "random_walk_seeds")} if args.scribbles_only else {}
    else:
        own = {"guidenet": Path(args.guidenet), "scribble_mix": args.scribble_mix,
               "second_pass_prob": args.second_pass, "scribble_kind": args.scribble_kind}
    result = train_network(
        args.train_command, out=Path(args.out), slides=args.slides,
        annotations=args.annotations, patch_folders=args.patch_folder, cache_dir=args.cache,
        batch_size=args.batch_size, restart=args.restart,
        scribbles_only=getattr(args, "scribbles_only", False), workflow=args.workflow,
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, lr=args.lr, seed=args.seed,
        device=args.device, max_minutes=args.max_minutes, val_fraction=args.val_fraction,
        mpp=args.mpp, **own,
    )
    print(result_line(result))
    return 0


def cmd_eval_masks(args: argparse.Namespace) -> int:
    from wsiseg.evaluate import evaluate_masks, format_mask_table

    report = evaluate_masks(
        [Path(p) for p in args.predictions], [Path(t) for t in args.truth],
        array=args.array, threshold=args.threshold,
        out_csv=Path(args.csv) if args.csv else None,
    )
    print(format_mask_table(report))
    return 0


def cmd_eval_interactive(args: argparse.Namespace) -> int:
    from wsiseg.config import load_workflow
    from wsiseg.evaluate.command import run_interactive_evaluation

    _, paths = run_interactive_evaluation(
        load_workflow(args.workflow), methods=[m.strip() for m in args.methods.split(",")
                                               if m.strip()],
        out_dir=Path(args.out), stores=[Path(s) for s in args.stores],
        truth=[Path(t) for t in args.truth or []],
        patch_folder=Path(args.patch_folder) if args.patch_folder else None,
        guidenet=args.guidenet, refinenet=args.refinenet, device=args.device,
        runtime=args.runtime, precision=args.precision,
        iou_range=args.iou_range, min_tumor_fraction=args.min_tumor,
        max_windows=args.max_windows, max_interactions=args.interactions, seed=args.seed,
        log=lambda m: print(m, file=sys.stderr), verbose=args.verbose,
    )
    print(paths["table_md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH like 0.5,0.75: {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 ≤ LOW ≤ HIGH ≤ 1, got {text!r}")
    return lo, hi


# -- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsiseg",
        description="Tumor segmentation of whole-slide images with a pathologist in the loop.",
    )
    parser.add_argument("--version", action="version", version=f"wsiseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    def workflow_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workflow", default=None, help="preset name or YAML file (default)")

    def runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--runtime", choices=["auto", "openvino", "torch"], default=None,
                       help="inference runtime: auto = OpenVINO on CPU, torch on CUDA "
                            "(default: the workflow's inference.runtime, auto)")
        p.add_argument("--precision", choices=["auto", "f32", "bf16"], default=None,
                       help="auto = bf16 where the CPU has it (OpenVINO), else f32 "
                            "(default: the workflow's inference.precision, auto)")

    p = add("info", cmd_info, "print what a slide file says about itself")
    p.add_argument("slides", nargs="+", metavar="SLIDE")

    p = add("tile", cmd_tile, "build the slide stores (image, tissue) without a network")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--mpp", type=_number, help="µm per level-0 pixel (overrides file)")
    p.add_argument("--force", action="store_true", help="rebuild existing stores")
    workflow_option(p)

    p = add("run", cmd_run, "GuideNet over every tissue patch; tumor contours as GeoJSON")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--out", required=True, metavar="DIR|URL",
                   help="output directory, or an fsspec URL (file://, s3://, gs://, ...)")
    p.add_argument("--guidenet", metavar="WEIGHTS", help="GuideNet .safetensors")
    p.add_argument("--mpp", type=_number, help="µm per level-0 pixel (overrides file)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="join this Dask cluster (tcp://host:port or a scheduler file)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="local Dask workers (default: from cores, memory, GPUs; 0: in process)")
    p.add_argument("--threads-per-worker", type=int, metavar="T")
    p.add_argument("--force", action="store_true", help="redo slides already done")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (8 flips/rots)")
    p.add_argument("--export", choices=["mask"], help="also write the tumor mask OME-TIFF")
    runtime_options(p)
    workflow_option(p)

    p = add("status", cmd_status, "print a run's ledger: slides done, failed (why), pending")
    p.add_argument("out_dir", metavar="DIR|URL")

    p = add("refine", cmd_refine, "QuPath scribbles in; refine the windows they touch")
    p.add_argument("store", metavar="STORE", help="<out>/<slide-id>.zarr from `wsiseg run`")
    p.add_argument("--scribbles", required=True, metavar="FILE", help="QuPath GeoJSON export")
    p.add_argument("--refinenet", metavar="WEIGHTS", help="RefineNet .safetensors")
    p.add_argument("--refiner", choices=["refinenet", "randomwalk"], default=None,
                   help="randomwalk: scikit-image random walker, no weights needed")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: mean over 8 flips/rotations (8× RefineNet)")
    p.add_argument("--out", metavar="DIR", help="where the GeoJSON go (default: the store's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    runtime_options(p)

    p = add("serve", cmd_serve, "live refinement over HTTP, for QuPath and a browser page")
    p.add_argument("paths", nargs="+", metavar="DIR|STORE",
                   help="a run directory (its *.zarr stores) or slide stores")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--refinenet", metavar="WEIGHTS", help="RefineNet .safetensors")
    p.add_argument("--refiner", choices=["refinenet", "randomwalk"], default=None,
                   help="randomwalk: scikit-image random walker, no weights needed")
    p.add_argument("--token", help="required header X-Wsiseg-Token (generated and printed "
                                   "when --host is not loopback)")
    p.add_argument("--max-body-mb", type=_positive_float, default=64.0,
                   help="largest scribble export accepted (MiB)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = add("history", cmd_history, "list the refine rounds of a slide store")
    p.add_argument("store", metavar="STORE")

    p = add("undo", cmd_undo, "restore the round before the latest one exactly")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--out", metavar="DIR", help="where the GeoJSON go (default: the store's)")

    p = add("export", cmd_export, "a round's tumor mask (OME-TIFF), GeoJSON and measurements")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--round", type=int, metavar="K", help="default: the latest round")
    p.add_argument("--what", default="mask,geojson,measurements",
                   help="comma-separated: mask,prob,geojson,measurements")
    p.add_argument("--out", metavar="DIR", help="default: each store's folder")
    p.add_argument("--force", action="store_true", help="replace existing outputs")

    p = add("demo", cmd_demo, "the whole loop on a generated cohort, on CPU, in minutes")
    p.add_argument("--out", default="demo-out", metavar="DIR")
    p.add_argument("--minutes", type=_positive_float, default=2.5,
                   help="training budget per network (minutes)")
    p.add_argument("--seed", type=int, default=0)

    p = add("synth", cmd_synth, "write generated H&E-like slides with ground truth")
    p.add_argument("outdir")
    p.add_argument("--slides", type=int, default=2)
    p.add_argument("--size", type=_size, default=(8192, 6144), metavar="WxH")
    p.add_argument("--mpp", type=_number, default=0.5, help="µm per level-0 pixel")
    p.add_argument("--seed", type=int, default=0)

    trainers = sub.add_parser("train", help="train GuideNet or RefineNet").add_subparsers(
        dest="train_command", required=True, metavar="NETWORK"
    )
    for name, help_text in (
        ("guidenet", "train GuideNet from annotated slides or image/mask patch pairs"),
        ("refinenet", "train RefineNet on a GuideNet's errors with simulated scribbles"),
    ):
        p = trainers.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=cmd_train)
        p.add_argument("--slides", nargs="*", default=[], metavar="SLIDE")
        p.add_argument("--annotations", nargs="*", default=[], metavar="FILE",
                       help="QuPath GeoJSON exports or mask images (or folders), by slide name")
        p.add_argument("--patch-folder", action="append", default=[], metavar="DIR",
                       help="a folder with images/ and masks/ patch pairs (repeatable)")
        p.add_argument("--out", required=True, metavar="FILE", help="weights .safetensors")
        p.add_argument("--epochs", type=int, default=20)
        p.add_argument("--steps-per-epoch", type=int, default=100)
        p.add_argument("--batch-size", type=int, default=None)
        p.add_argument("--lr", type=_positive_float, default=1e-3)
        p.add_argument("--val-fraction", type=float, default=0.2,
                       help="share of slides held out for validation")
        p.add_argument("--max-minutes", type=_positive_float, help="stop after this long")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--mpp", type=_number, help="µm per level-0 pixel (overrides file)")
        p.add_argument("--cache", metavar="DIR", help="slide stores (default: beside --out)")
        p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
        workflow_option(p)
        if name == "guidenet":
            p.add_argument("--scribbles-only", action="store_true",
                           help="train from QuPath scribbles alone (Scribble2Label): "
                                "--annotations are then scribble exports")
            p.add_argument("--random-walk-seeds", action="store_true",
                           help="with --scribbles-only: grow scribbles by a random walker first")
            p.add_argument("--tau", type=float, default=0.8, help="pseudo-label threshold τ")
            p.add_argument("--alpha", type=float, default=0.2, help="EMA weight α")
            p.add_argument("--gamma", type=int, default=5, help="epochs between averages γ")
            p.add_argument("--lam", type=float, default=0.5, help="pseudo-label loss weight λ")
            p.add_argument("--warmup-epochs", type=int, default=5)
        if name == "refinenet":
            p.add_argument("--guidenet", required=True, metavar="WEIGHTS")
            p.add_argument("--scribble-mix", type=float, default=0.5,
                           help="share of DeepScribble scribbles (else human-like)")
            p.add_argument("--second-pass", type=float, default=0.3,
                           help="share of steps with a second, corrective scribble pass")
            p.add_argument("--scribble-kind", choices=["distance", "raw", "none"],
                           default="distance", help="scribble channels (ablation)")

    evals = sub.add_parser("eval", help="evaluate against ground truth").add_subparsers(
        dest="eval_command", required=True, metavar="COMMAND"
    )
    p = evals.add_parser("masks", help="IoU, Dice and the PAIP 2019 score per slide",
                         description="IoU, Dice and the PAIP 2019 score per slide")
    p.set_defaults(handler=cmd_eval_masks)
    p.add_argument("predictions", nargs="+", metavar="PREDICTION",
                   help="slide stores (*.zarr), mask images, or folders of them")
    p.add_argument("--truth", nargs="+", required=True, metavar="FILE",
                   help="GeoJSON or mask files (or folders), matched to predictions by name")
    p.add_argument("--array", choices=["refined", "guide"], default="refined")
    p.add_argument("--threshold", type=float, help="default: each store's contour threshold")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")

    help_text = "DeepScribble's interactive protocol with a simulated pathologist"
    p = evals.add_parser("interactive", help=help_text, description=help_text)
    p.set_defaults(handler=cmd_eval_interactive)
    p.add_argument("stores", nargs="*", metavar="STORE", help="slide stores from `wsiseg run`")
    p.add_argument("--truth", nargs="+", metavar="FILE",
                   help="the stores' ground truth (GeoJSON or masks, or folders), by name")
    p.add_argument("--patch-folder", metavar="DIR", help="images/ and masks/ patch pairs")
    p.add_argument("--guidenet", metavar="WEIGHTS", help="GuideNet (for --patch-folder)")
    p.add_argument("--refinenet", metavar="WEIGHTS", help="RefineNet .safetensors")
    p.add_argument("--methods", default="refinenet,randomwalk,watershed,guidenet",
                   help="comma-separated: refinenet,randomwalk,watershed,guidenet")
    p.add_argument("--interactions", type=int, default=20)
    p.add_argument("--iou-range", type=_range, default=(0.5, 0.75), metavar="LOW,HIGH",
                   help="keep windows whose GuideNet IoU lies here (the paper's 0.5,0.75)")
    p.add_argument("--min-tumor", type=float, default=0.0,
                   help="least tumor share of a kept window's truth")
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--out", required=True, metavar="DIR", help="tables, curves and plot")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    runtime_options(p)
    p.add_argument("--seed", type=int, default=0)
    workflow_option(p)

    models = sub.add_parser("models", help="model weights").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND"
    )
    p = models.add_parser("init", help="write randomly initialised weights with a model card")
    p.set_defaults(handler=cmd_models_init)
    p.add_argument("--role", required=True, choices=["guidenet", "refinenet"])
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--seed", type=int, default=0)
    workflow_option(p)

    scrib = sub.add_parser("scribbles", help="scribble simulation").add_subparsers(
        dest="scribbles_command", required=True, metavar="COMMAND"
    )
    p = scrib.add_parser("simulate", help="preview simulated scribbles on a mask as a PNG")
    p.set_defaults(handler=cmd_scribbles_simulate)
    p.add_argument("mask")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--prediction", help="a predicted mask: draw correction scribbles")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mpp = getattr(args, "mpp", None)
    if mpp is not None and (problem := mpp_problem(mpp)) is not None:
        print(f"error: --mpp: {problem}", file=sys.stderr)  # one line, as a usage error
        return 2
    configure_logging(args.verbose)
    if not args.verbose:
        warnings.filterwarnings("ignore")
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WsisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wsiseg info ... | head` closed the pipe: nothing is wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
