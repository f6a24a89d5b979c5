"""Training engine: config loading, LR schedule, data order, checkpoints, resume equivalence, evaluation.

Everything runs the tiny random SAN (``san_tiny_test``) on a handful of generated 64-px images, so a training run
takes a second or two on CPU.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vocabseg
from vocabseg.engine import TrainConfig, evaluate, load_config, save_config, train, write_metrics_json
from vocabseg.engine import checkpoint as ckpt
from vocabseg.engine import loop as loop_mod
from vocabseg.engine import trainer as trainer_mod
from vocabseg.engine.config import config_to_dict
from vocabseg.engine.distributed import ResumableBatchSampler, epoch_permutation, sample_rng
from vocabseg.engine.trainer import WarmupPolyLR, lr_factor
from vocabseg.errors import CheckpointError, ConfigError
from vocabseg.metrics import ConfusionMatrix
from vocabseg.predict import Predictor

MODEL = "san_tiny_test"


# ---------------------------------------------------------------------------------------------------- fixtures


class ShapesDataset:
    """Sky over grass with a red square at a random place: consistent labels a tiny SAN can learn quickly."""

    class_names = ["sky", "grass", "red square"]
    ignore_index = 255

    def __init__(self, n: int = 4, size: int = 64, seed: int = 0, ignore_border: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            img = np.zeros((size, size, 3), np.uint8)
            lab = np.zeros((size, size), np.int64)
            img[: size // 2], lab[: size // 2] = (90, 150, 240), 0
            img[size // 2:], lab[size // 2:] = (40, 180, 60), 1
            y, x = rng.integers(4, size - 24, 2)
            img[y:y + 16, x:x + 16], lab[y:y + 16, x:x + 16] = (220, 30, 30), 2
            img = np.clip(img.astype(int) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
            if ignore_border:
                lab[:, :3] = self.ignore_index
            self.items.append((img, lab))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        img, lab = self.items[i]
        return {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "label": torch.from_numpy(lab),
                "index": i, "name": f"img{i}"}


def flip_and_shift(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """A random augmentation: whatever it draws must come from ``rng`` for runs to be reproducible."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    shift = int(rng.integers(-4, 5))
    return np.ascontiguousarray(np.roll(image, shift, axis=1)), np.ascontiguousarray(np.roll(label, shift, axis=1))


