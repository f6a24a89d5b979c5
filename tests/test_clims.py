"""CLIMS: each loss against hand-computed values (a fake linear "CLIP"), the criterion end to end, the CAM network,
the pseudo-mask writer (layout, threshold, background index, mIoU) and save/load."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import vocabseg
from vocabseg.data.datasets import build_dataset
from vocabseg.engine.cams import compute_cams, pseudo_label, write_cams
from vocabseg.errors import ConfigError, DatasetError
from vocabseg.losses.clims import (CLIMS_WEIGHTS, CLIMSLoss, background_word_table, btm_loss, cbs_loss, image_labels_from_maps,
                                   otm_loss, reg_loss)
from vocabseg.models import clims as clims_module  # noqa: F401  (registers the CLIMS models)
from vocabseg.models import create_model

NAME = "clims_tiny_test"
S2 = 1 / math.sqrt(2)


# ----------------------------------------------------------------------------------------------- single losses


def test_otm_btm_on_given_similarities():
    assert otm_loss(torch.tensor([0.5, 0.25])).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert btm_loss(torch.tensor([0.5, 0.75])).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # similarities are clamped to [1e-4, 0.9999] like the release
    assert otm_loss(torch.tensor([-0.3])).item() == pytest.approx(-math.log(1e-4), rel=1e-5)
    assert btm_loss(torch.tensor([1.0])).item() == pytest.approx(-math.log(1e-4), rel=1e-3)


def test_cbs_sums_words_above_the_threshold_that_apply():
    sim = torch.tensor([[0.5, 0.1, 0.75], [0.3, 0.9, 0.2]])
    valid = torch.tensor([[True, True, True], [True, False, True]])
    expected = -(math.log(0.5) + math.log(0.25) + math.log(0.7))  # 0.1, 0.2 below 0.26; 0.9 not this class's
    assert cbs_loss(sim, valid, 0.26).item() == pytest.approx(expected, rel=1e-6)
    everything = -sum(math.log(1 - v) for v in (0.5, 0.1, 0.75, 0.3, 0.9, 0.2))
    assert cbs_loss(sim, None, None).item() == pytest.approx(everything, rel=1e-6)


def test_reg_is_the_mean_activation_over_classes_pixels_images():
    cams = torch.zeros(2, 2, 2, 2)
    cams[0, 0] = 1.0
    cams[1, 1, 0, 0] = 0.8
    assert reg_loss(cams).item() == pytest.approx((4 + 0.8) / 16)


def test_image_labels_and_background_word_table():
    labels = torch.tensor([[[0, 0], [2, 255]], [[255, 255], [1, 1]]])
    assert torch.equal(image_labels_from_maps(labels, 3), torch.tensor([[1.0, 0, 1], [0, 1, 0]]))
    assert torch.equal(image_labels_from_maps(labels, 3, min_pixels=2), torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    words, table = background_word_table(["train", "grass", "boat"], 3, shared=["grass", "tree"],
                                         class_words={"train": ["railroad"]})
    assert words == ["grass", "tree", "railroad"]
    assert table.tolist() == [[True, True, True], [False, True, False], [True, True, False]]


# ----------------------------------------------------------------------------------------------- the criterion


def _fake_clip_encoder(images: torch.Tensor) -> torch.Tensor:
    """A linear "CLIP": the mean of each channel ([N, 3, S, S] -> [N, 3])."""
    return images.mean(dim=(2, 3))


def _criterion(pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.25, 0.25, 0.25), **kw):
    # Network input statistics = CLIP's (x 255), so the CLIP pixels equal the network pixels.
    clip_mean, clip_std = pixel_mean, pixel_std
    return CLIMSLoss(_fake_clip_encoder, 2, [m * 255 for m in pixel_mean], [s * 255 for s in pixel_std],
                     clip_mean, clip_std, **kw)


def test_criterion_by_hand_with_a_linear_clip():
    # 2x2 image: channel 0 lit on the top row, channel 1 on the bottom row; class 0's map = the top row.
    pixels = torch.zeros(1, 3, 2, 2)
    pixels[0, 0, 0] = 1.0
    pixels[0, 1, 1] = 1.0
    cams = torch.zeros(1, 2, 2, 2)
    cams[0, 0, 0] = 1.0
    cams[0, 1] = 0.5
    text = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class 0 text: (e0 + e1)/sqrt2
    # background words: b0 = (0.6, 0.8, 0), b1 = e2, b2 = (e0 + e2)/sqrt2; b2 does not apply to class 0
    bg_text = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    crit = _criterion(background_text=bg_text, background_mask=mask)
    targets = torch.tensor([[1.0, 0.0]])  # image-level labels: class 0 only
    losses = crit({"cams": cams, "pixels": pixels, "text": text}, targets)
    # fg = mean(pixels * map) = (0.5, 0, 0) ~ e0; bg = mean(pixels * (1 - map)) = (0, 0.5, 0) ~ e1
    assert losses["loss_otm"].item() == pytest.approx(-math.log(S2), rel=1e-5)  # cos(e0, t0) = 1/sqrt2
    assert losses["loss_btm"].item() == pytest.approx(-math.log(1 - S2), rel=1e-5)  # cos(e1, t0) = 1/sqrt2
    assert losses["loss_cbs"].item() == pytest.approx(-math.log(1 - 0.6), rel=1e-5)  # only b0 (0.6 > 0.26)
    assert losses["loss_reg"].item() == pytest.approx((2 * 1.0 + 4 * 0.5) / 8)
    total = 10 * -math.log(S2) + 24 * -math.log(1 - S2) + 1 * -math.log(0.4) + 0.2 * 0.5
    assert crit.weighted_total(losses).item() == pytest.approx(total, rel=1e-5)
    # label maps give the same image-level labels
    maps = {"labels": torch.tensor([[[0, 0], [255, 255]]]), "ignore_index": 255}
    again = crit({"cams": cams, "pixels": pixels, "text": text}, maps)
    assert all(again[k].item() == pytest.approx(losses[k].item()) for k in losses)


def test_optional_classification_term_by_hand():
    # averaged logits (2, -1) for classes (present, absent): soft margin = mean(log(1 + e^-2), log(1 + e^-1))
    crit = _criterion(weight_dict={**CLIMS_WEIGHTS, "loss_cls": 3.0})
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = torch.tensor([[4.0, 0.0], [2.0, 2.0]])
    logits[0, 1] = -1.0
    pixels = torch.zeros(1, 3, 2, 2)
    out = {"logits": logits, "cams": logits.sigmoid(), "pixels": pixels, "text": torch.eye(3)[:2]}
    losses = crit(out, torch.tensor([[1.0, 0.0]]))
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
    without = _criterion()(out, torch.tensor([[1.0, 0.0]]))
    assert "loss_cls" not in without
    assert crit.weighted_total(losses).item() == pytest.approx(
        _criterion().weighted_total(without).item() + 3.0 * expected, rel=1e-5)
    # it also applies to a batch without any labelled class (all absent)
    assert "loss_cls" in crit(out, torch.zeros(1, 2))


def test_criterion_renormalises_for_clip_and_skips_unlabelled_batches():
    crit = CLIMSLoss(_fake_clip_encoder, 2, [0.485 * 255, 0.456 * 255, 0.406 * 255],
                     [0.229 * 255, 0.224 * 255, 0.225 * 255], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = torch.full((1, 3, 2, 2), 1.0)  # ImageNet-normalised 1.0 = mean + std in 0..1
    rgb = torch.tensor([0.485 + 0.229, 0.456 + 0.224, 0.406 + 0.225])
    expected = ((rgb - 0.5) / 0.25).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(crit.to_clip_pixels(pixels), expected, atol=1e-6)
    cams = torch.full((1, 2, 2, 2), 0.25, requires_grad=True)
    losses = crit({"cams": cams, "pixels": pixels, "text": torch.eye(3)[:2]}, torch.zeros(1, 2))
    assert losses["loss_otm"].item() == 0.0 and losses["loss_reg"].item() == pytest.approx(0.25)
    crit.weighted_total(losses).backward()
    assert cams.grad is not None


def test_gradients_reach_the_cam_network_not_clip():
    torch.manual_seed(0)
    model = create_model(NAME).train()
    names = ["circle", "square", "sky"]
    text = model.text_embeddings(names)
    crit = model.build_criterion(3)
    pixels = model.normalize_pixels(torch.randint(0, 256, (2, 3, 32, 32)).float())
    labels = torch.full((2, 32, 32), 255)
    labels[0, :8] = 0
    labels[1, 10:20, 10:20] = 2
    losses = crit(model(pixels, text), model.training_targets(labels))
    assert set(losses) == {"loss_otm", "loss_btm", "loss_cbs", "loss_reg"}
    crit.weighted_total(losses).backward()
    assert all(p.grad is None for p in model.clip.parameters())
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- the network


def test_cam_network_shapes_and_free_classifier():
    model = create_model(NAME).eval()
    text = F.normalize(torch.randn(4, 32), dim=-1)
    out = model(torch.randn(2, 3, 64, 48), text)
    assert out["logits"].shape == (2, 4, 4, 3)  # output stride 16
    assert torch.allclose(out["cams"], torch.sigmoid(out["logits"]))
    assert (model.cam_maps(torch.randn(1, 3, 32, 32), text) >= 0).all()
    free = create_model(NAME, classifier="free", num_classes=3)
    assert free(torch.randn(1, 3, 32, 32), text[:3])["logits"].shape == (1, 3, 2, 2)
    with pytest.raises(ConfigError, match="3 fixed classes"):
        free(torch.randn(1, 3, 32, 32), text)
    with pytest.raises(ConfigError):
        create_model(NAME, classifier="free")
    arch = create_model(NAME, clip_arch={"embed_dim": 16, "image_resolution": 32, "vision_layers": 1,
                                         "vision_width": 64, "vision_patch_size": 16, "transformer_width": 32,
                                         "transformer_heads": 2, "transformer_layers": 1})
    assert arch.classifier.weight.shape[0] == 16 and arch.config.clip.embed_dim == 16


def test_save_load_round_trip_and_torchvision_backbone(tmp_path):
    torch.manual_seed(0)
    model = create_model(NAME).eval()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "clims.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = vocabseg.load_model(NAME, checkpoint=path)
    x = torch.randn(1, 3, 32, 32)
    text = model.text_embeddings(["a", "b"])
    assert torch.equal(model(x, text)["logits"], loaded(x, text)["logits"])
    # a torchvision-layout ResNet state dict (with its fc layer) initialises the backbone
    tv = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(tv, tmp_path / "resnet.pth")
    fresh = create_model(NAME)
    fresh.load_backbone(tmp_path / "resnet.pth")
    assert all(torch.equal(fresh.backbone.state_dict()[k], v) for k, v in model.backbone.state_dict().items())


# ----------------------------------------------------------------------------------------------- pseudo-masks


def test_pseudo_label_threshold_and_background_value():
    cams = np.array([[[0.9, 0.1], [0.2, 0.0]], [[0.5, 0.05], [0.3, 0.0]]], np.float32)
    assert pseudo_label(cams, [3, 5], 0.15, 0).tolist() == [[3, 0], [5, 0]]
    assert pseudo_label(cams, [3, 5], 0.25, 255).tolist() == [[3, 255], [5, 255]]
    assert pseudo_label(np.zeros((0, 2, 2), np.float32), [], 0.15, 0).tolist() == [[0, 0], [0, 0]]


class _FakeCAMModel(torch.nn.Module):
    """CAMs read straight off the image: class k's map is the image channel its text row points at."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"size_divisibility": 4, "cam_threshold": 0.15})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.channels = {"a": 0, "b": 1}

    @property
    def device(self):
        return self.anchor.device

    def text_embeddings(self, names):
        return F.one_hot(torch.tensor([self.channels[n] for n in names]), 3).float()

    def inference_size(self, h, w):
        return h, w

    def normalize_pixels(self, x):
        return x / 255.0

    def cam_maps(self, pixels, text):
        return torch.einsum("bchw,kc->bkhw", pixels, text)


