"""Measurement phases run as child processes, each with a fresh interpreter and its own memory.

The benchmark scripts run them through :func:`run_phase`, which starts::

    python -m common --phase pipeline '<json arguments>'

with ``scripts/bench`` on ``PYTHONPATH``; the child prints one JSON line (the phase's result)
as the last line of stdout.

Phases
------
``network``     GuideNet alone on the tissue patches of a store, pre-extracted into memory
                (on the device, for CUDA), same batch size, eval / inference mode; bf16
                autocast and channels-last on CUDA, exactly as :mod:`wsiseg.infer` runs it.
``pipeline``    ``wsiseg run`` end to end (``wsiseg.cli.main``), with timers around the
                package's stages and, on CUDA, the GPU utilisation sampled in a thread.
``tiatoolbox``  TIAToolbox's ``SemanticSegmentor`` on the same slide with the same network
                (our smp U-Net wrapped in a TIAToolbox ``ModelABC``), patch, stride and mpp.
``tile``        ``wsiseg tile`` of one slide (``wsiseg.tiling.tile_slide``) with N workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.sampling import MIB, GpuUtilisation, PeakRSS
from common.timers import StageTimer

BENCH_DIR = Path(__file__).resolve().parents[1]


@dataclass
class ChildResult:
    data: dict[str, Any]
    wall_s: float  # including interpreter start and imports
    peak_rss_mib: float  # the child's own sample (see PeakRSS), after its imports
    returncode: int
    stderr_tail: str


def process_cpu_s(children: bool = False) -> float:
    """CPU seconds this process has used, all threads, user + system; ``children``: plus its
    child processes that have ended (e.g. DataLoader workers)."""
    who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, who))


def fastest(results: list[ChildResult]) -> ChildResult:
    """The run with the fewest seconds (the least disturbed by other load), else the first."""
    timed = [r for r in results if "seconds" in r.data]
    return min(timed, key=lambda r: r.data["seconds"]) if timed else results[0]


def run_phase(phase: str, *, command: Sequence[str] = ("-m", "common"),
              env: dict[str, str] | None = None, **kwargs: Any) -> ChildResult:
    """Run ``python COMMAND --phase PHASE '<json kwargs>'`` (default ``-m common``) in a fresh
    interpreter, ``env`` added to the environment; read its one-line JSON result."""
    argv = [sys.executable, *command, "--phase", phase, json.dumps(kwargs)]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), path]))}
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                              env=env)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read()[-3000:]
    data: dict[str, Any] = {}
    for line in reversed(proc.stdout.strip().splitlines()):
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(line)
            break
    if proc.returncode != 0 and not data:
        data = {"error": f"exit status {proc.returncode}: {tail.strip().splitlines()[-1:]}"}
    return ChildResult(data, wall, float(data.get("peak_rss_mib", 0.0)), proc.returncode, tail)


def _device(name: str):
    from wsiseg.infer import resolve_device

    return resolve_device(name)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def store_patches(store_path: Path, patch_px: int, stride_px: int):
    """The tissue patches ``wsiseg run`` computes for a store: origins and their pixels.

    Returns
    -------
    origins : ndarray of int64, shape (N, 2)
    pixels : ndarray of uint8, shape (N, 3, P, P)
        Channel first, as the store holds them and as infer.py batches them.
    """
    import numpy as np

    from wsiseg.infer import patch_origins, tissue_patch_mask
    from wsiseg.store import SlideStore

    store = SlideStore.open(store_path, mode="r")
    image = store["image"]
    shape = tuple(int(n) for n in image.shape[1:])
    origins = patch_origins(shape, patch_px, stride_px)
    origins = origins[tissue_patch_mask(origins, patch_px, store.tissue_mask, shape)]
    pixels = np.full((len(origins), 3, patch_px, patch_px), 255, np.uint8)  # glass
    band = store.chunk_px
    for r0 in range(0, shape[0], band):  # one band of rows at a time: each chunk read once
        sel = np.nonzero((origins[:, 0] >= r0) & (origins[:, 0] < r0 + band))[0]
        if sel.size == 0:
            continue
        rows = np.asarray(image[:, r0 : min(shape[0], r0 + band + patch_px)])
        for i in sel:
            r, c = int(origins[i, 0]) - r0, int(origins[i, 1])
            patch = rows[:, r : r + patch_px, c : c + patch_px]
            pixels[i, :, : patch.shape[1], : patch.shape[2]] = patch
    return origins, pixels


def phase_network(store: str, weights: str, device: str, batch_size: int,
                  patch_px: int, stride_px: int, repeats: int = 1) -> dict[str, Any]:
    """GuideNet alone on the store's tissue patches (pre-extracted; on the device for CUDA)."""
    import torch

    from wsiseg.infer import _autocast_dtype, prepare_model
    from wsiseg.nets import load_weights, normalise_rgb

    dev = _device(device)
    model, card = load_weights(Path(weights), role="guidenet", device=dev)
    prepare_model(model, dev)
    t0 = time.perf_counter()
    _, pixels = store_patches(Path(store), patch_px, stride_px)
    extract_s = time.perf_counter() - t0
    patches = torch.from_numpy(pixels).to(dev)  # (N, 3, P, P) uint8, device-resident
    dtype = _autocast_dtype(dev)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        # uint8 to channels-last, then normalised in that layout: as infer.py feeds torch
        x = normalise_rgb(batch.contiguous(memory_format=torch.channels_last), card)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        return torch.sigmoid(out[:, 0].float())

    n = len(patches)
    with torch.inference_mode():
        forward(patches[:batch_size])  # warm-up (cuDNN autotuning, allocator, oneDNN)
        _sync(dev)
        times, cpu = [], []
        for _ in range(max(1, repeats)):
            t0, cpu0 = time.perf_counter(), process_cpu_s()
            for i in range(0, n, batch_size):
                forward(patches[i : i + batch_size])
            _sync(dev)
            times.append(time.perf_counter() - t0)
            cpu.append(process_cpu_s() - cpu0)
    return {"patches": n, "seconds": min(times), "all_seconds": times,
            "cpu_s": cpu[times.index(min(times))],
            "extract_s": extract_s, "device": str(dev), "autocast": str(dtype),
            "batch_size": batch_size}


