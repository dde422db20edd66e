"""The two refiners of a window: RefineNet (batch by batch) and the random walker."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np

from wsiseg.refine.windows import read_window
from wsiseg.scribbles.encode import encode_refine_input
from wsiseg.store import SlideStore

log = logging.getLogger(__name__)



Refiner = Callable[[SlideStore, list[tuple[int, int]], int], list[np.ndarray]]


def refinenet_refiner(network, batch_size: int, tta: bool = False) -> Refiner:
    """Refine windows with RefineNet, batch by batch.

    Parameters
    ----------
    network : wsiseg.runtime.Network
        RefineNet loaded once by the caller (:func:`wsiseg.runtime.load_network`, OpenVINO or
        torch); its ``card`` says how to encode the windows.
    batch_size : int
        Windows encoded and refined at once: at most this many encoded windows (6 × P² float32
        each) exist at any time, whatever the number of windows, so a scribble across the
        whole slide costs the memory of one batch plus the ``(P, P)`` float32 results.
    tta : bool
        The mean over the 8 flips / 90° rotations of each window (8× the network's time).
    """
    import torch

    from wsiseg.infer import dihedral_mean

    card = network.card
    kind = str(card.scribble_encoding.get("kind", "distance"))
    max_distance = float(card.scribble_encoding.get("max_distance_px", 64.0))
    mean = tuple(card.normalisation["mean"])
    std = tuple(card.normalisation["std"])
    batch_size = max(1, int(batch_size))

    def encode(store: SlideStore, origin: tuple[int, int], window_px: int) -> np.ndarray:
        margin = math.ceil(max_distance)  # distances see scribbles just outside the window
        # (3, P, P) as stored → the (P, P, 3) view the encoding takes (no copy).
        rgb = np.moveaxis(read_window(store["image"], origin, window_px, margin), 0, -1)
        guide = read_window(store["guide"], origin, window_px, margin)
        scrib = read_window(store["scribbles"], origin, window_px, margin)
        x = encode_refine_input(rgb, guide, scrib, max_distance_px=max_distance,
                                scribble_kind=kind, mean=mean, std=std)
        return x[:, margin : margin + window_px, margin : margin + window_px]

    def refine(store: SlideStore, windows: list[tuple[int, int]], window_px: int):
        out: list[np.ndarray] = []
        for i in range(0, len(windows), batch_size):
            # Encoded, refined and dropped one batch at a time (np.stack copies the crops,
            # so the margins of this batch are freed with the list).
            batch = np.stack([encode(store, w, window_px) for w in windows[i : i + batch_size]])
            x = torch.from_numpy(batch)
            del batch
            with torch.inference_mode():
                prob = (dihedral_mean(lambda t: network(t)[:, 0], x) if tta
                        else network(x)[:, 0])
            out.extend(prob.float().cpu().numpy())
        return out

    return refine


def randomwalk_refiner(beta: float, confident_margin: float) -> Refiner:
    """The paper's RW baseline: scikit-image's random walker seeded by the scribbles and by
    confident GuideNet regions (probability within ``confident_margin`` of 0 or 1)."""
    from skimage.segmentation import random_walker

    def refine(store: SlideStore, windows: list[tuple[int, int]], window_px: int):
        out = []
        for origin in windows:
            rgb = read_window(store["image"], origin, window_px).astype(np.float32) / 255.0
            guide = read_window(store["guide"], origin, window_px).astype(np.float32) / 255.0
            scrib = read_window(store["scribbles"], origin, window_px)
            seeds = np.zeros(guide.shape, dtype=np.int32)
            seeds[guide >= 1.0 - confident_margin] = 1
            seeds[guide <= confident_margin] = 2
            seeds[scrib > 0] = 1  # scribbles override GuideNet's confidence
            seeds[scrib < 0] = 2
            if len(np.unique(seeds[seeds > 0])) < 2:
                # One label only: nothing to separate; follow the scribbles' class.
                out.append(np.full(guide.shape, 1.0 if (seeds == 1).any() else 0.0, np.float32))
                continue
            if not (seeds == 0).any():
                # Every pixel seeded (a confident GuideNet): nothing left to walk, and
                # random_walker would return its seeds' one-hot rather than probabilities.
                out.append((seeds == 1).astype(np.float32))
                continue
            with warnings.catch_warnings():
                # cg_j's tolerance lets probabilities stray ~1e-3 outside [0, 1]: clipped.
                warnings.simplefilter("ignore", UserWarning)
                prob = random_walker(rgb, seeds, beta=beta, mode="cg_j", tol=1e-3,
                                     channel_axis=0, return_full_prob=True)
            out.append(np.clip(prob[0], 0.0, 1.0).astype(np.float32))
        return out

    return refine
