"""GroupViT release files (NVlabs/GroupViT ``group_vit_gcc_{yfcc,redcap}_30e-*.pth``) and the official zero-shot
inference (``GroupViTSegInference`` with the demo's VOC settings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vocabseg.data.transforms import cv2_resize_bilinear_uint8

DATA = Path(__file__).parent / "data"


def test_cv2_resize_bilinear_uint8_matches_opencv():
    """Fixture: ``cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)`` outputs written by opencv-python-headless
    4.10.0.84 (x86-64) in a scratch venv (the project never imports cv2): upscales, downscales, an exact halving
    (OpenCV's INTER_AREA switch), mixed directions. Every pixel must be equal."""
    data = np.load(DATA / "cv2_resize_bilinear_uint8.npz")
    n = len([k for k in data.files if k.startswith("src")])
    assert n >= 7
    for i in range(n):
        src, ref = data[f"src{i}"], data[f"dst{i}"]
        got = cv2_resize_bilinear_uint8(src, ref.shape[:2])
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref), (i, src.shape, ref.shape, int(np.abs(got.astype(int) - ref).max()))
    plane = data["src0"][..., 1]
    assert np.array_equal(cv2_resize_bilinear_uint8(plane, (17, 45)), data["dst0"][..., 1])
    assert np.array_equal(cv2_resize_bilinear_uint8(data["src0"], data["src0"].shape[:2]), data["src0"])
    with pytest.raises(ValueError):
        cv2_resize_bilinear_uint8(data["src0"].astype(np.float32), (4, 4))
