"""Two-process training on CPU (gloo) under a real ``torchrun``: synchronised weights, sharded data, rank-0 output."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vocabseg.engine import checkpoint as ckpt
from vocabseg.engine.distributed import ResumableBatchSampler

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ITERS, BATCH, N_IMAGES, SEED = 4, 1, 5, 7

SCRIPT = textwrap.dedent('''
    """Runs on each rank: train the tiny SAN, recording what this rank wrote, loaded and ended with."""
    import hashlib, json, os, sys, warnings
    from pathlib import Path

    import numpy as np
    import torch

    from vocabseg.engine import checkpoint as ckpt, loop, trainer
    from vocabseg.engine import TrainConfig, train

    out, record, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)

    class Shapes:
        class_names = ["sky", "grass", "red square"]
        ignore_index = 255

        def __init__(self, n):
            rng = np.random.default_rng(0)
            self.items = []
            for _ in range(n):
                img = np.zeros((64, 64, 3), np.uint8); lab = np.zeros((64, 64), np.int64)
                img[:32], img[32:], lab[32:] = (90, 150, 240), (40, 180, 60), 1
                y, x = rng.integers(4, 40, 2)
                img[y:y + 16, x:x + 16], lab[y:y + 16, x:x + 16] = (220, 30, 30), 2
                self.items.append((img, lab))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            img, lab = self.items[i]
            return {"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "label": torch.from_numpy(lab),
                    "index": i, "name": str(i)}

    def log(kind, value):
        with open(record / f"{kind}_rank{rank}.txt", "a") as f:
            f.write(json.dumps(value) + "\\n")

    real_atomic = ckpt.atomic_write
    def recording_atomic(path, write, *rest):
        log("writes", Path(path).name)
        return real_atomic(path, write, *rest)
    ckpt.atomic_write = recording_atomic

    real_append = loop._append_jsonl
    def recording_append(path, rec):
        log("writes", Path(path).name)
        real_append(path, rec)
    loop._append_jsonl = recording_append

    real_getitem = trainer.TrainSamples.__getitem__
    def recording_getitem(self, key):
        log("samples", list(key))
        return real_getitem(self, key)
    trainer.TrainSamples.__getitem__ = recording_getitem

    real_checkpoint = loop.Trainer._checkpoint
    def hashing_checkpoint(self, model, *args, **kwargs):
        h = hashlib.sha256()
        for name, t in sorted(ckpt.trainable_state(model).items()):
            h.update(name.encode()); h.update(t.numpy().tobytes())
        log("hash", {"iter": args[2], "sha": h.hexdigest()})
        return real_checkpoint(self, model, *args, **kwargs)
    loop.Trainer._checkpoint = hashing_checkpoint

    if mode == "die":  # both ranks stop in the step after the checkpoint at iteration 2, like a killed job
        real_step = loop.Trainer._step
        def dying_step(self, *args):
            if args[-1] == 2:
                raise SystemExit(3)
            return real_step(self, *args)
        loop.Trainer._step = dying_step

    cfg = TrainConfig(model="san_tiny_test", output_dir=str(out), max_iters=%(iters)d, batch_size=%(batch)d, lr=1e-3,
                      log_every=1, checkpoint_every=2, eval_every=0, num_workers=0, device="cpu", progress=False,
                      seed=%(seed)d, resume=(mode == "resume"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, train_dataset=Shapes(%(n)d), val_dataset=Shapes(2), transform=None)
    log("result", {"iteration": result["iteration"], "world_size": result["world_size"],
                   "mIoU": result["metrics"]["mIoU"], "pACC": result["metrics"]["pACC"]})
    if rank == 0:  # the process group is gone now: evaluate the saved model again in this one process
        import vocabseg
        from vocabseg.engine import evaluate
        model = vocabseg.load_model("san_tiny_test", checkpoint=result["final_weights"])
        single = evaluate(model, Shapes(2), progress=False)
        log("single_eval", {"mIoU": single["mIoU"], "pACC": single["pACC"]})
''') % {"iters": ITERS, "batch": BATCH, "seed": SEED, "n": N_IMAGES}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _torchrun(tmp_path: Path, out: Path, record: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    record.mkdir(exist_ok=True)
    env = {**os.environ, "VOCABSEG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out), str(record), mode]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    out, record = tmp_path / "run", tmp_path / "record"
    proc = _torchrun(tmp_path, out, record, "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, record


def test_two_processes_stay_in_sync_and_only_rank0_writes(full_run):
    out, record = full_run

    # both ranks finished, as a 2-process run, with the same (all-reduced) evaluation
    results = [_lines(record / f"result_rank{r}.txt") for r in (0, 1)]
    assert [r[0]["iteration"] for r in results] == [ITERS, ITERS]
    assert [r[0]["world_size"] for r in results] == [2, 2]
    assert results[0][0]["mIoU"] == results[1][0]["mIoU"]
    single = _lines(record / "single_eval_rank0.txt")[0]  # each rank evaluated one image; the sum is the whole set
    assert single["mIoU"] == pytest.approx(results[0][0]["mIoU"])
    assert single["pACC"] == pytest.approx(results[0][0]["pACC"])

    # identical trainable weights on both ranks at every checkpoint, and they changed between checkpoints
    hashes = [_lines(record / f"hash_rank{r}.txt") for r in (0, 1)]
    assert [h["iter"] for h in hashes[0]] == [2, 4]
    assert hashes[0] == hashes[1]
    assert hashes[0][0]["sha"] != hashes[0][1]["sha"]

    # rank 0 alone wrote files; the log has one line per iteration (not one per rank)
    assert _lines(record / "writes_rank1.txt") == []
    written = set(_lines(record / "writes_rank0.txt"))
    assert {"checkpoint_0000002.pt", "checkpoint_0000004.pt", "metrics.jsonl", "config.yaml",
            "model_final.safetensors", "model_final.json"} <= written
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["type"] == "train"] == list(range(1, ITERS + 1))

    # each rank loaded its own half of every global batch: together exactly the single-process stream
    samples = [[tuple(k) for k in _lines(record / f"samples_rank{r}.txt")] for r in (0, 1)]
    expected = ResumableBatchSampler(N_IMAGES, BATCH * 2, seed=SEED)
    for step in range(ITERS):
        assert samples[0][step * BATCH:(step + 1) * BATCH] + samples[1][step * BATCH:(step + 1) * BATCH] \
            == expected.batch_at(step)

    # the checkpoint holds both ranks' RNG states and the final weights equal what the ranks hashed
    state = ckpt.load_checkpoint(out / "checkpoint_0000004.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    h = hashlib.sha256()
    for name, t in sorted(state["model"].items()):
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    assert h.hexdigest() == hashes[0][-1]["sha"]


def test_two_process_resume_is_identical_to_the_uninterrupted_run(full_run, tmp_path):
    full_out, full_record = full_run
    out, record = tmp_path / "run", tmp_path / "record"
    died = _torchrun(tmp_path, out, record, "die")
    assert died.returncode != 0
    assert [i for i, _ in ckpt.list_checkpoints(out)] == [2]
    resumed = _torchrun(tmp_path, out, record, "resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    # same weights on both ranks as the uninterrupted run: per-rank RNG states and data shards were restored
    hashes = [_lines(record / f"hash_rank{r}.txt") for r in (0, 1)]
    full_hashes = _lines(full_record / "hash_rank0.txt")
    assert hashes[0] == hashes[1] == full_hashes  # iteration 2 from the first launch, 4 from the resumed one
    assert (out / "metrics.jsonl").read_bytes() == (full_out / "metrics.jsonl").read_bytes()
