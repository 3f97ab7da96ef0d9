"""Pure-PyTorch core op: the CPU path (and float64), the same functions as ``kernels``.

The forward normalises the kernels (``normalize_weight``), then runs one ``conv2d`` for the dot
products, one box sum of ``x²`` (of its per-group channel sums, for groups of more than three
channels; a ones-kernel ``conv2d``, or ``avg_pool2d`` with divisor 1 over small single planes)
for the patch norms and one elementwise epilogue; no unfold. The
backward is the analytic formula of docs/DESIGN.md section 2 on the saved ``x``, weight, ``c``
and norms, then the normalisation's Jacobian, so autograd never keeps the output-sized
intermediates of the formula.

Shapes: ``x [N, C, H, W]``, ``weight [O, C/G, R, S]``, ``p, q [O]``; ``padding`` is
``(top, bottom, left, right)`` so that ``padding="same"`` with even kernels is exact.
Outputs: ``y, c [N, O, OH, OW]`` in the input dtype, ``norm [N, G, OH, OW]`` in the compute
dtype (float32, or float64 for float64 input).
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from .constants import constant
from .kernels.shapes import compute_dtype, every_input_read, memory_format, output_hw, tap_reads


def _pad_input(x, padding):
    """Returns (input for conv2d, conv2d's symmetric padding): pads explicitly only if asymmetric."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


def _pair(value):
    """conv2d's int-or-pair argument as a pair."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _box_sum_weight(groups, channels, kernel_size, like, dtype):
    """A ones kernel that sums each group's ``channels`` channels over an R×S window (``dtype``,
    on ``like``'s device)."""
    return like.new_ones((groups, channels, *kernel_size), dtype=dtype)


def _scalar(value, dtype):
    """``value`` as a 0-dim CPU tensor of ``dtype``, which serves as a scalar operand on any
    device (a Python float operand costs a conversion op per call on CPU)."""
    return torch.scalar_tensor(value, dtype=dtype, device="cpu")


def _box_channels(channels, groups):
    """The channels a group's patch-norm box sum convolves: all of them for up to 3, else 1
    (their sum, taken first: faster on CPU than a ones-kernel conv over all of them)."""
    return channels // groups if channels // groups <= 3 else 1


def _forward_constants(x, groups, kernel_size, eps, norm_eps, weight_norm_eps):
    """The forward's constant tensors: the box sum's ones kernel, its ``norm_eps`` bias (None
    for 0), ``eps`` and ``sqrt(weight_norm_eps)`` as scalars (see ``_scalar``); on CPU made
    once per call signature (``constants.constant``): on a small layer each costs as much as
    an op. On a GPU, where this backend is not the fast path, made per call: a call inside
    torch.compile's CUDA graphs (mode "reduce-overhead") runs under their memory pools, which
    a tensor kept beyond the call must not come from."""
    cdt, channels = compute_dtype(x.dtype), _box_channels(x.shape[1], groups)

    def make():
        ones = _box_sum_weight(groups, channels, kernel_size, x, cdt)
        bias = x.new_full((groups,), norm_eps, dtype=cdt) if norm_eps else None
        return ones, bias, _scalar(eps, cdt), _scalar(math.sqrt(weight_norm_eps), cdt)
    if x.device.type != "cpu":
        return make()
    return constant(("forward", groups, channels, *kernel_size, eps, norm_eps, weight_norm_eps,
                     cdt), make, x)


def _signed(magnitude, c):
    """sign(c) · magnitude with sign(0) = 0, in place on ``magnitude``."""
    return magnitude.mul_(c.sign())


def normalize_weight(weight, q, mode, eps, sqrt_eps=None, need_scale=True):
    """``(ŵ, scale)`` with ``ŵ = weight · scale`` per output channel (``scale [O]``, compute dtype).

    mode "norm_q": ``scale = 1 / (sqrt(Σw² + eps) + q)``; "norm": ``1 / sqrt(Σw² + eps)``;
    "none": ŵ is ``weight`` (scale None). A zero denominator (an all-zero kernel with
    ``eps = q = 0``) gives scale 0: that kernel matches nothing (y = 0) and gets no gradient.
    NaN in a kernel stays NaN, and an infinite norm (an Inf in the kernel) gives scale NaN; in
    mode "none" too, an Inf tap makes its whole kernel NaN. ``sqrt_eps``: ``sqrt(eps)`` as a
    scalar tensor, if the caller has one. Without ``need_scale`` (the forward) scale is None
    and, where ``sqrt(eps)`` is a normal float, ŵ is ``weight / denominator``: one op fewer.
    """
    if mode == "none":
        # Σ w·0 per kernel is 0, or NaN where a tap is ±Inf (or NaN)
        return weight + weight.mul(0).sum(tuple(range(1, weight.dim())), keepdim=True), None
    O, cdt = weight.shape[0], compute_dtype(weight.dtype)
    denom = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.dim())), dtype=cdt)
    if eps:
        # sqrt(Σw² + eps) in one op, not three (on a small layer an op's host time is its cost)
        denom = torch.hypot(denom, _scalar(math.sqrt(eps), cdt) if sqrt_eps is None else sqrt_eps)
    if mode == "norm_q":
        denom = denom.add_(q)
    # adding 0·denom makes an infinite norm (an Inf in the kernel) NaN, so ŵ and scale are NaN,
    # not 0: the whole kernel is undefined, not only its Inf tap
    denom = denom.add_(denom, alpha=0)
    shape = (O, *(1,) * (weight.dim() - 1))
    normal_eps = math.sqrt(eps) >= torch.finfo(cdt).tiny
    if not need_scale and normal_eps:
        w_hat, scale = weight / denom.view(shape), None
    else:
        # 1/0 = inf -> 0 (an all-zero kernel; no zero denominator where sqrt(eps) is a normal
        # number and q >= 0); NaN stays NaN
        scale = denom.reciprocal()
        if not normal_eps:
            scale = scale.nan_to_num_(nan=math.nan, posinf=0.0)
        w_hat = weight * scale.view(shape)
    return (w_hat if w_hat.dtype == weight.dtype else w_hat.to(weight.dtype)), scale


