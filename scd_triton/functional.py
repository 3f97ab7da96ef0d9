"""Public functions: argument validation (the one place), padding and backend resolution.

Every public function and layer goes through ``scd_nd``, which validates the call and runs the
core op once (``ops.scd2d``); the op also normalises the kernels (``ŵ = w / (sqrt(Σw² +
norm_eps) + q)`` for ``scd2d``, none for ``scd2d_normalized``). ``scd1d`` is the 2-D case with
``H = R = 1``. No check here reads a tensor's values, so none synchronises a GPU.
"""
import functools
import numbers
import os
import sys

import torch
from torch import Tensor

from . import ops
from .kernels.shapes import compute_dtype, output_hw

BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tuple(value, n, name):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, tuple, list)):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    values = (int(value),) * n if isinstance(value, numbers.Integral) else tuple(value)
    if len(values) != n or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                   for v in values):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return tuple(int(v) for v in values)


def _positive(value, n, name):
    values = _tuple(value, n, name)
    if min(values) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return values


def resolve_padding(padding, kernel_size, stride, dilation):
    """Per-side padding ``(top, bottom, left, right)``; "same" pads as ``nn.Conv2d`` does."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
        sides = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return tuple(sides)
    pads = _tuple(padding, len(kernel_size), "padding")
    if min(pads) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return tuple(side for pad in pads for side in (pad, pad))


def _backend_setting(backend):
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (or None), got {backend!r}")
        return backend
    backend = os.environ.get("SCD_BACKEND") or "auto"   # an empty value means unset
    if backend not in BACKENDS:
        raise ValueError(f"environment variable SCD_BACKEND must be one of {BACKENDS} (or unset), "
                         f"got {backend!r}")
    return backend


def _triton_interpreter_on() -> bool:
    """TRITON_INTERPRET as Triton itself reads it (1/true/on, any case)."""
    from triton import knobs
    return bool(knobs.runtime.interpret)


def resolve_backend(backend, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """"reference" or "triton" for this call; ``None`` reads ``SCD_BACKEND`` (default "auto").

    "auto" takes the kernels for CUDA tensors of float16 / bfloat16 / float32 and the reference
    otherwise (CPU tensors, float64).
    """
    backend = _backend_setting(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "reference"
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' runs float16, bfloat16 and float32; float64 runs "
                            "with backend='reference' (or 'auto')")
        if device.type == "cpu":
            if not _triton_interpreter_on():
                raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                                   "before triton is imported (Triton's interpreter); use "
                                   "backend='reference' or CUDA tensors")
            if dtype == torch.bfloat16:
                raise TypeError("backend='triton' on CPU runs in Triton's interpreter, which "
                                "computes bfloat16 wrongly; use float16 / float32 there, or "
                                "backend='reference'")
        elif device.type != "cuda":
            raise RuntimeError(f"backend='triton' runs on CUDA tensors, got device {device}")
    return backend


def _check_scalar(value, name, positive=False, expected="a float or a tensor"):
    """A finite Python float >= 0 (> 0 if ``positive``); values inside tensors are not read."""
    if type(value) is not float and (isinstance(value, bool)   # a float skips the ABC check
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    # comparisons, which NaN, Inf and ints past float's range fail (not math.isfinite, which
    # torch.compile cannot trace on a float it made dynamic)
    if not ((value > 0 if positive else value >= 0) and value <= sys.float_info.max):
        raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0, "
                         f"got {value!r}")


_LARGEST = {dtype: torch.finfo(dtype).max for dtype in (torch.float32, torch.float64)}


def _check_fits(value, name, dtype):
    """A validated Python float that the op holds in the compute ``dtype`` must not overflow."""
    if value > _LARGEST[dtype]:
        raise ValueError(f"{name} must fit in {dtype}, the compute dtype of x's dtype, "
                         f"got {value!r}")


_FILLED = {}   # (value, O, dtype, device, CUDA stream) -> the [O] tensor of a Python-float p or q
_FILLED_MAX = 64


def _filled(value, n, dtype, x, traced):
    """``value`` as an [n] tensor on x's device: one element expanded (stride 0, which the
    forward kernel reads as one value for every channel), made once per (value, n, dtype, device,
    current CUDA stream): a Python-float p or q then costs no allocation and no fill launch per
    call. The op only reads it. Kept only for plain eager calls: not while ``traced`` by
    torch.compile or tracing otherwise (tensor subclasses such as fake tensors, symbolic
    sizes, dispatch modes, functorch transforms), and not when made during CUDA-graph capture
    (the fill has not run outside the graph); made outside inference mode, so that a later
    training call can save it for backward. The stream is in the key: a call on another stream
    must not read it before the fill on the first one has run."""
    device = x.device
    plain = (not traced and type(x) is Tensor and isinstance(n, int)
             and not torch._C._len_torch_dispatch_stack() and not ops.under_func_transform())
    if not plain:
        return torch.full((1,), value, dtype=dtype, device=device).expand(n)
    cuda = device.type == "cuda"
    key = (value, n, dtype, device, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    t = _FILLED.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.full((1,), value, dtype=dtype, device=device).expand(n)
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            if len(_FILLED) >= _FILLED_MAX:   # ever new values (a schedule): start over
                _FILLED.clear()
            _FILLED[key] = t
    return t


def _effective(value, name, x, out_channels, traced):
    """p or q as a float tensor of shape [O] on x's device (a shared value is expanded).

    A Python float is validated here and filled on the device (no host-to-device copy, so no
    synchronisation; once per value, see ``_filled``, unless ``traced`` by torch.compile); the
    values of a tensor are the caller's job (reading them would sync).
    """
    dtype = compute_dtype(x.dtype)
    if not isinstance(value, Tensor):
        _check_scalar(value, name, positive=name == "p")
        if type(value) is not float:     # an int, a numpy scalar
            value = float(value)
        _check_fits(value, name, dtype)
        return _filled(value, out_channels, dtype, x, traced)
    if value.device != x.device:
        raise RuntimeError(f"{name} is on {value.device} but x is on {x.device}")
    if value.dtype not in (torch.float32, x.dtype):
        cast = ", x's dtype under autocast" if ops.autocast_on(x.device.type) else ""
        raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}{cast}), got {value.dtype}")
    if value.shape not in ((), (out_channels,)):
        raise ValueError(f"{name} must have shape () or ({out_channels},) (out_channels), "
                         f"got {tuple(value.shape)}")
    if value.dtype != dtype:
        value = value.to(dtype)
    return value if value.dim() else value.expand(out_channels)


def _check_tensors(x, weight, ndim):
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if x.dim() != ndim + 2:
        layout = "[N, C, H, W]" if ndim == 2 else "[N, C, L]"
        raise ValueError(f"x must be {ndim + 2}-D {layout} (or {ndim + 1}-D, one unbatched "
                         f"sample), got shape {tuple(x.shape)}")
    if weight.dim() != ndim + 2:
        raise ValueError(f"weight must be {ndim + 2}-D [O, C/groups, *kernel], got shape "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise RuntimeError(f"weight is on {weight.device} but x is on {x.device}")


def _core_args(x, weight, stride, padding, dilation, groups, eps, norm_eps, ndim, traced):
    """Validates shapes and conv arguments; returns the 2-D ``(stride, padding, dilation,
    groups)`` of the core op. Cached per distinct call signature: a layer validates its
    arguments once, later calls cost one dictionary lookup."""
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype, _typed(stride),
           _typed(padding), _typed(dilation), _typed(groups), _typed(eps), _typed(norm_eps), ndim)
    if traced:   # by torch.compile, once per graph: no cache needed
        return _geometry.__wrapped__(key)
    try:
        return _geometry(key)
    except TypeError:      # an unhashable argument: validate without the cache
        return _geometry.__wrapped__(key)


def _typed(value):
    """A hashable key that tells 1 from True and 1.0 (lists become tuples)."""
    if isinstance(value, (list, tuple)):   # tuple subclasses (torch.Size, ...) as tuples
        return (list if isinstance(value, list) else tuple, tuple(_typed(v) for v in value))
    return (type(value), value)


def _untyped(key):
    kind, value = key
    return kind(_untyped(v) for v in value) if kind in (list, tuple) else value


@functools.lru_cache(maxsize=4096)
def _geometry(key):
    x_shape, w_shape, x_dtype, w_dtype, stride, padding, dilation, groups, eps, norm_eps, ndim = key
    stride, padding, dilation, groups, eps, norm_eps = map(
        _untyped, (stride, padding, dilation, groups, eps, norm_eps))
    if w_dtype != x_dtype:
        raise TypeError(f"weight dtype {w_dtype} does not match x dtype {x_dtype}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C, O = x_shape[1], w_shape[0]
    if C % groups or O % groups:
        raise ValueError(f"in_channels ({C}) and out_channels ({O}) must be divisible by "
                         f"groups ({groups})")
    if w_shape[1] != C // groups:
        raise ValueError(f"weight.shape[1] must be C/groups = {C // groups}, got {w_shape[1]}")
    if min(w_shape[2:]) < 1 or O < 1:
        raise ValueError(f"weight must have a non-empty kernel and out_channels, got {w_shape}")
    _check_scalar(eps, "eps", expected="a Python float")
    _check_scalar(norm_eps, "norm_eps", expected="a Python float")
    _check_fits(eps, "eps", compute_dtype(x_dtype))
    _check_fits(norm_eps, "norm_eps", compute_dtype(x_dtype))
    stride = _positive(stride, ndim, "stride")
    dilation = _positive(dilation, ndim, "dilation")
    kernel = tuple(w_shape[2:])
    pads = resolve_padding(padding, kernel, stride, dilation)
    if ndim == 1:  # the 2-D case with H = R = 1
        stride, dilation, kernel, pads = (1, *stride), (1, *dilation), (1, *kernel), (0, 0, *pads)
    x_hw = x_shape[-2:] if ndim == 2 else (1, x_shape[-1])
    if min(x_hw) < 1:   # (conv2d pads it, then refuses it)
        raise ValueError(f"x must have non-empty spatial dimensions, got shape {x_shape}")
    out_hw = output_hw(x_hw, kernel, stride, pads, dilation)
    if min(out_hw) < 1:
        raise ValueError(f"output size {out_hw} is < 1 for input {x_shape}, kernel {kernel}, "
                         f"stride {stride}, padding {pads}, dilation {dilation}")
    return stride, pads, dilation, int(groups)


def _autocast(x, weight):
    """Casts to the autocast dtype, as conv2d does under ``torch.autocast`` (float64 stays)."""
    device_type = x.device.type
    if ops.autocast_on(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: t if t.dtype == torch.float64 else t.to(dtype)
        return cast(x), cast(weight)
    return x, weight


def scd_nd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, ndim,
           weight_norm="norm_q", weight_norm_eps=None):
    """Validates a call and runs the core op once; the public functions and layers call this.

    ``weight_norm`` says how the op normalises ``weight`` (``ops.WEIGHT_NORMS``): "norm_q"
    divides by ``sqrt(Σw² + weight_norm_eps) + q`` (scd2d), "norm" by ``sqrt(Σw² +
    weight_norm_eps)`` (the Rohrer layer), "none" takes it as given (scd2d_normalized).
    ``weight_norm_eps`` defaults to ``norm_eps``.
    """
    if isinstance(x, Tensor) and x.dim() == ndim + 1:   # one unbatched sample, as conv2d takes
        return scd_nd(x.unsqueeze(0), weight, p, q, stride, padding, dilation, groups, eps,
                      norm_eps, backend, ndim, weight_norm, weight_norm_eps).squeeze(0)
    _check_tensors(x, weight, ndim)
    x, weight = _autocast(x, weight)
    traced = torch.compiler.is_compiling()
    args = _core_args(x, weight, stride, padding, dilation, groups, eps, norm_eps, ndim, traced)
    if weight_norm_eps is None:
        weight_norm_eps = norm_eps
    else:
        _check_scalar(weight_norm_eps, "weight_norm_eps", expected="a Python float")
        _check_fits(weight_norm_eps, "weight_norm_eps", compute_dtype(x.dtype))
    O = weight.shape[0]
    p_eff, q_eff = _effective(p, "p", x, O, traced), _effective(q, "q", x, O, traced)
    backend = resolve_backend(backend, x.device, x.dtype)
    if x.shape[1] == 0:   # no input channels: every sum is 0; the kernels have no K to tile
        backend = "reference"
    if ndim == 1:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
    y = ops.scd2d(x, weight, p_eff, q_eff, *args, float(eps), float(norm_eps), weight_norm,
                  float(weight_norm_eps), backend)
    if ndim == 1:   # contiguous as conv1d's, also when x's channels were contiguous
        y = y.squeeze(2)
        return y if y.is_contiguous() else y.contiguous()
    return y


def scd2d_normalized(x, w_hat, p, q, stride=1, padding=0, dilation=1, groups=1, eps=1e-12,
                     norm_eps=1e-12, backend=None):
    """The core op on pre-normalised kernels ``w_hat`` (docs/DESIGN.md section 1).

    ``y = sign(d) · (|d / (‖s‖ + q)| + eps) ** p`` with ``d = s · ŵ`` the conv2d output and
    ``‖s‖ = sqrt(Σ s² + norm_eps)`` the norm of each patch over its group's channels.
    Arguments and shapes as :func:`scd2d`.
    """
    return scd_nd(x, w_hat, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, 2, "none")


def scd2d(x, weight, p, q, stride=1, padding=0, dilation=1, groups=1, eps=1e-12, norm_eps=1e-12,
          backend=None):
    """Sharpened cosine similarity of each patch of ``x`` with each kernel of ``weight``.

    Args:
        x: ``[N, C, H, W]`` float16 / bfloat16 / float32 / float64 (NCHW or channels_last),
            or one unbatched sample ``[C, H, W]`` (as conv2d takes it).
        weight: ``[O, C/groups, R, S]``, same dtype and device as ``x``.
        p: sharpening exponent, ``> 0``: a float or a tensor of shape ``()`` or ``[O]``.
        q: norm offset, ``>= 0``, added to both the patch and the kernel norms; same shapes.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d``; padding also
            takes ``"same"`` (stride 1) and ``"valid"``.
        eps: added to ``|cos|`` before the power; norm_eps: added to ``Σ s²`` and ``Σ w²``.
        backend: ``None`` (``$SCD_BACKEND`` or "auto"), "auto", "reference" or "triton".
    Returns:
        ``[N, O, OH, OW]`` in ``x``'s dtype and memory format.
    Example::
        >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> scd2d(x, w, p=2.0, q=0.1, padding="same").shape
        torch.Size([2, 4, 8, 8])
    """
    return scd_nd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, 2)


def scd1d(x, weight, p, q, stride=1, padding=0, dilation=1, groups=1, eps=1e-12, norm_eps=1e-12,
          backend=None):
    """1-D :func:`scd2d`: ``x [N, C, L]``, ``weight [O, C/groups, K]`` -> ``[N, O, L_out]``."""
    return scd_nd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, 1)


def scd1d_normalized(x, w_hat, p, q, stride=1, padding=0, dilation=1, groups=1, eps=1e-12,
                     norm_eps=1e-12, backend=None):
    """1-D :func:`scd2d_normalized`."""
    return scd_nd(x, w_hat, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, 1, "none")
