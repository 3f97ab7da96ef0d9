"""Forward of the SCD core op, ``(y, c, norm)``: a prepare launch, then an implicit GEMM.

Two main kernels:
- ``scd2d_fwd_kernel``: implicit GEMM, ``M = N·OH·OW`` positions × ``O/G`` channels of group G
  (grid axis 2) × ``K = (C/G)·R·S``. Each K step loads an ``x`` tile [BM, BK] through index
  arithmetic (padding is the load mask) and feeds it to ``tl.dot``; nothing else reads it.
  ``Σ s²`` of a patch is the sum over its taps of ``Σ_c x²`` per input pixel, which
  ``scd2d_fwd_prepare_kernel`` writes before: R·S float32 loads per position in the epilogue.
  (Squaring the dot's x tile in the loop as well gave wrong, call-to-call varying results on an
  H200 with Triton 3.6 — float32, and 16-bit with BK 64 or 4 warps — and cost ~a quarter of
  the loop.)
- ``scd2d_fwd_direct_kernel``: groups with at most 4 input and 4 output channels (depthwise):
  no GEMM to speak of, a memory-bound multiply-accumulate over (tap, channel).
Both end in the same epilogue (``_common.sharpen``, lg2/ex2 approximations on CUDA), store
``y`` in the input dtype and, when saving for backward, ``c`` (channels-last for either input
layout: the backward writes its GEMM operand there) and the float32 per-(n, group, position)
norms (groups innermost for channels_last depthwise-like layers: ``shapes.saved_norm_format``).

Before the GEMM, one launch of ``scd2d_fwd_prepare_kernel`` normalises the kernels into the
GEMM's B matrix, writes the per-pixel ``Σ_c x²`` and, for NCHW x, copies x channels-contiguous.

Layouts: the kernels read x with channels contiguous and write y in the input's layout. An
NCHW ``x`` is transposed once by the launcher (one copy, 2·|x| of memory traffic): a tap-shifted
NCHW tile is misaligned, so even with positions contiguous it loads as scalar 2-byte ``LDG``s
staged through registers (411 SASS instructions per K step on sm_90 for the 128×128×64 bf16
tile, against 235 after the transpose, which loads it as 16-byte ``cp.async`` copies). Read in
place: 1×1 stride-1 GEMM layers (``X_PLANES``: no shift, NCHW planes load wide) and memory-bound
direct layers with stride 1 (``X_ROWS``: coalesced along positions, no 2·|x| transpose).
NCHW outputs are tiled per image (``PER_IMAGE``), so a tile's positions are one contiguous run
of every (n, o) plane and y and norm are stored 16 bytes at a time.
"""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .shapes import (memory_format, output_hw, saved_c_format,  # what the fake op promises
                     saved_norm_format, uses_direct_kernel)
from ._common import in_units, norm_offsets, sharpen, tile_positions
from .launch import Launch, cdiv, channel_unit, exact_log2, next_power_of_2, vector_unit
from .layout import CONFIG as COPY_CONFIG, copies_by_kernel, copy_tiles, to_channels_last
from .layout import transpose_tile
from .weight import TAP_MAJOR_PROGRAMS, normalize_args, normalize_rows, normalize_weight


