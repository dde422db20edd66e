"""Where a network's time goes on OpenVINO: its layers, as the CPU plugin runs them.

The card's network (``--role``, random weights from ``wsiseg models init``; speed does not
depend on the values) is converted as :mod:`wsiseg.runtime` converts it and compiled with
the properties wsiseg compiles it with (:func:`wsiseg.runtime_openvino.compile_config`),
then one batch of ``--batch`` inputs of the card's size is run ``--repeat`` times: the
median wall time, the same network with a static input shape (wsiseg's is dynamic), and the
CPU plugin's own per-layer counters (``PERF_COUNT``) summed by layer type and kernel, and
the slowest layers. What a change of the network itself (its card) or of the plugin's
settings would be worth.

    .venv/bin/python scripts/bench/layers.py --role refinenet
"""

from __future__ import annotations

import argparse
import collections
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(request, x: np.ndarray, repeat: int) -> float:
    for _ in range(3):
        request.infer({0: x})
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        request.infer({0: x})
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds)) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("guidenet", "refinenet"), default="refinenet")
    parser.add_argument("--card", default=None,
                        help="a model card YAML to build instead of the role's template "
                             "(e.g. other decoder_channels)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=("bf16", "f32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--top", type=int, default=12, help="slowest layers listed")
    args = parser.parse_args(argv)

    import openvino as ov
    import torch

    from wsiseg.nets import build_model, load_card, save_weights
    from wsiseg.runtime_cache import _convert
    from wsiseg.runtime_openvino import compile_config

    card = load_card(args.card or args.role)
    if card.role != args.role:
        parser.error(f"{args.card}: a {card.role} card, not {args.role}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / f"{args.role}.safetensors"
        torch.manual_seed(0)  # random weights: the time does not depend on them
        save_weights(build_model(card).eval(), card, weights)
        model = _convert(weights, card)
    core = ov.Core()
    config = compile_config(args.precision, args.threads)
    shape = [args.batch, card.in_channels, card.patch_px, card.patch_px]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    static = model.clone()
    static.reshape({0: shape})
    rows = []
    for label, m in (("dynamic shape (wsiseg)", model), ("static shape", static)) * 2:
        request = core.compile_model(m, "CPU", config).create_infer_request()
        rows.append((label, median_ms(request, x, args.repeat)))
    request = core.compile_model(model, "CPU", config | {"PERF_COUNT": True}
                                 ).create_infer_request()
    wall = median_ms(request, x, 5)
    layers = [p for p in request.profiling_info if p.status == p.Status.EXECUTED]
    by_kind: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for p in layers:
        by_kind[(p.node_type, p.exec_type)].append(p.real_time.total_seconds() * 1e3)
    total = sum(sum(v) for v in by_kind.values())

    print(f"`{shlex.join([Path(sys.executable).name, *sys.argv])}`\n")
    print(f"{args.role}: {card.in_channels} × {card.patch_px}², batch {args.batch}, "
          f"{args.precision}, {args.threads} threads, OpenVINO {ov.__version__}, decoder "
          f"{card.decoder_channels or 'smp default [256, 128, 64, 32, 16]'}\n")
    print(f"| compiled | ms (median of {args.repeat}) |\n|---|---:|")
    for label, ms in rows:
        print(f"| {label} | {ms:.1f} |")
    print(f"\nPer layer (PERF_COUNT, one run of {wall:.1f} ms wall): {total:.1f} ms in "
          f"{len(layers)} layers, {wall - total:.1f} ms between them.\n")
    print("| layer type | kernel | layers | ms | share |\n|---|---|---:|---:|---:|")
    for (kind, kernel), times in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {kind} | {kernel} | {len(times)} | {sum(times):.2f} | "
              f"{sum(times) / total:.0%} |")
    print("\n| slowest layers | type | ms |\n|---|---|---:|")
    for p in sorted(layers, key=lambda p: -p.real_time.total_seconds())[: args.top]:
        print(f"| `{p.node_name[:60]}` | {p.node_type} | "
              f"{p.real_time.total_seconds() * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
