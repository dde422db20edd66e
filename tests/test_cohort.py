"""Cohort runs on Dask distributed (issue 7): ledger, worker deaths, resume, report, status.

Real LocalClusters with two worker processes on loopback. Slides are tiny (384×256 working
pixels) so the file stays fast; most tests join one module-wide cluster with ``scheduler=``,
one lets ``run_cohort`` start and close its own.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from wsiseg.cohort import RunOptions, print_status, run_cohort
from wsiseg.destination import Destination
from wsiseg.store import SlideStore

SIZE = (1536, 1024)  # level-0 px at 0.5 µm/px → 384×256 working px (two GuideNet patches)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Same torch thread count in every worker of every cluster here (identical outputs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WSISEG_TORCH_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[Path]:
    """Two generated slides and one corrupt file."""
    from wsiseg.synth import synthesize_cohort

    d = tmp_path_factory.mktemp("cohort-slides")
    good = [s.slide_path for s in synthesize_cohort(d, 2, SIZE, mpp=0.5, seed=11)]
    bad = d / "broken.tiff"
    bad.write_bytes(good[0].read_bytes()[:3000])  # a TIFF cut short: unreadable
    return [*good, bad]


@pytest.fixture(scope="module")
def guidenet(tmp_path_factory) -> Path:
    from wsiseg.nets import init_weights

    path = tmp_path_factory.mktemp("cohort-weights") / "g.safetensors"
    init_weights("guidenet", path, seed=1)
    return path


@pytest.fixture(scope="module")
def clean(slides, guidenet, tmp_path_factory) -> tuple[Path, int]:
    """A cohort run on the LocalCluster ``run_cohort`` starts itself (2 workers)."""
    out = tmp_path_factory.mktemp("cohort-clean") / "out"
    status = run_cohort([str(s) for s in slides], RunOptions(
        out_dir=out, guidenet=str(guidenet), device="cpu", workers=2, progress=False))
    return out, status


@pytest.fixture(scope="module")
def cluster():
    """An existing cluster to join: 2 worker processes, 1 thread each, loopback."""
    import dask
    from distributed import Client, LocalCluster

    from wsiseg.cohort.cluster import _start_method

    config = {"distributed.scheduler.allowed-failures": 1,
              "distributed.worker.multiprocessing-method": _start_method()}
    with dask.config.set(config), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        dashboard_address=None,
    ) as c, Client(c) as client:
        yield c, client


def set_env(name: str, value: str | None) -> None:
    """Run on workers (``client.run``): set or remove a variable of the worker process."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def get_env(name: str) -> str | None:
    """Run on workers: a variable of the worker process (``os.environ.get`` would pickle the
    client's environment along with the bound method)."""
    return os.environ.get(name)


def ledger(out: Path) -> dict:
    return json.loads((out / "ledger.json").read_text(encoding="utf-8"))


def summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / "summary.csv").open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def geojsons(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("synth-*.geojson"))}


def test_a_corrupt_slide_fails_alone(clean, slides):
    out, status = clean
    assert status == 1
    slides_ledger = ledger(out)["slides"]
    rows = summary(out)
    for s in slides[:2]:
        sid = s.stem
        assert slides_ledger[sid]["status"] == "done" and rows[sid]["status"] == "done"
        assert slides_ledger[sid]["worker"].startswith("tcp://127.0.0.1:")
        assert slides_ledger[sid]["attempts"] == 1 and slides_ledger[sid]["seconds"] > 0
        assert (out / f"{sid}.geojson").is_file() and (out / f"{sid}.png").is_file()
    broken = slides_ledger["broken"]
    assert broken["status"] == "failed" and "broken.tiff" in broken["reason"]
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"] == broken["reason"]
    report = (out / "report.html").read_text(encoding="utf-8")
    assert broken["reason"].replace("'", "&#x27;") in report
    assert report.count('<img src="synth-') == 2 and "slides/hour" in report
    assert "<script" not in report