class _FakeDataset:
    class_names = ["background", "a", "b"]

    def __init__(self):
        img = np.zeros((8, 12, 3), np.uint8)
        img[:4, :6, 0] = 255  # "a" top left, strong
        img[4:, 6:, 1] = 255  # "b" bottom right, strong
        img[4:, :6, 0] = 20  # weak "a" evidence (20/255 < 0.15): background
        lab = np.zeros((8, 12), np.int64)
        lab[:4, :6] = 1
        lab[4:, 6:] = 2
        lab[0, 0] = 255  # ignored pixel
        img2 = np.zeros((8, 12, 3), np.uint8)
        img2[:, :, 1] = 255  # b everywhere in the image, but the image is labelled "a" only
        self.items = [{"image": img, "label": lab, "name": "one"},
                      {"image": img2, "image_labels": [1], "name": "two"}]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_write_cams_layout_threshold_and_background(tmp_path):
    summary = write_cams(_FakeCAMModel(), _FakeDataset(), tmp_path / "out", flip=True)
    out = tmp_path / "out"
    assert (out / "classes.txt").read_text() == "background\na\nb\n"
    one = np.asarray(Image.open(out / "labels" / "one.png"))
    expected = np.zeros((8, 12), np.uint8)
    expected[:4, :6] = 1
    expected[4:, 6:] = 2
    assert one.dtype == np.uint8 and np.array_equal(one, expected)
    assert np.array_equal(np.asarray(Image.open(out / "images" / "one.png")), _FakeDataset().items[0]["image"])
    cams = np.load(out / "cams" / "one.npy")
    assert cams.dtype == np.float16 and cams.shape == (2, 8, 12) and float(cams.max()) == pytest.approx(1, abs=1e-3)
    # image-level labels restrict the classes: image two only knows "a", whose map is empty -> all background
    assert np.array_equal(np.asarray(Image.open(out / "labels" / "two.png")), np.zeros((8, 12), np.uint8))
    records = [json.loads(line) for line in (out / "cams.jsonl").read_text().splitlines()]
    assert records == [{"image": "one", "classes": ["a", "b"]}, {"image": "two", "classes": ["a"]}]
    assert summary["mIoU"] == pytest.approx(100.0) and summary["evaluated_images"] == 1
    assert json.loads((out / "cams_metrics.json").read_text())["threshold"] == 0.15
    # the folder is a custom data set the trainer can read
    ds = build_dataset("custom", out, "all")
    assert ds.class_names == ["background", "a", "b"] and ds[0]["label"].shape == (8, 12)

    # no background class: below-threshold pixels are ignored (255) and classes.txt lists the CAM classes only
    write_cams(_FakeCAMModel(), _FakeDataset(), tmp_path / "ignore", class_names=["a", "b"], background=None,
               flip=False)
    assert (tmp_path / "ignore" / "classes.txt").read_text() == "a\nb\n"
    one = np.asarray(Image.open(tmp_path / "ignore" / "labels" / "one.png"))
    assert one[0, 0] == 0 and one[7, 11] == 1 and one[7, 0] == 255
    # a higher threshold turns weak maps into background
    summary = write_cams(_FakeCAMModel(), _FakeDataset(), tmp_path / "high", threshold=1.01, save_cams=False)
    assert not np.asarray(Image.open(tmp_path / "high" / "labels" / "one.png")).any()
    assert not (tmp_path / "high" / "cams").exists()


