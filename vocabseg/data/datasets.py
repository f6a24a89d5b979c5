"""Readers for the standard open-vocabulary segmentation benchmarks and for custom folders.

Every reader returns a :class:`SegmentationDataset`: a list of ``(image_path, label_path)`` pairs
plus the class names and the ignore value, so training, evaluation and the CLI share one format.

Label convention (package-wide)
-------------------------------
Labels are ``int64`` arrays of class indices ``0 .. C-1``. Pixels that must not be scored carry
``dataset.ignore_index``: :data:`IGNORE_INDEX` (255) for datasets with at most 255 classes and
:data:`WIDE_IGNORE_INDEX` (65535) for larger ones (ADE-847, PASCAL-Context-459, big custom sets).
Consumers (losses, metrics, transforms) must read ``dataset.ignore_index`` instead of assuming 255.
Each benchmark's own "unlabelled"/background convention is mapped to it when a label is read
(see ``docs/datasets.md``).

Readers only check the folder structure when built; a label value outside ``0 .. C-1`` is reported
(naming the file and the value) when that label is read. :meth:`SegmentationDataset.verify`
reads every label to find such problems up front.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from vocabseg.errors import DatasetError, ImageError

__all__ = [
    "IGNORE_INDEX",
    "WIDE_IGNORE_INDEX",
    "DATASETS",
    "CLASS_LISTS",
    "SegmentationDataset",
    "build_dataset",
    "ignore_index_for",
    "load_class_names",
    "read_class_file",
]

#: Ignore value of every dataset with at most 255 classes (labels read from 8-bit files).
IGNORE_INDEX = 255
#: Ignore value of datasets with more than 255 classes (labels read from 16-bit files).
WIDE_IGNORE_INDEX = 65535

#: Image suffixes (lower case) a reader pairs with a label file of the same stem.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Built-in class-name lists and their lengths (files in ``vocabseg/data/classes``).
CLASS_LISTS = {
    "ade150": 150,
    "ade847": 847,
    "coco_stuff171": 171,
    "pascal_context59": 59,
    "pascal_context459": 459,
    "voc20": 20,
}

#: Dataset names accepted by :func:`build_dataset`, with a one-line description.
DATASETS = {
    "ade150": "ADE20K-150 (ADEChallengeData2016): 150 classes, 2,000 val images; label 0 'other' is ignored.",
    "ade847": "ADE20K-847 (ADE20K_2021_17_01, detectron2-prepared 16-bit TIFF labels): 847 classes, ignore 65535.",
    "coco_stuff171": "COCO-Stuff-171 (COCO 2017 + stuffthingmaps_detectron2): 171 classes, the usual training set.",
    "pascal_context59": "PASCAL-Context-59 (VOC2010 images): 59 classes, background ignored.",
    "pascal_context459": "PASCAL-Context-459 (VOC2010 images, 16-bit TIFF labels): 459 classes, ignore 65535.",
    "voc20": "PASCAL VOC 2012 val: 20 object classes, background ignored (open-vocabulary VOC-20).",
    "custom": (
        "Your own folder: images/, labels/ (PNG class indices, 255 = ignore), classes.txt, "
        "optional train.txt/val.txt."
    ),
}

_ALIASES = {
    "ade": "ade150",
    "ade20k": "ade150",
    "ade20k_150": "ade150",
    "ade_150": "ade150",
    "ade20k_847": "ade847",
    "ade_847": "ade847",
    "ade_full": "ade847",
    "ade20k_full": "ade847",
    "coco_stuff": "coco_stuff171",
    "cocostuff": "coco_stuff171",
    "coco_stuff_171": "coco_stuff171",
    "coco171": "coco_stuff171",
    "pc59": "pascal_context59",
    "pascal_context_59": "pascal_context59",
    "context59": "pascal_context59",
    "pc459": "pascal_context459",
    "pascal_context_459": "pascal_context459",
    "context459": "pascal_context459",
    "voc": "voc20",
    "voc_20": "voc20",
    "pascal_voc20": "voc20",
    "pascal_voc": "voc20",
}

#: A transform maps ``(image HxWx3 uint8, label HxW int or None, rng)`` to a new ``(image, label)``.
Transform = Callable[[np.ndarray, Optional[np.ndarray], np.random.Generator], "tuple[np.ndarray, Optional[np.ndarray]]"]

PathLike = Union[str, "os.PathLike[str]"]


def _canonical(name: str) -> str:
    """Lower-case ``name``, unify separators and resolve aliases (``"ADE20K-150"`` -> ``"ade150"``)."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    return _ALIASES.get(key, key)


