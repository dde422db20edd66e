from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from wsiseg.config import ConfigError, load_workflow, workflow_from_dict


def test_default_preset_is_the_papers_setting():
    wf = load_workflow()
    assert wf.working_mpp == 2.0
    assert wf.guidenet.patch_px == 256
    assert wf.refinenet.window_px == 384
    assert wf.guidenet.threshold == 0.5
    assert "Tumor" in wf.scribbles.tumor


def test_round_trip_through_dict():
    wf = load_workflow("default")
    again = workflow_from_dict(wf.to_dict())
    assert again == wf


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"guidenet": {"patch_px": -3}}, "guidenet.patch_px"),
        ({"guidenet": {"patchpx": 3}}, "guidenet.patchpx"),
        ({"working_mpp": "fast"}, "working_mpp"),
        ({"contours": {"threshold": 1.5}}, "contours.threshold"),
        ({"contours": {"color": [1, 2]}}, "contours.color"),
        ({"scribbles": {"match_base_class": "yes"}}, "scribbles.match_base_class"),
        ({"tiling": 5}, "tiling"),
        ({"guidenet": {"patch_px": 128, "stride_px": 200}}, "guidenet.stride_px"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        workflow_from_dict(data, source="x.yaml")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such workflow preset"):
        load_workflow("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("guidenet: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_workflow(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_workflow(listy)


def test_partial_preset_keeps_defaults(tmp_path):
    f = tmp_path / "fine.yaml"
    f.write_text("name: fine\nworking_mpp: 1.0\nguidenet:\n  batch_size: 4\n")
    wf = load_workflow(f)
    assert wf.working_mpp == 1.0
    assert wf.guidenet.batch_size == 4
    assert wf.guidenet.patch_px == 256


@pytest.mark.parametrize("value", [float("inf"), 1e-9, 1e6, 0.01, 250.0])
def test_working_mpp_outside_the_slide_range_is_refused_with_the_reason(value):
    with pytest.raises(ConfigError, match=r"working_mpp: .*0\.05–100 µm/px"):
        workflow_from_dict({"working_mpp": value}, source="x.yaml")


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("name", ["default", "demo"])
def test_a_preset_name_wins_over_a_file_or_folder_of_that_name(
    tmp_path, monkeypatch, kind, name
):
    monkeypatch.chdir(tmp_path)
    if kind == "file":
        (tmp_path / name).write_text("not: a workflow\n")
    else:
        (tmp_path / name).mkdir()
    assert load_workflow(name) == load_workflow(str(load_workflow(name).source))


def test_a_path_like_argument_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").write_text("name: mine\nworking_mpp: 1.0\n")
    (tmp_path / "mine.yml").write_text("name: mine\nworking_mpp: 1.0\n")
    assert load_workflow("./mine").working_mpp == 1.0
    assert load_workflow("mine.yml").working_mpp == 1.0
    with pytest.raises(ConfigError, match=r"no such workflow preset .*write \./mine"):
        load_workflow("mine")
    with pytest.raises(ConfigError, match="workflow file not found"):
        load_workflow("./default")


def test_the_message_is_one_line_naming_file_key_and_value(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("guidenet:\n  patch_px: -3\n")
    with pytest.raises(ConfigError) as caught:
        load_workflow(bad)
    assert str(caught.value) == f"{bad}: guidenet.patch_px: expected a positive integer, got -3"


# pydantic coerces in lax mode ("3" → 3, 3.0 → 3, 1 → True) and lets NaN through by default;
# a workflow value must be what it says, so each of these is refused, naming the key.
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiling": {"chunk_px": True}}, "tiling.chunk_px: expected an integer, got True"),
        ({"tiling": {"chunk_px": "512"}}, "tiling.chunk_px: expected an integer, got '512'"),
        ({"tiling": {"chunk_px": 512.0}}, "tiling.chunk_px: expected an integer, got 512.0"),
        ({"tiling": {"workers": -1}}, "tiling.workers: expected a non-negative integer, got -1"),
        ({"guidenet": {"threshold": "0.5"}}, "guidenet.threshold: expected a number, got '0.5'"),
        ({"guidenet": {"threshold": False}}, "guidenet.threshold: expected a number, got False"),
        ({"guidenet": {"threshold": float("nan")}}, "guidenet.threshold: expected a finite"),
        ({"contours": {"min_area_um2": float("inf")}}, "contours.min_area_um2: expected a fin"),
        ({"tissue": {"mask_mpp": float("nan")}}, "tissue.mask_mpp: nan µm/px is outside"),
        ({"scribbles": {"match_base_class": 1}}, "scribbles.match_base_class: expected true or"),
        ({"scribbles": {"tumor": "Tumor"}}, "scribbles.tumor: expected a list, got 'Tumor'"),
        ({"scribbles": {"tumor": ["Tumor", 3]}}, "scribbles.tumor: expected a non-empty string"),
        ({"contours": {"color": [255, 0, 256]}}, "contours.color: expected at most 255, got 256"),
        ({"contours": {"color": [255, 0, 0, 0]}}, "contours.color: expected at most 3 values"),
        ({"contours": {"simplify_px": -1}}, "contours.simplify_px: expected a non-negative"),
        ({"contours": {"simplify_px": 1.5}}, "contours.simplify_px: expected at most 1, got 1.5"),
        ({"inference": {"runtime": "cuda"}}, "inference.runtime: expected one of 'auto', "),
        ({"name": ""}, "name: expected a non-empty string, got ''"),
        ({"source": "elsewhere.yaml"}, "source: unknown key (expected one of name, working_mpp"),
        ({"tiling": None}, "tiling: expected a mapping, got None"),
    ],
)
def test_no_silent_coercion_and_no_nan(data, message):
    with pytest.raises(ConfigError) as caught:
        workflow_from_dict(data, source="x.yaml")
    assert str(caught.value).startswith(f"x.yaml: {message}")
    assert "\n" not in str(caught.value)


def test_a_whole_number_is_a_number():
    wf = workflow_from_dict({"working_mpp": 2, "guidenet": {"threshold": 1}})
    assert wf.working_mpp == 2.0 and isinstance(wf.working_mpp, float)
    assert isinstance(wf.guidenet.threshold, float)


def test_workflows_are_frozen_hashable_picklable_and_compare_without_source():
    wf = load_workflow("default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        wf.guidenet.patch_px = 3  # type: ignore[misc]
    other = workflow_from_dict(wf.to_dict(), source="elsewhere")
    assert other == wf and hash(other) == hash(wf) and other.source == "elsewhere"
    again = pickle.loads(pickle.dumps(wf))  # cohort workers get theirs pickled
    assert again == wf and again.source == wf.source
    assert wf.replace(name="x").source == wf.source
    assert "source" not in wf.to_dict()
    assert json.loads(json.dumps(wf.to_dict())) == wf.to_dict()  # as stored in a store


def test_replace_checks_the_value_too():
    wf = load_workflow("default")
    with pytest.raises(ValueError, match="chunk_px"):
        dataclasses.replace(wf.tiling, chunk_px="512")
