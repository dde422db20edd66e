"""``--out`` destinations (issue 7): local paths and URLs, and the upload of a finished slide
to an object store (fsspec's in-memory filesystem stands in for one here; the S3 run on a
cluster is in test_cohort.py)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from wsiseg.cohort.one_slide import done_row
from wsiseg.destination import Destination
from wsiseg.errors import UsageError, WsisegError
from wsiseg.store import STORE_FORMAT, SourceInfo


@pytest.fixture
def url() -> str:
    return f"memory://wsiseg-test/{uuid.uuid4().hex[:8]}"


def test_paths_and_urls(tmp_path):
    assert Destination.parse(tmp_path) == Destination(str(tmp_path), tmp_path)
    assert Destination.parse(tmp_path.as_uri()).local_dir == tmp_path
    assert Destination.parse("file://localhost/data/run").local_dir == Path("/data/run")
    s3 = Destination.parse("s3://bucket/run/")
    assert s3.remote and s3.url == "s3://bucket/run"
    assert Destination.parse(Path("s3://bucket/run")).url == "s3://bucket/run"  # Path ate a /
    with pytest.raises(UsageError, match="file:// URL must name a local path"):
        Destination.parse("file://server/share")
    with pytest.raises(WsisegError, match="nosuchproto://x: cannot use this URL"):
        Destination.parse("nosuchproto://x").filesystem()


def staged_slide(root: Path, slide: Path, slide_id: str, chunks: dict[str, bytes]) -> Path:
    """A staging directory as a finished run leaves it: store, GeoJSON (latest, r0), PNG."""
    store = root / f"{slide_id}.zarr"
    attrs = {"format": STORE_FORMAT, "source": SourceInfo.of(slide).to_dict(),
             "stages": {"tiling": "done", "guide": "done", "export": "done"},
             "measurements": {"tumor_mm2": 1.5}}
    (store / "guide" / "c" / "0").mkdir(parents=True)
    (store / "zarr.json").write_text(json.dumps({"attributes": {"wsiseg": attrs}}))
    for name, data in chunks.items():
        (store / "guide" / "c" / "0" / name).write_bytes(data)
    (store / ".lock").write_text("12345")
    for name in (f"{slide_id}.geojson", f"{slide_id}.r0.geojson", f"{slide_id}.png"):
        (root / name).write_bytes(name.encode())
    return root


def test_a_finished_slide_goes_up_with_its_root_metadata_last(tmp_path, url, monkeypatch):
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"slide bytes")
    dest = Destination.parse(url)
    fs, root = dest.filesystem()
    order: list[str] = []
    put_file = type(fs).put_file

    def recording_put_file(self, lpath, rpath, *args, **kwargs):
        order.append(rpath[len(root) + 1:])
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", recording_put_file)
    dest.upload_slide(staged_slide(tmp_path / "s1", slide, "a", {"0": b"old", "1": b"gone"}),
                      "a")
    assert order[-1] == "a.zarr/zarr.json"
    assert sorted(order) == ["a.geojson", "a.png", "a.r0.geojson", "a.zarr/guide/c/0/0",
                             "a.zarr/guide/c/0/1", "a.zarr/zarr.json"]  # no .lock
    assert done_row(dest, slide, "a", export_mask=False).tumor_mm2 == 1.5

    # Redone (--force): the older store is moved aside whole, nothing of it mixes in.
    dest.upload_slide(staged_slide(tmp_path / "s2", slide, "a", {"0": b"new"}), "a")
    assert fs.cat_file(dest.join("a.zarr/guide/c/0/0")) == b"new"
    assert not fs.exists(dest.join("a.zarr/guide/c/0/1"))
    (stale,) = [n for n in dest.names() if n.startswith("a.zarr.stale-")]
    assert fs.cat_file(dest.join(f"{stale}/guide/c/0/1")) == b"gone"


def test_an_upload_cut_short_is_not_done(tmp_path, url, monkeypatch):
    slide = tmp_path / "b.svs"
    slide.write_bytes(b"slide bytes")
    dest = Destination.parse(url)
    fs, _ = dest.filesystem()
    put_file = type(fs).put_file

    def fail_on_the_root(self, lpath, rpath, *args, **kwargs):
        if rpath.endswith("b.zarr/zarr.json"):
            raise ConnectionError("connection reset")
        return put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(type(fs), "put_file", fail_on_the_root)
    with pytest.raises(ConnectionError):
        dest.upload_slide(staged_slide(tmp_path / "s", slide, "b", {"0": b"x"}), "b")
    assert fs.exists(dest.join("b.geojson"))  # most of it is there ...
    assert done_row(dest, slide, "b", export_mask=False) is None  # ... but it is not done
    monkeypatch.undo()
    dest.upload_slide(staged_slide(tmp_path / "s2", slide, "b", {"0": b"y"}), "b")
    assert done_row(dest, slide, "b", export_mask=False) is not None
    slide.write_bytes(b"another slide now")  # the slide changed: it has to run again
    assert done_row(dest, slide, "b", export_mask=False) is None


def test_a_store_there_of_another_slide_is_not_taken_over(tmp_path, url):
    from wsiseg.cohort import assign_slide_ids

    first = tmp_path / "one" / "c.svs"
    other = tmp_path / "two" / "c.svs"
    for path, data in ((first, b"first"), (other, b"other")):
        path.parent.mkdir()
        path.write_bytes(data)
    dest = Destination.parse(url)
    dest.upload_slide(staged_slide(tmp_path / "s", first, "c", {"0": b"x"}), "c")
    assert assign_slide_ids([first], dest) == {first: "c"}
    assert assign_slide_ids([other], dest)[other].startswith("c-")