def normalize_weight_backward(grad_w_hat, weight, q, mode, eps, scale=None):
    """``(grad_weight, grad_q [O] or None)`` of :func:`normalize_weight` from ``grad_ŵ``.

    With ``n = sqrt(Σw² + eps)``, ``scale`` as in :func:`normalize_weight` (recomputed unless
    given) and ``k = Σ grad_ŵ · ŵ`` per channel: ``grad_w = (grad_ŵ − w · k / n) · scale``
    and, for "norm_q", ``grad_q = −k · scale`` (None for the other modes, where q does not
    enter ŵ). In this form no intermediate overflows for a tiny kernel, where scale² would.
    """
    if mode == "none":
        return grad_w_hat, None
    if scale is None:
        _, scale = normalize_weight(weight, q, mode, eps)
    O, cdt = weight.shape[0], scale.dtype
    w, g = weight.to(cdt).reshape(O, -1), grad_w_hat.to(cdt).reshape(O, -1)
    k = (g * w).sum(1).mul_(scale)                                    # Σ grad_ŵ · ŵ
    n = (w.square().sum(1) + eps).sqrt()
    coef = torch.where(n == 0, 0.0, k / n)
    grad_w = ((g - w * coef[:, None]) * scale[:, None]).view_as(weight).to(weight.dtype)
    grad_q = (-k * scale).to(q.dtype) if mode == "norm_q" else None
    return grad_w, grad_q


# (|c|+eps)^p on up to this many elements as pow (one op, less host time), beyond it as
# exp(p·ln(|c|+eps)): on CPU pow with an exponent per channel costs more per element (the
# crossover measured at 4096–12288 elements in float32 and 2048–4096 in float64, 2 threads)
POW_MAX_ELEMENTS = 2048


