"""Forward of the SCD core op: ``(y, c, norm)`` in one launch, no unfold, no extra norm pass.

Two kernels:
- ``scd2d_fwd_kernel``: implicit GEMM, ``M = N·OH·OW`` positions × ``O/G`` channels of group G
  (grid axis 2) × ``K = (C/G)·R·S``. The K loop runs over (tap, channel block) pairs; each step
  loads an ``x`` tile [BM, BK] through index arithmetic (padding is the load mask), feeds it to
  ``tl.dot`` and adds its squares to ``Σ s²`` in float32 from the same registers.
- ``scd2d_fwd_direct_kernel``: groups with very few channels (depthwise): no GEMM to speak of, a
  memory-bound multiply-accumulate over (channel, tap) on [BM, BO] tiles of global channels.
Both end in the same epilogue (``_common.sharpen``) and store ``y`` and ``c`` in the input dtype
and the per-(n, group, position) norms in float32.
"""
import torch
import triton
import triton.language as tl

from .shapes import memory_format, output_hw  # the layout and sizes the fake op promises
from ._common import output_positions, sharpen
from .weight import normalize_weight


@triton.jit(do_not_specialize=["N", "M"])
def scd2d_fwd_kernel(
    X, W, P, Q, Y, Cout, Norm,
    N, H, Wd, G, Cg, Og, OH, OW, M, M_BUCKET,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    eps, norm_eps,
    R: tl.constexpr, S: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """W is ŵ rearranged to [G, R·S, C/G, O/G] (output channels contiguous)."""
    i_m, i_n, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_n, o_oh, o_ow, m_m = output_positions(i_m, M, OH, OW, BM)         # [BM]
    o_ih0 = o_oh * stride_h - pad_h
    o_iw0 = o_ow * stride_w - pad_w
    p_x = X + o_n.to(tl.int64) * sxn + i_g * Cg * sxc                    # [BM]
    o_o = i_n * BN + tl.arange(0, BN)                                    # [BN] channel in group
    m_o = o_o < Og
    o_k = tl.arange(0, BK)
    n_cb = tl.cdiv(Cg, BK)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ssq = tl.zeros((BM,), dtype=tl.float32)
    for i_k in range(R * S * n_cb):
        tap = i_k // n_cb
        o_c = (i_k - tap * n_cb) * BK + o_k                              # [BK]
        m_c = o_c < Cg
        o_ih = o_ih0 + (tap // S) * dil_h
        o_iw = o_iw0 + (tap % S) * dil_w
        m_x = m_m & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < Wd)  # padding mask
        b_x = tl.load(p_x[:, None] + (o_ih * sxh + o_iw * sxw)[:, None]
                      + o_c[None, :] * sxc,
                      mask=m_x[:, None] & m_c[None, :], other=0.0)       # [BM, BK]
        b_w = tl.load(W + ((i_g * R * S + tap) * Cg + o_c[:, None]) * Og + o_o[None, :],
                      mask=m_c[:, None] & m_o[None, :], other=0.0)       # [BK, BN]
        b_xf = b_x.to(tl.float32)
        ssq += tl.sum(b_xf * b_xf, axis=1)
        acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION)

    b_p = tl.load(P + i_g * Og + o_o, mask=m_o, other=1.0)
    b_q = tl.load(Q + i_g * Og + o_o, mask=m_o, other=0.0)
    b_norm = tl.sqrt(ssq + norm_eps)                                     # [BM]
    b_c, b_y = sharpen(acc, b_norm[:, None], b_p, b_q, eps)
    o_y = (o_n.to(tl.int64) * syn + o_oh * syh + o_ow * syw)[:, None] + ((i_g * Og + o_o) * syc)[None, :]
    m_y = m_m[:, None] & m_o[None, :]
    tl.store(Y + o_y, b_y.to(Y.dtype.element_ty), mask=m_y)
    tl.store(Cout + o_y, b_c.to(Cout.dtype.element_ty), mask=m_y)
    if i_n == 0:
        tl.store(Norm + ((o_n.to(tl.int64) * G + i_g) * OH + o_oh) * OW + o_ow, b_norm, mask=m_m)