def test_compute_cams_of_the_real_network_are_normalised():
    model = create_model(NAME).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    cams = compute_cams(model, rgb, model.text_embeddings(["a", "b"]), scales=(1.0, 0.5), flip=True)
    assert cams.shape == (2, 30, 44) and cams.min() >= 0 and cams.max() <= 1.0


def test_world_objects_dataset_labels_colour_classes_and_background():
    from vocabseg.data.world import generate_sample, sample_seed
    from vocabseg.engine.cams import IGNORE, WorldObjectsDataset

    objects = ["red shape", "blue shape", "circle"]
    ds = WorldObjectsDataset(6, seed=5, objects=objects)
    assert ds.class_names == ["background", *objects]
    checked = 0
    for i in range(len(ds)):
        item = ds[i]
        s = generate_sample(sample_seed(5, i), ds.config)
        label = item["label"]
        assert (label[s.instance_map == 0] == 0).all()  # every stuff pixel is background
        for o in s.objects:
            pix = label[s.instance_map == o.instance_id]
            if not pix.size:
                continue
            # the most specific name wins; colour names and the category name are equally specific -> first listed
            want = (1 if o.color == "red" else 2 if o.color == "blue" else 3 if o.category == "circle" else IGNORE)
            assert (pix == want).all(), (o.color, o.category, set(pix.tolist()))
            checked += 1
    assert checked > 5


