"""RefCOCO readers: the restricted unpickler, RLE decoding, and a tiny fake dataset in the refer layout."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from vocabseg.data import refcoco as R
from vocabseg.errors import DatasetError

# ----------------------------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Plain:
    pass


def test_unpickler_refuses_os_system_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps([{"ref_id": 1}, _Evil(marker)], protocol=2)
    with pytest.raises(DatasetError, match="system"):
        R.safe_load_pickle(data)
    assert not marker.exists()
    for protocol in (0, 2, 4, 5):
        with pytest.raises(DatasetError):
            R.safe_load_pickle(pickle.dumps(_Evil(marker), protocol=protocol))
    assert not marker.exists()


@pytest.mark.parametrize("obj", [_Plain(), {"a": _Plain()}, {1, 2}, frozenset({1}), b"bytes", 1 + 2j,
                                 __import__("collections").OrderedDict(a=1)])
def test_unpickler_refuses_classes_and_other_types(obj):
    for protocol in (2, 4):
        with pytest.raises(DatasetError):
            R.safe_load_pickle(pickle.dumps(obj, protocol=protocol))


def test_unpickler_accepts_plain_data(tmp_path):
    obj = [{"ref_id": 3, "sentences": [{"sent": "man on left", "sent_id": 7}], "split": "val", "x": (1, 2.5),
            "ok": True, "none": None, "big": 2**70}]
    for protocol in (0, 2, 4, 5):
        assert R.safe_load_pickle(pickle.dumps(obj, protocol=protocol)) == obj
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    assert R.safe_load_pickle(path) == obj
    with pytest.raises(DatasetError):
        R.safe_load_pickle(b"not a pickle")


# ----------------------------------------------------------------------------------------------- RLE


def _rle_of(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    runs.append(n)
    return runs


def test_rle_uncompressed_and_compressed_round_trip():
    rng = np.random.default_rng(0)
    mask = np.zeros((37, 23), bool)
    mask[5:30, 3:20] = rng.random((25, 17)) > 0.3
    counts = _rle_of(mask)
    assert np.array_equal(R.decode_rle({"size": [37, 23], "counts": counts}), mask)
    s = R.encode_rle_counts(counts)
    assert R.decode_rle_counts(s) == counts
    assert np.array_equal(R.decode_rle({"size": [37, 23], "counts": s}), mask)
    assert np.array_equal(R.decode_rle({"size": [37, 23], "counts": s.encode()}), mask)
    # hand-checked strings of COCO's format: small runs are single characters, 100 takes two groups ("T3"),
    # and from the fourth run on values are deltas (negative ones set the sign bit)
    assert R.decode_rle_counts("32") == [3, 2]
    assert R.encode_rle_counts([100]) == "T3"
    assert R.decode_rle_counts(R.encode_rle_counts([1, 1, 10, 4, 2, 90])) == [1, 1, 10, 4, 2, 90]
    assert R.encode_rle_counts([1, 1, 10, 4]) == "11:3"
    with pytest.raises(DatasetError):
        R.decode_rle({"size": [2, 2], "counts": [1, 1]})


# ----------------------------------------------------------------------------------------------- a fake RefCOCO


def _make_fake_refcoco(root, refs_format="pickle", folder="refcoco", split_by="unc"):
    img_dir = root / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    images = [{"id": 11, "file_name": "COCO_train2014_000000000011.jpg", "height": 40, "width": 60},
              {"id": 12, "file_name": "COCO_train2014_000000000012.jpg", "height": 30, "width": 50}]
    for im in images:
        Image.fromarray(np.full((im["height"], im["width"], 3), 128, np.uint8)).save(img_dir / im["file_name"])
    crowd = np.zeros((30, 50), bool)
    crowd[10:20, 30:45] = True
    annotations = [
        {"id": 101, "image_id": 11, "category_id": 1, "iscrowd": 0,
         "segmentation": [[10, 5, 29, 5, 29, 19, 10, 19]]},  # rectangle x 10..29, y 5..19
        {"id": 102, "image_id": 11, "category_id": 2, "iscrowd": 0,
         "segmentation": [[40, 30, 50, 30, 50, 35, 40, 35], [0, 0, 3, 0, 3, 3, 0, 3]]},  # two parts
        {"id": 103, "image_id": 12, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [30, 50], "counts": R.encode_rle_counts(_rle_of(crowd))}},
        {"id": 104, "image_id": 12, "category_id": 3, "iscrowd": 1,
         "segmentation": {"size": [30, 50], "counts": _rle_of(~crowd)}},
    ]
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                              "categories": []}))
    s = lambda text, i: {"sent": text, "raw": text.upper(), "sent_id": i, "tokens": text.split()}  # noqa: E731
    refs = [
        {"ref_id": 1, "ann_id": 101, "image_id": 11, "split": "train", "category_id": 1,
         "file_name": "COCO_train2014_000000000011_101.jpg", "sent_ids": [1, 2],
         "sentences": [s("left box", 1), s("the grey box", 2)]},
        {"ref_id": 2, "ann_id": 102, "image_id": 11, "split": "val", "category_id": 2,
         "file_name": "COCO_train2014_000000000011_102.jpg", "sent_ids": [3], "sentences": [s("two pieces", 3)]},
        {"ref_id": 3, "ann_id": 103, "image_id": 12, "split": "testA", "category_id": 3,
         "file_name": "COCO_train2014_000000000012_103.jpg", "sent_ids": [4], "sentences": [s("crowd right", 4)]},
        {"ref_id": 4, "ann_id": 104, "image_id": 12, "split": "testB", "category_id": 3,
         "file_name": "COCO_train2014_000000000012_104.jpg", "sent_ids": [5, 6],
         "sentences": [s("everything else", 5), s("the rest", 6)]},
    ]
    name = f"refs({split_by})"
    if refs_format == "pickle":
        (root / folder / f"{name}.p").write_bytes(pickle.dumps(refs, protocol=2))
    else:
        (root / folder / f"{name}.json").write_text(json.dumps(refs))
    return crowd


@pytest.mark.parametrize("fmt", ["pickle", "json"])
def test_fake_refcoco_loads_masks_and_splits(tmp_path, fmt):
    crowd = _make_fake_refcoco(tmp_path, fmt)
    train = R.RefCOCODataset(tmp_path, "refcoco", "train")
    assert len(train) == 2 and [it["sentence"] for it in train] == ["left box", "the grey box"]
    item = train[0]
    assert item["image"].shape == (3, 40, 60) and item["image"].dtype == np.uint8
    assert item["mask"].shape == (40, 60) and item["mask"].dtype == np.bool_
    expected = np.zeros((40, 60), bool)
    expected[5:20, 10:30] = True
    assert np.array_equal(item["mask"], expected)
    assert item["ref_id"] == 1 and item["sent_id"] == 1 and item["image_id"] == 11

    val = R.RefCOCODataset(tmp_path, "refcoco", "val")
    m = val[0]["mask"]
    assert m[30:36, 40:51].all() and m[0:4, 0:4].all() and m.sum() == 6 * 11 + 16

    assert np.array_equal(R.RefCOCODataset(tmp_path, "refcoco", "testA")[0]["mask"], crowd)
    test_b = R.RefCOCODataset(tmp_path, "refcoco", "testB")
    assert np.array_equal(test_b[1]["mask"], ~crowd) and test_b[1]["sentence"] == "the rest"
    per_ref = R.RefCOCODataset(tmp_path, "refcoco", "testB", per="ref")
    assert len(per_ref) == 1 and per_ref[0]["sentences"] == ["everything else", "the rest"]

    with pytest.raises(DatasetError, match="splits"):
        R.RefCOCODataset(tmp_path, "refcoco", "test")
    with pytest.raises(DatasetError):
        R.RefCOCODataset(tmp_path, "refcoco+", "val")  # no such folder


def test_refcocog_umd_and_conversion(tmp_path):
    _make_fake_refcoco(tmp_path, "pickle", folder="refcocog", split_by="umd")
    # rename splits the UMD way is not needed: the reader takes whatever splits the file has
    ds = R.RefCOCODataset(tmp_path, "refcocog", "val")
    assert ds.split_by == "umd" and len(ds) == 1
    out = R.convert_refs_to_json(tmp_path / "refcocog" / "refs(umd).p")
    assert json.loads(out.read_text())[0]["ref_id"] == 1
    with pytest.raises(DatasetError):
        R.RefCOCODataset(tmp_path, "refcocog", "val", split_by="unc")


def test_malicious_refs_file_is_refused(tmp_path):
    _make_fake_refcoco(tmp_path, "json")
    (tmp_path / "refcoco" / "refs(unc).json").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Evil(marker)], protocol=2))
    with pytest.raises(DatasetError):
        R.RefCOCODataset(tmp_path, "refcoco", "val")
    assert not marker.exists()