@triton.jit(do_not_specialize=["M", "TILES", "M_TILES"])   # ints that follow the batch size
def scd2d_fwd_kernel(
    X, SQ, W, P, Q, Y, Cout, Norm, WS,
    H, Wd, G, Cg, Og, OH, OW, P_IMG, M, TILES, K, N_K, W_ROWS, W_COLS, M_TILES, SPLIT_STEPS,
    sxn, sxc, sxh, sxw, syn, syc, syp,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sp, sq,
    eps, norm_eps,
    R: tl.constexpr, S: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLAT_K: tl.constexpr,
    EVEN_K: tl.constexpr, CB_SHIFT: tl.constexpr, X_PLANES: tl.constexpr,
    PER_IMAGE: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr,
    P_SHARED: tl.constexpr, Q_SHARED: tl.constexpr, XV: tl.constexpr, YV: tl.constexpr,
    PV: tl.constexpr, PARTIAL: tl.constexpr, SPLITS: tl.constexpr,
):
    """Implicit GEMM on one [BM positions, BN channels] tile of group ``i_g``.

    SQ is ``Σ_c x²`` per (sample, group, input pixel), float32 [N, G, H, W].
    W is ŵ as a zero-padded [G, W_COLS, W_ROWS] matrix (K-major: W_ROWS of K per output
    channel) whose column block ``i_k`` is the B tile of K step ``i_k``, so B loads need no
    mask. K steps run over (tap, channel block) pairs, or, with
    ``FLAT_K`` (few channels per group), over the flattened (tap, channel) index ``k < K``.
    ``X_PLANES`` (1×1, stride 1, no padding, NCHW x, per-image tiles): x is read as its [C, OH·OW]
    planes, positions contiguous, so the tile loads as wide copies without a layout change.
    ``CB_SHIFT``: log2 of the channel blocks per tap when that is a power of two, else -1.
    ``P_SHARED`` / ``Q_SHARED``: p / q is one value for all channels (stride 0).
    ``XV``: x's strides but its unit one, and Cg, are multiples of it; ``YV``: Og is, and with
    channels-last y its position strides; ``PV``: with NCHW y, OH·OW and y's sample and channel
    strides are (``in_units``: 16-byte loads and stores for channel counts such as 40 too, 8-byte
    stores along 14×14 planes; 1 where x's channels are not contiguous).
    Split K (layers whose tiles fill under half the SMs, ``split_k``) takes two launches:
    ``PARTIAL`` runs K steps ``[s·SPLIT_STEPS, (s + 1)·SPLIT_STEPS)`` for split ``s`` (grid
    axis 2 = s·G + group) and stores its float32 tile into the workspace WS [splits, G,
    M_TILES, BM, W_COLS] instead of the epilogue; then ``SPLITS`` > 0 sums the SPLITS tiles,
    in split order, where the K loop would run, and the epilogue follows as without a split.
    """
    sxn, sxh, sxw, Cg = in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV), in_units(Cg, XV)
    Og = in_units(Og, YV)
    if PER_IMAGE:
        P_IMG, syn, syc = in_units(P_IMG, PV), in_units(syn, PV), in_units(syc, PV)
    else:
        syn, syp = in_units(syn, YV), in_units(syp, YV)
    i_m, i_n, i_g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_lo, k_hi = 0, N_K
    if PARTIAL:
        i_s = i_g // G
        i_g = i_g - i_s * G
        k_lo = i_s * SPLIT_STEPS
        k_hi = tl.minimum(N_K, k_lo + SPLIT_STEPS)
    o_n, o_p, m_m = tile_positions(i_m, M, P_IMG, TILES, BM, PER_IMAGE)  # [BM]
    o_oh = o_p // OW
    o_ih0 = o_oh * stride_h - pad_h                                      # [BM]
    o_iw0 = (o_p - o_oh * OW) * stride_w - pad_w
    p_x = X + (o_n.to(tl.int64) * sxn + i_g.to(tl.int64) * Cg * sxc
               + (o_ih0 * sxh + o_iw0 * sxw))                            # [BM] patch origin
    o_o = i_n * BN + tl.arange(0, BN)                                    # [BN] channel in group
    o_k = tl.arange(0, BK)
    p_w = W + i_g.to(tl.int64) * W_ROWS * W_COLS + o_o[None, :] * W_ROWS + o_k[:, None]  # [BK, BN]
    n_cb = tl.cdiv(Cg, BK)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PARTIAL or SPLITS > 0:
        # split K: the workspace tile of (split 0, group, i_m, i_n); each split holds G·M_TILES
        # (int32: a split workspace holds at most as many tiles as the GPU runs at once)
        p_ws = (WS + ((i_g * M_TILES + i_m) * BM * W_COLS + i_n * BN)
                + (tl.arange(0, BM)[:, None] * W_COLS + tl.arange(0, BN)[None, :]))  # [BM, BN]
        ws_split = G * M_TILES * BM * W_COLS
    if SPLITS > 0:                # the partial sums, in split order, instead of the K loop
        for i_p in range(SPLITS):
            acc += tl.load(p_ws + i_p * ws_split)
        k_hi = 0
    for i_k in range(k_lo, k_hi):
        if FLAT_K:
            o_kk = i_k * BK + o_k                                        # [BK] (tap, channel)
            o_tap = o_kk // Cg
            o_c = o_kk - o_tap * Cg
            o_r = (o_tap // S) * dil_h
            o_s = (o_tap % S) * dil_w
            o_ih = o_ih0[:, None] + o_r[None, :]                         # [BM, BK]
            o_iw = o_iw0[:, None] + o_s[None, :]
            m_x = (m_m[:, None] & (o_kk < K)[None, :] & (o_ih >= 0) & (o_ih < H)
                   & (o_iw >= 0) & (o_iw < Wd))
            p_tile = p_x[:, None] + (o_r * sxh + o_s * sxw + o_c * sxc)[None, :]
        else:
            # (tap, channel block) of the step from i_k itself: counters carried across
            # iterations gave wrong masks under 3-stage pipelining on an H200 (bf16/fp16)
            if CB_SHIFT >= 0:   # n_cb = 2**CB_SHIFT: a shift, not ~20 instructions of division
                tap = i_k >> CB_SHIFT
            else:
                tap = i_k // n_cb
            o_c = (i_k - tap * n_cb) * BK + o_k                          # [BK]
            d_h = (tap // S) * dil_h
            d_w = (tap % S) * dil_w
            if X_PLANES:
                m_r = m_m
                p_tile = (X + o_n.to(tl.int64) * sxn + ((i_g * Cg + o_c) * sxc)[None, :]
                          + o_p[:, None])
            else:
                o_ih = o_ih0 + d_h
                o_iw = o_iw0 + d_w
                m_r = m_m & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < Wd)  # padding
                p_tile = p_x[:, None] + (d_h * sxh + d_w * sxw) + o_c[None, :] * sxc
            if EVEN_K:
                m_x = m_r[:, None]
            else:
                m_x = m_r[:, None] & (o_c < Cg)[None, :]
        b_x = tl.load(p_tile, mask=m_x, other=0.0)                       # [BM, BK]
        b_w = tl.load(p_w + i_k * BK)                                    # [BK, BN]
        acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION)
    if PARTIAL:
        tl.store(p_ws + i_s * ws_split, acc)
        return

    # Σs² of each patch: its taps' per-pixel Σ_c x² (padding taps are 0)
    p_sq = SQ + (o_n.to(tl.int64) * G + i_g) * H * Wd                   # [BM]
    b_ssq = tl.zeros((BM,), dtype=tl.float32)
    for tap in range(R * S):
        t_ih = o_ih0 + (tap // S) * dil_h
        t_iw = o_iw0 + (tap % S) * dil_w
        m_t = m_m & (t_ih >= 0) & (t_ih < H) & (t_iw >= 0) & (t_iw < Wd)
        b_ssq += tl.load(p_sq + t_ih * Wd + t_iw, mask=m_t, other=0.0)

    m_o = o_o < Og
    if P_SHARED:   # one p for every channel (stride 0): a scalar
        b_p = tl.load(P)
    else:
        b_p = tl.load(P + (i_g * Og + o_o) * sp, mask=m_o, other=1.0)[None, :]
    if Q_SHARED:   # one q: ‖s‖ + q per row, one reciprocal a row instead of one an element
        b_q = tl.load(Q)
    else:
        b_q = tl.load(Q + (i_g * Og + o_o) * sq, mask=m_o, other=0.0)[None, :]
    b_norm = tl.sqrt(b_ssq + norm_eps)                                   # [BM]
    b_c, b_y = sharpen(acc, b_norm[:, None], b_p, b_q, eps, FAST)
    o_y = ((o_n.to(tl.int64) * syn + o_p * syp)[:, None]
           + ((i_g * Og + o_o) * syc)[None, :])                          # [BM, BN]
    m_y = m_m[:, None] & m_o[None, :]
    tl.store(Y + o_y, b_y.to(Y.dtype.element_ty), mask=m_y)
    if SAVE:
        o_cout = o_y    # c is channels-last either way: y's offsets unless y is NCHW
        if PER_IMAGE:
            o_cout = (((o_n.to(tl.int64) * P_IMG + o_p) * (G * Og))[:, None]
                      + (i_g * Og + o_o)[None, :])
        tl.store(Cout + o_cout, b_c.to(Cout.dtype.element_ty), mask=m_y)
        if i_n == 0:
            tl.store(Norm + (o_n.to(tl.int64) * G + i_g) * P_IMG + o_p, b_norm, mask=m_m)


@triton.jit(do_not_specialize=["M", "TILES"])
def scd2d_fwd_direct_kernel(
    X, W, P, Q, Y, Cout, Norm,
    H, Wd, G, OH, OW, P_IMG, M, TILES,
    sxn, sxc, sxh, sxw, syn, syc, syp,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sp, sq,
    eps, norm_eps,
    R: tl.constexpr, S: tl.constexpr, CG: tl.constexpr, OG: tl.constexpr, OGP: tl.constexpr,
    BM: tl.constexpr, BG: tl.constexpr, X_ROWS: tl.constexpr, PER_IMAGE: tl.constexpr,
    SAVE: tl.constexpr, FAST: tl.constexpr, XV: tl.constexpr, NORM_CL: tl.constexpr,
):
    """Multiply-accumulate on [BM positions, BG groups, OGP channels per group] tiles.

    W is ŵ as given, [O, CG, R, S] contiguous. Each x value is loaded once per tile and used by
    all ``OG`` output channels of its group (depthwise multipliers > 1), and its square enters
    the group's ``Σ s²`` once. ``X_ROWS`` (NCHW x read in place, stride 1, OW = W, per-image
    tiles): a tap shifts the in-image position by a constant, so the positions of a tile stay
    one contiguous run and the loads coalesce along them without a layout change. ``XV``
    (depthwise, one channel in and out per group, channels contiguous): G, x's strides but the
    channels' and channels-last y's position strides are multiples of it (``in_units``).
    ``NORM_CL``: the norms are stored groups innermost (``shapes.saved_norm_format``), along
    the tile's groups as y is, not one 4-byte store per (position, group) a plane apart.
    """
    G, sxn, sxh, sxw = in_units(G, XV), in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV)
    if not PER_IMAGE:
        syn, syp = in_units(syn, XV), in_units(syp, XV)
    i_m, i_g = tl.program_id(0), tl.program_id(1)
    o_n, o_p, m_m = tile_positions(i_m, M, P_IMG, TILES, BM, PER_IMAGE)  # [BM]
    o_oh = o_p // OW
    o_ih0 = o_oh * stride_h - pad_h
    o_iw0 = (o_p - o_oh * OW) * stride_w - pad_w
    o_g = i_g * BG + tl.arange(0, BG)                                    # [BG]
    m_g = o_g < G
    o_j = tl.arange(0, OGP)                                              # [OGP]
    o_o = o_g[:, None] * OG + o_j[None, :]                               # [BG, OGP] channel
    m_o = m_g[:, None] & (o_j < OG)[None, :]
    if X_ROWS:
        o_x = o_p - pad_h * Wd - pad_w                                   # = o_ih0·W + o_iw0
    else:
        o_x = o_ih0 * sxh + o_iw0 * sxw
    p_x = ((X + o_n.to(tl.int64) * sxn + o_x)[:, None]
           + (o_g * CG * sxc)[None, :])                                  # [BM, BG]

    acc = tl.zeros((BM, BG, OGP), dtype=tl.float32)
    ssq = tl.zeros((BM, BG), dtype=tl.float32)
    for r in range(R):
        d_h = r * dil_h
        o_ih = o_ih0 + d_h
        m_h = m_m & (o_ih >= 0) & (o_ih < H)
        for s in tl.static_range(S):
            d_w = s * dil_w
            o_iw = o_iw0 + d_w
            m_x = (m_h & (o_iw >= 0) & (o_iw < Wd))[:, None] & m_g[None, :]   # padding
            for ci in tl.static_range(CG):
                b_x = tl.load(p_x + (d_h * sxh + d_w * sxw + ci * sxc), mask=m_x,
                              other=0.0).to(tl.float32)                  # [BM, BG]
                b_w = tl.load(W + (o_o * CG + ci) * R * S + r * S + s, mask=m_o,
                              other=0.0).to(tl.float32)                  # [BG, OGP]
                acc += b_x[:, :, None] * b_w[None, :, :]
                ssq += b_x * b_x

    b_p = tl.load(P + o_o * sp, mask=m_o, other=1.0)
    b_q = tl.load(Q + o_o * sq, mask=m_o, other=0.0)
    b_norm = tl.sqrt(ssq + norm_eps)                                     # [BM, BG]
    b_c, b_y = sharpen(acc, b_norm[:, :, None], b_p[None, :, :], b_q[None, :, :], eps,
                       FAST)                                             # [BM, BG, OGP]
    o_y = (o_n.to(tl.int64) * syn + o_p * syp)[:, None, None] + (o_o * syc)[None, :, :]
    m_y = m_m[:, None, None] & m_o[None, :, :]
    tl.store(Y + o_y, b_y.to(Y.dtype.element_ty), mask=m_y)
    if SAVE:
        o_cout = o_y    # c is channels-last either way: y's offsets unless y is NCHW
        if PER_IMAGE:
            o_cout = (((o_n.to(tl.int64) * P_IMG + o_p) * (G * OG))[:, None, None]
                      + o_o[None, :, :])
        tl.store(Cout + o_cout, b_c.to(Cout.dtype.element_ty), mask=m_y)
        o_norm = norm_offsets(o_n.to(tl.int64), o_p, o_g, G, P_IMG, NORM_CL)
        tl.store(Norm + o_norm, b_norm, mask=m_m[:, None] & m_g[None, :])          # [BM, BG]


