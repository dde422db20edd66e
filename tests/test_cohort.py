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

from wsiseg.cohort import RunOptions, print_status, resolve_out_dir, run_cohort
from wsiseg.errors import UsageError
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

    from wsiseg.cohort import _start_method

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
    assert url.startswith("file:///") and resolve_out_dir(url) == out
    assert resolve_out_dir(Path(url)) == out  # Path("file:///x") is "file:/x"
    status = run_cohort([str(s) for s in slides[:2]], RunOptions(
        out_dir=url, guidenet=str(guidenet), device="cpu",
        scheduler=cluster[0].scheduler_address, progress=False))
    assert status == 0
    assert geojsons(out) == geojsons(clean[0]) and len(geojsons(out)) == 4  # latest + r0
    with pytest.raises(UsageError, match="s3:// outputs are not supported"):
        resolve_out_dir("s3://bucket/run")


def test_an_interrupted_run_resumes_without_recomputing(
    slides, guidenet, tmp_path, monkeypatch, capsys
):
    import wsiseg.cohort

    out = tmp_path / "out"
    options = RunOptions(out_dir=out, guidenet=str(guidenet), device="cpu", workers=2,
                         progress=False)
    finished = wsiseg.cohort._Cohort.finished

    def ctrl_c_after_the_first(self, row, worker=""):
        finished(self, row, worker)
        raise KeyboardInterrupt

    monkeypatch.setattr(wsiseg.cohort._Cohort, "finished", ctrl_c_after_the_first)
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
    from wsiseg.cohort import _local_cluster, plan_local_cluster

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
