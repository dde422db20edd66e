"""Many slides: slide ids, the per-slide run on Dask distributed, ledger, summary, report.

A slide is *done* only when its store says so and all of its outputs exist; a rerun skips
done slides (``--force`` redoes them). One slide's failure never stops the others: it
becomes a row of ``summary.csv`` with a one-line reason, and the exit status is 1.

Scale-out: one Dask task per slide (tiling, GuideNet, contours and outputs all run inside the
worker). By default a LocalCluster sized to the machine is started and closed by the run (one
worker per GPU, each pinned to its device and carrying a ``GPU`` resource; on CPU one worker
per 4 cores and 3 GiB); ``--scheduler ADDRESS`` joins an existing cluster instead. Each worker
process loads GuideNet once per weights file and device. A worker that dies mid-slide has the
slide retried on another worker; a slide whose worker dies twice is failed with its reason.
The driving process alone writes ``ledger.json`` (workers send a ``start`` event), and writes
``summary.csv`` and ``report.html``. Outputs go to a local path or ``file://`` URL that every
worker can reach (a shared filesystem on a multi-machine cluster), or to any fsspec URL
(``s3://``, ``gs://``, ...): then each slide runs into a local staging directory of its worker
and is uploaded once finished (:mod:`wsiseg.destination`).

Modules: :mod:`~wsiseg.cohort.rows` (options, summary rows), :mod:`~wsiseg.cohort.ids` (slide
ids), :mod:`~wsiseg.cohort.one_slide` (tile → GuideNet → contours → files, one row),
:mod:`~wsiseg.cohort.worker` (a slide task inside a worker), :mod:`~wsiseg.cohort.cluster`
(Dask distributed), :mod:`~wsiseg.cohort.driver` (ledger, summary, report, the run).
"""

from wsiseg.atomic import ensure_out_dir
from wsiseg.cohort.driver import print_status, run_cohort, tile_cohort
from wsiseg.cohort.ids import assign_slide_ids
from wsiseg.cohort.one_slide import publish_run, run_one, slide_outputs
from wsiseg.cohort.rows import SUMMARY_FIELDS, RunOptions, SlideRow, write_summary

__all__ = [
    "SUMMARY_FIELDS",
    "RunOptions",
    "SlideRow",
    "assign_slide_ids",
    "ensure_out_dir",
    "print_status",
    "publish_run",
    "run_cohort",
    "run_one",
    "slide_outputs",
    "tile_cohort",
    "write_summary",
]
