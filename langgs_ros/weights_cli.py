"""``langgs-download-weights``: fetch the model weights a robot needs, on a machine with internet access.

    langgs-download-weights {vggt,clip,sam,all} [--check] [--vggt-repo ID] [--clip-model M --clip-pretrained TAG]
                            [--sam-type vit_b|vit_l|vit_h]

Where the weights go (the places the node and ``langgs`` look at run time, never downloading themselves):

- VGGT: the Hugging Face cache (``huggingface_hub.hf_hub_download``; default repo ``facebook/VGGT-1B-Commercial``,
  gated: accept its licence on huggingface.co and ``hf auth login`` first).
- CLIP: open_clip's own cache for the pretrained tag (``open_clip.download_pretrained``; Hugging Face cache).
- SAM: ``$LANGGS_WEIGHTS_DIR/sam/`` (default ``~/.cache/langgs_ros/sam/``), official file names.

``--check`` only reports what is already present (no network).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{name}"


def sam_destination(model_type: str) -> Path:
    """Where the SAM checkpoint of ``model_type`` is stored (``<weights dir>/sam/<official name>``)."""
    from langgs_ros.semantics.presets import SAM_CHECKPOINT_FILES, default_weights_dir

    return default_weights_dir() / "sam" / SAM_CHECKPOINT_FILES[model_type]


def fetch_sam(model_type: str, check: bool) -> str:
    """Download (or, with ``check``, locate) the SAM checkpoint; returns a status line.

    Raises:
        RuntimeError: download failed (partial files are removed).
    """
    from langgs_ros.semantics.presets import resolve_sam_checkpoint

    try:
        return f"sam {model_type}: present at {resolve_sam_checkpoint(model_type)}"
    except FileNotFoundError:
        if check:
            return f"sam {model_type}: MISSING (would be saved to {sam_destination(model_type)})"
    import torch

    dest = sam_destination(model_type)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        torch.hub.download_url_to_file(SAM_URL.format(name=dest.name), str(tmp), progress=True)
        tmp.replace(dest)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"SAM {model_type} download failed: {exc}") from exc
    return f"sam {model_type}: downloaded to {dest}"


def fetch_clip(model: str, pretrained: str, check: bool) -> str:
    """Download (or, with ``check``, locate) open_clip weights; returns a status line.

    Raises:
        RuntimeError: unknown model/tag or download failed.
    """
    import open_clip

    from langgs_ros.semantics.presets import resolve_clip_checkpoint

    try:
        return f"clip {model}/{pretrained}: present at {resolve_clip_checkpoint(model, pretrained)[0]}"
    except (FileNotFoundError, ValueError):
        if check:
            return f"clip {model}/{pretrained}: MISSING"
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        raise RuntimeError(f"open_clip has no pretrained tag {pretrained!r} for {model!r}")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:
        raise RuntimeError(f"CLIP {model}/{pretrained} download failed: {exc}") from exc
    return f"clip {model}/{pretrained}: downloaded to {path}"


def fetch_vggt(repo: str, check: bool) -> str:
    """Download (or, with ``check``, locate) the VGGT checkpoint into the Hugging Face cache.

    Raises:
        RuntimeError: not found on the hub, gated without login, or no network.
    """
    from langgs_ros.models.vggt.weights import WeightsNotFoundError, resolve_checkpoint

    try:
        return f"vggt {repo}: present at {resolve_checkpoint(repo, local_files_only=True)}"
    except WeightsNotFoundError:
        if check:
            return f"vggt {repo}: MISSING"
    try:
        return f"vggt {repo}: downloaded to {resolve_checkpoint(repo, local_files_only=False)}"
    except WeightsNotFoundError as exc:
        raise RuntimeError(f"VGGT download failed: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 0 when everything requested is present/downloaded, 1 otherwise."""
    from langgs_ros.semantics.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

    ap = argparse.ArgumentParser(prog="langgs-download-weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("vggt", "clip", "sam", "all"))
    ap.add_argument("--check", action="store_true", help="only report what is present (no network)")
    ap.add_argument("--vggt-repo", default="facebook/VGGT-1B-Commercial")
    ap.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL)
    ap.add_argument("--clip-pretrained", default=DEFAULT_CLIP_PRETRAINED)
    ap.add_argument("--sam-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    args = ap.parse_args(argv)
    jobs = {
        "vggt": lambda: fetch_vggt(args.vggt_repo, args.check),
        "clip": lambda: fetch_clip(args.clip_model, args.clip_pretrained, args.check),
        "sam": lambda: fetch_sam(args.sam_type, args.check),
    }
    ok = True
    for name in (jobs if args.what == "all" else [args.what]):
        try:
            line = jobs[name]()
        except RuntimeError as exc:
            line, ok = f"{name}: ERROR {exc}", False
        ok = ok and "MISSING" not in line
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
