"""Training and evaluation transforms for (image, label) pairs, in numpy/PIL only.

Every transform is a callable ``t(image, label, rng) -> (image, label)`` where ``image`` is an
``H x W x 3`` uint8 RGB array, ``label`` an ``H x W`` integer array (or ``None``) and ``rng`` a
``numpy.random.Generator``. All randomness comes from ``rng``, so an item's augmentation is fixed
by the generator's seed; :class:`~vocabseg.data.datasets.SegmentationDataset` seeds it from
``(seed, epoch, index)`` so resumed runs see identical data. Images are resized bilinearly,
labels with nearest neighbour (so no new label values appear).

The default training pipeline follows Mask2Former / SAN: resize the short side to a random
choice of ``[0.5, 0.6, ..., 2.0] x crop`` (long side at most 2560) -> random crop with an
optional single-category area cap -> photometric distortion (mmseg / SSD defaults) -> random
horizontal flip -> pad to the crop size (image with 0, label with the ignore value).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    "Compose",
    "Resize",
    "RandomResize",
    "RandomCrop",
    "RandomFlip",
    "PhotometricDistortion",
    "PadToSize",
    "short_side_choices",
    "build_train_transform",
    "build_eval_transform",
    "collate_batch",
    "resize_image",
    "resize_label",
    "cv2_resize_bilinear_uint8",
]

Label = Optional[np.ndarray]
Size = Union[int, Sequence[int]]

#: Default ignore value (the package convention for datasets with at most 255 classes).
_DEFAULT_IGNORE = 255


def _pair(size: Size, what: str) -> tuple[int, int]:
    """Return ``size`` as (height, width); an int means a square."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = [int(v) for v in size]
        if len(vals) != 2:
            raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
        h, w = vals
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return h, w


def _check(image: np.ndarray, label: Label) -> None:
    """Programming-error guard: image HxWx3 uint8, label HxW of the same size (or None)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"transforms take an HxWx3 uint8 image, got {getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}"
        )
    if label is not None and (label.ndim != 2 or label.shape != image.shape[:2]):
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}")


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 image to (height, width) with bilinear interpolation (PIL)."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize a label map to (height, width) by nearest neighbour (pixel centres), keeping its dtype."""
    h, w = int(size_hw[0]), int(size_hw[1])
    H, W = label.shape
    if (H, W) == (h, w):
        return label
    rows = np.minimum(((np.arange(h) + 0.5) * (H / h)).astype(np.int64), H - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (W / w)).astype(np.int64), W - 1)
    return label[rows[:, None], cols[None, :]]


def cv2_resize_bilinear_uint8(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)`` on a uint8 image, reproduced bit for bit.

    Official pipelines (mmcv ``imresize``/``imrescale``) resize uint8 images with OpenCV, whose bilinear resize is
    not PIL's: pixel centres at ``(d + 0.5) * src/dst - 0.5`` computed in float32, edge taps clamped, weights in
    11-bit fixed point (``round(w * 2048)``), an exact horizontal pass, then a vertical pass with OpenCV's SIMD
    rounding (each row pre-shifted by 4 bits, multiplied with the high 16 bits kept, summed, ``(+2) >> 2``).
    An exact halving of both sides becomes a 2x2 box average, as OpenCV switches to INTER_AREA there.
    Checked against opencv-python-headless 4.10 (x86-64) on random and smooth images of many sizes: identical.
    ``image`` is H x W or H x W x C uint8; returns ``size_hw`` = (h, w) with the same channels.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or h <= 0 or w <= 0:
        raise ValueError(f"cv2_resize_bilinear_uint8 takes an HxW(xC) uint8 image and a positive size, got "
                         f"{img.dtype} {img.shape} -> {size_hw}")
    H, W = img.shape[:2]
    if (H, W) == (h, w):
        return img.copy()
    plane = img.ndim == 2
    src = (img[:, :, None] if plane else img).astype(np.int32)
    if (H, W) == (2 * h, 2 * w):
        out = (src[0::2, 0::2] + src[0::2, 1::2] + src[1::2, 0::2] + src[1::2, 1::2] + 2) >> 2
    else:
        x0, ax0, ax1 = _cv2_linear_taps(W, w, clamp_weights=True)
        x1 = np.minimum(x0 + 1, W - 1)
        rows = src[:, x0] * ax0[None, :, None] + src[:, x1] * ax1[None, :, None]  # [H, w, C], scale 2048
        y0, by0, by1 = _cv2_linear_taps(H, h, clamp_weights=False)
        top = rows[np.clip(y0, 0, H - 1)] >> 4  # [h, w, C]
        bottom = rows[np.clip(y0 + 1, 0, H - 1)] >> 4
        out = (((top * by0[:, None, None]) >> 16) + ((bottom * by1[:, None, None]) >> 16) + 2) >> 2
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out[:, :, 0] if plane else out


