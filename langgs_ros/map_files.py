"""Map files confined to one directory: what the node's ``~/save_map`` / ``~/load_map`` services and its autosave
may touch when any DDS peer can name a file.

:class:`MapDirectory` resolves a requested *name* relative to its root (the node's ``map_dir``, created on
demand). Unless ``allow_any_path`` is set it refuses absolute paths, ``~``, ``..`` components and names that lead
outside the root through symlinks (the check is made on the fully resolved path, so a symlink inside the root that
points inside it is fine). Names must end in ``.ply``. Independently of ``allow_any_path``:

- a save never overwrites a file that is not a langgs_ros map (a regular file whose PLY header carries the comments
  :func:`~langgs_ros.persistence.save_map` writes, see :func:`~langgs_ros.persistence.is_map_file`), and never
  deletes anything but the sidecars of that same map (save_map's cleanup checks each sidecar's name and metadata);
- a load reads at most ``max_file_bytes`` per file (checked before reading) and treats the files as untrusted
  (:func:`~langgs_ros.persistence.load_map`); with confinement on, the sidecar must resolve inside the root too.

Every refusal or failure raises :class:`MapFileError`, whose message is one line fit for a service response.
The checks are made when a request arrives; they protect against what a remote peer can name, not against a local
user who can create symlinks in the map directory between the check and the write.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from langgs_ros.persistence import (
    DEFAULT_MAX_MAP_BYTES,
    MapLoadError,
    is_map_file,
    load_map,
    save_map,
    sidecar_path,
)
from langgs_ros.safe_read import short
from langgs_ros.types import MapSnapshot

__all__ = ["DEFAULT_MAP_DIR", "MAX_NAME_CHARS", "MapDirectory", "MapFileError"]

DEFAULT_MAP_DIR = "~/.ros/langgs_maps"
"""Default map directory (``~`` expanded), beside ROS's own ``~/.ros`` logs."""
MAX_NAME_CHARS = 4096
"""Longest accepted map name (Linux ``PATH_MAX``)."""


class MapFileError(Exception):
    """A map file request was refused or failed; ``str(error)`` says why in one line (for service responses)."""


