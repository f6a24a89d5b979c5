"""Reading images and writing/reading label maps.

Everything that enters vocabseg as a picture goes through :func:`load_image`, so the rest of the
package can rely on one format: an ``H x W x 3`` ``uint8`` RGB array. Problems with the input
(missing or corrupt files, decompression bombs, odd array shapes) become :class:`ImageError`.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from vocabseg.errors import ImageError
from vocabseg.palette import make_palette

__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "list_images", "load_image", "read_label_png", "save_label_png"]

#: File suffixes (lower case) that :func:`list_images` treats as images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# PIL's decompression-bomb limit is a module global; we change it only while holding this lock.
_PIL_LIMIT_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend uint8 ``rgb`` (H,W,3) over a white background using uint8 ``alpha`` (H,W)."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 by dividing by 257 with rounding (so 65535 -> 255 and 257 -> 1)."""
    return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _float_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """Map floats in [0, 1] to 0..255 with rounding; anything else is an error, not a silent clip."""
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ImageError(f"{what} contains NaN or infinite values.")
    lo, hi = float(a.min()), float(a.max())
    tol = 1e-3
    if lo < -tol or hi > 1 + tol:
        raise ImageError(
            f"{what} is a float array with values in [{lo:g}, {hi:g}]; float images must lie in [0, 1] "
            "(divide by 255 or pass a uint8 array)."
        )
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _array_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """Convert one array of pixel values (any supported dtype) to uint8."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return _uint16_to_uint8(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return _float_to_uint8(a, what)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(
                f"{what} has dtype {a.dtype} with values in [{lo}, {hi}]; integer images must be uint8, "
                "uint16, or hold values in 0..255."
            )
        return a.astype(np.uint8)
    raise ImageError(f"{what} has unsupported dtype {a.dtype}; use uint8, uint16 or float in [0, 1].")


def _array_to_rgb(a: np.ndarray, what: str = "The image array") -> np.ndarray:
    """Turn an H×W, H×W×1, H×W×3 or H×W×4 array into a fresh H×W×3 uint8 RGB array."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"{what} has shape {tuple(a.shape)}; expected H×W, H×W×1, H×W×3 or H×W×4 (channels last)."
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{what} is empty (shape {tuple(a.shape)}).")
    u8 = _array_to_uint8(a, what)
    c = u8.shape[2]
    if c == 1:
        return np.repeat(u8, 3, axis=2)
    if c == 4:
        return _composite_on_white(u8[..., :3], u8[..., 3])
    return np.array(u8, dtype=np.uint8, order="C", copy=True)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a (loaded) PIL image of any common mode to an H×W×3 uint8 array.

    Transparent images are composited onto white, because that is how viewers and browsers show
    them; dropping alpha would expose arbitrary colours in fully transparent pixels (often black).
    16-bit modes (``I;16*`` and ``I``, which is how PIL opens many 16-bit files) are scaled by 1/257;
    mode ``F`` is taken to hold values in [0, 1] like float arrays.
    """
    mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("1", "L", "CMYK", "YCbCr", "RGBX"):
        return np.array(im.convert("RGB"), dtype=np.uint8)
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            mode, im = "RGBA", im.convert("RGBA")
        else:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    if mode in ("PA", "LA", "La", "RGBa"):
        mode, im = "RGBA", im.convert("RGBA")
    if mode == "RGBA":
        a = np.array(im, dtype=np.uint8)
        return _composite_on_white(a[..., :3], a[..., 3])
    if mode.startswith("I;16"):
        return _array_to_rgb(np.array(im).astype(np.uint16), "The 16-bit image")
    if mode == "I":
        a = np.clip(np.array(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _array_to_rgb(a, "The 32-bit integer image")
    if mode == "F":
        return _array_to_rgb(np.array(im, dtype=np.float32), "The floating-point image")
    return np.array(im.convert("RGB"), dtype=np.uint8)  # e.g. LAB, HSV; raises if PIL cannot


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}×{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (raise max_pixels if you trust it)."
        )


def _load_path(path: Path, max_pixels: int) -> np.ndarray:
    if not path.exists():
        raise ImageError(f"Image file not found: {path}.")
    if path.is_dir():
        raise ImageError(f"Expected an image file but {path} is a directory.")
    with _PIL_LIMIT_LOCK:
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                # Between the limit and twice the limit PIL only warns; we raise ourselves below.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path} is larger than the limit of {max_pixels:,} pixels: {e}") from e
        except Image.UnidentifiedImageError as e:
            raise ImageError(f"{path} is not an image file PIL can read.") from e
        except Exception as e:  # noqa: BLE001 - any failure to parse a user file is the file's fault
            raise ImageError(f"Cannot open image {path}: {e}.") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    with im:
        # Header size check BEFORE any pixel data is decoded (decompression-bomb guard).
        _check_pixels(im.width, im.height, max_pixels, f"Image {path}")
        try:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return _pil_to_rgb(im)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces as many exception types
            raise ImageError(f"Image {path} is corrupt or truncated: {e}.") from e


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def load_image(image: ImageInput, max_pixels: int = 100_000_000) -> np.ndarray:
    """Return ``image`` as a new H×W×3 uint8 RGB array.

    Accepts a file path, a PIL image or a numpy array (H×W, H×W×1, H×W×3 or H×W×4; uint8, uint16
    scaled by 1/257, or float in [0, 1]). EXIF orientation is applied to files and PIL images so the
    result is upright as a viewer shows it; alpha is composited onto white. Images larger than
    ``max_pixels`` are refused from the file header, before decoding, to guard against
    decompression bombs. Raises :class:`ImageError` for any unusable input.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(image, (str, os.PathLike)):
        return _load_path(Path(image), max_pixels)
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, "The PIL image")
        try:
            image.load()
            im = ImageOps.exif_transpose(image) or image
            return _pil_to_rgb(im)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageError(f"Cannot convert the PIL image (mode {image.mode}) to RGB: {e}.") from e
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(
        f"Cannot load an image from a {type(image).__name__}; pass a file path, a PIL image or a numpy array."
    )


