"""Test double of a feed-forward reconstruction network, built on ground truth of a real RGB-D sequence.

:class:`GroundTruthBackbone` implements the :class:`~langgs_ros.reconstruction.feedforward.Backbone` protocol. It
recognises which frames it is given from their pixels only (like a network: nearest thumbnail of the model-size
image among the sequence's frames) and returns, per call, the frames' ground-truth cameras and depth expressed in a
fresh random Sim(3) frame, degraded by an :class:`ErrorModel` (the realistic one, :meth:`ErrorModel.full`, has
every error a feed-forward network makes that matters to the geometry around it: per-window Sim(3), depth noise
growing with depth, a per-window affine depth bias, a per-window focal error with the matching depth error, camera
rotation/translation noise, low confidence at depth edges, and calls that fail). It is a test double for the
geometry pipeline around the network; it says nothing about the network's accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from langgs_ros.reconstruction.alignment import Sim3
from langgs_ros.reconstruction.feedforward import intrinsics_to_model, preprocess_images
from langgs_ros.types import Frame

THUMB = (12, 16)


@dataclass
class ErrorModel:
    """What the double gets wrong, per call (window) or per camera / pixel. Metres are ground-truth metres.

    Attributes:
        scale_range: (lo, hi) of the per-window random Sim(3) scale (log-uniform; rotation uniform, translation
            N(0, 2)).
        depth_noise: relative depth noise standard deviation at zero depth ...
        depth_noise_per_m: ... growing by this much per metre of depth: ``σ(z) = z (depth_noise +
            depth_noise_per_m z)`` (absolute noise grows quadratically with depth, as in stereo / learned depth).
        depth_bias_scale: per-window affine depth bias ``z' = (1 + a) z + b``, ``a ~ U(±depth_bias_scale)`` ...
        depth_bias_offset_m: ... and ``b ~ U(±depth_bias_offset_m)`` metres.
        focal_error: per-window relative focal error ``e ~ U(±focal_error)``: predicted ``f' = (1 + e) f`` and depth
            ``(1 + e) z`` (image-plane extents stay right: the focal-depth ambiguity of a network).
        rotation_noise_deg: per-camera rotation noise (axis-angle, N(0, σ) degrees per axis).
        translation_noise_m: per-camera centre noise (N(0, σ) metres per axis).
        edge_confidence: confidence drops to ``edge_confidence_factor`` of the rest at depth edges (3x3 relative
            jump above ``edge_jump``), where depth noise is also ``edge_noise_factor`` times larger.
        fail_calls: 0-based call indices that return a failed prediction (random cameras, depth of other frames).
        fail_rate: probability that any other call fails.
    """

    scale_range: tuple[float, float] = (0.3, 3.0)
    depth_noise: float = 0.01
    depth_noise_per_m: float = 0.0
    depth_bias_scale: float = 0.0
    depth_bias_offset_m: float = 0.0
    focal_error: float = 0.0
    rotation_noise_deg: float = 0.0
    translation_noise_m: float = 0.0
    edge_confidence: bool = False
    edge_jump: float = 0.05
    edge_confidence_factor: float = 0.05
    edge_noise_factor: float = 5.0
    fail_calls: set[int] = field(default_factory=set)
    fail_rate: float = 0.0

    @staticmethod
    def full(**overrides: object) -> ErrorModel:
        """The realistic model: 1 % + 0.5 %/m depth noise, ±2 % / ±2 cm affine bias, ±5 % focal, 0.3° / 1 cm
        camera noise, edge confidence, 5 % failed calls (fields can be overridden)."""
        base = dict(depth_noise=0.01, depth_noise_per_m=0.005, depth_bias_scale=0.02, depth_bias_offset_m=0.02,
                    focal_error=0.05, rotation_noise_deg=0.3, translation_noise_m=0.01, edge_confidence=True,
                    fail_rate=0.05)
        base.update(overrides)
        return ErrorModel(**base)  # type: ignore[arg-type]


@dataclass
class CallRecord:
    """What one ``predict`` call did: frame indices, the GT-world -> window Sim(3), and the drawn errors."""

    idx: np.ndarray
    sim: Sim3
    failed: bool = False
    focal_error: float = 0.0
    bias: tuple[float, float] = (0.0, 0.0)

    def __iter__(self):  # (idx, sim) unpacking, as the calls list held tuples before
        return iter((self.idx, self.sim))

    def __getitem__(self, i: int):
        return (self.idx, self.sim)[i]


class GroundTruthBackbone:
    """Returns ground truth through a random Sim(3) per call, degraded by an :class:`ErrorModel`.

    Args:
        frames: the sequence's frames with depth, intrinsics and ground-truth ``world_from_camera``.
        width: the model image width the reconstructor uses (for the model-grid ground truth).
        depth_noise: relative depth noise (shortcut for ``ErrorModel(depth_noise=...)`` when ``errors`` is None).
        scale_range: (lo, hi) of the per-call random scale (idem).
        seed: random seed.
        errors: the error model (default: only the Sim(3) and ``depth_noise``).

    Attributes:
        calls: one :class:`CallRecord` per call (unpacks as ``(frame indices, Sim(3) GT world -> window)``).
    """

    def __init__(self, frames: Sequence[Frame], width: int = 518, depth_noise: float = 0.01,
                 scale_range: tuple[float, float] = (0.3, 3.0), seed: int = 0,
                 errors: ErrorModel | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.errors = errors if errors is not None else ErrorModel(scale_range=scale_range, depth_noise=depth_noise)
        thumbs, depths, Ks, poses = [], [], [], []
        for f in frames:
            if f.depth is None or f.intrinsics is None or f.world_from_camera is None:
                raise ValueError(f"frame {f.frame_id}: the double needs depth, intrinsics and a ground-truth pose")
            img, info = preprocess_images([f.rgb], width)
            thumbs.append(F.adaptive_avg_pool2d(img, THUMB)[0].flatten())
            d = torch.from_numpy(np.asarray(f.depth, np.float32))[None, None]
            depths.append(F.interpolate(d, size=info.model_hw, mode="nearest-exact")[0, 0])
            Ks.append(intrinsics_to_model(f.intrinsics, info))
            poses.append(np.asarray(f.world_from_camera, np.float64))
        self.thumbs = torch.stack(thumbs)
        self.depths = torch.stack(depths)
        self.Ks = np.stack(Ks)
        self.poses = np.stack(poses)
        self.calls: list[CallRecord] = []

    def _random_sim3(self) -> Sim3:
        lo, hi = np.log(self.errors.scale_range)
        return Sim3(float(np.exp(self.rng.uniform(lo, hi))), Rotation.random(random_state=self.rng).as_matrix(),
                    self.rng.normal(scale=2.0, size=3))

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """See :class:`~langgs_ros.reconstruction.feedforward.Backbone`."""
        em = self.errors
        t = F.adaptive_avg_pool2d(images.float().cpu(), THUMB).flatten(1)
        idx = torch.cdist(t, self.thumbs).argmin(1).numpy()
        if tuple(images.shape[-2:]) != tuple(self.depths.shape[-2:]):
            raise ValueError(f"images {tuple(images.shape)} do not have the model size {tuple(self.depths.shape)}")
        n_call = len(self.calls)
        failed = n_call in em.fail_calls or (em.fail_rate > 0 and self.rng.random() < em.fail_rate)
        sim = self._random_sim3()
        S = len(idx)
        poses = self.poses[idx].copy()
        d = self.depths[idx].double().clone()
        e = float(self.rng.uniform(-em.focal_error, em.focal_error)) if em.focal_error > 0 else 0.0
        a = float(self.rng.uniform(-em.depth_bias_scale, em.depth_bias_scale)) if em.depth_bias_scale > 0 else 0.0
        b = float(self.rng.uniform(-em.depth_bias_offset_m, em.depth_bias_offset_m)) \
            if em.depth_bias_offset_m > 0 else 0.0
        if failed:  # a failed prediction: cameras anywhere, depth of other frames
            poses = np.stack([self._random_sim3().transform_pose(p) for p in poses])
            d = self.depths[self.rng.permutation(len(self.depths))[:S]].double().clone()
        for i in range(S):
            if em.rotation_noise_deg > 0:
                dR = Rotation.from_rotvec(np.radians(self.rng.normal(scale=em.rotation_noise_deg, size=3)))
                poses[i, :3, :3] = poses[i, :3, :3] @ dR.as_matrix()
            if em.translation_noise_m > 0:
                poses[i, :3, 3] += self.rng.normal(scale=em.translation_noise_m, size=3)
        self.calls.append(CallRecord(idx, sim, failed, e, (a, b)))
        extrinsic = np.linalg.inv(sim.transform_pose(poses))[:, :3, :]
        valid = d > 0
        big = torch.where(valid, d, torch.full_like(d, float("inf")))
        dmax = F.max_pool2d(d[:, None], 3, stride=1, padding=1)[:, 0]
        dmin = -F.max_pool2d(-big[:, None], 3, stride=1, padding=1)[:, 0]
        edge = (dmax > dmin * (1.0 + em.edge_jump)) & valid if em.edge_confidence else torch.zeros_like(valid)
        sigma = em.depth_noise + em.depth_noise_per_m * d
        sigma = torch.where(edge, sigma * em.edge_noise_factor, sigma)
        noise = torch.from_numpy(self.rng.standard_normal(tuple(d.shape)))
        z = ((1.0 + a) * d + b) * (1.0 + sigma * noise) * (1.0 + e) * sim.s
        z = torch.where(valid & (z > 0), z, torch.zeros_like(z)).float()
        x = torch.where(edge, torch.full_like(d, float(np.log(em.edge_confidence_factor)) + 1.0),
                        torch.ones_like(d))
        conf = 1.0 + valid.double() * torch.exp(x)  # VGGT-style 1 + exp(x): x = 1 on valid pixels, lower at edges
        K = self.Ks[idx].copy()
        K[:, 0, 0] *= 1.0 + e
        K[:, 1, 1] *= 1.0 + e
        dev = images.device
        return {"extrinsic": torch.from_numpy(extrinsic).float().to(dev),
                "intrinsic": torch.from_numpy(K).float().to(dev),
                "depth": z.to(dev), "depth_conf": conf.float().to(dev)}


class OutOfMemoryOnce:
    """Wraps a backbone; its first ``predict`` raises ``torch.OutOfMemoryError`` (the real exception type)."""

    def __init__(self, inner: GroundTruthBackbone, failures: int = 1) -> None:
        self.inner = inner
        self.failures = failures
        self.sizes: list[int] = []

    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raise on the first ``failures`` calls, then delegate."""
        self.sizes.append(int(images.shape[0]))
        if len(self.sizes) <= self.failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")
        return self.inner.predict(images)


