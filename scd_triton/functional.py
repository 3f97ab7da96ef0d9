"""Public functions: argument validation (the one place), padding and backend resolution.

Every public function and layer goes through ``scd_nd``, which validates the call and runs the
core op once (``ops.scd2d``); the op also normalises the kernels (``ŵ = w / (sqrt(Σw² +
norm_eps) + q)`` for ``scd2d``, none for ``scd2d_normalized``). ``scd1d`` is the 2-D case with
``H = R = 1``. No check here reads a tensor's values, so none synchronises a GPU; a call runs
them once per signature (``scd_nd``).
"""
import numbers
import os
import sys

import torch
from torch import Tensor

from . import constants, ops
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
            return (0, 0) * len(kernel_size)
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


@torch.compiler.assume_constant_result
def _triton_interpreter_on() -> bool:
    """TRITON_INTERPRET as Triton itself reads it (1/true/on, any case); a constant to
    ``torch.compile``, which cannot trace Triton's knobs."""
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


def _check_param(value, name, x, out_channels):
    """Validates p or q; returns a Python float's value as a float (the op fills it on the
    device), None for a tensor, whose values are the caller's job (reading them would sync)."""
    if not isinstance(value, Tensor):
        _check_scalar(value, name, positive=name == "p")
        value = float(value)             # an int, a numpy scalar
        _check_fits(value, name, compute_dtype(x.dtype))
        return value
    if value.device != x.device:
        raise RuntimeError(f"{name} is on {value.device} but x is on {x.device}")
    if value.dtype not in (torch.float32, x.dtype):
        cast = ", x's dtype under autocast" if ops.autocast_on(x.device.type) else ""
        raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}{cast}), got {value.dtype}")
    if value.shape not in ((), (out_channels,)):
        raise ValueError(f"{name} must have shape () or ({out_channels},) (out_channels), "
                         f"got {tuple(value.shape)}")
    return None


def _effective(p, q, p_value, q_value, x, out_channels):
    """Validated p and q as float tensors of shape [O] on x's device in the compute dtype (a
    shared value expanded): a Python float's value (``_check_param``) made into a tensor once
    per value (``constants.constant``: no allocation and no fill launch per call), a tensor
    converted."""
    dtype = compute_dtype(x.dtype)
    filled = (None, None)
    if p_value is not None or q_value is not None:
        def fill():   # one element expanded: the kernels read stride 0 as one value
            return [None if v is None else torch.full((1,), v, dtype=dtype, device=x.device)
                    .expand(out_channels) for v in (p_value, q_value)]
        filled = constants.constant(("p, q", p_value, q_value, out_channels, dtype), fill, x)
    return [_converted(t, dtype, out_channels) if f is None else f
            for t, f in zip((p, q), filled)]


def _converted(t, dtype, out_channels):
    """A validated p or q tensor in the compute ``dtype``, a 0-dim one expanded to [O]."""
    t = t if t.dtype == dtype else t.to(dtype)
    return t if t.dim() else t.expand(out_channels)


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


def _typed(value):
    """A hashable key that tells 1 from True and 1.0 (lists become tuples)."""
    if isinstance(value, (list, tuple)):   # tuple subclasses (torch.Size, ...) as tuples
        return (list if isinstance(value, list) else tuple, tuple(_typed(v) for v in value))
    return (type(value), value)


def _core_args(x_shape, w_shape, x_dtype, w_dtype, stride, padding, dilation, groups, eps,
               norm_eps, ndim):
    """Validates shapes and conv arguments; returns the 2-D ``(stride, padding, dilation,
    groups)`` of the core op."""
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


def _autocast_dtype(device_type):
    """The dtype ``torch.autocast`` casts to on ``device_type``; None where it is off."""
    return torch.get_autocast_dtype(device_type) if ops.autocast_on(device_type) else None


def _cast(t, dtype):
    """``t`` in the autocast ``dtype``, as conv2d takes it (float64 stays)."""
    return t if t.dtype in (dtype, torch.float64) else t.to(dtype)


def _param_key(value):
    """p's or q's part of a call's key: a tensor's metadata, or a Python value with its type."""
    return (Tensor, value.dtype, value.shape, value.device) if isinstance(value, Tensor) \
        else _typed(value)


