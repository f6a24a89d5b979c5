"""GroupViT release files (NVlabs/GroupViT ``group_vit_gcc_{yfcc,redcap}_30e-*.pth``) and the official zero-shot
inference (``GroupViTSegInference`` with the demo's VOC settings).

Release files are written here by our own code in the release's exact container (``utils/checkpoint.py:
save_checkpoint`` minus the optimizer: ``model, lr_scheduler, metrics, epoch, config, max_accuracy, max_miou, amp``,
the config an OmegaConf ``DictConfig`` pickled under omegaconf's class names) with the release's tensor names, at
test size (``groupvit_release_tiny_test``: the release's layout and inference settings, smaller widths).

``tests/data/groupvit_release_official.npz`` holds what the official code computed (NVlabs/GroupViT 13b7861,
``models/`` + ``GroupViTSegInference.encode_decode``, mmcv 1.x preprocessing reproduced with OpenCV 4.10, mmseg
whole-mode rescale and softmax; run in a scratch venv by /tmp/groupvit_official/scratch/make_release_fixture.py)
on the weights :func:`release_state` makes, for the images and vocabularies stored in it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import vocabseg
from vocabseg.data.transforms import cv2_resize_bilinear_uint8
from vocabseg.errors import CheckpointError
from vocabseg.models import create_model, get_config
from vocabseg.models.groupvit import vocabseg_to_official

DATA = Path(__file__).parent / "data"
TINY = "groupvit_release_tiny_test"
KEYS_TSV = DATA / "groupvit_release.keys.tsv"


# ----------------------------------------------------------------------------------------------- release files


def release_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinctive random weights for the release's tensor names (numpy's PCG64, so the fixture generator, which
    feeds these to the official model, and this test get the same numbers on any machine)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(123456, dtype=torch.int64)
            continue
        if key.endswith("running_var"):
            v = 0.5 + rng.random(shape)
        elif key in ("logit_scale", "multi_label_logit_scale"):
            v = np.full(shape, math.log(60.0) if key == "logit_scale" else math.log(1 / 0.07))
        elif key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_1.weight", "ln_2.weight",
                           "ln_final.weight", "_tokens.weight", "norm_x.weight", "norm_new_x.weight",
                           "norm_post.weight", "linear_hidden.1.weight", "group_projector.0.weight")):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) <= 1 or "group_token" in key or "pos_embed" in key or "positional" in key:
            v = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            v = rng.standard_normal(shape) / math.sqrt(fan_in) if "token_embedding" not in key else \
                0.02 * rng.standard_normal(shape)
        out[key] = torch.from_numpy(np.asarray(v, dtype=np.float32)).reshape(shape)
    return out


def _fake_omegaconf(monkeypatch) -> dict[str, type]:
    """Classes pickling under omegaconf's names, holding state the way OmegaConf 2.1 pickles it (``_content`` of
    nodes, ``_metadata`` objects, a ``defaultdict(list)`` of flags): removed again before the file is read."""
    made = {}
    for mod, name in [("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
                      ("omegaconf.nodes", "AnyNode"), ("omegaconf.base", "ContainerMetadata"),
                      ("omegaconf.base", "Metadata")]:
        for m in ("omegaconf", mod):
            if m not in sys.modules:
                monkeypatch.setitem(sys.modules, m, types.ModuleType(m))
        cls = type(name, (object,), {"__module__": mod, "__getstate__": lambda self: dict(self.__dict__)})
        setattr(sys.modules[mod], name, cls)
        made[name] = cls
    return made


def _omegaconf_tree(classes: dict[str, type], value):
    """A plain value as nested fake DictConfig / ListConfig / AnyNode objects."""
    meta = classes["ContainerMetadata"]()
    meta.__dict__.update(ref_type=object, object_type=dict, optional=True, key=None,
                         flags=collections.defaultdict(list), resolver_cache=collections.defaultdict(dict))
    if isinstance(value, dict):
        node = classes["DictConfig"]()
        node.__dict__.update(_metadata=meta, _parent=None,
                             _content={k: _omegaconf_tree(classes, v) for k, v in value.items()})
    elif isinstance(value, list):
        node = classes["ListConfig"]()
        node.__dict__.update(_metadata=meta, _parent=None, _content=[_omegaconf_tree(classes, v) for v in value])
    else:
        node = classes["AnyNode"]()
        node.__dict__.update(_val=value, _metadata=classes["Metadata"](), _parent=None)
    return node


RELEASE_CONFIG = {"model": {"type": "MultiLabelContrastive",
                            "img_encoder": {"type": "GroupViT", "embed_dim": 384, "depths": [6, 3, 3],
                                            "num_group_tokens": [64, 8, 0], "num_output_groups": [64, 8]},
                            "text_encoder": {"type": "TextTransformer", "width": 256, "layers": 12},
                            "multi_label": "${data.text_aug.multi_label}"},
                  "evaluate": {"seg": {"template": "simple", "cfg": "segmentation/configs/_base_/datasets/"
                                                                    "pascal_voc12.py"}}}


def write_release(path: Path, state: dict[str, torch.Tensor], monkeypatch, extra: dict | None = None) -> Path:
    """``state`` (release names) in the release container, its config pickled under omegaconf's class names."""
    with monkeypatch.context() as m:
        classes = _fake_omegaconf(m)
        obj = {"model": state,
               "lr_scheduler": {"t_initial": 30, "lr_min": 4e-5, "noise_range_t": None, "base_values": [1.6e-3]},
               "metrics": {"max_accuracy": 42.1, "max_miou": 51.2}, "epoch": 29,
               "config": _omegaconf_tree(classes, RELEASE_CONFIG), "max_accuracy": 42.1, "max_miou": 51.2,
               "amp": collections.OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 17})}
        obj.update(extra or {})
        torch.save(obj, path)
    assert "omegaconf" not in sys.modules  # the reader below runs without the package
    return path