def ignore_index_for(num_classes: int) -> int:
    """Return the package's ignore value for a dataset with ``num_classes`` classes (255 or 65535)."""
    return IGNORE_INDEX if num_classes <= IGNORE_INDEX else WIDE_IGNORE_INDEX


# --------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------


def _parse_class_lines(text: str, source: str) -> list[str]:
    """Parse one-name-per-line text; ``#`` lines are comments, trailing blank lines are dropped."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        name = raw.strip()
        if name.startswith("#"):
            continue
        if not name:
            raise DatasetError(f"{source} line {number} is empty; write exactly one class name per line.")
        if name in first_line:
            raise DatasetError(
                f"{source} lists the class {name!r} twice (lines {first_line[name]} and {number}); "
                "class names must be unique."
            )
        first_line[name] = number
        names.append(name)
    if not names:
        raise DatasetError(f"{source} lists no class names; write one class name per line (line 1 = class 0).")
    return names


def read_class_file(path: PathLike) -> list[str]:
    """Read a ``classes.txt``: one class name per line, index = position (``#`` lines are comments)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"Class list {p} does not exist; write one class name per line (line 1 = class 0).")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"Class list {p} is not UTF-8 text ({e.reason}); save it as UTF-8.") from e
    except OSError as e:
        raise DatasetError(f"Cannot read class list {p}: {e.strerror or e}.") from e
    return _parse_class_lines(text, str(p))


_CLASS_CACHE: dict[str, tuple[str, ...]] = {}


def load_class_names(name: str) -> list[str]:
    """Return the class names of a built-in benchmark (``"ade150"``, ``"voc20"``, ...), index = class id.

    The lists are the ones the open-vocabulary literature evaluates with (SAN / CAT-Seg); each file
    in ``vocabseg/data/classes`` names its source in its header.
    """
    key = _canonical(name)
    if key not in CLASS_LISTS:
        raise DatasetError(
            f"Unknown class list {name!r}; choose one of {', '.join(sorted(CLASS_LISTS))}."
        )
    if key not in _CLASS_CACHE:
        ref = resources.files("vocabseg.data").joinpath("classes", f"{key}.txt")
        names = _parse_class_lines(ref.read_text(encoding="utf-8"), f"vocabseg/data/classes/{key}.txt")
        if len(names) != CLASS_LISTS[key]:  # a damaged installation, not a user error
            raise RuntimeError(f"vocabseg/data/classes/{key}.txt has {len(names)} names, expected {CLASS_LISTS[key]}")
        _CLASS_CACHE[key] = tuple(names)
    return list(_CLASS_CACHE[key])


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------

_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _read_label_array(path: Path) -> np.ndarray:
    """Read a single-channel label image as stored: uint8 for 8-bit files, wider ints otherwise."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("L", "P"):
                return np.array(im, dtype=np.uint8)  # 'P' gives palette indices, i.e. the class ids
            if mode == "1":
                return np.array(im, dtype=np.uint8)
            if mode in _WIDE_MODES:
                arr = np.array(im)
                return arr.astype(np.uint16 if arr.dtype.kind == "u" else np.int64, copy=False)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"Cannot read label file {path}: {e}.") from e
    raise DatasetError(
        f"Label file {path} has image mode {mode}; labels must be single-channel class indices "
        "(8-bit 'L'/'P' PNG or 16-bit PNG/TIFF), not colours."
    )


def _decode_label(
    raw: np.ndarray, path: Path, num_classes: int, ignore_index: int, reduce_zero_label: bool
) -> np.ndarray:
    """Map a stored label array to int64 class ids with ``ignore_index``; reject other values.

    8-bit files use 255 as "ignore", wider files 65535 (and 255 too when there are at most 255
    classes, since it cannot be a class then). With ``reduce_zero_label`` (raw ADE20K) the stored
    0 means "other" and becomes ignore, and every other value is shifted down by one.
    """
    lab = raw.astype(np.int64)
    if reduce_zero_label:
        ignored = lab == 0
        lab -= 1
    elif raw.dtype == np.uint8:
        ignored = lab == IGNORE_INDEX
    else:
        ignored = lab == WIDE_IGNORE_INDEX
        if num_classes <= IGNORE_INDEX:
            ignored |= lab == IGNORE_INDEX
    bad = ~ignored & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        value = int(raw[bad].flat[0])
        where = np.argwhere(bad)[0]
        if reduce_zero_label:
            convention = f"stored values are 0 = ignore and 1..{num_classes} = classes"
        else:
            convention = f"valid values are 0..{num_classes - 1} and {255 if raw.dtype == np.uint8 else 65535} = ignore"
        raise DatasetError(
            f"Label file {path} contains the value {value} at row {int(where[0])}, column {int(where[1])}, "
            f"but the dataset has {num_classes} classes ({convention})."
        )
    lab[ignored] = ignore_index
    return lab


def _read_rgb_raw(path: Path) -> np.ndarray:
    """Read an image as stored (no EXIF rotation), RGB uint8; used when EXIF makes sizes disagree."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"Cannot read image {path}: {e}.") from e


def _to_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor owning a contiguous, writable copy of ``a`` when needed (PIL arrays are read-only)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class SegmentationDataset(torch.utils.data.Dataset):
    """Image/label pairs with class names and an ignore value; items are dicts of tensors.

    ``dataset[i]`` returns ``{"image": uint8 [3,H,W], "label": int64 [H,W], "index": i, "name": stem}``
    after applying ``transform`` (a callable ``(image, label, rng) -> (image, label)`` on numpy
    arrays). The random generator is seeded from ``(seed, epoch, i)`` so a resumed run sees the
    same augmented data; call :meth:`set_epoch` at the start of each epoch (before the DataLoader
    iterator is created, so worker processes receive the new epoch).
    """

    def __init__(
        self,
        files: Sequence[tuple[PathLike, PathLike]],
        class_names: Sequence[str],
        *,
        ignore_index: Optional[int] = None,
        name: str = "custom",
        split: str = "val",
        root: Optional[PathLike] = None,
        transform: Optional[Transform] = None,
        reduce_zero_label: bool = False,
        seed: int = 0,
    ) -> None:
        self.files: list[tuple[Path, Path]] = [(Path(i), Path(l)) for i, l in files]
        self.class_names: list[str] = list(class_names)
        if not self.class_names:
            raise DatasetError(f"Dataset {name!r} has no class names.")
        self.ignore_index: int = ignore_index_for(len(self.class_names)) if ignore_index is None else int(ignore_index)
        if 0 <= self.ignore_index < len(self.class_names):
            raise ValueError(
                f"ignore_index {self.ignore_index} collides with a class index (< {len(self.class_names)})"
            )
        self.name = name
        self.split = split
        self.root = Path(root) if root is not None else None
        self.transform = transform
        self.reduce_zero_label = bool(reduce_zero_label)
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`class_names`)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (
            f"SegmentationDataset(name={self.name!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"root={str(self.root) if self.root else None!r})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that, with the seed and the index, fixes each item's augmentation."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The random generator used for item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _index(self, index: int) -> int:
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return i

    def stem(self, index: int) -> str:
        """The file stem (name without suffix) of item ``index``."""
        return self.files[self._index(index)][1].stem

    def load_label(self, index: int) -> np.ndarray:
        """Read item ``index``'s label as int64 ``H x W`` with :attr:`ignore_index` for ignored pixels."""
        path = self.files[self._index(index)][1]
        return _decode_label(
            _read_label_array(path), path, self.num_classes, self.ignore_index, self.reduce_zero_label
        )

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read item ``index`` untransformed: (RGB uint8 ``H x W x 3``, int64 label ``H x W``)."""
        from vocabseg.io import load_image  # local import: io is optional for label-only use

        i = self._index(index)
        image_path, label_path = self.files[i]
        label = self.load_label(i)
        image = load_image(image_path)  # EXIF orientation applied, as detectron2 does
        if image.shape[:2] != label.shape:
            raw = _read_rgb_raw(image_path)  # annotations made on the stored pixels
            if raw.shape[:2] != label.shape:
                raise DatasetError(
                    f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but its label {label_path} is "
                    f"{label.shape[1]}x{label.shape[0]}; labels must have the image's size."
                )
            image = raw
        return image, label

    def __getitem__(self, index: int) -> dict:
        i = self._index(index)
        image, label = self.load(i)
        if self.transform is not None:
            image, label = self.transform(image, label, self.rng(i))
        return {
            "image": _to_tensor(image.transpose(2, 0, 1)),
            "label": _to_tensor(label.astype(np.int64, copy=False)),
            "index": i,
            "name": self.files[i][1].stem,
        }

    def verify(self, limit: Optional[int] = None) -> int:
        """Read every label (or the first ``limit``) and check values and image sizes; return the count.

        Raises :class:`DatasetError` for the first problem found. Image files are opened only far
        enough to read their size.
        """
        n = len(self) if limit is None else min(int(limit), len(self))
        for i in range(n):
            label = self.load_label(i)
            image_path = self.files[i][0]
            try:
                with Image.open(image_path) as im:
                    size = im.size
            except (OSError, SyntaxError, ValueError) as e:
                raise DatasetError(f"Cannot read image {image_path}: {e}.") from e
            if (size[1], size[0]) != label.shape and (size[0], size[1]) != label.shape:
                raise DatasetError(
                    f"Image {image_path} is {size[0]}x{size[1]} but its label {self.files[i][1]} is "
                    f"{label.shape[1]}x{label.shape[0]}; labels must have the image's size."
                )
        return n


# --------------------------------------------------------------------------------------------
# benchmark layouts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One prepared on-disk layout: folders relative to a base folder, ``{s}`` = split folder name."""

    bases: tuple  # base folders tried under the root, in order ("." = the root itself)
    images: str
    labels: str
    label_ext: str
    splits: dict  # our split name -> folder name substituted for {s}
    reduce_zero_label: bool = False


