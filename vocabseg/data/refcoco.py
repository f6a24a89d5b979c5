"""RefCOCO, RefCOCO+ and RefCOCOg readers (the ``refer`` layout), with a pickle reader that runs no code.

On disk (Licheng Yu's ``refer`` layout)::

    ROOT/refcoco/instances.json      COCO annotations of the images the refs use (polygons, RLE for crowds)
    ROOT/refcoco/refs(unc).p         pickled list of refs (or refs(unc).json: the same list as JSON)
    ROOT/refcoco+/refs(unc).p        RefCOCO+  (splits train / val / testA / testB)
    ROOT/refcocog/refs(umd).p        RefCOCOg, UMD split (train / val / test); refs(google).p: Google split
    ROOT/images/train2014/*.jpg      COCO train2014 images (also accepted: ROOT/coco/train2014,
                                     ROOT/images/mscoco/images/train2014, ROOT/train2014)

A ref is ``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", "raw", "sent_id", ...}], ...}``; its
mask is the segmentation of annotation ``ann_id`` in ``instances.json``: polygons rasterised with PIL, or COCO RLE
(uncompressed ``counts`` lists and compressed strings, decoded here without pycocotools).

**Pickles run code when loaded.** ``refs(*).p`` files are read by :class:`RestrictedUnpickler`, which resolves no
global at all: only the opcodes of plain containers and scalars can build anything, and the result is checked to
consist of dict, list, tuple, str, int, float, bool and None only. Anything else raises :class:`DatasetError`.
Converting the pickle to JSON once (:func:`convert_refs_to_json`) avoids the question entirely.

Items: ``{"image": uint8 [3, H, W], "mask": bool [H, W], "sentence": str, "sentences": [str], "ref_id": int,
"sent_id": int, "image_id": int}`` — one per sentence (``per="sentence"``, evaluation) or one per ref
(``per="ref"``, training: a sentence is drawn per epoch by the training loop).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DatasetError

__all__ = ["RestrictedUnpickler", "safe_load_pickle", "load_refs", "convert_refs_to_json", "decode_rle",
           "encode_rle_counts", "decode_rle_counts", "polygons_to_mask", "annotation_mask", "RefCOCODataset",
           "REFER_DATASETS", "SPLITS"]

#: dataset name -> (folder, default split_by, allowed split_bys)
REFER_DATASETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "refcoco": ("refcoco", "unc", ("unc", "google")),
    "refcoco+": ("refcoco+", "unc", ("unc",)),
    "refcocog": ("refcocog", "umd", ("umd", "google")),
}
SPLITS = ("train", "val", "test", "testA", "testB")
_IMAGE_DIRS = ("images/train2014", "coco/train2014", "images/mscoco/images/train2014", "train2014", "images")
_PLAIN = (dict, list, tuple, str, int, float, bool, type(None))


# ----------------------------------------------------------------------------------------------- safe pickle


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (class, function, module attribute) and persistent id.

    Plain containers and scalars are built by pickle opcodes that need no global, so RefCOCO's refs load; a
    pickle that names ``os.system``, ``builtins.eval``, any class or even ``builtins.set`` is refused before
    anything is called. Python 2 ``str`` objects are decoded as UTF-8 (invalid bytes replaced).
    """

    def __init__(self, file, *, encoding: str = "utf-8", errors: str = "replace"):
        super().__init__(file, encoding=encoding, errors=errors)

    def find_class(self, module: str, name: str):  # noqa: D102
        raise DatasetError(f"refusing to load a pickle that references {module}.{name}: only plain data "
                           "(dict, list, tuple, str, int, float, bool, None) is accepted")

    def persistent_load(self, pid):  # noqa: D102
        raise DatasetError("refusing to load a pickle with persistent ids: only plain data is accepted")


def _check_plain(obj: Any) -> None:
    stack, seen = [obj], set()
    while stack:
        o = stack.pop()
        if type(o) not in _PLAIN:
            raise DatasetError(f"the pickle holds a {type(o).__name__}; only dict, list, tuple, str, int, float, "
                               "bool and None are accepted")
        if isinstance(o, (dict, list, tuple)):
            if id(o) in seen:
                continue
            seen.add(id(o))
            if isinstance(o, dict):
                stack.extend(o.keys())
                stack.extend(o.values())
            else:
                stack.extend(o)


