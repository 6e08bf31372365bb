"""Saving and loading semantic Gaussian maps (:class:`~langgs_ros.types.MapSnapshot`).

On disk a map is two files:

1. ``<name>.ply``: binary little-endian PLY (written with ``plyfile``) with one ``vertex`` element in the standard
   INRIA 3DGS layout (Kerbl et al., SIGGRAPH 2023; see ``shared/docs/conventions.md``), so 3DGS viewers open it::

       x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3
       instance_id weight

   all float32 except ``instance_id`` (int32); the two extras come last (viewers ignore them). Values are stored
   pre-activation (:func:`gaussians_to_vertex_array`): ``f_dc = (rgb - 0.5) / C0`` with ``C0 = 0.28209479177387814``;
   ``opacity = logit(clamp(alpha, 1e-6, 1 - 1e-6))`` (the clamp keeps the logit finite: alphas of exactly 0 or 1
   load back as 1e-6 / 1 - 1e-6); ``scale = ln(max(s, 1e-12 m))``; ``rot`` = quaternion w, x, y, z (normalised on
   load); normals are 0. ``weight`` is the fusion weight (0 when the snapshot had none, see ``has_weights`` below).
   The PLY header carries ``comment langgs_map_uuid <hex>`` and ``comment langgs_format_version <n>``.
2. ``<name>.ply.<map_uuid>.instances.npz``: the sidecar (numpy ``.npz``, no pickles) with the instance table —
   ``ids`` (K,) int32, ``embeddings`` (K, D) float32, ``centers``/``sizes`` (K, 3) float64, ``yaws``/``observations``
   (K,) float64, ``num_gaussians`` (K,) int64 — plus ``camera_positions`` (P, 3), ``up`` (3,) and ``meta``, a JSON
   string with names, encoder_id, embedding_dim, frame_id, floor_height, stamp, version, format_version, map_uuid,
   num_gaussians_total, has_weights, the PLY's SHA-256, and the map's scale_is_metric / scale_source (unposed maps:
   ``camera_height`` prior or ``none``; optional on load, older sidecars read as metric / ``unknown``).

Atomicity. :func:`save_map` writes both files to temporary files in the target directory (fsynced), then
``os.replace``-s the sidecar (a new name: the uuid is part of it), then the PLY, then fsyncs the directory and
finally deletes sidecars of earlier saves (only regular files named ``<name>.<32 hex>.instances.npz`` whose
metadata names that uuid: a neighbour that merely matches the pattern is never touched). The PLY rename is the
single commit point: a reader follows the uuid in the PLY header to its sidecar, so whenever a writer is killed a
reader sees either the old complete map or the new one (at worst an orphaned ``*.instances.npz`` of an unfinished
save is left behind and removed by the next save). A sidecar that does not belong to the PLY (uuid or checksum
mismatch, e.g. files copied from different saves) is refused on load with :class:`MapFormatError`. One writer per
path at a time (the mapping node); readers may run
concurrently with it: :func:`load_map` reads the PLY once and retries if a save replaced it mid-load.

Loading treats the files as untrusted (the node loads files named by any DDS peer). It validates everything
(required properties and their types, counts, dtypes and shapes, NaNs/infs and value ranges, metadata types, uuid,
SHA-256, embedding dimension, encoder, instance ids named by Gaussians) and either returns a complete snapshot
that :meth:`~langgs_ros.fusion.SemanticGaussianMap.from_snapshot` accepts or raises a :class:`MapLoadError`
subclass, never another exception and never partial data. Sizes are bounded before anything is read
(``max_bytes``, default :data:`DEFAULT_MAX_MAP_BYTES`): file sizes via ``fstat``, the sidecar's decompressed arrays
by their declared sizes and while inflating (:mod:`langgs_ros.safe_read`), the PLY body against its header's
element counts. :func:`save_map` refuses snapshots that load would refuse, so every saved map loads again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import scipy.special
import torch
from plyfile import PlyData, PlyElement

from langgs_ros.safe_read import (
    MAX_PLY_HEADER_BYTES,
    FileTooLargeError,
    PlyElementLayout,
    UnsafeFileError,
    clip,
    ply_binary_layout,
    ply_element_array,
    read_head,
    read_npz_arrays,
    read_regular_file,
    short,
)
from langgs_ros.sparsify import MAX_OCC_INSTANCE
from langgs_ros.types import NO_INSTANCE, Gaussians, InstanceTable, MapSnapshot

__all__ = [
    "C0",
    "DEFAULT_MAX_MAP_BYTES",
    "FORMAT_VERSION",
    "MAX_ABS_COORD",
    "MAX_LOG_SCALE",
    "OPACITY_EPS",
    "PLY_PROPERTIES",
    "SCALE_MIN",
    "STANDARD_3DGS_PROPERTIES",
    "EncoderMismatchError",
    "MapFormatError",
    "MapLoadError",
    "MapTooLargeError",
    "gaussians_to_vertex_array",
    "is_map_file",
    "load_map",
    "map_info",
    "save_map",
    "sidecar_path",
    "vertex_array_to_gaussians",
]

C0 = 0.28209479177387814
"""SH band-0 constant: ``rgb = 0.5 + C0 * f_dc``."""
OPACITY_EPS = 1e-6
"""Opacities are clamped to [OPACITY_EPS, 1 - OPACITY_EPS] before the logit."""
SCALE_MIN = 1e-12
"""Scales (metres) are clamped to >= SCALE_MIN before the log."""
FORMAT_VERSION = 1
"""Version of this on-disk layout (PLY extras + sidecar); newer versions are refused."""

STANDARD_3DGS_PROPERTIES: tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)
"""INRIA 3DGS vertex properties (SH degree 0), in file order."""
PLY_PROPERTIES: tuple[str, ...] = (*STANDARD_3DGS_PROPERTIES, "instance_id", "weight")
"""All vertex properties written, in file order."""
_VERTEX_DTYPE = np.dtype([(n, "<f4") for n in STANDARD_3DGS_PROPERTIES] + [("instance_id", "<i4"), ("weight", "<f4")])
_UUID_COMMENT = "langgs_map_uuid"
_VERSION_COMMENT = "langgs_format_version"
_UUID_RE = re.compile(r"[0-9a-f]{32}")
_PLY_FLOAT_TYPES = frozenset({"float", "float32", "double", "float64"})
_PLY_INT_TYPES = frozenset({"char", "int8", "uchar", "uint8", "short", "int16", "ushort", "uint16", "int", "int32",
                            "uint", "uint32"})

DEFAULT_MAX_MAP_BYTES = 1 << 30
"""Default size limit (bytes) of :func:`load_map`: 1 GiB per file and for the sidecar's decompressed arrays.
A PLY vertex takes 76 bytes, so this admits ~14 M Gaussians, 7x the node's default ``max_gaussians`` (2 M,
152 MB); the instance sidecar of a real map is a few MB."""
MAX_ABS_COORD = 1e5
"""Largest accepted |coordinate| in metres (means, centres, camera positions, floor height): at 100 km float32
positions are still spaced 7.8 mm, finer than the 2 cm base voxel; beyond that a map is not a robot's map."""
MAX_LOG_SCALE = math.log(1e4)
"""Largest accepted stored ``scale_i`` (log metres): Gaussians of more than 10 km are refused."""
MIN_LOG_SCALE = math.log(SCALE_MIN) - 1.0
"""Smallest accepted stored ``scale_i``: save_map clamps scales to SCALE_MIN (1e-12 m) before the log."""
MAX_STAMP = float(2**31 - 1)
"""Largest accepted map stamp (s): ``builtin_interfaces/Time.sec`` is an int32."""
MAX_WEIGHT = 1e15
"""Largest accepted fusion weight (accumulated merge mass; real maps stay many orders of magnitude below)."""
MAX_VERSION = 2**62
MAX_EMBEDDING_DIM = 1 << 16
MAX_EMBEDDING_VALUE = 1e6


