"""Any install carries the model: a wheel built from the checkout names a cell far from it.

Also the command layer's model lookup: ``--model``, else ``HEMATOVISION_MODEL``, else the model
shipped as package data (``hematovision_models``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from hematovision_models import shipped_model
from stream import default_model_path, resolve_model

REPO = Path(__file__).resolve().parents[2]
#: What a wheel is built from (everything else in the checkout stays out of it).
SOURCES = ("pyproject.toml", "README.md", "detector", "stream", "training", "models")


def test_default_model_is_the_shipped_one_unless_the_variable_says(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HEMATOVISION_MODEL", raising=False)
    assert shipped_model() == REPO / "models" / "hematovision.tflite"  # editable install
    assert default_model_path() == shipped_model()
    assert resolve_model(None) == resolve_model("") == str(shipped_model())
    monkeypatch.setenv("HEMATOVISION_MODEL", str(tmp_path / "x.tflite"))
    assert default_model_path() == tmp_path / "x.tflite"
    assert resolve_model(None) == str(tmp_path / "x.tflite")
    assert resolve_model(tmp_path / "given.tflite") == str(tmp_path / "given.tflite")


def _wbc_box(bccd_dir: Path, name: str) -> list[float]:
    root = ET.parse(bccd_dir / "Annotations" / f"{name}.xml").getroot()
    bb = next(o for o in root.iter("object") if o.findtext("name") == "WBC").find("bndbox")
    return [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]


def test_wheel_carries_the_model_and_names_a_cell(tmp_path: Path, bccd_dir: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("HEMATOVISION_MODEL", None)
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip", "--no-cache-dir", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, env=env, cwd=tmp_path, timeout=240)
    (wheel,) = wheels.glob("hematovision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hematovision_models/hematovision.tflite",
            "hematovision_models/hematovision.json"} <= names
    assert not any(n.startswith(("tests/", "models/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, env=env, cwd=tmp_path, timeout=240)
    far = tmp_path / "elsewhere"
    (far / "models").mkdir(parents=True)  # a user's own models/ folder must not shadow ours
    env["PYTHONPATH"] = str(site)
    where = subprocess.run(
        [sys.executable, "-c", "import stream, hematovision_models as m; "
         "print(stream.__file__); print(m.shipped_model())"],
        check=True, env=env, cwd=far, capture_output=True, text=True, timeout=60)
    stream_file, model_file = where.stdout.split()
    assert Path(stream_file).is_relative_to(site) and Path(model_file).is_relative_to(site)

    image = bccd_dir / "JPEGImages" / "BloodImage_00000.jpg"
    out = subprocess.run([sys.executable, "-m", "stream.cli", "detect", str(image), "--json"],
                         env=env, cwd=far, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    labels = json.loads((REPO / "models" / "hematovision.json").read_text())["labels"]
    x1, y1, x2, y2 = _wbc_box(bccd_dir, "BloodImage_00000")
    inside = [c for c in record["cells"]
              if x1 <= (c["box"][0] + c["box"][2]) / 2 <= x2
              and y1 <= (c["box"][1] + c["box"][3]) / 2 <= y2]
    assert len(inside) == 1 and inside[0]["label"] in labels
    assert sorted(p.name for p in far.iterdir()) == ["models"]  # nothing written where it ran