def _cv2_linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR along one axis: first source index and the two 11-bit fixed-point weights per output.

    Columns outside the image take the edge pixel with weight 1 (``clamp_weights``); rows keep their fraction
    and read clamped row indices, as OpenCV does (the same values up to its rounding).
    """
    scale = 1.0 / (dst / src)  # OpenCV stores dst/src and inverts it, in double precision
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        low, high = first < 0, first >= src - 1
        frac[low | high] = 0.0
        first[low] = 0
        first[high] = src - 1
    one = np.float32(2048.0)
    w0 = np.rint((np.float32(1.0) - frac) * one).astype(np.int32)  # rint: ties to even, as cvRound
    w1 = np.rint(frac * one).astype(np.int32)
    return first, w0, w1


def _shortest_edge_size(h: int, w: int, short: float, max_size: Optional[int]) -> tuple[int, int]:
    """Size with short side ``short`` (aspect kept), scaled down so the long side is <= ``max_size``."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if max_size is not None and max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return max(1, int(nh + 0.5)), max(1, int(nw + 0.5))


def _apply_resize(image: np.ndarray, label: Label, size: tuple[int, int], resize_lbl: bool = True):
    image = resize_image(image, size)
    if label is not None and resize_lbl:
        label = resize_label(label, size)
    return image, label


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Iterable[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize so the short side is ``short_side`` (long side capped at ``max_size``); no randomness.

    With ``resize_label=False`` the label keeps its original size: evaluation scores predictions
    at the label's resolution, so only the network input is resized.
    """

    def __init__(self, short_side: int, max_size: Optional[int] = None, resize_label: bool = True) -> None:
        if short_side <= 0:
            raise ValueError(f"short_side must be positive, got {short_side}")
        self.short_side = int(short_side)
        self.max_size = None if max_size is None else int(max_size)
        self.resize_label = bool(resize_label)

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        size = _shortest_edge_size(image.shape[0], image.shape[1], self.short_side, self.max_size)
        return _apply_resize(image, label, size, self.resize_label)

    def __repr__(self) -> str:
        return f"Resize(short_side={self.short_side}, max_size={self.max_size}, resize_label={self.resize_label})"


def short_side_choices(crop_size: int = 640) -> list[int]:
    """Mask2Former/SAN short sides: ``[int(x * 0.1 * crop_size) for x in range(5, 21)]`` (320..1280 for 640)."""
    return [int(x * 0.1 * crop_size) for x in range(5, 21)]


class RandomResize:
    """Randomly rescale, keeping the aspect ratio; labels by nearest neighbour.

    Two policies:

    * ``short_sides`` given (detectron2 "ResizeShortestEdge", sampling "choice"): the short side is
      drawn uniformly from the list, e.g. :func:`short_side_choices` (640 -> 320, 384, ..., 1280).
    * otherwise (mmseg-style ratio range): the short side is ``base_size * U(scale[0], scale[1])``.

    In both cases the long side is then capped at ``max_size`` (if given).
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.5, 2.0),
        base_size: int = 640,
        *,
        short_sides: Optional[Sequence[int]] = None,
        max_size: Optional[int] = None,
    ) -> None:
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        if short_sides is not None:
            short_sides = [int(s) for s in short_sides]
            if not short_sides or min(short_sides) <= 0:
                raise ValueError(f"short_sides must be a non-empty list of positive sizes, got {short_sides!r}")
        self.scale = (lo, hi)
        self.base_size = int(base_size)
        self.short_sides = short_sides
        self.max_size = None if max_size is None else int(max_size)

    def sample_short_side(self, rng: np.random.Generator) -> float:
        """Draw the target short side."""
        if self.short_sides is not None:
            return float(self.short_sides[int(rng.integers(len(self.short_sides)))])
        return self.base_size * float(rng.uniform(self.scale[0], self.scale[1]))

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        short = self.sample_short_side(rng)
        size = _shortest_edge_size(image.shape[0], image.shape[1], short, self.max_size)
        return _apply_resize(image, label, size)

    def __repr__(self) -> str:
        if self.short_sides is not None:
            return f"RandomResize(short_sides={self.short_sides}, max_size={self.max_size})"
        return f"RandomResize(scale={self.scale}, base_size={self.base_size}, max_size={self.max_size})"


