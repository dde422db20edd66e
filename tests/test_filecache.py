"""Tests of wsiseg.filecache: an array read from files is kept while the files are the same."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zarr

from wsiseg import filecache


@pytest.fixture
def stored(tmp_path, monkeypatch):
    """(folder of a zarr array, a reader counting its reads, the reads)."""
    monkeypatch.setattr(filecache, "SETTLED_S", 0.0)
    folder = tmp_path / "tissue"
    array = zarr.create_array(store=folder, shape=(8, 8), chunks=(8, 8), dtype="bool",
                              fill_value=False)
    array[2:5, 2:5] = True
    reads: list[int] = []

    def read() -> np.ndarray:
        reads.append(1)
        return np.asarray(zarr.open_array(folder, mode="r")[...])

    return folder, read, reads


def test_settled_files_are_read_once_and_the_array_is_read_only(stored) -> None:
    folder, read, reads = stored
    first = filecache.read_once(folder, read)
    again = filecache.read_once(folder, read)
    assert again is first and len(reads) == 1
    assert not first.flags.writeable and first.sum() == 9


def test_files_written_again_are_read_again(stored) -> None:
    folder, read, reads = stored
    filecache.read_once(folder, read)
    time.sleep(0.02)  # past a tick of the file times (the read above counts them settled)
    zarr.open_array(folder, mode="r+")[0, 0] = True
    assert filecache.read_once(folder, read).sum() == 10 and len(reads) == 2


def test_a_folder_made_anew_at_the_same_path_is_read_anew(stored, tmp_path) -> None:
    folder, read, reads = stored
    filecache.read_once(folder, read)
    os.rename(folder, tmp_path / "old")
    array = zarr.create_array(store=folder, shape=(8, 8), chunks=(8, 8), dtype="bool",
                              fill_value=False)
    array[...] = True
    assert filecache.read_once(folder, read).all() and len(reads) == 2


def test_files_not_settled_are_read_every_time(stored, monkeypatch) -> None:
    folder, read, reads = stored
    monkeypatch.setattr(filecache, "SETTLED_S", 3600.0)
    filecache.read_once(folder, read)
    filecache.read_once(folder, read)
    assert len(reads) == 2


def test_the_budget_drops_the_least_recently_used(stored, tmp_path, monkeypatch) -> None:
    folder, read, reads = stored
    monkeypatch.setattr(filecache, "BUDGET_BYTES", 100)  # one 8×8 bool mask (64 B) fits
    other = tmp_path / "other"
    zarr.create_array(store=other, shape=(8, 8), chunks=(8, 8), dtype="bool",
                      fill_value=False)[...] = True
    filecache.read_once(folder, read)
    filecache.read_once(other, lambda: np.asarray(zarr.open_array(other, mode="r")[...]))
    filecache.read_once(folder, read)
    assert len(reads) == 2