class MapLoadError(ValueError):
    """A map could not be loaded (base class of the specific errors below)."""


class MapFormatError(MapLoadError):
    """The files are missing, truncated, corrupt, inconsistent with each other, or not in this format."""


class EncoderMismatchError(MapLoadError):
    """The map's embeddings come from a different encoder than the caller expects."""


class MapTooLargeError(MapFormatError):
    """A map file, or the decompressed content of its sidecar, exceeds the size limit (nothing was read)."""


# ----------------------------------------------------------------------------------------------------------------
# Activation <-> stored (pre-activation) values


def gaussians_to_vertex_array(g: Gaussians) -> np.ndarray:
    """Convert activated Gaussians to the PLY vertex record array (pre-activation values, see module docstring).

    Computed in float64 from the float32 inputs, then rounded once to float32.

    Args:
        g: N Gaussians (any device).

    Returns:
        (N,) structured array with fields :data:`PLY_PROPERTIES` (little-endian float32; ``instance_id`` int32).
    """
    n = len(g)
    means = g.means.detach().cpu().numpy().astype(np.float64)
    colors = g.colors.detach().cpu().numpy().astype(np.float64)
    alpha = np.clip(g.opacities.detach().cpu().numpy().astype(np.float64), OPACITY_EPS, 1.0 - OPACITY_EPS)
    scales = np.maximum(g.scales.detach().cpu().numpy().astype(np.float64), SCALE_MIN)
    quats = g.quats.detach().cpu().numpy().astype(np.float64)
    v = np.zeros(n, dtype=_VERTEX_DTYPE)
    for i, a in enumerate("xyz"):
        v[a] = means[:, i]
    f_dc = (colors - 0.5) / C0
    for i in range(3):
        v[f"f_dc_{i}"] = f_dc[:, i]
        v[f"scale_{i}"] = np.log(scales[:, i])
    v["opacity"] = np.log(alpha) - np.log1p(-alpha)
    for i in range(4):
        v[f"rot_{i}"] = quats[:, i]
    v["instance_id"] = g.instance_ids.detach().cpu().numpy().astype(np.int32)
    if g.weights is not None:
        v["weight"] = g.weights.detach().cpu().numpy().astype(np.float64)
    return v