def _instrument_pipeline(timer: StageTimer) -> None:
    """Timers around the stages of ``wsiseg run`` (see each label)."""
    import wsiseg.cohort.one_slide
    import wsiseg.contours
    import wsiseg.infer
    import wsiseg.outputs
    import wsiseg.rounds
    import wsiseg.slide.reader
    import wsiseg.slide.resample
    import wsiseg.tiling

    timer.wrap(wsiseg.tiling, "tile_slide", "tile (wall)")
    timer.wrap(wsiseg.tiling.BackgroundTiling, "finish", "wait for tiling after inference (wall)")
    timer.wrap(wsiseg.tiling, "detect_tissue", "tissue mask (wall)")
    timer.wrap(wsiseg.tiling, "read_box", "read+resample (thread-s)")
    timer.wrap(wsiseg.slide.reader.OpenSlideReader, "read_region", "read_region (thread-s)")
    timer.wrap(wsiseg.slide.resample, "resample", "resample (thread-s)")
    timer.wrap(wsiseg.infer, "infer_to_store", "infer (wall)", keep_result=True)
    timer.wrap(wsiseg.cohort.one_slide, "publish_run", "publish (wall)")
    timer.wrap(wsiseg.outputs, "tumor_polygons_and_means", "contours (+ mean probabilities)")
    timer.wrap(wsiseg.contours.RowStreamTracer, "_trace_row",
               "contours beside inference (thread-s)")
    timer.wrap(wsiseg.contours.RowStreamTracer, "result", "contours: rest after inference")
    timer.wrap(wsiseg.rounds, "annotations_for", "annotations")  # rounds writes the record
    timer.wrap(wsiseg.outputs, "thumbnail_image", "thumbnail read (thread-s, beside contours)")
    timer.wrap(wsiseg.outputs, "write_thumbnail", "thumbnail draw + write")


