"""The shared safe reader of release containers: metadata objects load as inert placeholders, code never runs."""

import collections
import os
import sys
import types

import numpy as np
import pytest
import torch

from vocabseg.checkpoint_io import Inert, find_state_dict, inert_contents, safe_torch_load, strip_prefix
from vocabseg.errors import CheckpointError


@pytest.fixture
def fake_modules(monkeypatch):
    """Classes that pickle under the names of packages we do not have (omegaconf, pytorch_lightning)."""
    made = {}
    for mod_name, cls_name, base in [("omegaconf.dictconfig", "DictConfig", object),
                                     ("pytorch_lightning.callbacks", "ModelCheckpoint", object),
                                     ("pytorch_lightning.callbacks", "Metrics", dict)]:
        parent = mod_name.split(".")[0]
        for m in (parent, mod_name):
            if m not in sys.modules:
                monkeypatch.setitem(sys.modules, m, types.ModuleType(m))
        cls = type(cls_name, (base,), {"__module__": mod_name})
        if base is object:
            cls.__getstate__ = lambda self: {"_content": self.__dict__.get("content")}
        setattr(sys.modules[mod_name], cls_name, cls)
        made[cls_name] = cls
    return made


def _write(path, obj, legacy=False):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_metadata_objects_load_as_inert_placeholders(tmp_path, fake_modules, monkeypatch, legacy):
    cfg = fake_modules["DictConfig"]()
    cfg.content = {"model": {"type": "MultiLabelContrastive"}}
    metrics = fake_modules["Metrics"](best=0.5)
    weights = {"img_encoder.w": torch.randn(3, 2), "text_encoder.b": torch.randn(4).half()}
    obj = {"model": weights, "config": cfg, "callbacks": {fake_modules["ModelCheckpoint"]: {"k": 1}},
           "scheduler": {"milestones": collections.Counter({3: 1})}, "metrics": metrics,
           "best": np.float64(0.25), "arr": np.arange(3)}
    path = _write(tmp_path / "release.pth", obj, legacy)
    for m in ("omegaconf", "omegaconf.dictconfig", "pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.delitem(sys.modules, m)  # the real packages are absent when a user loads the file
    loaded = safe_torch_load(path, "a GroupViT release")
    assert set(loaded) == set(obj)
    for k, v in weights.items():
        assert loaded["model"][k].dtype == v.dtype and torch.equal(loaded["model"][k], v)
    assert isinstance(loaded["config"], Inert)
    assert inert_contents(loaded["config"]) == {"model": {"type": "MultiLabelContrastive"}}
    assert inert_contents(loaded["metrics"]) == {"best": 0.5}
    (key,) = loaded["callbacks"]
    assert issubclass(key, Inert) and key.__qualname__ == "ModelCheckpoint"
    assert find_state_dict(loaded, path, ["state_dict", "model"], "a GroupViT release").keys() == weights.keys()
    assert list(strip_prefix(weights, "img_encoder.")) == ["w", "text_encoder.b"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_checkpoint",))


@pytest.mark.parametrize("legacy", [False, True])
def test_hostile_pickles_are_refused_without_running(tmp_path, monkeypatch, legacy):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "evil.pth", {"state_dict": {"a": torch.zeros(1)}, "meta": _Evil()}, legacy)
    with pytest.raises(CheckpointError) as err:
        safe_torch_load(path, "an ETRIS release")
    msg = str(err.value)
    assert "\n" not in msg and "evil.pth" in msg and "system" in msg and "an ETRIS release" in msg
    assert not (tmp_path / "pwned_by_checkpoint").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_and_missing_files(tmp_path, legacy):
    path = _write(tmp_path / "full.pth", {"state_dict": {"a": torch.randn(1000)}}, legacy)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for bad in (cut, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError) as err:
            safe_torch_load(bad)
        assert bad.name in str(err.value) and "\n" not in str(err.value)


def test_load_model_path_reads_metadata_files(tmp_path, fake_modules, monkeypatch):
    """read_state_dict (every load_model call) accepts containers with metadata objects."""
    from vocabseg.clip.load import read_state_dict

    cfg = fake_modules["DictConfig"]()
    path = _write(tmp_path / "c.pth", {"model": {"module.x": torch.ones(2)}, "config": cfg})
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")
    monkeypatch.delitem(sys.modules, "omegaconf")
    assert list(read_state_dict(path)) == ["x"]