def dropped(n_windows: int, every: int = 5, offset: int = 2) -> set[int]:
    """Window indices a worker that drops one window in ``every`` would lose (``offset``, ``offset + every``...)."""
    return set(range(offset, n_windows, every)) if every > 0 else set()


def window_indices(n: int, size: int = 8, overlap: int = 2) -> list[list[int]]:
    """Index lists of consecutive windows of ``size`` frames sharing ``overlap`` frames, covering 0..n-1."""
    out, start = [], 0
    while start < n - overlap:
        out.append(list(range(start, min(n, start + size))))
        start += size - overlap
    return out


def record_first_placement(placed: dict[str, np.ndarray], frames: Sequence[Frame], world_from_camera,
                           map_correction) -> None:
    """Keep the first placement (4, 4) of each frame id, moving the earlier ones with the map when the backend
    corrected the map frame (``map_correction``: a :class:`Sim3` or a (4, 4) similarity matrix, or ``None``), as
    the map's own Gaussians and cameras were moved."""
    if map_correction is not None:
        C = map_correction if isinstance(map_correction, Sim3) else Sim3.from_matrix(np.asarray(map_correction))
        for k, T in placed.items():
            placed[k] = C.transform_pose(T)
    poses = world_from_camera.double().cpu().numpy() if isinstance(world_from_camera, torch.Tensor) \
        else np.asarray(world_from_camera, dtype=np.float64)
    for f, T in zip(frames, poses):
        placed.setdefault(f.frame_id, T)