def test_reference_labels_match_the_pseudo_mask_layout(tmp_path):
    """--true-labels writes the data set's own maps with the class list write_cams gives the same data set, so a
    model trained on pseudo-masks can be scored on (or compared with) the true labels."""
    from vocabseg.engine.cams import WorldObjectsDataset, write_reference_labels

    ds = WorldObjectsDataset(3, seed=5, objects=["red shape", "blue shape"])
    summary = write_reference_labels(ds, tmp_path / "ref")
    assert summary["images"] == 3 and summary["classes"] == ["background", "red shape", "blue shape"]
    ref = build_dataset("custom", tmp_path / "ref", "all")
    assert ref.class_names == ds.class_names
    for i in range(3):
        assert np.array_equal(np.asarray(ref[i]["label"]), ds[i]["label"])
    fake, labelled = _FakeDataset(), _FakeDataset()
    labelled.items = labelled.items[:1]
    write_cams(_FakeCAMModel(), fake, tmp_path / "pseudo", flip=False)
    write_reference_labels(labelled, tmp_path / "fake_ref")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "fake_ref" / "labels" / "one.png")), fake.items[0]["label"])
    assert (tmp_path / "pseudo" / "classes.txt").read_text() == (tmp_path / "fake_ref" / "classes.txt").read_text()
    with pytest.raises(DatasetError, match="no label map"):
        write_reference_labels(fake, tmp_path / "bad")  # item "two" has image-level labels only



