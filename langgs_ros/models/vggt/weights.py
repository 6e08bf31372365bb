"""Checkpoint resolution and loading for :class:`~langgs_ros.models.vggt.model.VGGT`.

Released checkpoints (VGGT arXiv 2503.11651, official code release):

* ``facebook/VGGT-1B-Commercial`` (gated; VGGT License, commercial use allowed) holds the plain
  state dict ``vggt_1B_commercial.pt``. This is the default.
* ``facebook/VGGT-1B`` (non-commercial) holds ``model.pt`` and ``model.safetensors``.

Both contain the full reference model *including* the track head. This package does not implement
the track head, so keys starting with ``track_head.`` are the only keys ignored; every other key
must match by name and shape (strict loading). Keys of heads disabled in the config
(``enable_camera/enable_depth/enable_point = False``) are ignored as well.

Nothing here downloads by default: ``local_files_only=True`` only looks at a local path or the
Hugging Face cache. Fetch the weights once with ``langgs-download-weights vggt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from langgs_ros.models.vggt.model import VGGT, VGGTConfig

__all__ = [
    "DEFAULT_REPO_ID",
    "DOWNLOAD_COMMAND",
    "IGNORED_KEY_PREFIXES",
    "KNOWN_REPO_FILENAMES",
    "LoadedWeights",
    "WeightsNotFoundError",
    "build_vggt",
    "load_vggt_weights",
    "read_state_dict",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)

#: Hugging Face repository used when no checkpoint is given.
DEFAULT_REPO_ID = "facebook/VGGT-1B-Commercial"
#: Checkpoint file names tried, in order, per known repository.
KNOWN_REPO_FILENAMES: dict[str, tuple[str, ...]] = {
    "facebook/VGGT-1B-Commercial": ("vggt_1B_commercial.pt", "model.pt", "model.safetensors"),
    "facebook/VGGT-1B": ("model.safetensors", "model.pt"),
}
#: File names tried for other repositories and inside local directories.
GENERIC_FILENAMES: tuple[str, ...] = ("model.safetensors", "model.pt", "vggt_1B_commercial.pt")
#: Checkpoint key prefixes that are always ignored (the reference track head is not implemented).
IGNORED_KEY_PREFIXES: tuple[str, ...] = ("track_head.",)
#: Command that fetches the weights into the Hugging Face cache.
DOWNLOAD_COMMAND = "langgs-download-weights vggt"

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors"}


class WeightsNotFoundError(FileNotFoundError):
    """The VGGT checkpoint is neither at the given path nor in the local Hugging Face cache.

    The message names the file or repository (and file names) that were tried and the command that
    fetches them (``langgs-download-weights vggt``).
    """


@dataclass(frozen=True)
class LoadedWeights:
    """Result of :func:`load_vggt_weights`.

    Attributes:
        path: Checkpoint file that was read.
        ignored_keys: Checkpoint keys that were skipped (``track_head.*`` and disabled heads).
    """

    path: Path
    ignored_keys: tuple[str, ...]


def _not_found(what: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"VGGT weights not found: {what}. Fetch them with `{DOWNLOAD_COMMAND}` "
        f"(the {DEFAULT_REPO_ID} repository is gated: accept its licence on huggingface.co and log in "
        "first), or pass the path of a local .pt/.safetensors checkpoint."
    )


def _looks_like_repo_id(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    if Path(text).suffix.lower() in _CHECKPOINT_SUFFIXES:
        return False
    parts = text.split("/")
    return len(parts) == 2 and all(parts)


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike[str] = DEFAULT_REPO_ID,
    filename: str | None = None,
    *,
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Find a VGGT checkpoint file on disk.

    Resolution order: an existing file path; a directory containing ``filename`` (or one of the
    generic names); otherwise, if the string looks like ``owner/name``, the Hugging Face cache via
    ``huggingface_hub.hf_hub_download`` (trying ``filename`` or the known file names of that repo).

    Args:
        path_or_repo_id: Local file/directory or Hugging Face repository id.
        filename: File inside the repository or directory (default: known names, see
            :data:`KNOWN_REPO_FILENAMES`).
        local_files_only: Only use the local Hugging Face cache (default; no network access). Set
            False to allow downloading.
        revision: Repository revision (branch, tag or commit).
        cache_dir: Hugging Face cache directory (default: the standard cache / ``HF_HOME``).

    Returns:
        Path of the checkpoint file.

    Raises:
        WeightsNotFoundError: If nothing was found (message names what was tried and how to fetch).
    """
    text = os.fspath(path_or_repo_id)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        names = (filename,) if filename else GENERIC_FILENAMES
        for name in names:
            if (path / name).is_file():
                return path / name
        raise _not_found(f"no {' / '.join(names)} in directory {path}")
    if isinstance(path_or_repo_id, os.PathLike) or not _looks_like_repo_id(text):
        raise _not_found(f"file {path} does not exist")

    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a hard dependency
        raise _not_found(f"repository {text} (huggingface_hub is not installed)") from exc

    names = (filename,) if filename else KNOWN_REPO_FILENAMES.get(text, GENERIC_FILENAMES)
    errors: list[str] = []
    for name in names:
        try:
            local = hf_hub_download(
                text,
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        except (EntryNotFoundError, HFValidationError, OSError, ValueError) as exc:
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        return Path(str(local))
    where = "local Hugging Face cache" if local_files_only else "Hugging Face Hub"
    raise _not_found(f"repository {text}, files {', '.join(names)} not in the {where} ({'; '.join(errors)})")


def _unnest(obj: Any) -> Mapping[str, Any]:
    """Descend into ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers until a flat tensor dict."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            break
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    raise ValueError(
        "checkpoint does not contain a flat {name: tensor} state dict (also under 'state_dict'/'model')"
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (on CPU).

    ``torch.save`` files are loaded with ``weights_only=True`` (and memory-mapped when possible); a
    top-level ``state_dict`` or ``model`` entry is unwrapped and a uniform ``module.`` prefix (from
    DistributedDataParallel) is stripped.

    Args:
        path: Checkpoint file.

    Returns:
        ``{parameter name: CPU tensor}``.

    Raises:
        WeightsNotFoundError: If ``path`` does not exist.
        ValueError: If the file holds no flat tensor dict.
    """
    p = Path(path)
    if not p.is_file():
        raise _not_found(f"file {p} does not exist")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        sd: Mapping[str, Any] = load_file(str(p), device="cpu")
    else:
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        sd = _unnest(raw)
    out = dict(sd)
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _ignored_prefixes(model: VGGT) -> tuple[str, ...]:
    prefixes = list(IGNORED_KEY_PREFIXES)
    for name in ("camera_head", "point_head", "depth_head"):
        if getattr(model, name) is None:
            prefixes.append(f"{name}.")
    return tuple(prefixes)


def load_vggt_weights(
    model: VGGT,
    path_or_repo_id: str | os.PathLike[str] = DEFAULT_REPO_ID,
    *,
    filename: str | None = None,
    local_files_only: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    assign: bool = False,
) -> LoadedWeights:
    """Load a VGGT checkpoint into ``model`` strictly (apart from ``track_head.*``).

    Args:
        model: Target model; parameters keep their dtype/device (values are converted) unless
            ``assign`` is True.
        path_or_repo_id: Local ``.pt``/``.pth``/``.safetensors`` file or directory, or a Hugging Face
            repository id (default :data:`DEFAULT_REPO_ID`).
        filename: File name inside the repository/directory (default: known names).
        local_files_only: Only use local files / the Hugging Face cache (no download).
        revision: Hugging Face revision.
        cache_dir: Hugging Face cache directory.
        assign: Replace parameters by the checkpoint tensors (used to load into a ``meta`` model
            without allocating twice).

    Returns:
        :class:`LoadedWeights` with the file path and the ignored keys.

    Raises:
        WeightsNotFoundError: If the checkpoint cannot be found locally.
        RuntimeError: If keys are missing or unexpected (other than ``track_head.*`` and keys of
            disabled heads) or shapes differ.
        ValueError: If the file holds no tensor dict.

    Source: parameter layout of the reference implementation of VGGT (arXiv 2503.11651).
    """
    path = resolve_checkpoint(
        path_or_repo_id, filename, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir
    )
    sd = read_state_dict(path)
    prefixes = _ignored_prefixes(model)
    ignored = tuple(k for k in sd if k.startswith(prefixes))
    kept = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    del sd
    try:
        model.load_state_dict(kept, strict=True, assign=assign)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path} does not match the VGGT architecture: {exc}") from exc
    log.info("loaded VGGT weights from %s (%d tensors, %d ignored)", path, len(kept), len(ignored))
    return LoadedWeights(path=path, ignored_keys=ignored)


