#!/usr/bin/env python3
"""Time per frame of the semantic sources and text-encoding latency (cold vs cached).

Measured on real hololens frames (``../shared/data/hololens_office``):

* ``labels`` + MiniLM (real shipped weights): per-frame time with label ids as instances, and with ids as classes
  (3D connectivity split), after one warm-up frame.
* ``clip_sam`` per frame, split into SAM (automatic mask generator) and CLIP (resolution + crops + image tower):
  - ``tiny``: the random-init tiny presets (test configuration: thresholds lowered so masks exist);
  - ``arch``: SAM vit_b and open_clip ViT-B-16 at their real sizes with random weights (compute cost of the real
    models; mask counts differ from trained weights, so the thresholds are lowered the same way);
  - ``full``: the real weights, only where they are installed (else reported as skipped).
  Per-stage times per frame: SAM mask generation, mask resolution, stuff plane tests, crop sampling, CLIP image
  tower (the crops of all frames of a window in one batched pass), in the configured ``--precision``.
* Text encoding latency per query: first (cold: runs the model) vs repeated (cached), MiniLM and CLIP text towers.
* **Association with view-dependent embeddings** (``test/_phrase_source.py``): the whole sequence mapped (rgbd
  backend, dataset poses) with (a) the oracle ``labels`` source (names embedded by MiniLM: the upper bound) and (b)
  the phrase-noise source (a name / synonym / description per (frame, object), embedded by the real MiniLM, plus
  SAM-like segmentation errors). For each: ``dominant`` (objects whose Gaussians are >= 80 % in one instance),
  ``instances_per_object`` (instances holding >= 10 % of an object's Gaussians), ``purity`` and ``localisation``
  (top-1 of names and synonyms inside the box + 10 cm). The last line is the noisy run's
  ``association dominant=X% instances_per_object=Y localisation=Z%``.

Usage::

    .venv/bin/python bench/bench_semantics.py [--frames 8] [--device cpu] [--clip-sam tiny arch full] [--threads 2]
        [--precision auto] [--assoc-step 1]

With a GPU and the real weights: ``bench/bench_semantics.py --device cuda --clip-sam full --precision auto``.
On 2 CPU cores the whole run takes about 10 minutes (the real-size ``arch`` models and the two association maps
dominate; ``--clip-sam tiny --assoc-step 3`` for a quick run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from langgs_ros.datasets import open_sequence
from langgs_ros.semantics.clip_sam import ClipSamSemanticSource
from langgs_ros.semantics.labels import LabelSemanticSource
from langgs_ros.semantics.text import (
    CachedTextEncoder,
    MiniLMTextEncoder,
    OpenClipModel,
    OpenClipTextEncoder,
    load_open_clip_model,
)
from langgs_ros.types import Frame

HOLOLENS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hololens_office"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
STAGES = ("sam", "resolve", "stuff", "crops", "clip")
QUERIES = ["sofa", "the red backpack", "where is the espresso machine", "wicker fruit basket", "a potted plant",
           "long wooden table", "kitchen sink", "white canister", "foosball table", "black floor lamp"]
LOW_THRESHOLDS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_text(enc: CachedTextEncoder, label: str, device: str) -> None:
    """Cold (model) vs cached latency per single query."""
    enc.clear_cache()
    enc.encode_text(["warm-up query"])  # first-call overheads are not a query's latency
    cold, warm = [], []
    for q in QUERIES:
        _sync(device)
        t = time.perf_counter()
        enc.encode_text([q])
        _sync(device)
        cold.append(time.perf_counter() - t)
    for _ in range(5):
        for q in QUERIES:
            t = time.perf_counter()
            enc.encode_text([q])
            warm.append(time.perf_counter() - t)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"  {label:<42s} cold {c * 1e3:8.2f} ms   cached {w * 1e6:8.1f} us   speed-up x{c / w:,.0f}")


def bench_labels(frames: list[Frame], enc: MiniLMTextEncoder) -> None:
    for ids_are_instances in (True, False):
        src = LabelSemanticSource(text_encoder=enc, ids_are_instances=ids_are_instances)
        src.segment(frames[:1])
        times, ks = [], []
        for f in frames:
            t = time.perf_counter()
            seg = src.segment([f])[0]
            times.append(time.perf_counter() - t)
            ks.append(seg.num_instances)
        mode = "ids = instances" if ids_are_instances else "ids = classes (3D split)"
        print(f"  labels + MiniLM, {mode:<26s} {statistics.median(times) * 1e3:8.1f} ms/frame (median), "
              f"max {max(times) * 1e3:.1f} ms, K = {np.mean(ks):.1f} instances/frame")


def _arch_models(device: str) -> tuple[torch.nn.Module, OpenClipModel]:
    import open_clip
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, device=device)
    return sam, OpenClipModel(clip, open_clip.get_tokenizer("ViT-B-16"), "open_clip:ViT-B-16:random", device)


def bench_clip_sam(frames: list[Frame], preset: str, device: str, points_per_side: int, precision: str,
                   warmup: bool = True, window: int = 4) -> OpenClipModel | None:
    """Per-frame time of ``clip_sam`` per stage, frames segmented in windows of ``window`` (one batched CLIP pass
    each); returns the CLIP model for the text benchmark."""
    kwargs: dict = {"device": device, "points_per_side": points_per_side, "precision": precision}
    if preset == "tiny":
        src = ClipSamSemanticSource(preset="tiny", **kwargs, **LOW_THRESHOLDS)
    elif preset == "arch":
        sam, clip = _arch_models(device)
        src = ClipSamSemanticSource(sam=sam, clip=clip, **kwargs, **LOW_THRESHOLDS)
    else:
        try:
            src = ClipSamSemanticSource(preset="full", **kwargs)
        except FileNotFoundError as exc:
            print(f"  clip_sam full: skipped ({exc})")
            return None
    if warmup:
        src.segment(frames[:1])
    totals = dict.fromkeys(STAGES, 0.0)
    ks, wall = [], 0.0
    for i in range(0, len(frames), window):
        chunk = frames[i:i + window]
        _sync(device)
        t = time.perf_counter()
        segs = src.segment(chunk)
        _sync(device)
        wall += time.perf_counter() - t
        for k in STAGES:
            totals[k] += src.last_timings[k]
        ks += [s.num_instances for s in segs]
    n = len(frames)
    k = float(np.mean(ks))
    stages = "  ".join(f"{name} {totals[name] / n * 1e3:.0f}" for name in STAGES)
    print(f"  clip_sam {preset:<5s} (points_per_side={points_per_side}, {src.config.mask_levels}, "
          f"{len(src.config.crop_contexts)} crops/mask, precision {precision}) {wall / n:7.2f} s/frame; "
          f"per frame ms: {stages}; CLIP {totals['clip'] / max(sum(ks), 1) * 1e3:.1f} ms/mask; "
          f"K = {k:.1f} masks/frame")
    return src.clip


def bench_association(step: int) -> dict:
    """Oracle labels vs phrase-noise source on the whole sequence (every ``step``-th frame)."""
    from _phrase_source import PhraseNoiseSource, association_metrics, build_map, gaussian_labels

    from langgs_ros.query import QueryEngine

    seq = open_sequence(HOLOLENS)
    notes = {int(o["id"]): str(o.get("notes", "")) for o in
             json.loads((HOLOLENS / "annotations" / "objects.json").read_text())["objects"]}
    enc = MiniLMTextEncoder()
    idx = list(range(0, len(seq), step))
    out = {}
    for label, src in (("oracle labels", LabelSemanticSource(label_names=seq.label_names, text_encoder=enc)),
                       ("phrases + SAM-like errors", PhraseNoiseSource(seq.objects, enc, notes=notes))):
        t = time.perf_counter()
        snap = build_map(seq, src, idx)
        m = association_metrics(snap, seq.objects, QueryEngine(enc), gaussian_labels(snap, seq, idx))
        print(f"  {label:<26s} dominant {100 * m['dominant']:5.1f} %  instances/object "
              f"{m['instances_per_object']:.2f}  purity {100 * m['purity']:5.1f} %  coverage "
              f"{100 * m['coverage']:5.1f} %  localisation "
              f"{100 * m['localisation']:5.1f} % ({m['found']}/{m['queries']})  {m['instances']} instances  "
              f"[{time.perf_counter() - t:.0f} s]", flush=True)
        out[label] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8, help="frames per measurement (spread over the sequence)")
    ap.add_argument("--arch-frames", type=int, default=1, help="frames for the real-size random-weight models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--clip-sam", nargs="*", default=["tiny", "arch", "full"], choices=["tiny", "arch", "full"])
    ap.add_argument("--points-per-side", type=int, default=8, help="SAM grid (default 8 here; 16 in the source)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--assoc-step", type=int, default=1, help="use every n-th frame for the association maps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not HOLOLENS.is_dir():
        raise SystemExit(f"shared data not found at {HOLOLENS}")
    seq = open_sequence(HOLOLENS)
    idx = np.linspace(0, len(seq) - 1, args.frames).round().astype(int).tolist()
    frames = [seq.frame(i) for i in idx]
    print(f"device {args.device}, {torch.get_num_threads()} threads, {len(frames)} frames "
          f"{frames[0].width}x{frames[0].height}")

    print("text encoding (per query):")
    minilm = MiniLMTextEncoder(device=args.device)
    bench_text(minilm, "MiniLM all-MiniLM-L6-v2 (real weights)", args.device)
    bench_text(OpenClipTextEncoder(load_open_clip_model(preset="tiny", device=args.device)),
               "open_clip tiny text tower", args.device)

    print("labels source:")
    bench_labels(frames, minilm)

    print("clip_sam source:")
    for preset in args.clip_sam:
        if preset == "arch":  # real-size models: few frames, no warm-up (first-call overhead is small beside them)
            clip = bench_clip_sam(frames[1:1 + args.arch_frames], preset, args.device, args.points_per_side,
                                  args.precision, False)
        else:
            clip = bench_clip_sam(frames, preset, args.device, args.points_per_side, args.precision)
        if clip is not None and preset != "tiny":
            bench_text(OpenClipTextEncoder(clip), f"open_clip {preset} ViT-B-16 text tower", args.device)

    print("association with view-dependent embeddings (targets: dominant >= 90 %, instances/object <= 1.3, "
          "localisation >= 90 %):")
    m = bench_association(args.assoc_step)["phrases + SAM-like errors"]
    print(f"association dominant={100 * m['dominant']:.1f}% instances_per_object={m['instances_per_object']:.2f} "
          f"localisation={100 * m['localisation']:.1f}%")


if __name__ == "__main__":
    main()