def list_images(path: Union[str, os.PathLike], recursive: bool = False) -> list[Path]:
    """List the image files to process for ``path``.

    A file is returned as ``[path]`` whatever its suffix (the caller asked for it explicitly). For a
    folder, files whose suffix is in :data:`IMAGE_EXTENSIONS` (case-insensitive) are returned sorted;
    hidden files (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks, which are not
    images) are skipped. An empty folder gives ``[]``. A missing path raises :class:`ImageError`.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise ImageError(f"No such file or folder: {p}.")
    if not p.is_dir():
        raise ImageError(f"{p} is neither a regular file nor a folder.")
    candidates = p.rglob("*") if recursive else p.iterdir()
    found = []
    for f in candidates:
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
            found.append(f)
    return sorted(found)


def save_label_png(
    labels: np.ndarray, path: Union[str, os.PathLike], palette: np.ndarray | None = None
) -> None:
    """Write an H×W map of class indices as a lossless PNG that :func:`read_label_png` reads back.

    Indices up to 255 are stored as a palette ('P' mode) PNG so that the file both opens in any viewer
    with colours and keeps exact indices; 255 is the usual "ignore" value. Larger indices, or a
    palette with more than 256 colours (so all maps of one dataset share a format), give a 16-bit
    grayscale PNG (indices up to 65535; no colours). ``palette`` defaults to
    :func:`vocabseg.palette.make_palette`. The file is written to a temporary name in the same folder and
    then renamed, so an interrupted write never leaves a broken file at ``path``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ImageError(f"A label map must be a non-empty H×W array, got shape {tuple(labels.shape)}.")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageError(f"A label map must hold integer class indices, got dtype {labels.dtype}.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ImageError(f"Label map contains negative index {lo}; map ignored pixels to 255 before saving.")
    if hi > 65535:
        raise ImageError(f"Label map contains index {hi}; PNG label maps hold at most 65535.")

    if palette is not None:
        palette = np.asarray(palette)
        if palette.ndim != 2 or palette.shape[1] != 3 or len(palette) == 0:
            raise ValueError(f"palette must have shape [n, 3], got {tuple(palette.shape)}")
    sixteen_bit = hi > 255 or (palette is not None and len(palette) > 256)
    if sixteen_bit:
        im = Image.fromarray(labels.astype(np.uint16))
    else:
        if palette is None:
            palette = make_palette(256)
        pal = np.zeros((256, 3), dtype=np.uint8)
        pal[: len(palette)] = np.clip(palette, 0, 255).astype(np.uint8)
        im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.astype(np.uint8).tobytes())
        im.putpalette(pal.reshape(-1).tolist())

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            im.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_label_png(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a label map written by :func:`save_label_png` (or any 8/16-bit single-channel image).

    Returns the stored class indices (not colours) as an H×W ``int64`` array, the dtype torch losses
    expect for targets. Colour (RGB) images are refused: their pixel values are not indices.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"Label file not found: {p}.")
    if p.is_dir():
        raise ImageError(f"Expected a label PNG but {p} is a directory.")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "1") or mode.startswith("I"):
                return np.array(im).astype(np.int64)
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"Cannot read label map {p}: {e}.") from e
    raise ImageError(
        f"{p} is a {mode} image, not a label map of class indices (expected a palette or grayscale PNG)."
    )