@dataclass(frozen=True)
class _Benchmark:
    title: str
    classes: str
    layouts: tuple  # _Layout; for a base folder shared by two layouts the first one wins

    def candidates(self):
        """(base, layout) pairs in search order: named base folders, then the root itself; layouts in order."""
        bases: list[str] = []
        for lay in self.layouts:
            bases += [b for b in lay.bases if b not in bases and b != "."]
        bases.append(".")  # the root itself is the dataset folder: tried last
        return [(b, lay) for b in bases for lay in self.layouts if b in lay.bases]


_ADE_SPLITS = {"train": "training", "val": "validation"}
_ADE150_BASES = ("ADEChallengeData2016", "ade/ADEChallengeData2016", ".")
_VOC2010_BASES = ("VOCdevkit/VOC2010", "VOC2010", ".")

_BENCHMARKS = {
    "ade150": _Benchmark(
        "ADE20K-150",
        "ade150",
        (
            _Layout(_ADE150_BASES, "images/{s}", "annotations_detectron2/{s}", ".png", _ADE_SPLITS),
            _Layout(_ADE150_BASES, "images/{s}", "annotations/{s}", ".png", _ADE_SPLITS, reduce_zero_label=True),
        ),
    ),
    "ade847": _Benchmark(
        "ADE20K-847",
        "ade847",
        (
            _Layout(
                ("ADE20K_2021_17_01", "."), "images_detectron2/{s}", "annotations_detectron2/{s}", ".tif", _ADE_SPLITS
            ),
        ),
    ),
    "coco_stuff171": _Benchmark(
        "COCO-Stuff-171",
        "coco_stuff171",
        (
            _Layout(
                ("coco", "."), "{s}", "stuffthingmaps_detectron2/{s}", ".png", {"train": "train2017", "val": "val2017"}
            ),
        ),
    ),
    "pascal_context59": _Benchmark(
        "PASCAL-Context-59",
        "pascal_context59",
        (
            _Layout(_VOC2010_BASES, "JPEGImages", "annotations_detectron2/pc59_{s}", ".png", {"val": "val"}),
            # SAN's prepare script: pcontext/{train,val}/{image,label}
            _Layout(("pcontext", "."), "{s}/image", "{s}/label", ".png", {"train": "train", "val": "val"}),
        ),
    ),
    "pascal_context459": _Benchmark(
        "PASCAL-Context-459",
        "pascal_context459",
        (
            _Layout(_VOC2010_BASES, "JPEGImages", "annotations_detectron2/pc459_{s}", ".tif", {"val": "val"}),
            # SAN's prepare script: pcontext_full/{train,val}/{image,label}
            _Layout(("pcontext_full", "."), "{s}/image", "{s}/label", ".tif", {"train": "train", "val": "val"}),
        ),
    ),
    "voc20": _Benchmark(
        "PASCAL VOC-20",
        "voc20",
        (
            _Layout(
                ("VOCdevkit/VOC2012", "VOC2012", "."),
                "JPEGImages",
                "annotations_detectron2/{s}",
                ".png",
                {"train": "train", "val": "val"},
            ),
        ),
    ),
}