@pytest.fixture(autouse=True)
def _text_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VOCABSEG_CACHE", str(tmp_path_factory.getbasetemp() / "text-cache"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model is as fast on one thread, and two busy-waiting OpenMP threads crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(out: Path, **kw) -> TrainConfig:
    base = dict(model=MODEL, output_dir=str(out), max_iters=8, batch_size=2, lr=1e-3, crop_size=64, log_every=1,
                checkpoint_every=3, keep_checkpoints=0, eval_every=0, num_workers=0, device="cpu", progress=False,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run(cfg: TrainConfig, dataset=None, val=None, transform=flip_and_shift) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised CLIP" is expected here
        return train(cfg, train_dataset=dataset if dataset is not None else ShapesDataset(5), val_dataset=val,
                     transform=transform)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------- config


def test_load_config_coerces_types_and_applies_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-4 as a string; the config must still see a float.
    path.write_text("model: san_tiny_test\nlr: 1e-4\nbatch_size: 4\nmodel_overrides:\n  clip_scale: 0.5\n")
    cfg = load_config(path, ["lr=2e-4", "model_overrides.rec_start=2", "resume=auto", "clip_grad=null",
                             "augment.scale=[0.5, 2.0]", "max_iters=1_000"])
    assert cfg.lr == pytest.approx(2e-4) and isinstance(cfg.lr, float)
    assert cfg.model_overrides == {"clip_scale": 0.5, "rec_start": 2}
    assert cfg.resume == "auto" and cfg.clip_grad is None and not cfg.clip_grad_enabled
    assert cfg.augment == {"scale": [0.5, 2.0]}
    assert cfg.max_iters == 1000 and cfg.batch_size == 4
    assert load_config(None, ["lr=1e-4"]).lr == pytest.approx(1e-4)


def test_unknown_or_invalid_keys_raise_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate") as e:
        load_config(path)
    assert "valid keys" in str(e.value) and " lr," in str(e.value) and str(path) in str(e.value)
    with pytest.raises(ConfigError, match="bogus"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(None, ["lr.x=1"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["batch_size=many"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(None, ["amp=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lr"])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_saved_config_reads_back_identically(tmp_path):
    cfg = load_config(None, ["model=san_tiny_test", "model_overrides.clip_scale=0.25", "resume=auto", "lr=3e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert config_to_dict(load_config(tmp_path / "config.yaml")) == config_to_dict(cfg)


# ---------------------------------------------------------------------------------------------------- schedule


def test_poly_schedule_with_linear_warmup():
    assert lr_factor(0, 100) == 1.0  # no warm-up: the SAN recipe starts at the base LR
    assert lr_factor(50, 100, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(100, 100) == 0.0
    # warm-up from 0.1 to 1 over 10 steps, multiplied by the poly factor
    assert lr_factor(0, 100, warmup_iters=10, warmup_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(5, 100, 10, 0.1) == pytest.approx((0.1 * 0.5 + 0.5) * 0.95 ** 0.9)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(0.9 ** 0.9)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = WarmupPolyLR(opt, max_iters=100, warmup_iters=10, warmup_factor=0.1, power=0.9)
    assert sched.apply(5) == pytest.approx(2e-4 * (0.1 * 0.5 + 0.5) * 0.95 ** 0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4 * (0.1 * 0.5 + 0.5) * 0.95 ** 0.9)


# ---------------------------------------------------------------------------------------------------- data order


def test_sampler_epochs_shards_and_resume_positions():
    n = 7
    single = ResumableBatchSampler(n, batch_size=4, seed=5)
    stream = [k for step in range(7) for k in single.batch_at(step)]  # 28 samples = 4 epochs
    for epoch in range(4):
        assert sorted(i for e, i in stream if e == epoch) == list(range(n))  # each image once per epoch
        assert [i for e, i in stream if e == epoch] == epoch_permutation(n, 5, epoch).tolist()
    assert epoch_permutation(n, 5, 0).tolist() != epoch_permutation(n, 5, 1).tolist()
    # two ranks with 2 images each see exactly the single-process batches of 4, split in order
    r0 = ResumableBatchSampler(n, 2, seed=5, rank=0, world_size=2)
    r1 = ResumableBatchSampler(n, 2, seed=5, rank=1, world_size=2)
    for step in range(7):
        assert r0.batch_at(step) + r1.batch_at(step) == single.batch_at(step)
    # starting at a position continues the same stream
    resumed = ResumableBatchSampler(n, 4, seed=5, start=12)
    it = iter(resumed)
    assert [k for _ in range(4) for k in next(it)] == stream[12:28]
    # augmentation RNG depends on (seed, epoch, index) only
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random() != sample_rng(1, 3, 3).random()


# ---------------------------------------------------------------------------------------------------- checkpoints


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "checkpoint_0000001.pt"

    def failing(f):
        f.write(b"x" * 1000)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, failing)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    ckpt.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_resume_candidates_skip_tmp_and_unreadable_files(tmp_path):
    for it in (1, 2):
        ckpt.save_checkpoint({"samples_seen": it}, tmp_path, it, keep=0)
    (tmp_path / "checkpoint_0000003.pt.tmp").write_bytes(b"half a checkpoint")  # a writer killed mid-write
    path, state = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_0000002.pt" and state["samples_seen"] == 2
    # the newest readable numbered file wins (no pointer file); a corrupt one is skipped with a warning
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == \
        ["checkpoint_0000001.pt", "checkpoint_0000002.pt"]
    (tmp_path / "checkpoint_0000004.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable checkpoint"):
        path, _ = ckpt.find_resume_checkpoint(tmp_path)
    assert path.name == "checkpoint_0000002.pt"
    with pytest.raises(CheckpointError):
        ckpt.load_checkpoint(tmp_path / "checkpoint_0000004.pt")
    assert ckpt.find_resume_checkpoint(tmp_path / "nothing-here") is None
    # keep=2 prunes older numbered files
    for it in (5, 6):
        ckpt.save_checkpoint({"samples_seen": it}, tmp_path, it, keep=2)
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6]


def test_rng_state_round_trips():
    state = ckpt.capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 40-step run from a saved random init, reused by several tests."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(123)
    init = vocabseg.create_model(MODEL)
    init_path = root / "init.safetensors"
    save_file({k: v.contiguous() for k, v in init.state_dict().items()}, str(init_path))
    out = root / "run"
    cfg = tiny_config(out, max_iters=40, checkpoint_every=20, init_checkpoint=str(init_path), warmup_iters=5,
                      warmup_factor=0.2, val_max_images=2, eval_every=20)
    mp = pytest.MonkeyPatch()
    mp.setenv("VOCABSEG_CACHE", str(root / "text-cache"))
    try:
        result = run(cfg, dataset=ShapesDataset(4), val=ShapesDataset(3, seed=9))
    finally:
        mp.undo()
    return {"cfg": cfg, "out": out, "result": result, "init": init}


def test_loss_goes_down_and_lr_follows_schedule(trained):
    log = [r for r in read_log(trained["out"]) if r["type"] == "train"]
    assert [r["iter"] for r in log] == list(range(1, 41))
    losses = [r["total_loss"] for r in log]
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    for r in log:  # the line of iteration i reports the LR used by step i - 1
        assert r["lr"] == pytest.approx(1e-3 * lr_factor(r["iter"] - 1, 40, 5, 0.2, 0.9))
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "grad_norm"} <= set(log[0])
    assert not {"time", "data_time"} & set(log[0])  # wall-clock figures would make the log irreproducible


def test_only_trainable_parameters_change(trained):
    init = trained["init"]
    final = load_file(str(trained["out"] / "model_final.safetensors"))
    trainable = {n for n, p in init.named_parameters() if p.requires_grad}
    assert set(final) == set(init.state_dict())
    start = init.state_dict()
    for name, value in final.items():
        if name in trainable:
            assert not torch.equal(value, start[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(value, start[name]), f"frozen {name} changed"


def test_outputs_checkpoint_contents_and_final_model(trained):
    out, result = trained["out"], trained["result"]
    assert result["iteration"] == 40
    names = sorted(p.name for p in out.iterdir())
    for expected in ("config.yaml", "metrics.jsonl", "checkpoint_0000020.pt",
                     "checkpoint_0000040.pt", "model_final.safetensors", "model_final.json", "eval_0000040.json"):
        assert expected in names
    assert not any(n.endswith(".tmp") for n in names)
    state = torch.load(out / "checkpoint_0000040.pt", map_location="cpu", weights_only=True)
    model = vocabseg.create_model(MODEL)
    assert set(state["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert state["iteration"] == 40 and state["samples_seen"] == 40 * 2
    assert state["config"]["model"] == MODEL and len(state["rng"]) == 1
    assert {"optimizer", "scheduler", "class_names", "frozen_fingerprint"} <= set(state)
    # frozen parameters get no optimizer state
    n_state = len(state["optimizer"]["state"])
    assert n_state == len(state["model"])
    meta = json.loads((out / "model_final.json").read_text())
    assert meta["model"] == MODEL and meta["class_names"] == ShapesDataset.class_names and meta["iteration"] == 40
    loaded = vocabseg.load_model(MODEL, checkpoint=out / "model_final.safetensors")
    final = load_file(str(out / "model_final.safetensors"))
    assert all(torch.equal(v, final[k]) for k, v in loaded.state_dict().items())
    for k, v in state["model"].items():  # the last checkpoint holds the final trainable weights
        assert torch.equal(v, final[k])
    assert config_to_dict(load_config(out / "config.yaml")) == config_to_dict(trained["cfg"])
    evals = [r for r in read_log(out) if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [20, 40] and evals[-1]["num_images"] == 2
    assert result["metrics"]["mIoU"] == pytest.approx(evals[-1]["mIoU"])


def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    full_out = tmp_path / "full"
    run(tiny_config(full_out))
    full = load_file(str(full_out / "model_final.safetensors"))

    # Interrupted run: dies at iteration 5 (after the checkpoint at 3), like a kill between checkpoints.
    part_out = tmp_path / "part"
    real_append = loop_mod._append_jsonl

    def dying_append(path, record):
        if record.get("iter") == 5:
            raise KeyboardInterrupt("simulated kill")
        real_append(path, record)

    monkeypatch.setattr(loop_mod, "_append_jsonl", dying_append)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(part_out))
    monkeypatch.setattr(loop_mod, "_append_jsonl", real_append)
    assert [i for i, _ in ckpt.list_checkpoints(part_out)] == [3]
    assert not (part_out / "model_final.safetensors").exists()
    # a kill -9 during the next checkpoint write leaves a partial tmp file behind
    (part_out / "checkpoint_0000006.pt.tmp").write_bytes(b"\x80\x02partial")
    with pytest.raises(ConfigError, match="resume"):
        run(tiny_config(part_out, resume=False))  # resume=false must not silently overwrite the run
    # resume, now with DataLoader worker processes: sample augmentations must not depend on the worker
    result = run(tiny_config(part_out, resume=True, num_workers=2))
    assert result["iteration"] == 8
    resumed = load_file(str(part_out / "model_final.safetensors"))
    assert set(resumed) == set(full)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    assert not (part_out / "checkpoint_0000006.pt.tmp").exists()
    # the log is the same too, byte for byte: lines the killed run wrote after its checkpoint were replaced
    assert (part_out / "metrics.jsonl").read_bytes() == (full_out / "metrics.jsonl").read_bytes()


def test_resume_auto_and_true_semantics(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run(tiny_config(out, resume=True))
    r = run(tiny_config(out, resume="auto", max_iters=2, checkpoint_every=0, log_every=5))
    assert r["iteration"] == 2 and [i for i, _ in ckpt.list_checkpoints(out)] == [2]
    assert [x["iter"] for x in read_log(out)] == [2]  # always logged at the last iteration
    # resuming a finished run only rewrites the final files
    r = run(tiny_config(out, resume="auto", max_iters=2, checkpoint_every=0))
    assert r["iteration"] == 2 and (out / "model_final.safetensors").is_file()
    # another config's folder is refused by the key that differs, before any step
    with pytest.raises(ConfigError, match="seed is 3 there and 4 here"):
        run(tiny_config(out, resume=True, max_iters=4, seed=4))


def test_user_errors_before_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        run(tiny_config(tmp_path / "a", model="no_such_model"))
    with pytest.raises(ConfigError, match="fp16"):
        run(tiny_config(tmp_path / "b", amp="fp16"))
    with pytest.raises(ConfigError, match="data_root"):
        train(tiny_config(tmp_path / "c"))


def test_bf16_autocast_and_grad_accumulation_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    r = run(tiny_config(out, amp="bf16", max_iters=2, grad_accum=2, batch_size=1, checkpoint_every=0))
    assert r["iteration"] == 2 and math.isfinite(r["losses"]["total_loss"])
    state = ckpt.load_checkpoint(out / "checkpoint_0000002.pt")
    assert state["samples_seen"] == 2 * 2 * 1  # iterations x accumulation x batch


def test_optimizer_holds_only_trainable_parameters_with_san_decay_groups():
    model = vocabseg.create_model(MODEL)
    opt = trainer_mod.build_optimizer(model, TrainConfig(model=MODEL, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["group_name"]: (g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in opt.param_groups}
    in_opt = set().union(*(ps for _, ps in groups.values()))
    assert in_opt == {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups["embed"] == (0.0, {"clip.visual.positional_embedding", "side.pos_embed", "side.query_embed",
                                     "side.query_pos_embed"})
    assert groups["norm"][0] == 0.0 and all(".norm" in n for n in groups["norm"][1])
    assert groups["default"][0] == 0.05 and "bg_embed" in groups["default"][1]


def test_generated_world_dataset_with_the_default_transform(tmp_path):
    """The path a config file takes: generate data, build_dataset, SAN's augmentations, evaluation."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "san_tiny_world.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data_root={tmp_path / 'world' / 'train'}",
        f"val_root={tmp_path / 'world' / 'val'}", "world.num_samples=6", "world.val_samples=2", "max_iters=3",
        "batch_size=2", "num_workers=0", "checkpoint_every=0", "eval_every=0", "progress=false", "device=cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    assert result["iteration"] == 3 and math.isfinite(result["losses"]["total_loss"])
    assert result["metrics"]["num_images"] == 2 and math.isfinite(result["metrics"]["pACC"])
    assert len(list((tmp_path / "world" / "train" / "images").iterdir())) == 6
    meta = json.loads((tmp_path / "run" / "model_final.json").read_text())
    assert meta["class_names"][:2] == ["sky", "grass"]


# ---------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_matches_a_hand_computed_confusion(tmp_path):
    torch.manual_seed(0)
    model = vocabseg.create_model(MODEL).train()
    data = ShapesDataset(5, seed=4, ignore_border=True)
    metrics = evaluate(model, data, max_images=3, progress=False)
    assert model.training  # restored after evaluation
    names = data.class_names
    predictor = Predictor(model)
    text = model.text_embeddings(names)
    k = len(names)
    inter, union, gt_count = np.zeros(k), np.zeros(k), np.zeros(k)
    correct = total = 0
    for i in range(3):
        pred = predictor.predict_array(data.items[i][0], names, text).labels
        gt = data.items[i][1]
        valid = gt != 255
        for c in range(k):
            inter[c] += np.sum((pred == c) & (gt == c) & valid)
            union[c] += np.sum(((pred == c) | (gt == c)) & valid)
            gt_count[c] += np.sum((gt == c) & valid)
        correct += np.sum((pred == gt) & valid)
        total += valid.sum()
    iou = 100 * inter / union
    cm = ConfusionMatrix(k, data.ignore_index)
    for i in range(3):
        cm.update(predictor.predict_array(data.items[i][0], names, text).labels, data.items[i][1])
    reference = cm.compute()
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert metrics[key] == pytest.approx(reference[key])
    assert metrics["num_images"] == 3
    assert list(metrics["IoU"]) == names
    assert [metrics["IoU"][n] for n in names] == pytest.approx(iou.tolist())
    assert metrics["mIoU"] == pytest.approx(iou.mean())
    assert metrics["pACC"] == pytest.approx(100 * correct / total)
    assert metrics["mACC"] == pytest.approx(np.mean(100 * inter / gt_count))
    assert metrics["fwIoU"] == pytest.approx(np.sum(gt_count / gt_count.sum() * iou))
    path = write_metrics_json({**metrics, "IoU": {**metrics["IoU"], "x": float("nan")}}, tmp_path / "m.json")
    assert json.loads(path.read_text())["IoU"]["x"] is None