def phase_pipeline(slides: list[str], out: str, weights: str, device: str,
                   sample_gpu: bool = False) -> dict[str, Any]:
    """``wsiseg run SLIDE... --out OUT --guidenet W --device D`` in this process, timed.

    The packages are imported before the clock starts (``segmentation_models_pytorch`` pulls
    in timm, torchvision and torch._dynamo: seconds, more where no bytecode is cached); loading
    the weights, everything after, is counted.
    """
    import csv

    import segmentation_models_pytorch  # noqa: F401  (imports are not the run's cost)

    import wsiseg.cli
    import wsiseg.nets

    timer = StageTimer()
    _instrument_pipeline(timer)
    timer.wrap(wsiseg.nets, "load_weights", "load weights (wall)")
    argv = ["run", *slides, "--out", out, "--guidenet", weights, "--device", device]
    gpu = GpuUtilisation() if sample_gpu else contextlib.nullcontext()
    with PeakRSS(children=False) as rss, gpu:
        t0, cpu0 = time.perf_counter(), process_cpu_s()
        status = wsiseg.cli.main(argv)
        seconds, cpu_s = time.perf_counter() - t0, process_cpu_s() - cpu0
    timer.restore()
    with (Path(out) / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    stats = [vars(s) for s in timer.results.get("infer (wall)", [])]
    result: dict[str, Any] = {
        "status": status, "seconds": seconds, "cpu_s": cpu_s, "slides": rows,
        "stages": timer.as_dict(),
        "infer_stats": stats, "peak_rss_mib": rss.peak_mib, "start_rss_mib": rss.start_mib,
    }
    if sample_gpu:
        infer_spans = timer.spans.get("infer (wall)", [])
        result["gpu_util"] = {
            "source": gpu.source, "error": gpu.error, "samples": len(gpu.samples),
            "mean_run": gpu.mean(), "mean_infer": gpu.mean(infer_spans),
            "mean_outside_infer": _mean_outside(gpu.samples, infer_spans),
        }
        import torch

        if torch.cuda.is_available():
            result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


def _mean_outside(samples: list[tuple[float, float]],
                  spans: Sequence[tuple[float, float]]) -> float | None:
    values = [u for t, u in samples if not any(a <= t <= b for a, b in spans)]
    return sum(values) / len(values) if values else None


def tiatoolbox_model(weights: Path, device: str):
    """Our GuideNet as a TIAToolbox ``ModelABC``: same network, same normalisation; on CUDA
    the same bf16 autocast and channels-last layout as :mod:`wsiseg.infer`.

    ``infer_batch`` returns (N, P, P, 2) float32 ``[1 - p, p]``, so TIAToolbox's argmax gives
    the tumor mask and its probability map holds ``p`` in channel 1.
    """
    import torch
    from tiatoolbox.models.architecture.utils import argmax_last_axis
    from tiatoolbox.models.models_abc import ModelABC

    from wsiseg.infer import _autocast_dtype
    from wsiseg.nets import load_weights, normalise_rgb

    net, card = load_weights(weights, role="guidenet")
    if torch.device(device).type == "cuda":
        net = net.to(memory_format=torch.channels_last)  # kept by TIAToolbox's .to(device)

    class GuideNetForTiatoolbox(ModelABC):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.card = card
            self.class_dict = {0: "background", 1: "tumor"}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        @staticmethod
        def postproc(image: Any) -> Any:
            """Probabilities (H, W, 2) → class labels (H, W), as TIAToolbox's own UNet."""
            return argmax_last_axis(image=image)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *,
                        device: str) -> Any:
            inner = getattr(model, "module", model)
            dev = torch.device(device)
            inner.eval()
            x = batch_data.to(dev, non_blocking=True)  # (N, P, P, 3) uint8 from the loader
            x = normalise_rgb(x.permute(0, 3, 1, 2), inner.card)
            dtype = _autocast_dtype(dev)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype,
                                                        enabled=dtype is not None):
                p = torch.sigmoid(model(x)[:, 0].float())
            return torch.stack([1 - p, p], dim=-1).cpu().numpy()

    return GuideNetForTiatoolbox()


