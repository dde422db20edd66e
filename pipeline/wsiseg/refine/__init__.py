"""One refine round: scribbles in, the windows they touch recomputed, contours out.

1. The QuPath export is read (:mod:`wsiseg.qupath`) and its classes mapped to tumor /
   non-tumor / ignore. Our own contours are not scribbles, except where the pathologist
   edited one (by geometry, :mod:`wsiseg.edits`): the area added counts as tumor, the area
   removed as non-tumor, and a contour of the latest round deleted from an export that holds
   others as non-tumor.
2. Scribbles are rasterised at the working resolution and merged into the store's
   ``scribbles`` array; only pixels that are new count.
3. Affected windows: a global grid of ``window_px`` windows with stride
   ``window_px − 2·context_px``, whose *cores* (the window minus ``context_px`` on each
   side) tile the slide; a window is affected when its core holds a new scribble pixel, so
   every new scribble is seen with at least ``context_px`` of context.
4. Each window is refined by RefineNet (RGB, ``guide``, FG/BG distance maps from all
   accumulated scribbles, encoded by :func:`wsiseg.scribbles.encode.encode_refine_input`,
   the function training uses) or by scikit-image's random walker, and blended into
   ``refined`` with feathered edges. ``guide`` is never modified.
5. Contours are recomputed for the affected region only, and the round's GeoJSON written.

Costs follow the scribbled area, not the slide. Every round keeps what it overwrote
(:mod:`wsiseg.rounds`), so ``wsiseg undo`` restores the previous round exactly.

Modules: :mod:`~wsiseg.refine.scribbles` (1–2), :mod:`~wsiseg.refine.windows` (3, blending),
:mod:`~wsiseg.refine.refiners` (4), :mod:`~wsiseg.refine.round` (the round as a transaction).
"""

from wsiseg.refine.refiners import Refiner, randomwalk_refiner, refinenet_refiner
from wsiseg.refine.round import RoundResult, refine_round
from wsiseg.refine.scribbles import ScribbleSet, load_scribbles, rasterize_new
from wsiseg.refine.windows import (
    affected_windows,
    blend_windows,
    feather_weight,
    read_window,
    window_regions,
)

__all__ = [
    "Refiner",
    "RoundResult",
    "ScribbleSet",
    "affected_windows",
    "blend_windows",
    "feather_weight",
    "load_scribbles",
    "randomwalk_refiner",
    "rasterize_new",
    "read_window",
    "refine_round",
    "refinenet_refiner",
    "window_regions",
]
