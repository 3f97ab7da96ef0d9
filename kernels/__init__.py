"""Triton kernels and their launchers (installed as ``scd_triton.kernels``).

Launchers are imported lazily, so that ``scd_triton.kernels.shapes`` (used by the pure-PyTorch
path) does not import Triton.
"""
_LAUNCHERS = {"scd2d_fwd": "fwd", "scd2d_bwd": "bwd", "uses_direct_kernel": "shapes",
              "normalize_weight": "weight", "normalize_weight_backward": "weight"}

__all__ = list(_LAUNCHERS)


def __getattr__(name):
    if name in _LAUNCHERS:
        import importlib
        value = getattr(importlib.import_module(f".{_LAUNCHERS[name]}", __name__), name)
        globals()[name] = value   # later lookups skip this hook (it costs an import per call)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