@triton.jit
def pixel_sumsq(X, SQ, i_b, G, Cg, P, Wd, P_TILES, sxn, sxc, sxh, sxw, BQ: tl.constexpr,
                BCQ: tl.constexpr, PIX_FLAT: tl.constexpr, XV: tl.constexpr):
    """Block ``i_b`` of ``SQ[n, g, h, w] = Σ_c x[n, g·Cg + c, h, w]²`` (float32, [N, G, H, W]
    contiguous): BQ pixels of one sample and group, channels BCQ at a time; x of any strides
    (loads run along whichever of channels or pixels is contiguous). ``PIX_FLAT`` (``sxh =
    W·sxw``: NCHW and channels_last): a pixel's offset is ``p·sxw``, so NCHW loads are seen to
    run along pixels (the division by W hid that: scalar loads a channel plane apart). ``XV``:
    as ``scd2d_fwd_kernel``'s (channels-contiguous x)."""
    sxn, sxh, sxw, Cg = in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV), in_units(Cg, XV)
    i_g = i_b % G
    i_np = i_b // G
    i_n = i_np // P_TILES
    o_p = (i_np - i_n * P_TILES) * BQ + tl.arange(0, BQ)                 # [BQ] pixel in image
    m_p = o_p < P
    if PIX_FLAT:
        o_x = o_p * sxw
    else:
        o_h = o_p // Wd
        o_x = o_h * sxh + (o_p - o_h * Wd) * sxw
    p_x = X + i_n.to(tl.int64) * sxn + (i_g * Cg).to(tl.int64) * sxc + o_x  # [BQ]
    acc = tl.zeros((BQ, BCQ), dtype=tl.float32)
    for c0 in range(0, Cg, BCQ):
        o_c = c0 + tl.arange(0, BCQ)
        b_x = tl.load(p_x[:, None] + (o_c * sxc)[None, :],
                      mask=m_p[:, None] & (o_c < Cg)[None, :], other=0.0).to(tl.float32)
        acc += b_x * b_x
    tl.store(SQ + (i_n.to(tl.int64) * G + i_g) * P + o_p, tl.sum(acc, axis=1), mask=m_p)


