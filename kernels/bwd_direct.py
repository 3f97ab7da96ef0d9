"""Backward kernels for groups too narrow for 16-wide ``tl.dot`` tiles (depthwise and the like):
dgrad and wgrad of ``kernels/bwd.py`` as memory-bound multiply-accumulate loops, no GEMM."""
import triton
import triton.language as tl

from ._common import in_units, input_offsets, norm_offsets, tap_offsets, tile_positions


@triton.jit(do_not_specialize=["M", "TILES"])
def scd2d_dgrad_direct_kernel(
    GD, W, GNS, X, GX,
    H, Wd, G, Cg, Og, O, C, OH, OW, P_IMG, M, TILES,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
    PLANES: tl.constexpr, OV: tl.constexpr, XV: tl.constexpr, DV: tl.constexpr,
    UNREAD: tl.constexpr, NORM_CL: tl.constexpr,
):
    """Program (i_m, i_c): BM input positions × BC global input channels (M = N·H·W); W is ŵ
    tap-major, [R, S, O, C/G] in memory, so that a tap's weights for the tile's channels are
    one contiguous run when each group has one channel in and out (16-byte loads, not a 2-byte
    load R·S elements apart). Each tap gathers the output position it maps to, if any.
    ``PLANES`` (x and grad_x NCHW-contiguous): tiles run over one image (``TILES`` per image,
    ``P_IMG = H·W``), one contiguous run of each (n, c) plane: 16-byte loads and stores.
    Depthwise (one channel a group in and out): O, C and G are multiples of ``OV``, x's and
    grad_x's strides but the channels' of ``XV`` / ``DV`` (``_common.in_units``; else 1).
    ``UNREAD``: some input pixels lie in no patch; their x term is 0, not x·0. ``NORM_CL``:
    GNS (grad_‖s‖/‖s‖) is [N, OH, OW, G] in memory, so a tap loads it along the tile's
    channels as grad_d, else [N, G, OH, OW]."""
    O, C, G = in_units(O, OV), in_units(C, OV), in_units(G, OV)
    sxn, sxh, sxw = in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV)
    sdn, sdh, sdw = in_units(sdn, DV), in_units(sdh, DV), in_units(sdw, DV)
    i_m, i_c = tl.program_id(0), tl.program_id(1)
    o_n, o_p, m_m = tile_positions(i_m, M, P_IMG, TILES, BM, PLANES)     # [BM] input positions
    o_n = o_n.to(tl.int64)
    o_ih = o_p // Wd
    o_iw = o_p - o_ih * Wd
    o_c = i_c * BC + tl.arange(0, BC)                                    # [BC]
    m_c = o_c < C
    o_g = o_c // Cg
    p_w = W + (o_g * Og * Cg + o_c % Cg)                                 # [BC] at tap 0

    # a tap of row offset t = r·dil_h reaches output row (ih + pad_h − t) / stride_h where that
    # divides. With ih + pad_h = qh·stride_h + rh, it divides where rh = t mod stride_h, and
    # the row is qh − t // stride_h: positions divide once, a tap divides its scalar t, not its
    # [BM] rows (the stride is a runtime int unless it is 1). Columns alike.
    o_qh = (o_ih + pad_h) // stride_h
    o_rh = o_ih + pad_h - o_qh * stride_h
    o_qw = (o_iw + pad_w) // stride_w
    o_rw = o_iw + pad_w - o_qw * stride_w

    acc = tl.zeros((BM, BC), dtype=tl.float32)
    b_box = tl.zeros((BM, BC), dtype=tl.float32)
    b_read = o_ih < 0                      # [BM] False: positions some tap reaches (UNREAD)
    for tap in range(R * S):
        t_h = (tap // S) * dil_h
        t_w = (tap % S) * dil_w
        o_oh = o_qh - t_h // stride_h
        o_ow = o_qw - t_w // stride_w
        m_t = (m_m & (o_rh == t_h % stride_h) & (o_rw == t_w % stride_w) & (o_oh >= 0)
               & (o_ow >= 0) & (o_oh < OH) & (o_ow < OW))
        if UNREAD:
            b_read = b_read | m_t
        m = m_t[:, None] & m_c[None, :]
        o_q = o_oh * OW + o_ow                                           # [BM] in-image
        o_pos = o_n * (OH * OW) + o_q
        o_gns = norm_offsets(o_n, o_q, o_g, G, OH * OW, NORM_CL)
        b_box += tl.load(GNS + o_gns, mask=m, other=0.0)                 # [BM, BC]
        p_gd = GD + o_pos[:, None] * O + (o_g * Og)[None, :]
        for o in range(Og):
            b_gd = tl.load(p_gd + o, mask=m, other=0.0).to(tl.float32)  # [BM, BC]
            b_w = tl.load(p_w + (tap * O + o) * Cg, mask=m_c, other=0.0).to(tl.float32)
            acc += b_gd * b_w[None, :]

    m = m_m[:, None] & m_c[None, :]
    o_x = input_offsets(o_n, o_p, o_ih, o_iw, sxn, sxh, sxw, PLANES)
    o_gx = input_offsets(o_n, o_p, o_ih, o_iw, sdn, sdh, sdw, PLANES)
    b_x = tl.load(X + o_x[:, None] + (o_c * sxc)[None, :], mask=m, other=0.0).to(tl.float32)
    if UNREAD:
        b_x = tl.where(b_read[:, None], b_x, 0.0)
    o_gx = o_gx[:, None] + (o_c * sdc)[None, :]
    tl.store(GX + o_gx, (acc + b_x * b_box).to(GX.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["N", "M"])
def scd2d_wgrad_direct_kernel(
    GD, X, WS,
    N, H, Wd, G, Cg, Og, O, OH, OW, M, K_SPLIT, oh_mul, oh_shift, ow_mul, ow_shift,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BO: tl.constexpr, OV: tl.constexpr,
    XV: tl.constexpr,
):
    """Program (i_o, ci·R·S + tap, split): grad ŵ[o, ci, tap] for BO global output channels,
    reduced over positions [split·K_SPLIT, (split+1)·K_SPLIT); WS is [splits, O, C/G, R, S].
    ``oh_*``, ``ow_*``: ``fast_divmod``'s magic for OH and OW. Depthwise: O is a multiple of
    ``OV``, x's strides but the channels' of ``XV`` (``_common.in_units``; else 1)."""
    O = in_units(O, OV)
    sxn, sxh, sxw = in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV)
    i_o, i_ct, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_tap = i_ct % (R * S)
    ci = i_ct // (R * S)
    o_o = i_o * BO + tl.arange(0, BO)                                    # [BO]
    m_o = o_o < O
    dh = (i_tap // S) * dil_h - pad_h
    dw = (i_tap % S) * dil_w - pad_w
    p_x = X + (((o_o // Og) * Cg + ci) * sxc)[None, :]                   # [1, BO]
    k_lo = i_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, M)
    o_gd = tl.arange(0, BP)[:, None] * O + o_o[None, :]    # [BP, BO] from a step's first row
    row_gd = tl.cast(O, tl.int64)   # not O.to: O = 1 arrives as a constexpr

    acc = tl.zeros((BP, BO), dtype=tl.float32)
    for k in range(k_lo, k_hi, BP):
        o_k = k + tl.arange(0, BP)                                       # [BP] output positions
        m_k = o_k < k_hi
        o_x, m_x = tap_offsets(o_k, OH, OW, oh_mul, oh_shift, ow_mul, ow_shift, H, Wd, dh, dw,
                               stride_h, stride_w, sxn, sxh, sxw)
        m_x = m_x & m_k
        b_gd = tl.load(GD + k * row_gd + o_gd, mask=m_k[:, None] & m_o[None, :],
                       other=0.0)                                        # [BP, BO]
        b_x = tl.load(p_x + o_x[:, None], mask=m_x[:, None] & m_o[None, :], other=0.0)
        acc += b_gd.to(tl.float32) * b_x.to(tl.float32)

    o_ws = i_s.to(tl.int64) * O * Cg * R * S + (o_o * Cg + ci) * R * S + i_tap
    tl.store(WS + o_ws, tl.sum(acc, axis=0).to(WS.dtype.element_ty), mask=m_o)
