"""GuideNet on OpenVINO with a dynamic input shape (as wsiseg compiles it) or static ones.

A dynamic graph lays out its buffers when it first meets a shape, a static one when it is
compiled. This prints, for each graph (``dyn``: ``[?, 3, P, P]`` as ``wsiseg run`` compiles
it; ``B``: static ``[B, 3, P, P]``), the compile and the first batch of ``--batch`` patches
in a fresh ``openvino.Core``, then the milliseconds per patch over 64 patches in batches of
the graph's size, the graphs taken in turns ``--repeat`` times (median). Random uint8
patches, the GuideNet card's patch size, wsiseg's compile properties.

    .venv/bin/python scripts/bench/static_shapes.py [--guidenet W] [--static 16 4 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guidenet", type=Path, help="GuideNet weights (default: random)")
    parser.add_argument("--static", type=int, nargs="*", default=[16, 4, 1],
                        help="static batch sizes to compare with the dynamic graph")
    parser.add_argument("--batch", type=int, default=16, help="the dynamic graph's batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args(argv)

    import openvino as ov

    from wsiseg.nets import weights_card, weights_hash
    from wsiseg.runtime import cpu_has_bf16
    from wsiseg.runtime_cache import cached_openvino_model
    from wsiseg.runtime_openvino import _with_rgb_input, compile_config

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.guidenet or common.guidenet_weights(Path(tmp) / "g.safetensors")
        card = weights_card(weights, role="guidenet")
        base = _with_rgb_input(cached_openvino_model(weights, card, weights_hash(weights)),
                               card)
    precision = "bf16" if cpu_has_bf16() else "f32"
    config = compile_config(precision, args.threads)
    size = card.patch_px
    x = np.random.default_rng(0).integers(0, 256, (64, 3, size, size), dtype=np.uint8)
    graphs = {"dyn": None, **{str(b): b for b in args.static}}
    requests, first_rows = {}, []
    for name, batch in graphs.items():
        model = base.clone()
        if batch is not None:
            model.reshape([batch, 3, size, size])
        step = batch or args.batch
        t0 = time.perf_counter()
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        t1 = time.perf_counter()
        for i in range(0, args.batch, step):  # the first batch of a run, in graph calls
            request.infer({0: x[i:i + step]}, share_inputs=True)
        t2 = time.perf_counter()
        requests[name] = (request, step)
        first_rows.append([name, f"{t1 - t0:.3f}", f"{(t2 - t1) * 1e3:.0f}"])
    per_patch: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(args.repeat):
        for name, (request, step) in requests.items():
            t0 = time.perf_counter()
            for i in range(0, len(x) - step + 1, step):
                request.infer({0: x[i:i + step]}, share_inputs=True)
            per_patch[name].append((time.perf_counter() - t0) * 1e3 / (len(x) // step * step))
    for row in first_rows:
        times = per_patch[row[0]]
        row += [f"{np.median(times):.1f}", f"{min(times):.1f}–{max(times):.1f}"]
    common.print_report(
        f"GuideNet on OpenVINO {precision}: dynamic against static input shapes", [("",
            common.markdown_table(["graph (batch)", "compile s",
                                   f"first {args.batch} patches, ms", "ms / patch (median)",
                                   "range"], first_rows))],
        [f"{args.threads} threads, {size}² patches, OpenVINO {ov.get_version()}."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