def _tiny_release_shapes(redcaps: bool = False) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        names = vocabseg_to_official(create_model(TINY).state_dict())
    shapes = {k: tuple(v.shape) for k, v in names.items()}
    if redcaps:
        del shapes["multi_label_logit_scale"]
    return shapes


@pytest.fixture(scope="module")
def official():
    data = np.load(DATA / "groupvit_release_official.npz")
    return data, json.loads(str(data["meta"]))


# ----------------------------------------------------------------------------------------------- layout


def _reference_keys() -> dict[str, list[int]]:
    out = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return out


def test_key_map_covers_release_layout_exactly():
    """The YFCC release's 407 tensors (55.74 M values; the official model built from its config) are exactly our
    model's, renamed; the RedCaps release lacks only ``multi_label_logit_scale``."""
    reference = _reference_keys()
    assert len(reference) == 407 and sum(math.prod(s) for s in reference.values()) == 55_742_996
    with torch.device("meta"):
        model = create_model("groupvit_vit_s")
    ours = vocabseg_to_official(model.state_dict())
    assert set(ours) == set(reference)
    assert all(list(v.shape) == reference[k] for k, v in ours.items())


def test_registered_config_holds_the_release_inference():
    cfg = get_config("groupvit_vit_s")
    assert (cfg.short_side, cfg.max_side, cfg.resize_backend, cfg.size_divisibility, cfg.mask_stride) == \
        (448, 2048, "mmcv", 1, 1)
    assert (cfg.templates, cfg.background_threshold, cfg.topk_classes) == ("simple", 0.95, 5)
    assert cfg.pixel_mean == (0.485, 0.456, 0.406) and cfg.pixel_std == (0.229, 0.224, 0.225)
    # our own world-trained GroupViT keeps its own policy (configs/groupvit_tiny_world.yaml pins it)
    import yaml

    world = yaml.safe_load((Path(__file__).parents[1] / "configs" / "groupvit_tiny_world.yaml").read_text())
    assert world["model"] == "groupvit_vit_s" and world["model_overrides"]["resize_backend"] == "pil"
    assert get_config("groupvit_tiny_test").resize_backend == "pil"


@pytest.mark.parametrize("size, expected", [((375, 500), (448, 597)), ((448, 600), (448, 600)),
                                            ((300, 2000), (307, 2048)), ((1200, 900), (597, 448)),
                                            ((97, 131), (448, 605))])
def test_release_resize_rule(size, expected):
    """mmcv ``rescale_size((w, h), (2048, 448))``: scale = min(2048 / long, 448 / short), sides int(x * s + 0.5)."""
    with torch.device("meta"):
        model = create_model("groupvit_vit_s")
    assert model.inference_size(*size) == expected


# ----------------------------------------------------------------------------------------------- loading


def test_release_file_loads_unchanged(tmp_path, monkeypatch):
    state = release_state(_tiny_release_shapes())
    path = write_release(tmp_path / "group_vit_gcc_yfcc_30e-tiny.pth", state, monkeypatch)
    model = vocabseg.load_model(TINY, checkpoint=path)
    ours = model.state_dict()
    for key, value in vocabseg_to_official(ours).items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert not model.training


