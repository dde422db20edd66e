from __future__ import annotations

import numpy as np
import pytest
import shapely

from wsiseg.slide.frame import Frame


def test_working_size_and_round_trips():
    f = Frame(level0_size=(2220, 2967), level0_mpp=0.499, working_mpp=2.0, bounds_offset=(10, 20))
    assert f.working_size == (round(2220 * 0.499 / 2), round(2967 * 0.499 / 2))
    pts = np.array([[0.0, 0.0], [100.5, 33.25]])
    np.testing.assert_allclose(f.level0_to_working(f.working_to_level0(pts)), pts)
    np.testing.assert_allclose(f.qupath_to_level0(f.level0_to_qupath(pts)), pts)
    np.testing.assert_allclose(f.level0_to_qupath([[10, 20]]), [[0, 0]])
    np.testing.assert_allclose(f.working_to_qupath([[1, 1]]), [[f.scale - 10, f.scale - 20]])


def test_geometry_transform_scales_area():
    f = Frame(level0_size=(4000, 4000), level0_mpp=0.25, working_mpp=2.0, bounds_offset=(5, 7))
    square = shapely.box(0, 0, 10, 10)
    q = f.transform_geometry(square, "working", "qupath")
    assert q.area == pytest.approx(100 * 64)
    assert q.bounds == pytest.approx((-5, -7, 80 - 5, 80 - 7))
    back = f.transform_geometry(q, "qupath", "working")
    assert back.equals_exact(square, 1e-9)


def test_persistence_and_bad_mpp():
    f = Frame(level0_size=(10, 20), level0_mpp=0.5, working_mpp=2.0)
    assert Frame.from_dict(f.to_dict()) == f
    with pytest.raises(ValueError):
        Frame(level0_size=(10, 10), level0_mpp=0.0, working_mpp=2.0)
    with pytest.raises(ValueError):
        Frame(level0_size=(10, 10), level0_mpp=float("nan"), working_mpp=2.0)
