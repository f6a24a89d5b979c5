"""Dataset readers: class lists, each benchmark's prepared layout, and custom-folder checks.

Each test writes a tiny copy of a layout under tmp_path (images + label files in the right format)
and checks what the reader returns, including how the ignore/background convention is mapped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vocabseg.data import (
    CLASS_LISTS,
    DATASETS,
    IGNORE_INDEX,
    WIDE_IGNORE_INDEX,
    PadToSize,
    RandomFlip,
    build_dataset,
    collate_batch,
    load_class_names,
    read_class_file,
)
from vocabseg.data.transforms import Compose, RandomCrop
from vocabseg.errors import DatasetError, UserError

# --------------------------------------------------------------------------------------------
# helpers that write files in the benchmarks' formats
# --------------------------------------------------------------------------------------------


def _rgb(path: Path, h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _png8(path: Path, arr) -> None:
    """8-bit grayscale ('L') PNG of class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _png_p(path: Path, arr) -> None:
    """Palette ('P') PNG whose pixel values are the class indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(arr, dtype=np.uint8)
    im = Image.frombytes("P", (a.shape[1], a.shape[0]), a.tobytes())
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def _img16(path: Path, arr) -> None:
    """16-bit single-channel label (TIFF or PNG, from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint16)).save(path)


def _lab(values, h: int = 6, w: int = 8) -> np.ndarray:
    """An h x w label whose first pixels hold ``values`` and the rest the first value."""
    out = np.full(h * w, values[0], dtype=np.int64)
    out[: len(values)] = values
    return out.reshape(h, w)


# --------------------------------------------------------------------------------------------
# class lists
# --------------------------------------------------------------------------------------------


def test_class_list_counts_and_anchors():
    counts = {name: len(load_class_names(name)) for name in CLASS_LISTS}
    assert counts == {
        "ade150": 150,
        "ade847": 847,
        "coco_stuff171": 171,
        "pascal_context59": 59,
        "pascal_context459": 459,
        "voc20": 20,
    }
    for name in CLASS_LISTS:
        names = load_class_names(name)
        assert len(set(names)) == len(names), name
        assert all(n and n == n.strip() and not n.startswith("#") for n in names), name
    # anchors at known indices (the header comments are not classes)
    ade150 = load_class_names("ade150")
    assert ade150[0] == "wall" and ade150[8] == "window" and ade150[149] == "flag"
    ade847 = load_class_names("ade847")
    assert ade847[0] == "wall" and ade847[244] == "roof" and ade847[846] == "adding machine, totalizer, totaliser"
    coco = load_class_names("coco_stuff171")
    assert coco[0] == "person" and coco[79] == "toothbrush" and coco[80] == "banner" and coco[170] == "wood"
    pc59 = load_class_names("pascal_context59")
    assert pc59[0] == "aeroplane" and pc59[49] == "diningtable" and pc59[58] == "wood"
    pc459 = load_class_names("pascal_context459")
    assert pc459[0] == "accordion" and pc459[2] == "air conditioner" and pc459[458] == "wool"
    voc = load_class_names("voc20")
    assert voc[0] == "aeroplane" and voc[14] == "person" and voc[19] == "tv"


def test_class_list_aliases_copies_and_unknown():
    assert load_class_names("ADE20K-150") == load_class_names("ade150")
    assert load_class_names("pc459") == load_class_names("pascal_context459")
    names = load_class_names("voc20")
    names.append("extra")
    assert len(load_class_names("voc20")) == 20  # callers get a copy
    with pytest.raises(DatasetError, match="Unknown class list"):
        load_class_names("imagenet")