@triton.jit(do_not_specialize=["COPY_PROGRAMS"])
def scd2d_fwd_prepare_kernel(
    X, X_CL, SQ, W, Q, W_HAT, C, P, Wd, G, P_TILES, C_TILES, Q_TILES, W_PROGRAMS,
    COPY_PROGRAMS, sxn, sxc, sxh, sxw, Og, Cg, CP, ROWS, sq, sw_o, sw_c, sw_r, sw_s, s_g, s_j,
    s_c, s_t, eps, BC: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BCQ: tl.constexpr,
    PIX_FLAT: tl.constexpr, SUM_IN_COPY: tl.constexpr, RS: tl.constexpr, S: tl.constexpr,
    TP: tl.constexpr, W_ORDER: tl.constexpr, TAP_MAJOR: tl.constexpr, MODE: tl.constexpr,
    BO: tl.constexpr, BK: tl.constexpr, BCP: tl.constexpr, XV: tl.constexpr,
):
    """What the GEMM forward needs before it runs, in one launch (a launch costs ~10 µs of host
    time; the three parts are independent): programs below ``W_PROGRAMS`` normalise the kernels
    into the GEMM's B matrix (``weight.normalize_weight_kernel``'s blocks; first, as each
    streams whole kernel rows), the next ``COPY_PROGRAMS`` copy NCHW x channels-contiguous
    into X_CL (``layout.transpose_tile``s; 0 for channels_last x), the rest write the
    per-pixel ``Σ_c x²`` (``pixel_sumsq``; Cg is also the weight's C/G). ``SUM_IN_COPY`` (one
    group, a copy tile spans all channels): the copy programs write ``Σ_c x²`` from the tile
    they hold, and there are no ``pixel_sumsq`` programs (x is read once, not twice)."""
    pid = tl.program_id(0)
    if pid < W_PROGRAMS:
        normalize_rows(W, Q, W_HAT, pid, Og, Cg, CP, ROWS, sq, sw_o, sw_c, sw_r, sw_s, s_g, s_j,
                       s_c, s_t, eps, RS, S, TP, W_ORDER, TAP_MAJOR, MODE, BO, BK, BCP)
    elif pid < W_PROGRAMS + COPY_PROGRAMS:
        i_copy = pid - W_PROGRAMS
        i_np = i_copy // C_TILES
        i_n = i_np // P_TILES
        b_x, o_p, m_p = transpose_tile(X, X_CL, C, P, i_n, i_np % P_TILES, i_copy % C_TILES,
                                       BC, BP)
        if SUM_IN_COPY:   # the tile holds every channel of its pixels (one group)
            b_xf = b_x.to(tl.float32)
            tl.store(SQ + i_n.to(tl.int64) * P + o_p, tl.sum(b_xf * b_xf, axis=0), mask=m_p)
    else:
        pixel_sumsq(X, SQ, pid - W_PROGRAMS - COPY_PROGRAMS, G, Cg, P, Wd, Q_TILES, sxn, sxc,
                    sxh, sxw, BQ, BCQ, PIX_FLAT, XV)


FAST_MATH = True   # lg2/ex2/div approximations on CUDA in the forward's epilogue and the
                   # backward's prologue; False: libdevice log2/exp2 and IEEE division


def pow2_between(n, lo, hi):
    """The power of two covering ``n``, clamped to [lo, hi] (a block size)."""
    return max(lo, min(hi, next_power_of_2(n)))


def dot_precision(dtype):
    """``tl.dot``'s input precision: TF32 for float32 exactly when cuDNN's conv2d uses it."""
    return "tf32" if dtype != torch.float32 or torch.backends.cudnn.allow_tf32 else "ieee"


def _block_k(n, choices, issue_bound=False):
    """The widest block in ``choices`` that pads ``n`` by at most 1/8, else the narrowest; for
    an ``issue_bound`` tile the one with the fewest K steps (the narrowest of equals)."""
    if issue_bound:
        return min(reversed(choices), key=lambda b: cdiv(n, b))
    for b in choices:
        if cdiv(n, b) * b * 8 <= n * 9:
            return b
    return choices[-1]


@functools.lru_cache(maxsize=None)
def sm_count(index):
    """The SMs of CUDA device ``index``: the launchers size their grids by them."""
    return torch.cuda.get_device_properties(index).multi_processor_count


NOMINAL_SMS = 132     # the interpreter splits the forward's K as a 132-SM GPU would (H100/H200)
SPLIT_MIN_STEPS = 8   # K steps a split at least: a 3-stage pipeline fills in 2


