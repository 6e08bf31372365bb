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
finally deletes sidecars of earlier saves. The PLY rename is the single commit point: a reader follows the uuid in
the PLY header to its sidecar, so whenever a writer is killed a reader sees either the old complete map or the new
one (at worst an orphaned ``*.instances.npz`` of an unfinished save is left behind and removed by the next save).
A sidecar that does not belong to the PLY (uuid or checksum mismatch, e.g. files copied from different saves) is
refused on load with :class:`MapFormatError`. One writer per path at a time (the mapping node); readers may run
concurrently with it: :func:`load_map` reads the PLY once and retries if a save replaced it mid-load.

Loading validates everything (required properties, counts, dtypes, NaNs/infs, uuid, SHA-256, embedding
dimension, encoder) and either returns a complete snapshot or raises; it never returns partial data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from langgs_ros.types import Gaussians, InstanceTable, MapSnapshot

__all__ = [
    "C0",
    "FORMAT_VERSION",
    "OPACITY_EPS",
    "PLY_PROPERTIES",
    "SCALE_MIN",
    "STANDARD_3DGS_PROPERTIES",
    "EncoderMismatchError",
    "MapFormatError",
    "MapLoadError",
    "gaussians_to_vertex_array",
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


class MapLoadError(ValueError):
    """A map could not be loaded (base class of the specific errors below)."""


class MapFormatError(MapLoadError):
    """The files are missing, truncated, corrupt, inconsistent with each other, or not in this format."""


class EncoderMismatchError(MapLoadError):
    """The map's embeddings come from a different encoder than the caller expects."""


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
        MapFormatError: a field is missing, values are non-finite, or a quaternion has zero norm.
    """
    names = v.dtype.names or ()
    missing = [p for p in PLY_PROPERTIES if p not in names]
    if missing:
        raise MapFormatError(f"PLY vertex element lacks required properties {missing}")

    def col(name: str) -> np.ndarray:
        return np.asarray(v[name], dtype=np.float64)

    float_cols = {p: col(p) for p in PLY_PROPERTIES if p != "instance_id"}
    bad = [p for p, c in float_cols.items() if not np.isfinite(c).all()]
    if bad:
        raise MapFormatError(f"PLY contains NaN/inf values in properties {bad}")
    means = np.stack([float_cols[a] for a in "xyz"], axis=1)
    colors = 0.5 + C0 * np.stack([float_cols[f"f_dc_{i}"] for i in range(3)], axis=1)
    opac = 1.0 / (1.0 + np.exp(-float_cols["opacity"]))
    scales = np.exp(np.stack([float_cols[f"scale_{i}"] for i in range(3)], axis=1))
    quats = np.stack([float_cols[f"rot_{i}"] for i in range(4)], axis=1)
    qn = np.linalg.norm(quats, axis=1, keepdims=True)
    if (qn < 1e-12).any():
        raise MapFormatError("PLY contains zero-norm rotation quaternions")
    quats = quats / qn
    inst = np.asarray(v["instance_id"])
    if not np.issubdtype(inst.dtype, np.integer):
        raise MapFormatError(f"instance_id must be an integer property, got {inst.dtype}")
    if (inst < -1).any():
        raise MapFormatError("instance_id values must be >= -1")

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
    if n and (g.quats.norm(dim=-1) < 1e-12).any():
        raise ValueError("gaussians.quats contains zero quaternions")
    if n and (g.instance_ids < -1).any():
        raise ValueError("gaussians.instance_ids must be >= -1")
    k = len(inst)
    emb = inst.embeddings
    if emb.ndim != 2 or emb.shape[0] != k:
        raise ValueError(f"instances.embeddings must be (K={k}, D), got {tuple(emb.shape)}")
    if not torch.isfinite(emb).all():
        raise ValueError("instances.embeddings contains non-finite values")
    arrays = {"centers": (k, 3), "sizes": (k, 3), "yaws": (k,), "num_gaussians": (k,), "observations": (k,)}
    for name, shape in arrays.items():
        a = np.asarray(getattr(inst, name))
        if a.shape != shape:
            raise ValueError(f"instances.{name} must have shape {shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"instances.{name} contains non-finite values")
    ids = np.asarray(inst.ids)
    if ids.shape != (k,) or (ids < 0).any() or len(np.unique(ids)) != k:
        raise ValueError("instances.ids must be K unique ids >= 0")
    if len(inst.names) != k or not all(x is None or isinstance(x, str) for x in inst.names):
        raise ValueError("instances.names must be K strings or None")
    up = np.asarray(s.up, dtype=np.float64)
    cams = np.asarray(s.camera_positions, dtype=np.float64)
    if up.shape != (3,) or not np.isfinite(up).all():
        raise ValueError("up must be a finite 3-vector")
    if cams.ndim != 2 or cams.shape[1] != 3 or not np.isfinite(cams).all():
        raise ValueError("camera_positions must be a finite (P, 3) array")
    if not isinstance(s.encoder_id, str) or not s.encoder_id:
        raise ValueError("encoder_id must be a non-empty string")
    for name in ("stamp", "floor_height"):
        val = getattr(s, name)
        if val is not None and not np.isfinite(float(val)):
            raise ValueError(f"{name} must be finite")


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
    # Remove sidecars of earlier saves of this path (no PLY refers to them any more).
    for old in directory.glob(f"{path.name}.*.instances.npz"):
        if old != side_final:
            with contextlib.suppress(OSError):
                old.unlink()


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _read_header_ids(path: Path) -> tuple[str, int]:
    """(map_uuid, format_version) from the PLY header comments of the file at ``path``."""
    if not path.is_file():
        raise MapFormatError(f"map file not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise MapFormatError(f"cannot read {path}: {e}") from e
    return _parse_header_ids(head, path)


def _parse_header_ids(head: bytes, path: Path) -> tuple[str, int]:
    """(map_uuid, format_version) from the start of a PLY file's bytes."""
    end = head.find(b"end_header", 0, 1 << 16)
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
    if map_uuid is None or version is None or not all(c in "0123456789abcdef" for c in map_uuid):
        raise MapFormatError(f"{path} is not a langgs_ros map (no '{_UUID_COMMENT}'/'{_VERSION_COMMENT}' comments;"
                             " plain 3DGS PLYs lack the instance sidecar)")
    if version > FORMAT_VERSION:
        raise MapFormatError(f"{path} has format version {version}, this code reads <= {FORMAT_VERSION}")
    return map_uuid, version


def _load_sidecar(side: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not side.is_file():
        raise MapFormatError(f"instance sidecar missing: {side} (copy it together with the PLY)")
    keys = ("meta", "ids", "embeddings", "centers", "sizes", "yaws", "num_gaussians", "observations",
            "camera_positions", "up")
    try:
        with np.load(side, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise MapFormatError(f"sidecar {side} lacks arrays {missing}")
            arrays = {k: z[k] for k in keys}
        meta = json.loads(str(arrays.pop("meta")))
    except MapFormatError:
        raise
    except Exception as e:  # BadZipFile, EOFError, ValueError, JSONDecodeError, zlib errors, ...
        raise MapFormatError(f"sidecar {side} is unreadable or truncated: {e}") from e
    if not isinstance(meta, dict):
        raise MapFormatError(f"sidecar {side} has malformed metadata")
    return meta, arrays


def load_map(path: str | Path, expected_encoder_id: str | None = None,
             device: torch.device | str = "cpu") -> MapSnapshot:
    """Load a map written by :func:`save_map`, validating it completely.

    Args:
        path: the map's PLY path.
        expected_encoder_id: if given, the map's ``encoder_id`` must equal it (embeddings from another model would
            give meaningless query scores).
        device: device for the Gaussians' tensors and the embeddings.

    Returns:
        The snapshot (``gaussians.weights`` is ``None`` if it was ``None`` when saved).

    Raises:
        MapFormatError: missing/truncated/corrupt files, missing PLY properties, NaN/inf values, a sidecar from a
            different save (uuid or checksum mismatch), inconsistent counts or dimensions, a newer format version.
        EncoderMismatchError: ``expected_encoder_id`` differs from the map's encoder.
    """
    path = Path(path)
    # Read the PLY once (an open file keeps the inode, so a concurrent save cannot mix two versions); if a
    # concurrent save replaced the PLY and removed our sidecar in between, start again with the new pair.
    for attempt in range(3):
        if not path.is_file():
            raise MapFormatError(f"map file not found: {path}")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise MapFormatError(f"cannot read {path}: {e}") from e
        map_uuid, _ = _parse_header_ids(data, path)
        side = sidecar_path(path, map_uuid)
        try:
            meta, arr = _load_sidecar(side)
            break
        except MapFormatError:
            with contextlib.suppress(MapFormatError):
                if attempt < 2 and _read_header_ids(path)[0] != map_uuid:
                    continue
            raise

    required_meta = ("format_version", "map_uuid", "ply_sha256", "num_gaussians_total", "has_weights",
                     "encoder_id", "embedding_dim", "names", "frame_id", "floor_height", "stamp", "version")
    missing = [k for k in required_meta if k not in meta]
    if missing:
        raise MapFormatError(f"sidecar {side} metadata lacks {missing}")
    if meta["map_uuid"] != map_uuid:
        raise MapFormatError(f"sidecar {side} belongs to map {meta['map_uuid']}, PLY is map {map_uuid}")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise MapFormatError(f"sidecar format version {meta['format_version']} is newer than {FORMAT_VERSION}")
    if expected_encoder_id is not None and meta["encoder_id"] != expected_encoder_id:
        raise EncoderMismatchError(
            f"map {path} was built with encoder '{meta['encoder_id']}', but '{expected_encoder_id}' is in use; "
            "its embeddings are not comparable. Rebuild the map or load it with the same encoder.")

    if hashlib.sha256(data).hexdigest() != meta["ply_sha256"]:
        raise MapFormatError(f"{path} does not match its sidecar's checksum (file truncated, modified or corrupt)")
    try:
        ply = PlyData.read(io.BytesIO(data))
        vertex = ply["vertex"].data
    except Exception as e:  # PlyHeaderParseError, PlyElementParseError, KeyError, ValueError, ...
        raise MapFormatError(f"{path} is not a readable PLY with a 'vertex' element: {e}") from e
    if len(vertex) != int(meta["num_gaussians_total"]):
        raise MapFormatError(f"{path} has {len(vertex)} vertices, sidecar expects {meta['num_gaussians_total']}")
    gaussians = vertex_array_to_gaussians(vertex, has_weights=bool(meta["has_weights"]), device=device)

    ids = arr["ids"]
    k = ids.shape[0] if ids.ndim == 1 else -1
    dim = int(meta["embedding_dim"])
    emb = arr["embeddings"]
    expect = {"ids": (k,), "embeddings": (k, dim), "centers": (k, 3), "sizes": (k, 3), "yaws": (k,),
              "num_gaussians": (k,), "observations": (k,), "up": (3,)}
    for name, shape in expect.items():
        if k < 0 or arr[name].shape != shape:
            raise MapFormatError(f"sidecar array '{name}' has shape {arr[name].shape}, expected {shape}")
    cams = arr["camera_positions"]
    if cams.ndim != 2 or cams.shape[1] != 3:
        raise MapFormatError(f"sidecar camera_positions has shape {cams.shape}, expected (P, 3)")
    for name in ("embeddings", "centers", "sizes", "yaws", "observations", "camera_positions", "up"):
        if not np.isfinite(arr[name]).all():
            raise MapFormatError(f"sidecar array '{name}' contains NaN/inf values")
    names = meta["names"]
    if not isinstance(names, list) or len(names) != k or not all(x is None or isinstance(x, str) for x in names):
        raise MapFormatError("sidecar names must be a list of K strings/nulls")
    floor = meta["floor_height"]

    instances = InstanceTable(
        ids=ids.astype(np.int32), embeddings=torch.as_tensor(emb.astype(np.float32), device=device),
        names=list(names), centers=arr["centers"].astype(np.float64), sizes=arr["sizes"].astype(np.float64),
        yaws=arr["yaws"].astype(np.float64), num_gaussians=arr["num_gaussians"].astype(np.int64),
        observations=arr["observations"].astype(np.float64),
    )
    return MapSnapshot(
        gaussians=gaussians, instances=instances, encoder_id=str(meta["encoder_id"]),
        up=arr["up"].astype(np.float64), frame_id=str(meta["frame_id"]),
        camera_positions=cams.astype(np.float64), floor_height=None if floor is None else float(floor),
        stamp=float(meta["stamp"]), version=int(meta["version"]),
        scale_is_metric=bool(meta.get("scale_is_metric", True)), scale_source=str(meta.get("scale_source", "unknown")),
    )


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
