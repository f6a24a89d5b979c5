"""Folder inference sharded over processes: ``torchrun --nproc_per_node 2 -m vocabseg segment FOLDER ...``.

Each rank takes its share of the files (RANK::WORLD_SIZE); together they write every image exactly once, byte for
byte what one process writes; ``--skip-existing`` then skips everything and redoes only images with missing outputs.

The model is the tiny SAN with a weights file: without one, each process would draw its own random weights.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed (torchrun)")

VOCAB = "red circle, blue square, background"
STEMS = [f"img{i}" for i in range(6)]
SUFFIXES = ("_labels.png", "_overlay.png", ".json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(VOCABSEG_CACHE=str(root / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def segment(root: Path, out: Path, *extra: str, ranks: int) -> list[int]:
    """Run ``vocabseg segment`` on root/in (under torchrun when ranks > 1); the results written by each rank."""
    args = ["segment", str(root / "in"), "--vocab", VOCAB, "--model", "san_tiny_test",
            "--checkpoint", str(root / "tiny.safetensors"), "--out", str(out), *extra]
    if ranks == 1:
        proc = subprocess.run([sys.executable, "-m", "vocabseg", *args], env=_env(root), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return [int(re.search(r"wrote (\d+) result", proc.stderr).group(1))]
    logs = root / f"logs-{len(list(root.glob('logs-*')))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "--log-dir", str(logs), "--redirects", "2",  # each rank's stderr in its own file
           "-m", "vocabseg", *args]
    proc = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=300)
    rank_logs = sorted(logs.rglob("stderr.log"), key=lambda p: int(p.parent.name))
    text = {p.parent.name: p.read_text() for p in rank_logs}
    assert proc.returncode == 0, (proc.stderr, text)
    assert len(rank_logs) == ranks, (list(logs.rglob("*")), proc.stderr)
    return [int(re.search(r"wrote (\d+) result", t).group(1)) for t in text.values()]


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from safetensors.torch import save_file

    import vocabseg

    root = tmp_path_factory.mktemp("sharded")
    (root / "in").mkdir()
    rng = np.random.default_rng(0)
    for i, stem in enumerate(STEMS):
        h, w = 40 + 8 * (i % 3), 56 + 4 * i
        img = np.zeros((h, w, 3), np.uint8)
        img[: h // 2], img[h // 2:] = (90, 150, 240), (40, 180, 60)
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + 12, x:x + 12] = (220, 30, 30)
        Image.fromarray(img).save(root / "in" / f"{stem}.png")
    torch.manual_seed(0)
    model = vocabseg.create_model("san_tiny_test")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "tiny.safetensors"))
    return root


@pytest.fixture(scope="module")
def single(root):
    out = root / "single"
    assert segment(root, out, ranks=1) == [len(STEMS)]
    return outputs(out)


def test_two_ranks_write_each_image_once_like_one_process(root, single):
    out = root / "sharded"
    written = segment(root, out, ranks=2)
    assert written == [3, 3]  # rank r takes files r, r+2, r+4: every image once, none twice (3 + 3 = 6 files)
    assert sorted(single) == sorted(f"{s}{x}" for s in STEMS for x in SUFFIXES)
    got = outputs(out)
    assert sorted(got) == sorted(single)  # no stray temporary files either
    for name in single:
        assert got[name] == single[name], f"{name} differs between the sharded and the single-process run"


def test_skip_existing_skips_everything_and_redoes_missing(root, single):
    out = root / "resume"
    assert segment(root, out, ranks=2) == [3, 3]
    before = mtimes(out)
    assert segment(root, out, "--skip-existing", ranks=2) == [0, 0]
    assert mtimes(out) == before  # nothing rewritten

    (out / "img2_overlay.png").unlink()  # one output of rank 0's image missing
    for suffix in SUFFIXES:  # all outputs of rank 1's image img5 missing
        (out / f"img5{suffix}").unlink()
    assert segment(root, out, "--skip-existing", ranks=2) == [1, 1]
    after = mtimes(out)
    redone = {name for name in after if after[name] != before.get(name)}
    assert redone == {f"{s}{x}" for s in ("img2", "img5") for x in SUFFIXES}
    assert outputs(out) == single
