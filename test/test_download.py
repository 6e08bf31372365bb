"""langgs_ros.download and the demo's fetch step against a real HTTP server on 127.0.0.1 (no internet): the TUM
sample is a small TUM-layout archive made here; failures give one paragraph and the demo exits with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from _local_http import closed_port_url, serve_folder

from langgs_ros.datasets import open_sequence
from langgs_ros.download import TUM_SAMPLE, DownloadError, fetch_tum_sample, fetch_url

ROOT = Path(__file__).resolve().parents[1]


def make_tum_archive(folder: Path, n: int = 4, name: str = TUM_SAMPLE) -> Path:
    """``<folder>/<name>.tgz``: a TUM RGB-D sequence of ``n`` 64x48 frames (rgb.txt, depth.txt, groundtruth.txt)."""
    seq = folder / "src" / name
    (seq / "rgb").mkdir(parents=True)
    (seq / "depth").mkdir()
    rng = np.random.default_rng(0)
    rgb_lines, depth_lines, gt_lines = ["# color images"], ["# depth maps"], ["# timestamp tx ty tz qx qy qz qw"]
    for i in range(n):
        t = 1305031102.0 + i / 30.0
        cv2.imwrite(str(seq / "rgb" / f"{t:.6f}.png"), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
        cv2.imwrite(str(seq / "depth" / f"{t:.6f}.png"), np.full((48, 64), 5000 + 100 * i, np.uint16))
        rgb_lines.append(f"{t:.6f} rgb/{t:.6f}.png")
        depth_lines.append(f"{t + 0.001:.6f} depth/{t:.6f}.png")
        gt_lines.append(f"{t:.4f} {0.05 * i:.4f} 0.0 1.5 0.0 0.0 0.0 1.0")
    (seq / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (seq / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    (seq / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")
    (seq / "K.txt").write_text("60 0 31.5\n0 60 23.5\n0 0 1\n")  # intrinsics of these 64x48 frames
    archive = folder / f"{name}.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(seq, arcname=name)
    return archive


def test_tum_sample_is_downloaded_unpacked_and_cached(tmp_path: Path, capfd) -> None:
    site = tmp_path / "site"
    site.mkdir()
    archive = make_tum_archive(site)
    cache = tmp_path / "cache"
    with serve_folder(site) as (url, requests):
        folder = fetch_tum_sample(cache, base_url=url)
        assert requests == [f"/{TUM_SAMPLE}.tgz"]
        err = capfd.readouterr().err
        # the size is stated before the transfer (Content-Length), then the progress bar runs
        assert f"{archive.stat().st_size} B from {url}{TUM_SAMPLE}.tgz" in err or \
            f"kB from {url}{TUM_SAMPLE}.tgz" in err, err
        assert folder == cache / TUM_SAMPLE
        assert not list(cache.glob("*.tgz")) and not list(cache.glob("*.part"))  # archive removed once unpacked
        seq = open_sequence(folder)
        assert seq.layout == "tum" and len(seq) == 4 and seq.poses is not None
        assert seq.frame(2).depth is not None and abs(float(np.median(seq.frame(2).depth)) - 1.04) < 1e-3
        assert fetch_tum_sample(cache, base_url=url) == folder
        assert len(requests) == 1  # cached: no second request


def test_missing_file_and_corrupt_archive_give_a_paragraph(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    with serve_folder(site) as (url, _):
        with pytest.raises(DownloadError) as info:
            fetch_tum_sample(tmp_path / "cache", base_url=url)
        text = str(info.value)
        assert "HTTP 404" in text and f"{url}{TUM_SAMPLE}.tgz" in text
        assert "by hand" in text and "make demo DATA=" in text and "\n" not in text
        (site / f"{TUM_SAMPLE}.tgz").write_bytes(b"this is not a gzip archive")
        with pytest.raises(DownloadError, match="unpacking"):
            fetch_tum_sample(tmp_path / "cache", base_url=url)
        assert not (tmp_path / "cache" / f"{TUM_SAMPLE}.tgz").exists()  # not reused from the cache next time
        with pytest.raises(DownloadError, match="no connection"):
            fetch_url(closed_port_url() + "x.bin", tmp_path / "x.bin")
        assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.bin.part").exists()


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a demo run on a "fresh machine": empty caches, every download site on 127.0.0.1."""
    dead = closed_port_url()
    env = dict(os.environ, LANGGS_DATA_DIR=str(tmp_path / "data"), LANGGS_WEIGHTS_DIR=str(tmp_path / "weights"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_ENDPOINT=dead.rstrip("/"),
               LANGGS_SAM_BASE_URL=dead, LANGGS_TUM_BASE_URL=dead, TORCH_HOME=str(tmp_path / "torch"),
               PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


def run_demo(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--shared-dir", str(tmp_path / "none"),
                           "--report-dir", str(tmp_path / "report")], env=env, capture_output=True, text=True,
                          timeout=300)


def test_demo_offline_ends_with_one_paragraph_and_status_2(tmp_path: Path) -> None:
    proc = run_demo(demo_env(tmp_path), tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("[demo] Could not get the TUM RGB-D sample"), proc.stderr
    assert "no connection" in err[0] and "by hand" in err[0] and "make demo DATA=" in err[0]


def test_demo_downloads_the_sample_then_stops_cleanly_without_weights(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    make_tum_archive(site)
    with serve_folder(site) as (url, requests):
        proc = run_demo(demo_env(tmp_path, LANGGS_TUM_BASE_URL=url), tmp_path)
    assert requests == [f"/{TUM_SAMPLE}.tgz"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "tum layout: 4 frames" in proc.stdout  # the downloaded sample was opened
    assert (tmp_path / "data" / TUM_SAMPLE / "rgb.txt").is_file()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("[demo] Could not get the CLIP weights ViT-B-16/laion2b_s34b_b88k"), proc.stderr
    assert "langgs-download-weights clip" in last and "HF_HUB_CACHE" in last
