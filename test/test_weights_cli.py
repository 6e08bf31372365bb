"""langgs-download-weights --check: reports what is present where the node looks, without any network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from langgs_ros.weights_cli import main, sam_destination


def test_check_reports_missing_weights_with_their_destination(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LANGGS_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert main(["sam", "--check"]) == 1
    out = capsys.readouterr().out
    assert "MISSING" in out and str(tmp_path / "sam" / "sam_vit_b_01ec64.pth") in out


def test_check_finds_weights_where_the_loaders_look(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LANGGS_WEIGHTS_DIR", str(tmp_path))
    dest = sam_destination("vit_l")
    dest.parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, dest)
    assert main(["sam", "--check", "--sam-type", "vit_l"]) == 0
    assert f"present at {dest}" in capsys.readouterr().out
    vggt_dir = tmp_path / "vggt"
    vggt_dir.mkdir()
    torch.save({"x": torch.zeros(1)}, vggt_dir / "model.pt")
    assert main(["vggt", "--check", "--vggt-repo", str(vggt_dir)]) == 0
    assert "present" in capsys.readouterr().out


def test_installed_command_runs(tmp_path) -> None:
    exe = Path(sys.executable).with_name("langgs-download-weights")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "vggt" in proc.stdout
