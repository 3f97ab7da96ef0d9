"""The core op, one dispatch per call: the kernel normalisation and the SCD forward, and the
analytic backward of both (no autograd through intermediates).

``scd2d`` picks the path: under ``torch.compile`` the ``torch.library`` custom op
``scd_triton::scd2d_core`` (with ``scd2d_core_backward``), which the compiler traces whole; in
eager mode the same two functions as a plain ``torch.autograd.Function``, because the custom-op
dispatcher costs more host time per call than a small layer's kernels (under a ``torch.func``
transform, the reference backend only, one in the transforms' form); with nothing requiring
grad, the forward alone, storing ``y`` only. ``backend`` is already resolved ("reference" or
"triton") by ``functional``.

``weight_norm`` (``WEIGHT_NORMS``) says how ``weight`` becomes ŵ, see
``reference.normalize_weight`` (``kernels/weight.py`` on the triton backend); its Jacobian is
applied in the backward, so autograd keeps no weight-sized intermediate.
"""
import contextlib

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import reference
from .constants import under_func_transform
from .kernels.shapes import (compute_dtype, memory_format, output_hw, saved_c_format,
                             saved_norm_format)

WEIGHT_NORMS = ("none", "norm", "norm_q")


_MODULES = {"reference": reference}


def _backend(backend):
    """The module implementing ``backend``: ``reference`` or ``kernels``, both with
    ``scd2d_fwd`` and ``scd2d_bwd`` (kernel normalisation included)."""
    module = _MODULES.get(backend)
    if module is None:
        from . import kernels  # imported on first use: importing triton is slow
        module = _MODULES[backend] = kernels
    return module


_UNGUARDED = contextlib.nullcontext()


def autocast_on(device_type):
    """Whether autocast is on for ``device_type``; False where autocast does not exist (the
    meta device, on which a forward only works out shapes). CUDA and CPU always have it, and
    skip the availability check: torch.compile on torch 2.11 cannot trace it (fullgraph fails)."""
    if device_type in ("cuda", "cpu"):
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _guard(x):
    """The op runs on x's device, in its inputs' dtypes: kernels launch on x's GPU (not the
    current one) and autocast, if on, does not recast the op's internals."""
    device = x.device
    switch = device.type == "cuda" and device.index != torch.cuda.current_device()
    autocast = autocast_on(device.type)
    if not (switch or autocast):
        return _UNGUARDED
    stack = contextlib.ExitStack()
    if switch:
        stack.enter_context(torch.cuda.device(device))
    if autocast:
        stack.enter_context(torch.autocast(device.type, enabled=False))
    return stack


def forward(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, weight_norm,
            weight_norm_eps, backend, save_for_backward):
    """``(y, c, norm)``; ``c`` and ``norm`` are None unless ``save_for_backward``."""
    with _guard(x):
        return _backend(backend).scd2d_fwd(x, weight, p, q, stride, padding, dilation, groups,
                                           eps, norm_eps, weight_norm, weight_norm_eps,
                                           save_for_backward)


def backward(grad_y, x, weight, p, q, c, norm, stride, padding, dilation, groups, eps, weight_norm,
             weight_norm_eps, backend, need_grad_x=True, need_grad_params=True, c_is_free=False):
    """Gradients ``(x, weight, p, q)`` from what the forward saved; ``grad_x`` is None (and its
    GEMM skipped) unless ``need_grad_x``, as conv2d skips it for an input that needs no grad,
    and so are the other three (the weight GEMM skipped) unless ``need_grad_params``.
    ``c_is_free``: nothing reads ``c`` and ``norm`` after this call, so the backward may use
    their memory."""
    with _guard(x):
        return _backend(backend).scd2d_bwd(grad_y, x, weight, p, q, c, norm, stride, padding,
                                           dilation, groups, eps, weight_norm, weight_norm_eps,
                                           need_grad_x, need_grad_params, c_is_free)


