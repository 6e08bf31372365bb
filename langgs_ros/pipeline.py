"""The mapping pipeline: windows of frames in, a fused semantic Gaussian map out (ROS-free).

:class:`MappingPipeline` runs one window synchronously (reconstruct → semantic lifting → pixel Gaussians →
sparsify + fuse). :class:`MappingWorker` wraps it for live streams: producers call :meth:`MappingWorker.submit`
(cheap, never blocks on the device), a single worker thread owns the device, selects keyframes, forms windows,
runs the pipeline and publishes immutable :class:`~langgs_ros.types.MapSnapshot` objects that readers take
without locks held during their own work.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from langgs_ros.frames import FrameBuffer, FrameError, KeyframeConfig, WindowConfig
from langgs_ros.fusion import FusionConfig, SemanticGaussianMap
from langgs_ros.gaussians import GaussianInitConfig, gaussians_from_window
from langgs_ros.query import QueryConfig, QueryEngine
from langgs_ros.reconstruction.alignment import frame_key
from langgs_ros.reconstruction.base import Reconstructor, make_reconstructor
from langgs_ros.refine import RefineConfig, refine_window
from langgs_ros.semantics.base import SemanticSource, make_semantic_source
from langgs_ros.sparsify import SparsifyConfig
from langgs_ros.types import Frame, MapSnapshot, WindowReconstruction

log = logging.getLogger(__name__)


@dataclass
class UnposedConfig:
    """Unposed mapping (``backend: feedforward``, ``pose_source: none``); passed to the feedforward backend.

    Attributes:
        camera_height: declared height of the camera above the floor, metres (``unposed.camera_height``); the
            unposed map's scale is set from it (scale source ``camera_height``). ``None``: no scale prior, the map
            keeps the network's arbitrary units (scale source ``none``; metric constants then do not hold).
        anchors: keyframes of the map reconstructed with every window to register it against the map
            (``unposed.anchors``; 0 = chain through the window overlap only).
        max_relocalisations: further anchor sets tried when a window's first anchors fail
            (``unposed.max_relocalisations``; each costs a network call).
        relevel_every: re-estimate the map's floor, up and camera-height scale on all its keyframes every this
            many windows, and at windows 2 and 4 (``unposed.relevel_every``; 0 = keep the first window's estimate).
            A change moves the whole map (:meth:`SemanticGaussianMap.apply_correction`).
    """

    camera_height: float | None = None
    anchors: int = 2
    max_relocalisations: int = 2
    relevel_every: int = 4


@dataclass
class PipelineConfig:
    """Typed configuration of the whole core pipeline (nerfstudio-style nested dataclasses).

    Attributes:
        device: torch device for reconstruction, lifting and fusion ("cpu", "cuda", "cuda:0").
        backend: reconstruction backend name ("rgbd" or "feedforward"); ``backend_args`` its keyword arguments.
        semantic_source: "labels" or "clip_sam"; ``semantic_args`` its keyword arguments.
        up: gravity-up unit vector of the map frame (``[0, 0, 1]`` for a REP-103 ``map``).
        unposed: :class:`UnposedConfig` (feedforward backend only; ``backend_args`` entries take precedence).
        refine: :class:`~langgs_ros.refine.RefineConfig`: optional photometric refinement of each fused window's
            Gaussians against its frames (off: ``steps == 0``, the default).
    """

    device: str = "cpu"
    backend: str = "rgbd"
    backend_args: dict[str, Any] = field(default_factory=dict)
    semantic_source: str = "labels"
    semantic_args: dict[str, Any] = field(default_factory=dict)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    gaussians: GaussianInitConfig = field(default_factory=GaussianInitConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    unposed: UnposedConfig = field(default_factory=UnposedConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class WindowStats:
    """Timings (seconds) and counts of one processed window."""

    num_frames: int
    num_pixel_gaussians: int
    num_map_gaussians: int
    num_instances: int
    t_reconstruct: float
    t_semantics: float
    t_gaussians: float
    t_fuse: float
    num_fused_frames: int = -1
    """Frames segmented and fused (the window's frames minus those already fused, e.g. the overlap)."""
    t_refine: float = 0.0
    """Photometric refinement time, seconds (0 when off)."""
    refine_steps: int = 0
    """Refinement steps taken (bounded by ``refine.steps`` and ``refine.max_seconds``)."""
    refine_skipped: str = ""
    """Why the refinement was not written back ("diverged", "out of memory"; "" when applied or off)."""

    @property
    def t_total(self) -> float:
        """Sum of the stage times, seconds."""
        return self.t_reconstruct + self.t_semantics + self.t_gaussians + self.t_fuse + self.t_refine


class MappingPipeline:
    """Synchronous pipeline; not thread-safe (owned by one thread, e.g. :class:`MappingWorker`).

    Args:
        config: the pipeline configuration.
        reconstructor, semantic_source: prebuilt stages (tests, custom backends); built from ``config`` if None.
    """

    def __init__(self, config: PipelineConfig, reconstructor: Reconstructor | None = None,
                 semantic_source: SemanticSource | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        backend_args = {"device": config.device, **config.backend_args}
        if config.backend == "feedforward" and reconstructor is None:
            for k, v in dataclasses.asdict(config.unposed).items():
                backend_args.setdefault(k, v)
        self.reconstructor = reconstructor or make_reconstructor(config.backend, **backend_args)
        semantic_args = dict(config.semantic_args)
        if config.semantic_source == "clip_sam":
            semantic_args.setdefault("device", config.device)
        self.semantics = semantic_source or make_semantic_source(config.semantic_source, **semantic_args)
        self.text_encoder = self.semantics.text_encoder
        self.map = SemanticGaussianMap(
            encoder_id=self.text_encoder.encoder_id, embedding_dim=self.text_encoder.dim, config=config.fusion,
            sparsify_config=config.sparsify, up=config.up, device=config.device,
        )
        self.query_engine = QueryEngine(self.text_encoder, config.query)
        self._fused: OrderedDict[tuple[str, float], None] = OrderedDict()
        self._fused_capacity = 4 * max(1, config.window.size)
        self.scale_is_metric = True
        self.scale_source = "unknown"
        self.skipped_fused_frames = 0
        self.map_corrections = 0  # similarity corrections of the whole map (re-levelled unposed maps)

    def process_window(self, frames: Sequence[Frame]) -> WindowStats:
        """Reconstruct, lift, sparsify and fuse one window into the map (then refine it photometrically when
        ``config.refine.steps > 0``, :func:`~langgs_ros.refine.refine_window`).

        The whole window is reconstructed (its overlap frames register it), but frames already fused by an
        earlier window (same ``frame_id`` and stamp, e.g. the overlap carried by the frame buffer) are neither
        segmented nor fused again, so their observations are counted once.

        Raises:
            ValueError: unusable window (from the backend or semantic source); the map is unchanged.
        """
        if len(frames) == 0:
            raise ValueError("empty window")
        t0 = time.perf_counter()
        with torch.inference_mode():
            rec = self.reconstructor.reconstruct(frames)
            if rec.map_correction is not None:
                self._move_map(rec.map_correction)
            self.scale_is_metric = bool(rec.scale_is_metric)
            self.scale_source = rec.scale_source
            t1 = time.perf_counter()
            new = [i for i, f in enumerate(rec.frames) if frame_key(f) not in self._fused]
            self.skipped_fused_frames += len(rec.frames) - len(new)
            n_pix = 0
            if new:
                rec = rec if len(new) == len(rec.frames) else _select_frames(rec, new)
                segs = self.semantics.segment(rec.frames)
                t2 = time.perf_counter()
                per_frame = gaussians_from_window(rec, segs, self.config.gaussians)
                t3 = time.perf_counter()
                n_pix = sum(len(g) for g in per_frame)
                self.map.integrate(per_frame, segs, rec.world_from_camera, stamp=float(frames[-1].stamp))
                for f in rec.frames:
                    self._fused[frame_key(f)] = None
                while len(self._fused) > self._fused_capacity:
                    self._fused.popitem(last=False)
            else:
                t2 = t3 = time.perf_counter()
            t4 = time.perf_counter()
        refined = refine_window(self.map, rec, self.config.refine) if new and self.config.refine.steps else None
        return WindowStats(len(frames), n_pix, self.map.num_gaussians, self.map.num_instances,
                           t1 - t0, t2 - t1, t3 - t2, t4 - t3, num_fused_frames=len(new),
                           t_refine=refined.seconds if refined else 0.0, refine_steps=refined.steps if refined else 0,
                           refine_skipped=refined.skipped if refined else "")

    def _move_map(self, new_from_old: np.ndarray) -> None:
        """Apply a backend's map correction (a similarity: a re-levelled, re-scaled unposed map) to everything
        already fused (:meth:`SemanticGaussianMap.apply_correction`: nothing is re-keyed or merged); the set of
        fused frames is kept. Readers keep the previous snapshot until the window is published."""
        self.map.apply_correction(new_from_old)
        self.map_corrections += 1

    def snapshot(self) -> MapSnapshot:
        """A consistent CPU copy of the map, with the scale's provenance (``scale_is_metric``, ``scale_source``)."""
        snap = self.map.snapshot()
        if snap.scale_is_metric != self.scale_is_metric or snap.scale_source != self.scale_source:
            snap = dataclasses.replace(snap, scale_is_metric=self.scale_is_metric, scale_source=self.scale_source)
        return snap

    def registration_stats(self) -> dict[str, float | str]:
        """Diagnostics of window registration and scale (for ``/diagnostics``).

        Returns:
            The reconstructor's ``registration_stats()`` when it has one (feedforward: ``windows_registered``,
            ``relocalisations``, ``registration_failures``, ``keyframes``, ``oom_fallbacks``, ``scale_source``,
            ``up_source``), plus ``scale_is_metric`` (0/1), ``scale_source`` and ``skipped_fused_frames``
            (window frames not fused again because an earlier window fused them) and ``map_corrections`` (times the
            whole map was moved by a backend's correction, e.g. re-levelled).
        """
        stats_fn = getattr(self.reconstructor, "registration_stats", None)
        out: dict[str, float | str] = dict(stats_fn()) if callable(stats_fn) else {}
        out.update(scale_is_metric=float(self.scale_is_metric), scale_source=self.scale_source,
                   skipped_fused_frames=float(self.skipped_fused_frames), map_corrections=float(self.map_corrections))
        return out

    def reset(self) -> None:
        """Clear the map and any state the reconstructor keeps across windows (e.g. window alignment)."""
        self.map.reset()
        self._fused.clear()
        reset = getattr(self.reconstructor, "reset", None)
        if callable(reset):
            reset()

    def replace_map(self, snapshot: MapSnapshot) -> None:
        """Replace the map by a loaded snapshot (same encoder required) and reset the reconstructor's state.

        The snapshot should come from :func:`~langgs_ros.persistence.load_map` (which validates untrusted files
        completely); the map is replaced only once the new one is fully built, so on any error it is unchanged.

        Raises:
            ValueError: the snapshot's encoder or embedding dimension differs from this pipeline's text encoder, or
                the snapshot is inconsistent (see :meth:`SemanticGaussianMap.from_snapshot`).
        """
        if snapshot.encoder_id != self.text_encoder.encoder_id:
            raise ValueError(f"map encoder {snapshot.encoder_id!r} differs from the pipeline's "
                             f"{self.text_encoder.encoder_id!r}")
        emb = snapshot.instances.embeddings
        dim = getattr(self.text_encoder, "dim", None)
        if dim is not None and (emb.ndim != 2 or int(emb.shape[1]) != int(dim)):
            raise ValueError(f"map embeddings are {tuple(emb.shape)}, the text encoder makes {dim}-d embeddings")
        cfg = self.config
        self.map = SemanticGaussianMap.from_snapshot(snapshot, config=cfg.fusion, sparsify_config=cfg.sparsify,
                                                     device=cfg.device)
        self._fused.clear()
        self.scale_is_metric = bool(snapshot.scale_is_metric)
        self.scale_source = snapshot.scale_source
        reset = getattr(self.reconstructor, "reset", None)
        if callable(reset):
            reset()


class MappingWorker:
    """Runs a :class:`MappingPipeline` on a background thread fed by a bounded frame queue.

    Producers (ROS subscription callbacks) call :meth:`submit`, which only appends to a deque. The worker
    thread validates frames, selects keyframes (:class:`FrameBuffer`), forms windows every ``window_period``
    seconds or when a window is full, and processes them. At most ``max_queued_windows`` windows wait; when the
    worker falls behind the oldest waiting window is dropped and counted (:attr:`dropped_windows`).

    Args:
        pipeline: the pipeline (its device is owned by this worker's thread from :meth:`start` on).
        window_period: seconds after which a partial window (>= 1 new keyframe) is processed anyway; 0 = only
            full windows.
        max_queued_frames: bound of the input deque (oldest frames dropped, counted in :attr:`dropped_frames`).
        on_update: called on the worker thread with (snapshot, stats) after each processed window.
        on_error: called on the worker thread with a message when a frame or window is rejected.
        on_fault: called on the worker thread with (where, exception) for an unexpected exception (a bug or an
            unforeseen input); the worker thread survives it and keeps the map.

    A jump back in stamps (a bag loop, a simulator reset) is signalled by the producer with :meth:`time_jump`.
    """

    def __init__(self, pipeline: MappingPipeline, window_period: float = 5.0, max_queued_frames: int = 30,
                 max_queued_windows: int = 2,
                 on_update: Callable[[MapSnapshot, WindowStats], None] | None = None,
                 on_error: Callable[[str], None] | None = None,
                 on_fault: Callable[[str, BaseException], None] | None = None) -> None:
        self.pipeline = pipeline
        self.buffer = FrameBuffer(pipeline.config.keyframes, pipeline.config.window)
        self.window_period = float(window_period)
        # (time-line epoch, frame): the epoch travels with every frame, so a time jump is never lost to eviction
        self._frames: deque[tuple[int, Frame]] = deque(maxlen=max(1, max_queued_frames))
        self._epoch = 0  # producer side: incremented by time_jump()
        self._buffer_epoch = 0  # worker side: the epoch of the frames in self.buffer
        self._windows: deque[list[Frame]] = deque()
        self.max_queued_windows = max(1, max_queued_windows)
        self._cv = threading.Condition()
        self._map_lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._snapshot = pipeline.snapshot()
        self.on_update = on_update
        self.on_error = on_error
        self.on_fault = on_fault
        self._last_window_time = time.monotonic()
        self._pending_commands: deque[Callable[[], None]] = deque()
        self.submitted = 0
        self.dropped_frames = 0
        self.dropped_windows = 0
        self.rejected_frames = 0
        self.failed_windows = 0
        self.processed_windows = 0
        self.time_jumps = 0
        self.faults = 0
        self.last_stats: WindowStats | None = None
        self.busy = False

    # ------------------------------------------------------------------ producers
    def submit(self, frame: Frame) -> None:
        """Queue a frame (O(1), never blocks on the pipeline). Oldest queued frames are dropped when full."""
        with self._cv:
            if len(self._frames) == self._frames.maxlen:
                self.dropped_frames += 1
            self._frames.append((self._epoch, frame))
            self.submitted += 1
            self._cv.notify()

    def time_jump(self) -> None:
        """Stamps jumped back (bag loop, simulator reset): frames submitted from now on start a new time line.

        The map is kept. On the worker thread, in submission order, the keyframes of the old time line still
        pending are mapped as (short) windows and the keyframe buffer forgets its stamps
        (:meth:`FrameBuffer.on_time_jump`), so frames with the new, older stamps are accepted instead of rejected.
        Counted in :attr:`time_jumps` when the worker reaches it. O(1), never blocks on the pipeline.
        """
        with self._cv:
            self._epoch += 1

    def run_on_worker(self, fn: Callable[[], Any], timeout: float | None = 60.0) -> Any:
        """Run ``fn`` on the worker thread between windows (map edits: load, reset) and return its result.

        A command that has not started within ``timeout`` seconds (the worker is busy with a long window) is
        cancelled, so it never runs later behind the caller's back; one that has started is waited for.

        Raises:
            TimeoutError: not started within ``timeout`` seconds (then it will not run); whatever ``fn`` raised.
        """
        if self._thread is None or not self._thread.is_alive():
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}
        state = {"started": False, "cancelled": False}

        def call() -> None:
            with self._cv:
                if state["cancelled"]:
                    return
                state["started"] = True
            try:
                box["result"] = fn()
            except BaseException as exc:  # propagated to the caller
                box["error"] = exc
            finally:
                done.set()

        with self._cv:
            self._pending_commands.append(call)
            self._cv.notify()
        if not done.wait(timeout):
            with self._cv:
                if not state["started"]:
                    state["cancelled"] = True
                    raise TimeoutError(f"the mapping worker is busy and did not start the command within "
                                       f"{timeout} s; nothing was changed")
            done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ------------------------------------------------------------------ readers
    def snapshot(self) -> MapSnapshot:
        """The latest published map snapshot (immutable; safe to use from any thread)."""
        with self._map_lock:
            return self._snapshot

    def publish_snapshot(self) -> MapSnapshot:
        """Take a fresh snapshot from the pipeline's map and publish it (worker thread or when stopped)."""
        snap = self.pipeline.snapshot()
        with self._map_lock:
            self._snapshot = snap
        return snap

    @property
    def queue_depth(self) -> tuple[int, int]:
        """(queued frames, queued windows)."""
        with self._cv:
            return len(self._frames), len(self._windows)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="langgs-mapping-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the worker to stop after its current window (queued windows are not processed) and join it."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float = 600.0) -> None:
        """Process all queued frames and any partial window now; returns when idle (for replays and tests)."""
        deadline = time.monotonic() + timeout
        self.run_on_worker(lambda: self._drain(force=True), timeout=timeout)
        while time.monotonic() < deadline:
            with self._cv:
                if not self._frames and not self._windows and not self.busy:
                    return
            time.sleep(0.01)

    # ------------------------------------------------------------------ worker thread
    def _error(self, msg: str) -> None:
        log.warning("%s", msg)
        if self.on_error is not None:
            try:
                self.on_error(msg)
            except Exception:  # a reporting callback must not kill the worker
                log.exception("on_error callback failed")

    def _drain(self, force: bool = False) -> None:
        """Move queued frames into the frame buffer and emit windows; process them all (worker thread)."""
        while True:
            with self._cv:
                frames = list(self._frames)
                self._frames.clear()
            if not frames:
                break
            for epoch, f in frames:
                if epoch != self._buffer_epoch:
                    self._buffer_epoch = epoch
                    self.time_jumps += 1
                    for w in self.buffer.on_time_jump():
                        self._enqueue_window(w)
                self._offer(f)
        if force:
            w = self.buffer.pop_window(force=True)
            if w:
                self._enqueue_window(w)
        self._process_windows()

    def _fault(self, where: str, exc: BaseException) -> None:
        self.faults += 1
        log.exception("mapping worker: %s failed", where)
        if self.on_fault is not None:
            try:
                self.on_fault(where, exc)
            except Exception:  # a reporting callback must not kill the worker
                log.exception("on_fault callback failed")

    def _offer(self, frame: Frame) -> None:
        try:
            self.buffer.add(frame)
        except FrameError as exc:
            self.rejected_frames += 1
            self._error(f"frame {frame.frame_id!r} rejected: {exc}")
            return
        while self.buffer.window_ready():
            w = self.buffer.pop_window()
            if w:
                self._enqueue_window(w)

    def _enqueue_window(self, window: list[Frame]) -> None:
        with self._cv:
            self._windows.append(window)
            while len(self._windows) > self.max_queued_windows:
                self._windows.popleft()
                self.dropped_windows += 1
                self._error(f"mapping worker falling behind: dropped the oldest window "
                            f"({self.dropped_windows} dropped so far)")

    def _process_windows(self) -> None:
        while True:
            with self._cv:
                if not self._windows or self._stop:  # stopping: queued windows are left (the node is going down)
                    return
                window = self._windows.popleft()
                self.busy = True
            try:
                stats = self.pipeline.process_window(window)
            except (ValueError, RuntimeError) as exc:
                self.failed_windows += 1
                self._error(f"window of {len(window)} frames failed and was skipped: {exc}")
                continue
            except Exception as exc:  # an unforeseen error skips the window, never the worker
                self.failed_windows += 1
                self._fault("processing a window", exc)
                continue
            finally:
                with self._cv:
                    self.busy = False
                self._last_window_time = time.monotonic()
            self.processed_windows += 1
            self.last_stats = stats
            snap = self.publish_snapshot()
            if self.on_update is not None:
                try:
                    self.on_update(snap, stats)
                except Exception:
                    log.exception("on_update callback failed")

    def _run(self) -> None:
        while True:
            with self._cv:
                if not (self._stop or self._frames or self._pending_commands):
                    self._cv.wait(timeout=0.1)  # also wakes up periodically for window_period
                if self._stop:
                    return
                commands = list(self._pending_commands)
                self._pending_commands.clear()
            for cmd in commands:
                cmd()  # exceptions are returned to the caller of run_on_worker
            try:
                due = (self.window_period > 0 and self.buffer.num_pending > 0
                       and time.monotonic() - self._last_window_time >= self.window_period)
                self._drain(force=due)
            except Exception as exc:  # the worker thread must survive anything
                self._fault("the worker loop", exc)


def _select_frames(rec: WindowReconstruction, index: list[int]) -> WindowReconstruction:
    """The reconstruction of a subset of a window's frames (``index`` into ``rec.frames``)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=rec.depth.device)
    return dataclasses.replace(rec, frames=[rec.frames[i] for i in index], depth=rec.depth[idx],
                               confidence=rec.confidence[idx], intrinsics=rec.intrinsics[idx],
                               world_from_camera=rec.world_from_camera[idx])


def camera_centers(snapshot: MapSnapshot) -> np.ndarray:
    """(P, 3) visited camera centres of a snapshot (map frame, metres)."""
    return np.asarray(snapshot.camera_positions, dtype=np.float64).reshape(-1, 3)
