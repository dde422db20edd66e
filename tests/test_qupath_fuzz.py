"""Fuzzing the scribble path (issue 20.1): generated and mutated QuPath exports through
``read_annotations_report`` → ``load_scribbles`` → ``rasterize_new`` are read or refused with
the project's one-line error naming the file, never anything else; the store is unchanged.

Bounded for the suite: 1,400 mutated + 700 generated files + the deep-nesting cases.
``scripts/fuzz/scribbles.py`` runs 100,000 (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsiseg.config import load_workflow

from conftest import CMU_SVS, QUPATH_FIXTURES, REPO, real
from storekit import assert_unchanged, blobs, run_store, store_snapshot

sys.path.insert(0, str(REPO / "scripts" / "fuzz"))

import fuzzkit  # noqa: E402


def _fuzz(examples: int) -> settings:
    # Derandomized and without a database: the same files every run, nothing written.
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

KEYS = ["type", "features", "geometry", "geometries", "coordinates", "properties",
        "classification", "name", "names", "color", "colorRGB", "measurements", "metadata",
        "childObjects", "children", "objectType", "isLocked", "id", "plane", "z", "t",
        "parentClass", "value"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["Feature", "FeatureCollection", "GeometryCollection", "Polygon",
                     "MultiPolygon", "LineString", "Point", "MultiPoint", "Tumor", "Stroma",
                     "annotation", "detection", "NaN", "Infinity"]),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4),
    max_leaves=24,
)


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, small_workflow_module):
    tmp = tmp_path_factory.mktemp("fuzz")
    store = run_store(real(CMU_SVS), tmp / "out", "cmu", small_workflow_module, blobs)
    own = tmp / "out" / "cmu.geojson"
    own_gz = tmp / "own.geojson.gz"
    own_gz.write_bytes(gzip.compress(own.read_bytes(), mtime=0))
    seeds = fuzzkit.seed_files(real(QUPATH_FIXTURES / "written-0.6"), [own, own_gz])
    seeds += [d for d in (fuzzkit.placed_on_tissue(s, store) for s in seeds) if d]
    box = store.frame.transform_geometry(fuzzkit.tissue_box(store), "working",
                                         "qupath").bounds
    return fuzzkit.Checker(store), seeds, box, tmp / "out", tmp / "export.geojson"


@pytest.fixture(scope="module")
def small_workflow_module():
    wf = load_workflow()
    return wf.replace(tiling=dataclasses.replace(wf.tiling, chunk_px=256))


def _check(checker: fuzzkit.Checker, path: Path, data: bytes) -> str:
    path.write_bytes(data)
    outcome, detail = checker.check(path)
    assert outcome != "other", detail
    return outcome


def test_mutated_exports_are_read_or_refused_in_one_line(fuzz) -> None:
    checker, seeds, _, out, path = fuzz
    before = store_snapshot(checker.store, out)

    @_fuzz(1400)
    @given(seed=st.sampled_from(seeds), rng=st.randoms(use_true_random=False))
    def run(seed: bytes, rng) -> None:
        _check(checker, path, fuzzkit.mutate(seed, rng))

    run()
    assert_unchanged(checker.store, out, before)
    assert checker.counts["accepted"] > 50  # the mutants reach the rasteriser too


def test_generated_exports_are_read_or_refused_in_one_line(fuzz) -> None:
    checker, _, (x0, y0, x1, y1), out, path = fuzz
    before = store_snapshot(checker.store, out)
    xy = st.tuples(st.floats(x0, x1), st.floats(y0, y1)).map(list)
    ring = st.lists(xy, min_size=3, max_size=8).map(lambda r: [*r, r[0]])
    geometry = st.one_of(
        st.builds(lambda r: {"type": "Polygon", "coordinates": [r]}, ring),
        st.builds(lambda p: {"type": "LineString", "coordinates": p},
                  st.lists(xy, min_size=2, max_size=6)),
        st.builds(lambda p: {"type": "Point", "coordinates": p}, xy),
        st.builds(lambda g: {"type": "GeometryCollection", "geometries": g},
                  st.lists(st.builds(lambda r: {"type": "Polygon", "coordinates": [r]}, ring)
                           | VALUES, max_size=3)),
        VALUES,
    )
    classification = st.one_of(
        st.sampled_from([{"name": "Tumor", "color": [200, 0, 0]}, "Stroma",
                         {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}]),
        VALUES,
    )
    properties = st.fixed_dictionaries(
        {"objectType": st.sampled_from(["annotation", "detection"]) | VALUES,
         "classification": classification},
        optional={k: VALUES for k in ("measurements", "metadata", "isLocked", "name",
                                      "childObjects", "plane")},
    )
    feature = st.fixed_dictionaries(
        {"type": st.just("Feature") | VALUES, "geometry": geometry,
         "properties": properties | VALUES},
        optional={"id": VALUES},
    )
    document = st.one_of(
        st.lists(feature, max_size=4).map(lambda f: {"type": "FeatureCollection",
                                                     "features": f}),
        st.lists(feature | VALUES, max_size=4),
        feature,
        VALUES,
    )

    @_fuzz(700)
    @given(doc=document, indent=st.sampled_from([None, 2]))
    def run(doc, indent) -> None:
        _check(checker, path, json.dumps(doc, indent=indent).encode("utf-8", "surrogatepass"))

    run()
    assert_unchanged(checker.store, out, before)


@pytest.mark.parametrize("name", sorted(fuzzkit.deep_cases()))
def test_deep_nesting_is_read_or_refused_in_one_line(fuzz, name) -> None:
    checker, _, _, _, path = fuzz
    outcome = _check(checker, path, fuzzkit.deep_cases()[name])
    if name.startswith(("children-20", "collections-20", "arrays-200")):
        assert outcome == "accepted"
