"""training/data.py: reading folder-per-class and VOC data, the crop rule, splits by image."""

from __future__ import annotations

import numpy as np
import pytest

from detector.crop import CropRule, crop_cell
from detector.errors import InputError
from tests.training.tiny_data import write_class_folders, write_voc
from training.data import (
    central_square_box,
    cut_crops,
    folder_label,
    load_datasets,
    match_box,
    read_class_folders,
    read_voc,
    split_by_group,
)

RULE = CropRule(margin=0.15, size=32)


def test_folder_names_of_published_data_sets_give_the_models_labels():
    assert folder_label("EOSINOPHIL") == "eosinophil"  # Kaggle's blood-cell images
    assert folder_label("NEUTROPHILS") == "neutrophil"
    assert folder_label("Monocyte") == "monocyte"  # Raabin-WBC
    assert folder_label("ig") == "immature_granulocyte"  # PBC as published
    assert [folder_label(n) for n in ("Baso", "eosi", "lymp", "mono", "neut")] == [  # LISC
        "basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert [folder_label(n) for n in ("NGS", "NGB", "MYB", "MMZ", "PMO", "EBO")] == [  # Munich
        "neutrophil", "neutrophil", "immature_granulocyte", "immature_granulocyte",
        "immature_granulocyte", "erythroblast"]
    assert folder_label("Band neutrophils") == "neutrophil"
    assert folder_label("immature granulocytes") == "immature_granulocyte"
    assert folder_label("Platelets") == "platelet"
    # names of no kind the model knows stay as they are (and are reported, not guessed)
    assert [folder_label(n) for n in ("MYO", "mixt", "LYA", "TRAIN")] == [
        "myo", "mixt", "lya", "train"]


def test_class_folders_labels_groups_and_central_square(tmp_path):
    ds = read_class_folders(write_class_folders(tmp_path / "c"), RULE, finder=None)
    assert ds.classes == ("neutrophil", "lymphocyte")
    assert ds.counts() == {"neutrophil": 8, "lymphocyte": 8}
    # Kaggle augmented copies _0_K and _1_K share one group
    assert len(set(ds.groups)) == 8
    s = ds.samples[0]
    assert s.source == "central_square"
    # the crop window of the central-square box is exactly the image's central 64x64 square
    x1, y1, x2, y2 = s.box
    assert (x2 - x1) * (1 + 2 * RULE.margin) == pytest.approx(64)
    assert central_square_box(80, 64, RULE)[0] == pytest.approx(40 - 32 / 1.3)


def test_class_folders_use_segmenter_box_near_centre(tmp_path):
    root = write_class_folders(tmp_path / "c", per_class=2)
    centred = lambda img: np.array([[30, 20, 50, 44], [0, 0, 10, 10]], np.float32)  # noqa: E731
    off = lambda img: np.array([[0, 0, 10, 10]], np.float32)  # noqa: E731
    ds = read_class_folders(root, RULE, finder=centred)
    assert all(s.source == "segmenter" and s.box == (30, 20, 50, 44) for s in ds.samples)
    ds = read_class_folders(root, RULE, finder=off)
    assert all(s.source == "central_square" for s in ds.samples)


def test_voc_main_wbc_gt_fallback_and_segmenter_match(tmp_path):
    root = write_voc(tmp_path / "voc")
    ds = read_voc(root, finder=None)
    assert ds.counts() == {"neutrophil": 3, "lymphocyte": 3}
    assert ds.info["skipped_images"] == ["Img_999.jpg"]
    # image 0 has two WBC boxes: the larger one is the labelled cell
    assert ds.samples[0].box == (50, 30, 90, 72) and ds.samples[0].source == "gt_box"
    finder = lambda img: np.array([[52, 33, 88, 70], [128, 88, 152, 112]], np.float32)  # noqa: E731
    ds = read_voc(root, finder=finder)
    assert ds.samples[0].box == (52, 33, 88, 70) and ds.samples[0].source == "segmenter"
    missing = lambda img: np.zeros((0, 4), np.float32)  # noqa: E731
    ds = read_voc(root, finder=missing)
    assert ds.info["segmenter_missed"] == 6