class MapDirectory:
    """Save and load maps by name inside a root directory.

    Args:
        root: the map directory (``~`` expanded; a relative root is relative to the working directory). Created,
            with its parents, on first use.
        allow_any_path: accept absolute paths, ``~``, ``..`` and symlinks leading outside ``root`` (trusted
            networks only). Relative names are still relative to ``root``; the overwrite protection still holds.
        max_file_bytes: size limit for loads, bytes, per file and for the sidecar's decompressed arrays (see
            :func:`~langgs_ros.persistence.load_map`); ``None`` = no limit.

    Raises:
        MapFileError: ``root`` is empty or ``max_file_bytes`` is not a positive integer.
    """

    def __init__(self, root: str | Path, allow_any_path: bool = False,
                 max_file_bytes: int | None = DEFAULT_MAX_MAP_BYTES) -> None:
        if not str(root).strip():
            raise MapFileError("map_dir is empty; set it to the directory that holds map files")
        if max_file_bytes is not None and (isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int)
                                           or max_file_bytes <= 0):
            raise MapFileError(f"the map file size limit must be a positive number of bytes, got {max_file_bytes!r}")
        self.root = Path(os.path.expanduser(str(root))).absolute()
        self.allow_any_path = bool(allow_any_path)
        self.max_file_bytes = max_file_bytes

    def __repr__(self) -> str:
        return f"MapDirectory({str(self.root)!r}, allow_any_path={self.allow_any_path})"

    # ------------------------------------------------------------------------------------------------ paths
    def real_root(self) -> Path:
        """The root with symlinks resolved, created (with parents) if missing.

        Raises:
            MapFileError: it cannot be created or is not a directory.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MapFileError(f"cannot create map directory {self.root}: {e.strerror or e}") from e
        real = Path(os.path.realpath(self.root))
        if not real.is_dir():
            raise MapFileError(f"map directory {self.root} is not a directory")
        return real

    def _inside(self, path: Path, root: Path) -> bool:
        return path != root and root in path.parents

    def resolve(self, name: str) -> Path:
        """The absolute, symlink-resolved path of map ``name``.

        Args:
            name: a path relative to the root ending in ``.ply`` (e.g. ``"office.ply"``, ``"site_a/floor2.ply"``);
                with ``allow_any_path`` also absolute or ``~`` paths.

        Raises:
            MapFileError: empty, too long or NUL-containing names; not ending in ``.ply``; without
                ``allow_any_path``: absolute or ``~`` names, ``..`` components, or a path that resolves outside the
                root (a symlink leading out); a name that resolves to the root itself.
        """
        if not isinstance(name, str) or not name.strip():
            raise MapFileError("empty map name")
        if len(name) > MAX_NAME_CHARS or "\x00" in name:
            raise MapFileError(f"map name refused: longer than {MAX_NAME_CHARS} characters or contains NUL")
        if not name.lower().endswith(".ply"):
            raise MapFileError(f"map name {short(name)} refused: map files end in .ply")
        root = self.real_root()
        if self.allow_any_path:
            p = Path(os.path.expanduser(name))
            return Path(os.path.realpath(p if p.is_absolute() else root / p))
        hint = f"names are relative to map_dir {self.root}; allow_any_path lifts this"
        raw = Path(name)
        if raw.is_absolute() or name.startswith("~"):
            raise MapFileError(f"map name {short(name)} refused: absolute paths are not allowed ({hint})")
        if ".." in raw.parts:
            raise MapFileError(f"map name {short(name)} refused: '..' is not allowed ({hint})")
        real = Path(os.path.realpath(root / raw))
        if not self._inside(real, root):
            raise MapFileError(f"map name {short(name)} refused: it leads outside map_dir through a symlink "
                               f"(to {short(str(real))}; {hint})")
        return real

    # ------------------------------------------------------------------------------------------------ save / load
    def save(self, snapshot: MapSnapshot, name: str) -> Path:
        """Save ``snapshot`` as map ``name`` (atomically, see :func:`~langgs_ros.persistence.save_map`).

        Subdirectories inside the root are created; outside it (``allow_any_path``) the directory must exist.

        Returns:
            The path written.

        Raises:
            MapFileError: the name is refused (:meth:`resolve`); the path exists and is not a langgs_ros map file
                (or not a regular file); the snapshot is invalid; writing failed (the previous map file, if any,
                is intact).
        """
        path = self.resolve(name)
        root = self.real_root()
        if os.path.lexists(path) and not is_map_file(path):
            raise MapFileError(f"refusing to overwrite {path}: it exists and is not a langgs_ros map file")
        try:
            if self._inside(path, root):
                path.parent.mkdir(parents=True, exist_ok=True)
            save_map(snapshot, path)
        except ValueError as e:
            raise MapFileError(f"map not saved, it is invalid: {e}") from e
        except OSError as e:
            raise MapFileError(f"cannot write {path}: {e.strerror or e}") from e
        return path

    def load(self, name: str, expected_encoder_id: str | None = None, expected_embedding_dim: int | None = None,
             device: torch.device | str = "cpu") -> MapSnapshot:
        """Load map ``name``, validated completely (see :func:`~langgs_ros.persistence.load_map`).

        Args:
            name: see :meth:`resolve`.
            expected_encoder_id: the query encoder's id; a map from another encoder is refused.
            expected_embedding_dim: the query encoder's dimension; a map of another dimension is refused.
            device: device of the returned tensors.

        Raises:
            MapFileError: the name is refused; the sidecar resolves outside the root (without ``allow_any_path``);
                any :class:`~langgs_ros.persistence.MapLoadError` (missing, too large, corrupt, crafted, other
                encoder), with its message.
        """
        path = self.resolve(name)
        try:
            if not self.allow_any_path:
                root = self.real_root()
                try:
                    side = Path(os.path.realpath(sidecar_path(path)))
                except MapLoadError:
                    side = None  # load_map reports what is wrong with the PLY
                if side is not None and not self._inside(side, root):
                    raise MapFileError(f"map {short(name)} refused: its sidecar leads outside map_dir through a "
                                       "symlink")
            return load_map(path, expected_encoder_id=expected_encoder_id, device=device,
                            expected_embedding_dim=expected_embedding_dim, max_bytes=self.max_file_bytes)
        except MapLoadError as e:
            raise MapFileError(str(e)) from e