def _plan(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, ndim,
          weight_norm, weight_norm_eps):
    """Validates a call (``x``, ``weight``: checked tensors, cast as autocast casts them); returns
    ``(op args, p's value, q's value, auto)``: the arguments of ``ops.scd2d`` from stride to
    the resolved backend, the values of a Python-float p and q (None for tensors, see
    ``_check_param``), and whether the backend was "auto"'s choice (``ops.scd2d`` then takes
    the reference where the kernels cannot run the call). It reads metadata only, never a
    tensor's values."""
    args = _core_args(x.shape, weight.shape, x.dtype, weight.dtype, stride, padding, dilation,
                      groups, eps, norm_eps, ndim)
    if weight_norm_eps is None:
        weight_norm_eps = norm_eps
    else:
        _check_scalar(weight_norm_eps, "weight_norm_eps", expected="a Python float")
        _check_fits(weight_norm_eps, "weight_norm_eps", compute_dtype(x.dtype))
    O = weight.shape[0]
    p_value, q_value = _check_param(p, "p", x, O), _check_param(q, "q", x, O)
    auto = _backend_setting(backend) == "auto"
    backend = resolve_backend(backend, x.device, x.dtype)
    if x.shape[1] == 0:   # no input channels: every sum is 0; the kernels have no K to tile
        backend = "reference"
    return ((*args, float(eps), float(norm_eps), weight_norm, float(weight_norm_eps), backend),
            p_value, q_value, auto)


_PLANS = {}   # a call's signature (everything _plan reads) -> its plan
_PLANS_MAX = 1024


def scd_nd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend, ndim,
           weight_norm="norm_q", weight_norm_eps=None):
    """Validates a call and runs the core op once; the public functions and layers call this.

    ``weight_norm`` says how the op normalises ``weight`` (``ops.WEIGHT_NORMS``): "norm_q"
    divides by ``sqrt(Σw² + weight_norm_eps) + q`` (scd2d), "norm" by ``sqrt(Σw² +
    weight_norm_eps)`` (the Rohrer layer), "none" takes it as given (scd2d_normalized).
    ``weight_norm_eps`` defaults to ``norm_eps``.

    A call validates once per signature (the tensors' types, shapes, dtypes and devices, the
    other arguments by type and value, ``$SCD_BACKEND`` and the autocast state): later calls
    alike cost one dictionary lookup (on a small layer the checks cost as much as the op).
    """
    if isinstance(x, Tensor) and x.dim() == ndim + 1:   # one unbatched sample, as conv2d takes
        return scd_nd(x.unsqueeze(0), weight, p, q, stride, padding, dilation, groups, eps,
                      norm_eps, backend, ndim, weight_norm, weight_norm_eps).squeeze(0)
    key = plan = None
    # (a traced call is validated once per graph; a jit trace's sizes may be tensors)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        try:
            cast = _autocast_dtype(x.device.type)
            # (scalars typed at the top only: a container there never validates)
            key = (type(x), type(weight), x.shape, weight.shape, x.dtype, weight.dtype, x.device,
                   weight.device, cast, _param_key(p), _param_key(q), _typed(stride),
                   _typed(padding), _typed(dilation), type(groups), groups, type(eps), eps,
                   type(norm_eps), norm_eps, type(weight_norm_eps), weight_norm_eps, weight_norm,
                   backend, os.environ.get("SCD_BACKEND"), ndim)
            plan = _PLANS.get(key)
        except Exception:   # not a tensor (an fx Proxy too), an unhashable argument, a nested
            key = None      # tensor's sizes: validated below, with the error naming it
    if plan is None:
        _check_tensors(x, weight, ndim)
        cast = _autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = _cast(x, cast), _cast(weight, cast)
    if plan is None:
        plan = _plan(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, backend,
                     ndim, weight_norm, weight_norm_eps)
        if key is not None:
            if len(_PLANS) >= _PLANS_MAX:   # ever new signatures (a p schedule): start over
                _PLANS.clear()
            _PLANS[key] = plan
    elif plan[0][-1] == "triton" and x.device.type == "cpu":
        resolve_backend("triton", x.device, x.dtype)   # TRITON_INTERPRET, read as Triton does
    args, p_value, q_value, auto = plan
    O = weight.shape[0]
    p_eff, q_eff = _effective(p, q, p_value, q_value, x, O)
    if ndim == 1:
        x, weight = x.unsqueeze(2), weight.unsqueeze(2)
    y = ops.scd2d(x, weight, p_eff, q_eff, args, auto)
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