def test_read_class_file_rules(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("# my classes\ncat\n  dog  \nsky\n\n\n", encoding="utf-8")
    assert read_class_file(p) == ["cat", "dog", "sky"]
    p.write_text("cat\n\ndog\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is empty"):
        read_class_file(p)
    p.write_text("cat\ndog\ncat\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="twice"):
        read_class_file(p)
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no class names"):
        read_class_file(p)


def test_datasets_dict_lists_all_readers():
    assert set(DATASETS) == set(CLASS_LISTS) | {"custom"}
    assert issubclass(DatasetError, UserError)


# --------------------------------------------------------------------------------------------
# ADE20K-150
# --------------------------------------------------------------------------------------------


def test_ade150_raw_annotations_reduce_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for i, stem in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        _rgb(base / "images/validation" / f"{stem}.jpg", seed=i)
        _png8(base / "annotations/validation" / f"{stem}.png", _lab([0, 1, 150, 75]))
    _rgb(base / "images/training/ADE_train_00000001.jpg")
    _png8(base / "annotations/training/ADE_train_00000001.png", _lab([3]))

    ds = build_dataset("ade150", tmp_path, split="val")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.ignore_index == IGNORE_INDEX
    assert ds.files[0] == (
        base / "images/validation/ADE_val_00000001.jpg",
        base / "annotations/validation/ADE_val_00000001.png",
    )
    item = ds[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 6, 8)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (6, 8)
    assert item["index"] == 1 and item["name"] == "ADE_val_00000002"
    # 0 ("other") -> ignore, every class shifted down by one
    assert item["label"].flatten()[:4].tolist() == [255, 0, 149, 74]
    assert item["label"].flatten()[4:].unique().tolist() == [255]

    train = build_dataset("ade150", tmp_path / "ADEChallengeData2016", split="train")  # the folder itself
    assert len(train) == 1 and train[0]["label"].unique().tolist() == [2]


def test_ade150_prefers_detectron2_annotations(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _rgb(base / "images/validation/x.jpg")
    _png8(base / "annotations/validation/x.png", _lab([1]))  # raw: would read as class 0
    _png8(base / "annotations_detectron2/validation/x.png", _lab([7, 255]))  # prepared: already shifted
    ds = build_dataset("ade150", tmp_path)
    assert ds.files[0][1].parent.name == "validation" and ds.files[0][1].parent.parent.name == "annotations_detectron2"
    assert ds[0]["label"].flatten()[:2].tolist() == [7, 255]


def test_ade150_raw_value_above_150_is_reported(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _rgb(base / "images/validation/x.jpg")
    _png8(base / "annotations/validation/x.png", _lab([5, 151]))
    ds = build_dataset("ade150", tmp_path)
    with pytest.raises(DatasetError, match=r"x\.png contains the value 151"):
        ds[0]


def test_missing_layout_names_expected_folder(tmp_path):
    (tmp_path / "ADEChallengeData2016" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="annotations_detectron2/validation"):
        build_dataset("ade150", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("ade150", tmp_path / "nope")
    with pytest.raises(DatasetError, match="Unknown dataset"):
        build_dataset("cityscapes", tmp_path)
    with pytest.raises(DatasetError, match="split"):
        build_dataset("ade150", tmp_path, split="test")


# --------------------------------------------------------------------------------------------
# ADE20K-847 and PASCAL-Context-459: 16-bit TIFF, 65535 = ignore
# --------------------------------------------------------------------------------------------


def test_ade847_uint16_tif(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    for i, stem in enumerate(["ADE_frame_1", "ADE_frame_2", "ADE_frame_3"]):
        _rgb(base / "images_detectron2/validation" / f"{stem}.jpg", seed=i)
        _img16(base / "annotations_detectron2/validation" / f"{stem}.tif", _lab([0, 300, 846, 65535]))
    ds = build_dataset("ade847", tmp_path, split="val")
    assert len(ds) == 3 and len(ds.class_names) == 847
    assert ds.ignore_index == WIDE_IGNORE_INDEX == 65535
    lab = ds[2]["label"]
    assert lab.dtype == torch.int64 and lab.flatten()[:4].tolist() == [0, 300, 846, 65535]
    # the dataset folder itself also works
    assert len(build_dataset("ade847", base)) == 3


def test_ade847_value_847_is_rejected(tmp_path):
    base = tmp_path / "ADE20K_2021_17_01"
    _rgb(base / "images_detectron2/validation/a.jpg")
    _img16(base / "annotations_detectron2/validation/a.tif", _lab([847]))
    with pytest.raises(DatasetError, match="value 847"):
        build_dataset("ade847", tmp_path)[0]


def test_pascal_context459_tif(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    for i, stem in enumerate(["2008_000002", "2008_000003"]):
        _rgb(voc / "JPEGImages" / f"{stem}.jpg", seed=i)
        _img16(voc / "annotations_detectron2/pc459_val" / f"{stem}.tif", _lab([458, 0, 65535]))
    _rgb(voc / "JPEGImages" / "2008_000999.jpg")  # an image without label (e.g. a train image): skipped
    ds = build_dataset("pascal_context459", tmp_path)
    assert len(ds) == 2 and ds.num_classes == 459 and ds.ignore_index == 65535
    assert ds[0]["label"].flatten()[:3].tolist() == [458, 0, 65535]
    with pytest.raises(DatasetError, match="pcontext_full/train/label.*only split 'val'"):
        build_dataset("pascal_context459", tmp_path, split="train")


# --------------------------------------------------------------------------------------------
# PASCAL-Context-59, VOC-20, COCO-Stuff-171: 8-bit PNG, 255 = ignore
# --------------------------------------------------------------------------------------------


def test_pascal_context59_catseg_and_san_layouts(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    _rgb(voc / "JPEGImages/2008_000002.jpg")
    _png8(voc / "annotations_detectron2/pc59_val/2008_000002.png", _lab([58, 255, 0]))
    ds = build_dataset("pc59", tmp_path)
    assert ds.name == "pascal_context59" and len(ds) == 1 and ds.num_classes == 59
    assert ds[0]["label"].flatten()[:3].tolist() == [58, 255, 0]
    with pytest.raises(DatasetError):
        build_dataset("pascal_context59", tmp_path, split="train")  # only val is prepared in this layout

    san = tmp_path / "san_root"
    for split, stems in [("train", ["a", "b"]), ("val", ["c"])]:
        for s in stems:
            _rgb(san / "pcontext" / split / "image" / f"{s}.jpg")
            _png8(san / "pcontext" / split / "label" / f"{s}.png", _lab([1]))
    assert len(build_dataset("pascal_context59", san, split="train")) == 2
    assert len(build_dataset("pascal_context59", san, split="val")) == 1


def test_voc20_background_is_ignored_and_images_without_labels_skipped(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i, stem in enumerate(["2007_000033", "2007_000042", "2007_000061"]):
        _rgb(voc / "JPEGImages" / f"{stem}.jpg", seed=i)
    _png8(voc / "annotations_detectron2/val/2007_000033.png", _lab([255, 0, 19]))
    _png8(voc / "annotations_detectron2/val/2007_000042.png", _lab([14]))
    _png8(voc / "annotations_detectron2/train/2007_000061.png", _lab([3]))
    val = build_dataset("voc20", tmp_path, split="val")
    assert [Path(i).stem for i, _ in val.files] == ["2007_000033", "2007_000042"]
    assert val.num_classes == 20 and val.ignore_index == 255
    assert val[0]["label"].flatten()[:3].tolist() == [255, 0, 19]
    assert len(build_dataset("voc", voc, split="train")) == 1
    # a label whose image is missing is an error naming the count and the first file
    _png8(voc / "annotations_detectron2/val/2099_000001.png", _lab([1]))
    with pytest.raises(DatasetError, match=r"1 of 3 label files .* \(first: 2099_000001\.png\)"):
        build_dataset("voc20", tmp_path, split="val")


def test_coco_stuff171_splits(tmp_path):
    coco = tmp_path / "coco"
    for split, stems in [("train2017", ["000000000009"]), ("val2017", ["000000000139", "000000000285"])]:
        for i, s in enumerate(stems):
            _rgb(coco / split / f"{s}.jpg", seed=i)
            _png8(coco / "stuffthingmaps_detectron2" / split / f"{s}.png", _lab([0, 170, 255]))
    val = build_dataset("coco_stuff171", tmp_path, split="val")
    train = build_dataset("coco_stuff", tmp_path, split="train")
    assert (len(val), len(train)) == (2, 1)
    assert val.num_classes == 171 and val.ignore_index == 255
    assert train[0]["label"].flatten()[:3].tolist() == [0, 170, 255]
    _png8(coco / "stuffthingmaps_detectron2/val2017/000000000285.png", _lab([171]))
    ds = build_dataset("coco_stuff171", tmp_path)  # structure is fine; the bad value is found on read
    ds[0]
    with pytest.raises(DatasetError, match=r"000000000285\.png contains the value 171"):
        ds[1]


# --------------------------------------------------------------------------------------------
# custom folders
# --------------------------------------------------------------------------------------------


def _custom(root: Path, stems=("a", "b", "c"), classes=("cat", "dog", "sky")) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    for i, s in enumerate(stems):
        _rgb(root / "images" / f"{s}.{'png' if i % 2 else 'jpg'}", seed=i)
        _png8(root / "labels" / f"{s}.png", _lab([i % len(classes), 255]))
    return root


def test_custom_basic_formats(tmp_path):
    root = _custom(tmp_path / "ds")
    _png_p(root / "labels/b.png", _lab([2, 255, 1]))  # palette PNG: pixel values are the classes
    _img16(root / "labels/c.png", _lab([1, 65535, 2]))  # 16-bit PNG: 65535 = ignore
    ds = build_dataset("custom", root)
    assert len(ds) == 3 and ds.class_names == ["cat", "dog", "sky"] and ds.ignore_index == 255
    assert [Path(i).name for i, _ in ds.files] == ["a.jpg", "b.png", "c.jpg"]
    assert ds[0]["label"].flatten()[:2].tolist() == [0, 255]
    assert ds[1]["label"].flatten()[:3].tolist() == [2, 255, 1]
    assert ds[2]["label"].flatten()[:3].tolist() == [1, 255, 2]
    img = np.array(Image.open(root / "images/b.png"))
    assert torch.equal(ds[1]["image"], torch.from_numpy(img).permute(2, 0, 1))  # exact pixels, CHW
    assert ds.verify() == 3


def test_custom_split_files(tmp_path):
    root = _custom(tmp_path / "ds", stems=("a", "b", "c", "d"))
    assert len(build_dataset("custom", root, split="train")) == 4  # no split files: all images
    (root / "train.txt").write_text("a\nb.jpg\n# comment\n\nd\n", encoding="utf-8")
    (root / "val.txt").write_text("c\n", encoding="utf-8")
    train = build_dataset("custom", root, split="train")
    val = build_dataset("custom", root, split="val")
    assert [ds.stem(i) for ds in [train] for i in range(len(ds))] == ["a", "b", "d"]
    assert [val.stem(0)] == ["c"]
    assert len(build_dataset("custom", root, split="all")) == 4
    (root / "val.txt").unlink()
    with pytest.raises(DatasetError, match="no val.txt"):
        build_dataset("custom", root, split="val")
    (root / "train.txt").write_text("a\nzzz\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"1 of 2 names .*'zzz'"):
        build_dataset("custom", root, split="train")


def test_custom_missing_classes_txt(tmp_path):
    root = _custom(tmp_path / "ds")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="no classes.txt"):
        build_dataset("custom", root)


def test_custom_images_without_labels(tmp_path):
    root = _custom(tmp_path / "ds")
    (root / "labels/a.png").unlink()
    (root / "labels/c.png").unlink()
    with pytest.raises(DatasetError, match=r"2 of 3 images have no label .*first: a\.jpg needs a\.png"):
        build_dataset("custom", root)


def test_custom_label_value_out_of_range(tmp_path):
    root = _custom(tmp_path / "ds")
    _png8(root / "labels/b.png", _lab([1, 3]))  # 3 classes: 3 is not a class and not 255
    ds = build_dataset("custom", root)  # building succeeds
    ds[0]
    with pytest.raises(DatasetError, match=r"b\.png contains the value 3 at row 0, column 1"):
        ds[1]
    with pytest.raises(DatasetError, match="value 3"):
        ds.verify()


def test_custom_empty_and_missing_folders(tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("cat\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="contains no images"):
        build_dataset("custom", root)
    (root / "images" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="contains no images"):
        build_dataset("custom", root)
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("custom", tmp_path / "missing")
    (root / "labels").rmdir()
    with pytest.raises(DatasetError, match="no labels/ folder"):
        build_dataset("custom", root)


def test_custom_bad_label_files(tmp_path):
    root = _custom(tmp_path / "ds")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "labels/a.png")  # colour label
    ds = build_dataset("custom", root)
    with pytest.raises(DatasetError, match="mode RGB"):
        ds[0]
    _png8(root / "labels/a.png", np.zeros((5, 8)))  # wrong size
    with pytest.raises(DatasetError, match="labels must have the image's size"):
        ds[0]


def test_custom_many_classes_uses_wide_ignore(tmp_path):
    classes = [f"class {i}" for i in range(300)]
    root = _custom(tmp_path / "ds", stems=("a",), classes=classes)
    _img16(root / "labels/a.png", _lab([299, 65535, 256]))
    ds = build_dataset("custom", root)
    assert ds.ignore_index == 65535
    assert ds[0]["label"].flatten()[:3].tolist() == [299, 65535, 256]
    _png8(root / "labels/a.png", _lab([254, 255]))  # 8-bit file: 255 = ignore -> dataset's 65535
    assert ds[0]["label"].flatten()[:2].tolist() == [254, 65535]


# --------------------------------------------------------------------------------------------
# transforms through the dataset
# --------------------------------------------------------------------------------------------


def test_dataset_transform_seeded_by_epoch_and_index(tmp_path):
    root = _custom(tmp_path / "ds", stems=("a", "b"))
    for s in ("a", "b"):
        _rgb(root / "images" / f"{s}.jpg", h=40, w=50, seed=7)
        for p in (root / "images").glob(f"{s}.png"):
            p.unlink()
        _png8(root / "labels" / f"{s}.png", np.random.default_rng(1).integers(0, 3, (40, 50)))
    t = Compose([RandomCrop(16), RandomFlip(0.5), PadToSize(20)])
    ds = build_dataset("custom", root, transform=t, seed=3)
    first = [ds[0]["image"] for _ in range(2)]
    assert torch.equal(first[0], first[1])  # same (seed, epoch, index): same crop
    epoch0 = [ds[i]["image"] for i in range(2)]
    ds.set_epoch(1)
    epoch1 = [ds[i]["image"] for i in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(epoch0))
    batch = collate_batch([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 20, 20) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (2, 20, 20) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1] and batch["name"] == ["a", "b"]
    assert (batch["label"][:, 16:, :] == 255).all()  # padding is ignore
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_batch)
    assert torch.equal(next(iter(loader))["image"], batch["image"])
