"""Kernel normalisation ``ŵ = w · scale`` and its Jacobian, one small launch each.

The forward writes ŵ straight into the layout the GEMM kernels read (any strides per group,
channel-in-group, input channel and tap), so normalising and re-laying out the weight costs one
launch per call instead of a chain of small torch ops. Per output channel ``o``:

    n = sqrt(Σ w_o² + eps);  scale = 1 / (n + q_o) (MODE 2, "norm_q"), 1 / n (MODE 1, "norm"),
    1 (MODE 0, "none");  a zero denominator gives scale 0 (an all-zero kernel matches nothing)
    grad_w = scale · grad_ŵ − w · k · scale² / n,  grad_q = − k · scale²,  k = Σ grad_ŵ · w
    (MODE 0: grad_w = grad_ŵ; the backward kernel still reduces a split-K workspace then)

NaN in a kernel stays NaN (the zero test is ``== 0``, false for NaN).
"""
import torch
import triton
import triton.language as tl

MODES = {"none": 0, "norm": 1, "norm_q": 2}


@triton.jit
def _scale(sumsq, q, eps, MODE: tl.constexpr):
    """(scale, n) per channel from Σw² (see the module docstring)."""
    n = tl.sqrt(sumsq + eps)
    if MODE == 2:
        denom = n + q
    else:
        denom = n
    zero = denom == 0
    scale = tl.where(zero, 0.0, 1.0 / tl.where(zero, 1.0, denom))
    if MODE == 0:
        scale = tl.full(sumsq.shape, 1.0, tl.float32)
    return scale, n


