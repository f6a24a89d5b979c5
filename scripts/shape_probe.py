"""Can the embedded default's CLIP image tower learn shapes at all? A supervised probe (issue #24).

Fine-tunes the image tower of a CLIP file (default: the shipped one) with a 10-way shape head on single world
objects (medium/large/huge, hard or soft edges, JPEG, any paper tone; 3,000 training / 400 held-out images,
generated once and cached), and prints held-out accuracy every 25 steps. ``--stem`` adds a small convolutional
stem (two 3x3 convolutions, 32 channels) beside the patch embedding, the usual cure for ViTs that are slow to see
local structure.

    python scripts/shape_probe.py [--clip FILE] [--stem] [--steps 150] [--lr 1e-3]

Measured 2026-12-05 (2 cores shared with other jobs, batch 32): the shipped tower stays at chance (8.5-11.2 %
held-out after 150 steps), and so does the conv-stem variant (8.7-11.7 %); see docs/default_model.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shape_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from vocabseg.data.world import OBJECT_CATEGORIES, WorldConfig, generate_sample, sample_seed
    from vocabseg.engine.contrastive import to_clip_tensor

    cfg = WorldConfig(min_size=96, max_size=160, max_objects=1, min_objects=1, sizes=("medium", "large"),
                      huge_prob=0.2, hard_edge_prob=0.3, jpeg_prob=0.3, plain_tones=True, texture_prob=0.2)
    xs, ys = [], []
    for i in range(n):
        s = generate_sample(sample_seed(seed, i), cfg)
        if len(s.objects) == 1:
            xs.append(to_clip_tensor(s.image, 96))
            ys.append(OBJECT_CATEGORIES.index(s.objects[0].category))
    return torch.stack(xs), torch.tensor(ys)


class StemEncoder(nn.Module):
    """The CLIP image tower with a small conv stem added to its patch embedding (starts as the original)."""

    def __init__(self, visual: nn.Module, channels: int = 32):
        super().__init__()
        self.visual = visual
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GELU())
        self.patch = nn.Conv2d(channels, visual.width, visual.patch_size, visual.patch_size, bias=False)
        nn.init.zeros_(self.patch.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        t = v.conv1(x) + self.patch(self.stem(x))
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(t.shape[0], 1, -1), t], 1) + v.positional_embedding
        t = v.run_blocks(v.ln_pre(t))
        return v.ln_post(t[:, 0]) @ v.proj


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default=str(ROOT / "vocabseg" / "weights" / "default_clip.safetensors"))
    p.add_argument("--stem", action="store_true")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache", type=Path, default=Path("runs/shape_probe_data.pt"))
    args = p.parse_args()
    from vocabseg.clip import load as load_clip

    torch.manual_seed(0)
    if args.cache.exists():
        (x, y), (xv, yv) = torch.load(args.cache)
    else:
        (x, y), (xv, yv) = shape_set(3000, 123), shape_set(400, 456)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(((x, y), (xv, yv)), args.cache)
    visual = load_clip(args.clip).float().visual
    enc = StemEncoder(visual) if args.stem else visual
    head = nn.Linear(visual.output_dim, 10)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    t0, accs = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 10)
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        enc.train()
        logits = head(enc(x[idx]))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        accs.append((logits.argmax(-1) == y[idx]).float().mean().item())
        if (step + 1) % 25 == 0:
            enc.eval()
            with torch.no_grad():
                val = (head(enc(xv)).argmax(-1) == yv).float().mean().item()
            print(json.dumps({"step": step + 1, "train_acc": round(float(np.mean(accs[-25:])), 3),
                              "held_out_acc": round(val, 3), "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
