#!/usr/bin/env python3
"""Forward time and peak memory of the VGGT backbone vs frames per window (VGGT arXiv 2503.11651).

Examples::

    # CPU, tiny preset (random weights), 56x70 and 518-wide (392x518) inputs, 1..16 frames (< 2 min)
    .venv/bin/python bench/bench_vggt.py

    # CUDA, full-size VGGT-1B (random weights), bfloat16 trunk, next to the published H100 numbers
    .venv/bin/python bench/bench_vggt.py --device cuda --preset vggt_1b --dtype bfloat16

For every (image size, frames) row two things are measured, each as the median of ``--repeats``
runs after ``--warmup`` runs under ``torch.inference_mode()``:

* ``agg``: the aggregator alone (what the published table measures);
* ``full``: the whole model (aggregator + camera + depth + point heads, DPT chunk 8).

Memory: on CUDA ``torch.cuda.max_memory_allocated()`` (weights included, like the published
numbers); on CPU the peak resident-set size above the pre-call baseline, sampled every ~1 ms from
``/proc/self/statm`` (``tracemalloc`` cannot see PyTorch's C++ allocations; ``ru_maxrss`` is used as a
fallback where ``/proc`` is missing). CPU numbers therefore exclude the weights.

Published reference (VGGT README "Runtime and GPU Memory", aggregator only, one H100, Flash
Attention 3; the image size is not stated — this script defaults to 518x518 for ``vggt_1b``).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langgs_ros.models.vggt import VGGT, build_vggt

#: frames -> (seconds, GB), VGGT README table (H100, aggregator only, Flash Attention 3).
PUBLISHED_H100: dict[int, tuple[float, float]] = {
    1: (0.04, 1.88),
    2: (0.05, 2.07),
    4: (0.07, 2.45),
    8: (0.11, 3.23),
    10: (0.14, 3.63),
    20: (0.31, 5.58),
    50: (1.04, 11.41),
    100: (3.12, 21.15),
    200: (8.75, 40.63),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc) so that RSS baselines are meaningful."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    """Context manager sampling RSS in a thread; ``delta`` = peak - baseline in bytes."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.delta = 0
        self._stop = threading.Event()

    def __enter__(self) -> _PeakRSS:
        self._base = _rss_bytes()
        self._peak = self._base
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        maxrss_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._maxrss0
        self.delta = max(self._peak - self._base, maxrss_delta, 0)


@dataclass
class Measurement:
    """Median seconds and peak bytes of one callable (``None`` on out-of-memory)."""

    seconds: float | None
    peak_bytes: int | None


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Measurement:
    """Time ``fn`` (median of ``repeats`` after ``warmup``) and record its peak memory."""
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            fn()
        times: list[float] = []
        peak = 0
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
                peak = max(peak, torch.cuda.max_memory_allocated(device))
            else:
                _malloc_trim()
                with _PeakRSS() as rss:
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                peak = max(peak, rss.delta)
        return Measurement(statistics.median(times), peak)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return Measurement(None, None)


def _fmt_s(m: Measurement) -> str:
    return "OOM" if m.seconds is None else f"{m.seconds:9.4f}"


def _fmt_mb(m: Measurement) -> str:
    return "OOM" if m.peak_bytes is None else f"{m.peak_bytes / 2**20:10.1f}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse ``"56x70,392x518"`` into [(56, 70), (392, 518)] (H x W in pixels)."""
    out = []
    for item in text.split(","):
        h, w = item.lower().split("x")
        out.append((int(h), int(w)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "vggt_1b"])
    ap.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="trunk dtype (heads stay fp32)"
    )
    ap.add_argument("--frames", default=None, help="comma list (default 1,2,4,8,16; vggt_1b: +10,20,50,100)")
    ap.add_argument("--sizes", default=None, help="HxW list (default 56x70,392x518; vggt_1b: 518x518)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default cpu 2, cuda 5)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per row (CPU: only before the first row of a size)",
    )
    ap.add_argument("--chunk", type=int, default=8, help="DPT frames_chunk_size")
    ap.add_argument("--no-full", action="store_true", help="measure the aggregator only")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    big = args.preset == "vggt_1b"
    frames = [int(f) for f in (args.frames or ("1,2,4,8,10,20,50,100" if big else "1,2,4,8,16")).split(",")]
    sizes = parse_sizes(args.sizes or ("518x518" if big else "56x70,392x518"))
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    dtype = DTYPES[args.dtype]

    torch.manual_seed(0)
    model: VGGT = build_vggt(args.preset, device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"VGGT preset={args.preset} params={n_params / 1e6:.2f}M device={device} trunk={args.dtype} "
        f"heads=float32 threads={torch.get_num_threads()} torch={torch.__version__} (random weights)"
    )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    mem_note = "peak allocated incl. weights" if device.type == "cuda" else "peak RSS above baseline"
    show_pub = big and device.type == "cuda"
    header = f"{'HxW':>9} {'frames':>6} | {'agg s':>9} {'agg MB':>10} | {'full s':>9} {'full MB':>10}"
    if show_pub:
        header += f" | {'paper s':>7} {'paper GB':>8}"
    print(f"memory = {mem_note}")
    print(header)
    print("-" * len(header))

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for h, w in sizes:
            for row_idx, s in enumerate(frames):
                warmup = args.warmup if device.type == "cuda" or row_idx == 0 else 0
                images = torch.rand(1, s, 3, h, w, generator=gen).to(device)

                def run_agg(images: torch.Tensor = images) -> object:
                    return model.aggregator(images, keep_layers=model.required_layers())

                def run_full(images: torch.Tensor = images) -> object:
                    return model(images, frames_chunk_size=args.chunk)

                agg = measure(run_agg, device, warmup, repeats)
                full = (
                    Measurement(float("nan"), 0)
                    if args.no_full
                    else measure(run_full, device, warmup, repeats)
                )
                row = f"{h:>4}x{w:<4} {s:>6} | {_fmt_s(agg)} {_fmt_mb(agg)} | {_fmt_s(full)} {_fmt_mb(full)}"
                if show_pub:
                    pub = PUBLISHED_H100.get(s)
                    row += f" | {pub[0]:7.2f} {pub[1]:8.2f}" if pub else f" | {'-':>7} {'-':>8}"
                print(row, flush=True)
                del images
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if show_pub:
        print("paper: VGGT README table (aggregator only, H100, Flash Attention 3, image size not stated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