def test_threshold_sweep_relabels_saved_cams_against_a_reference(tmp_path):
    import json as _json

    from PIL import Image as _Image

    from vocabseg.engine.cams import sweep_cam_thresholds

    cams, ref = tmp_path / "cams_out", tmp_path / "ref"
    for folder in (cams / "cams", ref / "labels"):
        folder.mkdir(parents=True)
    for folder in (cams, ref):
        (folder / "classes.txt").write_text("background\ncat\ndog\n")
    (cams / "cams.jsonl").write_text(_json.dumps({"image": "a", "classes": ["cat"]}) + "\n")
    np.save(cams / "cams" / "a.npy", np.array([[[0.1, 0.5], [0.9, 0.3]]], np.float16))
    _Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(ref / "labels" / "a.png")
    out = sweep_cam_thresholds(cams, ref, [0.2, 0.4, 0.95])
    # 0.4: the map is above it exactly on the two cat pixels -> perfect
    assert out[0.4]["mIoU"] == pytest.approx(100.0)
    # 0.2: one background pixel becomes cat -> background IoU 1/2, cat IoU 2/3
    assert out[0.2]["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    # 0.95: everything background -> background 2/4, cat 0
    assert out[0.95]["mIoU"] == pytest.approx(100 * (1 / 2 + 0) / 2)
    (ref / "classes.txt").write_text("background\ndog\ncat\n")
    with pytest.raises(DatasetError, match="different classes"):
        sweep_cam_thresholds(cams, ref, [0.2])