class RandomCrop:
    """Crop a random ``size`` window (smaller images are cropped to their own size along that axis).

    With ``cat_max_ratio < 1`` a window is redrawn (up to ``max_tries`` windows in all) until no
    single class covers ``cat_max_ratio`` or more of the window's non-ignored pixels and at least
    two classes are present; if no window qualifies, the last one is used (Mask2Former's
    "single category max area" / mmseg's ``cat_max_ratio``).
    """

    def __init__(
        self, size: Size, cat_max_ratio: float = 1.0, ignore_index: int = _DEFAULT_IGNORE, max_tries: int = 10
    ) -> None:
        self.size = _pair(size, "crop size")
        if not 0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = max(1, int(max_tries))

    def _window(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return y0, x0, ch, cw

    def _acceptable(self, crop: np.ndarray) -> bool:
        valid = crop[crop != self.ignore_index]
        if valid.size == 0:
            return False
        counts = np.unique(valid, return_counts=True)[1]
        return len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum()

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        h, w = image.shape[:2]
        y0, x0, ch, cw = self._window(h, w, rng)
        if self.cat_max_ratio < 1.0 and label is not None:
            for attempt in range(self.max_tries):
                if self._acceptable(label[y0 : y0 + ch, x0 : x0 + cw]):
                    break
                if attempt + 1 < self.max_tries:
                    y0, x0, ch, cw = self._window(h, w, rng)
        image = image[y0 : y0 + ch, x0 : x0 + cw]
        if label is not None:
            label = label[y0 : y0 + ch, x0 : x0 + cw]
        return image, label

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, cat_max_ratio={self.cat_max_ratio}, ignore_index={self.ignore_index})"


class RandomFlip:
    """Flip image and label left-right together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        if rng.random() < self.p:
            image = image[:, ::-1]
            if label is not None:
                label = label[:, ::-1]
        return image, label

    def __repr__(self) -> str:
        return f"RandomFlip(p={self.p})"


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB floats in [0, 255] -> (hue in [0, 1), saturation in [0, 1], value in [0, 255])."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    delta = maxc - minc
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    safe = np.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return h, s, maxc


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_hsv`; returns RGB floats in [0, 255]."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6)
    f = h6 - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


class PhotometricDistortion:
    """Random brightness, contrast, saturation and hue jitter of the image only (label untouched).

    mmseg's ``PhotometricDistortion`` defaults (the same as Mask2Former's ``ColorAugSSDTransform``):
    each step applied with probability ``p``: brightness ``+U(-32, 32)``; contrast ``x U(0.5, 1.5)``
    (before or after the colour steps, chosen at random); saturation ``x U(0.5, 1.5)``; hue shift
    by an integer in ``[-18, 18]`` OpenCV hue units (2 degrees each). Values clip to [0, 255].
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        p: float = 0.5,
    ) -> None:
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        self.p = float(p)

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p:
            img = np.clip(img * rng.uniform(*self.contrast_range), 0.0, 255.0)
        return img

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        img = image.astype(np.float32)
        if rng.random() < self.p:
            img = np.clip(img + rng.uniform(-self.brightness_delta, self.brightness_delta), 0.0, 255.0)
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            img = self._contrast(img, rng)
        sat = rng.uniform(*self.saturation_range) if rng.random() < self.p else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta + 1)) if rng.random() < self.p else None
        if sat is not None or hue is not None:
            h, s, v = _rgb_to_hsv(img)
            if sat is not None:
                s = np.clip(s * sat, 0.0, 1.0)
            if hue is not None:
                h = (h + hue / 180.0) % 1.0
            img = np.clip(_hsv_to_rgb(h, s, v), 0.0, 255.0)
        if not contrast_first:
            img = self._contrast(img, rng)
        return np.rint(img).astype(np.uint8), label

    def __repr__(self) -> str:
        return (
            f"PhotometricDistortion(brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
            f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta}, p={self.p})"
        )