def _power(base, p):
    """``base ** p`` (``p`` broadcast per channel), in place on ``base``; a NaN in ``p`` gives
    NaN (torch's pow(1, NaN) is 1, so adding 0·p carries it)."""
    if base.numel() <= POW_MAX_ELEMENTS:
        return base.pow_(p).add_(p, alpha=0)
    return base.log_().mul_(p).exp_()


# a box sum over one plane a sample of up to this many elements is pooled (avg_pool2d with
# divisor 1), beyond it convolved: on CPU oneDNN's convolution of one channel costs ~50 µs more
# than pooling on small planes (4×1×8×8: 55 against 4 µs) and ~1.5× less on large ones
# (16×1×56×56: 150 against 255 µs; 2 threads)
POOL_MAX_ELEMENTS = 16384


def _poolable(padding, kernel_size, dilation):
    """Whether ``avg_pool2d`` can take a box sum's padding (at most half the kernel) and
    dilation (1)."""
    return _pair(dilation) == (1, 1) and all(0 <= p <= k // 2 for p, k in zip(padding,
                                                                                kernel_size))


def _patch_sum_squares(xp, groups, stride, padding, dilation, ones, bias):
    """Σ s² + norm_eps over each patch of each group's channels, ``[N, G, OH, OW]`` (conv2d's
    arguments; ``ones`` and ``bias`` from ``_forward_constants``: norm_eps as the convolution's
    bias, one op fewer). One plane a sample of up to ``POOL_MAX_ELEMENTS`` is pooled where
    pooling applies (dilation 1, padding within half the kernel)."""
    N, C, H, W = xp.shape
    sq = xp * xp
    if ones.shape[1] != C // groups:   # channel sums first, then the R×S box sum
        sq = sq.view(N, groups, C // groups, H, W).sum(2)
        kernel_size = tuple(ones.shape[-2:])
        if groups == 1 and N * H * W <= POOL_MAX_ELEMENTS and _poolable(padding, kernel_size,
                                                                        dilation):
            ssq = F.avg_pool2d(sq, kernel_size, stride, padding, divisor_override=1)
            return ssq if bias is None else ssq.add_(bias)
    return F.conv2d(sq, ones, bias, stride, padding, dilation, groups)


def _box_sum_transposed(grad, in_shape, kernel_size, stride, padding, dilation):
    """The adjoint of the patch box sum (``in_shape`` [N, G, H, W] from ``grad`` [N, G, OH,
    OW], conv2d's arguments): each input pixel's sum of ``grad`` over the patches that hold it.
    With one plane a sample at stride and dilation 1 that is a box sum itself, padded by
    ``k − 1 − p`` (``avg_pool2d`` with divisor 1, where that padding is at most half the kernel,
    as pooling requires): on CPU 1.4–10× faster than ``conv2d_input``, whose oneDNN path costs
    0.1–4 ms for one channel (measured from 4×1×8×8 to 64×1×56×56, 2 threads)."""
    G = in_shape[1]
    pool_pad = tuple(k - 1 - p for k, p in zip(kernel_size, padding))
    if G == 1 and _pair(stride) == (1, 1) and _poolable(pool_pad, kernel_size, dilation):
        return F.avg_pool2d(grad, kernel_size, 1, pool_pad, divisor_override=1)
    return conv2d_input(in_shape, _box_sum_weight(G, 1, kernel_size, grad, grad.dtype), grad,
                        stride, padding, dilation, G)


def _zero_unread(grad_x, out_hw, kernel_size, stride, padding, dilation):
    """Zeroes the gradient of the pixels that no patch reads: the x term put x·0 there, NaN
    where x is NaN or Inf. The masks are filled by slices on grad_x's device (no host copy)."""
    keep = None
    for dim, (out, k, s, pad, d) in enumerate(zip(out_hw, kernel_size, stride, padding[::2],
                                                  dilation)):
        size = grad_x.shape[2 + dim]
        read = torch.zeros(size, dtype=torch.bool, device=grad_x.device)
        for taps in tap_reads(size, out, k, s, pad, d):
            if taps is not None:
                read[taps] = True
        read = read.view(size, 1) if dim == 0 else read
        keep = read if keep is None else keep & read
    grad_x.masked_fill_(~keep, 0)


def scd2d_fwd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps,
              weight_norm="none", weight_norm_eps=0.0, save_for_backward=True):
    """``(y, c, norm)`` with ŵ normalised from ``weight`` (:func:`normalize_weight`); without
    ``save_for_backward`` c and norm are None. Few torch ops: on a small CPU layer each op costs
    more host time than its arithmetic."""
    O, _, R, S = weight.shape
    ones, bias, eps_scalar, sqrt_weight_eps = _forward_constants(x, groups, (R, S), eps, norm_eps,
                                                                 weight_norm_eps)
    w_hat, _ = normalize_weight(weight, q, weight_norm, weight_norm_eps, sqrt_weight_eps,
                                need_scale=False)
    cdt = compute_dtype(x.dtype)
    xc = x if x.dtype == cdt else x.to(cdt)
    N, C = x.shape[:2]
    G = groups
    xp, conv_pad = _pad_input(xc, padding)
    if C:
        d = F.conv2d(xp, w_hat if w_hat.dtype == cdt else w_hat.to(cdt), None, stride, conv_pad,
                     dilation, groups)
        ssq = _patch_sum_squares(xp, G, stride, conv_pad, dilation, ones, bias)
    else:  # conv2d returns no output channels for an input without channels: all sums are 0
        OH, OW = output_hw(x.shape[-2:], (R, S), stride, padding, dilation)
        d, ssq = xc.new_zeros(N, O, OH, OW), xc.new_full((N, G, OH, OW), norm_eps)
    OH, OW = d.shape[-2:]
    norm = ssq.sqrt_()                                               # [N, G, OH, OW]
    # ‖s‖ + q per output channel (output-sized), then c in d's memory: fresh output-sized
    # buffers cost page faults on CPU
    if G == 1:
        a = norm + q.view(O, 1, 1)
    else:
        # reshape: norm is channels-last when x is (conv2d's output follows its input)
        a = (norm.unsqueeze(2) + q.view(1, G, O // G, 1, 1)).reshape(N, O, OH, OW)
    c = d.div_(a)
    # y in a tensor of its own, not a view: the caller may modify the output in place
    y = _signed(_power(c.abs().add_(eps_scalar), p.view(O, 1, 1)), c)
    fmt = memory_format(x)
    as_output = lambda t: (t if t.dtype == x.dtype else t.to(x.dtype)).contiguous(memory_format=fmt)
    if not save_for_backward:
        return as_output(y), None, None
    return as_output(y), as_output(c), norm.contiguous()


def scd2d_bwd(grad_y, x, weight, p, q, c, norm, stride, padding, dilation, groups, eps,
              weight_norm="none", weight_norm_eps=0.0, need_grad_x=True, need_grad_params=True,
              c_is_free=False):
    """Gradients (x, weight, p, q) of the core op from the saved tensors (docs/DESIGN.md section 2),
    through the kernel normalisation's Jacobian (:func:`normalize_weight_backward`); grad_x is
    None unless ``need_grad_x``, the other three None unless ``need_grad_params``.
    ``c_is_free``: nothing reads ``c`` after this call, so a product is formed in its memory."""
    # mode "none": ŵ = weight, without the forward's NaN for a kernel with an Inf tap (that
    # channel's c is NaN already, and so are its gradients)
    w_hat, scale = ((weight, None) if weight_norm == "none" else
                    normalize_weight(weight, q, weight_norm, weight_norm_eps))
    cdt = compute_dtype(x.dtype)
    N, C, H, W = x.shape
    O, _, R, S = w_hat.shape
    G, Og = groups, O // groups
    OH, OW = c.shape[-2:]
    stride, dilation = _pair(stride), _pair(dilation)
    c5 = c.to(cdt).reshape(N, G, Og, OH, OW)
    gy5 = grad_y.to(cdt).reshape(N, G, Og, OH, OW)
    p5 = p.to(cdt).view(1, G, Og, 1, 1)
    # output-sized temporaries are dropped as soon as they are used (the peak memory of a step)
    zero = c5 == 0
    base = c5.abs().add_(eps)                                        # |c| + eps
    # (|c|+eps)^(p-1) as exp((p-1)·ln(|c|+eps)): on CPU half the time of pow with an exponent
    # per channel
    pow_pm1 = base.log().mul_(p5 - 1).exp_()
    # G = grad_y · p · (|c|+eps)^(p-1) · [d ≠ 0];  grad_d = G / a,  a = ‖s‖ + q
    grad_d = (gy5 * p5).mul_(pow_pm1).masked_fill_(zero, 0).div_(
        norm.unsqueeze(2) + q.to(cdt).view(1, G, Og, 1, 1))
    if need_grad_params:
        y = _signed(pow_pm1.mul_(base), c5)                          # reuses the forward's power
        # [d ≠ 0] as in G: with eps = 0, ln(0)·0 would be NaN where c = 0 (NaN in c stays NaN)
        grad_p = base.log_().mul_(y).mul_(gy5).masked_fill_(zero, 0).sum((0, 3, 4)).reshape(O)
        del y
    del base, pow_pm1, zero
    # G·c/a in c's memory when nothing reads c later (a converted copy of c is ours anyway)
    g_c_over_a = c5.mul_(grad_d) if c_is_free or c.dtype != cdt else grad_d * c5
    grad_norm = g_c_over_a.sum(2).neg_()                             # [N, G, OH, OW]
    if need_grad_params:
        grad_q = g_c_over_a.sum((0, 3, 4)).neg_().reshape(O)
    del g_c_over_a

    xc = x.to(cdt)
    xp, conv_pad = _pad_input(xc, padding)
    padded = xp is not xc                      # asymmetric padding, applied to xp
    if ((R, S) == (1, 1) and stride != (1, 1) and xp.device.type == "cpu"
            and not xp.is_contiguous()):
        # torch 2.13's oneDNN weight gradient of a strided 1×1 convolution of a channels-last
        # input corrupts the heap (7–15 channels at stride 3 crash; F.conv2d's backward too)
        xp = xp.contiguous()
    grad_d = grad_d.reshape(N, O, OH, OW)
    # grad_x's and grad_ŵ's convolutions in one call: on CPU a third faster than two
    grad_xp, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_d, xp, w_hat.to(cdt), None, stride, conv_pad, dilation, False, (0, 0), groups,
        (need_grad_x, need_grad_params, False))
    grad_x = None
    if need_grad_x:
        # an all-zero patch with norm_eps = 0 has ‖s‖ = 0 and grad_‖s‖ = 0: 0, not 0/0 (a norm,
        # the root of a sum of squares, is 0 or far above tiny; NaN stays NaN)
        box = _box_sum_transposed(grad_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                                  (N, G, *xp.shape[-2:]), (R, S), stride, conv_pad, dilation)
        grad_xp.view(N, G, C // G, *xp.shape[-2:]).addcmul_(
            xp.view(N, G, C // G, *xp.shape[-2:]), box.unsqueeze(2))
        top, _, left, _ = padding   # asymmetric padding was applied explicitly: crop it off
        grad_x = grad_xp[..., top:top + H, left:left + W] if padded else grad_xp
        if not every_input_read((H, W), (OH, OW), (R, S), stride, tuple(padding),
                                dilation):
            _zero_unread(grad_x, (OH, OW), (R, S), stride, padding, dilation)
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=memory_format(x))
    if not need_grad_params:
        return grad_x, None, None, None
    # grad_ŵ stays in the compute dtype: the Jacobian cancels its radial part
    grad_w, grad_q_kernel = normalize_weight_backward(grad_w, weight, q,
                                                      weight_norm, weight_norm_eps, scale)
    if grad_q_kernel is not None:
        grad_q = grad_q + grad_q_kernel
    if grad_w.dtype != weight.dtype or grad_w.stride() != weight.stride():
        grad_w = torch.empty_like(weight).copy_(grad_w)   # weight's dtype and layout (mode "none")
    return grad_x, grad_w, grad_p.to(p.dtype), grad_q.to(q.dtype)
