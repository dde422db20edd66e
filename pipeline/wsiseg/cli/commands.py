"""One thin function per command: it calls the module that does the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsiseg.errors import WsisegError


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
