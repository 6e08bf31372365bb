"""Reconstruction backends: a window of frames -> per-frame depth, confidence, intrinsics and poses."""

from langgs_ros.reconstruction.base import Reconstructor, make_reconstructor

__all__ = ["Reconstructor", "make_reconstructor"]
