"""The argument parser of ``wsiseg``: every command, its options and their types."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from wsiseg import __version__
from wsiseg.cli import commands

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

    p = add("info", commands.cmd_info, "print what a slide file says about itself")
    p.add_argument("slides", nargs="+", metavar="SLIDE")

    p = add("tile", commands.cmd_tile, "build the slide stores (image, tissue) without a network")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--mpp", type=_number, help="µm per level-0 pixel (overrides file)")
    p.add_argument("--force", action="store_true", help="rebuild existing stores")
    workflow_option(p)

    p = add("run", commands.cmd_run, "GuideNet over every tissue patch; tumor contours as GeoJSON")
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

    p = add("status", commands.cmd_status,
            "print a run's ledger: slides done, failed (why), pending")
    p.add_argument("out_dir", metavar="DIR|URL")

    p = add("refine", commands.cmd_refine, "QuPath scribbles in; refine the windows they touch")
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

    p = add("serve", commands.cmd_serve, "live refinement over HTTP, for QuPath and a browser page")
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

    p = add("history", commands.cmd_history, "list the refine rounds of a slide store")
    p.add_argument("store", metavar="STORE")

    p = add("undo", commands.cmd_undo, "restore the round before the latest one exactly")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--out", metavar="DIR", help="where the GeoJSON go (default: the store's)")

    p = add("export", commands.cmd_export,
            "a round's tumor mask (OME-TIFF), GeoJSON and measurements")
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--round", type=int, metavar="K", help="default: the latest round")
    p.add_argument("--what", default="mask,geojson,measurements",
                   help="comma-separated: mask,prob,geojson,measurements")
    p.add_argument("--out", metavar="DIR", help="default: each store's folder")
    p.add_argument("--force", action="store_true", help="replace existing outputs")

    p = add("demo", commands.cmd_demo, "the whole loop on a generated cohort, on CPU, in minutes")
    p.add_argument("--out", default="demo-out", metavar="DIR")
    p.add_argument("--minutes", type=_positive_float, default=2.5,
                   help="training budget per network (minutes)")
    p.add_argument("--seed", type=int, default=0)

    p = add("synth", commands.cmd_synth, "write generated H&E-like slides with ground truth")
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
        p.set_defaults(handler=commands.cmd_train)
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
    p.set_defaults(handler=commands.cmd_eval_masks)
    p.add_argument("predictions", nargs="+", metavar="PREDICTION",
                   help="slide stores (*.zarr), mask images, or folders of them")
    p.add_argument("--truth", nargs="+", required=True, metavar="FILE",
                   help="GeoJSON or mask files (or folders), matched to predictions by name")
    p.add_argument("--array", choices=["refined", "guide"], default="refined")
    p.add_argument("--threshold", type=float, help="default: each store's contour threshold")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")

    help_text = "DeepScribble's interactive protocol with a simulated pathologist"
    p = evals.add_parser("interactive", help=help_text, description=help_text)
    p.set_defaults(handler=commands.cmd_eval_interactive)
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
    p.set_defaults(handler=commands.cmd_models_init)
    p.add_argument("--role", required=True, choices=["guidenet", "refinenet"])
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--seed", type=int, default=0)
    workflow_option(p)

    scrib = sub.add_parser("scribbles", help="scribble simulation").add_subparsers(
        dest="scribbles_command", required=True, metavar="COMMAND"
    )
    p = scrib.add_parser("simulate", help="preview simulated scribbles on a mask as a PNG")
    p.set_defaults(handler=commands.cmd_scribbles_simulate)
    p.add_argument("mask")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--prediction", help="a predicted mask: draw correction scribbles")
    p.add_argument("--seed", type=int, default=0)
    return parser
