"""Labelled white-cell crops for training and evaluation, cut with the run-time crop rule.

Two kinds of data set are read:

* **Folder per class** (the Kaggle "blood cell images" layout, e.g. ``TRAIN/EOSINOPHIL/*.jpg``):
  the class is the folder name, lower-cased and made singular (``EOSINOPHILS`` -> ``eosinophil``).
  These images are already centred on the cell. When a segmenter is available and finds a cell
  whose centre is near the image centre (within 20 % of the shorter side), that cell's box is cut
  with the crop rule, as at run time; otherwise the central square of the image is used (a box
  chosen so that the rule's margin makes the window exactly the central square: no padding, no
  distortion). The group of an image (for splitting) is its original id: Kaggle's augmented copies
  ``_0_1169.jpeg``, ``_1_1169.jpeg`` share the number ``1169``; any other name is its own group.
* **Pascal VOC with wbc_types.csv** (like BCCD): one labelled white cell per image. The "main"
  white cell is the largest ground-truth ``WBC`` box (where an image holds two, the csv names the
  main one and the labelled cell is the larger in BCCD's convention; we take the largest). The crop
  comes from the *segmenter's* box for that cell (the detection whose centre lies inside the GT box,
  the best IoU if several), so training sees the boxes the run time produces; if the segmenter
  misses it the GT box is used and counted in ``DataSet.info``.

Every sample keeps its image id as ``group``: splits are made by group, never by crop or copy.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from detector.core import CELL_TYPES, box_iou
from detector.crop import CropRule, crop_cell
from detector.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: Fraction of the shorter image side within which a segmented cell counts as "the centred cell"
#: of a folder-per-class image.
CENTRE_TOLERANCE = 0.2

#: A function (bgr image) -> (N, 4) xyxy boxes of white-cell candidates.
BoxFinder = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Sample:
    """One labelled cell: which image, which box, which class, which group (image id)."""

    image: str
    box: tuple[float, float, float, float]
    label: str
    group: str
    source: str  # "segmenter", "gt_box" or "central_square"


@dataclass
class DataSet:
    """Samples of one or more data folders plus what happened while reading them."""

    samples: list[Sample]
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])

    def counts(self) -> dict[str, int]:
        c = Counter(s.label for s in self.samples)
        return {k: int(c.get(k, 0)) for k in self.classes}

    def subset(self, groups: Sequence[str]) -> DataSet:
        keep = set(groups)
        return DataSet([s for s in self.samples if s.group in keep], self.classes, dict(self.info))


# ----------------------------------------------------------------------------------- segmenter


def default_box_finder() -> BoxFinder:
    """The run-time segmenter as a box finder (training crops come from the boxes users get)."""
    from detector.segment import Segmenter

    seg = Segmenter()

    def find(bgr: np.ndarray) -> np.ndarray:
        return np.asarray(seg.find(bgr).xyxy, dtype=np.float32).reshape(-1, 4)

    return find


def match_box(found: np.ndarray, gt: np.ndarray) -> np.ndarray | None:
    """The found box whose centre lies inside ``gt`` (best IoU among those), or None."""
    found = np.asarray(found, dtype=np.float32).reshape(-1, 4)
    if not len(found):
        return None
    cx = (found[:, 0] + found[:, 2]) / 2
    cy = (found[:, 1] + found[:, 3]) / 2
    inside = (cx >= gt[0]) & (cx <= gt[2]) & (cy >= gt[1]) & (cy <= gt[3])
    if not inside.any():
        return None
    ious = box_iou(found, gt[None])[:, 0]
    ious[~inside] = -1.0
    return found[int(np.argmax(ious))]


# ----------------------------------------------------------------------------------- readers


def singular_label(name: str) -> str:
    """Folder name -> cell label: lower-case, singular (``EOSINOPHILS`` -> ``eosinophil``)."""
    label = name.strip().lower().replace(" ", "_")
    if label.endswith("s") and label[:-1] in CELL_TYPES:
        label = label[:-1]
    return label


def read_image(path: str | Path) -> np.ndarray:
    """Read a BGR uint8 image or raise InputError naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{path}: cannot read image")
    return img


def is_voc(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "wbc_types.csv").is_file()


