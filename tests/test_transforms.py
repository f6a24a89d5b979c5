"""Training/evaluation transforms: determinism, sizes, category-area cap, flip, resize, pad, colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocabseg.data.transforms import (
    Compose,
    PadToSize,
    PhotometricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    Resize,
    _hsv_to_rgb,
    _rgb_to_hsv,
    build_eval_transform,
    build_train_transform,
    collate_batch,
    resize_label,
    short_side_choices,
)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label(h: int, w: int, values=(0, 3, 7, 255), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(values, dtype=np.int64), size=(h, w))


def test_train_pipeline_is_deterministic_given_the_seed():
    image, label = _image(90, 120), _label(90, 120)
    t = build_train_transform(64, max_size=256)
    a = t(image, label, _rng(5))
    b = t(image, label, _rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    outs = [t(image, label, _rng(s))[0] for s in range(6)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # different seeds: different data
    # inputs are never modified in place
    assert np.array_equal(image, _image(90, 120)) and np.array_equal(label, _label(90, 120))


@pytest.mark.parametrize("policy", ["choice", "scale", "none"])
@pytest.mark.parametrize("hw", [(90, 120), (20, 30), (200, 70)])
def test_train_pipeline_output_size_dtype_and_label_values(policy, hw):
    image, label = _image(*hw), _label(*hw)
    t = build_train_transform((48, 64), policy=policy, max_size=300, cat_max_ratio=0.9)
    for seed in range(3):
        img, lab = t(image, label, _rng(seed))
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        assert lab.shape == (48, 64) and lab.dtype == np.int64
        assert set(np.unique(lab)) <= {0, 3, 7, 255}


def test_random_crop_sizes():
    image, label = _image(100, 120), _label(100, 120)
    img, lab = RandomCrop(64)(image, label, _rng(0))
    assert img.shape == (64, 64, 3) and lab.shape == (64, 64)
    img, lab = RandomCrop((30, 200))(image, label, _rng(0))  # wider than the image: full width
    assert img.shape == (30, 120, 3) and lab.shape == (30, 120)
    # the crop is a window of the input: find it again from the image content
    img, lab = RandomCrop((40, 50))(image, label, _rng(3))
    ys, xs = np.nonzero((image[:, :, 0] == img[0, 0, 0]) & (image[:, :, 1] == img[0, 0, 1]))
    hits = [(y, x) for y, x in zip(ys, xs) if np.array_equal(image[y : y + 40, x : x + 50], img)]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(label[y : y + 40, x : x + 50], lab)


def _two_class_label() -> np.ndarray:
    # columns 0..59 class 0, 60..99 class 1; a 50-wide window at x has 60-x (x<=60) columns of class 0
    lab = np.zeros((20, 100), np.int64)
    lab[:, 60:] = 1
    return lab


def _max_share(crop: np.ndarray, ignore: int = 255) -> float:
    vals = crop[crop != ignore]
    counts = np.bincount(vals)
    return counts.max() / counts.sum()


def test_cat_max_ratio_is_respected():
    image, label = _image(20, 100), _two_class_label()
    capped = RandomCrop((20, 50), cat_max_ratio=0.8)
    free = RandomCrop((20, 50), cat_max_ratio=1.0)
    shares_capped = [_max_share(capped(image, label, _rng(s))[1]) for s in range(40)]
    shares_free = [_max_share(free(image, label, _rng(s))[1]) for s in range(40)]
    assert max(shares_capped) < 0.8
    assert max(shares_free) >= 0.8  # without the cap such crops do occur, so the test means something


def test_cat_max_ratio_ignores_ignored_pixels_and_falls_back_after_max_tries():
    t = RandomCrop((4, 4), cat_max_ratio=0.8)
    crop = np.full((4, 4), 255, np.int64)
    crop[0, :3] = 0
    crop[1, :] = 0
    crop[2, 0] = 1  # valid pixels: 7 of class 0, 1 of class 1 -> share 0.875 (ignore not counted)
    assert not t._acceptable(crop)
    crop[2, 1] = 1  # 7 vs 2 -> 0.78
    assert t._acceptable(crop)
    # a single-class image can never satisfy the cap: the transform still returns a crop
    one = np.zeros((10, 10), np.int64)
    img, lab = t(_image(10, 10), one, _rng(0))
    assert lab.shape == (4, 4)


def test_flip_moves_image_and_label_together():
    h, w = 5, 7
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.arange(w, dtype=np.uint8)[None, :]  # red channel = column index
    label = np.tile(np.arange(w, dtype=np.int64), (h, 1))
    img, lab = RandomFlip(1.0)(image, label, _rng(0))
    assert np.array_equal(img, image[:, ::-1]) and np.array_equal(lab, label[:, ::-1])
    img, lab = RandomFlip(0.0)(image, label, _rng(0))
    assert np.array_equal(img, image) and np.array_equal(lab, label)
    flipped = 0
    for s in range(20):
        img, lab = RandomFlip(0.5)(image, label, _rng(s))
        assert np.array_equal(img[..., 0].astype(np.int64), lab)  # always consistent
        flipped += int(lab[0, 0] == w - 1)
    assert 0 < flipped < 20


def test_resize_keeps_label_values_and_sizes():
    label = _label(37, 53)
    for size in [(10, 13), (37, 53), (80, 111), (5, 200)]:
        out = resize_label(label, size)
        assert out.shape == size and out.dtype == label.dtype
        assert set(np.unique(out)) <= {0, 3, 7, 255}
    # nearest neighbour on an exact 2x upscale repeats each pixel
    small = np.array([[1, 2], [3, 4]])
    assert np.array_equal(resize_label(small, (4, 4)), np.kron(small, np.ones((2, 2), int)))

    image = _image(480, 640)
    img, lab = Resize(640)(image, _label(480, 640), _rng(0))
    assert img.shape == (640, 853, 3) and lab.shape == (640, 853)
    img, lab = Resize(640, max_size=700)(image, _label(480, 640), _rng(0))
    assert img.shape == (525, 700, 3) and set(np.unique(lab)) <= {0, 3, 7, 255}


def test_random_resize_policies():
    assert short_side_choices(640) == list(range(320, 1281, 64))  # 320, 384, ..., 1280
    image = _image(30, 40)
    choice = RandomResize(short_sides=[16, 24, 32])
    seen = set()
    for s in range(30):
        img, lab = choice(image, _label(30, 40), _rng(s))
        assert img.shape[0] in (16, 24, 32) and lab.shape == img.shape[:2]
        assert abs(img.shape[1] / img.shape[0] - 40 / 30) < 0.05
        seen.add(img.shape[0])
    assert seen == {16, 24, 32}
    scale = RandomResize(scale=(0.5, 2.0), base_size=30, max_size=50)
    for s in range(20):
        img, _ = scale(image, None, _rng(s))  # label may be None
        assert 15 <= img.shape[0] <= 60 and max(img.shape[:2]) <= 50


def test_pad_uses_ignore_and_never_crops():
    image, label = _image(5, 6), _label(5, 6, values=(0, 1))
    img, lab = PadToSize((8, 10), ignore_index=65535)(image, label, _rng(0))
    assert img.shape == (8, 10, 3) and lab.shape == (8, 10) and lab.dtype == label.dtype
    assert np.array_equal(img[:5, :6], image) and (img[5:] == 0).all() and (img[:, 6:] == 0).all()
    assert np.array_equal(lab[:5, :6], label) and (lab[5:] == 65535).all() and (lab[:, 6:] == 65535).all()
    img, lab = PadToSize(4)(image, label, _rng(0))
    assert img.shape == (5, 6, 3) and np.array_equal(lab, label)


def test_photometric_changes_only_the_image():
    image, label = _image(16, 16), _label(16, 16)
    label_copy = label.copy()
    t = PhotometricDistortion()
    changed = 0
    for s in range(10):
        img, lab = t(image, label, _rng(s))
        assert lab is label and np.array_equal(label, label_copy)
        assert img.shape == image.shape and img.dtype == np.uint8
        changed += int(not np.array_equal(img, image))
    assert changed >= 8  # with p=0.5 for four steps, almost every draw changes something
    img, _ = PhotometricDistortion(p=0.0)(image, label, _rng(0))
    assert np.array_equal(img, image)
    # brightness only (contrast/colour off): a constant shift within +-32
    t = PhotometricDistortion(contrast_range=(1, 1), saturation_range=(1, 1), hue_delta=0, p=1.0)
    grey = np.full((4, 4, 3), 100, np.uint8)
    img, _ = t(grey, None, _rng(1))
    assert len(np.unique(img)) == 1 and 68 <= int(img[0, 0, 0]) <= 132 and int(img[0, 0, 0]) != 100


def test_hsv_round_trip():
    rgb = _image(20, 20, seed=4).astype(np.float64)
    back = _hsv_to_rgb(*_rgb_to_hsv(rgb))
    assert np.abs(back - rgb).max() < 1e-6
    h, s, v = _rgb_to_hsv(np.array([[[255.0, 0.0, 0.0], [0.0, 255.0, 0.0], [0.0, 0.0, 255.0]]]))
    assert np.allclose(h, [[0, 1 / 3, 2 / 3]]) and np.allclose(s, 1) and np.allclose(v, 255)


def test_eval_transform():
    image, label = _image(30, 40), _label(30, 40)
    img, lab = build_eval_transform()(image, label, _rng(0))
    assert img is image and lab is label
    img, lab = build_eval_transform(60)(image, label, _rng(0))
    assert img.shape == (60, 80, 3) and lab is label  # label stays at its size for scoring
    img, lab = build_eval_transform(60, resize_label=True)(image, label, _rng(0))
    assert lab.shape == (60, 80)


def test_compose_and_collate():
    t = Compose([RandomCrop(8), PadToSize(10)])
    samples = []
    for i in range(3):
        img, lab = t(_image(12, 9, seed=i), _label(12, 9, seed=i), _rng(i))
        samples.append(
            {"image": torch.from_numpy(img.transpose(2, 0, 1).copy()), "label": torch.from_numpy(lab), "index": i}
        )
    batch = collate_batch(samples)
    assert batch["image"].shape == (3, 3, 10, 10) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (3, 10, 10) and batch["label"].dtype == torch.int64
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2]
    assert torch.equal(batch["label"][1], samples[1]["label"])
    samples[2]["image"] = torch.zeros(3, 11, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="different sizes"):
        collate_batch(samples)