def vertex_array_to_gaussians(v: np.ndarray, has_weights: bool = True, device: torch.device | str = "cpu"
                              ) -> Gaussians:
    """Inverse of :func:`gaussians_to_vertex_array`: activate stored values (float64 maths, float32 results).

    ``rgb = 0.5 + C0 f_dc`` (not clipped: values outside [0, 1] from other tools are kept), ``alpha =
    sigmoid(opacity)``, ``s = exp(scale)``, quaternion normalised (w, x, y, z).

    Raises:
        MapFormatError: a field is missing or of the wrong dtype (``instance_id`` integer, the others float),
            values are non-finite, coordinates beyond :data:`MAX_ABS_COORD`, ``scale_i`` outside
            [:data:`MIN_LOG_SCALE`, :data:`MAX_LOG_SCALE`], ``f_dc_i`` beyond ±1e6, a quaternion has zero norm,
            instance ids below -1 or beyond int32, or (``has_weights``) weights outside (0, :data:`MAX_WEIGHT`].
    """
    names = v.dtype.names or ()
    missing = [p for p in PLY_PROPERTIES if p not in names]
    if missing:
        raise MapFormatError(f"PLY vertex element lacks required properties {missing}")
    wrong = [f"{p}: {v.dtype[p]}" for p in PLY_PROPERTIES
             if v.dtype[p].kind not in ("iu" if p == "instance_id" else "f")]
    if wrong:
        raise MapFormatError(f"PLY vertex properties have wrong dtypes {wrong} (instance_id integer, others float)")

    def col(name: str) -> np.ndarray:
        return np.asarray(v[name], dtype=np.float64)

    float_cols = {p: col(p) for p in PLY_PROPERTIES if p != "instance_id"}
    bad = [p for p, c in float_cols.items() if not np.isfinite(c).all()]
    if bad:
        raise MapFormatError(f"PLY contains NaN/inf values in properties {bad}")
    n = len(v)

    def out_of(props: list[str], lo: float, hi: float) -> list[str]:
        return [p for p in props if n and (float_cols[p].min() < lo or float_cols[p].max() > hi)]

    ranges = (([*"xyz"], -MAX_ABS_COORD, MAX_ABS_COORD), ([f"scale_{i}" for i in range(3)], MIN_LOG_SCALE,
              MAX_LOG_SCALE), ([f"f_dc_{i}" for i in range(3)], -1e6, 1e6), ([f"rot_{i}" for i in range(4)], -1e6, 1e6))
    for props, lo, hi in ranges:
        bad = out_of(props, lo, hi)
        if bad:
            raise MapFormatError(f"PLY properties {bad} have values outside [{lo:g}, {hi:g}]")
    if has_weights and n and not ((float_cols["weight"] > 0) & (float_cols["weight"] <= MAX_WEIGHT)).all():
        raise MapFormatError(f"PLY 'weight' (fusion weight) must be in (0, {MAX_WEIGHT:g}] for every Gaussian")
    means = np.stack([float_cols[a] for a in "xyz"], axis=1)
    colors = 0.5 + C0 * np.stack([float_cols[f"f_dc_{i}"] for i in range(3)], axis=1)
    opac = scipy.special.expit(float_cols["opacity"])
    scales = np.exp(np.stack([float_cols[f"scale_{i}"] for i in range(3)], axis=1))
    quats = np.stack([float_cols[f"rot_{i}"] for i in range(4)], axis=1)
    qn = np.linalg.norm(quats, axis=1, keepdims=True)
    if (qn < 1e-12).any():
        raise MapFormatError("PLY contains zero-norm rotation quaternions")
    quats = quats / qn
    inst = np.asarray(v["instance_id"]).astype(np.int64)
    if n and (inst.min() < -1 or inst.max() > np.iinfo(np.int32).max):
        raise MapFormatError("instance_id values must be in [-1, 2^31 - 1]")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)

    return Gaussians(
        means=t(means), quats=t(quats), scales=t(scales), opacities=t(opac), colors=t(colors),
        instance_ids=torch.as_tensor(inst.astype(np.int32), device=device),
        weights=t(float_cols["weight"]) if has_weights else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Saving


def sidecar_path(path: str | Path, map_uuid: str | None = None) -> Path:
    """Sidecar file of the map at ``path``: ``<path>.<map_uuid>.instances.npz``.

    Args:
        path: the map's PLY path.
        map_uuid: the save's uuid (hex); read from the PLY header when ``None``.

    Raises:
        MapFormatError: ``map_uuid`` is ``None`` and the PLY is missing or has no langgs uuid comment.
    """
    path = Path(path)
    if map_uuid is None:
        map_uuid, _ = _read_header_ids(path)
    return path.with_name(f"{path.name}.{map_uuid}.instances.npz")


def _validate_snapshot(s: MapSnapshot) -> None:
    """Refuse (ValueError) a snapshot that :func:`load_map` would refuse once saved, so every save round-trips."""
    g, inst = s.gaussians, s.instances
    n = len(g)
    shapes = {"means": (n, 3), "quats": (n, 4), "scales": (n, 3), "opacities": (n,), "colors": (n, 3),
              "instance_ids": (n,)}
    for name, shape in shapes.items():
        t = getattr(g, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"gaussians.{name} must have shape {shape}, got {tuple(t.shape)}")
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"gaussians.{name} contains non-finite values")
    if g.weights is not None and (tuple(g.weights.shape) != (n,) or not torch.isfinite(g.weights).all()):
        raise ValueError("gaussians.weights must be a finite (N,) tensor")
    if n:
        if g.means.abs().max() > MAX_ABS_COORD:
            raise ValueError(f"gaussians.means has coordinates beyond ±{MAX_ABS_COORD:g} m")
        if g.scales.max() > math.exp(MAX_LOG_SCALE):
            raise ValueError(f"gaussians.scales has values over {math.exp(MAX_LOG_SCALE):g} m")
        if (g.colors - 0.5).abs().max() > 1e6 * C0 or g.quats.abs().max() > 1e6:
            raise ValueError("gaussians.colors / quats have absurd magnitudes (> 1e5)")
        if (g.quats.norm(dim=-1) < 1e-12).any():
            raise ValueError("gaussians.quats contains zero quaternions")
        if (g.instance_ids < -1).any():
            raise ValueError("gaussians.instance_ids must be >= -1")
        if g.weights is not None and not ((g.weights > 0) & (g.weights <= MAX_WEIGHT)).all():
            raise ValueError(f"gaussians.weights must be in (0, {MAX_WEIGHT:g}]")
    k = len(inst)
    emb = inst.embeddings
    if emb.ndim != 2 or emb.shape[0] != k or not 1 <= emb.shape[1] <= MAX_EMBEDDING_DIM:
        raise ValueError(f"instances.embeddings must be (K={k}, D >= 1), got {tuple(emb.shape)}")
    if not torch.isfinite(emb).all() or (k and emb.abs().max() > MAX_EMBEDDING_VALUE):
        raise ValueError("instances.embeddings contains non-finite or absurd values")
    if k and (emb.float().norm(dim=1) < 1e-12).any():
        raise ValueError("instances.embeddings has zero rows")
    arrays = {"centers": ((k, 3), MAX_ABS_COORD, None), "sizes": ((k, 3), 2 * MAX_ABS_COORD, 0.0),
              "yaws": ((k,), MAX_ABS_COORD, None), "num_gaussians": ((k,), None, 0.0),
              "observations": ((k,), None, 0.0)}
    for name, (shape, bound, lo) in arrays.items():
        a = np.asarray(getattr(inst, name))
        if a.shape != shape:
            raise ValueError(f"instances.{name} must have shape {shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"instances.{name} contains non-finite values")
        if a.size and ((bound is not None and np.abs(a).max() > bound) or (lo is not None and a.min() < lo)):
            raise ValueError(f"instances.{name} has values out of range")
    ids = np.asarray(inst.ids)
    if ids.shape != (k,) or (k and (ids.min() < 0 or ids.max() > MAX_OCC_INSTANCE)) or len(np.unique(ids)) != k:
        raise ValueError(f"instances.ids must be K unique ids in [0, {MAX_OCC_INSTANCE}]")
    if n:
        used = np.unique(g.instance_ids.cpu().numpy().astype(np.int64))
        unknown = np.setdiff1d(used[used != NO_INSTANCE], ids.astype(np.int64))
        if unknown.size:
            raise ValueError(f"gaussians reference instance ids missing from the table: {unknown[:5].tolist()}")
    if len(inst.names) != k or not all(x is None or isinstance(x, str) for x in inst.names):
        raise ValueError("instances.names must be K strings or None")
    up = np.asarray(s.up, dtype=np.float64)
    cams = np.asarray(s.camera_positions, dtype=np.float64)
    if up.shape != (3,) or not np.isfinite(up).all() or np.linalg.norm(up) < 1e-9:
        raise ValueError("up must be a finite non-zero 3-vector")
    if cams.ndim != 2 or cams.shape[1] != 3 or not np.isfinite(cams).all() or \
            (cams.size and np.abs(cams).max() > MAX_ABS_COORD):
        raise ValueError(f"camera_positions must be a finite (P, 3) array within ±{MAX_ABS_COORD:g} m")
    if not isinstance(s.encoder_id, str) or not s.encoder_id:
        raise ValueError("encoder_id must be a non-empty string")
    if not isinstance(s.frame_id, str) or not s.frame_id:
        raise ValueError("frame_id must be a non-empty string")
    if not (np.isfinite(float(s.stamp)) and 0.0 <= float(s.stamp) <= MAX_STAMP):
        raise ValueError(f"stamp must be in [0, {MAX_STAMP:g}] s")
    if s.floor_height is not None and not (np.isfinite(float(s.floor_height))
                                           and abs(float(s.floor_height)) <= MAX_ABS_COORD):
        raise ValueError("floor_height must be finite and within the coordinate bound")
    if not 0 <= int(s.version) <= MAX_VERSION:
        raise ValueError("version must be >= 0")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(directory: Path, prefix: str, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{prefix}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(AttributeError, OSError):  # mkstemp makes 0600; maps are ordinary files
                os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return Path(name)


def save_map(snapshot: MapSnapshot, path: str | Path) -> None:
    """Write ``snapshot`` atomically as ``path`` (3DGS PLY) plus its instance sidecar (see module docstring).

    Args:
        snapshot: the map to save (tensors on any device; they are copied to the CPU).
        path: PLY path (``.ply`` suggested); its directory must exist.

    Raises:
        ValueError: the snapshot is malformed (shapes, NaNs, duplicate ids, ...); nothing is written.
        FileNotFoundError: the directory does not exist.
        OSError: writing failed; the previously saved map (if any) is left intact.
    """
    _validate_snapshot(snapshot)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"directory of the map path does not exist: {directory}")
    map_uuid = uuid.uuid4().hex

    vertex = gaussians_to_vertex_array(snapshot.gaussians)
    ply = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<",
                  comments=[f"{_UUID_COMMENT} {map_uuid}", f"{_VERSION_COMMENT} {FORMAT_VERSION}",
                            "langgs_ros semantic Gaussian map (INRIA 3DGS layout + instance_id, weight)"])
    buf = io.BytesIO()
    ply.write(buf)
    ply_bytes = buf.getvalue()

    inst = snapshot.instances
    meta = {
        "format_version": FORMAT_VERSION,
        "map_uuid": map_uuid,
        "ply_sha256": hashlib.sha256(ply_bytes).hexdigest(),
        "num_gaussians_total": len(snapshot.gaussians),
        "has_weights": snapshot.gaussians.weights is not None,
        "encoder_id": snapshot.encoder_id,
        "embedding_dim": int(inst.embeddings.shape[1]),
        "names": list(inst.names),
        "frame_id": snapshot.frame_id,
        "floor_height": None if snapshot.floor_height is None else float(snapshot.floor_height),
        "stamp": float(snapshot.stamp),
        "version": int(snapshot.version),
        "scale_is_metric": bool(snapshot.scale_is_metric),
        "scale_source": str(snapshot.scale_source),
    }
    side = io.BytesIO()
    np.savez(
        side,
        meta=np.array(json.dumps(meta)),
        ids=np.asarray(inst.ids, dtype=np.int32),
        embeddings=inst.embeddings.detach().cpu().numpy().astype(np.float32),
        centers=np.asarray(inst.centers, dtype=np.float64),
        sizes=np.asarray(inst.sizes, dtype=np.float64),
        yaws=np.asarray(inst.yaws, dtype=np.float64),
        num_gaussians=np.asarray(inst.num_gaussians, dtype=np.int64),
        observations=np.asarray(inst.observations, dtype=np.float64),
        camera_positions=np.asarray(snapshot.camera_positions, dtype=np.float64).reshape(-1, 3),
        up=np.asarray(snapshot.up, dtype=np.float64),
    )

    side_final = sidecar_path(path, map_uuid)
    tmp_side = tmp_ply = None
    try:
        tmp_side = _write_temp(directory, side_final.name, side.getvalue())
        tmp_ply = _write_temp(directory, path.name, ply_bytes)
        os.replace(tmp_side, side_final)
        tmp_side = None
        os.replace(tmp_ply, path)  # commit point
        tmp_ply = None
    except BaseException:
        for t in (tmp_side, tmp_ply):
            if t is not None:
                with contextlib.suppress(OSError):
                    os.unlink(t)
        # The new sidecar (if it was renamed) is not referenced by any PLY: remove it.
        if tmp_side is None and tmp_ply is not None:
            with contextlib.suppress(OSError):
                os.unlink(side_final)
        raise
    _fsync_dir(directory)
    # Remove sidecars of earlier (or unfinished) saves of this path: no PLY refers to them any more. Only files that
    # are provably such sidecars are deleted (see _is_own_sidecar); any other neighbour is left alone.
    for old in directory.glob(f"{glob_escape(path.name)}.*.instances.npz"):
        if old != side_final and _is_own_sidecar(old, path.name):
            with contextlib.suppress(OSError):
                old.unlink()


