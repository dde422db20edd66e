"""A network's time per patch by U-Net decoder widths: torch eager fp32 against OpenVINO.

TIAToolbox runs the network in torch eager fp32, ``wsiseg run`` on OpenVINO (bf16 where the
CPU has it), so a change of the network moves the two by different factors: this prints,
for the role's card (``--role``) with each ``--widths`` (smp's default first), the
milliseconds per patch of a batch of ``--batch`` random inputs of the card's size on
``--threads`` threads in both runtimes (median of ``--repeat``), and their ratio.
Random weights: the time does not depend on their values.

    .venv/bin/python scripts/bench/decoder_widths.py --role guidenet
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np


def per_patch_ms(run, batch: int, repeat: int) -> float:
    for _ in range(2):
        run()
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)) * 1e3 / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("guidenet", "refinenet"), default="guidenet")
    parser.add_argument("--widths", nargs="*", default=["128,64,32,16,16", "64,32,16,16,16"],
                        help="decoder widths to compare with smp's default (five each)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--precision", choices=("bf16", "f32"), default="bf16")
    args = parser.parse_args(argv)

    import openvino as ov
    import torch

    from wsiseg.nets import build_model, load_card

    torch.set_num_threads(args.threads)
    template = load_card(args.role)
    size = template.patch_px
    x = np.random.default_rng(0).random((args.batch, template.in_channels, size, size),
                                        dtype=np.float32)
    core = ov.Core()
    print(f"{args.role}, {args.batch} × {size}², {args.threads} threads, OpenVINO "
          f"{args.precision} ({ov.get_version()}), torch {torch.__version__}\n")
    print("| decoder widths | torch eager fp32 ms / patch | OpenVINO ms / patch | ratio |")
    print("|---|---:|---:|---:|")
    for widths in [None, *([int(w) for w in s.split(",")] for s in args.widths)]:
        card = dataclasses.replace(template, decoder_channels=widths)
        model = build_model(card).eval().to(memory_format=torch.channels_last)
        xt = torch.from_numpy(x).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            eager = per_patch_ms(lambda: model(xt), args.batch, args.repeat)  # noqa: B023
        converted = ov.convert_model(build_model(card).eval(),
                                     example_input=torch.from_numpy(x[:1]))
        request = core.compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": args.precision,
            "INFERENCE_NUM_THREADS": args.threads}).create_infer_request()
        compiled = per_patch_ms(lambda: request.infer({0: x}), args.batch,  # noqa: B023
                                args.repeat)
        label = "smp's default (256, 128, 64, 32, 16)" if widths is None else str(tuple(widths))
        print(f"| {label} | {eager:.1f} | {compiled:.1f} | {eager / compiled:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
