"""GuideNet and RefineNet (split of the former nets.py under way)."""

from wsiseg.nets.weights import *  # noqa: F403