def glob_escape(name: str) -> str:
    """``name`` with the glob metacharacters ``*?[`` escaped (a map named ``a[1].ply`` must match itself only)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _is_own_sidecar(candidate: Path, ply_name: str) -> bool:
    """Whether ``candidate`` is a sidecar that :func:`save_map` wrote for the PLY named ``ply_name``.

    True only for a regular file (not a symlink) named ``<ply_name>.<32 hex>.instances.npz`` whose metadata (read
    with the default size limit) is a save_map sidecar naming the same uuid. Never raises.
    """
    prefix, suffix = f"{ply_name}.", ".instances.npz"
    name = candidate.name
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return False
    file_uuid = name[len(prefix): len(name) - len(suffix)]
    if not _UUID_RE.fullmatch(file_uuid):
        return False
    try:
        if not stat.S_ISREG(os.lstat(candidate).st_mode):
            return False
        data = read_regular_file(candidate, DEFAULT_MAX_MAP_BYTES, "sidecar")
        m = read_npz_arrays(data, ("meta",), DEFAULT_MAX_MAP_BYTES)["meta"]
        meta = json.loads(str(m[()])) if m.shape == () and m.dtype.kind == "U" else None
    except (OSError, UnsafeFileError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("map_uuid") == file_uuid and "ply_sha256" in meta


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _read_header_ids(path: Path) -> tuple[str, int]:
    """(map_uuid, format_version) from the PLY header comments of the file at ``path`` (reads its first 64 KiB)."""
    try:
        head = read_head(path, MAX_PLY_HEADER_BYTES, "map file")
    except FileNotFoundError as e:
        raise MapFormatError(f"map file not found: {path}") from e
    except UnsafeFileError as e:
        raise MapFormatError(str(e)) from e
    return _parse_header_ids(head, path)


def is_map_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file whose PLY header carries the comments :func:`save_map` writes.

    Reads at most the first 64 KiB; never raises for any file (missing, directory, FIFO, unreadable: ``False``).
    """
    try:
        _read_header_ids(Path(path))
    except MapFormatError:
        return False
    return True


