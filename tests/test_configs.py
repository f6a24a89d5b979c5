"""Every shipped config file loads with the loader of the trainer it is written for, and all loaders share one
parser: YAML-1.1 number strings ("1e-3") become numbers, unknown keys and wrong types are one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from vocabseg.engine.config import load_config
from vocabseg.engine.contrastive import load_contrastive_config
from vocabseg.engine.groupvit_train import load_groupvit_train_config
from vocabseg.engine.referring import load_referring_config
from vocabseg.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _load_shapes_config(path: Path):
    from vocabseg.engine.config import load_family

    return load_family(path, family="shapes").config


def _loader(path: Path):
    name = path.stem
    if name.startswith("etris_"):
        return load_referring_config
    if name.startswith("groupvit_"):
        return load_groupvit_train_config
    if name.startswith("default_clip_shapes") or "\nfamily: shapes" in "\n" + path.read_text():
        return _load_shapes_config  # the "shapes" family (its file, or the file it builds on, says so)
    if name.startswith("default_clip") or name.endswith("_clip"):
        return load_contrastive_config
    return load_config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    cfg = _loader(path)(path)
    assert isinstance(cfg.lr, float) and cfg.lr > 0
    assert isinstance(cfg.seed, int)


LOADERS = [(load_referring_config, "etris_world.yaml"), (load_groupvit_train_config, "groupvit_tiny_world.yaml"),
           (load_contrastive_config, "default_clip.yaml"), (load_config, "world_compare_san.yaml")]


@pytest.mark.parametrize("loader,name", LOADERS, ids=[n for _, n in LOADERS])
def test_number_strings_and_errors(loader, name: str, tmp_path: Path) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = loader(path, ["lr=1e-3", "seed=3"])
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.seed == 3
    written = tmp_path / "c.yaml"
    written.write_text(f"base: {path}\nlr: 2e-4\n")  # a string in YAML 1.1
    assert loader(written).lr == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match="lrr"):
        loader(path, ["lrr=1"])
    with pytest.raises(ConfigError, match="lr"):
        loader(path, ["lr=abc"])


FAMILY_OF = {load_referring_config: "referring", load_groupvit_train_config: "groupvit",
             load_contrastive_config: "clip", load_config: "segmentation", _load_shapes_config: "shapes"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_vocabseg_train_reads_every_config_as_its_family(path: Path) -> None:
    """`vocabseg train CONFIG` picks the family from the config alone and reads it exactly as the alias does."""
    from vocabseg.engine.config import load_family

    loader = _loader(path)
    family = load_family(path)
    assert family.name == FAMILY_OF[loader]
    assert family.config == loader(path)
    with pytest.raises(ConfigError):  # an alias refuses another family's config (by a key it does not know)
        load_family(path, family="referring" if family.name != "referring" else "clip")


def test_family_key_and_bad_input_are_one_line_errors(tmp_path: Path) -> None:
    from vocabseg.engine.config import load_family

    clip = Path(__file__).resolve().parents[1] / "configs" / "default_clip.yaml"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {clip}\nlr_warmup: 3\n")  # a CLIP config with a key no trainer knows
    with pytest.raises(ConfigError, match="Unknown config key 'lr_warmup'") as e:
        load_family(cfg)
    assert "\n" not in str(e.value)
    cfg.write_text(f"base: {clip}\nbatch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size has the wrong type"):
        load_family(cfg)
    cfg.write_text(f"family: referring\nbase: {clip}\n")  # the family key decides, so CLIP keys are unknown there
    with pytest.raises(ConfigError, match="Unknown config key"):
        load_family(cfg)
    cfg.write_text("family: detection\n")
    with pytest.raises(ConfigError, match="family must be one of"):
        load_family(cfg)
    cfg.write_text(f"family: clip\nbase: {clip}\n")
    assert load_family(cfg).name == "clip" and load_config is not None
