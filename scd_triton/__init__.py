"""Sharpened cosine similarity (SCS / SCD) layers: Triton kernels on CUDA, PyTorch on CPU."""
from . import compat, ops
from .functional import scd1d, scd1d_normalized, scd2d, scd2d_normalized
from .modules import SCD1d, SCD2d, MaxAbsPool1d, MaxAbsPool2d

__version__ = "0.1.0"
__all__ = ["scd2d", "scd1d", "scd2d_normalized", "scd1d_normalized", "SCD2d", "SCD1d",
           "MaxAbsPool2d", "MaxAbsPool1d", "compat"]
