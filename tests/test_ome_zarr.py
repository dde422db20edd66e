"""The slide store is a real OME-Zarr (issue 18): an independent reader, ome-zarr-py's, opens
the store `wsiseg tile` writes as one RGB image in micrometres with wsiseg's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ome_zarr.axes import Axes
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Node, Reader

from wsiseg.cli import main
from wsiseg.refine import read_window
from wsiseg.store import GLASS_RGB, SlideStore

from conftest import CMU_SVS, real


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store of the smallest real slide with tissue, as `wsiseg tile` writes it."""
    out = tmp_path_factory.mktemp("ome") / "out"
    assert main(["tile", str(real(CMU_SVS)), "--out", str(out)]) == 0
    return out / "cmu-1-small-region.zarr"


def _image_node(path: Path):
    """ome-zarr-py's location of the store and its one multiscales image node."""
    location = parse_url(str(path))
    assert location is not None, "ome-zarr-py does not see a zarr group"
    assert location.version == "0.5"
    nodes: list[Node] = [n for n in Reader(location)()
                         if any(isinstance(spec, Multiscales) for spec in n.specs)]
    assert len(nodes) == 1
    return location, nodes[0]


def test_ome_zarr_py_reads_the_store_as_an_rgb_image_in_micrometres(tiled):
    store = SlideStore.open(tiled, mode="r")
    location, node = _image_node(tiled)

    # Axes by NGFF 0.5's rules as ome-zarr-py checks them (its reader takes a multiscales
    # without its own "version" by 0.1's rules, which accept any axis order): the old
    # (y, x, c) fails here, "'space' axes must come after 'channel'".
    axes = node.metadata["axes"]
    Axes(axes, fmt=location.fmt)
    assert [(a["name"], a["type"]) for a in axes] == [
        ("c", "channel"), ("y", "space"), ("x", "space")]
    assert [a.get("unit") for a in axes] == [None, "micrometer", "micrometer"]

    # One scale level: 1 per channel, the working µm/px on y and x.
    transforms = node.metadata["coordinateTransformations"]
    location.fmt.validate_coordinate_transformations(3, 1, transforms)
    mpp = store.frame.working_mpp
    assert mpp == 2.0
    assert transforms == [[{"type": "scale", "scale": [1.0, mpp, mpp]}]]

    # The pixels: (3, rows, cols) uint8, one chunk holding the three channels of a tile.
    (data,) = node.data
    rows, cols = store.frame.working_shape
    assert data.shape == (3, rows, cols) and data.dtype == np.uint8
    assert data.chunksize == (3, store.chunk_px, store.chunk_px)
    # ... shown as red, green, blue.
    assert node.metadata["channel_names"] == ["red", "green", "blue"]
    assert node.metadata["colormap"] == [[[0, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 1, 0]],
                                         [[0, 0, 0], [0, 0, 1]]]

    # A region across chunk borders and the slide's edge reads what wsiseg itself reads.
    chunk = store.chunk_px
    r0, c0, size = chunk - 100, chunk - 150, 300
    theirs = np.asarray(data[:, r0 : r0 + size, c0 : c0 + size].compute())
    ours = read_window(store["image"], (r0, c0), size)
    h, w = min(size, rows - r0), min(size, cols - c0)
    assert theirs.shape == (3, h, w)
    np.testing.assert_array_equal(theirs, ours[:, :h, :w])
    assert (ours[:, h:, :] == GLASS_RGB).all() and (ours[:, :, w:] == GLASS_RGB).all()
    assert theirs.std() > 10  # tissue, not a blank region where any reader would agree