def _index_images(folder: Path) -> dict[str, Path]:
    """Map stem -> image path for the images directly inside ``folder`` (first suffix in IMAGE_SUFFIXES wins)."""
    found: dict[str, Path] = {}
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    with os.scandir(folder) as it:
        for entry in it:
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in rank and entry.is_file():
                stem = entry.name[: -len(suffix)]
                old = found.get(stem)
                if old is None or rank[suffix] < rank[old.suffix.lower()]:
                    found[stem] = Path(entry.path)
    return found


def _list_labels(folder: Path, ext: str) -> list[Path]:
    """Label files with suffix ``ext`` directly inside ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        out = [Path(e.path) for e in it if e.name.lower().endswith(ext) and e.is_file()]
    return sorted(out, key=lambda p: p.name)


def _build_benchmark(key: str, root: Path, split: str) -> tuple[list[tuple[Path, Path]], _Layout, Path]:
    """Find the prepared layout of benchmark ``key`` under ``root`` and pair its images and labels."""
    bench = _BENCHMARKS[key]
    known_splits = sorted({s for lay in bench.layouts for s in lay.splits})
    if split not in known_splits:
        raise DatasetError(
            f"{bench.title} has no split {split!r} in the supported layouts; use one of {', '.join(known_splits)}."
        )
    chosen = None
    tried: list[str] = []
    for base, lay in bench.candidates():
        if split not in lay.splits:
            continue
        base_dir = root if base == "." else root / base
        label_dir = base_dir / lay.labels.format(s=lay.splits[split])
        rel = label_dir.relative_to(root).as_posix()
        if rel not in tried:
            tried.append(rel)
        if label_dir.is_dir():
            chosen = (base_dir, lay, label_dir)
            break
    if chosen is None:
        partial = [lay for lay in bench.layouts if split not in lay.splits]
        note = ""
        if partial:
            only = ", ".join(repr(s) for s in partial[0].splits)
            note = f"; the {partial[0].labels.split('/')[0]}/ layout has only split {only}"
        raise DatasetError(
            f"No {bench.title} {split!r} labels found under {root}: expected a folder such as "
            f"{' or '.join(tried[:3])} (see docs/datasets.md{note})."
        )
    base_dir, lay, label_dir = chosen
    image_dir = base_dir / lay.images.format(s=lay.splits[split])
    if not image_dir.is_dir():
        raise DatasetError(f"{bench.title} labels are in {label_dir} but the image folder {image_dir} does not exist.")
    labels = _list_labels(label_dir, lay.label_ext)
    if not labels:
        raise DatasetError(f"{label_dir} contains no {lay.label_ext} label files.")
    images = _index_images(image_dir)
    files: list[tuple[Path, Path]] = []
    missing: list[str] = []
    for lab in labels:
        img = images.get(lab.stem)
        if img is None:
            missing.append(lab.name)
        else:
            files.append((img, lab))
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(labels)} label files in {label_dir} have no image of the same name in "
            f"{image_dir} (first: {missing[0]})."
        )
    return files, lay, label_dir


# --------------------------------------------------------------------------------------------
# custom folders
# --------------------------------------------------------------------------------------------

_SPLIT_FILES = ("train.txt", "val.txt")


def _read_split_file(path: Path, images: dict[str, Path]) -> list[str]:
    """Stems listed in a split file (one per line, optional image suffix, ``#`` comments)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"Cannot read split file {path}: {e}.") from e
    stems: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if os.path.splitext(s)[1].lower() in IMAGE_SUFFIXES:
            s = os.path.splitext(s)[0]
        if s not in seen:
            seen.add(s)
            stems.append(s)
    if not stems:
        raise DatasetError(f"Split file {path} lists no images; write one image name (stem) per line.")
    unknown = [s for s in stems if s not in images]
    if unknown:
        raise DatasetError(
            f"{len(unknown)} of {len(stems)} names in {path} have no image in {path.parent / 'images'} "
            f"(first: {unknown[0]!r})."
        )
    return stems


def _build_custom(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Check and pair a custom folder: images/, labels/, classes.txt, optional train.txt/val.txt."""
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise DatasetError(f"{root} has no classes.txt; add one with one class name per line (line 1 = class 0).")
    class_names = read_class_file(classes_file)
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir():
        raise DatasetError(f"{root} has no images/ folder; put the images in {image_dir}.")
    if not label_dir.is_dir():
        raise DatasetError(f"{root} has no labels/ folder; put one PNG of class indices per image in {label_dir}.")
    images: dict[str, Path] = {}
    with os.scandir(image_dir) as it:
        for entry in it:
            suffix = os.path.splitext(entry.name)[1].lower()
            if suffix in IMAGE_SUFFIXES and entry.is_file():
                stem = entry.name[: -len(suffix)]
                if stem in images:
                    raise DatasetError(
                        f"{image_dir} has two images named {stem!r} ({images[stem].name} and {entry.name}); "
                        "image names (without suffix) must be unique."
                    )
                images[stem] = Path(entry.path)
    if not images:
        raise DatasetError(
            f"{image_dir} contains no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})."
        )
    split_file = root / f"{split}.txt"
    present = [f for f in _SPLIT_FILES if (root / f).is_file()]
    if split == "all":
        stems = sorted(images)
    elif split_file.is_file():
        stems = _read_split_file(split_file, images)
    elif not present:
        stems = sorted(images)
    else:
        raise DatasetError(
            f"{root} has {' and '.join(present)} but no {split}.txt; add {split}.txt or use split='all'."
        )
    missing = [s for s in stems if not (label_dir / f"{s}.png").is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(stems)} images have no label in {label_dir} "
            f"(first: {images[missing[0]].name} needs {missing[0]}.png)."
        )
    return [(images[s], label_dir / f"{s}.png") for s in stems], class_names


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def build_dataset(
    name: str,
    root: PathLike,
    split: str = "val",
    transform: Optional[Transform] = None,
    *,
    seed: int = 0,
) -> SegmentationDataset:
    """Open a benchmark (``name`` in :data:`DATASETS`) or a custom folder as a :class:`SegmentationDataset`.

    ``root`` may be the benchmark's own folder (e.g. ``.../ADEChallengeData2016``) or the folder
    holding it (a detectron2-style ``datasets/`` root). ``split`` is ``"train"`` or ``"val"``
    (custom folders also accept ``"all"`` and any ``<split>.txt`` they contain). The folder
    structure is checked here; label values are checked as labels are read (or by ``verify()``).
    """
    key = _canonical(name)
    root_path = Path(root).expanduser()
    split = str(split).strip().lower()
    if key == "custom":
        files, class_names = _build_custom(root_path, split)
        return SegmentationDataset(
            files, class_names, name="custom", split=split, root=root_path, transform=transform, seed=seed
        )
    if key not in _BENCHMARKS:
        raise DatasetError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if not root_path.is_dir():
        raise DatasetError(f"Dataset folder {root_path} does not exist or is not a folder.")
    files, layout, _ = _build_benchmark(key, root_path, split)
    class_names = load_class_names(_BENCHMARKS[key].classes)
    return SegmentationDataset(
        files,
        class_names,
        name=key,
        split=split,
        root=root_path,
        transform=transform,
        reduce_zero_label=layout.reduce_zero_label,
        seed=seed,
    )