@triton.jit
def normalize_weight_kernel(
    W, Q, W_HAT, SCALE, O, K, RS, Og, sq, s_g, s_j, s_c, s_t, eps,
    MODE: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):
    """ŵ[o, c, tap] = w[o, c, tap] · scale[o], written at ``g·s_g + j·s_j + c·s_c + tap·s_t``
    (``o = g·Og + j``); W is [O, K = C/G·R·S] contiguous, Q has stride ``sq`` (0 when shared).
    Also stores scale [O] (float32)."""
    i_o = tl.program_id(0)
    o_o = i_o * BO + tl.arange(0, BO)                                    # [BO]
    m_o = o_o < O
    o_k = tl.arange(0, BK)
    p_w = W + o_o.to(tl.int64)[:, None] * K                              # [BO, 1]
    sumsq = tl.zeros((BO,), dtype=tl.float32)
    if MODE != 0:
        for k0 in range(0, K, BK):
            m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
            b_w = tl.load(p_w + (k0 + o_k)[None, :], mask=m, other=0.0).to(tl.float32)  # [BO, BK]
            sumsq += tl.sum(b_w * b_w, axis=1)
    b_q = tl.load(Q + o_o * sq, mask=m_o, other=0.0)
    b_scale, _ = _scale(sumsq, b_q, eps, MODE)
    tl.store(SCALE + o_o, b_scale, mask=m_o)
    o_dst = (o_o // Og).to(tl.int64) * s_g + (o_o % Og).to(tl.int64) * s_j       # [BO]
    for k0 in range(0, K, BK):
        o_kk = k0 + o_k                                                   # [BK] (c, tap)
        m = m_o[:, None] & (o_kk < K)[None, :]
        b_w = tl.load(p_w + o_kk[None, :], mask=m, other=0.0).to(tl.float32)
        o_c = o_kk // RS
        p_dst = W_HAT + o_dst[:, None] + (o_c * s_c + (o_kk - o_c * RS) * s_t)[None, :]
        tl.store(p_dst, (b_w * b_scale[:, None]).to(W_HAT.dtype.element_ty), mask=m)


@triton.jit
def normalize_weight_backward_kernel(
    GW_HAT, W, Q, GW, GQ, O, K, SPLITS, sq, eps,
    MODE: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
):
    """grad_w and grad_q (MODE 2) from grad_ŵ, given as SPLITS partial sums [SPLITS, O, K]
    (the split-K workspace of the weight-gradient GEMM, reduced here); W, GW are [O, K]."""
    i_o = tl.program_id(0)
    o_o = i_o * BO + tl.arange(0, BO)
    m_o = o_o < O
    o_k = tl.arange(0, BK)
    row = o_o.to(tl.int64)[:, None] * K                                  # [BO, 1]
    sumsq = tl.zeros((BO,), dtype=tl.float32)
    dot = tl.zeros((BO,), dtype=tl.float32)
    if MODE != 0:
        for k0 in range(0, K, BK):
            m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
            b_w = tl.load(W + row + (k0 + o_k)[None, :], mask=m, other=0.0).to(tl.float32)
            b_g = _split_sum(GW_HAT, row + (k0 + o_k)[None, :], m, O * K, SPLITS)
            sumsq += tl.sum(b_w * b_w, axis=1)
            dot += tl.sum(b_g * b_w, axis=1)
    b_q = tl.load(Q + o_o * sq, mask=m_o, other=0.0)
    b_scale, b_n = _scale(sumsq, b_q, eps, MODE)
    b_coef = tl.where(b_n == 0, 0.0, dot * b_scale * b_scale / tl.where(b_n == 0, 1.0, b_n))
    if MODE == 2:
        tl.store(GQ + o_o, -dot * b_scale * b_scale, mask=m_o)
    for k0 in range(0, K, BK):
        m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
        b_g = _split_sum(GW_HAT, row + (k0 + o_k)[None, :], m, O * K, SPLITS)
        if MODE == 0:
            b_gw = b_g
        else:
            b_w = tl.load(W + row + (k0 + o_k)[None, :], mask=m, other=0.0).to(tl.float32)
            b_gw = b_g * b_scale[:, None] - b_w * b_coef[:, None]
        tl.store(GW + row + (k0 + o_k)[None, :], b_gw.to(GW.dtype.element_ty), mask=m)


@triton.jit
def _split_sum(P, offsets, mask, split_stride, SPLITS):
    """Σ over the SPLITS partial sums at ``offsets``, in float32, in a fixed order."""
    acc = tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
    for _ in range(1, SPLITS):
        P += split_stride                          # 64-bit pointer steps: no int32 product
        acc += tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
    return acc


def _blocks(O, K):
    """(BO, BK): a few channels per program, the kernel's row in chunks of up to 256."""
    BK = max(16, min(256, triton.next_power_of_2(K)))
    return 4, BK


def normalize_weight(w, q, mode, eps, out=None, out_strides=None, groups=1):
    """``(ŵ, scale)``: ŵ written into ``out`` (default: a new tensor shaped like ``w``) at
    ``out_strides = (per group, per channel in group, per input channel, per tap)``. Mode
    "none" without ``out`` returns ``w`` itself (no launch)."""
    if mode == "none" and out is None:
        return w, None
    O, Cg, R, S = w.shape
    K, RS = Cg * R * S, R * S
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        out_strides = (O // groups * K, K, RS, 1)
    scale = torch.empty(O, dtype=torch.float32, device=w.device)
    BO, BK = _blocks(O, K)
    normalize_weight_kernel[(triton.cdiv(O, BO),)](
        w.contiguous(), q, out, scale, O, K, RS, O // groups, q.stride(0), *out_strides, eps,
        MODE=MODES[mode], BO=BO, BK=BK, num_warps=4, num_stages=1)
    return out, scale


def normalize_weight_backward(grad_w_hat, w, q, mode, eps, splits=1):
    """``(grad_w, grad_q or None)`` of :func:`normalize_weight`; ``grad_w_hat`` may hold
    ``splits`` partial sums ([splits, *w.shape], e.g. a split-K workspace), reduced here."""
    if mode == "none" and splits == 1 and grad_w_hat.dtype == w.dtype:
        return grad_w_hat.view_as(w), None
    O = w.shape[0]
    K = w[0].numel()
    grad_w = torch.empty_like(w, memory_format=torch.contiguous_format)
    grad_q = torch.empty(O, dtype=torch.float32, device=w.device) if mode == "norm_q" else None
    BO, BK = _blocks(O, K)
    normalize_weight_backward_kernel[(triton.cdiv(O, BO),)](
        grad_w_hat.contiguous(), w.contiguous(), q, grad_w, grad_q if grad_q is not None else q,
        O, K, splits, q.stride(0), eps, MODE=MODES[mode], BO=BO, BK=BK, num_warps=8,
        num_stages=1)   # 4 warps spill 16 B in float32 on sm_90 (kernel report)
    return grad_w, grad_q


def report_jobs():
    """The two kernels for a 3×3 128→128 layer (mode norm_q), for ``kernels/report.py``."""
    O, K, RS = 128, 128 * 9, 9
    BO, BK = _blocks(O, K)
    jobs = []
    for dtype in ("bf16", "fp16", "fp32"):
        dt = f"*{dtype}"
        jobs.append(dict(kernel=normalize_weight_kernel, name=f"BO{BO}-BK{BK}-w4", dtype=dtype,
                         ints=dict(O=O, K=K, RS=RS, Og=O, sq=1, s_g=O * K, s_j=1, s_c=O,
                                   s_t=O * 128),
                         constexprs=dict(MODE=2, BO=BO, BK=BK),
                         pointer_dtypes=dict(W=dt, Q="*fp32", W_HAT=dt, SCALE="*fp32"),
                         num_warps=4, num_stages=1))
        jobs.append(dict(kernel=normalize_weight_backward_kernel, name=f"BO{BO}-BK{BK}-w8",
                         dtype=dtype, ints=dict(O=O, K=K, SPLITS=4, sq=1),
                         constexprs=dict(MODE=2, BO=BO, BK=BK),
                         pointer_dtypes=dict(GW_HAT="*fp32", W=dt, Q="*fp32", GW=dt, GQ="*fp32"),
                         num_warps=8, num_stages=1))
    return jobs
