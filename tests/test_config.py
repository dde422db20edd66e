from __future__ import annotations

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
