"""Pictures of a map for people: a top-down plan and a rendered camera view (matplotlib, PNG files).

- :func:`plot_top_down`: the map seen from above along ``-up`` (orthographic): per plan cell the colour of the
  highest Gaussian below a height cut (so a ceiling does not hide the room), the gravity-aligned boxes of the named
  instances with their names, the camera path, and the top answer of each query (marker + ``"query" score``).
- :func:`render_camera_view`: the colour image rendered from one camera (:func:`langgs_ros.render.render_gaussians`).
- :func:`write_map_report`: both, into a folder; returns the paths.

Axes of the plan are the map's horizontal reference axes (:func:`langgs_ros.geometry.yaw_frame`: for a z-up
``map`` frame, x to the right and y up), metres. Used by ``make demo`` and ``langgs map --report DIR``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from langgs_ros.types import MapSnapshot

TOP_DOWN_NAME = "top_down.png"
VIEW_NAME = "last_view.png"


def _plan_coords(points: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 3) map points -> plan coordinates u, v (metres along e1, e2) and height h along ``up``."""
    from langgs_ros.geometry import normalize_up, yaw_frame

    u_axis = normalize_up(up)
    e1, e2 = yaw_frame(u_axis)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return p @ e1, p @ e2, p @ u_axis


def _footprint(box, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """(4, 2) plan corners of a :class:`~langgs_ros.geometry.GravityBox` (its horizontal rectangle)."""
    ax_x, ax_y = box.rotation[:, 0] * box.size[0] / 2.0, box.rotation[:, 1] * box.size[1] / 2.0
    corners = [box.center + sx * ax_x + sy * ax_y for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return np.array([[c @ e1, c @ e2] for c in corners])


def default_height_cut(snapshot: MapSnapshot, camera_path: np.ndarray | None = None) -> float | None:
    """Height (along ``up``, metres) above which Gaussians are left out of the plan, or None (keep all).

    ``floor_height + 2.0`` when the map knows its floor, else 0.3 m above the highest camera centre (cameras are
    carried below the ceiling), else None.
    """
    if snapshot.floor_height is not None:
        return float(snapshot.floor_height) + 2.0
    cams = camera_path if camera_path is not None and len(camera_path) else snapshot.camera_positions
    if cams is not None and len(cams):
        return float(np.max(_plan_coords(cams, snapshot.up)[2])) + 0.3
    return None


def top_down_image(snapshot: MapSnapshot, cell: float | None = None, height_cut: float | None = None,
                   min_opacity: float = 0.1, max_cells: int = 400, splat: int = 2
                   ) -> tuple[np.ndarray, tuple[float, ...]]:
    """Orthographic view from above: per plan cell the colour of the highest Gaussian mean in it.

    Args:
        snapshot: the map (Gaussian means in the map frame, colours in [0, 1]).
        cell: plan cell edge in metres (default: the larger plan extent / ``max_cells``, in [5 mm, 10 cm]).
        height_cut: Gaussians higher than this along ``up`` are left out (None: keep all).
        min_opacity: Gaussians below this opacity are left out.
        max_cells: cells along the larger side when ``cell`` is not given.
        splat: a Gaussian also colours the cells up to this many cells away (0: only its own).

    Returns:
        ``image`` (H, W, 4) float32 RGBA (alpha 0 = empty cell; row 0 = smallest v) and the
        ``extent`` (u_min, u_max, v_min, v_max) in metres, for ``imshow(..., origin="lower", extent=extent)``.
    """
    g = snapshot.gaussians
    means = g.means.detach().cpu().double().numpy()
    colors = g.colors.detach().cpu().float().numpy().clip(0.0, 1.0)
    keep = g.opacities.detach().cpu().numpy() >= min_opacity
    u, v, h = _plan_coords(means, snapshot.up)
    if height_cut is not None:
        keep &= h <= height_cut
    u, v, h, colors = u[keep], v[keep], h[keep], colors[keep]
    if len(u) == 0:
        return np.zeros((1, 1, 4), np.float32), (0.0, 1.0, 0.0, 1.0)
    # Plan extent without the 0.2 % most outlying means on each side (stray far Gaussians would shrink the room).
    lo_u, hi_u = np.percentile(u, [0.2, 99.8], method="nearest")
    lo_v, hi_v = np.percentile(v, [0.2, 99.8], method="nearest")
    inside = (u >= lo_u) & (u <= hi_u) & (v >= lo_v) & (v <= hi_v)
    u, v, h, colors = u[inside], v[inside], h[inside], colors[inside]
    if cell is None:
        cell = min(max(max(hi_u - lo_u, hi_v - lo_v) / max_cells, 0.005), 0.1)
    W = int(np.floor((hi_u - lo_u) / cell)) + 1
    H = int(np.floor((hi_v - lo_v) / cell)) + 1
    iu = np.clip(((u - lo_u) / cell).astype(np.int64), 0, W - 1)
    iv = np.clip(((v - lo_v) / cell).astype(np.int64), 0, H - 1)
    # Each Gaussian covers the cells up to `splat` away (sparsified maps are coarser than the plan grid); where
    # several cover a cell, the highest wins, its own cell before its neighbours' at equal height.
    src, cell_ids, prio = [], [], []
    for du in range(-splat, splat + 1):
        for dv in range(-splat, splat + 1):
            ju, jv = iu + du, iv + dv
            ok = (ju >= 0) & (ju < W) & (jv >= 0) & (jv < H)
            src.append(np.flatnonzero(ok))
            cell_ids.append((jv * W + ju)[ok])
            prio.append(h[ok] - (0.0 if du == 0 and dv == 0 else 1e-6))
    src_a, cell_a, prio_a = np.concatenate(src), np.concatenate(cell_ids), np.concatenate(prio)
    order = np.argsort(-prio_a, kind="stable")  # highest first: np.unique keeps the first occurrence per cell
    cells, first = np.unique(cell_a[order], return_index=True)
    chosen = src_a[order[first]]
    img = np.zeros((H * W, 4), np.float32)
    img[cells, :3] = colors[chosen]
    img[cells, 3] = 1.0
    return img.reshape(H, W, 4), (float(lo_u), float(lo_u + W * cell), float(lo_v), float(lo_v + H * cell))


def plot_top_down(snapshot: MapSnapshot, out_path: str | Path, *, camera_path: np.ndarray | None = None,
                  answers: Sequence[dict[str, Any]] = (), title: str | None = None,
                  height_cut: float | None = None, max_boxes: int = 60, dpi: int = 150) -> Path:
    """Write the top-down plan of a map as a PNG.

    Args:
        snapshot: the map (map frame, metres).
        out_path: PNG file to write (its folder is created).
        camera_path: (P, 3) camera centres in the map frame, in time order (default: the map's recorded
            ``camera_positions``).
        answers: query answers in the ``langgs query --json`` / demo format: ``{"query": str, "objects": [{"id",
            "name", "score", "center", ...}]}``; the first object of each is drawn. An optional boolean
            ``inside_ground_truth_box`` colours the label (green yes, red no).
        title: figure title (default: counts).
        height_cut: see :func:`top_down_image` (default :func:`default_height_cut`).
        max_boxes: at most this many named instance boxes are drawn (the most supported ones).
        dpi: resolution of the PNG.

    Returns:
        ``out_path`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    from langgs_ros.geometry import normalize_up, yaw_frame
    from langgs_ros.query import instance_boxes

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cams = np.asarray(camera_path if camera_path is not None else snapshot.camera_positions, np.float64)
    cams = cams.reshape(-1, 3)
    if height_cut is None:
        height_cut = default_height_cut(snapshot, cams)
    img, extent = top_down_image(snapshot, height_cut=height_cut)
    up = normalize_up(snapshot.up)
    e1, e2 = yaw_frame(up)

    fig, ax = plt.subplots(figsize=(9, 9))
    ax.set_facecolor((0.93, 0.93, 0.93))
    ax.imshow(img, origin="lower", extent=extent, interpolation="nearest")

    inst = snapshot.instances
    named = [(int(i), n, int(c)) for i, n, c in zip(inst.ids, inst.names, inst.num_gaussians) if n]
    named = sorted(named, key=lambda t: -t[2])[:max_boxes]
    answer_ids = {int(a["objects"][0]["id"]) for a in answers if a.get("objects")}
    boxes = instance_boxes(snapshot, sorted({i for i, _, _ in named} | answer_ids))
    names = {int(i): n for i, n in zip(inst.ids, inst.names)}
    for iid, name, _ in named:
        box = boxes.get(iid)
        if box is None:
            continue
        ax.add_patch(Polygon(_footprint(box, e1, e2), closed=True, fill=False, edgecolor="black", linewidth=1.0))
        cx, cy = box.center @ e1, box.center @ e2
        ax.text(cx, cy, name, fontsize=7, ha="center", va="center", color="black",
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})

    if len(cams):
        cu, cv = cams @ e1, cams @ e2
        ax.plot(cu, cv, "-", color="tab:blue", linewidth=1.2, alpha=0.8, label="camera path")
        ax.plot(cu[:1], cv[:1], "o", color="tab:blue", markersize=6, label="first camera")
        ax.plot(cu[-1:], cv[-1:], "^", color="tab:blue", markersize=8, label="last camera")

    # Answers: one star per answered instance, labelled with the queries it answered (green: inside the ground
    # truth box, red: not, blue: unknown), and a dashed box when the instance has no name of its own.
    groups: dict[tuple[int, Any], list[str]] = {}
    where: dict[int, np.ndarray] = {}
    for a in answers:
        if not a.get("objects"):
            continue
        top = a["objects"][0]
        key = (int(top["id"]), a.get("inside_ground_truth_box"))
        groups.setdefault(key, []).append(f"\"{a['query']}\" {float(top.get('score', 0.0)):.2f}")
        where[int(top["id"])] = np.asarray(top["center"], np.float64)
    for k, ((iid, hit), texts) in enumerate(sorted(groups.items(), key=lambda kv: kv[0][0])):
        colour = "tab:blue" if hit is None else ("tab:green" if hit else "tab:red")
        px, py = where[iid] @ e1, where[iid] @ e2
        ax.plot([px], [py], "*", color=colour, markersize=12, markeredgecolor="black", markeredgewidth=0.5)
        ax.annotate("\n".join(texts), (px, py), xytext=(7, -4 - 4 * (k % 2)), textcoords="offset points",
                    fontsize=6, color=colour, va="top",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75, "linewidth": 0})
        if iid in boxes and not names.get(iid):
            ax.add_patch(Polygon(_footprint(boxes[iid], e1, e2), closed=True, fill=False, edgecolor=colour,
                                 linewidth=1.2, linestyle="--"))

    ax.set_aspect("equal")
    ax.set_xlabel(f"{snapshot.frame_id} horizontal axis e1 [m]")
    ax.set_ylabel(f"{snapshot.frame_id} horizontal axis e2 [m]")
    ax.set_title(title or f"top-down: {len(snapshot.gaussians)} Gaussians, {len(inst)} instances"
                          + (f", Gaussians below {height_cut:.2f} m" if height_cut is not None else ""), fontsize=9)
    if len(cams):
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return out_path


def render_camera_view(snapshot: MapSnapshot, world_from_camera: np.ndarray, intrinsics: np.ndarray, width: int,
                       height: int, out_path: str | Path, max_width: int = 640,
                       background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Render the map's colours from one pinhole camera and write a PNG.

    Args:
        snapshot: the map (its Gaussians' device sets where rendering runs).
        world_from_camera: (4, 4) map-from-camera pose (OpenCV optical axes), metres.
        intrinsics: (3, 3) K in pixels for a ``width`` x ``height`` image.
        width, height: image size of ``intrinsics``; rendered at most ``max_width`` wide (K scaled to match).
        out_path: PNG to write (folder created).
        background: RGB in [0, 1] behind the Gaussians.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ValueError: bad pose, intrinsics or sizes (see :func:`langgs_ros.render.render_gaussians`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from langgs_ros.render import render_gaussians

    K = np.asarray(intrinsics, np.float64).copy()
    scale = min(1.0, max_width / float(width))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if scale < 1.0:
        K[0, :] *= w / width
        K[1, :] *= h / height
    out = render_gaussians(snapshot.gaussians, np.asarray(world_from_camera, np.float64), K, w, h,
                           background=background, render_instances=False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(out_path, out.rgb.detach().cpu().numpy().clip(0.0, 1.0))
    return out_path


def write_map_report(snapshot: MapSnapshot, out_dir: str | Path, *, camera_path: np.ndarray | None = None,
                     answers: Sequence[dict[str, Any]] = (),
                     last_camera: tuple[np.ndarray, np.ndarray, int, int] | None = None,
                     title: str | None = None) -> dict[str, Path]:
    """Write ``top_down.png`` and (with ``last_camera``) ``last_view.png`` into ``out_dir``.

    Args:
        snapshot: the map. camera_path, answers, title: see :func:`plot_top_down`.
        last_camera: ``(world_from_camera (4, 4), K (3, 3), width, height)`` of the view to render, map frame.

    Returns:
        ``{"top_down": path, "view": path}`` (``view`` only with ``last_camera``).
    """
    out_dir = Path(out_dir)
    paths = {"top_down": plot_top_down(snapshot, out_dir / TOP_DOWN_NAME, camera_path=camera_path,
                                       answers=answers, title=title)}
    if last_camera is not None:
        T, K, w, h = last_camera
        paths["view"] = render_camera_view(snapshot, T, K, int(w), int(h), out_dir / VIEW_NAME)
    return paths