def test_redcaps_release_without_multi_label_scale_loads(tmp_path, monkeypatch):
    shapes = _tiny_release_shapes(redcaps=True)
    state = release_state(shapes, seed=1)
    path = write_release(tmp_path / "group_vit_gcc_redcap_30e-tiny.pth", state, monkeypatch)
    model = vocabseg.load_model(TINY, checkpoint=path)
    assert torch.equal(model.clip.token_embedding.weight, state["text_encoder.token_embedding.weight"])
    assert math.isclose(float(model.multi_label_logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)


def test_bad_files_give_one_line_errors(tmp_path, monkeypatch):
    state = release_state(_tiny_release_shapes())
    good = write_release(tmp_path / "release.pth", state, monkeypatch)

    def error(path, name=TINY) -> str:
        with pytest.raises(CheckpointError) as err:
            vocabseg.load_model(name, checkpoint=path)
        msg = str(err.value)
        assert "\n" not in msg and str(path.name) in msg
        return msg

    # truncated download
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "truncated" in error(cut) or "corrupt" in error(cut)
    # a release of another family (SAN's names)
    other = tmp_path / "san_vit_b_16.pth"
    torch.save({"model": {"side_adapter_network.query_embed": torch.zeros(100, 240),
                          "clip_visual_extractor.conv1.weight": torch.zeros(768, 3, 16, 16)}}, other)
    assert "GroupViT" in error(other) and "side_adapter_network" in error(other)
    # another variant: the tiny file into the full-size model
    assert "missing" in error(good, "groupvit_vit_s")
    # a tensor the release does not have
    extra = write_release(tmp_path / "extra.pth", {**state, "img_encoder.unknown.weight": torch.zeros(2)},
                          monkeypatch)
    assert "img_encoder.unknown.weight" in error(extra)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_groupvit_release",))


def test_hostile_metadata_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = release_state(_tiny_release_shapes())
    path = write_release(tmp_path / "evil.pth", state, monkeypatch, extra={"config": _Evil()})
    with pytest.raises(CheckpointError) as err:
        vocabseg.load_model(TINY, checkpoint=path)
    assert "\n" not in str(err.value) and "evil.pth" in str(err.value) and "system" in str(err.value)
    assert not (tmp_path / "pwned_by_groupvit_release").exists()
    eval_path = tmp_path / "eval.pth"
    torch.save({"model": state, "config": collections.defaultdict(eval)}, eval_path)  # a builtin, not a type
    with pytest.raises(CheckpointError, match="eval"):
        vocabseg.load_model(TINY, checkpoint=eval_path)


# ----------------------------------------------------------------------------------------------- inference


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


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        path = write_release(tmp_path_factory.mktemp("gv") / "group_vit_gcc_yfcc_30e-tiny.pth",
                             release_state(_tiny_release_shapes()), mp)
    finally:
        mp.undo()
    return vocabseg.load_model(TINY, checkpoint=path)


def test_predict_equals_official_demo_inference(tiny_release, official):
    """Scores [C, H, W] and labels of ``predict`` against the official code's, every image (sizes that need no
    resize, upscales, downscales, an exact halving) and vocabulary (with "background" first = the official
    ``with_bg``, without it, reordered), vocabularies visited alternately forwards and backwards, then a few
    pairs again in reverse image order (cached text embeddings and model state must not leak between calls)."""
    data, meta = official
    n_img, n_voc = len(meta["images"]), len(meta["vocabs"])
    pairs = [(i, j) for i in range(n_img) for j in (range(n_voc) if i % 2 == 0 else reversed(range(n_voc)))]
    pairs += [(i, (i + 3) % n_voc) for i in reversed(range(n_img))]
    for i, j in pairs:
        image, vocab = data[f"image{i}"], meta["vocabs"][j]
        res = tiny_release.predict(image, vocabulary=vocab)
        ref_scores, ref_labels = data[f"logit_{i}_{j}"], data[f"label_{i}_{j}"]
        assert res.logits.shape == ref_scores.shape == (len(vocab), *image.shape[:2])
        diff = np.abs(res.logits - ref_scores)
        assert diff.max() < 1e-3, (i, j, float(diff.max()))
        assert (res.labels == ref_labels).mean() >= 0.999, (i, j)
        probs = torch.from_numpy(res.logits).softmax(0).numpy()  # mmseg's final softmax, for completeness
        assert np.abs(probs - data[f"prob_{i}_{j}"]).max() < 1e-3
    # the fixture exercises what it claims
    assert any(tuple(meta["net"][str(i)]) == data[f"image{i}"].shape[:2] for i in range(len(meta["images"])))
    assert any(v[0] == "background" for v in meta["vocabs"]) and any("background" not in v for v in meta["vocabs"])
    assert any(len(v) - (v[0] == "background") > 5 for v in meta["vocabs"])  # the top-5 restriction bites


def test_segment_command_loads_the_release_file(tmp_path, monkeypatch, official):
    """``vocabseg segment IMAGE --vocab ... --model NAME --checkpoint RELEASE`` as a user runs it (a subprocess)."""
    import subprocess

    from PIL import Image

    data, meta = official
    path = write_release(tmp_path / "group_vit_gcc_yfcc_30e-tiny.pth", release_state(_tiny_release_shapes()),
                         monkeypatch)
    Image.fromarray(data["image3"]).save(tmp_path / "photo.png")
    vocab = meta["vocabs"][4]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-m", "vocabseg", "segment", str(tmp_path / "photo.png"), "--vocab",
                          ", ".join(vocab), "--model", TINY, "--checkpoint", str(path), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    labels = np.asarray(Image.open(tmp_path / "o" / "photo_labels.png"))
    assert (labels == data["label_3_4"]).mean() >= 0.999
    assert json.loads((tmp_path / "o" / "photo.json").read_text())["vocabulary"] == vocab