@triton.jit(do_not_specialize=["N", "M"])
def scd2d_fwd_direct_kernel(
    X, W, P, Q, Y, Cout, Norm,
    N, H, Wd, G, Cg, Og, O, OH, OW, M,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    eps, norm_eps,
    R: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr,
):
    """W is ŵ as given, [O, C/G, R, S] contiguous; each tile covers BO global output channels."""
    i_m, i_o = tl.program_id(0), tl.program_id(1)
    o_n, o_oh, o_ow, m_m = output_positions(i_m, M, OH, OW, BM)         # [BM]
    o_ih0 = o_oh * stride_h - pad_h
    o_iw0 = o_ow * stride_w - pad_w
    o_o = i_o * BO + tl.arange(0, BO)                                    # [BO] global channel
    m_o = o_o < O
    o_g = o_o // Og
    p_x = (X + o_n.to(tl.int64) * sxn)[:, None] + (o_g * Cg * sxc)[None, :]  # [BM, BO]

    acc = tl.zeros((BM, BO), dtype=tl.float32)
    ssq = tl.zeros((BM, BO), dtype=tl.float32)
    for tap in range(R * S):
        o_ih = o_ih0 + (tap // S) * dil_h
        o_iw = o_iw0 + (tap % S) * dil_w
        m_x = m_m & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < Wd)
        p_tap = p_x + (o_ih * sxh + o_iw * sxw)[:, None]
        for ci in range(Cg):
            b_x = tl.load(p_tap + ci * sxc, mask=m_x[:, None] & m_o[None, :],
                          other=0.0).to(tl.float32)                      # [BM, BO]
            b_w = tl.load(W + (o_o * Cg + ci) * R * S + tap, mask=m_o, other=0.0)
            acc += b_x * b_w.to(tl.float32)[None, :]
            ssq += b_x * b_x

    b_p = tl.load(P + o_o, mask=m_o, other=1.0)
    b_q = tl.load(Q + o_o, mask=m_o, other=0.0)
    b_norm = tl.sqrt(ssq + norm_eps)                    # [BM, BO]: each column its group's norm
    b_c, b_y = sharpen(acc, b_norm, b_p, b_q, eps)
    o_y = (o_n.to(tl.int64) * syn + o_oh * syh + o_ow * syw)[:, None] + (o_o * syc)[None, :]
    m_y = m_m[:, None] & m_o[None, :]
    tl.store(Y + o_y, b_y.to(Y.dtype.element_ty), mask=m_y)
    tl.store(Cout + o_y, b_c.to(Cout.dtype.element_ty), mask=m_y)
    o_norm = ((o_n.to(tl.int64) * G)[:, None] + o_g[None, :]) * OH * OW + (o_oh * OW + o_ow)[:, None]
    tl.store(Norm + o_norm, b_norm, mask=m_y & (o_o % Og == 0)[None, :])


# (BM, BN, BK, num_warps, num_stages): large tiles with deep pipelines for tensor cores; the
# first is the main bf16/fp16 config (128×128×64 at 8 warps compiles without spills on sm_80 and
# sm_90, see `make kernel-report`). float32 (TF32) keeps the tiles that do not spill there
# (128×128×32 at 8 warps and 64×128×32 at 4 warps spill on sm_90).
GEMM_CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 4, 3)]
GEMM_CONFIGS_FP32 = [(128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (128, 64, 32, 4, 3),
                     (64, 64, 32, 4, 3)]
DIRECT_CONFIGS = [(64, 64, 4, 2), (128, 32, 4, 2), (32, 128, 4, 2)]


def _configs(table, names):
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1])
            for c in table]


_gemm_key = ["Cg", "Og", "R", "S", "M_BUCKET", "PRECISION"]
_gemm_autotuned = triton.autotune(_configs(GEMM_CONFIGS, ("BM", "BN", "BK")), key=_gemm_key)(
    scd2d_fwd_kernel)
