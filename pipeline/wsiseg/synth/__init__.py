"""Generated H&E-like slides with ground truth (split of the former synth.py under way)."""

from wsiseg.synth.render import (  # noqa: F401
    SyntheticSlide,
    read_truth_mask,
    synthesize_cohort,
    synthesize_slide,
)
