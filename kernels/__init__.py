"""Triton kernels and their launchers (installed as ``scd_triton.kernels``)."""
from .fwd import scd2d_fwd, uses_direct_kernel

__all__ = ["scd2d_fwd", "uses_direct_kernel"]
