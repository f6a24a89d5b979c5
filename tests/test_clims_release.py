"""CLIMS as released (CVI-SZU/CLIMS ``res50_clims.pth``): file layout, loading unchanged, the official ``high_res``
CAMs and labels of ``step/make_clims.py`` / ``step/eval_cam.py``, bad files, and ``vocabseg cams`` on a folder.

Three references, none of them our model code:

* ``data/clims_res50_voc.keys.tsv``: ``net/resnet50_clims.py:CAM(n_classes=20).state_dict()`` (names, shapes,
  dtypes, in order), dumped from the official module (CLIMS commit f9546d3).
* ``data/clims_release_official.npz``: the official ``step/make_clims.py:_work`` (unchanged, run on CPU with the CUDA
  calls stubbed) and ``eval_cam.py``'s labelling at threshold 0.15, for the full-size VOC network with the weights
  of :func:`_recipe` (numpy PCG64, seed 2022) on two small images (37×53: cropped from the stride-16 size; 32×48:
  not). Made by ``make_fixture.py`` in the port's scratch directory (/tmp/clims_official, outside the repo).
* :func:`_official_high_res` below: the official steps re-computed in plain torch from the file's ``backbone.*`` /
  ``newly_added.*`` copies (the ones the official strict load ends with), for the tiny test layout.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vocabseg
from vocabseg.errors import CheckpointError, VocabularyError
from vocabseg.models import create_model, get_entry, list_models
from vocabseg.models.clims_release import vocabseg_to_release

DATA = Path(__file__).parent / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions: one thread is 10-20x faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _OfficialLayout(nn.Module):
    """The module structure of ``net/resnet50_clims.py:CAM`` around a ResNet: its ``state_dict()`` is the release
    file's (956 names for ResNet-50, every copy sharing one tensor, torch's ``_metadata`` included)."""

    def __init__(self, resnet: nn.Module, classifier: nn.Module):
        super().__init__()
        self.resnet50 = resnet
        self.stage1 = nn.Sequential(resnet.conv1, resnet.bn1, nn.ReLU(), resnet.maxpool, resnet.layer1)
        self.stage2 = nn.Sequential(resnet.layer2)
        self.stage3 = nn.Sequential(resnet.layer3)
        self.stage4 = nn.Sequential(resnet.layer4)
        self.classifier = classifier
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.ndim == 1:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)


def _write_release(model, path: Path) -> Path:
    torch.save(_OfficialLayout(model.resnet50, model.classifier).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny network written as the release writes its file, and the model loaded from that file."""
    src = create_model("clims_release_tiny_test").eval()
    _randomize(src, 0)
    path = _write_release(src, tmp_path_factory.mktemp("clims") / "res50_clims.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = vocabseg.load_model("clims_release_tiny_test", checkpoint=path)
    return src, model, path


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(5 * xx + c) * np.cos(3 * yy - c) for c in range(3)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def _official_features(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """net/resnet50_v2.py through the ``backbone.*`` copies: stem /4, layers with strides 1, 2, 2, 1."""
    x = F.relu(_bn(F.conv2d(x, sd["backbone.0.0.weight"], stride=2, padding=3), sd, "backbone.0.1."))
    x = F.max_pool2d(x, 3, 2, 1)
    for n, stride in zip(range(1, 5), (1, 2, 2, 1)):
        prefix = "backbone.0.4." if n == 1 else f"backbone.{n - 1}.0."
        i = 0
        while f"{prefix}{i}.conv1.weight" in sd:
            p, s = f"{prefix}{i}.", stride if i == 0 else 1
            y = F.relu(_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
            y = F.relu(_bn(F.conv2d(y, sd[p + "conv2.weight"], stride=s, padding=1), sd, p + "bn2."))
            y = _bn(F.conv2d(y, sd[p + "conv3.weight"]), sd, p + "bn3.")
            if p + "downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=s), sd, p + "downsample.1.")
            x = F.relu(y + x)
            i += 1
    return x


def _official_high_res(sd: dict, rgb: np.ndarray, keys, scales=(1.0, 0.5, 1.5, 2.0), flip=True) -> np.ndarray:
    """VOC12ClassificationDatasetMSF + CAM.forward + make_clims._work's high_res, re-computed here."""
    h, w = rgb.shape[:2]
    up = (((h - 1) // 16 + 1) * 16, ((w - 1) // 16 + 1) * 16)
    total = 0
    for s in scales:
        img = rgb
        if s != 1:
            size = (int(np.round(h * s)), int(np.round(w * s)))
            img = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BICUBIC))
        norm = np.empty(img.shape, np.float32)
        for c in range(3):
            norm[..., c] = (img[..., c] / 255.0 - MEAN[c]) / STD[c]
        x = torch.from_numpy(norm.transpose(2, 0, 1).copy())
        batch = torch.stack([x, x.flip(-1)]) if flip else x[None]
        with torch.no_grad():
            cam = F.relu(F.conv2d(_official_features(sd, batch), sd["newly_added.0.weight"]))
        cam = cam[0] + cam[1].flip(-1) if flip else cam[0]
        total = total + F.interpolate(cam[:, None], up, mode="bilinear", align_corners=False)
    cams = total[:, 0, :h, :w][list(keys)]
    return (cams / (cams.flatten(1).max(1).values[:, None, None] + 1e-5)).numpy()


def _official_labels(cams: np.ndarray, keys, threshold: float = 0.15) -> np.ndarray:
    """step/eval_cam.py: threshold plane first, arg-max, then release class index + 1."""
    padded = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams])
    return np.array([0, *[k + 1 for k in keys]])[padded.argmax(0)]


def _recipe(shapes: dict) -> dict:
    """The fixture's weights (make_fixture.py): numpy PCG64 stream, seed 2022, in state-dict order."""
    rng = np.random.default_rng(2022)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = np.array(0, np.int64)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif name.endswith(("running_mean", "bias")):
            out[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
        elif len(shape) == 1:
            out[name] = rng.uniform(0.5, 1.0, shape).astype(np.float32)
        else:
            out[name] = rng.normal(0.0, (2.0 / int(np.prod(shape[1:]))) ** 0.5, shape).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------- layout


def _official_keys() -> dict[str, tuple[list[int], str]]:
    out = {}
    for line in (DATA / "clims_res50_voc.keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    return out


def test_full_size_layout_is_the_official_one():
    official = _official_keys()
    assert len(official) == 956
    with torch.device("meta"):
        voc, coco = create_model("clims_resnet50_voc"), create_model("clims_resnet50_coco")
    state = voc.state_dict()
    assert len(state) == 319 and abs(sum(v.numel() for v in state.values()) - 23.60e6) < 0.01e6
    ours = vocabseg_to_release(state)
    assert list(ours) == list(official)  # same names, same order
    for k, v in ours.items():
        assert list(v.shape) == official[k][0] and str(v.dtype).replace("torch.", "") == official[k][1], k
    layout = _OfficialLayout(voc.resnet50, voc.classifier).state_dict()  # the writer the tests use
    assert list(layout) == list(official)
    assert tuple(coco.classifier.weight.shape) == (80, 2048, 1, 1)
    assert voc.class_names[0] == "aeroplane" and voc.class_names[-1] == "tv" and len(voc.class_names) == 20
    assert coco.class_names[:3] == ["person", "bicycle", "car"] and coco.class_names[-1] == "toothbrush"
    # registered apart from the segmentation models; our own CLIP-tied CLIMS keeps its name
    assert {"clims_resnet50_voc", "clims_resnet50_coco"} <= set(list_models(task="cams"))
    assert "clims_resnet50_voc" not in list_models(task="semantic")
    assert get_entry("clims_resnet50").family == "clims"


def test_release_file_loads_unchanged(tiny):
    src, model, path = tiny
    raw = torch.load(path, weights_only=True)
    assert len(raw) == 3 * (len(src.state_dict()) - 1) + 2  # three backbone copies, two classifier copies
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training and all(not m.training for m in model.modules())


# ----------------------------------------------------------------------------------------------- official CAMs


@pytest.mark.parametrize("size", [(32, 48), (37, 53), (16, 16), (75, 41)])
def test_cams_match_the_official_steps(tiny, size):
    src, model, path = tiny
    sd = torch.load(path, weights_only=True)
    rgb = _image(*size, seed=size[0])
    keys = [2, 6, 14] if size[0] % 2 else [11, 0]
    ref = _official_high_res(sd, rgb, sorted(keys))  # the release computes its classes in class-list order
    ref_labels = _official_labels(ref, sorted(keys))
    for order in (sorted(keys), sorted(keys)[::-1], keys):
        r = model.cams(rgb, classes=[model.class_names[k] for k in order])
        rows = [sorted(keys).index(k) for k in order]
        assert r.cams.shape == (len(order), *size) and r.cams.dtype == np.float32
        assert np.abs(r.cams - ref[rows]).max() < 1e-5
        assert r.classes == [model.class_names[k] for k in order]
        ours = np.array([0, *[k + 1 for k in order]])[r.labels]  # our label i+1 = classes[i]
        assert (ours == ref_labels).mean() == 1.0


def test_full_size_network_against_the_official_code(tmp_path):
    """Full-size VOC network, weights of the recipe, loaded from a release-layout file, vs official outputs."""
    fixture = np.load(DATA / "clims_release_official.npz")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in create_model("clims_resnet50_voc").state_dict().items()}
    src = create_model("clims_resnet50_voc")
    src.load_state_dict({k: torch.from_numpy(v) for k, v in _recipe(shapes).items()})
    path = _write_release(src, tmp_path / "res50_clims.pth")
    del src
    model = vocabseg.load_model("clims_resnet50_voc", checkpoint=path)
    for i in range(2):
        rgb, keys = fixture[f"image{i}"], [int(k) for k in fixture[f"keys{i}"]]
        ref, ref_labels = fixture[f"high_res{i}"], fixture[f"labels{i}"]
        for order in (keys, keys[::-1]):
            r = model.cams(rgb, classes=[model.class_names[k] for k in order])
            diff = np.abs(r.cams - ref[[keys.index(k) for k in order]]).max()
            assert diff < 1e-4, diff  # measured 2e-6
            ours = np.array([0, *[k + 1 for k in order]])[r.labels]
            assert (ours == ref_labels).mean() >= 0.999


def test_scales_flip_and_threshold_can_be_overridden(tiny):
    src, model, path = tiny
    sd = torch.load(path, weights_only=True)
    rgb = _image(45, 30, seed=3)
    ref = _official_high_res(sd, rgb, [7, 3], scales=(1.0, 0.75), flip=False)
    r = model.cams(rgb, classes=["cat", "boat"], scales=(1.0, 0.75), flip=False, threshold=0.5)
    assert np.abs(r.cams - ref).max() < 1e-5 and r.threshold == 0.5
    assert np.array_equal(np.array([0, 8, 4])[r.labels], _official_labels(ref, [7, 3], threshold=0.5))
    default = model.cams(rgb, classes=["cat"])
    assert np.abs(default.cams - _official_high_res(sd, rgb, [7])).max() < 1e-5


def test_class_names_aliases_and_errors(tiny, tmp_path):
    _, model, _ = tiny
    assert model.class_indices(["tvmonitor", "dining table", "Potted_Plant", "tv monitor"][:3]) == [19, 10, 15]
    assert model.class_indices(None) == list(range(20))
    with pytest.raises(VocabularyError) as err:
        model.cams(_image(16, 16, 0), classes=["bird", "giraffe"])
    msg = str(err.value)
    assert "\n" not in msg and "'giraffe'" in msg and "voc20.txt" in msg
    with pytest.raises(VocabularyError, match="twice"):
        model.class_indices(["tv", "tvmonitor"])
    empty = model.cams(_image(20, 24, 0), classes=[])
    assert empty.cams.shape == (0, 20, 24) and not empty.labels.any()
    # a file path is read as the release reads it (RGB, no EXIF rotation)
    rgb = _image(24, 40, 9)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    a, b = model.cams(tmp_path / "x.png", classes=["car"]), model.cams(rgb, classes=["car"])
    assert np.array_equal(a.cams, b.cams)


# ----------------------------------------------------------------------------------------------- bad files


def _load_error(name, path, match):
    with pytest.raises(CheckpointError) as err:
        vocabseg.load_model(name, checkpoint=path)
    msg = str(err.value)
    assert "\n" not in msg and path.name in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_clims_file",))


def test_bad_files_fail_by_name(tiny, tmp_path, monkeypatch):
    src, _, path = tiny
    release = torch.load(path, weights_only=True)
    # another family's file
    san = tmp_path / "san.pth"
    torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(1, 100, 240)}}, san)
    _load_error("clims_release_tiny_test", san, ["not a CLIMS release CAM network"])
    # the other data set's variant: 80 classes into the VOC model, named
    coco = tmp_path / "coco.pth"
    torch.save({"resnet50.conv1.weight": torch.zeros(64, 3, 7, 7), "classifier.weight": torch.zeros(80, 2048, 1, 1),
                "newly_added.0.weight": torch.zeros(80, 2048, 1, 1)}, coco)
    _load_error("clims_release_tiny_test", coco, ["80-class", "clims_resnet50_coco"])
    # our own CLIP-tied CLIMS
    own = tmp_path / "own.pth"
    torch.save({"clip.logit_scale": torch.zeros(()), "backbone.conv1.weight": torch.zeros(8, 3, 7, 7),
                "classifier.weight": torch.zeros(32, 256, 1, 1)}, own)
    _load_error("clims_release_tiny_test", own, ["'clims_resnet50'"])
    # a copy missing (the official strict load fails too)
    gone = dict(release)
    del gone["backbone.1.0.0.conv1.weight"]
    torch.save(gone, tmp_path / "gone.pth")
    _load_error("clims_release_tiny_test", tmp_path / "gone.pth", ["missing", "backbone.1.0.0.conv1.weight"])
    # a wider network than the config
    wide = tmp_path / "wide.pth"
    torch.save({**release, "resnet50.conv1.weight": torch.zeros(9, 3, 7, 7)}, wide)
    _load_error("clims_release_tiny_test", wide, ["resnet50.conv1.weight"])
    # truncated
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _load_error("clims_release_tiny_test", cut, ["truncated"])
    # arbitrary pickled objects beside the weights: refused, never run
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({**release, "meta": _Evil()}, evil)
    _load_error("clims_release_tiny_test", evil, [])
    assert not (tmp_path / "pwned_by_clims_file").exists()


