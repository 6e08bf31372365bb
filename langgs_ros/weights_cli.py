"""``langgs-download-weights``: fetch the model weights a robot needs, on a machine with internet access.

    langgs-download-weights {vggt,clip,sam,all} [--check] [--vggt-repo ID] [--clip-model M --clip-pretrained TAG]
                            [--sam-type vit_b|vit_l|vit_h]

Where the weights go (the places the node and ``langgs`` look at run time, never downloading themselves):

- VGGT: the Hugging Face cache (``huggingface_hub.hf_hub_download``; default repo ``facebook/VGGT-1B-Commercial``,
  gated: accept its licence on huggingface.co and ``hf auth login`` first).
- CLIP: open_clip's own cache for the pretrained tag (the Hugging Face cache for ``hf_hub`` tags, the file open_clip
  itself would fetch; ``open_clip.download_pretrained`` for URL tags).
- SAM: ``$LANGGS_WEIGHTS_DIR/sam/`` (default ``~/.cache/langgs_ros/sam/``), official file names, fetched from
  ``$LANGGS_SAM_BASE_URL`` (default the official segment-anything folder) with :func:`langgs_ros.download.fetch_url`.

Every download states its size before it starts and shows a progress bar; what is present is not fetched again.
Hugging Face downloads honour huggingface_hub's ``$HF_ENDPOINT`` / ``$HF_HUB_CACHE`` / ``$HF_TOKEN``.
Failures raise :class:`~langgs_ros.download.DownloadError` (one paragraph: what, why, how to get it by hand, where
to put it). ``--check`` only reports what is already present (no network). :func:`ensure_weights` is the same code
for programs (the demo).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from langgs_ros.download import DownloadError, fetch_url, human_size, short_reason

SAM_BASE_URL_ENV = "LANGGS_SAM_BASE_URL"
"""Environment variable: folder URL holding the official SAM checkpoint files (a mirror)."""
SAM_DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
"""Where segment-anything's README links its checkpoints."""
SAM_SIZES = {"vit_b": 375_000_000, "vit_l": 1_250_000_000, "vit_h": 2_560_000_000}
"""Approximate official checkpoint sizes in bytes (for messages written without network access)."""
HF_LOCAL_HINT = ("Or copy a Hugging Face cache that has it (`~/.cache/huggingface/hub`) from a connected machine "
                 "and point HF_HUB_CACHE at it")


def sam_url(model_type: str) -> str:
    """Download URL of the official SAM checkpoint (``$LANGGS_SAM_BASE_URL`` or the official folder)."""
    from langgs_ros.semantics.presets import SAM_CHECKPOINT_FILES

    base = os.environ.get(SAM_BASE_URL_ENV) or SAM_DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + SAM_CHECKPOINT_FILES[model_type]


def sam_destination(model_type: str) -> Path:
    """Where the SAM checkpoint of ``model_type`` is stored (``<weights dir>/sam/<official name>``)."""
    from langgs_ros.semantics.presets import SAM_CHECKPOINT_FILES, default_weights_dir

    return default_weights_dir() / "sam" / SAM_CHECKPOINT_FILES[model_type]


def fetch_sam(model_type: str, check: bool, progress: bool = True) -> str:
    """Download (or, with ``check``, locate) the SAM checkpoint; returns a status line.

    Raises:
        DownloadError: download failed (partial files are removed); the paragraph gives the URL and destination.
    """
    from langgs_ros.semantics.presets import WEIGHTS_DIR_ENV, resolve_sam_checkpoint

    try:
        return f"sam {model_type}: present at {resolve_sam_checkpoint(model_type)}"
    except FileNotFoundError:
        if check:
            return f"sam {model_type}: MISSING (would be saved to {sam_destination(model_type)})"
    dest, url = sam_destination(model_type), sam_url(model_type)
    try:
        fetch_url(url, dest, what=f"SAM {model_type} weights", progress=progress)
    except DownloadError as exc:
        raise DownloadError(
            f"the SAM {model_type} weights", f"{exc.reason} ({url})",
            f"To get them by hand, download {url} (about {human_size(SAM_SIZES.get(model_type))}) on a connected "
            f"machine and put the file at {dest}",
            f"Or keep it in a folder of your choice and set {WEIGHTS_DIR_ENV}=<folder> (the file under "
            f"<folder>/sam/), or pass the node parameter semantic.sam_checkpoint") from exc
    return f"sam {model_type}: downloaded to {dest}"