def safe_load_pickle(source: str | os.PathLike | bytes) -> Any:
    """Load plain data from a pickle file (or bytes) with :class:`RestrictedUnpickler`; DatasetError otherwise."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable pickle
        where = "the data" if isinstance(source, bytes) else str(source)
        raise DatasetError(f"cannot read {where} as a pickle of plain data ({type(e).__name__}: {e})") from None
    _check_plain(obj)
    return obj


def load_refs(path: str | os.PathLike) -> list[dict]:
    """The refs list from ``refs(*).p`` (restricted unpickler) or ``refs(*).json``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"refs file {path} does not exist")
    if path.suffix == ".json":
        try:
            refs = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path} is not valid JSON ({e})") from None
    else:
        refs = safe_load_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise DatasetError(f"{path} must hold a list of refs (dicts), got {type(refs).__name__}")
    for r in refs[:1]:
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in r]
        if missing:
            raise DatasetError(f"{path}: refs lack the keys {missing}")
    return refs


def convert_refs_to_json(pickle_path: str | os.PathLike, json_path: str | os.PathLike | None = None) -> Path:
    """Write the refs of a pickle (read safely) as JSON next to it (``refs(unc).p`` -> ``refs(unc).json``)."""
    pickle_path = Path(pickle_path)
    out = Path(json_path) if json_path is not None else pickle_path.with_suffix(".json")
    refs = load_refs(pickle_path)
    out.write_text(json.dumps(refs), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------- masks


def decode_rle_counts(s: str | bytes) -> list[int]:
    """COCO's compressed RLE string -> run lengths.

    Each run is a little-endian sequence of 5-bit groups stored as ``chr(48 + group)``; bit 0x20 of a group means
    "more groups follow", bit 0x10 of the last group is the sign. From the fourth run on, the stored value is the
    difference to the run two places earlier.
    """
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(s):
                raise DatasetError("truncated RLE string")
            group = ord(s[p]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            p += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_rle_counts(counts: Sequence[int]) -> str:
    """Inverse of :func:`decode_rle_counts` (used by tests and for writing masks in COCO's format)."""
    out = []
    for i, c in enumerate(counts):
        x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not group & 0x10) or (x == -1 and group & 0x10))
            if more:
                group |= 0x20
            out.append(chr(group + 48))
    return "".join(out)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE ``{"size": [h, w], "counts": [...] or "..."}`` -> bool [h, w] (runs alternate 0/1, column-major)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"malformed RLE (need 'size' [h, w] and 'counts'): {str(rle)[:80]}") from None
    runs = decode_rle_counts(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise DatasetError(f"RLE runs sum to {sum(runs)}, expected {h} × {w} = {h * w}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T.copy()


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> bool [height, width] (PIL rasterisation, outline included)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        pts = [float(v) for v in poly]
        if len(pts) < 6:
            continue
        draw.polygon(list(zip(pts[0::2], pts[1::2])), fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8).astype(bool)


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, or RLE dict) -> bool [height, width]."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise DatasetError(f"RLE of size {mask.shape} for an image of {height} × {width}")
        return mask
    raise DatasetError(f"unknown segmentation format {type(segmentation).__name__}")


# ----------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Entry:
    ref_index: int
    sentence_index: int  # -1: per-ref item


def _sentence_text(s: Any) -> str:
    if isinstance(s, dict):
        return str(s.get("sent", s.get("raw", ""))).strip()
    return str(s).strip()


class RefCOCODataset:
    """Map-style referring dataset over one split of RefCOCO / RefCOCO+ / RefCOCOg.

    ``dataset``: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``; ``split_by``: ``"unc"`` (RefCOCO/+), ``"umd"``
    or ``"google"`` (RefCOCOg; default umd); ``split``: train / val / test / testA / testB (what the split_by has).
    ``root`` holds the dataset folders and the COCO images (see the module doc). ``per``: ``"sentence"`` (one item
    per expression; evaluation) or ``"ref"`` (one item per referred object, its first sentence in ``sentence`` and
    all in ``sentences``).
    """

    def __init__(self, root: str | os.PathLike, dataset: str = "refcoco", split: str = "val",
                 split_by: str | None = None, per: str = "sentence", image_dir: str | os.PathLike | None = None,
                 max_items: int | None = None) -> None:
        key = dataset.lower().replace("_", "").replace("plus", "+")
        if key not in REFER_DATASETS:
            raise DatasetError(f"unknown referring dataset {dataset!r}; choose one of {', '.join(REFER_DATASETS)}")
        folder, default_by, allowed = REFER_DATASETS[key]
        split_by = split_by or default_by
        if split_by not in allowed:
            raise DatasetError(f"{dataset} comes split by {' or '.join(allowed)}, not {split_by!r}")
        if per not in ("sentence", "ref"):
            raise DatasetError(f"per must be 'sentence' or 'ref', got {per!r}")
        self.root = Path(root).expanduser()
        self.name, self.split_by, self.split, self.per = key, split_by, split, per
        ds_dir = self.root / folder
        if not ds_dir.is_dir():
            raise DatasetError(f"{ds_dir} does not exist; expected ROOT/{folder}/instances.json and "
                               f"refs({split_by}).p")
        refs_path = next((p for p in (ds_dir / f"refs({split_by}).json", ds_dir / f"refs({split_by}).p")
                          if p.is_file()), None)
        if refs_path is None:
            raise DatasetError(f"neither refs({split_by}).json nor refs({split_by}).p is in {ds_dir}")
        inst_path = ds_dir / "instances.json"
        if not inst_path.is_file():
            raise DatasetError(f"{inst_path} does not exist")
        refs = load_refs(refs_path)
        splits = sorted({str(r["split"]) for r in refs})
        if split not in splits:
            raise DatasetError(f"{dataset} ({split_by}) has the splits {', '.join(splits)}, not {split!r}")
        self.refs = [r for r in refs if str(r["split"]) == split]
        try:
            instances = json.loads(inst_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{inst_path} is not valid JSON ({e})") from None
        self.images = {int(im["id"]): im for im in instances.get("images", [])}
        wanted = {int(r["ann_id"]) for r in self.refs}
        self.annotations = {int(a["id"]): a for a in instances.get("annotations", []) if int(a["id"]) in wanted}
        missing = wanted - set(self.annotations)
        if missing:
            raise DatasetError(f"{len(missing)} refs point to annotations missing from {inst_path}, e.g. "
                               f"{sorted(missing)[:3]}")
        self.image_dir = Path(image_dir) if image_dir is not None else self._find_image_dir()
        entries = []
        for i, r in enumerate(self.refs):
            if per == "ref":
                entries.append(_Entry(i, -1))
            else:
                entries.extend(_Entry(i, j) for j in range(len(r["sentences"])))
        self.entries = entries[:max_items] if max_items is not None else entries

    def _find_image_dir(self) -> Path:
        for sub in _IMAGE_DIRS:
            d = self.root / sub
            if d.is_dir():
                return d
        tried = ", ".join(str(self.root / s) for s in _IMAGE_DIRS[:3])
        raise DatasetError(f"no COCO train2014 image folder under {self.root} (tried {tried}, ...)")

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, ref: dict) -> Path:
        info = self.images.get(int(ref["image_id"]))
        name = info["file_name"] if info is not None else None
        if name is None:  # refs name the image with an annotation suffix: COCO_train2014_000000581857_16.jpg
            stem = str(ref.get("file_name", "")).rsplit("_", 1)[0]
            name = stem + ".jpg"
        return self.image_dir / name

    def mask(self, ref: dict, height: int, width: int) -> np.ndarray:
        ann = self.annotations[int(ref["ann_id"])]
        return annotation_mask(ann["segmentation"], height, width)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        entry = self.entries[index]
        ref = self.refs[entry.ref_index]
        path = self.image_path(ref)
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except FileNotFoundError:
            raise DatasetError(f"image {path} of ref {ref['ref_id']} does not exist") from None
        except OSError as e:
            raise DatasetError(f"cannot read image {path}: {e}") from None
        h, w = rgb.shape[:2]
        info = self.images.get(int(ref["image_id"]))
        if info is not None and (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
            raise DatasetError(f"{path} is {w}×{h} but instances.json says {info.get('width')}×{info.get('height')}")
        sentences = [_sentence_text(s) for s in ref["sentences"]]
        j = max(entry.sentence_index, 0)
        sent_ids = [s.get("sent_id", k) if isinstance(s, dict) else k for k, s in enumerate(ref["sentences"])]
        return {"image": np.ascontiguousarray(rgb.transpose(2, 0, 1)), "mask": self.mask(ref, h, w),
                "sentence": sentences[j], "sentences": sentences, "ref_id": int(ref["ref_id"]),
                "sent_id": int(sent_ids[j]), "image_id": int(ref["image_id"])}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]
