"""Training curves: `vocabseg plot` reads run folders' metrics.jsonl (matplotlib is optional)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vocabseg.engine.plot import curve_keys, plot_runs
from vocabseg.errors import UserError


def _run(folder: Path, scale: float) -> Path:
    folder.mkdir(parents=True)
    rows = [{"type": "train", "iter": i, "lr": 1e-3 * (1 - i / 20), "total_loss": scale / i, "loss_ce": 0.5 / i,
             "loss_ce_0": 0.6 / i, "grad_norm": 1.0} for i in range(1, 21)]
    rows += [{"type": "eval", "iter": i, "mIoU": 10.0 * i / 10, "pACC": 50.0, "num_images": 4} for i in (10, 20)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"type": "tr')  # cut line
    return folder


def test_curve_keys_pick_losses_lr_and_metrics(tmp_path):
    rows = [json.loads(line) for line in (_run(tmp_path / "a", 1.0) / "metrics.jsonl").read_text().splitlines()[:-1]]
    train, evals = [r for r in rows if r["type"] == "train"], [r for r in rows if r["type"] == "eval"]
    keys, metrics = curve_keys(train, evals)
    assert keys == ["total_loss", "loss_ce", "lr", "grad_norm"]  # aux copies (loss_ce_0) and counters left out
    assert metrics == ["mIoU", "pACC"]


def test_plot_overlays_runs_and_fails_in_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = plot_runs([_run(tmp_path / "a", 1.0), _run(tmp_path / "b", 2.0)], tmp_path / "curves.png")
    w, h = Image.open(out).size
    assert w > 600 and h > 400
    with pytest.raises(UserError, match="metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'vocabseg\[plot\]'"):
        plot_runs([_run(tmp_path / "a", 1.0)], tmp_path / "curves.png")