def test_match_box_prefers_centre_inside_and_best_iou():
    gt = np.array([10, 10, 50, 50], np.float32)
    found = np.array([[0, 0, 8, 8], [12, 12, 48, 48], [30, 30, 70, 70]], np.float32)
    assert match_box(found, gt).tolist() == [12, 12, 48, 48]
    assert match_box(found[:1], gt) is None


def test_crops_use_the_runtime_crop_rule(tmp_path):
    ds = read_voc(write_voc(tmp_path / "voc"), finder=None)
    crops, index = cut_crops(ds.samples, RULE, copies=3, jitter=0.1, seed=1)
    assert crops.shape == (18, 32, 32, 3) and crops.dtype == np.uint8
    assert index.tolist() == [i for i in range(6) for _ in range(3)]
    import cv2

    img = cv2.imread(ds.samples[0].image)
    np.testing.assert_array_equal(crops[0], crop_cell(img, np.array(ds.samples[0].box), RULE))
    assert not np.array_equal(crops[1], crops[0])  # jittered copy


def test_split_by_image_never_leaks_and_is_stratified_and_seeded(tmp_path):
    ds = read_class_folders(write_class_folders(tmp_path / "c"), RULE, finder=None)
    rest, held = split_by_group(ds, 0.25, seed=3)
    assert not set(rest) & set(held)
    assert set(rest) | set(held) == set(ds.groups)
    held_labels = {s.label for s in ds.samples if s.group in held}
    assert held_labels == {"neutrophil", "lymphocyte"}
    assert split_by_group(ds, 0.25, seed=3) == (rest, held)
    # every copy of an image sits on the same side
    for s in ds.subset(held).samples:
        assert s.group not in rest


def test_small_classes_dropped(tmp_path):
    root = write_voc(tmp_path / "voc")
    ds = load_datasets([root], RULE, finder=None, min_images=3)
    assert ds.classes == ("neutrophil", "lymphocyte") and ds.info["dropped_classes"] == {}
    with pytest.raises(InputError, match="no class has at least 4 images"):
        load_datasets([root], RULE, finder=None, min_images=4)
    with pytest.raises(InputError, match="not a folder"):
        load_datasets([tmp_path / "nope"], RULE, finder=None)


def test_real_bccd_voc_reading(bccd_dir):
    ds = load_datasets([bccd_dir], CropRule(size=64), finder=None, min_images=5)
    assert ds.classes == ("neutrophil", "eosinophil", "lymphocyte", "monocyte")
    assert ds.info["dropped_classes"] == {"basophil": 1}
    counts = ds.counts()
    assert counts["lymphocyte"] >= 25 and counts["monocyte"] >= 15 and counts["neutrophil"] > 150
    rest, held = split_by_group(ds, 0.2, seed=0)
    assert not set(rest) & set(held) and len(held) == pytest.approx(0.2 * len(ds.samples), abs=3)


def test_byte_identical_copies_share_a_group_and_stay_on_one_side(tmp_path):
    import shutil

    root = tmp_path / "pbc"
    rng = np.random.default_rng(0)
    import cv2

    from tests.training.tiny_data import cell_image

    for label in ("neutrophil", "lymphocyte"):
        (root / label).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(root / label / f"X_{i}.jpg"), cell_image(label, rng))
    shutil.copy(root / "neutrophil" / "X_0.jpg", root / "neutrophil" / "X_0_copy.jpg")
    (root / "neutrophil" / ".DS_store.jpg").write_bytes(b"not an image")  # hidden: ignored
    ds = read_class_folders(root, RULE, finder=None)
    assert len(ds.samples) == 13 and len(set(ds.groups)) == 12
    g = {"/".join(s.image.rsplit("/", 2)[1:]): s.group for s in ds.samples}
    n0, copy = "neutrophil/X_0.jpg", "neutrophil/X_0_copy.jpg"
    assert g[n0] == g[copy] != g["neutrophil/X_1.jpg"]
    assert g[n0].startswith("pbc/")
    sides = set()
    for seed in range(6):
        rest, held = split_by_group(ds, 0.3, seed=seed)
        both = {"/".join(s.image.rsplit("/", 2)[1:]) for s in ds.subset(held).samples}
        assert (n0 in both) == (copy in both)
        sides.add(n0 in both)
    assert sides == {True, False}  # the pair is held out for some seeds, trained on for others


