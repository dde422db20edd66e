"""Shared fixtures: the real files in ../shared and small generated slides."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from wsiseg import filecache
from wsiseg.contours.cache import TRACES
from wsiseg.qupath.text import RING_TEXTS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
CMU_SVS = REAL / "svs" / "cmu-1-small-region.svs"
NDPI = REAL / "ndpi" / "test3-DAPI-2-(387).ndpi"
DICOM_JPEG = REAL / "dicom" / "gcp_jpeg" / "jpeg.dicom"
DICOM_J2K = REAL / "dicom" / "gcp_jpeg2000" / "jpeg2000.dicom"
DICOM_TINY = REAL / "dicom" / "highdicom_sm_image" / "sm_image.dcm"
CAMELYON = REAL / "patches" / "he_tumor_masks" / "camelyon"
QUPATH_FIXTURES = SHARED / "fixtures" / "qupath"

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("WSISEG_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _fresh_trace_memo():
    """The trace memo, the ring texts and the arrays read once are the process's: each test
    starts and ends with them empty, so none finds another's traces, texts or arrays (which
    would hide one it should have made)."""
    TRACES.clear()
    RING_TEXTS.clear()
    filecache.clear()
    yield
    TRACES.clear()
    RING_TEXTS.clear()
    filecache.clear()


def real(path: Path) -> Path:
    """The real file, or skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"real test file missing: {path}")
    return path


@pytest.fixture(scope="session")
def synth_slides(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Two small generated slides (4096×3072 at 0.5 µm/px → 1024×768 working px)."""
    from wsiseg.synth import synthesize_cohort

    out = tmp_path_factory.mktemp("synth")
    return synthesize_cohort(out, 2, (4096, 3072), mpp=0.5, seed=7)


@pytest.fixture()
def small_workflow():
    """The default workflow with small chunks, so tests see several chunks per slide."""
    import dataclasses

    from wsiseg.config import load_workflow

    wf = load_workflow()
    return wf.replace(tiling=dataclasses.replace(wf.tiling, chunk_px=256))