def central_square_box(width: int, height: int, rule: CropRule) -> tuple[float, ...]:
    """Box whose crop-rule window is the central square of a width x height image."""
    side = min(width, height) / (1.0 + 2.0 * rule.margin)
    cx, cy = width / 2.0, height / 2.0
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


_KAGGLE_COPY = re.compile(r"^_\d+_(\d+)$")


def read_class_folders(
    root: str | Path, rule: CropRule, finder: BoxFinder | None = None
) -> DataSet:
    """Read a folder-per-class tree (class = folder name, singular, lower-case)."""
    root = Path(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples: list[Sample] = []
    sources: Counter = Counter()
    for d in class_dirs:
        label = singular_label(d.name)
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:
            m = _KAGGLE_COPY.match(p.stem)
            group = f"{root.name}/{m.group(1)}" if m else f"{root.name}/{label}/{p.stem}"
            img = read_image(p)
            h, w = img.shape[:2]
            box, source = None, "central_square"
            if finder is not None:
                found = finder(img)
                if len(found):
                    c = (found[:, :2] + found[:, 2:]) / 2
                    dist = np.hypot(c[:, 0] - w / 2, c[:, 1] - h / 2)
                    i = int(np.argmin(dist))
                    if dist[i] <= CENTRE_TOLERANCE * min(w, h):
                        box, source = tuple(float(v) for v in found[i]), "segmenter"
            if box is None:
                box = central_square_box(w, h, rule)
            sources[source] += 1
            samples.append(Sample(str(p), box, label, group, source))
    if not samples:
        raise InputError(f"{root}: no images found in class sub-folders")
    classes = tuple(sorted({s.label for s in samples}, key=_class_order))
    info = {"kind": "class_folders", "sources": dict(sources)}
    return DataSet(samples, classes, info)


def _voc_wbc_boxes(xml_path: Path) -> list[tuple[float, float, float, float]]:
    """GT WBC boxes of one Pascal VOC file (SEG's training.voc reader)."""
    from training.voc import read_annotation

    return [tuple(float(v) for v in b) for b in read_annotation(xml_path)["wbc"]]


def read_wbc_types(csv_path: Path) -> dict[str, str]:
    """``image -> wbc_type`` from wbc_types.csv."""
    out: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            name = (row.get("image") or "").strip()
            label = (row.get("wbc_type") or "").strip().lower()
            if name and label:
                out[name] = label
    if not out:
        raise InputError(f"{csv_path}: no rows with image,wbc_type")
    return out


def read_voc(root: str | Path, finder: BoxFinder | None = None) -> DataSet:
    """Read a Pascal VOC folder with wbc_types.csv: one sample (the main WBC) per labelled image."""
    root = Path(root)
    types = read_wbc_types(root / "wbc_types.csv")
    samples: list[Sample] = []
    sources: Counter = Counter()
    skipped: list[str] = []
    for name, label in sorted(types.items()):
        img_path = root / "JPEGImages" / name
        xml_path = root / "Annotations" / (Path(name).stem + ".xml")
        if not img_path.is_file() or not xml_path.is_file():
            skipped.append(name)
            continue
        gts = _voc_wbc_boxes(xml_path)
        if not gts:
            skipped.append(name)
            continue
        gt = np.array(max(gts, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])), dtype=np.float32)
        box, source = None, "gt_box"
        if finder is not None:
            m = match_box(finder(read_image(img_path)), gt)
            if m is not None:
                box, source = m, "segmenter"
        if box is None:
            box = gt
        sources[source] += 1
        samples.append(
            Sample(str(img_path), tuple(float(v) for v in box), label, Path(name).stem, source)
        )
    if skipped:
        log.warning("%s: %d labelled images skipped (missing file or no WBC box)", root,
                    len(skipped))
    classes = tuple(sorted({s.label for s in samples}, key=_class_order))
    info = {
        "kind": "voc",
        "sources": dict(sources),
        "segmenter_missed": int(sources.get("gt_box", 0)) if finder is not None else None,
        "skipped_images": skipped,
    }
    return DataSet(samples, classes, info)


def _class_order(label: str) -> tuple[int, str]:
    return (CELL_TYPES.index(label) if label in CELL_TYPES else len(CELL_TYPES), label)