def test_missed_cells_are_framed_at_their_class_median_box(tmp_path):
    root = write_class_folders(tmp_path / "c", per_class=8)
    calls = {"n": 0}

    def finder(img):  # finds a centred 20-px cell in every other image, nothing in the rest
        calls["n"] += 1
        if calls["n"] % 2:
            return np.array([[30, 22, 50, 42]], np.float32)
        return np.zeros((0, 4), np.float32)

    ds = read_class_folders(root, RULE, finder=finder)
    assert ds.info["sources"] == {"segmenter": 8, "class_median_box": 8}
    missed = [s for s in ds.samples if s.source == "class_median_box"]
    for s in missed:  # centred (80x64 image), 20 px: the found cells' median side
        x1, y1, x2, y2 = s.box
        assert (x2 - x1, y2 - y1) == (pytest.approx(20), pytest.approx(20))
        assert ((x1 + x2) / 2, (y1 + y2) / 2) == (pytest.approx(40), pytest.approx(32))


def test_voc_extras_platelets_and_red_cells_follow_their_image(tmp_path):
    root = write_voc(tmp_path / "voc")
    plain = read_voc(root, finder=None)
    ds = read_voc(root, finder=None, extras=True)
    assert [s for s in ds.samples if not s.extra] == plain.samples
    extras = [s for s in ds.samples if s.extra]
    # each image has one RBC box clear of the WBCs and no platelet box
    assert len(extras) == 6 and {s.label for s in extras} == {"artefact"}
    assert all(s.box == (1, 1, 20, 20) for s in extras)
    mains = {s.group: s.label for s in plain.samples}
    assert {s.group for s in extras} == set(mains)
    # the split stratifies by the labelled cell (first sample of a group), extras follow it
    rest, held = split_by_group(ds, 0.34, seed=0)
    assert {s.label for s in ds.subset(held).samples if not s.extra} == {"neutrophil",
                                                                        "lymphocyte"}
    assert ds.where(main_only=True).samples == plain.samples


def test_split_is_stratified_per_data_folder(tmp_path):
    a = write_class_folders(tmp_path / "a")
    b = write_voc(tmp_path / "b")
    ds = load_datasets([a, b], RULE, finder=None, min_images=2)
    assert ds.datasets == ["a", "b"]
    rest, held = split_by_group(ds, 0.25, seed=0)
    for name in ("a", "b"):
        part = ds.where(name).subset(held)
        assert {s.label for s in part.samples} == {"neutrophil", "lymphocyte"}


def test_dataset_and_crop_caches_give_the_same_answer(tmp_path, monkeypatch):
    import training.data as data

    root = write_voc(tmp_path / "voc")
    finder = lambda img: np.array([[52, 33, 88, 70]], np.float32)  # noqa: E731
    monkeypatch.setattr(data, "default_box_finder", lambda: finder)
    cache = tmp_path / "cache"
    first = load_datasets([root], RULE, min_images=1, cache_dir=cache)
    assert len(list(cache.glob("dataset-voc-*.json"))) == 1
    monkeypatch.setattr(data, "default_box_finder", lambda: pytest.fail("cache not used"))
    second = load_datasets([root], RULE, min_images=1, cache_dir=cache)
    assert second.samples == first.samples and second.classes == first.classes
    x1, i1 = data.cut_crops_cached(first.samples, RULE, cache, copies=2, jitter=0.1)
    x2, i2 = data.cut_crops_cached(first.samples, RULE, cache, copies=2, jitter=0.1)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(i1, i2)
    assert len(list(cache.glob("crops-*.npz"))) == 1
