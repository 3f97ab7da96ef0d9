"""``torch.library`` registration of the core op, so that ``torch.compile`` traces it whole.

``scd_triton::scd2d_core`` returns ``(y, c, norm)``: the output and what the backward needs.
Its autograd formula calls ``scd_triton::scd2d_core_backward`` (the analytic backward on the
forward's backend: ``kernels.scd2d_bwd`` or ``reference.core_backward``). ``backend`` is
already resolved ("reference" or "triton") by
``functional``; both backends share the fake (shape) implementation below.
"""
import torch
from torch import Tensor

from . import reference
from .kernels.shapes import compute_dtype, memory_format, output_hw


def _forward_impl(backend):
    if backend == "reference":
        return reference.core_forward
    from .kernels import scd2d_fwd  # imported lazily: importing triton is slow
    return scd2d_fwd


@torch.library.custom_op("scd_triton::scd2d_core", mutates_args=())
def scd2d_core(x: Tensor, w_hat: Tensor, p: Tensor, q: Tensor, stride: list[int], padding: list[int],
               dilation: list[int], groups: int, eps: float, norm_eps: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Core op on pre-normalised kernels: ``(y, c, norm)``, see ``reference.core_forward``."""
    return _forward_impl(backend)(x, w_hat, p, q, stride, padding, dilation, groups, eps, norm_eps)


@scd2d_core.register_fake
def _(x, w_hat, p, q, stride, padding, dilation, groups, eps, norm_eps, backend):
    N, O = x.shape[0], w_hat.shape[0]
    OH, OW = output_hw(x.shape[-2:], w_hat.shape[-2:], stride, padding, dilation)
    fmt = memory_format(x)
    y = x.new_empty((N, O, OH, OW)).contiguous(memory_format=fmt)
    norm = x.new_empty((N, groups, OH, OW), dtype=compute_dtype(x.dtype))
    return y, torch.empty_like(y), norm


@torch.library.custom_op("scd_triton::scd2d_core_backward", mutates_args=())
def scd2d_core_backward(grad_y: Tensor, x: Tensor, w_hat: Tensor, p: Tensor, q: Tensor, c: Tensor,
                        norm: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, eps: float,
                        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``(x, w_hat, p, q)``, see ``reference.core_backward``; ``backend`` is
    the forward's."""
    if backend == "reference":
        backward = reference.core_backward
    else:
        from .kernels import scd2d_bwd as backward  # imported lazily, as the forward
    return backward(grad_y, x, w_hat, p, q, c, norm, stride, padding, dilation, groups, eps)


@scd2d_core_backward.register_fake
def _(grad_y, x, w_hat, p, q, c, norm, stride, padding, dilation, groups, eps, backend):
    grad_x = torch.empty_like(x, memory_format=memory_format(x))
    return grad_x, torch.empty_like(w_hat), torch.empty_like(p), torch.empty_like(q)


def _setup_context(ctx, inputs, output):
    x, w_hat, p, q, stride, padding, dilation, groups, eps, _norm_eps, backend = inputs
    _y, c, norm = output
    ctx.mark_non_differentiable(c, norm)
    ctx.set_materialize_grads(False)  # no output-sized zero gradients for c and norm
    ctx.save_for_backward(x, w_hat, p, q, c, norm)
    ctx.conv_args = (stride, padding, dilation, groups, eps, backend)


def _backward(ctx, grad_y, _grad_c, _grad_norm):
    x, w_hat, p, q, c, norm = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 11
    grads = torch.ops.scd_triton.scd2d_core_backward(grad_y, x, w_hat, p, q, c, norm, *ctx.conv_args)
    return (*grads, None, None, None, None, None, None, None)


scd2d_core.register_autograd(_backward, setup_context=_setup_context)
