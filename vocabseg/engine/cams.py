"""Class activation maps -> pseudo-masks a segmentation model can train on (the CLIMS / IRN pipeline's last steps).

:func:`write_cams` runs a CAM network (:class:`vocabseg.models.clims.CLIMS`) over a data set and writes, in the
custom-dataset layout that ``vocabseg train`` reads (``dataset: custom``)::

    out_dir/images/{stem}.png     the image (RGB)
    out_dir/labels/{stem}.png     pseudo-mask: class indices, uint8
    out_dir/classes.txt           "background" (index 0, unless background=None) then the CAM classes
    out_dir/cams/{stem}.npy       float16 [P, H, W]: normalised CAMs of the P classes present in the image
    out_dir/cams.jsonl            {"image": stem, "classes": [the P class names, in the npy's order]} per image
    out_dir/cams_metrics.json     settings, and the pseudo-masks' mIoU when the data set has label maps

As in the release (``make_clims.py``/``eval_cam.py``): the CAM of a class is the ReLU of its logits, summed over
scales and a horizontal flip, resized to the image and divided by its maximum; only the classes of the image's
image-level labels get a map (weak supervision knows them); a pixel takes the class of its highest map unless every
map is below ``threshold`` (0.15), in which case it is background. With ``background=None`` those pixels are
written as 255 (ignore) and classes.txt lists the CAM classes only.

Image-level labels come from the item's ``image_labels`` (class indices of the data set) when present, else from
its label map.

A released CLIMS CAM network (:mod:`vocabseg.models.clims_release`, ``clims_resnet50_voc``/``_coco``: fixed classes,
no text) goes through the same writer with its own official inference (``model.cams``: the release's scales, flip
and ``high_res`` maps, saved as float32); :class:`ImageFolderDataset` runs it over a plain folder of images, with
image-level labels from a JSON file or the same classes for every image. The mIoU compares the pseudo-masks with the label maps (:class:`vocabseg.metrics.ConfusionMatrix`),
mapping the data set's classes onto the output's by name; data-set classes without a CAM are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError, DatasetError
from .checkpoint import read_final_meta

__all__ = ["compute_cams", "pseudo_label", "write_cams", "WorldObjectsDataset", "cams_command"]

IGNORE = 255


# ----------------------------------------------------------------------------------------------- CAMs


@torch.inference_mode()
def compute_cams(model, rgb: np.ndarray, text_embeddings: torch.Tensor, scales: Sequence[float] = (1.0,),
                 flip: bool = True) -> np.ndarray:
    """Normalised CAMs [C, H, W] (float32, each class's maximum = 1 unless all zero) of an H×W×3 uint8 image for
    the C rows of ``text_embeddings``, at the model's inference size times each of ``scales``."""
    from ..predict import resize_image

    height, width = rgb.shape[:2]
    c = text_embeddings.shape[0]
    total = torch.zeros(c, height, width)
    if c == 0:
        return total.numpy()
    base = model.inference_size(height, width)
    d = int(getattr(model.config, "size_divisibility", 1))
    for s in scales:
        h, w = max(1, int(round(base[0] * s))), max(1, int(round(base[1] * s)))
        x = torch.from_numpy(np.ascontiguousarray(resize_image(rgb, (h, w)))).to(model.device)
        x = model.normalize_pixels(x.permute(2, 0, 1)[None].float())
        x = F.pad(x, (0, (-w) % d, 0, (-h) % d))
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        maps = model.cam_maps(batch, text_embeddings.to(model.device)).float()
        maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        maps = maps[0] + maps[1].flip(-1) if flip else maps[0]  # the flipped view, flipped back
        maps = F.interpolate(maps[None, :, :h, :w], size=(height, width), mode="bilinear", align_corners=False)[0]
        total += maps.cpu()
    total /= total.flatten(1).max(dim=1).values.view(-1, 1, 1) + 1e-5
    return total.numpy()


def pseudo_label(cams: np.ndarray, keys: Sequence[int], threshold: float, background_value: int = 0) -> np.ndarray:
    """uint8 [H, W]: ``keys[i]`` where map i is the highest and >= ``threshold``, else ``background_value``."""
    if len(keys) != cams.shape[0]:
        raise ValueError(f"{cams.shape[0]} maps but {len(keys)} keys")
    h, w = cams.shape[-2:]
    if cams.shape[0] == 0:
        return np.full((h, w), background_value, np.uint8)
    scores = np.concatenate([np.full((1, h, w), threshold, cams.dtype), cams])  # the release pads with it
    lut = np.array([background_value, *keys], dtype=np.uint8)
    return lut[scores.argmax(axis=0)]


# ----------------------------------------------------------------------------------------------- data


def _item_arrays(item: dict, index: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """A data-set item (SegmentationDataset: tensors [3,H,W]; WorldDataset: H×W×3 arrays) -> RGB, label, stem."""
    image = item["image"]
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.transpose(1, 2, 0)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    label = item.get("label")
    if isinstance(label, torch.Tensor):
        label = label.cpu().numpy()
    name = item.get("name") or f"{int(item.get('index', index)):06d}"
    return image, (None if label is None else np.asarray(label)), str(name)


class WorldObjectsDataset:
    """Generated-world scenes labelled "background" (every stuff pixel) + object classes, for CAM experiments.

    Item i = ``{"image", "label", "name"}`` of ``generate_sample(sample_seed(seed, i), config)``; label 0 is
    background, 1 + j the j-th of ``objects``: world class names such as "circle" or "red shape" (default: the
    config's categories). Object pixels no name claims are ignored.
    """

    def __init__(self, num_samples: int, seed: int = 0, config=None, objects: Sequence[str] | None = None):
        from ..data.world import STUFF_CLASSES, WorldConfig, WorldVocabulary

        self.num_samples, self.seed = int(num_samples), int(seed)
        self.config = config if config is not None else WorldConfig()
        objects = list(objects) if objects is not None else list(self.config.categories)
        self.class_names = ["background", *objects]
        self._vocabulary = WorldVocabulary(list(STUFF_CLASSES) + objects)
        stuff = len(STUFF_CLASSES)
        lut = np.full(self._vocabulary.ignore_index + 1, IGNORE, np.int64)
        lut[:stuff] = 0
        lut[stuff:stuff + len(objects)] = np.arange(1, len(objects) + 1)
        self._lut = lut

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        from ..data.world import generate_sample, sample_seed

        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        s = generate_sample(sample_seed(self.seed, index), self.config)
        return {"image": s.image, "label": self._lut[self._vocabulary.label_map(s)], "name": f"world_{index:06d}",
                "index": index}


class ImageFolderDataset:
    """A folder of images (no label maps) for CAMs: item i = ``{"image", "name", "image_labels"?}``.

    ``class_names``: the CAM classes. ``image_labels``: {file stem: [class names]} (e.g. read from a JSON file), the
    classes of each image, as weak supervision gives them; images it does not list are skipped. Without it every
    class competes in every image. Images are read as the CLIMS release reads them (RGB, no EXIF rotation).
    """

    def __init__(self, folder: str | Path, class_names: Sequence[str],
                 image_labels: dict[str, Sequence[str]] | None = None):
        from ..io import list_images

        self.class_names = [str(n) for n in class_names]
        files = list_images(folder)
        if not files:
            raise DatasetError(f"no images in {folder}")
        self._labels = None
        if image_labels is not None:
            index = {n.strip().lower(): i for i, n in enumerate(self.class_names)}
            self._labels = {}
            for stem, names in image_labels.items():
                if isinstance(names, str):
                    names = [n for n in names.split(",") if n.strip()]
                unknown = [n for n in names if n.strip().lower() not in index]
                if unknown:
                    raise DatasetError(f"image labels of {stem!r}: {unknown[0]!r} is not one of the classes "
                                       f"({', '.join(self.class_names[:5])}, ...)")
                self._labels[str(stem)] = [index[n.strip().lower()] for n in names]
            files = [f for f in files if f.stem in self._labels]
            if not files:
                raise DatasetError(f"none of the images in {folder} is listed in the image labels")
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from ..models.clims_release import read_release_image

        path = self.files[index]
        item = {"image": read_release_image(path), "name": path.stem, "index": index}
        if self._labels is not None:
            item["image_labels"] = np.asarray(self._labels[path.stem], np.int64)
        return item


def read_image_labels(path: str | Path) -> dict[str, list[str]]:
    """A JSON object {image file stem: [class names] or "name, name"}: the image-level labels of a folder."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read image labels {p}: {e}; expected a JSON object "
                           f'{{"image stem": ["class", ...]}}') from None
    if not isinstance(data, dict) or not all(isinstance(v, (list, str)) for v in data.values()):
        raise DatasetError(f'{p}: expected a JSON object {{"image stem": ["class", ...]}}')
    return {str(k): v for k, v in data.items()}


# ----------------------------------------------------------------------------------------------- writer


def _save_png(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def write_cams(model, dataset: Any, out_dir: str | Path, threshold: float | None = None, *,
               class_names: Sequence[str] | None = None, background: str | None = "background",
               scales: Sequence[float] | None = None, flip: bool = True, max_images: int | None = None,
               save_cams: bool = True, log=None) -> dict:
    """Write CAMs and thresholded pseudo-masks of ``dataset`` (``class_names`` + items with ``image`` and
    ``label`` or ``image_labels``) to ``out_dir`` in the custom-dataset layout; returns a summary (with ``mIoU``
    of the pseudo-masks against the label maps when there are label maps).

    ``class_names``: the classes that get CAMs (default: the data set's, without the one named ``background``;
    with ``background=None`` all of them).
    ``threshold``: background score (default ``model.config.cam_threshold``, else 0.15).
    ``scales``: None = the model's own (``config.scales`` of a CLIMS release), else (1.0,).
    """
    from ..metrics import ConfusionMatrix

    if threshold is None:
        threshold = float(getattr(getattr(model, "config", None), "cam_threshold", 0.15))
    if scales is None:
        scales = tuple(getattr(getattr(model, "config", None), "scales", (1.0,)))
    ds_names = [str(n) for n in dataset.class_names]
    bg_key = background.strip().lower() if background else None
    cam_names = list(class_names) if class_names is not None else [n for n in ds_names if n.strip().lower() != bg_key]
    if not cam_names:
        raise ConfigError("no classes to compute CAMs for")
    if bg_key and any(n.strip().lower() == bg_key for n in cam_names):
        raise ConfigError(f"{background!r} is both the background and a CAM class; pass background=None or "
                          f"another background name")
    out_names = ([background] if background else []) + cam_names
    if len(out_names) > IGNORE:
        raise ConfigError(f"{len(out_names)} classes do not fit 8-bit pseudo-masks (at most 255)")
    offset, bg_value = (1, 0) if background else (0, IGNORE)
    index = {n: i for i, n in enumerate(out_names)}
    lut = np.full(len(ds_names), IGNORE, np.int64)  # data-set class -> output class
    for j, n in enumerate(ds_names):
        if n in index:
            lut[j] = index[n]
        elif bg_key and n.strip().lower() == bg_key:
            lut[j] = 0

    out = Path(out_dir)
    for sub in ("images", "labels") + (("cams",) if save_cams else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(n + "\n" for n in out_names))
    model.eval()
    release = hasattr(model, "high_res")  # a released CLIMS CAM network: fixed classes, its own inference
    if release:
        model.class_indices(cam_names)  # unknown names fail here, by name
        text = None
    else:
        with torch.no_grad():
            text = model.text_embeddings(cam_names).detach()
    cm = ConfusionMatrix(len(out_names), ignore_index=IGNORE)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    records, evaluated = [], 0
    for i in range(n):
        item = dataset[i]
        image, label, stem = _item_arrays(item, i)
        gt = None
        if label is not None:
            if label.shape != image.shape[:2]:
                raise DatasetError(f"item {i} ({stem}): label {label.shape} and image {image.shape[:2]} differ")
            lab = label.astype(np.int64)
            gt = np.where((lab >= 0) & (lab < len(lut)), lut[np.clip(lab, 0, len(lut) - 1)], IGNORE)
        present = _present_classes(item, gt, offset, len(cam_names), ds_names, cam_names)
        if release:
            cams = model.cams(image, [cam_names[k] for k in present], scales=scales, flip=flip).cams
        elif present:
            cams = compute_cams(model, image, text[present], scales, flip)
        else:
            cams = np.zeros((0, *image.shape[:2]), np.float32)
        mask = pseudo_label(cams, [k + offset for k in present], threshold, bg_value)
        _save_png(out / "images" / f"{stem}.png", image)
        _save_png(out / "labels" / f"{stem}.png", mask)
        if save_cams:
            np.save(out / "cams" / f"{stem}.npy", cams.astype(np.float32 if release else np.float16))
        records.append({"image": stem, "classes": [cam_names[k] for k in present]})
        if gt is not None:
            cm.update(mask, gt)
            evaluated += 1
        if log is not None and (i + 1) % 50 == 0:
            log(f"{i + 1}/{n} images")
    (out / "cams.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary: dict[str, Any] = {"out_dir": str(out), "images": n, "classes": out_names, "threshold": threshold,
                               "background": background, "scales": list(scales), "flip": flip}
    if evaluated:
        metrics = cm.compute()
        summary.update({"mIoU": metrics["mIoU"], "pACC": metrics["pACC"], "IoU": metrics["IoU"],
                        "evaluated_images": evaluated})
    (out / "cams_metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_reference_labels(dataset: Any, out_dir: str | Path, max_images: int | None = None, log=None) -> dict:
    """Write ``dataset``'s images and its **own** label maps in the custom-dataset layout, with its class list —
    for :class:`WorldObjectsDataset` the same classes, in the same order, as the pseudo-masks :func:`write_cams`
    writes for it. It is the reference that scores (or bounds) a model trained on the pseudo-masks."""
    names = [str(n) for n in dataset.class_names]
    if len(names) > IGNORE:
        raise ConfigError(f"{len(names)} classes do not fit 8-bit label maps (at most 255)")
    out = Path(out_dir)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    for i in range(n):
        image, label, stem = _item_arrays(dataset[i], i)
        if label is None:
            raise DatasetError(f"item {i} ({stem}) has no label map to write")
        label = label.astype(np.int64)
        if label.shape != image.shape[:2] or ((label >= len(names)) & (label != IGNORE)).any() or (label < 0).any():
            raise DatasetError(f"item {i} ({stem}): label map does not fit the image or the {len(names)} classes")
        _save_png(out / "images" / f"{stem}.png", image)
        _save_png(out / "labels" / f"{stem}.png", label.astype(np.uint8))
        if log is not None and (i + 1) % 50 == 0:
            log(f"{i + 1}/{n} images")
    summary = {"out_dir": str(out), "images": n, "classes": names, "reference": True}
    (out / "reference.json").write_text(json.dumps(summary, indent=2))
    return summary


def _present_classes(item: dict, gt: np.ndarray | None, offset: int, num_cam: int, ds_names: Sequence[str],
                     cam_names: Sequence[str]) -> list[int]:
    """CAM class indices in the image: ``item["image_labels"]`` (data-set class indices) if given, else the
    classes of the (mapped) label map, else all classes (no supervision: every class competes)."""
    labels = item.get("image_labels")
    if labels is not None:
        names = [ds_names[int(j)] for j in np.asarray(labels).reshape(-1)]
        return sorted({cam_names.index(nm) for nm in names if nm in cam_names})
    if gt is not None:
        return [int(v) - offset for v in np.unique(gt) if offset <= v < offset + num_cam]
    return list(range(num_cam))


SWEEP_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def sweep_cam_thresholds(cams_dir: str | Path, reference_dir: str | Path,
                         thresholds: Sequence[float] = SWEEP_THRESHOLDS, max_images: int | None = None) -> dict[float, dict[str, Any]]:
    """Score the saved CAMs of a :func:`write_cams` folder at several background thresholds against the label
    maps of ``reference_dir`` (same classes and stems, e.g. written by :func:`write_reference_labels`), without
    running the model again: ``{threshold: {"mIoU", "pACC", "IoU"}}``. Choose the threshold on training scenes
    (the usual CAM protocol), then write pseudo-masks with it."""
    from ..metrics import ConfusionMatrix

    cams_dir, reference_dir = Path(cams_dir), Path(reference_dir)
    for path in (cams_dir / "cams.jsonl", cams_dir / "classes.txt", reference_dir / "classes.txt"):
        if not path.is_file():
            raise DatasetError(f"{path} is missing: expected a `vocabseg cams` folder (with its saved CAMs) and a "
                               f"reference folder in the same class layout")
    names = cams_dir.joinpath("classes.txt").read_text().split("\n")[:-1]
    if reference_dir.joinpath("classes.txt").read_text().split("\n")[:-1] != names:
        raise DatasetError(f"{cams_dir} and {reference_dir} list different classes (classes.txt)")
    background = 0 if names and names[0] == "background" else IGNORE
    records = [json.loads(line) for line in cams_dir.joinpath("cams.jsonl").read_text().splitlines() if line]
    if max_images is not None:
        records = records[:max_images]
    if not records:
        raise DatasetError(f"{cams_dir}: no images in cams.jsonl")
    meters = {float(t): ConfusionMatrix(len(names), ignore_index=IGNORE) for t in thresholds}
    for r in records:
        stem = r["image"]
        cam_path, ref_path = cams_dir / "cams" / f"{stem}.npy", reference_dir / "labels" / f"{stem}.png"
        if not cam_path.is_file() or not ref_path.is_file():
            raise DatasetError(f"{stem}: {cam_path if not cam_path.is_file() else ref_path} is missing")
        cams = np.load(cam_path).astype(np.float32)
        keys = [names.index(c) for c in r["classes"]]
        gt = np.asarray(Image.open(ref_path), np.int64)
        if gt.shape != cams.shape[-2:]:
            raise DatasetError(f"{stem}: reference {gt.shape} and CAMs {cams.shape[-2:]} differ in size")
        for t, meter in meters.items():
            meter.update(pseudo_label(cams, keys, t, background), gt)
    scores = {t: m.compute() for t, m in meters.items()}
    return {t: {k: r[k] for k in ("mIoU", "pACC", "IoU")} for t, r in scores.items()}


# ----------------------------------------------------------------------------------------------- CLI entry


def cams_command(out_dir: str | Path, *, model: str | None = None, checkpoint: str | None = None,
                 clip: str | None = None, dataset: str = "custom", data_root: str | None = None,
                 split: str = "train", threshold: float | None = None, background: str | None = "background",
                 scales: Iterable[float] | str | None = None, flip: bool = True, max_images: int | None = None,
                 world_samples: int = 100, world_seed: int = 0, world_objects: Sequence[str] | None = None,
                 device: str = "cpu", trust_jit: bool = False, true_labels: bool = False, log=print,
                 images: str | Path | None = None, classes: Sequence[str] | None = None,
                 image_labels: str | Path | dict | None = None, **overrides: Any) -> dict:
    """What ``vocabseg cams`` runs: load a CAM model, write CAMs + pseudo-masks of a data set, report mIoU.

    ``model``: a registered CAM model; default: the one recorded next to ``checkpoint`` by ``vocabseg train``
    (``model_final.json``: model name and model_overrides, which ``overrides`` extend), else clims_resnet50.
    ``dataset``: a name known to ``vocabseg.data.build_dataset`` (``custom`` with ``data_root``) or ``world``
    (``world_samples`` scenes from ``world_seed``, labelled background + ``world_objects``; default: the classes
    the checkpoint was trained on, else the object categories). ``scales``: floats or "1,0.5,1.5,2" (None: the
    model's own; (1.0,) for ours).
    A released CLIMS network (``clims_resnet50_voc``/``_coco`` with its ``res50_clims.pth``) runs the official CAM
    inference; ``images``: a folder of images instead of a data set, ``classes``: the CAM classes (default: all
    of the release's), ``image_labels``: JSON file (or dict) {image stem: [class names]} (default: every class in
    every image).
    ``true_labels``: write the data set's own label maps instead (:func:`write_reference_labels`; the model is not
    loaded, ``checkpoint`` only names the classes). Returns the summary of :func:`write_cams` (or of that).
    """
    from ..models import load_model
    from ..models import clims as _registers  # noqa: F401  (until vocabseg.models imports it)
    from ..models import get_entry

    if isinstance(scales, str):
        try:
            scales = [float(s) for s in scales.replace(" ", "").split(",") if s]
        except ValueError:
            raise ConfigError(f"scales must be numbers separated by commas, got {scales!r}") from None
    if scales is not None:
        scales = tuple(scales)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"scales must be positive, got {scales}")
    trained_classes = None
    meta = read_final_meta(checkpoint)
    if meta:
        if model is None or model == meta.get("model"):
            model = meta.get("model", model)
            overrides = {**meta.get("model_overrides", {}), **overrides}
            trained_classes = meta.get("class_names")
    model = model or "clims_resnet50"
    if get_entry(model).family == "clims_release":
        return _release_cams(out_dir, model, checkpoint, dataset, data_root, split, threshold, background, scales,
                             flip, max_images, device, images, classes, image_labels, log, overrides)
    if images is not None:
        raise ConfigError("--images (a plain folder) needs a released CLIMS network (--model clims_resnet50_voc or "
                          "clims_resnet50_coco); our own CAM models read a data set (--dataset)")
    if dataset == "world":
        ds = WorldObjectsDataset(world_samples, seed=world_seed, objects=world_objects or trained_classes)
    else:
        if not data_root:
            raise ConfigError(f"dataset {dataset!r} needs data_root")
        from ..data.datasets import build_dataset

        ds = build_dataset(dataset, data_root, split)
    if true_labels:
        summary = write_reference_labels(ds, out_dir, max_images=max_images, log=log)
        if log is not None:
            log(f"wrote {summary['images']} images with their true labels ({len(summary['classes'])} classes)")
        return summary
    net = load_model(model, checkpoint=checkpoint, clip=clip, device=device, trust_jit=trust_jit, **overrides)
    if not hasattr(net, "cam_maps"):
        raise ConfigError(f"model {model!r} has no class activation maps; use a CLIMS model (clims_resnet50)")
    summary = write_cams(net, ds, out_dir, threshold, background=background, scales=scales, flip=flip,
                         max_images=max_images, log=log)
    if log is not None and "mIoU" in summary:
        log(f"pseudo-mask mIoU {summary['mIoU']:.2f} over {summary['evaluated_images']} images "
            f"(threshold {summary['threshold']})")
    return summary


def _release_cams(out_dir, model, checkpoint, dataset, data_root, split, threshold, background, scales, flip,
                  max_images, device, images, classes, image_labels, log, overrides) -> dict:
    """``cams_command`` for a released CLIMS CAM network: a folder of images, or a data set with label maps (its
    classes present in each label map are the image-level labels, as in the release's evaluation)."""
    from ..models import load_model

    if checkpoint is None:
        raise ConfigError(f"{model} needs its release file: --checkpoint res50_clims.pth")
    net = load_model(model, checkpoint=checkpoint, device=device, **overrides)
    names = [net.class_names[i] for i in net.class_indices(classes)]  # unknown names fail here, by name
    if images is not None:
        labels = image_labels if isinstance(image_labels, dict) or image_labels is None else \
            read_image_labels(image_labels)
        if labels is not None:  # the release's own spellings ("tvmonitor", "dining table") -> its class names
            labels = {stem: [net.class_names[i] for i in net.class_indices(v)] for stem, v in labels.items()}
        ds: Any = ImageFolderDataset(images, names, labels)
        class_names = None
    else:
        if not data_root:
            raise ConfigError("give --images FOLDER, or --dataset with --root (a data set with label maps)")
        from ..data.datasets import build_dataset

        ds = build_dataset(dataset, data_root, split)
        class_names = names if classes is not None else None
    summary = write_cams(net, ds, out_dir, threshold, class_names=class_names, background=background,
                         scales=scales, flip=flip, max_images=max_images, log=log)
    if log is not None:
        line = f"wrote CAMs and pseudo-masks of {summary['images']} images to {out_dir}"
        if "mIoU" in summary:
            line += f"; pseudo-mask mIoU {summary['mIoU']:.2f} (threshold {summary['threshold']})"
        log(line)
    return summary