def test_a_worker_killed_mid_slide(cluster, clean, slides, guidenet, tmp_path):
    _, client = cluster
    marker = tmp_path / "crashed"
    client.run(set_env, "WSISEG_TEST_CRASH_ONCE", str(marker))
    try:
        out = tmp_path / "out"
        status = run_cohort([str(s) for s in slides[:2]], RunOptions(
            out_dir=out, guidenet=str(guidenet), device="cpu",
            scheduler=cluster[0].scheduler_address, progress=False))
    finally:
        client.run(set_env, "WSISEG_TEST_CRASH_ONCE", None)
    assert marker.exists(), "a worker died mid-slide"
    assert status == 0
    entries = ledger(out)["slides"]
    assert {e["status"] for e in entries.values()} == {"done"}
    assert sorted(e["attempts"] for e in entries.values()) == [1, 2]  # the killed one retried
    assert geojsons(out) == geojsons(clean[0]) and len(geojsons(out)) == 4  # latest + r0


def test_a_file_url_gives_what_a_path_gives(cluster, clean, slides, guidenet, tmp_path):
    out = tmp_path / "via-url"
    url = out.as_uri()
    assert url.startswith("file:///") and Destination.parse(url).local_dir == out
    assert Destination.parse(Path(url)).local_dir == out  # Path("file:///x") is "file:/x"
    status = run_cohort([str(s) for s in slides[:2]], RunOptions(
        out_dir=url, guidenet=str(guidenet), device="cpu",
        scheduler=cluster[0].scheduler_address, progress=False))
    assert status == 0
    assert geojsons(out) == geojsons(clean[0]) and len(geojsons(out)) == 4  # latest + r0


@pytest.fixture(scope="module")
def s3_server():
    """A local S3 (moto's server on loopback) with a bucket ``wsiseg``; yields the
    environment that points boto/s3fs at it (no network, no real credentials)."""
    import socket

    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import fsspec

        fsspec.filesystem("s3").mkdir("wsiseg")
        yield env
    server.stop()


def test_an_s3_url_gives_what_a_path_gives(cluster, clean, slides, guidenet, s3_server,
                                           capsys):
    """Two workers write to an object store: the same GeoJSON and maps as a local run, the
    ledger, summary and report beside them; a rerun recomputes nothing."""
    import fsspec
    import numpy as np
    import zarr

    _, client = cluster
    for k, v in s3_server.items():
        client.run(set_env, k, v)
    url = "s3://wsiseg/cohort-a"
    options = RunOptions(out_dir=url, guidenet=str(guidenet), device="cpu",
                         scheduler=cluster[0].scheduler_address, progress=False)
    try:
        assert run_cohort([str(s) for s in slides], options) == 1  # the corrupt one fails
        fs = fsspec.filesystem("s3")
        fs.invalidate_cache()
        remote = {p.rsplit("/", 1)[-1]: fs.cat_file(p)
                  for p in fs.glob("wsiseg/cohort-a/synth-*.geojson")}
        assert remote == geojsons(clean[0]) and len(remote) == 4
        for s in slides[:2]:
            local = zarr.open_group(str(clean[0] / f"{s.stem}.zarr"), mode="r")
            there = zarr.open_group(f"{url}/{s.stem}.zarr", mode="r")
            assert np.array_equal(there["guide"][...], local["guide"][...])
            assert there.attrs["wsiseg"]["stages"]["export"] == "done"
        entries = json.loads(fs.cat_file("wsiseg/cohort-a/ledger.json"))["slides"]
        assert [entries[s.stem]["status"] for s in slides] == ["done", "done", "failed"]
        assert entries["synth-000"]["worker"].startswith("tcp://127.0.0.1:")
        report = fs.cat_file("wsiseg/cohort-a/report.html").decode()
        assert report.count('<img src="synth-') == 2 and url in report
        assert b"broken" in fs.cat_file("wsiseg/cohort-a/summary.csv")
        assert not fs.exists("wsiseg/cohort-a/.wsiseg-run.lock")  # released

        capsys.readouterr()
        assert run_cohort([str(s) for s in slides[:2]], options) == 0
        last = json.loads(fs.cat_file("wsiseg/cohort-a/ledger.json"))["runs"][-1]
        assert (last["skipped"], last["done"]) == (2, 0)  # found done there: not recomputed
        assert print_status(url) == 0
        assert "3 slides: 0 pending, 0 running, 2 done, 1 failed" in capsys.readouterr().out
    finally:
        for k in s3_server:
            client.run(set_env, k, None)