def _parse_header_ids(head: bytes | bytearray, path: Path) -> tuple[str, int]:
    """(map_uuid, format_version) from the start of a PLY file's bytes."""
    end = head.find(b"end_header", 0, MAX_PLY_HEADER_BYTES)
    if not head.startswith(b"ply") or end < 0:
        raise MapFormatError(f"{path} is not a PLY file (no 'ply' magic / 'end_header')")
    map_uuid, version = None, None
    for line in head[:end].decode("ascii", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "comment" and parts[1] == _UUID_COMMENT:
            map_uuid = parts[2]
        elif len(parts) == 3 and parts[0] == "comment" and parts[1] == _VERSION_COMMENT:
            with contextlib.suppress(ValueError):
                version = int(parts[2])
    if map_uuid is None or version is None or not _UUID_RE.fullmatch(map_uuid):
        raise MapFormatError(f"{path} is not a langgs_ros map (no '{_UUID_COMMENT}'/'{_VERSION_COMMENT}' comments;"
                             " plain 3DGS PLYs lack the instance sidecar)")
    if not 1 <= version <= FORMAT_VERSION:
        raise MapFormatError(f"{path} has format version {version}, this code reads 1..{FORMAT_VERSION}")
    return map_uuid, version


def _read_file(path: Path, max_bytes: int | None, what: str, missing: str) -> bytearray:
    """:func:`read_regular_file` with its errors as :class:`MapLoadError` subclasses."""
    try:
        return read_regular_file(path, max_bytes, what)
    except FileNotFoundError as e:
        raise MapFormatError(missing) from e
    except FileTooLargeError as e:
        raise MapTooLargeError(str(e)) from e
    except UnsafeFileError as e:
        raise MapFormatError(str(e)) from e


_SIDECAR_ARRAYS = ("meta", "ids", "embeddings", "centers", "sizes", "yaws", "num_gaussians", "observations",
                   "camera_positions", "up")


def _load_sidecar(side: Path, max_bytes: int | None = DEFAULT_MAX_MAP_BYTES
                  ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, arrays) of a sidecar, read with the size limit on the file and on its decompressed arrays."""
    data = _read_file(side, max_bytes, "sidecar",
                      missing=f"instance sidecar missing: {side} (copy it together with the PLY)")
    try:
        arrays = read_npz_arrays(data, _SIDECAR_ARRAYS, max_bytes, what=f"sidecar {side}")
    except FileTooLargeError as e:
        raise MapTooLargeError(str(e)) from e
    except UnsafeFileError as e:
        raise MapFormatError(f"{e} (sidecar unreadable, truncated or not written by save_map)") from e
    m = arrays.pop("meta")
    if m.shape != () or m.dtype.kind != "U":
        raise MapFormatError(f"sidecar {side}: 'meta' must be a JSON string, got {m.dtype} {m.shape}")
    try:
        meta = json.loads(str(m[()]))
    except (ValueError, RecursionError) as e:
        raise MapFormatError(f"sidecar {side} has malformed JSON metadata: {clip(str(e))}") from e
    if not isinstance(meta, dict):
        raise MapFormatError(f"sidecar {side} has malformed metadata (not a JSON object)")
    return meta, arrays


# Meta fields: checks by kind. Numbers must be JSON numbers (bool excluded), strings JSON strings.
def _meta_int(meta: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MapFormatError(f"sidecar metadata '{key}' must be an integer in [{lo}, {hi}], got {short(v)}")
    return v


def _meta_float(meta: dict[str, Any], key: str, lo: float, hi: float, allow_none: bool = False) -> float | None:
    v = meta[key]
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        kind = "a finite number" + (" or null" if allow_none else "")
        raise MapFormatError(f"sidecar metadata '{key}' must be {kind} in [{lo:g}, {hi:g}], got {short(v)}")
    return float(v)


def _meta_str(meta: dict[str, Any], key: str, nonempty: bool = True) -> str:
    v = meta[key]
    if not isinstance(v, str) or (nonempty and not v):
        raise MapFormatError(f"sidecar metadata '{key}' must be a {'non-empty ' if nonempty else ''}string, "
                             f"got {short(v)}")
    return v


def _array(arr: dict[str, np.ndarray], name: str, kinds: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """Sidecar array ``name`` checked for dtype kind (numpy ``kind`` letters) and shape (``None`` = any)."""
    a = arr[name]
    if a.dtype.kind not in kinds:
        want = {"f": "a float", "iu": "an integer"}.get(kinds, kinds)
        raise MapFormatError(f"sidecar array '{name}' must have {want} dtype, got {a.dtype}")
    if a.ndim != len(shape) or any(s is not None and d != s for d, s in zip(a.shape, shape)):
        expect = tuple("P" if s is None else s for s in shape)
        raise MapFormatError(f"sidecar array '{name}' has shape {a.shape}, expected {expect}")
    return a


def _finite(a: np.ndarray, name: str, bound: float | None = None, lo: float | None = None) -> np.ndarray:
    """``a`` as float64, refusing NaN/inf, values beyond ``±bound`` and values below ``lo``."""
    x = a.astype(np.float64)
    if not np.isfinite(x).all():
        raise MapFormatError(f"sidecar array '{name}' contains NaN/inf values")
    if bound is not None and x.size and np.abs(x).max() > bound:
        raise MapFormatError(f"sidecar array '{name}' has values beyond ±{bound:g}")
    if lo is not None and x.size and x.min() < lo:
        raise MapFormatError(f"sidecar array '{name}' has values below {lo:g}")
    return x


def _check_ply_layout(data: bytearray, path: Path) -> tuple[str, PlyElementLayout]:
    """(format, vertex element layout), after checking the PLY's layout against what :func:`save_map` writes."""
    try:
        fmt, elements, _ = ply_binary_layout(data, what=str(path))
    except UnsafeFileError as e:
        raise MapFormatError(str(e)) from e
    vertex = [e for e in elements if e.name == "vertex"]
    if len(vertex) != 1:
        raise MapFormatError(f"{path} must have exactly one 'vertex' element, has {len(vertex)}")
    types = dict(vertex[0].properties)
    missing = [p for p in PLY_PROPERTIES if p not in types]
    if missing:
        raise MapFormatError(f"PLY vertex element lacks required properties {missing}")
    bad = [f"{p}: {types[p]}" for p in PLY_PROPERTIES
           if types[p] not in (_PLY_INT_TYPES if p == "instance_id" else _PLY_FLOAT_TYPES)]
    if bad:
        raise MapFormatError(f"PLY vertex properties have wrong types {bad} (instance_id: an integer type, the "
                             "others float or double)")
    return fmt, vertex[0]


def _snapshot_from_files(path: Path, data: bytearray, map_uuid: str, side: Path, meta: dict[str, Any],
                         arr: dict[str, np.ndarray], expected_encoder_id: str | None,
                         expected_embedding_dim: int | None, device: torch.device | str) -> MapSnapshot:
    """Validate the PLY bytes and the sidecar's content against each other and build the snapshot."""
    required_meta = ("format_version", "map_uuid", "ply_sha256", "num_gaussians_total", "has_weights",
                     "encoder_id", "embedding_dim", "names", "frame_id", "floor_height", "stamp", "version")
    missing = [k for k in required_meta if k not in meta]
    if missing:
        raise MapFormatError(f"sidecar {side} metadata lacks {missing}")
    if meta["map_uuid"] != map_uuid:
        raise MapFormatError(f"sidecar {side} belongs to map {short(meta['map_uuid'])}, PLY is map {map_uuid}")
    if isinstance(meta["format_version"], int) and not isinstance(meta["format_version"], bool) \
            and meta["format_version"] > FORMAT_VERSION:
        raise MapFormatError(f"sidecar format version {meta['format_version']} is newer than {FORMAT_VERSION}")
    _meta_int(meta, "format_version", 1, FORMAT_VERSION)
    encoder_id = _meta_str(meta, "encoder_id")
    if expected_encoder_id is not None and encoder_id != expected_encoder_id:
        raise EncoderMismatchError(
            f"map {path} was built with encoder {short(encoder_id)}, but '{expected_encoder_id}' is in use; "
            "its embeddings are not comparable. Rebuild the map or load it with the same encoder.")
    dim = _meta_int(meta, "embedding_dim", 1, MAX_EMBEDDING_DIM)
    if expected_embedding_dim is not None and dim != expected_embedding_dim:
        raise EncoderMismatchError(f"map {path} has {dim}-d embeddings, the encoder in use makes "
                                   f"{expected_embedding_dim}-d ones")
    sha = meta["ply_sha256"]
    if not isinstance(sha, str) or hashlib.sha256(data).hexdigest() != sha:
        raise MapFormatError(f"{path} does not match its sidecar's checksum (file truncated, modified or corrupt)")
    n_total = _meta_int(meta, "num_gaussians_total", 0, len(data))
    has_weights = meta["has_weights"]
    if not isinstance(has_weights, bool):
        raise MapFormatError(f"sidecar metadata 'has_weights' must be true or false, got {short(has_weights)}")
    frame_id = _meta_str(meta, "frame_id")
    floor = _meta_float(meta, "floor_height", -MAX_ABS_COORD, MAX_ABS_COORD, allow_none=True)
    stamp = _meta_float(meta, "stamp", 0.0, MAX_STAMP)
    version = _meta_int(meta, "version", 0, MAX_VERSION)
    scale_is_metric = meta.get("scale_is_metric", True)  # older maps: metric (posed RGB-D)
    if not isinstance(scale_is_metric, bool):
        raise MapFormatError(f"sidecar metadata 'scale_is_metric' must be true or false, got {short(scale_is_metric)}")
    scale_source = meta.get("scale_source", "unknown")
    if not isinstance(scale_source, str) or len(scale_source) > 200:
        raise MapFormatError(f"sidecar metadata 'scale_source' must be a short string, got {short(scale_source)}")

    fmt, layout = _check_ply_layout(data, path)
    if layout.count != n_total:
        raise MapFormatError(f"{path} has {layout.count} vertices, sidecar expects {n_total}")
    vertex = ply_element_array(data, fmt, layout)  # the layout was checked against the bytes present
    gaussians = vertex_array_to_gaussians(vertex, has_weights=has_weights, device=device)

    ids_a = _array(arr, "ids", "iu", (None,))
    k = ids_a.shape[0]
    ids64 = ids_a.astype(np.int64)
    if k and (ids64.min() < 0 or ids64.max() > MAX_OCC_INSTANCE):
        raise MapFormatError(f"sidecar instance ids must be in [0, {MAX_OCC_INSTANCE}]")
    if len(np.unique(ids64)) != k:
        raise MapFormatError("sidecar instance ids are not unique")
    emb = _finite(_array(arr, "embeddings", "f", (k, dim)), "embeddings", bound=MAX_EMBEDDING_VALUE)
    if k and (np.linalg.norm(emb, axis=1) < 1e-12).any():
        raise MapFormatError("sidecar array 'embeddings' has zero rows (an embedding must have a direction)")
    centers = _finite(_array(arr, "centers", "f", (k, 3)), "centers", bound=MAX_ABS_COORD)
    sizes = _finite(_array(arr, "sizes", "f", (k, 3)), "sizes", bound=2 * MAX_ABS_COORD, lo=0.0)
    yaws = _finite(_array(arr, "yaws", "f", (k,)), "yaws", bound=MAX_ABS_COORD)
    num_g = _array(arr, "num_gaussians", "iu", (k,))
    if k and (num_g.astype(np.float64).min() < 0 or num_g.astype(np.float64).max() > 2**62):
        raise MapFormatError("sidecar array 'num_gaussians' must be counts >= 0")
    observations = _finite(_array(arr, "observations", "f", (k,)), "observations", lo=0.0)
    cams = _finite(_array(arr, "camera_positions", "f", (None, 3)), "camera_positions", bound=MAX_ABS_COORD)
    up = _finite(_array(arr, "up", "f", (3,)), "up")
    if np.linalg.norm(up) < 1e-9:
        raise MapFormatError("sidecar array 'up' is the zero vector")
    names = meta["names"]
    if not isinstance(names, list) or len(names) != k or not all(x is None or isinstance(x, str) for x in names):
        raise MapFormatError(f"sidecar names must be a list of {k} strings/nulls")
    used = np.unique(gaussians.instance_ids.cpu().numpy().astype(np.int64))
    unknown = np.setdiff1d(used[used != NO_INSTANCE], ids64)
    if unknown.size:
        raise MapFormatError(f"PLY Gaussians name {unknown.size} instance id(s) missing from the sidecar's table, "
                             f"e.g. {unknown[:5].tolist()}")

    instances = InstanceTable(
        ids=ids64.astype(np.int32), embeddings=torch.as_tensor(emb.astype(np.float32), device=device),
        names=list(names), centers=centers, sizes=sizes, yaws=yaws, num_gaussians=num_g.astype(np.int64),
        observations=observations,
    )
    return MapSnapshot(
        gaussians=gaussians, instances=instances, encoder_id=encoder_id, up=up, frame_id=frame_id,
        camera_positions=cams, floor_height=floor, stamp=float(stamp), version=version,
        scale_is_metric=scale_is_metric, scale_source=scale_source,
    )


def load_map(path: str | Path, expected_encoder_id: str | None = None, device: torch.device | str = "cpu", *,
             expected_embedding_dim: int | None = None, max_bytes: int | None = DEFAULT_MAX_MAP_BYTES
             ) -> MapSnapshot:
    """Load a map written by :func:`save_map`, validating it completely; safe on untrusted files.

    Whatever the files contain, this returns a complete snapshot that
    :meth:`~langgs_ros.fusion.SemanticGaussianMap.from_snapshot` accepts, or raises a :class:`MapLoadError`
    subclass (never another exception type, never partial data). Sizes are checked before reading: the PLY and the
    sidecar each, and the sidecar's decompressed arrays together, may hold at most ``max_bytes`` bytes.

    Args:
        path: the map's PLY path.
        expected_encoder_id: if given, the map's ``encoder_id`` must equal it (embeddings from another model would
            give meaningless query scores).
        device: device for the Gaussians' tensors and the embeddings.
        expected_embedding_dim: if given, the map's embedding dimension must equal it (the query encoder's).
        max_bytes: size limit in bytes (see above); ``None`` = no limit. Default :data:`DEFAULT_MAX_MAP_BYTES`.

    Returns:
        The snapshot (``gaussians.weights`` is ``None`` if it was ``None`` when saved).

    Raises:
        MapTooLargeError: a file, or the sidecar's decompressed content, exceeds ``max_bytes``.
        MapFormatError: missing/truncated/corrupt/non-regular files; a PLY that is not binary, has a body of the
            wrong length, lacks properties or has wrong property types; NaN/inf or out-of-range values (see
            :data:`MAX_ABS_COORD`, :data:`MAX_LOG_SCALE`); metadata fields missing, null or of the wrong type;
            arrays of the wrong dtype or shape; duplicate or out-of-range instance ids; Gaussians naming instance
            ids missing from the table; a sidecar from a different save (uuid or checksum mismatch); inconsistent
            counts; a newer format version.
        EncoderMismatchError: ``expected_encoder_id`` or ``expected_embedding_dim`` differs from the map's.
    """
    path = Path(path)
    # Read the PLY once (an open file keeps the inode, so a concurrent save cannot mix two versions); if a
    # concurrent save replaced the PLY and removed our sidecar in between, start again with the new pair.
    for attempt in range(3):
        data = _read_file(path, max_bytes, "map file", missing=f"map file not found: {path}")
        map_uuid, _ = _parse_header_ids(data, path)
        side = sidecar_path(path, map_uuid)
        try:
            meta, arr = _load_sidecar(side, max_bytes)
            break
        except MapFormatError:
            with contextlib.suppress(MapLoadError):
                if attempt < 2 and _read_header_ids(path)[0] != map_uuid:
                    continue
            raise
    try:
        return _snapshot_from_files(path, data, map_uuid, side, meta, arr, expected_encoder_id,
                                    expected_embedding_dim, device)
    except MapLoadError:
        raise
    except Exception as e:  # defence in depth: a case the checks above missed must still be a MapLoadError
        raise MapFormatError(f"{path}: invalid map data ({type(e).__name__}: {clip(str(e))})") from e


def map_info(path: str | Path) -> dict[str, Any]:
    """Summary of a saved map for ``langgs info`` (loads and validates it fully).

    Returns:
        dict with ``path``, ``sidecar``, ``map_uuid``, ``format_version``, ``num_gaussians``, ``num_labelled``
        (Gaussians with an instance), ``num_instances``, ``bounds_min``/``bounds_max`` (3 floats, metres, map frame;
        ``None`` for an empty map), ``encoder_id``, ``embedding_dim``, ``frame_id``, ``up``, ``floor_height``,
        ``stamp``, ``version``, ``num_camera_positions``, ``instances`` (list of ``{"id", "name",
        "num_gaussians", "center"}``), ``file_bytes`` (PLY + sidecar).

    Raises:
        MapFormatError, as :func:`load_map`.
    """
    path = Path(path)
    map_uuid, version = _read_header_ids(path)
    snap = load_map(path)
    side = sidecar_path(path, map_uuid)
    means = snap.gaussians.means.numpy()
    inst = snap.instances
    return {
        "path": str(path),
        "sidecar": str(side),
        "map_uuid": map_uuid,
        "format_version": version,
        "num_gaussians": len(snap.gaussians),
        "num_labelled": int((snap.gaussians.instance_ids >= 0).sum()),
        "num_instances": len(inst),
        "bounds_min": means.min(axis=0).tolist() if len(means) else None,
        "bounds_max": means.max(axis=0).tolist() if len(means) else None,
        "encoder_id": snap.encoder_id,
        "embedding_dim": int(inst.embeddings.shape[1]),
        "frame_id": snap.frame_id,
        "up": snap.up.tolist(),
        "floor_height": snap.floor_height,
        "stamp": snap.stamp,
        "version": snap.version,
        "num_camera_positions": int(snap.camera_positions.shape[0]),
        "instances": [
            {"id": int(i), "name": n, "num_gaussians": int(c), "center": ctr.tolist()}
            for i, n, c, ctr in zip(inst.ids, inst.names, inst.num_gaussians, inst.centers)
        ],
        "file_bytes": path.stat().st_size + side.stat().st_size,
    }