def build_vggt(
    preset: str | VGGTConfig = "vggt_1b",
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    filename: str | None = None,
    local_files_only: bool = True,
) -> VGGT:
    """Build a VGGT model in eval mode, optionally with weights, on ``device``.

    With weights, the model is first built on the ``meta`` device and the checkpoint tensors are
    assigned, so the 1.2e9 parameters are not allocated twice.

    Args:
        preset: ``"vggt_1b"``, ``"tiny"`` or a :class:`VGGTConfig`.
        weights: Checkpoint path, directory or Hugging Face repo id (see :func:`load_vggt_weights`);
            ``None`` keeps the random initialisation.
        device: Target device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        dtype: Dtype of the aggregator (trunk) parameters, e.g. ``torch.bfloat16`` on Ampere+ GPUs or
            ``torch.float16`` on older ones; ``None`` keeps float32. The heads always stay float32.
        filename: Checkpoint file name inside a repo/directory.
        local_files_only: Do not download (see :func:`resolve_checkpoint`).

    Returns:
        The model (``eval()`` mode).

    Raises:
        WeightsNotFoundError, RuntimeError, ValueError: As :func:`load_vggt_weights`; KeyError for an
            unknown preset name.
    """
    cfg = preset if isinstance(preset, VGGTConfig) else VGGTConfig.from_preset(preset)
    device = torch.device(device)
    if weights is None:
        with device:
            model = VGGT(cfg)
    else:
        with torch.device("meta"):
            model = VGGT(cfg)
        load_vggt_weights(model, weights, filename=filename, local_files_only=local_files_only, assign=True)
        model.to(device=device)
    model.set_trunk_dtype(dtype or torch.float32)
    return model.eval()