def load_datasets(
    folders: Sequence[str | Path],
    rule: CropRule,
    finder: BoxFinder | None | str = "default",
    min_images: int = 5,
) -> DataSet:
    """Read and merge data folders; drop classes with fewer than ``min_images`` images (groups)."""
    if finder == "default":
        finder = default_box_finder()
    parts: list[DataSet] = []
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            raise InputError(f"{p}: not a folder")
        parts.append(read_voc(p, finder) if is_voc(p) else read_class_folders(p, rule, finder))
    samples = [s for d in parts for s in d.samples]
    groups_per_class: dict[str, set[str]] = {}
    for s in samples:
        groups_per_class.setdefault(s.label, set()).add(s.group)
    dropped = {c: len(g) for c, g in groups_per_class.items() if len(g) < min_images}
    if dropped:
        log.warning("dropping classes with fewer than %d images: %s", min_images, dropped)
    samples = [s for s in samples if s.label not in dropped]
    if not samples:
        raise InputError(f"no class has at least {min_images} images in {list(map(str, folders))}")
    classes = tuple(sorted({s.label for s in samples}, key=_class_order))
    sources: Counter = Counter()
    for d in parts:
        sources.update(d.info.get("sources", {}))
    info = {
        "datasets": [str(Path(f).name) for f in folders],
        "kinds": [d.info["kind"] for d in parts],
        "sources": dict(sources),
        "dropped_classes": dropped,
        "min_images": min_images,
        "segmenter_used": finder is not None,
    }
    return DataSet(samples, classes, info)


# ----------------------------------------------------------------------------------- splitting


def split_by_group(
    ds: DataSet, fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Stratified, seeded split of the groups (images) -> (rest, held_out) group lists.

    Each group is stratified by its first sample's label; every class with >= 2 groups keeps at
    least one in each part. Crops of one image never land on both sides.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    seen: set[str] = set()
    for s in ds.samples:
        if s.group not in seen:
            seen.add(s.group)
            by_class.setdefault(s.label, []).append(s.group)
    rest: list[str] = []
    held: list[str] = []
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        n = len(groups)
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        held += groups[:k]
        rest += groups[k:]
    return sorted(rest), sorted(held)


# ----------------------------------------------------------------------------------- crops


class ImageCache:
    """Reads each image once (BCCD is ~260 MB decoded: fine in RAM)."""

    def __init__(self) -> None:
        self._images: dict[str, np.ndarray] = {}

    def __call__(self, path: str) -> np.ndarray:
        img = self._images.get(path)
        if img is None:
            img = self._images[path] = read_image(path)
        return img


def jitter_box(box: Sequence[float], rng: np.random.Generator, amount: float) -> np.ndarray:
    """Shift the box centre by up to ``amount`` of its size and scale its sides by 1 +- amount."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2 + rng.uniform(-amount, amount) * w
    cy = (y1 + y2) / 2 + rng.uniform(-amount, amount) * h
    s = 1.0 + rng.uniform(-amount, amount)
    w, h = w * s, h * s
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32)


def cut_crops(
    samples: Sequence[Sample],
    rule: CropRule,
    copies: int = 1,
    jitter: float = 0.0,
    seed: int = 0,
    cache: ImageCache | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N*copies, S, S, 3) BGR uint8 and the sample index of each crop.

    The first copy of every sample is the exact box; further copies jitter the box (simulating the
    segmenter's box noise). All copies of a sample share its group.
    """
    cache = cache or ImageCache()
    rng = np.random.default_rng(seed)
    out = np.empty((len(samples) * copies, rule.size, rule.size, 3), dtype=np.uint8)
    index = np.empty(len(samples) * copies, dtype=np.int64)
    k = 0
    for i, s in enumerate(samples):
        img = cache(s.image)
        for c in range(copies):
            box = np.asarray(s.box, np.float32) if c == 0 else jitter_box(s.box, rng, jitter)
            out[k] = crop_cell(img, box, rule)
            index[k] = i
            k += 1
    return out, index


def preprocess(crops_bgr: np.ndarray) -> np.ndarray:
    """BGR uint8 crops -> RGB float32 in [-1, 1] (MobileNetV2), exactly as the run time does."""
    rgb = np.ascontiguousarray(crops_bgr[..., ::-1]).astype(np.float32)
    return rgb / 127.5 - 1.0
