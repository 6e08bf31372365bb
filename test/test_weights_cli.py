"""langgs-download-weights --check: reports what is present where the node looks, without any network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from langgs_ros.download import human_size
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


# --------------------------------------------------------------------------------------------------------------
# Downloads and caches without the internet: a real HTTP server on 127.0.0.1 stands for the SAM download site, and
# the Hugging Face cache is laid out (huggingface_hub's documented cache layout) with the tiny presets' weights.
# --------------------------------------------------------------------------------------------------------------

def _offline_env(tmp_path: Path) -> dict[str, str]:
    from _local_http import closed_port_url

    dead = closed_port_url()
    env = dict(os.environ, LANGGS_WEIGHTS_DIR=str(tmp_path / "weights"), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_ENDPOINT=dead.rstrip("/"), LANGGS_SAM_BASE_URL=dead,
               TORCH_HOME=str(tmp_path / "torch"))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def _put_in_hf_cache(cache: Path, repo_id: str, filename: str) -> Path:
    """Where huggingface_hub keeps ``repo_id``/``filename`` of revision ``main`` (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_sam_is_downloaded_from_the_configured_site_once(tmp_path, monkeypatch, capfd) -> None:
    from _local_http import serve_folder

    from langgs_ros.semantics.presets import build_sam_tiny

    site = tmp_path / "site"
    site.mkdir()
    tiny = build_sam_tiny(seed=3)
    torch.save(tiny.state_dict(), site / "sam_vit_b_01ec64.pth")
    for k, v in _offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with serve_folder(site) as (url, requests):
        monkeypatch.setenv("LANGGS_SAM_BASE_URL", url)
        assert main(["sam"]) == 0
        out, err = capfd.readouterr()
        dest = tmp_path / "weights" / "sam" / "sam_vit_b_01ec64.pth"
        assert f"downloaded to {dest}" in out
        size = human_size((site / "sam_vit_b_01ec64.pth").stat().st_size)  # the tiny preset is ~0.5 MB: "kB"
        assert f"weights: {size} from {url}sam_vit_b_01ec64.pth" in err  # size stated before the transfer
        assert main(["sam"]) == 0 and f"present at {dest}" in capfd.readouterr().out
        assert requests == ["/sam_vit_b_01ec64.pth"]  # cached: fetched once
    loaded = build_sam_tiny(checkpoint=dest, seed=99)  # strict load of what was downloaded
    for (name, a), b in zip(tiny.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_weights_found_in_local_caches_without_network(tmp_path) -> None:
    from safetensors.torch import save_file

    from langgs_ros.models.vggt.model import VGGT, VGGTConfig
    from langgs_ros.models.vggt.weights import load_vggt_weights
    from langgs_ros.semantics.presets import build_sam_tiny, build_tiny_clip

    env = _offline_env(tmp_path)
    hub = Path(env["HF_HUB_CACHE"])
    clip, _ = build_tiny_clip(seed=1)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              _put_in_hf_cache(hub, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"))
    torch.save(VGGT(VGGTConfig.tiny()).state_dict(),
               _put_in_hf_cache(hub, "facebook/VGGT-1B-Commercial", "vggt_1B_commercial.pt"))
    sam_file = tmp_path / "weights" / "sam" / "sam_vit_b_01ec64.pth"
    sam_file.parent.mkdir(parents=True)
    torch.save(build_sam_tiny(seed=2).state_dict(), sam_file)

    exe = Path(sys.executable).with_name("langgs-download-weights")
    proc = subprocess.run([str(exe), "all"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines())
    paths = {k: Path(v.split("present at ", 1)[1]) for k, v in lines.items()}
    assert paths["sam"] == sam_file
    assert paths["clip"].name == "open_clip_model.safetensors" and paths["clip"].is_relative_to(hub)
    assert paths["vggt"].name == "vggt_1B_commercial.pt" and paths["vggt"].is_relative_to(hub)
    # the files found are the ones the loaders read (strict loads of the tiny presets)
    loaded_clip, _ = build_tiny_clip(seed=5, checkpoint=paths["clip"])
    assert torch.equal(loaded_clip.state_dict()["text_projection"], clip.state_dict()["text_projection"])
    build_sam_tiny(checkpoint=paths["sam"])
    assert load_vggt_weights(VGGT(VGGTConfig.tiny()), paths["vggt"]).path == paths["vggt"]


def test_failed_downloads_say_what_to_do(tmp_path) -> None:
    exe = Path(sys.executable).with_name("langgs-download-weights")
    proc = subprocess.run([str(exe), "all"], capture_output=True, text=True, timeout=300, env=_offline_env(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    lines = {ln.split(":", 1)[0]: ln for ln in proc.stdout.splitlines()}
    assert set(lines) == {"vggt", "clip", "sam"}, proc.stdout
    assert "ERROR Could not get the SAM vit_b weights: no connection" in lines["sam"]
    assert str(tmp_path / "weights" / "sam" / "sam_vit_b_01ec64.pth") in lines["sam"]
    assert "ERROR Could not get the CLIP weights" in lines["clip"] and "by hand" in lines["clip"]
    assert "ERROR Could not get the VGGT weights" in lines["vggt"] and "accept its licence" in lines["vggt"]
    assert not list((tmp_path / "weights").rglob("*.part"))
