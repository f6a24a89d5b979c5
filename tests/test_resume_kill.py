"""Resume loses nothing: real training processes killed with SIGKILL at named points (mid-step, while a checkpoint
is being written, right after it, during an evaluation, before the final files) and at a random moment, then
started again with the same command, end exactly where an uninterrupted run ends: same weights, same optimizer
state, byte-identical metrics.jsonl and evaluation files. One thread per process, CPU, tiny models."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


def _env(tmp_path: Path, kill: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VOCABSEG_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("VOCABSEG_TEST_KILL_AT", None)
    if kill:
        env["VOCABSEG_TEST_KILL_AT"] = kill
    return env


def _train(tmp_path: Path, command: str, config: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vocabseg", command, str(config)]
    return subprocess.run(cmd, env=_env(tmp_path, kill), capture_output=True, text=True, timeout=300)


def _config(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_same_run(a: Path, b: Path, final: str, last_step: int) -> None:
    """Final weights, the last checkpoint (trainable tensors and optimizer state), metrics.jsonl, every eval file."""
    fa, fb = load_file(str(a / final)), load_file(str(b / final))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    sa = torch.load(a / f"checkpoint_{last_step:07d}.pt", weights_only=True)
    sb = torch.load(b / f"checkpoint_{last_step:07d}.pt", weights_only=True)
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    evals = sorted(p.name for p in a.glob("eval_*.json"))
    assert evals == sorted(p.name for p in b.glob("eval_*.json")) and evals
    for name in evals:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _uninterrupted(tmp_path: Path, command: str, make_config) -> tuple[Path, Path, Path]:
    """Run ``make_config(tmp_path, folder)`` to its end in ``full``; returns (full, the folder and config to kill)."""
    full = tmp_path / "full"
    proc = _train(tmp_path, command, make_config(tmp_path, full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    return full, out, make_config(tmp_path, out)


def _kill_chain(tmp_path: Path, config: Path, out: Path, kills: list[tuple[str, str]]) -> None:
    """Run ``command`` with each kill point in turn (each must die by SIGKILL), then once more to the end."""
    for command, kill in kills:
        proc = _train(tmp_path, command, config, kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stderr[-3000:])
    proc = _train(tmp_path, kills[0][0], config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------- SAN


def _san_config(tmp_path: Path, out: Path) -> Path:
    world = tmp_path / "world"
    return _config(tmp_path, out.name, {
        "model": "san_tiny_test", "dataset": "custom", "data_root": str(world / "train"), "train_split": "all",
        "val_root": str(world / "val"), "val_split": "all", "val_max_images": 2,
        "world": {"num_samples": 10, "val_samples": 2, "seed": 0, "min_size": 48, "max_size": 64},
        "crop_size": 32, "batch_size": 2, "lr": 1e-3, "max_iters": 10, "warmup_iters": 2, "num_workers": 0,
        "device": "cpu", "seed": 1, "output_dir": str(out), "progress": False, "keep_checkpoints": 0,
        "checkpoint_every": 4, "eval_every": 4, "log_every": 3,  # log_every does not divide checkpoint_every
    })


def test_san_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path):
    full, out, config = _uninterrupted(tmp_path, "train", _san_config)
    _kill_chain(tmp_path, config, out, [
        ("train", "step:6"),  # gradients of step 6 computed, weights not updated (checkpoint 4 exists)
        ("train", "checkpoint:8"),  # checkpoint 8 written to its .tmp, not renamed: resume from 4 again
        ("train", "eval:8"),  # checkpoint 8 complete, its evaluation not: the resumed run must still do it
    ])
    _assert_same_run(full, out, "model_final.safetensors", 10)
    log = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["type"] == "eval"] == [4, 8, 10]  # each once
    assert [r["iter"] for r in log if r["type"] == "train"] == [3, 6, 9, 10]


# ---------------------------------------------------------------------------------------------------- CLIP


def _clip_config(tmp_path: Path, out: Path, **kw) -> Path:
    data = {"output_dir": str(out), "seed": 0, "image_resolution": 32, "patch_size": 8, "vision_width": 64,
            "vision_layers": 1, "text_width": 64, "text_layers": 1, "embed_dim": 32, "batch_size": 4,
            "max_iters": 8, "lr": 1e-3, "warmup_iters": 2, "checkpoint_every": 3, "log_every": 2, "num_workers": 0,
            "world_min_size": 32, "world_max_size": 40, "world_max_objects": 1, "eval_samples": 3, "eval_every": 4,
            "keep_checkpoints": 0}
    return _config(tmp_path, out.name, {**data, **kw})


def test_clip_killed_anywhere_resumes_to_the_uninterrupted_run(tmp_path):
    full, out, config = _uninterrupted(tmp_path, "train-clip", _clip_config)
    _kill_chain(tmp_path, config, out, [
        ("train-clip", "after-checkpoint:3"),  # checkpoint 3 complete, nothing after it
        ("train", "final:8"),  # `vocabseg train` continues what `train-clip` started; dies before the final files
    ])
    _assert_same_run(full, out, "tiny_clip.safetensors", 8)

    # and once at a random moment of the training (the seed is in the failure message)
    seed = int(time.time())
    delay = random.Random(seed).uniform(0.0, 1.0)  # lands in steps 4-8, an evaluation or the final files
    out = tmp_path / "random"
    config = _clip_config(tmp_path, out)
    proc = subprocess.Popen([sys.executable, "-m", "vocabseg", "train", str(config)], env=_env(tmp_path, None),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint_0000003.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # from the first checkpoint on, so the resume has something to continue
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _train(tmp_path, "train", config)
    assert done.returncode == 0, (seed, delay, done.stderr[-3000:])
    _assert_same_run(full, out, "tiny_clip.safetensors", 8)


# ---------------------------------------------------------------------------------------------------- ETRIS


def test_referring_killed_during_evaluation_resumes_to_the_uninterrupted_run(tmp_path):
    def config(tmp_path: Path, out: Path) -> Path:
        return _config(tmp_path, out.name, {
            "model": "etris_tiny_test", "dataset": "world", "val_splits": ["val"], "batch_size": 4, "max_iters": 5,
            "checkpoint_every": 2, "eval_every": 2, "log_every": 3, "verbose": False, "keep_checkpoints": 0,
            "output_dir": str(out), "device": "cpu",
            "world": {"num_train": 12, "num_val": 2, "seed": 0, "min_size": 64, "max_size": 80}})

    full, out, killed = _uninterrupted(tmp_path, "train", config)
    _kill_chain(tmp_path, killed, out, [("train-referring", "eval:4")])
    _assert_same_run(full, out, "model_final.safetensors", 5)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_before_any_step(tmp_path):
    """A missing dataset folder and a folder of another config's run: one line naming the path/key, nothing run."""
    from vocabseg.engine.config import load_family
    from vocabseg.engine.loop import run_family

    out = tmp_path / "run"
    run_family(load_family(_clip_config(tmp_path, out, max_iters=1, checkpoint_every=1, eval_samples=0)),
               log=lambda line: None)
    before = (out / "metrics.jsonl").read_bytes()
    other = _clip_config(tmp_path, out, max_iters=2, embed_dim=64, eval_samples=0)
    proc = _train(tmp_path, "train", other)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "embed_dim is 32 there and 64 here" in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before and not (out / "checkpoint_0000002.pt").exists()

    missing = _config(tmp_path, "seg", {"model": "san_tiny_test", "data_root": str(tmp_path / "nowhere"),
                                        "output_dir": str(tmp_path / "seg"), "device": "cpu"})
    proc = _train(tmp_path, "train", missing)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and not (tmp_path / "seg" / "metrics.jsonl").exists()
