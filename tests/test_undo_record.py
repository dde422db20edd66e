"""A round's undo record: one zarr array per round; records written as groups still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from wsiseg.errors import WsisegError
from wsiseg.undo_record import Backup, backup_regions, load_backup, save_backup


class _Store:
    """What the record needs of a slide store: its zarr group and its path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.group = zarr.open_group(path, mode="a")


def _backups(rng: np.random.Generator) -> list[Backup]:
    def pixels(rows, cols):
        return rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    def labels(rows, cols):  # the store's scribbles: int8, -1 non-tumor, +1 tumor
        return rng.integers(-1, 2, (rows, cols), dtype=np.int8)
    return [Backup((5, 7, 30, 40), pixels(30, 40), labels(30, 40)),
            Backup((100, 0, 1, 3), None, labels(1, 3)),
            Backup((0, 0, 64, 17), pixels(64, 17), labels(64, 17))]


def _equal(a: list[Backup], b: list[Backup]) -> bool:
    return len(a) == len(b) and all(
        x.region == y.region and (x.refined is None) == (y.refined is None)
        and (x.refined is None or np.array_equal(x.refined, y.refined))
        and (x.refined is None or x.refined.dtype == y.refined.dtype)
        and np.array_equal(x.scribbles, y.scribbles) and x.scribbles.dtype == y.scribbles.dtype
        for x, y in zip(a, b, strict=True))


def test_a_record_is_one_array_and_reads_back_exactly(tmp_path) -> None:
    store = _Store(tmp_path / "s.zarr")
    backups = _backups(np.random.default_rng(0))
    save_backup(store, 3, backups)
    record = store.group["history"]["r3"]
    assert isinstance(record, zarr.Array) and record.ndim == 1 and record.nchunks == 1
    assert _equal(load_backup(store, 3), backups)
    assert backup_regions(store, 3) == [((5, 7, 30, 40), True), ((100, 0, 1, 3), False),
                                        ((0, 0, 64, 17), True)]
    save_backup(store, 3, backups[1:])  # what a failed attempt at round 3 left is replaced
    assert _equal(load_backup(store, 3), backups[1:])


def test_records_written_as_groups_read_as_before(tmp_path) -> None:
    """The layout of rounds recorded before: a group, one array per box and kind."""
    store = _Store(tmp_path / "s.zarr")
    backups = _backups(np.random.default_rng(1))
    g = store.group.require_group("history").create_group("r2")
    for i, b in enumerate(backups):
        for key, data in (("scribbles", b.scribbles), ("refined", b.refined)):
            if data is not None:
                g.create_array(f"{key}_{i}", shape=data.shape, dtype=data.dtype,
                               chunks=data.shape, fill_value=0)[...] = data
    g.attrs["boxes"] = [{"region": list(b.region), "refined": b.refined is not None}
                        for b in backups]
    assert _equal(load_backup(store, 2), backups)
    assert [r for r, _ in backup_regions(store, 2)] == [b.region for b in backups]


def test_a_missing_record_and_wrong_pixels_say_so(tmp_path) -> None:
    store = _Store(tmp_path / "s.zarr")
    with pytest.raises(WsisegError, match=r"round 4 has no undo record \(history/r4\)"):
        load_backup(store, 4)
    with pytest.raises(ValueError, match=r"backup of \(0, 0, 2, 2\): uint8 \(2, 3\), expected"):
        save_backup(store, 4, [Backup((0, 0, 2, 2), None, np.zeros((2, 3), np.uint8))])