def _hf_probe(repo_id: str, filenames: list[str], what: str, manual: str, local: str) -> tuple[str, int | None]:
    """Ask the hub which of ``filenames`` exists in ``repo_id`` and its size, before downloading anything.

    Raises:
        DownloadError: offline, gated or unknown repository, or none of the files exists.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    missing = []
    for name in filenames:
        try:
            return name, get_hf_file_metadata(hf_hub_url(repo_id, name)).size
        except EntryNotFoundError:
            missing.append(name)
        except GatedRepoError as exc:
            raise DownloadError(what, f"the Hugging Face repository {repo_id} is gated and did not accept this "
                                      f"request ({short_reason(exc, 120)})", manual, local) from exc
        except RepositoryNotFoundError as exc:
            raise DownloadError(what, f"the Hugging Face repository {repo_id} was not found or needs a login",
                                manual, local) from exc
        except Exception as exc:  # connection errors (httpx), offline mode, HTTP errors: all mean "not fetched"
            raise DownloadError(what, short_reason(exc), manual, local) from exc
    raise DownloadError(what, f"none of {', '.join(missing)} is in the Hugging Face repository {repo_id}",
                        manual, local)


def _hf_download(repo_id: str, filename: str, size: int | None, what: str, manual: str, local: str) -> Path:
    from huggingface_hub import constants, hf_hub_download

    print(f"downloading {what}: {human_size(size)} from {constants.ENDPOINT}/{repo_id} ({filename}) into the "
          f"Hugging Face cache {constants.HF_HUB_CACHE}", file=sys.stderr, flush=True)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # network, disk, hub errors
        raise DownloadError(what, short_reason(exc), manual, local) from exc


def fetch_clip(model: str, pretrained: str, check: bool) -> str:
    """Download (or, with ``check``, locate) open_clip weights; returns a status line.

    ``hf_hub`` tags: the file open_clip loads (``open_clip_model.safetensors`` when the repository has it, else the
    tag's file) into the Hugging Face cache, where :func:`~langgs_ros.semantics.presets.resolve_clip_checkpoint`
    finds it. URL tags: ``open_clip.download_pretrained``.

    Raises:
        DownloadError: unknown model/tag, or the download failed.
    """
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    from langgs_ros.semantics.presets import resolve_clip_checkpoint

    what = f"the CLIP weights {model}/{pretrained}"
    try:
        return f"clip {model}/{pretrained}: present at {resolve_clip_checkpoint(model, pretrained)[0]}"
    except (FileNotFoundError, ValueError):
        if check:
            return f"clip {model}/{pretrained}: MISSING"
    cfg = open_clip.get_pretrained_cfg(model, pretrained) if model in open_clip.list_models() else {}
    if not cfg:
        raise DownloadError(what, f"open_clip has no pretrained tag {pretrained!r} for {model!r}",
                            "See open_clip.list_pretrained() for the known model/tag pairs")
    hub = str(cfg.get("hf_hub") or "")
    if not hub:
        try:
            path = open_clip.download_pretrained(cfg)
        except Exception as exc:
            raise DownloadError(what, short_reason(exc), f"Download {cfg.get('url')} by hand into ~/.cache/clip/",
                                "Or pass a local file as semantic.clip_pretrained") from exc
        return f"clip {model}/{pretrained}: downloaded to {path}"
    repo_id, filename = (hub.rstrip("/"), HF_WEIGHTS_NAME) if hub.endswith("/") else os.path.split(hub)
    names = [HF_SAFE_WEIGHTS_NAME, filename] if filename == HF_WEIGHTS_NAME else [filename]
    manual = (f"To get them by hand, run `langgs-download-weights clip` on a connected machine, or download "
              f"https://huggingface.co/{repo_id} file {names[0]} and pass its path as semantic.clip_pretrained")
    name, size = _hf_probe(repo_id, names, what, manual, HF_LOCAL_HINT)
    path = _hf_download(repo_id, name, size, what, manual, HF_LOCAL_HINT)
    return f"clip {model}/{pretrained}: downloaded to {path}"


def fetch_vggt(repo: str, check: bool) -> str:
    """Download (or, with ``check``, locate) the VGGT checkpoint into the Hugging Face cache.

    Raises:
        DownloadError: not found on the hub, gated without an accepted licence / login, or no network.
    """
    from langgs_ros.models.vggt.weights import (
        GENERIC_FILENAMES,
        KNOWN_REPO_FILENAMES,
        WeightsNotFoundError,
        resolve_checkpoint,
    )

    try:
        return f"vggt {repo}: present at {resolve_checkpoint(repo, local_files_only=True)}"
    except WeightsNotFoundError as exc:
        if check:
            return f"vggt {repo}: MISSING"
        if Path(repo).expanduser().exists() or repo.count("/") != 1:
            raise DownloadError(f"the VGGT weights {repo}", short_reason(exc)) from exc
    what = f"the VGGT weights {repo}"
    manual = (f"The repository is gated: accept its licence on https://huggingface.co/{repo}, log in with "
              f"`hf auth login` (or set HF_TOKEN), then run `langgs-download-weights vggt`")
    local = "Or pass a local checkpoint file or folder (node parameter feedforward.weights, demo --vggt-weights)"
    name, size = _hf_probe(repo, list(KNOWN_REPO_FILENAMES.get(repo, GENERIC_FILENAMES)), what, manual, local)
    path = _hf_download(repo, name, size, what, manual, local)
    return f"vggt {repo}: downloaded to {path}"


def ensure_weights(what: list[str], *, clip_model: str | None = None, clip_pretrained: str | None = None,
                   sam_type: str = "vit_b", vggt_repo: str = "facebook/VGGT-1B-Commercial",
                   download: bool = True) -> list[str]:
    """Make sure the weights in ``what`` (any of "clip", "sam", "vggt") are present, downloading what is missing.

    The same functions as ``langgs-download-weights``; present files are found without network access.

    Returns:
        One status line per entry ("... present at ..." / "... downloaded to ...").

    Raises:
        DownloadError: a download failed, or (``download=False``) a file is missing.
    """
    from langgs_ros.semantics.text import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

    jobs = {
        "clip": lambda: fetch_clip(clip_model or DEFAULT_CLIP_MODEL, clip_pretrained or DEFAULT_CLIP_PRETRAINED,
                                   not download),
        "sam": lambda: fetch_sam(sam_type, not download),
        "vggt": lambda: fetch_vggt(vggt_repo, not download),
    }
    lines = []
    for name in what:
        line = jobs[name]()
        if "MISSING" in line:
            raise DownloadError(f"the {name} weights", "they are not on this machine and downloading is off",
                                "Run `langgs-download-weights " + name + "` on a connected machine")
        lines.append(line)
    return lines


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
