"""Shared fixtures: where the real smear images live, and the shipped model. Tests marked
``train`` need TensorFlow (the [train] extra): without it they are skipped, so the suite passes
where only the runtime is installed (as on a Raspberry Pi)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.tiny_models import tiny_models  # noqa: F401  (the session fixture, for every test)

_RUN_TMP: str | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """One temporary folder for the whole run, removed at its end: pytest's tmp_path, the
    libraries' own temporary files (TensorFlow's autograph, Gradio) and child processes all go
    there, so a test run leaves nothing in the system's temporary folder."""
    global _RUN_TMP
    _RUN_TMP = tempfile.mkdtemp(prefix="hematovision-tests-")
    tempfile.tempdir = _RUN_TMP
    os.environ["TMPDIR"] = _RUN_TMP
    if config.option.basetemp is None:
        config.option.basetemp = os.path.join(_RUN_TMP, "pytest")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_TMP is not None:
        shutil.rmtree(_RUN_TMP, ignore_errors=True)

REPO = Path(__file__).resolve().parent.parent
#: ../shared/data beside the checkout (as in CI), or HEMATOVISION_DATA.
DATA = Path(os.environ.get("HEMATOVISION_DATA", REPO.parent / "shared" / "data"))
BCCD = DATA / "bccd-trainval"
SHARED_WEIGHTS = DATA.parent / "models" / "mobilenet_v2_1.0_imagenet_no_top.weights.h5"


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    """The real BCCD train/val images (Pascal VOC layout with wbc_types.csv)."""
    if not (BCCD / "JPEGImages").is_dir():
        pytest.skip(f"real smear images not found at {BCCD} (set HEMATOVISION_DATA)")
    return BCCD


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The default model shipped in models/, as the installed package finds it."""
    from hematovision_models import shipped_model as find

    path = find()
    assert path.is_file(), f"shipped model missing: {path}"
    return path


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for the parallel run, and skip the ``train`` tests when TensorFlow is not
    installed (found without importing it).

    The suite runs on every core (pytest-xdist, ``--dist=loadgroup``): a module's tests stay on one
    worker, so its module fixtures (servers, a browser) start once, and the tests that need
    TensorFlow (marked ``train``, the shared tiny Keras training among them) run on one worker,
    so TensorFlow is imported and the tiny model trained once.
    """
    for item in items:
        tf = item.get_closest_marker("train") is not None or \
            "tiny_run" in getattr(item, "fixturenames", ())
        group = "tensorflow" if tf else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    if importlib.util.find_spec("tensorflow") is not None:
        return
    skip = pytest.mark.skip(reason="needs TensorFlow: pip install -e '.[train]'")
    for item in items:
        if item.get_closest_marker("train") is not None:
            item.add_marker(skip)