class PadToSize:
    """Pad bottom/right up to ``size`` (never crops): image with ``image_value``, label with ``ignore_index``."""

    def __init__(self, size: Size, ignore_index: int = _DEFAULT_IGNORE, image_value: int = 0) -> None:
        self.size = _pair(size, "pad size")
        self.ignore_index = int(ignore_index)
        self.image_value = int(image_value)

    def __call__(self, image: np.ndarray, label: Label, rng: np.random.Generator):
        _check(image, label)
        h, w = image.shape[:2]
        th, tw = max(h, self.size[0]), max(w, self.size[1])
        if (th, tw) == (h, w):
            return image, label
        out = np.full((th, tw, 3), self.image_value, dtype=np.uint8)
        out[:h, :w] = image
        if label is not None:
            lab = np.full((th, tw), self.ignore_index, dtype=label.dtype)
            lab[:h, :w] = label
            label = lab
        return out, label

    def __repr__(self) -> str:
        return f"PadToSize(size={self.size}, ignore_index={self.ignore_index})"


def build_train_transform(
    crop_size: Size = 640,
    *,
    policy: str = "choice",
    scale: tuple[float, float] = (0.5, 2.0),
    base_size: Optional[int] = None,
    max_size: Optional[int] = 2560,
    cat_max_ratio: float = 1.0,
    ignore_index: int = _DEFAULT_IGNORE,
    flip_p: float = 0.5,
    photometric: bool = True,
) -> Compose:
    """The Mask2Former/SAN training pipeline: resize -> crop -> colour jitter -> flip -> pad.

    ``policy="choice"`` draws the short side from :func:`short_side_choices` of the crop's short
    side (SAN's setting); ``policy="scale"`` uses ``base_size * U(scale)`` (``base_size`` defaults
    to the crop's short side); ``policy="none"`` skips resizing. Pass the dataset's
    ``ignore_index`` so crops and padding use the right value.
    """
    ch, cw = _pair(crop_size, "crop_size")
    short = min(ch, cw)
    steps: list[Callable] = []
    if policy == "choice":
        steps.append(RandomResize(short_sides=short_side_choices(short), max_size=max_size))
    elif policy == "scale":
        steps.append(RandomResize(scale=scale, base_size=base_size or short, max_size=max_size))
    elif policy != "none":
        raise ValueError(f"policy must be 'choice', 'scale' or 'none', got {policy!r}")
    steps.append(RandomCrop((ch, cw), cat_max_ratio=cat_max_ratio, ignore_index=ignore_index))
    if photometric:
        steps.append(PhotometricDistortion())
    if flip_p > 0:
        steps.append(RandomFlip(flip_p))
    steps.append(PadToSize((ch, cw), ignore_index=ignore_index))
    return Compose(steps)


def build_eval_transform(
    short_side: Optional[int] = None, max_size: Optional[int] = 2560, resize_label: bool = False
) -> Compose:
    """Evaluation input: identity, or resize the short side to ``short_side`` (long side <= ``max_size``).

    By default only the image is resized: metrics are computed at the label's original size, so
    the model's output is resized back to the label (the usual protocol, e.g. SAN at 640).
    """
    if short_side is None:
        return Compose([])
    return Compose([Resize(short_side, max_size=max_size, resize_label=resize_label)])


def collate_batch(samples: Sequence[dict]) -> dict:
    """Stack dataset items: ``image`` uint8 [B,3,H,W], ``label`` int64 [B,H,W], ``index`` int64 [B], ``name`` list.

    All items must have the same size (train with :class:`PadToSize`, or evaluate one image at a time).
    """
    if not samples:
        raise ValueError("collate_batch needs at least one sample")
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"collate_batch got images of different sizes {sorted(shapes)}; pad them to one size "
            "(PadToSize) or use batch size 1"
        )
    images = torch.stack([torch.as_tensor(s["image"], dtype=torch.uint8) for s in samples])
    labels = torch.stack([torch.as_tensor(s["label"]).to(torch.int64) for s in samples])
    index = torch.as_tensor([int(s["index"]) for s in samples], dtype=torch.int64)
    out = {"image": images, "label": labels, "index": index}
    if all("name" in s for s in samples):
        out["name"] = [s["name"] for s in samples]
    return out
