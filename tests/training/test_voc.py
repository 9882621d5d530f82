"""Pascal VOC reader: a tiny hand-made folder, error messages, and the real BCCD folder."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from detector.errors import InputError
from training.voc import read_annotation, read_voc

XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object><name>WBC</name><bndbox><xmin>10</xmin><ymin>5</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object>
  <object><name>RBC</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>11</xmax><ymax>12</ymax></bndbox></object>
  <object><name>RBC</name><bndbox><xmin>40</xmin><ymin>30</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>
  <object><name>Platelets</name><bndbox><xmin>5</xmin><ymin>40</ymin><xmax>9</xmax><ymax>44</ymax></bndbox></object>
  <object><name>RBC</name><bndbox><xmin>7</xmin><ymin>7</ymin><xmax>7</xmax><ymax>7</ymax></bndbox></object>
</annotation>
"""


def make_voc(root: Path, names: tuple[str, ...] = ("a", "b"), csv: str | None = None) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for name in names:
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), np.zeros((48, 64, 3), np.uint8))
        (root / "Annotations" / f"{name}.xml").write_text(XML.format(name=name))
    if csv is not None:
        (root / "wbc_types.csv").write_text(csv)
    return root


def test_reads_boxes_sizes_and_types(tmp_path: Path) -> None:
    recs = read_voc(make_voc(tmp_path, csv="image,wbc_type\na.jpg,Neutrophil\n"))
    assert [r.name for r in recs] == ["a", "b"]
    a = recs[0]
    assert (a.width, a.height) == (64, 48)
    assert a.image == tmp_path / "JPEGImages" / "a.jpg"
    np.testing.assert_array_equal(a.wbc, [[10, 5, 30, 25]])
    assert a.wbc.dtype == np.float32
    assert a.rbc.shape == (2, 4)  # the degenerate zero-size RBC box is skipped
    np.testing.assert_array_equal(a.platelets, [[5, 40, 9, 44]])
    assert a.wbc_type == "neutrophil"
    assert recs[1].wbc_type is None


def test_annotation_without_image_is_skipped(tmp_path: Path) -> None:
    root = make_voc(tmp_path)
    (root / "Annotations" / "orphan.xml").write_text(XML.format(name="orphan"))
    assert [r.name for r in read_voc(root)] == ["a", "b"]


def test_not_a_voc_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a Pascal VOC folder"):
        read_voc(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        read_voc(tmp_path / "missing")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(InputError, match="no .xml annotations"):
        read_voc(tmp_path)


def test_broken_xml_and_csv_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size>")
    with pytest.raises(InputError, match="bad.xml"):
        read_annotation(bad)
    root = make_voc(tmp_path / "voc", csv="name,type\na.jpg,neutrophil\n")
    with pytest.raises(InputError, match="wbc_types.csv.*image,wbc_type"):
        read_voc(root)


def test_real_bccd_folder(bccd_dir: Path) -> None:
    recs = read_voc(bccd_dir)
    assert len(recs) == 292
    assert sum(len(r.wbc) for r in recs) == 301
    first = recs[0]
    assert first.name == "BloodImage_00000"
    np.testing.assert_array_equal(first.wbc, [[260, 177, 491, 376]])
    assert first.wbc_type == "neutrophil"
    assert sum(r.wbc_type is not None for r in recs) == 280
