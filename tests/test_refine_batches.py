"""The RefineNet refiner holds one batch of encoded windows at a time (issue 15, point 9)."""

from __future__ import annotations

import gc
import weakref

import numpy as np

import wsiseg.refine.refiners as refine_module
from wsiseg.nets import init_weights, load_weights
from wsiseg.refine import refinenet_refiner
from wsiseg.runtime import torch_network

from conftest import CMU_SVS, real
from storekit import blobs, run_store


def test_refinenet_refiner_never_holds_more_than_one_batch(tmp_path, small_workflow,
                                                           monkeypatch):
    store = run_store(real(CMU_SVS), tmp_path / "out", "cmu", small_workflow, blobs)
    weights = tmp_path / "r.safetensors"
    init_weights("refinenet", weights, seed=2)
    model, card = load_weights(weights, role="refinenet")
    window_px, batch_size = 64, 3
    rows, cols = store.frame.working_shape
    windows = [(r, c) for r in range(0, rows - window_px, 150)
               for c in range(0, cols - window_px, 150)][:10]
    assert len(windows) == 10

    encoded: list[weakref.ref] = []  # every encoded window, alive or not
    original = refine_module.encode_refine_input

    def encode(*args, **kwargs):
        x = original(*args, **kwargs)
        encoded.append(weakref.ref(x))
        return x

    monkeypatch.setattr(refine_module, "encode_refine_input", encode)
    net = torch_network(model, "cpu", card=card)
    seen: list[tuple[int, int, int]] = []  # per network call: batch, encoded so far, alive

    def counting(x):
        gc.collect()
        seen.append((len(x), len(encoded), sum(r() is not None for r in encoded)))
        return net(x)

    counted = torch_network(model, "cpu", card=card)
    counted._run = counting
    probs = refinenet_refiner(counted, batch_size)(store, windows, window_px)

    assert [n for n, _, _ in seen] == [3, 3, 3, 1]
    for k, (_, so_far, alive) in enumerate(seen):
        # encoding runs ahead by at most the batch being refined ...
        assert so_far <= (k + 1) * batch_size
        # ... and no encoded window outlives its batch (the stacked batch is a copy)
        assert alive <= batch_size
    assert len(probs) == 10 and all(p.shape == (window_px, window_px) for p in probs)
    # batching changes nothing: the same as one window at a time
    one_by_one = refinenet_refiner(net, 1)(store, windows, window_px)
    for a, b in zip(probs, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