def split_k(programs, n_k, sms, warps):
    """Splits of the forward GEMM's K for ``programs`` tiles of ``warps`` warps and ``n_k`` K
    steps on ``sms`` SMs, which hold one tile of 8 warps each (184–255 registers a thread, the
    kernel report: all 64 K registers) or two of 4: as many splits as the GPU holds, each at
    least ``SPLIT_MIN_STEPS`` long, so only layers whose tiles fill under half of it split.
    Their time is one chain of dependent K steps: 3×3 512→512 7² b32 took the same ~27 µs (on
    an H200, where cuDNN took 17 µs for the whole forward) in 52 tiles of 128×128 as in 100 of
    64×128, 72 steps each (docs/GPU_NOTES.md section 10). Two splits halve the chain, for a
    float32 workspace of at most as many tiles as the GPU holds and a second launch that sums
    it and runs the epilogue."""
    slots = sms * (1 if warps == 8 else 2)
    return max(1, min(slots // max(programs, 1), n_k // SPLIT_MIN_STEPS))


def split_launches(main, splits):
    """The two launches of a K split ``splits`` ways (the forward's and the dgrad's GEMM):
    ``PARTIAL`` programs over ``splits`` times grid axis 2 (split outermost), then ``main``
    summing the ``SPLITS`` parts in one stage (no K loop to pipeline) and running the
    epilogue."""
    partial = main._replace(grid=(*main.grid[:2], main.grid[2] * splits),
                            constexprs=dict(main.constexprs, PARTIAL=True))
    return partial, main._replace(constexprs=dict(main.constexprs, SPLITS=splits), stages=1)


def whole_splits(n_k, splits):
    """``(splits, steps a split)`` of ``n_k`` K steps cut at most ``splits`` ways into whole
    steps, none of them empty (9 steps at most 4 ways: 3 splits of 3, a fourth would be empty)."""
    steps = cdiv(n_k, splits)
    return cdiv(n_k, steps), steps


def k_steps(Cg, R, S, BK, flat_k):
    """K steps of the forward GEMM: (tap, channel block) pairs, or blocks of the flattened
    (tap, channel) index with ``flat_k``."""
    return cdiv(Cg * R * S, BK) if flat_k else R * S * cdiv(Cg, BK)


@functools.lru_cache(maxsize=None)
def gemm_config(Cg, Og, R, S, G, M, fp32):
    """One (BM, BN, BK, FLAT_K, num_warps, num_stages) per layer, no autotuning.

    Wide tiles (128×128×64 for 16-bit, 64×128×32 for float32) for wide layers, 3 stages; BN the
    smallest power of two covering O/G (≥ 16). Fewer than 16 channels per group (stem, grouped
    narrow layers) flatten K over (tap, channel), so a 3-channel 5×5 stem runs K = 75 in 3 steps
    of 32 instead of 25 steps of 16 mostly-zero ones. BM drops to 64 when 128-row tiles would
    give fewer than ~2 waves on a 132-SM GPU, and for 16-bit layers with O/G ≤ 64 (64×64 tiles
    took 0.84× the time of 128×64 on 3×3 64→64 56² in a sweep on an H200, docs/GPU_NOTES.md
    section 10). BK: the widest of 64 (16-bit) / 32 / 16 that pads C/G by ≤ 1/8, except on
    16-bit tiles of at most 64×64, whose K step issues more instructions (~100–140 a warp,
    sm_90 SASS) than its MMA takes cycles (32 for 64×64×16): there the fewest steps, padding
    or not (3×3 40→40: 9 steps of 64 channels, 24 of them zeros, instead of 27 steps of 16).
    """
    BN = pow2_between(Og, 16, 128)
    BM = 128 if cdiv(M, 128) * cdiv(Og, BN) * G >= 264 else 64
    if fp32 and BN == 128:
        # 128×128 float32 tiles spilled on sm_90 (with the Σs² tile then in the loop)
        BM = 64
    if not fp32 and BN <= 64:
        BM = 64
    flat_k = Cg < 16
    if flat_k:
        BK = 16 if Cg * R * S <= 16 else 32
    else:
        # BK 64 for 16-bit only: float32 64-wide tiles in 3 stages overflow sm_80's shared memory
        BK = _block_k(Cg, (32, 16) if fp32 else (64, 32, 16), not fp32 and BM * BN <= 64 * 64)
    warps = 8 if BM * BN >= 128 * 128 else 4
    return BM, BN, BK, flat_k, warps, 3


@functools.lru_cache(maxsize=None)
def direct_config(Og):
    """(BM, BG, OGP, num_warps, num_stages): 64 positions × 64 output channels per tile."""
    OGP = next_power_of_2(Og)
    return 64, max(1, 64 // OGP), OGP, 4, 2


def _gemm_weight_layout(O, Cg, R, S, G, BN, BK, flat_k):
    """(shape, out_strides, slots) of ŵ as the [G, cdiv(O/G, BN)·BN, N_K·BK] B matrix of the
    loop, K-major (each output channel's K contiguous: 16-byte copies and no transposition
    for TF32 wgmma, which takes K-major operands only): K runs over (tap, channel block)
    steps, or the flat (tap, channel) index with ``flat_k``; ``out_strides`` and ``slots`` as
    ``weight.normalize_weight`` takes them, which zeroes the padded K (x's padded channels are
    0, but 0 · garbage can be NaN). The padded output channels stay unwritten: they only feed
    output columns that are never stored."""
    Og = O // G
    cols = cdiv(Og, BN) * BN
    rows = cdiv(Cg * R * S, BK) * BK if flat_k else R * S * cdiv(Cg, BK) * BK
    tap_rows = Cg if flat_k else rows // (R * S)
    return ((G, cols, rows), (rows * cols, rows, 1, tap_rows),
            (tap_rows, cdiv(rows, tap_rows), rows))


class _Plan(NamedTuple):
    """What a forward launch needs that follows from shapes, layouts and arguments."""
    y_shape: tuple
    norm_shape: tuple
    norm_format: torch.memory_format   # ``shapes.saved_norm_format``
    transpose_x: bool         # NCHW x: copy it channels-contiguous first
    w_layout: tuple           # (shape, out_strides, slots) of the GEMM's ŵ; None: direct
    main: Launch              # its strides: x's
    prepare: Launch = None    # the GEMM's (``prepare_launch``); its strides: x's
    partial: Launch = None    # a split K's first launch (``split_k``), before ``main``
    ws_numel: int = 0         # its float32 workspace
    copy: bool = False        # the prepare launch copies x channels-contiguous
    x_strides: tuple = None   # x viewed with these strides first (``_in_sample_strides``)


def _in_sample_strides(x_shape, x_strides, out_hw, kernel, stride, padding, dilation):
    """None when the kernels' int32 in-sample offsets of x (with the taps' reach past the image
    into padding) stay below 2**31, else the strides to view x with: torch leaves a size-1
    dimension's stride arbitrary (an ``as_strided`` view may give it 2**31 − 1), and there 0
    serves. A ValueError when real strides put the offsets past int32."""
    def reach(strides):
        _, sc, sh, sw = strides
        return ((x_shape[1] - 1) * sc
                + (max(x_shape[2], (out_hw[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0]
                       + 1) + padding[0]) * sh
                + (max(x_shape[3], (out_hw[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1]
                       + 1) + padding[2]) * sw)
    if reach(x_strides) < 2**31:
        return None
    restrided = tuple(0 if n == 1 else st for n, st in zip(x_shape, x_strides))
    if reach(restrided) >= 2**31:
        raise ValueError(f"x's strides {tuple(x_strides)} put its offsets within a sample at "
                         f"or past 2**31, which the kernels index in int32: pass a dense x "
                         f"(x.clone(memory_format=...))")
    return restrided


@functools.lru_cache(maxsize=1024)
def _plan(x_shape, x_strides, x_copies_by_kernel, w_shape, w_strides, weight_norm,
          weight_norm_eps, fmt, p_stride, q_stride, fp32, cuda, sms, fast, stride, padding,
          dilation, groups, eps, norm_eps, save, precision):
    """The forward's launches of one layer signature, worked out once (host time per call)."""
    N, C, H, W = x_shape
    O, Cg, R, S = w_shape
    G, Og = groups, O // groups
    OH, OW = output_hw((H, W), (R, S), stride, padding, dilation)
    P_img = OH * OW
    M = N * P_img
    restrided = _in_sample_strides(x_shape, x_strides, (OH, OW), (R, S), stride, padding,
                                   dilation)
    x_strides = restrided or x_strides
    if M >= 2**31 or max(C * H * W, O * P_img) >= 2**31:
        raise ValueError(f"scd2d_fwd indexes positions and per-sample offsets in int32: needs "
                         f"N·OH·OW = {M} and per-sample sizes C·H·W = {C * H * W}, "
                         f"O·OH·OW = {O * P_img} below 2**31")
    per_image = fmt == torch.contiguous_format                 # NCHW y: store along positions
    direct = uses_direct_kernel(G, Cg, Og)
    # NCHW x read in place: 1×1 GEMM layers as planes, stride-1 'same width' direct layers as rows
    in_place = (per_image and stride == (1, 1) and OW == W and x_strides[3] == 1
                and x_strides[2] == W and (direct or (R == S == 1 and OH == H)))
    transpose_x = x_strides[1] != 1 and C > 1 and not in_place
    y_strides = (O * P_img, P_img, 1) if per_image else (O * P_img, 1, O)
    conv = (*stride, padding[0], padding[2], *dilation, p_stride, q_stride, eps, norm_eps)
    flags = dict(PER_IMAGE=per_image, SAVE=save, FAST=fast)
    norm_format = saved_norm_format(fmt, w_shape, G, "triton")
    shapes = ((N, O, OH, OW), (N, G, OH, OW), norm_format, transpose_x)
    itemsize = 4 if fp32 else 2
    cl_strides = (C * H * W, 1, W * C, C)
    main_x_strides = cl_strides if transpose_x else x_strides     # what the main kernel reads
    if direct:
        BM, BG, OGP, warps, stages = direct_config(Og)
        tiles = cdiv(P_img, BM)
        grid = (N * tiles if per_image else cdiv(M, BM), cdiv(G, BG))
        # one channel a group in and out: rows of G contiguous channels (x, channels-last y)
        depthwise = Cg == 1 and Og == 1
        unit = channel_unit(itemsize, G, main_x_strides) if depthwise else 1
        return _Plan(*shapes, None, Launch(
            scd2d_fwd_direct_kernel, grid, (H, W, G, OH, OW, P_img, M, tiles),
            (*y_strides, *conv), dict(R=R, S=S, CG=Cg, OG=Og, OGP=OGP, BM=BM, BG=BG,
                                      X_ROWS=in_place, XV=unit,
                                      NORM_CL=norm_format == torch.channels_last, **flags),
            warps, stages),
            x_strides=restrided)
    BM, BN, BK, flat_k, warps, stages = gemm_config(Cg, Og, R, S, G, M, fp32)
    w_layout = _gemm_weight_layout(O, Cg, R, S, G, BN, BK, flat_k)
    n_k = k_steps(Cg, R, S, BK, flat_k)
    tiles = cdiv(P_img, BM)
    grid = (N * tiles if per_image else cdiv(M, BM), cdiv(Og, BN), G)
    splits, split_steps = whole_splits(n_k, split_k(grid[0] * grid[1] * G, n_k, sms, warps))
    copy = transpose_x and x_copies_by_kernel
    # the prepare launch reads x, or torch's channels_last copy of it; the GEMM reads that copy
    prepare_strides = cl_strides if transpose_x and not copy else x_strides
    pix_flat = H == 1 or prepare_strides[2] == W * prepare_strides[3]
    prepare = prepare_launch(x_shape, w_shape, w_strides, q_stride, weight_norm, weight_norm_eps,
                             groups, w_layout, copy, pix_flat, cuda, prepare_strides[1] == 1,
                             channel_unit(itemsize, Cg, prepare_strides))
    main = Launch(
        scd2d_fwd_kernel, grid, (H, W, G, Cg, Og, OH, OW, P_img, M, tiles, Cg * R * S, n_k,
                                 n_k * BK, w_layout[0][1], grid[0], split_steps),
        (*y_strides, *conv),
        dict(R=R, S=S, PRECISION=precision, BM=BM, BN=BN, BK=BK, FLAT_K=flat_k,
             EVEN_K=Cg % BK == 0, CB_SHIFT=exact_log2(cdiv(Cg, BK)), X_PLANES=in_place,
             P_SHARED=p_stride == 0, Q_SHARED=q_stride == 0,
             XV=channel_unit(itemsize, Cg, main_x_strides),
             YV=vector_unit(itemsize, Og), PV=vector_unit(itemsize, P_img) if per_image else 1,
             PARTIAL=False, SPLITS=0, **flags), warps, stages)
    partial, ws_numel = None, 0
    if splits > 1:
        partial, main = split_launches(main, splits)
        ws_numel = splits * G * grid[0] * BM * w_layout[0][1]
    return _Plan(*shapes, w_layout, main, prepare, partial, ws_numel, copy, restrided)


def scd2d_fwd(x, weight, p, q, stride, padding, dilation, groups, eps, norm_eps,
              weight_norm="none", weight_norm_eps=0.0, save_for_backward=True):
    """Launches the forward; returns ``(y, c, norm)`` as ``reference.scd2d_fwd`` does.

    ŵ is normalised from ``weight`` (mode ``weight_norm``) into the layout the kernel reads,
    by ``scd2d_fwd_prepare_kernel`` for the GEMM (with the per-pixel Σ_c x²), by
    ``weight.normalize_weight`` for the direct kernel. ``padding`` is (top, bottom, left,
    right); only top/left enter the index arithmetic. With ``save_for_backward=False`` only
    ``y`` is written and ``c``, ``norm`` are None (no allocation: a call's host time).
    Everything that follows from the call's shapes, layouts and arguments comes from
    ``_plan``, cached per layer.
    """
    fmt = memory_format(x)
    plan = _plan(x.shape, x.stride(), copies_by_kernel(x), weight.shape, weight.stride(),
                 weight_norm, weight_norm_eps, fmt, p.stride(0), q.stride(0),
                 x.dtype == torch.float32, x.is_cuda,
                 sm_count(x.device.index) if x.is_cuda else NOMINAL_SMS,
                 x.is_cuda and FAST_MATH, tuple(stride),
                 tuple(padding), tuple(dilation), groups, eps, norm_eps, save_for_backward,
                 dot_precision(x.dtype))
    if plan.x_strides is not None:   # a size-1 dimension's stride past int32: 0 serves
        x = x.as_strided(x.shape, plan.x_strides)
    dev = x.device
    y = torch.empty(plan.y_shape, dtype=x.dtype, device=dev, memory_format=fmt)
    if save_for_backward:
        c = torch.empty_like(y, memory_format=saved_c_format(x, "triton"))
        norm = torch.empty(plan.norm_shape, dtype=torch.float32, device=dev,
                           memory_format=plan.norm_format)
    else:
        c = norm = None
    if y.numel() == 0:
        return y, c, norm
    # NCHW x: copied channels-contiguous for K, in the GEMM's prepare launch where it can be
    if plan.transpose_x and not plan.copy:
        x = to_channels_last(x)
    if plan.w_layout is None:     # direct kernel: ŵ as [O, C/G, R, S]
        w_hat = normalize_weight(weight, q, weight_norm, weight_norm_eps)
        x_sq = ()
    else:
        w_hat = torch.empty(plan.w_layout[0], dtype=weight.dtype, device=dev)
        sq = torch.empty((x.shape[0], groups, *x.shape[2:]), dtype=torch.float32, device=dev)
        x_gemm = torch.empty_like(x, memory_format=torch.channels_last) if plan.copy else x
        plan.prepare((x, x_gemm, sq, weight, q, w_hat), x.stride())
        x, x_sq = x_gemm, (sq,)
    # without SAVE the kernel stores y only: y stands in for the c and norm pointers, and for
    # the GEMM's workspace when K is not split
    tensors = (x, *x_sq, w_hat, p, q, y, y if c is None else c, y if norm is None else norm)
    if plan.partial is not None:
        ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=dev)
        plan.partial((*tensors, ws), x.stride())
        tensors = (*tensors, ws)
    elif plan.w_layout is not None:
        tensors = (*tensors, y)
    plan.main(tensors, x.stride())
    return y, c, norm


@functools.lru_cache(maxsize=1024)
def sumsq_tiles(Cg, P, images=0, channels_contiguous=True):
    """(BQ pixels, BCQ channels, pixel tiles per image) of ``pixel_sumsq``: 4096-element tiles,
    channels up to 64 at a time. On a GPU (``images``: the (sample, group) pairs; 0 in the
    interpreter) tiles of fewer pixels take more channels, the same 4096 elements, while the
    tiles would make fewer than ``TAP_MAJOR_PROGRAMS`` programs: down to 8 pixels where x's
    channels are contiguous, 32 (64-byte runs in 16-bit) where its pixels are. A program waits
    on one memory round trip per channel chunk: 3×3 512→512 7² b32 made 32 programs of 8 chunks
    each (the prepare launch took 7.6 µs of a 35 µs forward on an H200), now 224 of one."""
    BCQ = pow2_between(Cg, 1, 64)
    BQ = min(4096 // BCQ, 1024)
    least = 8 if channels_contiguous else 32
    while (images and images * cdiv(P, BQ) < TAP_MAJOR_PROGRAMS and BQ > least
           and BCQ < next_power_of_2(Cg)):
        BQ, BCQ = BQ // 2, BCQ * 2
    return BQ, BCQ, cdiv(P, BQ)


SUM_IN_COPY_CHANNELS = 256   # NCHW copy tiles up to [256, 32] hold all of a pixel's channels


@functools.lru_cache(maxsize=1024)
def prepare_launch(x_shape, w_shape, w_strides, q_stride, mode, eps, groups, w_layout, copy,
                   pix_flat, cuda, channels_contiguous=True, x_unit=1):
    """The ``Launch`` of ``scd2d_fwd_prepare_kernel`` (tensors: x, the copy of x or x, the
    per-pixel Σ_c x² [N, G, H, W], weight, q, ŵ; strides: x's, whose pixels are ``pix_flat``
    and whose channels are ``channels_contiguous`` (``pixel_sumsq``), with ``XV = x_unit``
    (``launch.channel_unit``)): ŵ in the GEMM's
    ``w_layout`` (normalisation ``mode``), the Σ_c x², and with ``copy`` x copied
    channels-contiguous; the programs of ŵ and of Σ_c x² spread for a ``cuda`` launch."""
    N, C, H, W = x_shape
    _, out_strides, slots = w_layout
    (w_programs,), w_scalars, w_constexprs = normalize_args(
        w_shape, w_strides, q_stride, mode, eps, groups, tuple(out_strides), slots, cuda)
    BC, BP, warps = COPY_CONFIG
    sum_in_copy = copy and groups == 1 and C <= SUM_IN_COPY_CHANNELS
    if sum_in_copy:   # [C, 8192 / C] tiles: every channel of a pixel in one program
        BC = next_power_of_2(C)
        BP = max(16, min(1024, 8192 // BC))
    p_tiles, c_tiles = copy_tiles(x_shape, BC, BP)
    copy_programs = N * p_tiles * c_tiles if copy else 0
    BQ, BCQ, q_tiles = sumsq_tiles(C // groups, H * W, N * groups if cuda else 0,
                                   channels_contiguous)
    sum_programs = 0 if sum_in_copy else N * q_tiles * groups
    return Launch(scd2d_fwd_prepare_kernel, (w_programs + copy_programs + sum_programs,),
                  (C, H * W, W, groups, p_tiles, c_tiles, q_tiles, w_programs, copy_programs),
                  w_scalars, dict(BC=BC, BP=BP, BQ=BQ, BCQ=BCQ, PIX_FLAT=pix_flat,
                                  SUM_IN_COPY=sum_in_copy, XV=x_unit, **w_constexprs), warps, 1)


def _layer_ints(layout, N, C, O, H, W, R, groups):
    """Runtime ints of both kernels for a stride-1 'same' layer, specialised as on a GPU: the
    launcher hands the kernels x with channels contiguous (except X_PLANES / X_ROWS)."""
    G, P_img = groups, H * W
    return dict(H=H, Wd=W, G=G, Cg=C // G, Og=O // G, OH=H, OW=W, P_IMG=P_img, M=N * P_img,
                sxn=H * W * C, sxc=1, sxh=W * C, sxw=C, syn=O * P_img,
                syc=P_img if layout == "nchw" else 1, syp=1 if layout == "nchw" else O,
                stride_h=1, stride_w=1, pad_h=R // 2, pad_w=R // 2, dil_h=1, dil_w=1, sp=1, sq=0)


def report_jobs():
    """The configs ``gemm_config`` / ``direct_config`` pick for representative layers, per layout
    and dtype, as AOT-compile jobs for ``report.py``."""
    layers = [  # name, N, C, O, H, W, R, groups, dtypes
        ("3x3 128-128 56^2", 64, 128, 128, 56, 56, 3, 1, ("bf16", "fp16", "fp32")),
        ("3x3 32-32 56^2 (narrow)", 64, 32, 32, 56, 56, 3, 1, ("bf16",)),
        ("5x5 3-80 32^2 (stem)", 256, 3, 80, 32, 32, 5, 1, ("bf16",)),
        ("dw 3x3 256x2 56^2", 32, 256, 512, 56, 56, 3, 256, ("bf16", "fp32")),
        ("1x1 256-256 28^2", 64, 256, 256, 28, 28, 1, 1, ("bf16",)),
        ("3x3 40-40 8^2 (40 channels)", 64, 40, 40, 8, 8, 3, 1, ("bf16",)),
        ("3x3 256-256 14^2 (196 positions)", 32, 256, 256, 14, 14, 3, 1, ("bf16",)),
        ("dw 3x3 40 56^2 (40 channels)", 32, 40, 40, 56, 56, 3, 40, ("bf16",)),
        ("3x3 512-512 7^2 (split K)", 32, 512, 512, 7, 7, 3, 1, ("bf16", "fp32")),
    ]
    jobs = []
    for label, N, C, O, H, W, R, groups, dtypes in layers:
        for layout in ("channels_last", "nchw"):
            for dtype in dtypes:
                ints = _layer_ints(layout, N, C, O, H, W, R, groups)
                Cg, Og = C // groups, O // groups
                # x read in place: 1×1 as [C, H·W] planes, direct layers along rows
                in_place = layout == "nchw" and (R == 1 or uses_direct_kernel(groups, Cg, Og))
                if in_place:
                    ints.update(sxn=C * H * W, sxc=H * W, sxh=W, sxw=1)
                flags = dict(R=R, S=R, PER_IMAGE=layout == "nchw", SAVE=True, FAST=True)
                itemsize = 4 if dtype == "fp32" else 2
                x_strides = tuple(ints[k] for k in ("sxn", "sxc", "sxh", "sxw"))
                ptrs = dict(X=f"*{dtype}", W=f"*{dtype}", Y=f"*{dtype}", Cout=f"*{dtype}",
                            P="*fp32", Q="*fp32", Norm="*fp32", WS="*fp32")
                if uses_direct_kernel(groups, Cg, Og):
                    BM, BG, OGP, warps, stages = direct_config(Og)
                    ints["TILES"] = cdiv(H * W, BM)
                    for k in ("Cg", "Og"):
                        del ints[k]
                    unit = channel_unit(itemsize, groups, x_strides) if Cg == 1 and Og == 1 else 1
                    consts = dict(flags, CG=Cg, OG=Og, OGP=OGP, BM=BM, BG=BG, X_ROWS=in_place,
                                  XV=unit, NORM_CL=layout == "channels_last")
                    name, kernel = f"{label} BM{BM}-BG{BG}-OGP{OGP}", scd2d_fwd_direct_kernel
                else:
                    BM, BN, BK, flat_k, warps, stages = gemm_config(
                        Cg, Og, R, R, groups, N * H * W, dtype == "fp32")
                    n_k = k_steps(Cg, R, R, BK, flat_k)
                    m_tiles = N * cdiv(H * W, BM) if layout == "nchw" else cdiv(N * H * W, BM)
                    splits, split_steps = whole_splits(n_k, split_k(
                        m_tiles * cdiv(Og, BN) * groups, n_k, NOMINAL_SMS, warps))
                    ints.update(TILES=cdiv(H * W, BM), K=Cg * R * R, N_K=n_k,
                                W_ROWS=n_k * BK, W_COLS=cdiv(Og, BN) * BN, M_TILES=m_tiles,
                                SPLIT_STEPS=split_steps)
                    ptrs["SQ"] = "*fp32"   # the GEMM's per-pixel Σ_c x²
                    consts = dict(flags, PRECISION="tf32", BM=BM, BN=BN, BK=BK, FLAT_K=flat_k,
                                  EVEN_K=Cg % BK == 0, CB_SHIFT=exact_log2(cdiv(Cg, BK)),
                                  X_PLANES=in_place, P_SHARED=False, Q_SHARED=True,
                                  XV=channel_unit(itemsize, Cg, x_strides),
                                  YV=vector_unit(itemsize, Og),
                                  PV=vector_unit(itemsize, H * W) if layout == "nchw" else 1,
                                  PARTIAL=splits > 1, SPLITS=0)
                    name = f"{label} BM{BM}-BN{BN}-BK{BK}{'-flatK' if flat_k else ''}"
                    kernel = scd2d_fwd_kernel
                job = dict(kernel=kernel, name=f"{name}-w{warps}-s{stages}", layout=layout,
                           dtype=dtype, ints=ints, constexprs=consts, pointer_dtypes=ptrs,
                           num_warps=warps, num_stages=stages)
                jobs.append(job)
                if kernel is scd2d_fwd_kernel and splits > 1:   # the second launch: sum, epilogue
                    jobs[-1] = dict(job, name=f"{name}-w{warps}-s{stages} partial")
                    jobs.append(dict(job, name=f"{name}-w{warps}-s1 {splits} splits, epilogue",
                                     constexprs=dict(consts, PARTIAL=False, SPLITS=splits),
                                     num_stages=1))
                if label.startswith("3x3 128-128") and dtype == "bf16":
                    # p and q of shape [O] (the functional API with tensors): a reciprocal an element
                    jobs.append(dict(job, name=f"{job['name']} per-channel q", ints=dict(ints, sq=1),
                                     constexprs=dict(consts, Q_SHARED=False)))
    # the preparation of the 3×3 128→128 56² b64 layer: B matrix, Σ_c x², NCHW: the copy of x;
    # and of 3×3 512→512 7² b32 (channels_last), whose Σ_c x² tiles spread
    for N, C, side, layout in ((64, 128, 56, "nchw"), (64, 128, 56, "channels_last"),
                               (32, 512, 7, "channels_last")):
        x_shape, w_shape, P, nchw = (N, C, side, side), (C, C, 3, 3), side * side, layout == "nchw"
        BN, BK = gemm_config(C, C, 3, 3, 1, N * P, False)[1:3]
        w_layout = _gemm_weight_layout(C, C, 3, 3, 1, BN, BK, False)
        x_strides = (C * P, P, side, 1) if nchw else (C * P, 1, side * C, C)
        prep = prepare_launch(x_shape, w_shape, (C * 9, 9, 3, 1), 1, "norm_q", 1e-12, 1,
                              w_layout, nchw, True, True, not nchw)
        kernel, c = prep.kernel, prep.constexprs
        ints = {name: v for name, v in zip(kernel.arg_names[6:],
                                           (*prep.head, *x_strides, *prep.tail))
                if isinstance(v, int)}                         # eps, a float, is last
        name = ("" if side == 56 else f"{side}^2 O{C} ") + (
            f"BC{c['BC']}-BP{c['BP']}-BQ{c['BQ']}-BCQ{c['BCQ']}-w{prep.warps}")
        for dtype in ("bf16", "fp32"):
            x_unit = channel_unit(4 if dtype == "fp32" else 2, C, x_strides)
            jobs.append(dict(kernel=kernel, name=name, layout=layout, dtype=dtype, ints=ints,
                             constexprs=dict(c, XV=x_unit),
                             pointer_dtypes=dict(X=f"*{dtype}", X_CL=f"*{dtype}", SQ="*fp32",
                                                 W=f"*{dtype}", Q="*fp32", W_HAT=f"*{dtype}"),
                             num_warps=prep.warps, num_stages=1))
    return jobs
