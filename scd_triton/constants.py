"""Small constant tensors made once and reused by later calls: a Python-float p or q as an
[O] tensor (``functional``), the reference backend's ones kernels and scalars. On a small layer
each torch op's host time is its whole cost, and making a tensor is one op.

A constant is kept only for a plain eager call (see :func:`reusable`): not while torch.compile,
``torch.jit.trace``, a ``torch.func`` transform, a dispatch mode (fake tensors, ``make_fx``) or
a tensor subclass is in play, where the tensor made is the tracer's. It is made outside
inference mode, so that a later training call can save it for backward, and never changed. On
CUDA the current stream is in its key (a call on another stream must not read it before its
fill has run), and one made during CUDA-graph capture is not kept (its fill runs only when the
graph does).
"""
import torch
from torch import Tensor

_CACHE = {}    # (key, device, CUDA stream) -> tensor
_CACHE_MAX = 256


def under_func_transform():
    """Whether a ``torch.func`` transform (grad, vjp, vmap, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def reusable(x):
    """Whether a constant made for a call on ``x`` may serve later calls (see the module)."""
    return (type(x) is Tensor and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._len_torch_dispatch_stack() and not under_func_transform())


def constant(key, make, like):
    """``make()``, a tensor on ``like``'s device (or a 0-dim CPU tensor, which serves as a
    scalar on any device), made once per ``key`` (which says everything ``make`` depends on
    but the device) where the call is :func:`reusable`."""
    if not reusable(like):
        return make()
    device = like.device
    cuda = device.type == "cuda"
    full_key = (key, device, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    t = _CACHE.get(full_key)
    if t is None:
        with torch.inference_mode(False):
            t = make()
        if not (cuda and torch.cuda.is_current_stream_capturing()):
            if len(_CACHE) >= _CACHE_MAX:   # ever new values (a schedule of p): start over
                _CACHE.clear()
            _CACHE[full_key] = t
    return t