@torch.library.custom_op("scd_triton::scd2d_core", mutates_args=())
def scd2d_core(x: Tensor, weight: Tensor, p: Tensor, q: Tensor, stride: list[int],
               padding: list[int], dilation: list[int], groups: int, eps: float, norm_eps: float,
               weight_norm: str, weight_norm_eps: float, backend: str,
               save_for_backward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, c, norm)`` of the core op, see :func:`forward`; c and norm empty (0,) tensors
    unless ``save_for_backward`` (an op returns tensors)."""
    y, c, norm = forward(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps,
                         weight_norm, weight_norm_eps, backend, save_for_backward)
    if c is None:
        c, norm = x.new_empty((0,)), x.new_empty((0,), dtype=compute_dtype(x.dtype))
    return y, c, norm


@scd2d_core.register_fake
def _(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps, weight_norm,
      weight_norm_eps, backend, save_for_backward):
    N, O = x.shape[0], weight.shape[0]
    OH, OW = output_hw(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    y = x.new_empty((N, O, OH, OW)).contiguous(memory_format=memory_format(x))
    if not save_for_backward:
        return y, x.new_empty((0,)), x.new_empty((0,), dtype=compute_dtype(x.dtype))
    norm = x.new_empty((N, groups, OH, OW), dtype=compute_dtype(x.dtype)).contiguous(
        memory_format=saved_norm_format(memory_format(x), weight.shape, groups, backend))
    return y, torch.empty_like(y, memory_format=saved_c_format(x, backend)), norm


@torch.library.custom_op("scd_triton::scd2d_core_backward", mutates_args=())
def scd2d_core_backward(grad_y: Tensor, x: Tensor, weight: Tensor, p: Tensor, q: Tensor, c: Tensor,
                        norm: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, eps: float, weight_norm: str, weight_norm_eps: float,
                        backend: str, need_grad_x: bool = True, need_grad_params: bool = True
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``(x, weight, p, q)``, see :func:`backward`; those not needed are empty
    (0,) tensors."""
    grads = backward(grad_y, x, weight, p, q, c, norm, stride, padding, dilation, groups, eps,
                     weight_norm, weight_norm_eps, backend, need_grad_x, need_grad_params)
    return tuple(t.new_empty((0,)) if g is None else g for g, t in zip(grads, (x, weight, p, q)))


@scd2d_core_backward.register_fake
def _(grad_y, x, weight, p, q, c, norm, stride, padding, dilation, groups, eps, weight_norm,
      weight_norm_eps, backend, need_grad_x=True, need_grad_params=True):
    grad_x = (torch.empty_like(x, memory_format=memory_format(x)) if need_grad_x else
              x.new_empty((0,)))
    if not need_grad_params:
        return grad_x, weight.new_empty((0,)), p.new_empty((0,)), q.new_empty((0,))
    return grad_x, torch.empty_like(weight), torch.empty_like(p), torch.empty_like(q)


def _save(ctx, leaves, c, norm, args):
    """Saves what the backward reads: the leaves (x, weight, p, q), ``c``, the norms and the
    op's arguments but ``norm_eps`` (``args``: stride to backend, as :func:`forward` takes
    them)."""
    stride, padding, dilation, groups, eps, _, weight_norm, weight_norm_eps, backend = args
    ctx.save_for_backward(*leaves, c, norm)
    ctx.args = (stride, padding, dilation, groups, eps, weight_norm, weight_norm_eps, backend)


def _setup_context(ctx, inputs, output):
    """The custom op's and ``_FuncSCD2d``'s: ``c`` and the norms are outputs, not
    differentiated. ``inputs``: the leaves, then the op's arguments as :func:`forward` takes
    them."""
    _y, c, norm = output
    ctx.mark_non_differentiable(c, norm)
    ctx.set_materialize_grads(False)   # no output-sized zero gradients for c and norm
    _save(ctx, inputs[:4], c, norm, inputs[4:13])


def _backward(ctx, grad_y, _grad_c, _grad_norm):
    if grad_y is None:
        return (None,) * 14
    x, weight, p, q, c, norm = ctx.saved_tensors
    needs = ctx.needs_input_grad
    need_x, need_params = needs[0], any(needs[1:4])
    grads = torch.ops.scd_triton.scd2d_core_backward(grad_y, x, weight, p, q, c, norm, *ctx.args,
                                                     need_x, need_params)
    return tuple(g if need else None for g, need in zip(grads, (need_x, *(need_params,) * 3))) \
        + (None,) * 10


scd2d_core.register_autograd(_backward, setup_context=_setup_context)


