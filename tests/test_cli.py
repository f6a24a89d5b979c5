"""The command line, run as a user would (a subprocess), on a small random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "vocabseg", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_segment_folder_writes_outputs_and_skips_unreadable(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(src / name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "out"
    res = run("segment", str(src), "--vocab", "cat, dog, grass", "--model", "san_tiny_test", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "broken.png" in res.stderr and "skipped" in res.stderr
    for stem in ("a", "b"):
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == (40, 56) and labels.max() < 3
        assert Image.open(out / f"{stem}_overlay.png").size[1] >= 40
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["vocabulary"] == ["cat", "dog", "grass"]
        assert abs(sum(a["fraction"] for a in summary["areas"]) - 1) < 1e-6
    assert not (out / "broken_labels.png").exists()


def test_segment_errors_are_one_line(tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img)
    res = run("segment", str(img), "--vocab", " , ", "--model", "san_tiny_test", "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and "vocabulary is empty" in res.stderr.lower()
    assert "Traceback" not in res.stderr
    res = run("segment", str(img), "--vocab", "a", "--model", "san_tiny_test", "--checkpoint",
              str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"))
    assert res.returncode == 1 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run("segment", str(tmp_path / "missing.png"), "--vocab", "a", "--model", "san_tiny_test")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = run("segment", str(img), "--vocab", "a", "--model", "no_such_model")
    assert res.returncode == 1 and "unknown model" in res.stderr


def test_models_lists_registered_names():
    res = run("models")
    assert res.returncode == 0
    assert "san_vit_b_16" in res.stdout and "default" in res.stdout


def test_export_then_segment_with_onnx_backend(tmp_path):
    import pytest

    pytest.importorskip("onnxruntime")
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(img)
    weights = tmp_path / "w.safetensors"
    import torch
    from safetensors.torch import save_file

    import vocabseg

    torch.manual_seed(0)
    model = vocabseg.create_model("san_tiny_test")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    res = run("export", "--model", "san_tiny_test", "--checkpoint", str(weights), "--out", str(tmp_path / "onnx"))
    assert res.returncode == 0, res.stderr
    for backend_args, out in ((["--model", "san_tiny_test", "--checkpoint", str(weights)], "t"),
                              (["--backend", "onnx", "--onnx", str(tmp_path / "onnx")], "o")):
        res = run("segment", str(img), "--vocab", "cat, dog, grass", *backend_args, "--out", str(tmp_path / out))
        assert res.returncode == 0, res.stderr
    a = np.asarray(Image.open(tmp_path / "t" / "x_labels.png"))
    b = np.asarray(Image.open(tmp_path / "o" / "x_labels.png"))
    assert np.array_equal(a, b)


def _commands():
    import typer

    from vocabseg.cli import app

    return typer.main.get_command(app).commands


def _usage_error(monkeypatch, capsys, *argv):
    """Run the CLI in-process with ``argv``: (exit code, stderr)."""
    import pytest

    from vocabseg.cli import main

    monkeypatch.setattr(sys, "argv", ["vocabseg", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_mistyped_command_lines_print_usage_and_exit_2(monkeypatch, capsys):
    """Every subcommand: an unknown option, a missing argument, a value of the wrong type -> click's short usage
    message and status 2, never a traceback; a forgotten command name too."""
    import typer

    code, err = _usage_error(monkeypatch, capsys, "image.png", "--vocab", "a, b")
    assert code == 2 and "No such command" in err and "Usage:" in err and "Traceback" not in err
    checked_types = 0
    for name, command in _commands().items():
        code, err = _usage_error(monkeypatch, capsys, name, "--no-such-option")
        if (command.context_settings or {}).get("ignore_unknown_options"):  # key=value overrides pass through: the word is taken as the config path
            assert code == 1 and "does not exist" in err and "Traceback" not in err, (name, err)
        else:
            assert code == 2 and "No such option" in err and "Traceback" not in err, (name, err)
        required = [p for p in command.params if p.required and not getattr(p, "opts", [""])[0].startswith("-")]
        if required:
            code, err = _usage_error(monkeypatch, capsys, name)
            assert code == 2 and "Missing" in err and "Traceback" not in err, (name, err)
        for param in command.params:
            annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
            if param.opts[0].startswith("--") and annotation in (int, float):
                args = [name] + ["x"] * sum(1 for p in command.params if p.required and p.opts[0][:1] != "-")
                code, err = _usage_error(monkeypatch, capsys, *args, param.opts[0], "abc")
                assert code == 2 and "Invalid value" in err and "Traceback" not in err, (name, param.opts, err)
                checked_types += 1
                break
    assert checked_types >= 3
    assert isinstance(typer.__version__, str)


def test_usage_error_from_the_installed_entry_point():
    res = run("segment", "image.png", "--vocab", "a, b", "--no-such-option")
    assert res.returncode == 2 and "Usage:" in res.stderr and "Traceback" not in res.stderr
