"""Labelled white-cell crops for training and evaluation, cut with the run-time crop rule.

Two kinds of data set are read:

* **Folder per class** (PBC, the Kaggle "blood cell images" layout, e.g. ``eosinophil/*.jpg``):
  the class is the folder name, lower-cased and made singular (``EOSINOPHILS`` -> ``eosinophil``),
  or what a published data set's own name means (``ig``, ``NGS``, ``lymp``: :data:`FOLDER_LABELS`).
  These images are already centred on the cell. When a segmenter is available and finds a cell
  whose centre is near the image centre (within 20 % of the shorter side), that cell's box is cut
  with the crop rule, as at run time. Otherwise a centred box is used whose side is the median
  side of the segmenter's boxes in that class folder (so a missed basophil is framed like a found
  one: the crop's scale never tells the class), or, with no segmenter, the central square of the
  image (a box whose crop-rule window is exactly that square). The group of an image (for
  splitting) is the hash of its bytes, so byte-identical copies fall on one side of a split;
  Kaggle's augmented copies ``_0_1169.jpeg``, ``_1_1169.jpeg`` share the number ``1169``.
* **Pascal VOC with wbc_types.csv** (BCCD), read with :func:`training.voc.read_voc`: one labelled
  white cell per image. The "main" white cell is the largest ground-truth ``WBC`` box. The crop
  comes from the *segmenter's* box for that cell (the detection whose centre lies inside the GT box,
  the best IoU if several), so training sees the boxes the run time produces; if the segmenter
  misses it the GT box is used and counted in ``DataSet.info``. Optionally the image's platelet
  boxes give ``platelet`` samples and a few red-cell boxes ``artefact`` samples (``extra=True``:
  trained on, but the per-source figures score the main white cells only).

Every sample keeps its image id as ``group``: splits are made by group, never by crop or copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detector.core import box_iou
from detector.crop import CropRule, crop_cell
from detector.errors import InputError
from stream.images import IMAGE_EXTENSIONS, read_image

log = logging.getLogger(__name__)

#: The labels a model may name, in output order: the six white-cell kinds, the nucleated red
#: cell, and the two kinds that veto a candidate (platelet, artefact).
LABEL_ORDER: tuple[str, ...] = (
    "neutrophil", "eosinophil", "basophil", "lymphocyte", "monocyte", "immature_granulocyte",
    "erythroblast", "platelet", "artefact",
)
#: Red-cell boxes taken as ``artefact`` samples per VOC image (when extras are asked for).
RBC_PER_IMAGE = 2
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
    source: str  # "segmenter", "gt_box", "central_square" or "class_median_box"
    dataset: str = ""  # name of the data folder it came from (figures are per data set)
    extra: bool = False  # a VOC platelet/red-cell box, not the image's labelled white cell


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

    def where(self, dataset: str | None = None, main_only: bool = False) -> DataSet:
        """Samples of one data folder (all if None), optionally without the VOC extras."""
        return DataSet([s for s in self.samples
                        if (dataset is None or s.dataset == dataset)
                        and not (main_only and s.extra)], self.classes, dict(self.info))

    @property
    def datasets(self) -> list[str]:
        return sorted({s.dataset for s in self.samples})


# ----------------------------------------------------------------------------------- segmenter


def default_box_finder(single: bool = False) -> BoxFinder:
    """The run-time segmenter as a box finder (training crops come from the boxes users get).

    ``single``: the image is a single-cell image (a crop centred on one cell, as in PBC): the
    segmenter's single-cell path, the one the run time takes for such images.
    """
    from detector.segment import Segmenter

    seg = Segmenter()
    method = getattr(seg, "find_single", seg.find) if single else seg.find

    def find(bgr: np.ndarray) -> np.ndarray:
        return np.asarray(method(bgr).xyxy, dtype=np.float32).reshape(-1, 4)

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


#: Class-folder names of published single-cell data sets that are not the label itself (keys
#: lower-case, words joined by ``_``, singular): PBC as published (``ig``), LISC's shortened
#: names, the Munich AML cytomorphology set's codes (Matek et al. 2019), and the names of a cell's
#: sub-kinds (band and segmented neutrophils, the three immature granulocytes). Names that do not
#: say one of the model's kinds (blasts, atypical lymphocytes, smudge cells, LISC's ``mixt``) are
#: left as they are: the evaluation reports them as classes the model does not have.
FOLDER_LABELS: dict[str, str] = {
    # PBC (Acevedo et al. 2020) as published
    "ig": "immature_granulocyte",
    # LISC (Rezatofighi et al. 2011)
    "baso": "basophil", "eosi": "eosinophil", "lymp": "lymphocyte", "mono": "monocyte",
    "neut": "neutrophil",
    # Munich AML cytomorphology (Matek et al. 2019): the kinds of normal blood among its codes
    "bas": "basophil", "eos": "eosinophil", "lyt": "lymphocyte", "mon": "monocyte",
    "ngs": "neutrophil", "ngb": "neutrophil", "pmo": "immature_granulocyte",
    "pmb": "immature_granulocyte", "myb": "immature_granulocyte", "mmz": "immature_granulocyte",
    "ebo": "erythroblast",
    # a cell's sub-kinds and other common spellings
    "segmented_neutrophil": "neutrophil", "band_neutrophil": "neutrophil",
    "neutrophil_segmented": "neutrophil", "neutrophil_band": "neutrophil", "band": "neutrophil",
    "segmented": "neutrophil", "promyelocyte": "immature_granulocyte",
    "myelocyte": "immature_granulocyte", "metamyelocyte": "immature_granulocyte",
    "immature_granulocyte": "immature_granulocyte", "nrbc": "erythroblast",
    "normoblast": "erythroblast", "nucleated_red_cell": "erythroblast",
    "nucleated_red_blood_cell": "erythroblast", "thrombocyte": "platelet", "plt": "platelet",
    "artifact": "artefact",
}


def folder_label(name: str) -> str:
    """Class-folder name -> cell label: lower-case, words joined by ``_``, singular
    (``EOSINOPHILS`` -> ``eosinophil``, ``Band neutrophils`` -> ``neutrophil``), then the
    published data sets' own names (:data:`FOLDER_LABELS`: ``ig``, ``NGS``, ``lymp`` ...). An
    unknown name is kept (lower-case, singular)."""
    label = re.sub(r"[\s\-.]+", "_", name.strip().lower()).strip("_")
    if label not in LABEL_ORDER and label not in FOLDER_LABELS and label.endswith("s"):
        label = label[:-1]
    return FOLDER_LABELS.get(label, label)


def is_voc(folder: Path) -> bool:
    return (folder / "Annotations").is_dir() and (folder / "wbc_types.csv").is_file()


def centred_box(width: int, height: int, side: float) -> tuple[float, ...]:
    """A square box of ``side`` pixels at the image centre."""
    cx, cy = width / 2.0, height / 2.0
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def central_square_box(width: int, height: int, rule: CropRule) -> tuple[float, ...]:
    """Box whose crop-rule window is the central square of a width x height image."""
    side = min(width, height) / (1.0 + 2.0 * rule.margin)
    cx, cy = width / 2.0, height / 2.0
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


_KAGGLE_COPY = re.compile(r"^_\d+_(\d+)$")


def content_group(root: Path, label: str, path: Path, data: bytes) -> str:
    """Split group of a folder-per-class image: Kaggle copy number, else the hash of its bytes."""
    m = _KAGGLE_COPY.match(path.stem)
    if m:
        return f"{root.name}/{m.group(1)}"
    return f"{root.name}/{hashlib.sha1(data).hexdigest()[:16]}"


def class_folder_images(root: Path) -> list[tuple[Path, list[Path]]]:
    """The class folders of a folder-per-class tree, each with its image files (sorted, sub-folders
    included; hidden files such as macOS's ``.DS_*``/``._*`` left out)."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [(d, sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not p.name.startswith("."))) for d in class_dirs]


def read_class_folders(
    root: str | Path, rule: CropRule, finder: BoxFinder | None = None
) -> DataSet:
    """Read a folder-per-class tree (class = folder name, singular, lower-case)."""
    root = Path(root)
    rows: list[tuple[Path, str, str, int, int, tuple[float, ...] | None]] = []
    folders: dict[str, str] = {}  # folder name -> the label it was read as
    for d, files in class_folder_images(root):
        label = folders[d.name] = folder_label(d.name)
        for p in files:
            data = p.read_bytes()
            group = content_group(root, label, p, data)
            try:
                img = read_image(p)
            except InputError as exc:
                log.warning("%s (skipped)", exc)
                continue
            h, w = img.shape[:2]
            box = None
            if finder is not None:
                found = finder(img)
                if len(found):
                    c = (found[:, :2] + found[:, 2:]) / 2
                    dist = np.hypot(c[:, 0] - w / 2, c[:, 1] - h / 2)
                    i = int(np.argmin(dist))
                    if dist[i] <= CENTRE_TOLERANCE * min(w, h):
                        box = tuple(float(v) for v in found[i])
            rows.append((p, label, group, w, h, box))
    if not rows:
        raise InputError(f"{root}: no images found in class sub-folders")
    # a missed cell is framed like the found ones of its class (median side), never by the
    # whole image: the crop's scale must not tell the class
    sides: dict[str, list[float]] = {}
    for _, label, _, _, _, box in rows:
        if box is not None:
            sides.setdefault(label, []).append(max(box[2] - box[0], box[3] - box[1]))
    median_side = {k: float(np.median(v)) for k, v in sides.items() if len(v) >= 3}
    samples: list[Sample] = []
    sources: Counter = Counter()
    for p, label, group, w, h, box in rows:
        source = "segmenter"
        if box is None and label in median_side:
            box, source = centred_box(w, h, min(median_side[label], min(w, h))), "class_median_box"
        elif box is None:
            box, source = central_square_box(w, h, rule), "central_square"
        sources[source] += 1
        samples.append(Sample(str(p), box, label, group, source, dataset=root.name))
    classes = tuple(sorted({s.label for s in samples}, key=_class_order))
    info = {"kind": "class_folders", "sources": dict(sources),
            "median_box_side": {k: round(v, 1) for k, v in median_side.items()},
            "folders": folders}
    return DataSet(samples, classes, info)


def read_voc(root: str | Path, finder: BoxFinder | None = None, extras: bool = False,
             seed: int = 0) -> DataSet:
    """Read a Pascal VOC folder with wbc_types.csv: one sample (the main WBC) per labelled image.

    With ``extras`` each labelled image also gives its platelet boxes as ``platelet`` samples and
    up to ``RBC_PER_IMAGE`` red-cell boxes (clear of the white cells) as ``artefact`` samples.
    """
    from training.voc import read_voc as read_voc_records

    root = Path(root)
    if not (root / "wbc_types.csv").is_file():
        raise InputError(f"{root}: no wbc_types.csv (image,wbc_type) beside Annotations/")
    records = read_voc_records(root)
    stems = {r.image.stem for r in records}
    from training.voc import read_wbc_types

    types = read_wbc_types(root / "wbc_types.csv")
    if not types:
        raise InputError(f"{root / 'wbc_types.csv'}: no rows with image,wbc_type")
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    sources: Counter = Counter()
    skipped = sorted(f"{k}.jpg" for k in types if k not in stems)
    for r in records:
        label = r.wbc_type
        if label is None:
            continue
        if not len(r.wbc):
            skipped.append(r.image.name)
            continue
        areas = (r.wbc[:, 2] - r.wbc[:, 0]) * (r.wbc[:, 3] - r.wbc[:, 1])
        gt = r.wbc[int(np.argmax(areas))]
        box, source = None, "gt_box"
        if finder is not None:
            m = match_box(finder(read_image(r.image)), gt)
            if m is not None:
                box, source = m, "segmenter"
        if box is None:
            box = gt
        sources[source] += 1
        group = r.image.stem
        samples.append(Sample(str(r.image), tuple(float(v) for v in box), label, group, source,
                              dataset=root.name))
        if extras:
            for b in r.platelets:
                samples.append(Sample(str(r.image), tuple(float(v) for v in b), "platelet",
                                      group, "gt_box", dataset=root.name, extra=True))
            clear = [b for b in r.rbc if not len(r.wbc) or box_iou(b[None], r.wbc).max() == 0]
            for i in rng.permutation(len(clear))[:RBC_PER_IMAGE]:
                samples.append(Sample(str(r.image), tuple(float(v) for v in clear[i]),
                                      "artefact", group, "gt_box", dataset=root.name, extra=True))
    if skipped:
        log.warning("%s: %d labelled images skipped (missing file or no WBC box)", root,
                    len(skipped))
    classes = tuple(sorted({s.label for s in samples}, key=_class_order))
    info = {
        "kind": "voc",
        "sources": dict(sources),
        "segmenter_missed": int(sources.get("gt_box", 0)) if finder is not None else None,
        "skipped_images": sorted(skipped),
        "extras": dict(Counter(s.label for s in samples if s.extra)),
    }
    return DataSet(samples, classes, info)


def main_wbc_box(image: str | Path) -> np.ndarray:
    """The main (largest) ground-truth WBC box of a VOC image, from its annotation."""
    from training.voc import read_annotation

    image = Path(image)
    wbc = read_annotation(image.parent.parent / "Annotations" / f"{image.stem}.xml")["wbc"]
    if not len(wbc):
        raise InputError(f"{image}: no WBC box in its annotation")
    return wbc[int(np.argmax((wbc[:, 2] - wbc[:, 0]) * (wbc[:, 3] - wbc[:, 1])))]


def _class_order(label: str) -> tuple[int, str]:
    return (LABEL_ORDER.index(label) if label in LABEL_ORDER else len(LABEL_ORDER), label)


def load_datasets(
    folders: Sequence[str | Path],
    rule: CropRule,
    finder: BoxFinder | str | None = "default",
    min_images: int = 5,
    voc_extras: bool = False,
    cache_dir: str | Path | None = None,
) -> DataSet:
    """Read and merge data folders; drop classes with fewer than ``min_images`` images (groups).

    With ``cache_dir`` and the default (run-time) segmenter, each folder's samples are kept in
    ``cache_dir`` keyed by its files, the crop margin, the extras, the segmenter's source and
    (class folders) the folder names' meanings.
    """
    seg_key = None
    if finder == "default":
        import detector.segment as segment

        seg_key = hashlib.sha1(Path(segment.__file__).read_bytes()).hexdigest()
    parts: list[DataSet] = []
    for f in folders:
        p = Path(f)
        if not p.is_dir():
            raise InputError(f"{p}: not a folder")
        cache = None
        if cache_dir is not None and seg_key is not None:
            key = _key([_folder_fingerprint(p), rule.margin, voc_extras and is_voc(p), seg_key,
                        "find" if is_voc(p) else ["find_single", sorted(FOLDER_LABELS.items())]])
            cache = Path(cache_dir) / f"dataset-{p.name}-{key}.json"
        if cache is not None and cache.is_file():
            d = json.loads(cache.read_text())
            parts.append(DataSet([Sample(**{**s, "box": tuple(s["box"])}) for s in d["samples"]],
                                 tuple(d["classes"]), d["info"]))
            log.info("%s: samples read from cache %s", p, cache)
            continue
        if finder == "default":  # built only when a folder is read afresh
            part = (read_voc(p, default_box_finder(), extras=voc_extras) if is_voc(p)
                    else read_class_folders(p, rule, default_box_finder(single=True)))
        else:
            part = (read_voc(p, finder, extras=voc_extras) if is_voc(p)
                    else read_class_folders(p, rule, finder))
        parts.append(part)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"samples": [s.__dict__ for s in part.samples],
                                         "classes": list(part.classes), "info": part.info}))
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
        "per_dataset": {Path(f).name: d.info for f, d in zip(folders, parts, strict=True)},
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

    Each group is stratified by its data folder and its first sample's label (the labelled cell;
    VOC extras come after it); every stratum with >= 2 groups keeps at least one in each part.
    Crops of one image (and byte-identical copies, which share a group) never land on both sides.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[tuple[str, str], list[str]] = {}
    seen: set[str] = set()
    for s in ds.samples:
        if s.group not in seen:
            seen.add(s.group)
            by_class.setdefault((s.dataset, s.label), []).append(s.group)
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


# ----------------------------------------------------------------------------------- caches


def _key(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_fingerprint(folder: Path) -> list:
    root = Path(folder).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root), [(str(p.relative_to(root)), p.stat().st_size, int(p.stat().st_mtime))
                        for p in files]]


def cut_crops_cached(
    samples: Sequence[Sample], rule: CropRule, cache_dir: Path | None, copies: int = 1,
    jitter: float = 0.0, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cut_crops`, kept as ``.npy`` in ``cache_dir`` (epochs and re-runs decode nothing)."""
    if cache_dir is None:
        return cut_crops(samples, rule, copies=copies, jitter=jitter, seed=seed)
    key = _key([[(s.image, s.box) for s in samples], rule.to_dict(), copies, jitter, seed])
    path = Path(cache_dir) / f"crops-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["crops"], z["index"]
    crops, index = cut_crops(samples, rule, copies=copies, jitter=jitter, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, crops=crops, index=index)
    return crops, index