def _graph_is_kept():
    """Whether the running backward keeps the graph (``retain_graph``), so that a saved tensor
    may be read again; True where torch cannot say (as AOTAutograd reuses saved buffers only
    when this is False)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is None or torch.compiler.is_compiling() or keep_graph()


_NO_SECOND_DERIVATIVE = ("scd_triton's backward is analytic and has no derivative: second "
                         "derivatives (double backward, gradient penalties, nested "
                         "torch.func.grad, hessian) are not supported")


class _FirstOrderOnly(torch.autograd.Function):
    """The backward's gradients where a graph is being built (``create_graph=True``, a
    ``torch.func`` transform): copies whose own backward raises. ``grad_y`` and the op's
    inputs are inputs here too, so that differentiating a gradient by any of them meets it
    (``torch.autograd.function.once_differentiable`` ties the gradients to ``grad_y`` only,
    and ``y.sum()``'s needs no grad: the second derivative came out as zero). In the form
    ``torch.func`` takes (no ``ctx`` in ``forward``), vmapped as its clones are."""
    generate_vmap_rule = True

    @staticmethod
    def forward(count, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_SECOND_DERIVATIVE)


def _saved_backward(ctx, grad_y):
    """The eager Functions' backward: the op's analytic backward on what the forward saved,
    which has no graph (see ``_FirstOrderOnly``)."""
    x, weight, p, q, c, norm = ctx.saved_tensors
    needs = ctx.needs_input_grad
    building_graph = torch.is_grad_enabled()
    with torch.no_grad():
        grads = backward(grad_y, x, weight, p, q, c, norm, *ctx.args, needs[0], any(needs[1:4]),
                         not _graph_is_kept())
    if building_graph:
        present = [g for g in grads if g is not None]
        copies = iter(_FirstOrderOnly.apply(len(present), *present, grad_y, x, weight, p, q))
        grads = tuple(None if g is None else next(copies) for g in grads)
    return (*grads, None)


class _EagerSCD2d(torch.autograd.Function):
    """The custom op's forward and backward without the dispatcher (eager mode, grad needed).
    The non-tensor arguments come as one tuple: ``apply`` costs host time per argument."""

    @staticmethod
    def forward(ctx, x, weight, p, q, args):
        y, c, norm = forward(x, weight, p, q, *args, True)
        _save(ctx, (x, weight, p, q), c, norm, args)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _saved_backward(ctx, grad_y)


class _FuncSCD2d(torch.autograd.Function):
    """:class:`_EagerSCD2d` in the form ``torch.func`` transforms take (``grad``, ``vjp``; the
    reference backend): a forward without ``ctx`` that returns ``c`` and the norms as
    non-differentiable outputs, and ``setup_context``. Only under a transform: its ``apply``
    costs ~80 µs more host time per training step (2-core CPU). ``vmap`` runs its forward
    and backward, the reference's torch ops, over the batched dimension (per-sample gradients:
    ``vmap`` of ``grad`` over x); where an in-place op there would write a batched value into
    an unbatched tensor (``vmap`` over p or q, ``jacrev``), torch raises."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, p, q, args):
        return forward(x, weight, p, q, *args, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, (*inputs[:4], *inputs[4]), output)

    @staticmethod
    def backward(ctx, grad_y, _grad_c, _grad_norm):
        return (None,) * 5 if grad_y is None else _saved_backward(ctx, grad_y)


def _dual(*tensors):
    """Whether a forward-mode AD level is open and one of ``tensors`` carries a tangent."""
    return (getattr(forward_ad, "_current_level", -1) >= 0
            and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors))


def scd2d(x, weight, p, q, args, auto=False):
    """``y`` of the core op on validated arguments (p, q of shape [O]; ``args``: stride to
    backend, as :func:`forward` takes them), through the path that fits the call: the custom
    op under torch.compile, else an autograd.Function or the bare forward. Under a
    ``torch.func`` transform or with dual tensors the Triton kernels cannot run: the reference
    backend does if ``auto`` ("auto" chose Triton), else the call raises."""
    save = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or p.requires_grad or q.requires_grad)
    if torch.compiler.is_compiling():
        return torch.ops.scd_triton.scd2d_core(x, weight, p, q, *map(list, args[:3]), *args[3:],
                                               save)[0]
    transform = under_func_transform()
    if args[-1] == "triton" and (transform or _dual(x, weight, p, q)):
        if auto:
            args = (*args[:-1], "reference")
        elif _dual(x, weight, p, q):
            raise NotImplementedError("forward-mode AD (dual tensors) runs the reference "
                                      "backend only: the Triton kernels would drop the "
                                      "tangents; pass backend='reference' or 'auto' (or set "
                                      "SCD_BACKEND=reference)")
        else:
            raise NotImplementedError("torch.func transforms (grad, vjp, vmap, ...) run the "
                                      "reference backend only: they re-run a backward on "
                                      "wrapped tensors, which the Triton kernels cannot read; "
                                      "pass backend='reference' or 'auto' (or set "
                                      "SCD_BACKEND=reference)")
    if save:
        if transform:
            return _FuncSCD2d.apply(x, weight, p, q, args)[0]
        return _EagerSCD2d.apply(x, weight, p, q, args)
    return forward(x, weight, p, q, *args, False)[0]
