"""The trace memo finds unchanged chunks of a zarr array by their files' stamps, unread."""

from __future__ import annotations

import os

import numpy as np
import pytest
import shapely
import zarr

import wsiseg.contours.cache as cache
from wsiseg.contours import tumor_polygons_and_means
from wsiseg.contours.cache import chunk_file, chunk_stamp

REGION = [(60, 60, 4, 4)]  # inside the one component, which spans all 16 chunks
_READ = zarr.Array.__getitem__  # unpatched


@pytest.fixture
def stored(tmp_path, monkeypatch):
    """(zarr array of 128² in 32² chunks holding one large component, list of chunk reads)."""
    prob = np.zeros((128, 128), dtype=np.uint8)
    prob[10:120, 10:120] = 200
    prob[40:50, 40:50] = 0
    array = zarr.create_array(store=tmp_path / "refined.zarr", shape=prob.shape,
                              chunks=(32, 32), dtype="uint8", fill_value=0)
    array[...] = prob
    reads: list[tuple[int, int]] = []
    def counting(self, key):
        reads.append((key[0].start, key[1].start))
        return _READ(self, key)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    return array, reads


def _fresh(array: zarr.Array, threshold: float = 0.5):
    """The same trace from a numpy copy: no stamps (the memo by digests only)."""
    return tumor_polygons_and_means(np.asarray(_READ(array, ...)),
                                    chunk_px=32, regions=REGION, threshold=threshold)


def _same(a, b) -> bool:
    return (len(a[0]) == len(b[0]) and all(shapely.equals_exact(p, q, 0)
                                            for p, q in zip(a[0], b[0], strict=True))
            and a[1].tolist() == b[1].tolist())


def test_settled_chunks_are_not_read_again_and_a_changed_one_is(stored, monkeypatch) -> None:
    array, reads = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    first = tumor_polygons_and_means(array, regions=REGION)
    assert len(reads) == 16
    reads.clear()
    again = tumor_polygons_and_means(array, regions=REGION)
    assert reads == []  # every chunk known by its file's stamp
    assert _same(first, again)
    array[70:75, 100:110] = 0  # a new hole in chunk (2, 3) only
    reads.clear()
    changed = tumor_polygons_and_means(array, regions=REGION)
    assert reads == [(64, 96)]
    assert _same(changed, _fresh(array))
    assert len(changed[0][0].interiors) == len(first[0][0].interiors) + 1


def test_files_written_lately_are_read_however_their_stamp(stored) -> None:
    """Within SETTLED_S of a write the same stamp may hold other pixels (a second write in
    the same tick of the file clock, to the same size): such chunks are read every time."""
    array, reads = stored
    tumor_polygons_and_means(array, regions=REGION)
    reads.clear()
    tumor_polygons_and_means(array, regions=REGION)
    assert len(reads) == 16


def test_a_file_rewritten_with_its_old_size_and_times_is_read(stored, monkeypatch) -> None:
    """Other pixels of the same compressed size, the modification time set back: the change
    time (which no program can set) still tells."""
    array, reads = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    tumor_polygons_and_means(array, regions=REGION)
    file = chunk_file(array, (1, 1))
    before = os.stat(file)
    other = zarr.create_array(store={}, shape=(32, 32), chunks=(32, 32), dtype="uint8",
                              fill_value=0)
    for level in range(201, 256):  # the same pixels at another probability
        block = np.asarray(_READ(array, np.s_[32:64, 32:64]))
        other[...] = np.where(block > 0, level, 0).astype(np.uint8)
        data = other.store_path.store._store_dict["c/0/0"].to_bytes()
        if len(data) == before.st_size:
            break
    else:
        pytest.skip("no other level compresses to the same size")
    file.write_bytes(data)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert chunk_stamp(file)[:4] == (before.st_ino, before.st_dev, before.st_size,
                                     before.st_mtime_ns)
    reads.clear()
    means = tumor_polygons_and_means(array, regions=REGION)[1]
    assert (32, 32) in reads
    assert means.tolist() == _fresh(array)[1].tolist()


def test_a_stamp_stands_for_one_threshold(stored, monkeypatch) -> None:
    array, _ = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    tumor_polygons_and_means(array, regions=REGION)
    assert tumor_polygons_and_means(array, regions=REGION, threshold=0.9)[0] == []
    assert _same(tumor_polygons_and_means(array, regions=REGION), _fresh(array))


def test_chunks_of_the_fill_value_have_no_file_and_are_read_each_time(stored,
                                                                     monkeypatch) -> None:
    """A missing file has no times: it may have been there while the chunk was read (a
    round rolled back beside a warm-up), so its chunk is never known by stamp."""
    array, reads = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    array[0:32, 96:128] = 0  # all fill value: zarr removes the chunk's file
    assert not chunk_file(array, (0, 3)).exists()
    assert chunk_stamp(chunk_file(array, (0, 3))) is None
    tumor_polygons_and_means(array, regions=REGION)
    reads.clear()
    tumor_polygons_and_means(array, regions=REGION)
    assert reads == [(0, 96)]
    assert chunk_file(np.zeros((64, 64)), (0, 0)) is None


def test_a_resized_or_recreated_array_is_not_taken_for_the_old_one(stored, tmp_path,
                                                                   monkeypatch) -> None:
    """Resizing rewrites only the metadata, re-creating a store at the same path may leave
    files of the same stamp: the stamp's key holds the array's metadata too."""
    array, _ = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    tumor_polygons_and_means(array, regions=REGION)
    array.resize((100, 100))
    assert _same(tumor_polygons_and_means(array, regions=REGION), _fresh(array))
    assert max(p.bounds[2] for p in _fresh(array)[0]) == 100


def test_a_chunk_whose_trace_was_dropped_but_not_its_sums_is_read_and_traced(
        stored, monkeypatch) -> None:
    """The memo holds a chunk in two entries (its pieces' sums by its pixels' digest, its
    trace by its mask's): the first still found by the stamp, the second dropped, the chunk
    is read and traced again, not taken for one without pieces (second reader's test)."""
    array, reads = stored
    monkeypatch.setattr(cache, "SETTLED_S", 0.0)
    first = tumor_polygons_and_means(array, regions=REGION)
    values = np.asarray(_READ(array, np.s_[64:96, 96:128]))
    dropped = cache.TRACES.mask_key(values >= 128, 64, 96)
    real_get = cache.TRACES.get
    monkeypatch.setattr(cache.TRACES, "get",
                        lambda key: None if key == dropped else real_get(key))
    reads.clear()
    again = tumor_polygons_and_means(array, regions=REGION)
    assert reads == [(64, 96)]
    assert _same(again, first) and _same(again, _fresh(array))