def phase_tiatoolbox(slide: str, out: str, weights: str, device: str, batch_size: int,
                     patch_px: int, stride_px: int, mpp: float, workers: int,
                     output_type: str = "qupath", stub_simpleitk: bool = False) -> dict[str, Any]:
    """TIAToolbox 2.1 ``SemanticSegmentor.run`` in WSI mode on the slide, timed by stage.

    ``stub_simpleitk``: where SimpleITK is missing (its wheel alone is 50 MB), put an empty
    module in its place. TIAToolbox imports it at import time for slide registration only,
    which ``SemanticSegmentor`` never calls; the stub fails loudly if anything does use it.
    """
    stubbed = False
    if stub_simpleitk:
        try:
            import SimpleITK  # noqa: F401
        except ImportError:
            import types

            stub = types.ModuleType("SimpleITK")

            def _missing(name: str) -> Any:
                raise AttributeError(f"SimpleITK.{name}: SimpleITK is stubbed in this benchmark")

            stub.__getattr__ = _missing  # type: ignore[method-assign]
            sys.modules["SimpleITK"] = stub
            stubbed = True
    try:
        import tiatoolbox
        from tiatoolbox import rcParam
        from tiatoolbox.models.engine.io_config import IOSegmentorConfig
        from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
        from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader
    except Exception as exc:  # ImportError, or a missing dependency of TIAToolbox's imports
        return {"skipped": f"TIAToolbox cannot be imported here ({type(exc).__name__}: {exc})"}

    dev = _device(device)
    # torch.compile off: (a) and (b) run the network uncompiled; compiling is a separate
    # question (and TIAToolbox enables it only on V100/A100/H100).
    rcParam["torch_compile_mode"] = "disable"
    model = tiatoolbox_model(Path(weights), str(dev))
    engine = SemanticSegmentor(model=model, batch_size=batch_size, num_workers=workers,
                               device=str(dev), verbose=False)
    timer = StageTimer()
    for name in ("get_dataloader", "infer_wsi", "post_process_wsi", "save_predictions"):
        timer.wrap(engine, name, keep_result=name == "get_dataloader")
    resolution = [{"units": "mpp", "resolution": mpp}]
    ioconfig = IOSegmentorConfig(
        input_resolutions=resolution, output_resolutions=resolution,
        patch_input_shape=(patch_px, patch_px), patch_output_shape=(patch_px, patch_px),
        stride_shape=(stride_px, stride_px), save_resolution=resolution[0],
    )
    with PeakRSS() as rss:
        t0, cpu0 = time.perf_counter(), process_cpu_s(children=True)
        # TIAToolbox's WSIReader.open takes a generic tiled TIFF for a plain image
        # (VirtualWSIReader: the whole level 0 in memory, no mpp); open it with OpenSlide,
        # as TIAToolbox opens SVS/NDPI/MRXS scans, so both sides read the same pyramid.
        reader = OpenSlideWSIReader(Path(slide))
        output = engine.run([reader], patch_mode=False, ioconfig=ioconfig,
                            save_dir=Path(out), overwrite=True, output_type=output_type,
                            return_probabilities=True, auto_get_mask=True)
        seconds = time.perf_counter() - t0
        cpu_s = process_cpu_s(children=True) - cpu0  # its DataLoader workers included
    loaders = timer.results.get("get_dataloader", [])
    patches = sum(len(dl.dataset) for dl in loaders)
    return {"seconds": seconds, "cpu_s": cpu_s, "patches": patches,
            "stages": timer.as_dict(), "version": tiatoolbox.__version__, "workers": workers,
            "device": str(dev),
            "output_type": output_type, "outputs": [str(v) for v in dict(output).values()],
            "simpleitk_stubbed": stubbed,
            "peak_rss_mib": rss.peak_mib}


def phase_tile(slide: str, store: str, workers: int) -> dict[str, Any]:
    """``wsiseg tile`` of one slide into a fresh store with ``workers`` threads."""
    import numpy as np

    import wsiseg.slide.reader
    import wsiseg.slide.resample
    import wsiseg.tiling
    from wsiseg.config import load_workflow

    timer = StageTimer()
    timer.wrap(wsiseg.tiling, "detect_tissue", "tissue mask (wall)")
    timer.wrap(wsiseg.slide.reader.OpenSlideReader, "read_region", "read_region (thread-s)")
    timer.wrap(wsiseg.slide.resample, "resample", "resample (thread-s)")
    wf = load_workflow()
    start_mib = PeakRSS().sample_mib()
    with PeakRSS(children=False) as rss:
        t0 = time.perf_counter()
        result = wsiseg.tiling.tile_slide(slide, store, wf, workers=workers)
        seconds = time.perf_counter() - t0
    timer.restore()
    s = result.store
    rows, cols = s.frame.working_shape
    chunk = s.chunk_px
    done = np.asarray(s["tiled"][...], bool)
    # Working pixels actually written: the tissue chunks, clipped at the slide's edges.
    heights = np.minimum(chunk, rows - np.arange(done.shape[0]) * chunk)
    widths = np.minimum(chunk, cols - np.arange(done.shape[1]) * chunk)
    written = int((done * np.outer(heights, widths)).sum())
    return {"seconds": seconds, "working_px": rows * cols, "written_px": written,
            "chunks": result.chunks_total, "chunk_px": chunk, "workers": workers,
            "stages": timer.as_dict(), "start_rss_mib": start_mib, "peak_rss_mib": rss.peak_mib,
            "working_shape": [rows, cols]}


PHASES: dict[str, Callable[..., dict[str, Any]]] = {
    "network": phase_network, "pipeline": phase_pipeline, "tiatoolbox": phase_tiatoolbox,
    "tile": phase_tile,
}


def child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=sorted(PHASES), required=True)
    parser.add_argument("arguments", help="JSON object of the phase's keyword arguments")
    args = parser.parse_args(argv)
    with PeakRSS() as rss:
        result = PHASES[args.phase](**json.loads(args.arguments))
    result.setdefault("peak_rss_mib", rss.peak_mib)  # phases that sample their own keep it
    print(json.dumps(result, default=str), flush=True)
    return 0
