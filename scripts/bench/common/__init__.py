"""Shared helpers of the benchmark scripts, one module per thing they offer.

Not a test module and not part of the package. The scripts beside this folder import it as
``common`` (they put their own folder on ``sys.path``) and use the names below:

- :mod:`common.args`      ``--size WxH``, ``--cache``, ``--work``, ``--seed``; scratch folders
- :mod:`common.slides`    the slide cache (generated slides drawn once), copies, random weights
                          (RefineNet's below the threshold everywhere)
- :mod:`common.sampling`  peak memory (RSS + children's USS), GPU use and CPU by thread,
                          sampled in a thread
- :mod:`common.timers`    stage timers around the package's functions
- :mod:`common.tables`    the report: command line, machine, Markdown tables, stage rows
- :mod:`common.phases`    measurement phases, each in a fresh child process
"""

from common.args import add_common_args, default_cache, parse_size, scratch
from common.phases import (
    ChildResult,
    fastest,
    phase_pipeline,
    process_cpu_s,
    run_phase,
    store_patches,
)
from common.sampling import MIB, GpuUtilisation, PeakRSS, ThreadCPU
from common.slides import (
    generated_slide,
    guidenet_weights,
    mosaic_slide,
    refinenet_weights,
    slide_copies,
    trained_refinenet,
)
from common.tables import (
    REPO,
    command_line,
    fmt,
    log,
    machine_info,
    markdown_table,
    print_report,
    stage_rows,
)
from common.timers import StageTimer

__all__ = [
    "MIB",
    "REPO",
    "ChildResult",
    "GpuUtilisation",
    "PeakRSS",
    "StageTimer",
    "ThreadCPU",
    "add_common_args",
    "command_line",
    "default_cache",
    "fastest",
    "fmt",
    "generated_slide",
    "guidenet_weights",
    "log",
    "machine_info",
    "markdown_table",
    "mosaic_slide",
    "parse_size",
    "phase_pipeline",
    "print_report",
    "process_cpu_s",
    "refinenet_weights",
    "run_phase",
    "scratch",
    "slide_copies",
    "trained_refinenet",
    "stage_rows",
    "store_patches",
]
