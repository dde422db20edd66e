"""Generated H&E-like slides with ground truth, for tests, the demo and the benchmarks.

``layout`` draws a slide's low-resolution maps, ``render`` its tiles, ``write`` the pyramidal
TIFF, ``truth`` the tumor mask and GeoJSON (and reads the mask back), ``generate`` puts them
together for one slide or a cohort.
"""

from wsiseg.synth.generate import TRUTH_DIR, SyntheticSlide, synthesize_cohort, synthesize_slide
from wsiseg.synth.truth import read_truth_mask

__all__ = [
    "TRUTH_DIR",
    "SyntheticSlide",
    "read_truth_mask",
    "synthesize_cohort",
    "synthesize_slide",
]
