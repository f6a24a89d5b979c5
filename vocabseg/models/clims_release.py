"""CLIMS as released (CVI-SZU/CLIMS): the CAM network of ``net/resnet50_clims.py`` and its CAM inference.

The released ``res50_clims.pth`` is ``torch.save(model.module.state_dict())`` of the trained ResNet-50 CAM network:
a flat state dict, no container, no ``module.``. The official module registers the same ResNet-50 three times
(``resnet50.*``; ``stage1..4.*``, the stem and ``layerN`` wrapped in ``nn.Sequential``; ``backbone.{0..3}.*``, a
``ModuleList`` of those stages) and its bias-free 1×1 classifier twice (``classifier.weight``,
``newly_added.0.weight``), so the file holds 956 tensors (VOC) of which 319 are distinct. No CLIP is needed for the
CAMs: CLIP only judged the network while it trained (:mod:`vocabseg.models.clims` is our own, CLIP-tied CLIMS).

The backbone is ``net/resnet50_v2.py``: ImageNet ResNet-50 v1.5 (stride on the 3×3), plain ``BatchNorm2d`` (used
in eval mode, i.e. with the running statistics: the ``FixedBatchNorm`` of that file is never used), strides
2, 2, 2, 1 (output stride 16) and no dilation. It is exactly :class:`vocabseg.models.clims.ResNet` with torchvision's
names, which is reused here.

CAMs follow ``step/make_clims.py`` (``_work``, the ``high_res`` maps) with the images of
``voc12/dataloader.py:VOC12ClassificationDatasetMSF`` (``mscoco/dataloader.py`` is the same for COCO) and labels as
``step/eval_cam.py`` makes them:

1. scales (1.0, 0.5, 1.5, 2.0): scale 1 keeps the image; others are PIL bicubic resizes of the uint8 image to
   ``(int(np.round(H*s)), int(np.round(W*s)))`` (numpy rounds half to even);
2. ``(x / 255 - mean) / std`` with ImageNet statistics (computed in float64, stored float32);
3. each scale as the batch [image, image flipped left-right]: ``relu(conv2d(stage4, classifier.weight))``, then
   ``maps[0] + maps[1].flip(-1)``;
4. each scale's maps bilinearly resized (align_corners=False) **directly** to ``(ceil(H/16)*16, ceil(W/16)*16)``,
   summed over scales, cropped to H×W;
5. the maps of the requested classes, each divided by its maximum + 1e-5: the official ``high_res``;
6. labels: a constant plane at the threshold (0.15, the README's ``--cam_eval_thres``) in front, arg-max;
   0 = background, i + 1 = the i-th class.

Images given as files are read as the release reads them (PIL, converted to RGB, **no** EXIF rotation).

Reads top to bottom: config and class lists, the network, the release key map, CAM inference, registered configs.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import CheckpointError, ConfigError, ImageError, VocabularyError
from ..runtime import model_dtype
from .clims import IMAGENET_MEAN, IMAGENET_STD, ResNet
from .registry import register_model
from .weights import load_strict

# ----------------------------------------------------------------------------------------------- config


def release_class_names(class_list: str) -> list[str]:
    """The classifier's rows, in the release's order.

    ``voc20``: ``voc12/dataloader.py:CAT_LIST`` = vocabseg/data/classes/voc20.txt (which writes "tv" for
    "tvmonitor"). ``coco80``: the 80 COCO things in category-id order (``mscoco/dataloader.py:category_map``) =
    the first 80 names of vocabseg/data/classes/coco_stuff171.txt.
    """
    from ..data.datasets import load_class_names

    if class_list == "voc20":
        return load_class_names("voc20")
    if class_list == "coco80":
        return load_class_names("coco_stuff171")[:80]
    raise ConfigError(f"unknown CLIMS release class list {class_list!r}; use 'voc20' or 'coco80'")


# Other spellings of the same classes: the release's own (CAT_LIST's "tvmonitor", clip_utils' "tv monitor",
# "dining table", "potted plant") are covered by ignoring case, spaces, '_' and '-'; these are the rest.
_ALIASES = {"tvmonitor": "tv", "tv monitor": "tv", "television": "tv", "plane": "aeroplane", "airplane": "aeroplane",
            "motorcycle": "motorbike", "couch": "sofa"}
_COCO_ALIASES = {"tvmonitor": "tv", "aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch",
                 "diningtable": "dining table", "pottedplant": "potted plant", "hairdryer": "hair drier"}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


@dataclass
class CLIMSReleaseConfig:
    class_list: str = "voc20"  # "voc20" | "coco80": the classifier's rows (release order)
    class_names: tuple[str, ...] = ()  # explicit rows instead (tests); empty: from class_list
    num_classes: int = 20
    backbone_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # ResNet-50
    backbone_width: int = 64
    backbone_strides: tuple[int, int, int, int] = (1, 2, 2, 1)  # layer1..4 after the /4 stem: output stride 16
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # TorchvisionNormalize
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)  # run_sample.py --cam_scales
    flip: bool = True
    cam_threshold: float = 0.15  # README --cam_eval_thres
    output_stride: int = 16  # high_res maps are made at ceil(H/16)*16 × ceil(W/16)*16, then cropped
    cam_epsilon: float = 1e-5


@dataclass
class CAMResult:
    """CAMs of one image: ``cams`` [P, H, W] float32 (the official ``high_res``, rows in the order of ``classes``),
    ``labels`` [H, W] int64 (0 = background, i + 1 = ``classes[i]``)."""

    image: np.ndarray = field(repr=False)
    classes: list[str]
    cams: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    threshold: float

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        from ..viz import overlay

        return overlay(self.image, self.labels, ["background", *self.classes], alpha=alpha, legend=legend)


# ----------------------------------------------------------------------------------------------- network


class CLIMSReleaseCAM(nn.Module):
    """``net/resnet50_clims.py:CAM``: ResNet-50 (output stride 16) + bias-free 1×1 classifier, K fixed classes.

    Our parameter names are the release's ``resnet50.*`` and ``classifier.weight``; :func:`release_to_vocabseg`
    reduces the release's three copies to these.
    """

    def __init__(self, config: CLIMSReleaseConfig):
        super().__init__()
        self.config = config
        names = list(config.class_names) or release_class_names(config.class_list)
        if len(names) != config.num_classes:
            raise ConfigError(f"CLIMS release config: {len(names)} class names for {config.num_classes} classes")
        self.class_names = names
        self.resnet50 = ResNet(tuple(config.backbone_layers), config.backbone_width, tuple(config.backbone_strides))
        self.classifier = nn.Conv2d(self.resnet50.out_channels, config.num_classes, 1, bias=False)
        self._index = {}
        for i, n in enumerate(names):
            self._index.setdefault(_key(n), i)
        aliases = _COCO_ALIASES if config.class_list == "coco80" and not config.class_names else _ALIASES
        for alias, target in aliases.items():
            if _key(target) in self._index:
                self._index.setdefault(_key(alias), self._index[_key(target)])

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> ReLU'd class maps [B, K, ceil(H/16), ceil(W/16)] (``CAM.forward``
        before its flip merge)."""
        return F.relu(F.conv2d(self.resnet50(x), self.classifier.weight))

    # -- classes -----------------------------------------------------------------------------------------------
    def class_indices(self, classes: Sequence[str] | str | None) -> list[int]:
        """Rows of the release classifier for the given names (None: all, in the release's order)."""
        if classes is None:
            return list(range(len(self.class_names)))
        if isinstance(classes, str):
            classes = [c for c in classes.split(",") if c.strip()]
        out: list[int] = []
        for name in classes:
            i = self._index.get(_key(name))
            if i is None:
                where = (f"vocabseg/data/classes/{self.config.class_list}.txt" if self.config.class_list == "voc20"
                         else "the first 80 names of vocabseg/data/classes/coco_stuff171.txt")
                raise VocabularyError(f"{name!r} is not one of the {len(self.class_names)} classes of "
                                      f"{getattr(self, 'model_name', '') or 'this CLIMS release'} (see {where}, or "
                                      f"model.class_names)")
            if i in out:
                raise VocabularyError(f"class {self.class_names[i]!r} is given twice ({name!r})")
            out.append(i)
        return out

    # -- CAM inference (step/make_clims.py) --------------------------------------------------------------------
    def _normalise(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 H×W×3 -> [3, H, W] float32 on the model's device: ``(x / 255 - mean) / std`` computed in float64
        (numpy) and stored as float32, as ``TorchvisionNormalize`` does."""
        mean, std = np.asarray(self.config.pixel_mean, np.float64), np.asarray(self.config.pixel_std, np.float64)
        x = ((np.asarray(rgb, np.uint8) / 255.0 - mean) / std).astype(np.float32)
        return torch.from_numpy(x.transpose(2, 0, 1).copy()).to(self.device)

    @torch.inference_mode()
    def scale_maps(self, rgb: np.ndarray, scale: float, flip: bool = True) -> torch.Tensor:
        """Class maps [K, h, w] of one scale: the image and its mirror image, merged (``CAM.forward``)."""
        x = self._normalise(rgb if scale == 1 else pil_rescale(rgb, scale))
        batch = torch.stack([x, x.flip(-1)]) if flip else x[None]
        maps = self(batch.to(model_dtype(self))).float()  # bf16 weights: the network in bf16, the CAM sums in fp32
        return maps[0] + maps[1].flip(-1) if flip else maps[0]

    @torch.inference_mode()
    def high_res(self, rgb: np.ndarray, rows: Sequence[int], scales: Sequence[float] | None = None,
                 flip: bool | None = None) -> torch.Tensor:
        """The official ``high_res`` CAMs [len(rows), H, W] (float32, on the model's device)."""
        scales = tuple(self.config.scales if scales is None else scales)
        flip = self.config.flip if flip is None else bool(flip)
        if not scales or any(float(s) <= 0 for s in scales):
            raise ConfigError(f"scales must be positive numbers, got {scales}")
        height, width = rgb.shape[:2]
        d = self.config.output_stride
        up = (math.ceil(height / d) * d, math.ceil(width / d) * d)  # imutils.get_strided_up_size
        per_scale = [F.interpolate(self.scale_maps(rgb, float(s), flip)[:, None], up, mode="bilinear",
                                   align_corners=False) for s in scales]  # [K, 1, H16, W16] each
        cams = torch.stack(per_scale, 0).sum(0)[:, 0, :height, :width]
        cams = cams[list(rows)]
        if cams.shape[0] > 0:
            cams = cams / (F.adaptive_max_pool2d(cams, (1, 1)) + self.config.cam_epsilon)
        return cams

    @torch.inference_mode()
    def cams(self, image: Any, classes: Sequence[str] | str | None = None, *, scales: Sequence[float] | None = None,
             flip: bool | None = None, threshold: float | None = None) -> CAMResult:
        """CAMs and pseudo-labels of one image (path, PIL image or H×W×3 array) for ``classes`` (the image's
        classes, names of :attr:`class_names`; None: all of them), rows in the order given."""
        rgb = read_release_image(image)
        rows = self.class_indices(classes)
        cams = self.high_res(rgb, rows, scales, flip).float().cpu().numpy()
        threshold = self.config.cam_threshold if threshold is None else float(threshold)
        return CAMResult(rgb, [self.class_names[i] for i in rows], cams, cam_labels(cams, threshold), threshold)

    def predict(self, image: Any, vocabulary: Any = None, **kwargs: Any):
        raise ConfigError(f"{getattr(self, 'model_name', '') or 'a CLIMS release'} is a CAM network of fixed classes: "
                          f"use model.cams(image, classes=[...]) or `vocabseg cams`")

    # -- checkpoints -------------------------------------------------------------------------------------------
    def load_checkpoint_state(self, state: dict[str, torch.Tensor], allow_missing_clip: bool = False) -> None:
        load_strict(self, release_to_vocabseg(state, self.config.num_classes, list(self.state_dict())))


def pil_rescale(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``misc/imutils.py:pil_rescale(img, scale, order=3)``: PIL bicubic to numpy-rounded (half to even) sizes."""
    height, width = rgb.shape[:2]
    size = (int(np.round(height * scale)), int(np.round(width * scale)))
    if size == (height, width):
        return rgb
    if min(size) < 1:
        raise ImageError(f"a {height}×{width} image is too small for scale {scale} (it would be {size[0]}×{size[1]})")
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BICUBIC))


def cam_labels(cams: np.ndarray, threshold: float) -> np.ndarray:
    """``step/eval_cam.py``: a constant ``threshold`` plane first, arg-max -> 0 = background, i + 1 = class i."""
    h, w = cams.shape[-2:]
    scores = np.concatenate([np.full((1, h, w), threshold, cams.dtype), cams])
    return scores.argmax(axis=0).astype(np.int64)


def read_release_image(image: Any) -> np.ndarray:
    """H×W×3 uint8 as the release reads images: files and PIL images converted to RGB without EXIF rotation
    (``imageio.imread`` / ``PIL.Image.open(...).convert('RGB')``); arrays as :func:`vocabseg.io.load_image`."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"No such image file: {path}.")
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any failure to parse a user file is the file's fault
            raise ImageError(f"Cannot read image {path}: {e}.") from e
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    from ..io import load_image

    return load_image(image)


# ----------------------------------------------------------------------------------------------- release key map


def _aliases(key: str) -> list[str]:
    """Our ``resnet50.*`` / ``classifier.weight`` name -> its names in the release, in the order the official
    strict ``load_state_dict`` writes them (module registration order: resnet50, stage1..4, classifier, backbone,
    newly_added), so the last one is the value the official model ends up with."""
    if key == "classifier.weight":
        return ["classifier.weight", "newly_added.0.weight"]
    rest = key[len("resnet50."):]
    m = re.match(r"(conv1|bn1)\.(.*)", rest)
    if m:
        i = 0 if m.group(1) == "conv1" else 1
        return [key, f"stage1.{i}.{m.group(2)}", f"backbone.0.{i}.{m.group(2)}"]
    m = re.match(r"layer([1-4])\.(.*)", rest)
    if not m:
        raise KeyError(key)
    n, tail = int(m.group(1)), m.group(2)
    if n == 1:  # stage1 = Sequential(conv1, bn1, relu, maxpool, layer1)
        return [key, f"stage1.4.{tail}", f"backbone.0.4.{tail}"]
    return [key, f"stage{n}.0.{tail}", f"backbone.{n - 1}.0.{tail}"]


def release_key_names(own_keys: Sequence[str]) -> list[str]:
    """Every tensor name of the release file for a model whose state dict has ``own_keys``."""
    return [a for k in own_keys for a in _aliases(k)]


def vocabseg_to_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the release layout, in the release's key order, every copy sharing its tensor (as
    ``state_dict()`` of the official module does). Used by tests and to write files the official code loads."""
    out: dict[str, torch.Tensor] = {}
    groups = [(k, _aliases(k)) for k in state]
    for position in range(3):  # resnet50.*, then stage*, classifier, then backbone.*, newly_added
        for k, names in groups:
            if k == "classifier.weight":
                continue
            if position < len(names):
                out[names[position]] = state[k]
        if position == 1:
            out["classifier.weight"] = state["classifier.weight"]
    # the official order: resnet50, stage1..4, classifier, backbone, newly_added
    out["newly_added.0.weight"] = state["classifier.weight"]
    return out


_CLASS_FILES = {20: "clims_resnet50_voc", 80: "clims_resnet50_coco"}


def release_to_vocabseg(state: dict[str, torch.Tensor], num_classes: int,
                        own_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The release's 956-tensor state dict (or ours) -> our ``own_keys`` (``resnet50.*`` + ``classifier.weight``).

    Every copy must be present (the official loader is strict) with one shape; the value kept is the one the
    official strict load ends with (``backbone.*``, ``newly_added.0.weight``), and copies that differ are reported
    in a warning. ``num_batches_tracked`` counters absent from the file (old torch versions) are filled in.
    Anything else fails by name.
    """
    keys = list(state)
    if any(k.startswith("clip.") for k in keys):
        raise CheckpointError("this is a checkpoint of vocabseg's own CLIP-tied CLIMS; load it with "
                              "'clims_resnet50' (the release models take the official res50_clims.pth)")
    if not any(k.startswith(("resnet50.", "backbone.", "stage1.")) for k in keys) or not any(
            k in state for k in ("classifier.weight", "newly_added.0.weight")):
        shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
        raise CheckpointError(f"not a CLIMS release CAM network (net/resnet50_clims.py:CAM: keys resnet50.*, "
                              f"stage1..4.*, backbone.*, classifier.weight); found {len(keys)} tensors ({shown})")
    weight = state.get("newly_added.0.weight", state.get("classifier.weight"))
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise CheckpointError(f"the classifier has shape {tuple(weight.shape)}, expected [K, 2048, 1, 1]")
    if weight.shape[0] != num_classes:
        other = _CLASS_FILES.get(weight.shape[0])
        hint = f"; load it with {other!r}" if other else ""
        raise CheckpointError(f"a {weight.shape[0]}-class CLIMS CAM network, but this model has {num_classes} "
                              f"classes{hint}")
    if not any(k.startswith(("stage1.", "backbone.", "newly_added.")) for k in keys):
        return dict(state)  # already our layout (resnet50.* + classifier.weight): load_strict checks it
    own: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, differing, shapes = [], [], []
    for k in own_keys:
        names = _aliases(k)
        present = [n for n in names if n in state]
        used.update(present)
        if not present and k.endswith("num_batches_tracked"):
            own[k] = torch.tensor(0)  # unused in eval mode; absent from files of old torch versions
            continue
        missing += [n for n in names if n not in state]
        if not present:
            continue
        value = state[present[-1]]
        if any(state[n].shape != value.shape for n in present):
            shapes.append(f"{k} {[tuple(state[n].shape) for n in present]}")
        elif any(not torch.equal(state[n], value) for n in present[:-1]):
            differing.append(k)
        own[k] = value
    unexpected = [k for k in keys if k not in used]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"copies of different shapes: {'; '.join(shapes[:2])}")
    if problems:
        raise CheckpointError("not the layout of net/resnet50_clims.py:CAM for this model: " + "; ".join(problems))
    if differing:
        warnings.warn(f"{len(differing)} tensors of the CLIMS file differ between their copies (e.g. "
                      f"{differing[0]}); using the backbone.* / newly_added.* copy, as the official loader does",
                      stacklevel=4)
    return own


# ----------------------------------------------------------------------------------------------- registered configs


def _voc() -> CLIMSReleaseConfig:
    return CLIMSReleaseConfig()


def _coco() -> CLIMSReleaseConfig:
    return CLIMSReleaseConfig(class_list="coco80", num_classes=80)


def _tiny() -> CLIMSReleaseConfig:
    """The release layout with one bottleneck per stage of width 8, VOC's 20 classes: for tests."""
    return CLIMSReleaseConfig(backbone_layers=(1, 1, 1, 1), backbone_width=8)


@register_model("clims_resnet50_voc", "clims_release", _voc(), "CLIMS release CAM network, PASCAL VOC (20 classes; "
                "load res50_clims.pth): model.cams(image, classes=[...]) / vocabseg cams", task="cams")
def clims_resnet50_voc(cfg: CLIMSReleaseConfig) -> CLIMSReleaseCAM:
    return CLIMSReleaseCAM(cfg)


@register_model("clims_resnet50_coco", "clims_release", _coco(), "CLIMS release CAM network, MS COCO (80 classes; "
                "load its res50_clims.pth): model.cams(image, classes=[...]) / vocabseg cams", task="cams")
def clims_resnet50_coco(cfg: CLIMSReleaseConfig) -> CLIMSReleaseCAM:
    return CLIMSReleaseCAM(cfg)


@register_model("clims_release_tiny_test", "clims_release", _tiny(), "tiny random CLIMS release layout for tests",
                test_only=True, task="cams")
def clims_release_tiny_test(cfg: CLIMSReleaseConfig) -> CLIMSReleaseCAM:
    return CLIMSReleaseCAM(cfg)
