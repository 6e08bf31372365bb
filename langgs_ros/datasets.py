"""Readers for RGB-D folders: the hololens layout, the TUM RGB-D layout, and plain image folders.

Layouts (detected by :func:`open_sequence`):

- **hololens** (``../shared/data/hololens_office``): ``images/NNNNN.png|jpg`` colour, ``depth/NNNNN.png`` uint16
  millimetres (0 = invalid), ``K.txt`` (3x3 intrinsics, pixels), ``poses.txt`` (one row-major 4x4
  camera-to-world pose per line, OpenCV optical axes), optional ``frames.txt`` (image name per pose line),
  optional ``annotations/labels/<name>.png`` (uint16 label ids) + ``annotations/objects.json`` (ids, names,
  synonyms, ``up``).
- **tum** (TUM RGB-D benchmark): ``rgb.txt`` / ``depth.txt`` (``timestamp path`` lines), ``rgb/``, ``depth/``
  (uint16, 5000 units per metre), optional ``groundtruth.txt`` (``t tx ty tz qx qy qz qw``, camera-to-world),
  intrinsics from ``K.txt`` when present, else the published per-sensor values (freiburg1/2/3 by folder name).
- **images**: a folder of colour images only (unposed, no depth: for the ``feedforward`` backend).

Every reader reports what it found and what it could not use in :attr:`RGBDSequence.report`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from langgs_ros.types import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# Published TUM RGB-D intrinsics (https://cvg.cit.tum.de/data/datasets/rgbd-dataset/file_formats), in pixels.
TUM_INTRINSICS = {
    "freiburg1": (517.3, 516.5, 318.6, 255.3),
    "freiburg2": (520.9, 521.0, 325.1, 249.7),
    "freiburg3": (535.4, 539.2, 320.1, 247.6),
}
TUM_DEPTH_SCALE = 5000.0  # depth units per metre in TUM depth PNGs


class DatasetError(ValueError):
    """A folder that cannot be read as an RGB-D sequence; the message says what is missing."""


@dataclass
class AnnotatedObject:
    """A ground-truth object of an annotated sequence (hololens ``annotations/objects.json``).

    Attributes:
        id: label id (>= 1) used in the label images.
        name: object name; ``synonyms`` other phrases for it.
        center: (3,) box centre, world frame, metres; ``size`` (3,) extents along box x, y, up (metres);
        rotation: (3, 3) world-from-box rotation (columns = box axes; box z = up); ``corners`` (8, 3).
    """

    id: int
    name: str
    synonyms: list[str]
    center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    corners: np.ndarray

    def contains(self, point: np.ndarray, margin: float = 0.0) -> bool:
        """Whether a world point (3,) lies inside the box grown by ``margin`` metres on every side."""
        local = self.rotation.T @ (np.asarray(point, dtype=np.float64) - self.center)
        return bool(np.all(np.abs(local) <= self.size / 2.0 + margin))


@dataclass
class RGBDSequence:
    """A readable sequence. Frames are decoded lazily by :meth:`frames` / :meth:`frame`.

    Attributes:
        root: the folder; ``layout``: "hololens", "tum" or "images".
        names: frame names (file stems) in time order; ``stamps``: (N,) seconds.
        intrinsics: (3, 3) K or None; ``poses``: (N, 4, 4) camera-to-world or None.
        up: (3,) world up vector when known (annotations or gravity convention), else None.
        objects: ground-truth objects when annotated; ``label_names``: label id -> name.
        report: human-readable lines on what was found and what could not be used.
    """

    root: Path
    layout: str
    names: list[str]
    stamps: np.ndarray
    rgb_paths: list[Path]
    depth_paths: list[Path | None]
    label_paths: list[Path | None]
    intrinsics: np.ndarray | None
    poses: np.ndarray | None
    depth_scale: float = 1000.0
    max_depth: float = 10.0
    up: np.ndarray | None = None
    objects: list[AnnotatedObject] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def frame(self, i: int, with_labels: bool = True) -> Frame:
        """Decode frame ``i`` (colour RGB uint8, depth in metres with > max_depth set to 0, labels).

        Raises:
            DatasetError: an image that cannot be decoded.
        """
        bgr = cv2.imread(str(self.rgb_paths[i]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetError(f"cannot decode colour image {self.rgb_paths[i]}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        depth = None
        dp = self.depth_paths[i]
        if dp is not None:
            raw = cv2.imread(str(dp), cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise DatasetError(f"cannot decode depth image {dp}")
            depth = raw.astype(np.float32) / self.depth_scale
            depth[~np.isfinite(depth) | (depth > self.max_depth) | (depth < 0)] = 0.0
            if depth.shape != rgb.shape[:2]:
                depth = cv2.resize(depth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        labels = None
        lp = self.label_paths[i] if with_labels else None
        if lp is not None:
            raw = cv2.imread(str(lp), cv2.IMREAD_UNCHANGED)
            if raw is not None:
                labels = raw.astype(np.int32)
        return Frame(
            rgb=rgb, stamp=float(self.stamps[i]), frame_id=self.names[i], depth=depth,
            intrinsics=None if self.intrinsics is None else self.intrinsics.copy(),
            world_from_camera=None if self.poses is None else self.poses[i].copy(),
            labels=labels, label_names=dict(self.label_names) if labels is not None else None,
        )

    def frames(self, indices: list[int] | range | None = None, with_labels: bool = True) -> Iterator[Frame]:
        """Iterate frames (all, or the given indices) in order."""
        for i in range(len(self)) if indices is None else indices:
            yield self.frame(i, with_labels=with_labels)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def _read_matrix(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(f"{path}: not a numeric matrix ({exc})") from exc
    if m.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: expected {int(np.prod(shape))} numbers, found {m.size}")
    return m.reshape(shape)


def load_objects(path: Path) -> tuple[list[AnnotatedObject], np.ndarray | None]:
    """Read ``annotations/objects.json``: the objects and the world ``up`` vector (or None)."""
    data = json.loads(path.read_text())
    objects = [
        AnnotatedObject(
            id=int(o["id"]), name=str(o["name"]), synonyms=[str(s) for s in o.get("synonyms", [])],
            center=np.asarray(o["center"], np.float64), size=np.asarray(o["size"], np.float64),
            rotation=np.asarray(o["rotation"], np.float64), corners=np.asarray(o.get("corners", []), np.float64),
        )
        for o in data.get("objects", [])
    ]
    up = np.asarray(data["up"], np.float64) if "up" in data else None
    return objects, up


def _open_hololens(root: Path, max_depth: float) -> RGBDSequence:
    report: list[str] = []
    images = _images_in(root / "images")
    if not images:
        raise DatasetError(f"{root}: no images/ folder with PNG/JPEG files")
    by_stem = {p.stem: p for p in images}
    names = [p.stem for p in images]
    if (root / "frames.txt").is_file():
        listed = [ln.split()[0] for ln in (root / "frames.txt").read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
        names = [Path(n).stem for n in listed]
        missing = [n for n in names if n not in by_stem]
        if missing:
            raise DatasetError(f"{root}: frames.txt lists {len(missing)} images not in images/ (e.g. {missing[0]})")
    K = _read_matrix(root / "K.txt", (3, 3)) if (root / "K.txt").is_file() else None
    if K is None:
        report.append("no K.txt: intrinsics unknown (only the feedforward backend can use this folder)")
    poses = None
    if (root / "poses.txt").is_file():
        rows = np.loadtxt(root / "poses.txt", dtype=np.float64, ndmin=2)
        if rows.shape[1] != 16:
            raise DatasetError(f"{root / 'poses.txt'}: expected 16 numbers per line, found {rows.shape[1]}")
        if rows.shape[0] != len(names):
            raise DatasetError(f"{root}: poses.txt has {rows.shape[0]} poses for {len(names)} frames")
        poses = rows.reshape(-1, 4, 4)
        finite = np.all(np.isfinite(poses), axis=(1, 2))
        if not finite.all():
            report.append(f"{int((~finite).sum())} poses are not finite: those frames are skipped")
            keep = np.flatnonzero(finite)
            names = [names[i] for i in keep]
            poses = poses[keep]
    else:
        report.append("no poses.txt: frames are unposed")
    depth_paths: list[Path | None] = []
    n_depth = 0
    for n in names:
        p = root / "depth" / f"{n}.png"
        depth_paths.append(p if p.is_file() else None)
        n_depth += p.is_file()
    if n_depth < len(names):
        report.append(f"depth found for {n_depth}/{len(names)} frames")
    label_paths: list[Path | None] = [None] * len(names)
    objects: list[AnnotatedObject] = []
    up = None
    label_names: dict[int, str] = {}
    ann = root / "annotations"
    if (ann / "objects.json").is_file():
        objects, up = load_objects(ann / "objects.json")
        label_names = {o.id: o.name for o in objects}
        label_paths = [(ann / "labels" / f"{n}.png") if (ann / "labels" / f"{n}.png").is_file() else None
                       for n in names]
        report.append(f"annotations: {len(objects)} objects, label images for "
                      f"{sum(p is not None for p in label_paths)}/{len(names)} frames")
    # The hololens images carry no stamps: a nominal 30 Hz source rate, every kept frame's source row index.
    stamps = np.arange(len(names), dtype=np.float64) / 30.0
    if (root / "frames.txt").is_file():
        rows_idx = {}
        for ln in (root / "frames.txt").read_text().splitlines():
            parts = ln.split()
            if len(parts) >= 2 and not ln.startswith("#"):
                rows_idx[Path(parts[0]).stem] = int(parts[1])
        if all(n in rows_idx for n in names):
            stamps = np.array([rows_idx[n] / 30.0 for n in names], dtype=np.float64)
    report.insert(0, f"hololens layout: {len(names)} frames, intrinsics {'yes' if K is not None else 'no'}, "
                     f"poses {'yes' if poses is not None else 'no'}")
    return RGBDSequence(
        root=root, layout="hololens", names=names, stamps=stamps, rgb_paths=[by_stem[n] for n in names],
        depth_paths=depth_paths, label_paths=label_paths, intrinsics=K, poses=poses, depth_scale=1000.0,
        max_depth=max_depth, up=up, objects=objects, label_names=label_names, report=report,
    )


def _read_tum_list(path: Path) -> list[tuple[float, str]]:
    out = []
    for ln in path.read_text().splitlines():
        if not ln.strip() or ln.startswith("#"):
            continue
        parts = ln.split()
        out.append((float(parts[0]), parts[1]))
    return out


def _open_tum(root: Path, max_depth: float, max_dt: float = 0.02) -> RGBDSequence:
    report: list[str] = []
    rgb_list = _read_tum_list(root / "rgb.txt")
    depth_list = _read_tum_list(root / "depth.txt") if (root / "depth.txt").is_file() else []
    if not rgb_list:
        raise DatasetError(f"{root}: rgb.txt lists no images")
    d_stamps = np.array([t for t, _ in depth_list]) if depth_list else np.zeros(0)
    gt = None
    if (root / "groundtruth.txt").is_file():
        rows = np.array([[float(x) for x in ln.split()] for ln in (root / "groundtruth.txt").read_text().splitlines()
                         if ln.strip() and not ln.startswith("#")])
        gt = rows if rows.size else None
    names, stamps, rgb_paths, depth_paths, poses = [], [], [], [], []
    unmatched_depth = unmatched_pose = 0
    for t, rel in rgb_list:
        dpath = None
        if d_stamps.size:
            j = int(np.argmin(np.abs(d_stamps - t)))
            if abs(d_stamps[j] - t) <= max_dt:
                dpath = root / depth_list[j][1]
            else:
                unmatched_depth += 1
        pose = None
        if gt is not None:
            k = int(np.argmin(np.abs(gt[:, 0] - t)))
            if abs(gt[k, 0] - t) <= max_dt:
                T = np.eye(4)
                T[:3, :3] = Rotation.from_quat(gt[k, 4:8]).as_matrix()  # scipy: x, y, z, w order as in TUM
                T[:3, 3] = gt[k, 1:4]
                pose = T
            else:
                unmatched_pose += 1
        if gt is not None and pose is None:
            continue
        names.append(Path(rel).stem)
        stamps.append(t)
        rgb_paths.append(root / rel)
        depth_paths.append(dpath)
        poses.append(pose)
    if unmatched_depth:
        report.append(f"{unmatched_depth} colour images without depth within {max_dt} s")
    if unmatched_pose:
        report.append(f"{unmatched_pose} colour images without a ground-truth pose within {max_dt} s were skipped")
    if (root / "K.txt").is_file():
        K = _read_matrix(root / "K.txt", (3, 3))
    else:
        key = next((k for k in TUM_INTRINSICS if k in str(root.resolve()).lower()), "freiburg1")
        fx, fy, cx, cy = TUM_INTRINSICS[key]
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        report.append(f"no K.txt: using the published TUM {key} intrinsics")
    report.insert(0, f"tum layout: {len(names)} frames, depth for {sum(p is not None for p in depth_paths)}, "
                     f"poses {'yes' if gt is not None else 'no'}")
    return RGBDSequence(
        root=root, layout="tum", names=names, stamps=np.asarray(stamps, np.float64), rgb_paths=rgb_paths,
        depth_paths=depth_paths, label_paths=[None] * len(names), intrinsics=K,
        poses=np.stack(poses) if gt is not None and poses else None, depth_scale=TUM_DEPTH_SCALE,
        max_depth=max_depth, report=report,
    )


def _open_images(root: Path) -> RGBDSequence:
    images = _images_in(root)
    if not images:
        raise DatasetError(f"{root}: no PNG/JPEG images")
    n = len(images)
    return RGBDSequence(
        root=root, layout="images", names=[p.stem for p in images], stamps=np.arange(n) / 30.0, rgb_paths=images,
        depth_paths=[None] * n, label_paths=[None] * n, intrinsics=None, poses=None,
        report=[f"image folder: {n} images, no depth, no intrinsics, no poses (feedforward backend only)"],
    )


def open_sequence(path: str | Path, max_depth: float = 10.0) -> RGBDSequence:
    """Open an RGB-D folder, detecting its layout.

    Args:
        path: the folder.
        max_depth: depth beyond this many metres is treated as invalid (sensor far-range garbage).

    Raises:
        DatasetError: not a folder, or no usable layout; the message lists what was expected.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    if not math.isfinite(max_depth) or max_depth <= 0:
        raise DatasetError(f"max_depth must be a positive number of metres, got {max_depth}")
    if (root / "images").is_dir():
        seq = _open_hololens(root, max_depth)
    elif (root / "rgb.txt").is_file():
        seq = _open_tum(root, max_depth)
    elif _images_in(root):
        seq = _open_images(root)
    else:
        raise DatasetError(
            f"{root}: not a known layout (expected images/ + depth/ + K.txt + poses.txt, or TUM rgb.txt/depth.txt, "
            "or a folder of images)"
        )
    for line in seq.report:
        log.info("%s", line)
    return seq
