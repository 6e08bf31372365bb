"""The :class:`Reconstructor` interface and backend registry.

Backends (selected by the ``backend`` parameter):

- ``rgbd``: posed RGB-D input; depth, intrinsics and camera-to-world poses are taken from the frames
  (:mod:`langgs_ros.reconstruction.rgbd`).
- ``feedforward``: unposed, uncalibrated frames through a VGGT-class network, aligned into the map frame
  (:mod:`langgs_ros.reconstruction.feedforward`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from langgs_ros.types import Frame, WindowReconstruction


class Reconstructor(ABC):
    """Turns a window of S frames into a :class:`~langgs_ros.types.WindowReconstruction`.

    Implementations must not modify the frames, must run on the device they were configured with (CPU or
    CUDA from the same code path) and raise ``ValueError`` with a clear message on unusable input.
    """

    name: str = "base"

    @abstractmethod
    def reconstruct(self, frames: Sequence[Frame]) -> WindowReconstruction:
        """Reconstruct a window.

        Args:
            frames: S >= 1 frames of one image size.

        Returns:
            The window's depth (S, H, W) m, confidence (S, H, W), intrinsics (S, 3, 3) px and
            world_from_camera (S, 4, 4) poses, float32 tensors on the backend's device.

        Raises:
            ValueError: empty window, mixed image sizes, or missing inputs the backend needs.
        """


RECONSTRUCTORS: dict[str, Callable[..., Reconstructor]] = {}
"""Registry name -> factory; backends register themselves on import."""


def register_reconstructor(name: str) -> Callable[[Callable[..., Reconstructor]], Callable[..., Reconstructor]]:
    """Decorator adding a backend factory to :data:`RECONSTRUCTORS`."""

    def deco(factory: Callable[..., Reconstructor]) -> Callable[..., Reconstructor]:
        RECONSTRUCTORS[name] = factory
        return factory

    return deco


def make_reconstructor(name: str, **kwargs: object) -> Reconstructor:
    """Build a registered backend (``"rgbd"`` or ``"feedforward"``) with backend-specific keyword arguments.

    Raises:
        ValueError: unknown backend name.
    """
    import importlib

    for mod in ("rgbd", "feedforward"):
        try:
            importlib.import_module(f"langgs_ros.reconstruction.{mod}")
        except ModuleNotFoundError as exc:  # a backend whose module is not there yet
            if exc.name != f"langgs_ros.reconstruction.{mod}":
                raise
    if name not in RECONSTRUCTORS:
        raise ValueError(f"unknown reconstruction backend {name!r}; known: {sorted(RECONSTRUCTORS)}")
    return RECONSTRUCTORS[name](**kwargs)
