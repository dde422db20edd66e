"""Would int8 GuideNet pay on this CPU? Post-training quantization (NNCF) against torch f32.

Not a wsiseg feature: a measurement for issue 17's "8× TIAToolbox" goal, which bf16 cannot
reach on a CPU without AMX (docs/benchmarks.md §8, session 16). NNCF is not a wsiseg
dependency; install it into the environment first (the lockfile does not hold it):

    uv pip install nncf==3.4.0
    uv run --no-sync python scripts/bench/int8.py --weights trained-guidenet.safetensors

For each calibration set (tiles of a generated slide, and the real CAMELYON H&E patches)
GuideNet is quantized with ``nncf.quantize`` (MIXED preset) and run by OpenVINO; on three
sets of real tiles (the CAMELYON patches, the two H&E images without masks, the CMU-1 SVS
at 2 µm/px) it prints the largest probability difference from torch f32 and the IoU of the
masks (p ≥ 0.5), with OpenVINO bf16 (wsiseg's default here) as the reference row, and the
speed of a batch of 16 at each precision. Use trained weights: a random network's
probabilities all lie near 0.5 and say little about the masks.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table  # noqa: E402
from common.args import default_cache  # noqa: E402
from common.slides import generated_slide  # noqa: E402

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
TILE_PX = 256


def tissue_tiles(rgb: np.ndarray, px: int = TILE_PX) -> list[np.ndarray]:
    """Non-overlapping ``px``² tiles of uint8 (H, W, 3) with ≥ 30 % non-white pixels."""
    tiles = []
    for y in range(0, rgb.shape[0] - px + 1, px):
        for x in range(0, rgb.shape[1] - px + 1, px):
            tile = rgb[y:y + px, x:x + px]
            if (tile.mean(axis=2) < 220).mean() > 0.3:
                tiles.append(np.ascontiguousarray(tile))
    return tiles


def read_rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1])


def at_working_mpp(rgb: np.ndarray, mpp: float, working_mpp: float) -> np.ndarray:
    factor = working_mpp / mpp
    size = (round(rgb.shape[1] / factor), round(rgb.shape[0] / factor))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def tile_sets(cache: Path, working_mpp: float) -> tuple[dict, dict]:
    """(calibration sets, evaluation sets): name → list of uint8 (256, 256, 3) tiles."""
    import openslide
    import tifffile

    slide = generated_slide(cache, (4096, 3072), 1.0).slide_path
    synthetic = at_working_mpp(tifffile.imread(slide, level=0), 1.0, working_mpp)
    camelyon = [t for p in sorted((REAL / "patches/he_tumor_masks/camelyon/images").glob("*"))
                for t in tissue_tiles(read_rgb(p))]
    no_mask = [t for name in ("histo.jpg", "target_image.png")
               for t in tissue_tiles(read_rgb(REAL / "patches/he_no_mask" / name))]
    svs = openslide.OpenSlide(REAL / "svs/cmu-1-small-region.svs")
    region = np.asarray(svs.read_region((0, 0), 0, svs.dimensions).convert("RGB"))
    cmu = tissue_tiles(at_working_mpp(region, float(svs.properties["openslide.mpp-x"]),
                                      working_mpp))
    calibration = {"generated slide": tissue_tiles(synthetic), "CAMELYON patches": camelyon}
    evaluation = {"CAMELYON": camelyon, "H&E, no mask": no_mask, "CMU-1 SVS": cmu}
    return calibration, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="GuideNet .safetensors")
    parser.add_argument("--cache", type=Path, default=default_cache(),
                        help="folder of generated slides, reused between runs")
    args = parser.parse_args(argv)

    import nncf
    import openvino as ov
    import torch

    from wsiseg.nets import load_weights, normalise_rgb, weights_card, weights_hash
    from wsiseg.runtime import cpu_has_bf16, torch_network
    from wsiseg.runtime_cache import cached_openvino_model

    card = weights_card(args.weights, role="guidenet")
    model = cached_openvino_model(args.weights, card, weights_hash(args.weights))
    module, _ = load_weights(args.weights, device="cpu")
    reference = torch_network(module, "cpu", card=card, precision="f32")
    calibration, evaluation = tile_sets(args.cache, card.working_mpp)
    core = ov.Core()
    hint = "bf16" if cpu_has_bf16() else "f32"

    def normalised(tile: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)[None]))
        return normalise_rgb(batch, card).numpy().astype(np.float32)

    def compiled(graph):
        return core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint})

    def ms_per_patch(net) -> float:
        batch = np.concatenate([normalised(t) for t in evaluation["CAMELYON"][:16]])
        net({0: batch})
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            net({0: batch})
            times.append(time.perf_counter() - t0)
        return 1000 * min(times) / len(batch)

    rows = []

    def evaluate(name: str, net, quantize_s: float | None) -> None:
        speed = ms_per_patch(net)
        for set_name, tiles in evaluation.items():
            worst, inter, union = 0.0, 0, 0
            for tile in tiles:
                x = normalised(tile)
                want, got = reference(x), net({0: x})[0]
                worst = max(worst, float(np.abs(want - got).max()))
                inter += int(((want >= 0.5) & (got >= 0.5)).sum())
                union += int(((want >= 0.5) | (got >= 0.5)).sum())
            rows.append([name, set_name, str(len(tiles)), f"{worst:.4f}",
                         f"{inter / max(union, 1):.4f}", f"{speed:.1f}",
                         "" if quantize_s is None else f"{quantize_s:.1f}"])

    evaluate(f"OpenVINO {hint} (wsiseg's precision; float input, default settings)",
             compiled(model), None)
    for name, tiles in calibration.items():
        t0 = time.perf_counter()
        quantized = nncf.quantize(model, nncf.Dataset(tiles, normalised),
                                  subset_size=min(300, len(tiles)),
                                  preset=nncf.QuantizationPreset.MIXED)
        evaluate(f"int8, calibrated on {name} ({len(tiles)} tiles)", compiled(quantized),
                 time.perf_counter() - t0)

    print(f"`{shlex.join(['scripts/bench/int8.py', *(argv or sys.argv[1:])])}`\n")
    print(f"nncf {nncf.__version__}, OpenVINO {ov.get_version()}, weights "
          f"{args.weights.name} (sha256 {weights_hash(args.weights)[:12]}), "
          f"torch f32 the reference\n")
    print(markdown_table(["network", "tiles", "n", "max abs Δp", "mask IoU vs torch",
                          "ms / patch (batch 16)", "quantize s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