def test_an_s3_url_that_cannot_be_written(slides, guidenet, s3_server, capsys):
    from wsiseg.errors import WsisegError

    options = RunOptions(out_dir="s3://no-such-bucket/run", guidenet=str(guidenet),
                         device="cpu", workers=0, progress=False)
    with pytest.raises(WsisegError, match=r"s3://no-such-bucket/run: cannot write here"):
        run_cohort([str(slides[0])], options)
    with pytest.raises(WsisegError, match=r"nosuchproto://x: cannot use this URL"):
        run_cohort([str(slides[0])], RunOptions(
            out_dir="nosuchproto://x", guidenet=str(guidenet), workers=0, progress=False))
    assert print_status("s3://wsiseg/never-ran") == 1
    assert "no run ledger" in capsys.readouterr().err


def test_an_interrupted_run_resumes_without_recomputing(
    slides, guidenet, tmp_path, monkeypatch, capsys
):
    import wsiseg.cohort.driver

    out = tmp_path / "out"
    options = RunOptions(out_dir=out, guidenet=str(guidenet), device="cpu", workers=2,
                         progress=False)
    finished = wsiseg.cohort.driver.Cohort.finished

    def ctrl_c_after_the_first(self, row, worker=""):
        finished(self, row, worker)
        raise KeyboardInterrupt

    monkeypatch.setattr(wsiseg.cohort.driver.Cohort, "finished", ctrl_c_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        run_cohort([str(s) for s in slides[:2]], options)
    monkeypatch.undo()
    first = ledger(out)
    statuses = sorted(e["status"] for e in first["slides"].values())
    assert statuses == ["done", "pending"], "the running slide goes back to pending"
    assert first["runs"][-1]["interrupted"] is True
    assert "back to pending" in capsys.readouterr().err
    (done_id,) = [k for k, e in first["slides"].items() if e["status"] == "done"]
    guide = out / f"{done_id}.zarr" / "guide"
    guide_mtime = max(p.stat().st_mtime_ns for p in guide.rglob("*"))

    assert run_cohort([str(s) for s in slides[:2]], options) == 0
    second = ledger(out)
    assert second["slides"][done_id] == first["slides"][done_id]  # not recomputed
    assert {e["status"] for e in second["slides"].values()} == {"done"}
    assert max(p.stat().st_mtime_ns for p in guide.rglob("*")) == guide_mtime
    # the slide that was running may have completed before its worker was stopped: then it
    # is found done too, else it is computed now
    run = second["runs"][-1]
    assert run["skipped"] >= 1 and run["skipped"] + run["done"] == 2
    assert summary(out)[done_id]["status"] == "skipped"
    for s in slides[:2]:
        assert SlideStore.open(out / f"{s.stem}.zarr", mode="r").stage("export") == "done"


def test_print_status(clean, slides, tmp_path, capsys):
    out, _ = clean
    assert print_status(out) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    for s in slides[:2]:
        assert "done" in lines[s.stem].split()
    assert "failed" in lines["broken"].split() and "broken.tiff" in lines["broken"]
    assert "3 slides: 0 pending, 0 running, 2 done, 1 failed" in text
    assert print_status(tmp_path) == 1
    err = capsys.readouterr().err
    assert "no run ledger" in err and len(err.strip().splitlines()) == 1


def test_one_pinned_worker_per_gpu(cluster, monkeypatch):
    """Two (simulated) GPUs: two workers, each seeing only its device, with a GPU resource."""
    import torch
    from distributed import Client

    import wsiseg.infer
    from wsiseg.cohort.cluster import _local_cluster, plan_local_cluster

    monkeypatch.setattr(wsiseg.infer, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = plan_local_cluster("auto", slides=10)
    assert (plan.workers, plan.gpus) == (2, ("3", "5"))
    assert plan_local_cluster("auto", slides=1).gpus == ("3",)  # never more than slides
    assert plan_local_cluster("auto", slides=10, workers=1).workers == 1
    with _local_cluster(plan) as gpu_cluster, Client(gpu_cluster) as client:
        seen = client.run(get_env, "CUDA_VISIBLE_DEVICES")
        assert sorted(seen.values()) == ["3", "5"]
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        assert [w["resources"] for w in workers] == [{"GPU": 1}, {"GPU": 1}]