def test_differing_copies_use_the_copy_the_official_loader_keeps(tiny, tmp_path):
    src, _, path = tiny
    release = {k: v.clone() for k, v in torch.load(path, weights_only=True).items()}
    release["backbone.0.0.weight"] += 1.0  # conv1 through the last copy the official strict load writes
    torch.save(release, tmp_path / "odd.pth")
    with pytest.warns(UserWarning, match="differ between their copies"):
        model = vocabseg.load_model("clims_release_tiny_test", checkpoint=tmp_path / "odd.pth")
    assert torch.equal(model.resnet50.conv1.weight, release["backbone.0.0.weight"])


# ----------------------------------------------------------------------------------------------- vocabseg cams


def test_cams_command_runs_a_release_file_over_a_folder(tiny, tmp_path):
    from typer.testing import CliRunner

    from vocabseg.cli import app
    from vocabseg.engine.cams import cams_command

    _, model, path = tiny
    folder = tmp_path / "images"
    folder.mkdir()
    for stem, size in (("a", (37, 53)), ("b", (32, 48))):
        Image.fromarray(_image(*size, seed=size[1])).save(folder / f"{stem}.png")
    (tmp_path / "labels.json").write_text(json.dumps({"a": ["tvmonitor", "bird"], "b": "car"}))
    summary = cams_command(tmp_path / "out", model="clims_release_tiny_test", checkpoint=str(path), images=folder,
                           image_labels=tmp_path / "labels.json", log=None)
    assert summary["images"] == 2 and summary["scales"] == [1.0, 0.5, 1.5, 2.0]
    out = tmp_path / "out"
    names = out.joinpath("classes.txt").read_text().split("\n")[:-1]
    assert names == ["background", *model.class_names]
    records = [json.loads(line) for line in out.joinpath("cams.jsonl").read_text().splitlines()]
    assert records == [{"image": "a", "classes": ["bird", "tv"]}, {"image": "b", "classes": ["car"]}]
    for r in records:
        ref = model.cams(folder / f"{r['image']}.png", classes=r["classes"])
        saved = np.load(out / "cams" / f"{r['image']}.npy")
        assert saved.dtype == np.float32 and np.array_equal(saved, ref.cams)
        mask = np.asarray(Image.open(out / "labels" / f"{r['image']}.png"))
        lut = np.array([0, *[names.index(c) for c in r["classes"]]])
        assert np.array_equal(mask, lut[ref.labels])
    # the command line, same classes for every image
    res = CliRunner().invoke(app, ["cams", "--out", str(tmp_path / "cli"), "--model", "clims_release_tiny_test",
                                   "--checkpoint", str(path), "--images", str(folder), "--classes", "cat, dog",
                                   "--scales", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "classes.txt").read_text() == "background\ncat\ndog\n"
    mask = np.asarray(Image.open(tmp_path / "cli" / "labels" / "a.png"))
    ref = model.cams(folder / "a.png", classes=["cat", "dog"], scales=(1.0,))
    assert np.array_equal(mask, ref.labels)
    res = CliRunner().invoke(app, ["cams", "--out", str(tmp_path / "bad"), "--model", "clims_release_tiny_test",
                                   "--checkpoint", str(path), "--images", str(folder), "--classes", "cat, unicorn"])
    assert isinstance(res.exception, VocabularyError) and "'unicorn'" in str(res.exception)  # main(): one line