_gemm_autotuned_fp32 = triton.autotune(_configs(GEMM_CONFIGS_FP32, ("BM", "BN", "BK")),
                                       key=_gemm_key)(scd2d_fwd_kernel)
_direct_autotuned = triton.autotune(_configs(DIRECT_CONFIGS, ("BM", "BO")),
                                    key=["Cg", "Og", "R", "S"])(scd2d_fwd_direct_kernel)


def _pow2_between(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(n)))


def uses_direct_kernel(groups, in_per_group, out_per_group):
    """Grouped layers with too few channels per group for a 16-wide tensor-core tile."""
    return groups > 1 and (in_per_group < 16 or out_per_group < 16)


def scd2d_fwd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps,
              weight_norm="none", weight_norm_eps=0.0, save_for_backward=True):
    """Launches the forward; returns ``(y, c, norm)`` as ``reference.core_forward`` does.

    ``padding`` is (top, bottom, left, right); only top/left enter the index arithmetic.
    CUDA tensors run the autotuned kernels; CPU tensors (Triton's interpreter) one fixed config.
    """
    w_hat, _ = normalize_weight(weight, q, weight_norm, weight_norm_eps)
    N, C, H, W = x.shape
    O, Cg, R, S = w_hat.shape
    G, Og = groups, O // groups
    OH, OW = output_hw((H, W), (R, S), stride, padding, dilation)
    y = torch.empty((N, O, OH, OW), dtype=x.dtype, device=x.device,
                    memory_format=memory_format(x))
    c = torch.empty_like(y)
    norm = torch.empty((N, G, OH, OW), dtype=torch.float32, device=x.device)
    M = N * OH * OW
    if M == 0:
        return y, c, norm
    if M >= 2**31 or max(C * H * W, O * OH * OW) >= 2**31:
        raise ValueError(f"scd2d_fwd indexes positions and per-sample offsets in int32: needs "
                         f"N·OH·OW = {M} and per-sample sizes C·H·W = {C * H * W}, "
                         f"O·OH·OW = {O * OH * OW} below 2**31")
    p, q = p.float().contiguous(), q.float().contiguous()
    conv = (*stride, padding[0], padding[2], *dilation, eps, norm_eps)
    strides = (*x.stride(), *y.stride())
    tuned = x.is_cuda
    if uses_direct_kernel(G, Cg, Og):
        kernel = _direct_autotuned if tuned else scd2d_fwd_direct_kernel
        fixed = {} if tuned else dict(BM=64, BO=_pow2_between(O, 16, 64))
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(O, meta["BO"]))
        kernel[grid](x, w_hat.contiguous(), p, q, y, c, norm, N, H, W, G, Cg, Og, O, OH, OW, M,
                     *strides, *conv, R=R, S=S, **fixed)
        if not save_for_backward:
            return y, x.new_empty((0,)), norm.new_empty((0,))
        return y, c, norm
    # ŵ as [G, R·S, C/G, O/G]: the B tile of each K step is one contiguous row block
    w_gemm = w_hat.reshape(G, Og, Cg, R * S).permute(0, 3, 2, 1).contiguous()
    precision = "tf32" if x.dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"
    tuned_kernel = _gemm_autotuned_fp32 if x.dtype == torch.float32 else _gemm_autotuned
    kernel = tuned_kernel if tuned else scd2d_fwd_kernel
    fixed = {} if tuned else dict(BM=64, BN=_pow2_between(Og, 16, 64), BK=_pow2_between(Cg, 16, 64))
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(Og, meta["BN"]), G)
    kernel[grid](x, w_gemm, p, q, y, c, norm, N, H, W, G, Cg, Og, OH, OW, M,
                 M.bit_length(), *strides, *conv, R=R, S=S, PRECISION=precision, **fixed)
    if not save_for_backward:
        return y, x.new_empty((0,)), norm.new_empty((0,))
    return y, c, norm
