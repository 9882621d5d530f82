"""Read a Pascal VOC folder of blood smear images (the BCCD layout) into plain records.

A VOC folder holds ``JPEGImages/NAME.jpg`` and ``Annotations/NAME.xml`` with boxes named ``WBC``,
``RBC`` and ``Platelets``; an optional ``wbc_types.csv`` (``image,wbc_type``) names the subtype of
the main white cell of an image. Only the standard library and NumPy are used (no TensorFlow), so
evaluation and tests can read the data cheaply.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.errors import InputError
from stream.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

#: VOC object names (lower-cased) mapped to the record field they go to.
_KINDS = {"wbc": "wbc", "rbc": "rbc", "platelets": "platelets", "platelet": "platelets"}


@dataclass(frozen=True)
class VocRecord:
    """One annotated image.

    Attributes:
        image: path of the image file.
        width, height: image size in pixels as stated by the annotation (or 0 when absent).
        wbc: (N, 4) float32 xyxy white-cell boxes, pixels.
        rbc: (M, 4) float32 xyxy red-cell boxes.
        platelets: (K, 4) float32 xyxy platelet boxes.
        wbc_type: lower-case subtype of the main white cell from ``wbc_types.csv``, or None.
    """

    image: Path
    width: int
    height: int
    wbc: np.ndarray
    rbc: np.ndarray
    platelets: np.ndarray
    wbc_type: str | None = None

    @property
    def name(self) -> str:
        return self.image.stem


def _boxes(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def _find_image(images_dir: Path, stem: str, filename: str | None) -> Path | None:
    if filename:
        p = images_dir / filename
        if p.is_file():
            return p
    for ext in sorted(IMAGE_EXTENSIONS):
        for e in (ext, ext.upper()):
            p = images_dir / f"{stem}{e}"
            if p.is_file():
                return p
    return None


def _text(node: ET.Element | None, tag: str) -> str | None:
    if node is None:
        return None
    child = node.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def read_annotation(xml_path: str | Path) -> dict:
    """Parse one VOC XML file -> {"filename", "width", "height", "wbc", "rbc", "platelets"}."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(f"{xml_path}: not a readable VOC annotation ({exc})") from None
    if root.tag != "annotation":
        raise InputError(f"{xml_path}: not a VOC annotation (root element <{root.tag}>)")
    size = root.find("size")
    try:
        width = int(float(_text(size, "width") or 0))
        height = int(float(_text(size, "height") or 0))
    except ValueError:
        raise InputError(f"{xml_path}: <size> is not numeric") from None
    out: dict = {"filename": _text(root, "filename"), "width": width, "height": height}
    rows: dict[str, list[list[float]]] = {"wbc": [], "rbc": [], "platelets": []}
    for obj in root.iter("object"):
        kind = _KINDS.get((_text(obj, "name") or "").lower())
        if kind is None:
            continue
        bnd = obj.find("bndbox")
        try:
            box = [float(_text(bnd, k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise InputError(f"{xml_path}: a <bndbox> is not numeric") from None
        if any(np.isnan(box)) or box[2] <= box[0] or box[3] <= box[1]:
            log.warning("%s: skipping malformed %s box %s", xml_path, kind, box)
            continue
        rows[kind].append(box)
    out.update({k: _boxes(v) for k, v in rows.items()})
    return out


def read_wbc_types(csv_path: str | Path) -> dict[str, str]:
    """``image,wbc_type`` CSV -> {image stem: lower-case type}."""
    csv_path = Path(csv_path)
    types: dict[str, str] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "wbc_type"} <= set(reader.fieldnames):
                raise InputError(f"{csv_path}: expected columns 'image,wbc_type'")
            for row in reader:
                image, wbc_type = (row.get("image") or "").strip(), (row.get("wbc_type") or "")
                if image and wbc_type.strip():
                    types[Path(image).stem] = wbc_type.strip().lower()
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read ({exc})") from None
    return types


def read_voc(folder: str | Path) -> list[VocRecord]:
    """Read a VOC folder -> records sorted by image name (annotations without an image skipped)."""
    folder = Path(folder)
    ann_dir, img_dir = folder / "Annotations", folder / "JPEGImages"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise InputError(
            f"{folder}: not a Pascal VOC folder (expected JPEGImages/ and Annotations/ inside)"
        )
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise InputError(f"{ann_dir}: no .xml annotations")
    types_path = folder / "wbc_types.csv"
    types = read_wbc_types(types_path) if types_path.is_file() else {}
    records: list[VocRecord] = []
    for xml_path in xmls:
        ann = read_annotation(xml_path)
        image = _find_image(img_dir, xml_path.stem, ann["filename"])
        if image is None:
            log.warning("%s: no image for this annotation in %s, skipped", xml_path.name, img_dir)
            continue
        records.append(
            VocRecord(
                image=image,
                width=ann["width"],
                height=ann["height"],
                wbc=ann["wbc"],
                rbc=ann["rbc"],
                platelets=ann["platelets"],
                wbc_type=types.get(image.stem),
            )
        )
    if not records:
        raise InputError(f"{folder}: no annotation has a matching image in JPEGImages/")
    return records
