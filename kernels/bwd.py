"""Backward of the SCD core op (docs/DESIGN.md section 2): four launches (with the kernel
normalisation's backward, ``weight.normalize_weight_backward_kernel``, which also writes the
dgrad's ŵ), plus the split-K sum when split. NCHW x is copied channels-contiguous in the
prologue's launch (``scd2d_bwd_prologue_copy_kernel``).

- ``scd2d_bwd_prologue_kernel``: one pass over ``grad_y`` and the saved ``c`` and norms. Per
  element ``G = grad_y·p·(|c|+eps)^(p−1)·[c≠0]`` with one lg2 and one ex2 (``(|c|+eps)^(p−1) =
  |y|/(|c|+eps)``); stores ``grad_d = G/a`` as ``[N, OH, OW, O]`` in the input dtype (the GEMM
  operand of both GEMMs, channels contiguous), ``grad_‖s‖/‖s‖`` per (n, group, position) in
  float32 (in the saved norms' layout) and per-block partial sums of ``grad_p``, ``grad_q``
  (summed by the weight kernel, no atomics). ``grad_d`` may take the memory of ``c``, which
  the forward saves channels-last.
- ``scd2d_dgrad_kernel``: implicit GEMM of ``grad_d`` with ``ŵ`` onto the input positions of one
  stride phase ``(ih mod sh, iw mod sw)`` (grid axis 2), so that the kernel taps that reach them
  are the same for the whole tile and the K loop runs over those taps only (no zero insertion,
  no scatter). The epilogue adds ``x ⊙ box_sum(grad_‖s‖/‖s‖)``, gathered over the same taps.
  Layers whose tiles fill under half the GPU split its K as the forward does (two launches:
  partial sums into a float32 workspace, then their sum and the epilogue), in the room of the
  weight gradient's workspace (``_dgrad_splits``).
- ``scd2d_wgrad_kernel``: implicit GEMM ``grad_d^T · patches(x)`` per kernel tap, split over
  ``N·OH·OW`` into a float32 workspace that the normalisation's backward kernel sums in a fixed
  order (deterministic) while applying its Jacobian.
- ``bwd_direct.py``: the same two products as multiply-accumulate loops for groups too narrow
  for 16-wide ``tl.dot`` tiles (depthwise).
"""
import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .shapes import (every_input_read, memory_format, saved_norm_format,
                     uses_direct_kernel)
from ._common import (advance_cursor, cursor_mask, cursor_step, dgrad_phase_taps, fast_div,
                      fast_exp2, fast_log2, in_units, input_offsets, norm_offsets,
                      position_cursor, tile_positions, with_sign_of)
from .bwd_direct import scd2d_dgrad_direct_kernel, scd2d_wgrad_direct_kernel
from . import fwd
from .fwd import (NOMINAL_SMS, dot_precision, pow2_between, sm_count, split_k,
                  split_launches, whole_splits)
from .launch import (Launch, cdiv, channel_unit, divisor_magic, next_power_of_2,
                     vector_unit)
from .layout import CONFIG as COPY_CONFIG, copies_by_kernel, copy_tiles, to_channels_last
from .layout import transpose_tile
from .weight import normalize_weight, normalize_weight_backward


@triton.jit(do_not_specialize=["M", "TILES"])
def scd2d_bwd_prologue_kernel(
    GY, Cin, Norm, P, Q, GD, GNS, PART,
    M, TILES, G, Og, O, P_IMG,
    sgn, sgc, sgp, scn, scc, scp, sp, sq,
    eps,
    BP: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr, PER_IMAGE: tl.constexpr,
    FAST: tl.constexpr, OV: tl.constexpr, CV: tl.constexpr, GV: tl.constexpr,
    NORM_CL: tl.constexpr,
):
    """Program (i_m, i_g): the :func:`prologue_tile` (i_m, i_g)."""
    prologue_tile(GY, Cin, Norm, P, Q, GD, GNS, PART, tl.program_id(0), tl.program_id(1), M,
                  TILES, G, Og, O, P_IMG, sgn, sgc, sgp, scn, scc, scp, sp, sq, eps, BP, BG, BO,
                  PER_IMAGE, FAST, OV, CV, GV, NORM_CL)


@triton.jit(do_not_specialize=["M", "TILES", "PROLOGUE_PROGRAMS"])
def scd2d_bwd_prologue_copy_kernel(
    GY, Cin, Norm, P, Q, GD, GNS, PART, X, X_CL,
    M, TILES, G, Og, O, P_IMG, G_TILES, PROLOGUE_PROGRAMS, C, XP, XP_TILES, XC_TILES,
    sgn, sgc, sgp, scn, scc, scp, sp, sq,
    eps,
    BP: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr, PER_IMAGE: tl.constexpr,
    FAST: tl.constexpr, OV: tl.constexpr, CV: tl.constexpr, GV: tl.constexpr,
    NORM_CL: tl.constexpr, BC: tl.constexpr, BPX: tl.constexpr,
):
    """The prologue and the channels-contiguous copy of NCHW x in one launch (independent jobs;
    a launch costs ~10 µs of host time): programs below ``PROLOGUE_PROGRAMS`` are prologue
    tiles (i_m, i_g), the others ``layout.transpose_tile``s of x (``XP = H·W`` positions)."""
    pid = tl.program_id(0)
    if pid < PROLOGUE_PROGRAMS:
        prologue_tile(GY, Cin, Norm, P, Q, GD, GNS, PART, pid // G_TILES, pid % G_TILES, M,
                      TILES, G, Og, O, P_IMG, sgn, sgc, sgp, scn, scc, scp, sp, sq, eps, BP, BG,
                      BO, PER_IMAGE, FAST, OV, CV, GV, NORM_CL)
    else:
        i_x = pid - PROLOGUE_PROGRAMS
        i_np = i_x // XC_TILES
        transpose_tile(X, X_CL, C, XP, i_np // XP_TILES, i_np % XP_TILES, i_x % XC_TILES, BC,
                       BPX)


@triton.jit
def prologue_tile(
    GY, Cin, Norm, P, Q, GD, GNS, PART, i_m, i_g,
    M, TILES, G, Og, O, P_IMG,
    sgn, sgc, sgp, scn, scc, scp, sp, sq,
    eps,
    BP: tl.constexpr, BG: tl.constexpr, BO: tl.constexpr, PER_IMAGE: tl.constexpr,
    FAST: tl.constexpr, OV: tl.constexpr, CV: tl.constexpr, GV: tl.constexpr,
    NORM_CL: tl.constexpr,
):
    """BP output positions (tile ``i_m``) × BG groups (tile ``i_g``) × all O/G channels of each
    group, in blocks of BO ([BP, BG, BO] tiles: narrow groups share a tile, wide ones loop).

    ``grad_y`` and ``c`` are read as [N, O, OH·OW] through (sample, channel, position) strides
    (the forward saves ``c`` channels-last). ``PER_IMAGE`` (NCHW grad_y): tiles run over the
    positions of one image, a contiguous run of every (n, o) plane, so grad_y loads along
    positions in wide copies; otherwise over the flat positions. ``GD`` may be ``c``'s memory:
    each element of ``c`` is read before the same element of grad_d is written, by the same
    program. ``FAST``: lg2 / ex2 / division as hardware approximations (CUDA), as the forward's
    epilogue. ``OV``: O/G, and so grad_d's position strides, are multiples of it; ``CV`` /
    ``GV``: c's / grad_y's sample and position strides are (``_common.in_units``; OV for the
    channels-last c the forward makes and a channels-last grad_y, 1 for other strides: NCHW
    grad_y, a c that a saved-tensor hook has given other strides; ``prologue_launches``).
    ``NORM_CL``: the norms (and grad_‖s‖/‖s‖) are [N, OH, OW, G] in memory, groups innermost,
    else [N, G, OH, OW] (``shapes.saved_norm_format``).
    """
    Og, O, scn, scp = in_units(Og, OV), in_units(O, OV), in_units(scn, CV), in_units(scp, CV)
    sgn, sgp = in_units(sgn, GV), in_units(sgp, GV)
    o_n, o_p, m_m = tile_positions(i_m, M, P_IMG, TILES, BP, PER_IMAGE)  # [BP]
    o_n64 = o_n.to(tl.int64)
    o_gy = o_n64 * sgn + o_p * sgp
    o_c = o_n64 * scn + o_p * scp
    o_gd = (o_n64 * P_IMG + o_p) * O                                     # [BP] rows of grad_d
    o_g = i_g * BG + tl.arange(0, BG)                                    # [BG]
    m_g = o_g < G
    o_norm = norm_offsets(o_n64, o_p, o_g, G, P_IMG, NORM_CL)           # [BP, BG]
    m_pg = m_m[:, None] & m_g[None, :]
    b_norm = tl.load(Norm + o_norm, mask=m_pg, other=1.0)                # [BP, BG]
    b_ns = tl.zeros((BP, BG), dtype=tl.float32)
    for i_o in range(0, Og, BO):
        o_o = i_o + tl.arange(0, BO)                                     # [BO] channel in group
        o_glob = o_g[:, None] * Og + o_o[None, :]                        # [BG, BO]
        m_go = m_g[:, None] & (o_o < Og)[None, :]
        m = m_m[:, None, None] & m_go[None, :, :]
        b_gy = tl.load(GY + o_gy[:, None, None] + (o_glob * sgc)[None, :, :], mask=m, other=0.0)
        b_c = tl.load(Cin + o_c[:, None, None] + (o_glob * scc)[None, :, :], mask=m, other=0.0)
        b_gy, b_c = b_gy.to(tl.float32), b_c.to(tl.float32)              # [BP, BG, BO]
        b_p = tl.load(P + o_glob * sp, mask=m_go, other=1.0)[None, :, :]
        b_q = tl.load(Q + o_glob * sq, mask=m_go, other=0.0)[None, :, :]
        b_base = tl.abs(b_c) + eps
        b_l = fast_log2(b_base, FAST)
        b_mag = fast_exp2(b_p * b_l, FAST)                               # |y|
        # comparisons, so NaN in c stays NaN below; |y| = 0 with c ≠ 0 (|c| + eps denormal, which
        # the FAST lg2 flushes to -inf, or an underflowing power) is treated as c = 0: there
        # |y|·ln(|c| + eps) would be 0·(-inf) = NaN and G/a a 0 over a flushed divisor
        zero = (b_c == 0) | (b_mag == 0)
        # G/a = grad_y·p·|y| / ((|c|+eps)·a): one division (two cost a spill on sm_80)
        b_gd = tl.where(zero, 0.0, fast_div(b_gy * b_p * b_mag,
                                            b_base * (b_norm[:, :, None] + b_q), FAST))
        b_gc = b_gd * b_c                                                # G·c/a
        b_ns += tl.sum(b_gc, axis=2)
        # grad_y·y·ln(|c|+eps), 0 where c = 0 (also when eps = 0, where ln gives -inf)
        b_gp = tl.where(zero, 0.0, b_gy * with_sign_of(b_mag, b_c) * b_l)
        tl.store(GD + o_gd[:, None, None] + o_glob[None, :, :], b_gd.to(GD.dtype.element_ty),
                 mask=m)
        p_part = PART + i_m.to(tl.int64) * (2 * O) + o_glob              # [ROWS, 2, O]: p, q
        tl.store(p_part, tl.sum(b_gp, axis=0) * 0.6931471805599453, mask=m_go)
        tl.store(p_part + O, -tl.sum(b_gc, axis=0), mask=m_go)
    # an all-zero patch with norm_eps = 0: ‖s‖ = 0 and Σ G·c/a = 0, so 0, not 0/0
    tl.store(GNS + o_norm, -b_ns / tl.where(b_norm == 0, 1.0, b_norm), mask=m_pg)


@triton.jit(do_not_specialize=["M", "TILES", "SPLIT_STEPS"])
def scd2d_dgrad_kernel(
    GD, W, GNS, X, GX, WS,
    M, TILES, H, Wd, G, Cg, Og, O, OH, OW, HQ, WQ, P_Q, SPLIT_STEPS,
    sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    R: tl.constexpr, S: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PER_IMAGE: tl.constexpr, PLANES: tl.constexpr, EVEN_O: tl.constexpr, EVEN_C: tl.constexpr,
    OV: tl.constexpr, XV: tl.constexpr, DV: tl.constexpr,
    UNREAD: tl.constexpr, PARTIAL: tl.constexpr, SPLITS: tl.constexpr,
):
    """Program (i_m, i_n, i_z): BM input positions of one stride phase × BN input channels.

    W is ŵ as [G, R·S, C/G, O/G]. ``i_z = (g·sh + phase_h)·sw + phase_w``; the positions are
    ``(n, ihq·sh + phase_h, iwq·sw + phase_w)`` over ``ihq < HQ = ⌈H/sh⌉``, ``iwq < WQ``
    (``P_Q = HQ·WQ`` per image, ``M = N·P_Q``). ``PER_IMAGE`` (NCHW grad_x): tiles run over
    one image (``TILES`` per image) so the epilogue reads x and stores grad_x along positions;
    with ``PLANES`` (stride 1, x and grad_x NCHW-contiguous) a tile is one contiguous run of
    each (n, c) plane: 16-byte loads and stores. ``EVEN_O`` (BK divides O/G) and ``EVEN_C`` (BN
    divides C/G) drop the loop's channel masks. ``OV``: O/G is a multiple of it (grad_d's and
    ŵ's rows), ``XV`` / ``DV``: C/G and x's / grad_x's strides but the channels' are
    (``_common.in_units``; 1 where their channels are not contiguous). ``UNREAD``: some input
    pixels lie in no patch (``shapes.every_input_read``); their x term is 0, not x·0.
    Split K (tiles that fill under half the SMs, ``fwd.split_k``) takes two launches, as the
    forward's: ``PARTIAL`` runs K steps ``[s·SPLIT_STEPS, (s + 1)·SPLIT_STEPS)`` of its phase
    for split ``s`` (grid axis 2 = s·G·sh·sw + i_z) and stores its float32 tile into the
    workspace WS [splits, G·sh·sw, M tiles, C/G tiles, BM·BN]; then ``SPLITS`` > 0 sums the
    SPLITS tiles in split order where the K loop would run. The epilogue's box sum of
    grad_‖s‖/‖s‖ and its read flags gather the phase's taps after the K loop or the sum, the
    same code for both (the same bits), out of the loop's steps.
    """
    Og, O = in_units(Og, OV), in_units(O, OV)
    Cg, sxn, sxh, sxw = in_units(Cg, XV), in_units(sxn, XV), in_units(sxh, XV), in_units(sxw, XV)
    sdn, sdh, sdw = in_units(sdn, DV), in_units(sdh, DV), in_units(sdw, DV)
    i_m, i_n, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PARTIAL:
        i_s = i_z // (G * stride_h * stride_w)
        i_z = i_z - i_s * (G * stride_h * stride_w)
    ph_w = i_z % stride_w
    ph_h = (i_z // stride_w) % stride_h
    i_g = (i_z // (stride_w * stride_h)).to(tl.int64)
    o_n, o_q, m_m = tile_positions(i_m, M, P_Q, TILES, BM, PER_IMAGE)  # [BM] phase position
    o_n = o_n.to(tl.int64)
    o_ihq = o_q // WQ
    o_iwq = o_q - o_ihq * WQ
    o_ih = o_ihq * stride_h + ph_h
    o_iw = o_iwq * stride_w + ph_w
    if not PLANES:  # the last phase row / column may pass H, W (a mask the stores can't widen)
        m_m = m_m & (o_ih < H) & (o_iw < Wd)
    # the kernel rows r0, r0 + step_h, ... (nr of them) and columns that reach this phase
    r0, nr = dgrad_phase_taps(ph_h, pad_h, stride_h, dil_h, step_h, R)
    s0, ns = dgrad_phase_taps(ph_w, pad_w, stride_w, dil_w, step_w, S)
    o_c = i_n * BN + tl.arange(0, BN)                                    # [BN] channel in group
    m_c = o_c < Cg
    o_k = tl.arange(0, BK)
    n_ob = tl.cdiv(Og, BK)
    # loop-invariant parts of the addresses: each step adds int32 offsets to them (~25 fewer
    # SASS instructions per step than 64-bit offsets rebuilt from the positions and channels)
    p_gd = GD + i_g * Og + o_n * OH * OW * O          # the rows' samples ([BM], or one image)
    o_w = o_c[None, :] * Og + o_k[:, None]                               # [BK, BN] in a tap
    p_ns = GNS + (o_n * G + i_g) * OH * OW

    # oh·sh = ih + pad_h − r·dil_h, an exact division, uniform over the phase: the first tap
    # row's offset, then dq_h less a tap row (step_h·dil_h is a multiple of stride_h); columns
    # alike. The loop carries its tap (j_r, j_s) and channel block i_ob: no division a step
    # (three of ~28 SASS instructions each at stride 2, where stride and taps are not constants)
    d_h0 = (ph_h + pad_h - r0 * dil_h) // stride_h
    d_w0 = (ph_w + pad_w - s0 * dil_w) // stride_w
    dq_h = step_h * dil_h // stride_h
    dq_w = step_w * dil_w // stride_w
    i_ob = i_n * 0
    j_s = i_n * 0
    j_r = i_n * 0
    k_lo, k_hi = 0, nr * ns * n_ob
    if PARTIAL:   # this split's first step: its tap and channel block
        k_lo = i_s * SPLIT_STEPS
        k_hi = tl.minimum(k_hi, k_lo + SPLIT_STEPS)
        tap = k_lo // n_ob
        i_ob = k_lo - tap * n_ob
        j_r = tap // tl.maximum(ns, 1)                 # a phase no tap reaches runs no step
        j_s = tap - j_r * ns

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PARTIAL or SPLITS > 0:
        # split K: the workspace tile of (split 0, i_z, i_m, i_n), BM·BN contiguous, positions
        # innermost for NCHW grad_x (the epilogue's order); int32 (a split workspace holds at
        # most as many tiles as the GPU runs at once)
        ws_tiles = G * stride_h * stride_w * tl.num_programs(0) * tl.num_programs(1)
        p_ws = WS + ((i_z * tl.num_programs(0) + i_m) * tl.num_programs(1) + i_n) * (BM * BN)
        if PER_IMAGE:
            p_ws += tl.arange(0, BM)[:, None] + tl.arange(0, BN)[None, :] * BM
        else:
            p_ws += tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        ws_split = ws_tiles * (BM * BN)
    if SPLITS > 0:              # the partial sums in split order instead of the K loop
        for i_p in range(SPLITS):
            acc += tl.load(p_ws + i_p * ws_split)
    else:
        for _ in range(k_lo, k_hi):
            r = r0 + j_r * step_h
            s = s0 + j_s * step_w
            o_oh = o_ihq + (d_h0 - j_r * dq_h)
            o_ow = o_iwq + (d_w0 - j_s * dq_w)
            m_t = m_m & (o_oh >= 0) & (o_oh < OH) & (o_ow >= 0) & (o_ow < OW)
            o_pos = o_oh * OW + o_ow                                         # [BM] in-image
            o_o = i_ob * BK + o_k                                        # [BK] channel in group
            p_w = W + ((i_g * R * S + r * S + s) * Cg * Og + i_ob * BK) + o_w
            m_gd = m_t[:, None]
            if EVEN_O and EVEN_C:
                b_w = tl.load(p_w)                                       # [BK, BN]
            else:
                m_o = o_o < Og
                if not EVEN_O:
                    m_gd = m_gd & m_o[None, :]
                b_w = tl.load(p_w, mask=m_o[:, None] & m_c[None, :], other=0.0)
            b_gd = tl.load((p_gd + o_pos * O)[:, None] + o_o[None, :], mask=m_gd,
                           other=0.0)                                    # [BM, BK]
            acc = tl.dot(b_gd, b_w, acc, input_precision=PRECISION)
            i_ob += 1                          # the next channel block, tap column, tap row
            tap_done = i_ob == n_ob
            i_ob = tl.where(tap_done, 0, i_ob)
            j_s += tap_done.to(tl.int32)
            row_done = j_s == ns
            j_s = tl.where(row_done, 0, j_s)
            j_r += row_done.to(tl.int32)
    if PARTIAL:
        tl.store(p_ws + i_s * ws_split, acc)
        return

    # the box sum of grad_‖s‖/‖s‖ over the phase's taps, unrolled after the K loop so that its
    # loads issue together (in the loop, a load once a tap cost every step 13–38 SASS
    # instructions, and the tap's first step waited for it)
    b_box = tl.zeros((BM,), dtype=tl.float32)
    b_read = o_ihq < 0                     # [BM] False: positions some tap reaches (UNREAD)
    j_r = i_n * 0
    j_s = i_n * 0
    for t in tl.static_range(R * S):
        o_oh = o_ihq + (d_h0 - j_r * dq_h)                 # as the K loop's taps, in its order
        o_ow = o_iwq + (d_w0 - j_s * dq_w)
        m_t = (m_m & (o_oh >= 0) & (o_oh < OH) & (o_ow >= 0) & (o_ow < OW)
               & (o_ihq * 0 + t < nr * ns))    # a [BM] mask: the interpreter mixes no scalar
        b_box += tl.load(p_ns + o_oh * OW + o_ow, mask=m_t, other=0.0)
        if UNREAD:
            b_read = b_read | m_t
        j_s += 1                               # the next tap column, tap row
        row_done = j_s == ns
        j_s = tl.where(row_done, 0, j_s)
        j_r += row_done.to(tl.int32)
    m = m_m[:, None] & m_c[None, :]
    o_cg = (i_g * Cg + o_c)[None, :]
    o_x = input_offsets(o_n, o_q, o_ih, o_iw, sxn, sxh, sxw, PLANES)
    o_gx = input_offsets(o_n, o_q, o_ih, o_iw, sdn, sdh, sdw, PLANES)
    b_x = tl.load(X + o_x[:, None] + o_cg * sxc, mask=m, other=0.0).to(tl.float32)
    if UNREAD:
        b_x = tl.where(b_read[:, None], b_x, 0.0)
    b_gx = acc + b_x * b_box[:, None]
    tl.store(GX + o_gx[:, None] + o_cg * sdc, b_gx.to(GX.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["N", "M"])
def scd2d_wgrad_kernel(
    GD, X, WS,
    N, H, Wd, G, Cg, Og, O, OH, OW, M, K_SPLIT,
    sxn, sxc, sxh, sxw, sxg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr,
    EVEN_O: tl.constexpr, EVEN_C: tl.constexpr, EVEN_M: tl.constexpr, WIDE: tl.constexpr,
    OV: tl.constexpr, XV: tl.constexpr, WS_TAP_MAJOR: tl.constexpr,
):
    """Program (i_mn, tap, split·G + g): a [BM out channels, BN in channels] tile of one tap,
    reduced over positions [split·K_SPLIT, (split+1)·K_SPLIT); WS is [splits, O, C/G, R, S],
    or with ``WS_TAP_MAJOR`` (not ``FLAT``) [splits, O, R, S, C/G], where a tile's channels
    are stored 16 bytes at a time, not one 4-byte store R·S elements apart.
    The x rows of a K step come from a cursor over the positions, decoded once and moved on by
    BK each step (``position_cursor``); the FLAT loop divides.

    ``FLAT`` (few channels per group, e.g. a 3-channel stem): the BN columns run over the flat
    (channel, tap) index instead and grid axis 1 is 1, so each ``grad_d`` tile is loaded once
    for all taps rather than once per tap, and the dot is not mostly padding. ``EVEN_O`` (BM
    divides O/G) and ``EVEN_C`` (BN divides the columns) drop the loop's channel masks, and
    ``EVEN_M`` (BK divides M and K_SPLIT: every K step is whole) its position masks. ``OV``:
    O/G is a multiple of it, ``XV``: C/G and ``sxg`` are (``_common.in_units``).
    """
    Og, O = in_units(Og, OV), in_units(O, OV)
    Cg, sxg = in_units(Cg, XV), in_units(sxg, XV)
    i_mn, i_tap, i_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_g = i_z % G
    i_s = i_z // G
    n_cols = Cg * R * S if FLAT else Cg
    n_n = tl.cdiv(n_cols, BN)
    o_o = (i_mn // n_n) * BM + tl.arange(0, BM)                          # [BM] out channel in group
    o_j = (i_mn % n_n) * BN + tl.arange(0, BN)                           # [BN] column
    m_o = o_o < Og
    m_c = o_j < n_cols
    if FLAT:   # column j = (channel c, tap): per-column input shifts
        o_cj = o_j // (R * S)
        o_tj = o_j - o_cj * (R * S)
        dh = (o_tj // S) * dil_h - pad_h                                 # [BN]
        dw = (o_tj % S) * dil_w - pad_w
    else:
        o_cj = o_j
        dh = (i_tap // S) * dil_h - pad_h
        dw = (i_tap % S) * dil_w - pad_w
    p_x = X + ((i_g * Cg + o_cj) * sxc)[None, :]                         # [1, BN]
    k_lo = i_s * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, M)
    # the grad_d tile: int32 offsets within it (loop-invariant, below BK·O) from a scalar
    # 64-bit row pointer, not 64-bit offsets recomputed from the positions each step
    o_gd = (i_g * Og + o_o)[:, None] + tl.arange(0, BK)[None, :] * O      # [BM, BK]
    row_gd = tl.cast(O, tl.int64)   # not O.to: O = 1 arrives as a constexpr

    if not FLAT:   # the cursor of the first step's positions, and the move of a step
        o_u, o_ih, o_iw = position_cursor(k_lo + tl.arange(0, BK), OH, OW, dh, dw, stride_h,
                                          stride_w, sxn, sxh, sxw, sxg, WIDE)  # [BK]
        d_ih, d_iw, step, carry_w, carry_h = cursor_step(BK, OH, OW, stride_h, stride_w, sxn,
                                                         sxh, sxw, sxg, WIDE)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k_lo, k_hi, BK):
        o_k = k + tl.arange(0, BK)                                       # [BK] output positions
        m_k = o_k < k_hi
        if FLAT:   # (plain divisions: fast_divmod made this loop 1.3-1.4x longer)
            o_ow = o_k % OW
            o_t = o_k // OW
            o_ih = ((o_t % OH) * stride_h)[:, None] + dh[None, :]        # [BK, BN]
            o_iw = (o_ow * stride_w)[:, None] + dw[None, :]
            m_x = m_c[None, :] & (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < Wd)
            o_x = (o_t // OH).to(tl.int64)[:, None] * sxn + o_ih * sxh + o_iw * sxw
        else:
            o_x = (o_u * sxg)[:, None]
            m_x = cursor_mask(o_ih, o_iw, H, Wd)[:, None]
            if not EVEN_C:
                m_x = m_x & m_c[None, :]
        if not EVEN_M:
            m_x = m_x & m_k[:, None]
        if EVEN_M and EVEN_O:
            b_gd = tl.load(GD + k * row_gd + o_gd)                       # [BM, BK]
        else:
            if EVEN_M:
                m_gd = m_o[:, None]
            elif EVEN_O:
                m_gd = m_k[None, :]
            else:
                m_gd = m_o[:, None] & m_k[None, :]
            b_gd = tl.load(GD + k * row_gd + o_gd, mask=m_gd, other=0.0)
        b_x = tl.load(p_x + o_x, mask=m_x, other=0.0)                    # [BK, BN]
        acc = tl.dot(b_gd, b_x, acc, input_precision=PRECISION)
        if not FLAT:
            o_u, o_ih, o_iw = advance_cursor(o_u, o_ih, o_iw, d_ih, d_iw, step, carry_w, carry_h,
                                             OH, OW, dh, dw, stride_h, stride_w)

    o_ws = i_s.to(tl.int64) * O * Cg * R * S
    if FLAT:
        o_ws += ((i_g * Og + o_o) * (Cg * R * S))[:, None] + o_j[None, :]
    elif WS_TAP_MAJOR:
        o_ws += (((i_g * Og + o_o) * (R * S) + i_tap) * Cg)[:, None] + o_j[None, :]
    else:
        o_ws += i_tap + (((i_g * Og + o_o) * Cg)[:, None] + o_j[None, :]) * (R * S)
    tl.store(WS + o_ws, acc.to(WS.dtype.element_ty), mask=m_o[:, None] & m_c[None, :])


# CUDA configs, one or two per kernel (no autotune: a GPU compiles little). GEMM tuples are
# (BM, BN, BK, num_warps, num_stages); the "large" ones serve groups of more than 64 channels.
# The 16-bit "large" ones were picked from a sweep on an H100 (docs/GPU_NOTES.md section 8):
# 2-14% off a training step against 128×128 tiles.
# (BP, largest BO, warps, stages) by grad_y's layout: 16 elements a thread. The sums over a
# tile's positions (shuffles, shared memory) cost ~300 SASS instructions per channel block, so
# these took 46–49 instructions an element (bf16) where 64 positions × 32 channels took 64;
# 32 elements a thread (35–38) cost 190–255 registers. NCHW takes 128 × 32: 256 × 16 spilled
# 8–16 B with the copy of x (sm_90), and 128 × 32 spilled 8 B on channels_last (fp32, sm_80)
PROLOGUE_CONFIGS = {"channels_last": (256, 16, 8, 1), "nchw": (128, 32, 8, 1)}
DGRAD_CONFIGS = {"large": (64, 128, 64, 4, 3), "small": (128, 64, 32, 4, 3)}
WGRAD_CONFIGS = {"large": (128, 64, 64, 4, 3), "small": (64, 64, 64, 4, 3)}
DGRAD_CONFIG_FP32 = (128, 64, 32, 4, 3)
WGRAD_CONFIG_FP32 = (64, 64, 32, 8, 3)   # 4 warps spill 8 B on sm_80 (kernel report)
WGRAD_FLAT_CONFIG = (64, 128, 32, 8, 3)           # fewer than 16 channels per group; BN at most
DGRAD_DIRECT_CONFIG = (64, 64, 4, 2)              # (BM, BC, warps, stages)
# the GEMM wgrad's workspace tap-major: its epilogue stores 16 bytes at a time (sm_90 bf16: 32
# or 64 scalar stores a thread before, whole kernel 1048 -> 936 and 1384 -> 1080 instructions;
# the small tiles' loop 166 -> 175, the large ones' unchanged); bench.sweep times both
WGRAD_WS_TAP_MAJOR = True
WGRAD_DIRECT_CONFIG = (128, 64, 4, 2)             # (BP, BO, warps, stages)


def _dgrad_config(dtype, Cg, Og, cuda):
    """BN (input channels) no wider than C/G needs: a 3-channel stem takes 16, not 64."""
    if not cuda:  # the interpreter: small tiles, few loop steps
        return 64, pow2_between(Cg, 16, 64), pow2_between(Og, 16, 64), 4, 1
    if dtype == torch.float32:
        BM, BN, BK, warps, stages = DGRAD_CONFIG_FP32
    else:
        BM, BN, BK, warps, stages = DGRAD_CONFIGS["large" if Cg > 64 and Og >= 64 else "small"]
    return BM, pow2_between(Cg, 16, BN), BK, warps, stages


def _prologue_config(per_image, positions, cuda):
    """(BP, largest BO, warps, stages) of the prologue; ``per_image`` tiles (NCHW grad_y) hold
    no more of an image's ``positions`` than it has (at least 64)."""
    if not cuda:
        return 32, 64, 4, 1
    BP, BO, warps, stages = PROLOGUE_CONFIGS["nchw" if per_image else "channels_last"]
    if per_image:
        BP = min(BP, max(64, next_power_of_2(positions)))
    return BP, BO, warps, stages


def _prologue_blocks(per_image, N, positions, G, Og, cuda, sms):
    """(BP, BG, BO, tiles per image, rows, warps, stages) of the prologue's [BP, BG, BO] tiles
    (``rows``: position tiles, one row of grad_p / grad_q partials each). A program loops over
    its groups' channels in blocks of BO, one dependent round trip each. On a GPU (``sms`` SMs),
    where a group's channels take several blocks, tiles of fewer positions take more channels
    (the same elements a tile; SASS loops as short, no spills): NCHW tiles capped at an image's
    positions, and tiles that give fewer than two waves (deep layers on small images: 3×3
    512→512 7² b32 made 7 programs of 32 blocks on channels_last), down to 32 positions.
    Narrow groups keep their tiles (more channels would only pack more groups a tile)."""
    BP, BO_MAX, warps, stages = _prologue_config(per_image, positions, cuda)
    wide = next_power_of_2(Og)
    if sms and per_image:
        BO_MAX = max(BO_MAX, min(BO_MAX * PROLOGUE_CONFIGS["nchw"][0] // BP, wide))
    while True:
        BO = min(BO_MAX, wide)
        BG = min(BO_MAX // BO, next_power_of_2(G))  # narrow groups: several per tile
        tiles = cdiv(positions, BP)
        rows = N * tiles if per_image else cdiv(N * positions, BP)
        if BP <= 32 or BO_MAX >= wide or rows * cdiv(G, BG) >= 2 * sms:
            return BP, BG, BO, tiles, rows, warps, stages
        BP, BO_MAX = BP // 2, BO_MAX * 2


def _wgrad_config(dtype, Cg, Og, cuda, flat_cols=0, large=True):
    """``flat_cols``: the (channel, tap) columns of a FLAT wgrad (0: per-tap tiles);
    ``large=False`` keeps wide layers on the small tiles (when split-K is capped)."""
    if not cuda:
        return pow2_between(Og, 16, 64), pow2_between(flat_cols or Cg, 16, 64), 64, 4, 1
    if flat_cols:
        BM, BN, BK, warps, stages = WGRAD_FLAT_CONFIG
        return BM, pow2_between(flat_cols, 16, BN), BK, warps, stages
    if dtype == torch.float32:
        return WGRAD_CONFIG_FP32
    return WGRAD_CONFIGS["large" if large and Cg > 64 and Og > 64 else "small"]


def _splits(tiles, M, BK, sms, split_bytes, out_bytes, x_bytes):
    """Split-K count: about three waves of ``tiles`` programs a split on ``sms`` SMs, each
    split at least 8 K steps long, and a float32 workspace (``split_bytes`` a split) no larger
    than the larger of one output-sized tensor (``out_bytes``) and grad_x (``x_bytes``, 0
    without grad_x), which holds a workspace that fits for free: fewer splits that fit there
    win over more that do not while they still fill the SMs once (a training step's peak
    then holds no workspace). The interpreter (``sms`` 0) takes two splits (when there is
    room) so tests exercise the reduction."""
    steps = cdiv(M, BK)
    if not sms:
        return min(2, steps)
    splits = max(1, min(cdiv(3 * sms, tiles), steps // 8, max(out_bytes, x_bytes) // split_bytes))
    in_grad_x = x_bytes // split_bytes
    return in_grad_x if splits > in_grad_x >= 1 and in_grad_x * tiles >= sms else splits


def _dgrad_splits(programs, n_k, sms, warps, split_bytes, room_bytes):
    """Split-K count of the dgrad GEMM's ``programs`` tiles of ``n_k`` K steps: the forward's
    rule (``split_k``: tiles that fill under half of the ``sms`` SMs, at least 8 steps a
    split; the interpreter plans for a 132-SM GPU), as many as a float32 workspace of
    ``split_bytes`` a split fits in ``room_bytes``: the weight gradient's workspace where that
    lies beside grad_x (0 otherwise). The dgrad's workspace then holds no more than the
    backward holds later, and ŵ no more than grad_w (same size), so the peak does not grow:
    3×3 512→512 7² b32 splits in two (6.6 MB; the weight gradient's workspace 9.4 MB), 3×3
    40→40 8² b64 not (2.1 MB; its weight gradient's workspace lies in grad_x)."""
    return max(1, min(split_k(programs, n_k, sms, warps), room_bytes // split_bytes))


def _position_strides(t):
    """``t`` [N, O, OH, OW] and its (sample, channel, position) strides, positions ``oh·OW + ow``
    (NCHW, channels_last and broadcast tensors as they are; other strides copied to NCHW). With
    OW = 1 the positions are rows: torch leaves a size-1 dimension's stride arbitrary, and
    ``contiguous()`` does not copy for it (a transposed grad_y read row 1 at offset stride(3))."""
    _, _, OH, OW = t.shape
    if OW == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if OH > 1 and t.stride(2) != OW * t.stride(3):
        t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


class _Plan(NamedTuple):
    """What a backward needs that follows from shapes, layouts and arguments."""
    norm_format: torch.memory_format   # of the norms the kernels read (``saved_norm_format``)
    n_blk: int                # prologue blocks: rows of the grad_p / grad_q partials
    prologue: Launch
    prologue_copy: Launch     # the prologue and the copy of NCHW x in one (copies_by_kernel)
    w_layout: tuple           # (shape, out_strides) of ŵ for dgrad
    dgrad: Launch
    planes: bool              # dgrad reads x as NCHW planes (else the channels-contiguous copy)
    ws_shape: tuple           # split-K workspace [splits, O, C/G, R, S] (or R, S, C/G: tap-major)
    ws_dtype: torch.dtype
    ws_in_grad_x: bool        # the workspace fits in grad_x's memory, written only after it
    dgrad_first: bool         # with both sides: the dgrad before the workspace exists
    wgrad: Launch
    dgrad_partial: Launch = None   # a split K's first launch (``split_k``), before dgrad
    dgrad_ws_numel: int = 0        # its float32 workspace


@functools.lru_cache(maxsize=1024)
def _plan(x_shape, x_strides, x_contiguous, w_shape, out_hw, per_image, dtype, cuda,
          device_index, stride, padding, dilation, groups, eps, weight_norm, precision,
          need_grad_x, need_grad_params, fast):
    """The backward's launches for one layer signature, worked out once (host time per call);
    ``fast``: the prologue's math as hardware approximations (``fwd.FAST_MATH`` on CUDA)."""
    N, C, H, W = x_shape
    O, Cg, R, S = w_shape
    G, Og = groups, O // groups
    OH, OW = out_hw
    M = N * OH * OW
    # the wgrads' K loops index up to a block (≤ 128) past N·OH·OW, in int32
    # (the wgrads' grad_d offsets within a K step reach O·128, also for small images)
    if max(M + 128, N * H * W) >= 2**31 or max(C * H * W, O * max(OH * OW, 128)) >= 2**31:
        raise ValueError(f"scd2d_bwd indexes positions and per-sample offsets in int32: needs "
                         f"N·OH·OW = {M} below 2**31 - 128, N·H·W = {N * H * W} and "
                         f"per-sample sizes C·H·W = {C * H * W}, O·max(OH·OW, 128) = "
                         f"{O * max(OH * OW, 128)} below 2**31")
    sh, sw = stride
    conv = (sh, sw, padding[0], padding[2], *dilation)
    x_bytes = N * C * H * W * dtype.itemsize if need_grad_x else 0     # grad_x
    out_bytes = M * O * dtype.itemsize
    sms = sm_count(device_index) if cuda else 0
    unread = not every_input_read((H, W), out_hw, (R, S), stride, padding, dilation)

    BP, BG, BO, tiles, n_blk, warps, stages = _prologue_blocks(per_image, N, OH * OW, G, Og,
                                                               cuda, sms)
    norm_format = saved_norm_format(torch.contiguous_format if per_image else torch.channels_last,
                                    w_shape, G, "triton")
    norm_cl = norm_format == torch.channels_last
    prologue_ints = (M, tiles, G, Og, O, OH * OW)
    # vector units (``_common.in_units``): grad_d, c and ŵ have rows of O/G channels; x is read
    # as it is when its channels are contiguous, else as the channels-contiguous copy
    o_unit = vector_unit(dtype.itemsize, Og)
    cl_strides = (C * H * W, 1, W * C, C)
    x_cl_strides = x_strides if x_strides[1] == 1 or C == 1 else cl_strides
    grad_x_strides = (C * H * W, H * W, W, 1) if per_image else cl_strides
    prologue_constexprs = dict(BP=BP, BG=BG, BO=BO, PER_IMAGE=per_image, FAST=fast, OV=o_unit,
                               CV=o_unit, GV=1 if per_image else o_unit, NORM_CL=norm_cl)
    prologue = Launch(scd2d_bwd_prologue_kernel, (n_blk, cdiv(G, BG)), prologue_ints, (eps,),
                      prologue_constexprs, warps, stages)
    BC, BPX, _ = COPY_CONFIG
    xp_tiles, xc_tiles = copy_tiles(x_shape)
    programs = n_blk * cdiv(G, BG)
    prologue_copy = Launch(
        scd2d_bwd_prologue_copy_kernel, (programs + N * xp_tiles * xc_tiles,),
        (*prologue_ints, cdiv(G, BG), programs, C, H * W, xp_tiles, xc_tiles), (eps,),
        dict(prologue_constexprs, BC=BC, BPX=BPX), warps, stages)
    prologues = (norm_format, n_blk, prologue, prologue_copy)

    if uses_direct_kernel(G, Cg, Og):
        BM, BC, warps, stages = DGRAD_DIRECT_CONFIG if cuda else (64, pow2_between(C, 16, 64), 4, 1)
        planes = per_image and x_contiguous      # NCHW: tiles along each image's positions
        tiles = cdiv(H * W, BM)
        # depthwise (a channel a group in and out): rows of C = O contiguous channels
        depthwise = Cg == 1 and Og == 1
        units = (lambda strides: channel_unit(dtype.itemsize, C, strides)) if depthwise \
            else (lambda strides: 1)
        d_unit = vector_unit(dtype.itemsize, O, C) if depthwise else 1
        dgrad = Launch(scd2d_dgrad_direct_kernel,
                        (N * tiles if planes else cdiv(N * H * W, BM), cdiv(C, BC)),
                        (H, W, G, Cg, Og, O, C, OH, OW, H * W, N * H * W, tiles), conv,
                        dict(R=R, S=S, BM=BM, BC=BC, PLANES=planes, OV=d_unit,
                             XV=units(x_strides if planes else x_cl_strides),
                             DV=units(grad_x_strides), UNREAD=unread, NORM_CL=norm_cl),
                        warps, stages)
        BP, BO, warps, stages = WGRAD_DIRECT_CONFIG if cuda else (64, pow2_between(O, 16, 64), 4, 1)
        splits = _splits(cdiv(O, BO) * Cg * R * S, M, BP, sms, O * Cg * R * S * 4,
                         out_bytes, x_bytes)
        k_split = cdiv(cdiv(M, splits), BP) * BP
        splits = cdiv(M, k_split)
        wgrad = Launch(scd2d_wgrad_direct_kernel, (cdiv(O, BO), Cg * R * S, splits),
                        (N, H, W, G, Cg, Og, O, OH, OW, M, k_split, *divisor_magic(OH),
                         *divisor_magic(OW)), conv,
                        dict(R=R, S=S, BP=BP, BO=BO, OV=d_unit, XV=units(x_cl_strides)),
                        warps, stages)
        # ŵ tap-major, [R, S, O, C/G] in memory: (group, out channel in group, in channel, tap)
        w_layout = (w_shape, (Og * Cg, Cg, 1, O * Cg))
        return _Plan(*prologues, w_layout, dgrad, planes, *_workspace(
            (splits, O, Cg, R, S), torch.float32, x_bytes, O * Cg * R * S * dtype.itemsize,
            out_bytes), wgrad)

    BM, BN, BK, warps, stages = _dgrad_config(dtype, Cg, Og, cuda)
    HQ, WQ = cdiv(H, sh), cdiv(W, sw)
    step_h, step_w = sh // math.gcd(sh, dilation[0]), sw // math.gcd(sw, dilation[1])
    # ŵ as [G, R·S, C/G, O/G], output channels contiguous: the B tile of each K step is one
    # block of a tap's matrix, and the normalisation kernels store 8 channels (16 bytes) at once
    w_layout = ((G, R * S, Cg, Og), (R * S * Cg * Og, 1, Og, Cg * Og))
    # NCHW grad_x: per-image tiles store along positions; at stride 1 x and grad_x are read and
    # written as contiguous NCHW planes (x in place), otherwise x comes channels-contiguous
    planes = per_image and (sh, sw) == (1, 1) and x_contiguous
    tiles = cdiv(HQ * WQ, BM)
    grid = (N * tiles if per_image else cdiv(N * HQ * WQ, BM), cdiv(Cg, BN), G * sh * sw)
    n_k = cdiv(R, step_h) * cdiv(S, step_w) * cdiv(Og, BK)     # the phase with the most taps
    dgrad = Launch(scd2d_dgrad_kernel, grid,
                    (N * HQ * WQ, tiles, H, W, G, Cg, Og, O, OH, OW, HQ, WQ, HQ * WQ, n_k),
                    (*conv, step_h, step_w),
                    dict(R=R, S=S, PRECISION=precision, BM=BM, BN=BN, BK=BK,
                         PER_IMAGE=per_image, PLANES=planes, EVEN_O=Og % BK == 0,
                         EVEN_C=Cg % BN == 0, OV=o_unit,
                         XV=channel_unit(dtype.itemsize, Cg, x_strides if planes else x_cl_strides),
                         DV=channel_unit(dtype.itemsize, Cg, grad_x_strides), UNREAD=unread,
                         PARTIAL=False, SPLITS=0),
                    warps, stages)

    flat = Cg < 16 and R * S > 1      # few channels: columns over (channel, tap), one tap axis
    taps = 1 if flat else R * S
    tap_major = WGRAD_WS_TAP_MAJOR and not flat
    for large in (True, False):   # large tiles unless the capped split-K leaves them < 1 wave
        BM, BN, BK, warps, stages = _wgrad_config(dtype, Cg, Og, cuda, Cg * R * S if flat else 0,
                                                  large)
        tiles = cdiv(Og, BM) * cdiv(Cg * R * S if flat else Cg, BN)
        splits = _splits(tiles * taps * G, M, BK, sms, O * Cg * R * S * 4, out_bytes,
                         x_bytes)
        if not cuda or tiles * taps * G * splits >= sms:
            break
    k_split = cdiv(cdiv(M, splits), BK) * BK
    splits = cdiv(M, k_split)
    wgrad = Launch(scd2d_wgrad_kernel, (tiles, taps, G * splits),
                    (N, H, W, G, Cg, Og, O, OH, OW, M, k_split), conv,
                    dict(R=R, S=S, PRECISION=precision, BM=BM, BN=BN, BK=BK, FLAT=flat, WIDE=False,
                         WS_TAP_MAJOR=tap_major,
                         EVEN_O=Og % BM == 0, EVEN_C=not flat and Cg % BN == 0,
                         EVEN_M=M % BK == 0, OV=o_unit,
                         XV=vector_unit(dtype.itemsize, Cg, _unit_stride(x_cl_strides))),
                    warps, stages)
    # float32 unless it is the final gradient: the normalisation's Jacobian cancels its radial part
    ws_dtype = torch.float32 if splits > 1 or weight_norm != "none" else dtype
    workspace = _workspace((splits, O, R, S, Cg) if tap_major else (splits, O, Cg, R, S),
                           ws_dtype, x_bytes, math.prod(w_layout[0]) * dtype.itemsize, out_bytes)
    # the dgrad's split K in the room of the weight gradient's workspace beside grad_x
    beside = need_grad_params and not workspace[2]
    room = math.prod(workspace[0]) * ws_dtype.itemsize if beside else 0
    programs = math.prod(dgrad.grid)
    tile_numel = dgrad.constexprs["BM"] * dgrad.constexprs["BN"]
    splits, split_steps = whole_splits(n_k, _dgrad_splits(
        programs, n_k, sms or NOMINAL_SMS, dgrad.warps, programs * tile_numel * 4, room))
    dgrad_partial, dgrad_ws_numel = None, 0
    if splits > 1:
        dgrad_partial, dgrad = split_launches(
            dgrad._replace(head=(*dgrad.head[:-1], split_steps)), splits)
        dgrad_ws_numel = splits * programs * tile_numel
    return _Plan(*prologues, w_layout, dgrad, planes, *workspace, wgrad, dgrad_partial,
                 dgrad_ws_numel)


def prologue_launches(plan, grad_y_strides, c_strides):
    """The plan's prologue launches (alone, and with the copy of x), their grad_y and c vector
    units (``GV``, ``CV``) lowered to 1 where those (sample, channel, position) strides do not
    share them: grad_y is the caller's, and a saved-tensor hook (``save_on_cpu``) gives c
    back NCHW, not channels-last as the forward made it."""
    c = plan.prologue.constexprs
    units = {}
    for name, strides in (("GV", grad_y_strides), ("CV", c_strides)):
        if strides[0] % c[name] or strides[2] % c[name]:
            units[name] = 1
    if not units:
        return plan.prologue, plan.prologue_copy
    return tuple(step._replace(constexprs=dict(step.constexprs, **units))
                 for step in (plan.prologue, plan.prologue_copy))


def _unit_stride(x_strides):
    """``sxg`` of the wgrad GEMM's position cursor: the greatest common divisor of x's
    sample, row and column strides (1 if all are 0)."""
    return math.gcd(x_strides[0], x_strides[2], x_strides[3]) or 1


def _wide_cursor(N, positions, H, W, x_strides):
    """Whether the wgrad GEMM's position cursor needs int64 offsets: x's offsets (its
    strides, any view) reach 2**31 for the samples of up to a K step (≤ 128 positions) past the
    last one too, whose rows are masked."""
    sxn, _, sxh, sxw = x_strides[:4]
    return cdiv(N * positions + 128, positions) * sxn + H * sxh + W * sxw >= 2**31


def _workspace(shape, ws_dtype, x_bytes, w_hat_bytes, out_bytes):
    """(shape, dtype, in grad_x, dgrad first) of the split-K workspace. It lives in grad_x's
    memory (``x_bytes``, 0 when no grad_x is computed) when it fits there: the backward
    reduces it before the dgrad writes grad_x, so a training step's peak holds no separate
    workspace. When it does not fit and the dgrad's ŵ (``w_hat_bytes``) is a quarter of an
    output or more, and 1 MiB or more (smaller savings are not worth the launch's host
    time), the dgrad runs first, so ŵ is freed before the workspace is allocated (3×3
    512→512 7² b32, bf16: 4.7 MB of ŵ and a 9.4 MB workspace against a 1.6 MB output)."""
    in_grad_x = math.prod(shape) * ws_dtype.itemsize <= x_bytes
    large = 4 * w_hat_bytes >= out_bytes and w_hat_bytes >= 2**20
    return shape, ws_dtype, in_grad_x, not in_grad_x and large


def scd2d_bwd(grad_y, x, weight, p, q, c, norm, stride, padding, dilation, groups, eps,
              weight_norm="none", weight_norm_eps=0.0, need_grad_x=True, need_grad_params=True,
              c_is_free=False):
    """Gradients ``(x, weight, p, q)`` of the core op, as ``reference.scd2d_bwd`` computes them.

    The weight-gradient GEMM's split-K workspace is reduced by the normalisation's backward
    kernel (``weight.normalize_weight_backward``), which applies its Jacobian on the way and
    writes ŵ straight into the layout the dgrad GEMM reads. ``padding`` is (top, bottom, left,
    right); only top/left enter the index arithmetic (the saved ``c`` gives the output size).
    ``grad_x`` takes x's dtype and memory format; without ``need_grad_x`` it is None and the
    dgrad does not run; without ``need_grad_params`` (frozen weight, p and q) the other three
    are None and neither the wgrad nor the Jacobian runs. ``c_is_free``: nothing reads ``c``
    or ``norm`` after this call (autograd frees them), so a channels-last ``c``, whose order is
    grad_d's, holds grad_d and ``norm`` holds grad_‖s‖/‖s‖: the prologue reads each element
    of ``c`` and ``norm`` before it writes the same element of grad_d and grad_‖s‖/‖s‖, and a
    training step's peak holds one output-sized tensor (and one norm-sized) fewer. Everything
    that follows from the call's shapes, layouts and arguments comes from ``_plan``, cached
    per layer.
    """
    dev = x.device
    fmt = memory_format(x)
    grad_x = (torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt) if need_grad_x
              else None)
    if c.numel() == 0:     # an empty batch; zeros in the layouts the fake op promises
        return grad_x, torch.zeros_like(weight), torch.zeros_like(p), torch.zeros_like(q)
    cuda = dev.type == "cuda"
    plan = _plan(x.shape, x.stride(), x.is_contiguous(), weight.shape, c.shape[-2:],
                 fmt == torch.contiguous_format, x.dtype, cuda, dev.index or 0, tuple(stride),
                 tuple(padding), tuple(dilation), groups, eps, weight_norm,
                 dot_precision(x.dtype), need_grad_x, need_grad_params, cuda and fwd.FAST_MATH)
    N, O, OH, OW = c.shape
    G = groups

    # 1. prologue: grad_d [N, OH, OW, O], grad_‖s‖/‖s‖ [N, G, OH, OW] (``plan.norm_format``),
    # partial grad_p / grad_q
    if c_is_free and c.dtype == x.dtype and c.stride() == (OH * OW * O, 1, OW * O, O):
        grad_d = c.permute(0, 2, 3, 1)
    else:
        grad_d = torch.empty((N, OH, OW, O), dtype=x.dtype, device=dev)
    (grad_y, sg), (c, sc) = _position_strides(grad_y), _position_strides(c)
    # the norms in the layout the kernels read (a saved-tensor hook may have changed it), and
    # grad_‖s‖/‖s‖ [N, G, OH, OW] in their memory when autograd frees them or that copy is
    # ours (each prologue program reads its norms before it writes the same elements):
    # depthwise layers, whose norms are output-sized float32, then hold one such tensor fewer
    saved_norm, norm = norm, norm.contiguous(memory_format=plan.norm_format)
    if c_is_free or norm is not saved_norm:
        gns = norm
    else:
        gns = torch.empty((N, G, OH, OW), dtype=torch.float32, device=dev,
                          memory_format=plan.norm_format)
    partials = torch.empty((plan.n_blk, 2, O), dtype=torch.float32, device=dev)
    tensors = (grad_y, c, norm, p, q, grad_d, gns, partials)
    strides = (*sg, *sc, p.stride(0), q.stride(0))
    prologue, prologue_copy = prologue_launches(plan, sg, sc)
    # NCHW x is copied channels-contiguous once (2·|x| of traffic) for the wgrad GEMM's x
    # tiles, which a tap shift misaligns, and for the dgrad's x term at stride > 1; in the
    # prologue's launch when the Triton copy does it
    needs_x_cl = (need_grad_params or not plan.planes) and x.stride(1) != 1 and x.shape[1] != 1
    if needs_x_cl and copies_by_kernel(x):
        x_cl = torch.empty_like(x, memory_format=torch.channels_last)
        prologue_copy((*tensors, x, x_cl), strides)
    else:
        prologue(tensors, strides)
        x_cl = to_channels_last(x) if needs_x_cl else x
    shape, out_strides = plan.w_layout
    w_hat = torch.empty(shape, dtype=x.dtype, device=dev) if need_grad_x else None
    x_d = x if plan.planes else x_cl

    def dgrad():
        tensors, strides = (grad_d, w_hat, gns, x_d, grad_x), (*x_d.stride(), *grad_x.stride())
        if plan.dgrad_partial is not None:     # split K: the parts, then their sum
            ws = torch.empty(plan.dgrad_ws_numel, dtype=torch.float32, device=dev)
            plan.dgrad_partial((*tensors, ws), strides)
            tensors = (*tensors, ws)
        elif plan.dgrad.kernel is scd2d_dgrad_kernel:
            tensors = (*tensors, grad_x)       # stands in for the unsplit GEMM's workspace
        plan.dgrad(tensors, strides)

    # the dgrad on ŵ from the forward's normalisation kernel when no Jacobian launch carries
    # ŵ, or first, when ŵ would share the peak with a workspace beside grad_x (``_workspace``)
    dgrad_first = need_grad_x and (not need_grad_params or plan.dgrad_first)
    if dgrad_first:
        normalize_weight(weight, q, weight_norm, weight_norm_eps, out=w_hat,
                         out_strides=out_strides, groups=G, spread=cuda)
        dgrad()
        w_hat = None     # freed before the workspace (launches on one stream run in order)
    grads_w = (None,) * 3
    if need_grad_params:
        # 2. wgrad, then 3. the workspace and the prologue's grad_p / grad_q partials through
        # the Jacobian into new tensors (the same launch writes the dgrad's ŵ, unless the
        # dgrad ran), before 4. the dgrad overwrites grad_x, whose memory may hold the
        # workspace (one stream: launches run in order)
        if plan.ws_in_grad_x:
            ws = grad_x.new_empty(0, dtype=plan.ws_dtype).set_(grad_x.untyped_storage(), 0,
                                                               plan.ws_shape)
        else:
            ws = torch.empty(plan.ws_shape, dtype=plan.ws_dtype, device=dev)
        sx, wgrad = x_cl.stride(), plan.wgrad
        if wgrad.kernel is scd2d_wgrad_kernel:   # and the unit of its position cursor
            sx = (*sx, _unit_stride(sx))
            if _wide_cursor(N, OH * OW, x.shape[2], x.shape[3], sx):
                wgrad = wgrad._replace(constexprs=dict(wgrad.constexprs, WIDE=True))
        wgrad((grad_d, x_cl, ws), sx)
        tap_major = wgrad.kernel is scd2d_wgrad_kernel and wgrad.constexprs["WS_TAP_MAJOR"]
        grads_w = normalize_weight_backward(ws, weight, q, weight_norm, weight_norm_eps,
                                            splits=ws.shape[0], partials=partials, w_hat=w_hat,
                                            w_hat_strides=out_strides, groups=G,
                                            tap_major=tap_major)
        ws = None   # read: a split dgrad's workspace takes its room (``_dgrad_splits``)
    if need_grad_x and not dgrad_first:
        dgrad()
    return (grad_x, *grads_w)


def report_jobs():
    """Every (kernel, config, dtype, layout) the CUDA launcher runs, with the runtime ints of a
    representative layer (3×3, stride 1, padding 1, 56², N = 32; 64→64 for the "small" GEMM
    configs, 128→128 for the "large" ones, 128-channel depthwise for the direct kernels), for an
    ahead-of-time compile (``kernels/report.py``). The ints are what the launcher passes: with
    NCHW x, the wgrad kernels read the channels-contiguous copy of x, the dgrad GEMM reads and
    writes NCHW planes (stride 1), the prologue (NCHW grad_y, channels-last c) and the direct
    dgrad read NCHW in place."""
    def layer(layout, C, O, G, BM, N=32, H=56, W=56):
        Cg, Og, P = C // G, O // G, H * W
        nchw = layout == "nchw"
        cl_x = dict(sxn=P * C, sxc=1, sxh=W * C, sxw=C, sxg=C)
        x = dict(sxn=C * P, sxc=P, sxh=W, sxw=1) if nchw else cl_x
        gx = dict(sdn=C * P, sdc=P, sdh=W, sdw=1) if nchw else dict(sdn=P * C, sdc=1, sdh=W * C,
                                                                      sdw=C)
        out = dict(sgn=O * P, sgc=P if nchw else 1, sgp=1 if nchw else O,
                   scn=O * P, scc=1, scp=O, sp=1, sq=0)     # c: channels-last either way
        conv = dict(stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1)
        magic = dict(zip(("oh_mul", "oh_shift", "ow_mul", "ow_shift"),
                         (*divisor_magic(H), *divisor_magic(W))))
        ints = dict(N=N, H=H, Wd=W, G=G, Cg=Cg, Og=Og, O=O, C=C, OH=H, OW=W, M=N * P, P_IMG=P,
                    TILES=cdiv(P, BM), HQ=H, WQ=W, P_Q=P, SPLIT_STEPS=9, step_h=1, step_w=1,
                    **x, **gx,
                    **out, **conv, **magic)
        return ints, dict(ints, **cl_x)  # the ints of the dgrad / prologue and of the wgrad

    def ints(fn, lay, **extra):
        return {k: v for k, v in {**lay, **extra}.items() if k in fn.arg_names}

    def job(fn, name, dtype, layout, ints, constexprs, ptrs, warps, stages):
        return dict(kernel=fn, name=name, dtype=dtype, layout=layout, ints=ints,
                    constexprs=constexprs, pointer_dtypes=ptrs, num_warps=warps,
                    num_stages=stages)

    def dgrad_ptrs(dt):
        """The pointer dtypes of both dgrad kernels (GEMM and direct) in dtype ``dt``."""
        return dict(GD=dt, W=dt, GNS="*fp32", X=dt, GX=dt, WS="*fp32")

    def gemm_pair(dt, dcfg, wcfg, d_ints, w_ints, dgrad_flags, wgrad_flags):
        """(kernel, config, ints, pointer dtypes, flags) of a layer's dgrad and wgrad GEMMs."""
        return ((scd2d_dgrad_kernel, dcfg, d_ints, dgrad_ptrs(dt),
                 dict(dgrad_flags, UNREAD=False, PARTIAL=False, SPLITS=0)),
                (scd2d_wgrad_kernel, wcfg, w_ints, dict(GD=dt, X=dt, WS="*fp32"),
                 dict(wgrad_flags, FLAT=False, WIDE=False, WS_TAP_MAJOR=WGRAD_WS_TAP_MAJOR)))

    def units(fn, lay, itemsize):
        """The vector-unit constexprs ``_plan`` gives ``fn`` for the layer ``lay``."""
        x_strides = tuple(lay[n] for n in ("sxn", "sxc", "sxh", "sxw"))
        grad_x_strides = tuple(lay[n] for n in ("sdn", "sdc", "sdh", "sdw"))
        if fn is scd2d_wgrad_kernel:
            return dict(OV=vector_unit(itemsize, lay["Og"]),
                        XV=vector_unit(itemsize, lay["Cg"], lay["sxg"]))
        if fn is scd2d_dgrad_kernel:
            return dict(OV=vector_unit(itemsize, lay["Og"]),
                        XV=channel_unit(itemsize, lay["Cg"], x_strides),
                        DV=channel_unit(itemsize, lay["Cg"], grad_x_strides))
        if fn in (scd2d_dgrad_direct_kernel, scd2d_wgrad_direct_kernel):   # depthwise layers
            unit = vector_unit(itemsize, lay["O"], lay["C"])
            units = dict(OV=unit, XV=channel_unit(itemsize, lay["C"], x_strides))
            if fn is scd2d_dgrad_direct_kernel:
                units["DV"] = channel_unit(itemsize, lay["C"], grad_x_strides)
            return units
        unit = vector_unit(itemsize, lay["Og"])
        return dict(OV=unit, CV=unit, GV=unit if lay["sgc"] == 1 else 1)

    jobs = []
    for dtype in ("bf16", "fp16", "fp32"):
        dt = f"*{dtype}"
        itemsize = 4 if dtype == "fp32" else 2
        gemm = ([("small", DGRAD_CONFIG_FP32, WGRAD_CONFIG_FP32)] if dtype == "fp32" else
                [(n, DGRAD_CONFIGS[n], WGRAD_CONFIGS[n]) for n in ("small", "large")])
        for layout in ("channels_last", "nchw"):
            nchw = layout == "nchw"
            for size, dcfg, wcfg in gemm:
                C = 64 if size == "small" else 128
                d_ints, w_ints = layer(layout, C, C, 1, dcfg[0])
                for fn, (BM, BN, BK, warps, stages), lay, ptrs, extra in gemm_pair(
                        dt, dcfg, wcfg, d_ints, w_ints,
                        dict(PER_IMAGE=nchw, PLANES=nchw, EVEN_O=True, EVEN_C=True),
                        dict(EVEN_O=True, EVEN_C=True, EVEN_M=w_ints["M"] % wcfg[2] == 0)):
                    k_split = cdiv(lay["M"], 44 * BK) * BK
                    jobs.append(job(fn, f"{size}-BM{BM}-BN{BN}-BK{BK}-w{warps}-s{stages}", dtype,
                                    layout, ints(fn, lay, K_SPLIT=k_split),
                                    dict(R=3, S=3, PRECISION="tf32", BM=BM, BN=BN, BK=BK, **extra,
                                         **units(fn, lay, itemsize)),
                                    ptrs, warps, stages))
            # split K (``fwd.split_k``): 3×3 512→512 7² b32 on 132 SMs, 100 tiles of 72 steps
            # (NCHW: 128), 2 splits (float32 channels_last: 104 tiles of 144); the partial
            # launch, then the sum and the epilogue
            BM, BN, BK, warps, stages = gemm[-1][1]
            lay, _ = layer(layout, 512, 512, 1, BM, H=7, W=7)
            tiles = (32 * cdiv(49, BM) if nchw else cdiv(32 * 49, BM)) * cdiv(512, BN)
            n_k = 9 * cdiv(512, BK)
            splits, split_steps = whole_splits(n_k, split_k(tiles, n_k, NOMINAL_SMS, warps))
            if dtype != "fp16" and splits > 1:
                lay["SPLIT_STEPS"] = split_steps
                flags = dict(R=3, S=3, PRECISION="tf32", BM=BM, BN=BN, BK=BK, PER_IMAGE=nchw,
                             PLANES=nchw, EVEN_O=True, EVEN_C=True, UNREAD=False,
                             **units(scd2d_dgrad_kernel, lay, itemsize))
                name = f"512-512 7^2 (split K) BM{BM}-BN{BN}-BK{BK}-w{warps}"
                for suffix, st, partial, summed in ((f"-s{stages} partial", stages, True, 0),
                                                    (f"-s1 {splits} splits, epilogue", 1, False,
                                                     splits)):
                    jobs.append(job(scd2d_dgrad_kernel, name + suffix, dtype, layout,
                                    ints(scd2d_dgrad_kernel, lay),
                                    dict(flags, PARTIAL=partial, SPLITS=summed), dgrad_ptrs(dt),
                                    warps, st))
            if not nchw:   # the flat wgrad of a 3→80 5×5 stem (x always channels-contiguous)
                BM, BN, BK, warps, stages = WGRAD_FLAT_CONFIG
                _, stem = layer(layout, 3, 80, 1, BM, N=64, H=32, W=32)
                stem.update(pad_h=2, pad_w=2)
                jobs.append(job(scd2d_wgrad_kernel, f"flat-BM{BM}-BN{BN}-BK{BK}-w{warps}-s{stages}",
                                dtype, layout, ints(scd2d_wgrad_kernel, stem, K_SPLIT=512),
                                dict(R=5, S=5, PRECISION="tf32", BM=BM, BN=BN, BK=BK, FLAT=True,
                                     EVEN_O=False, EVEN_C=False, EVEN_M=stem["M"] % BK == 0,
                                     WIDE=False, WS_TAP_MAJOR=False,
                                     **units(scd2d_wgrad_kernel, stem, itemsize)),
                                dict(GD=dt, X=dt, WS="*fp32"), warps, stages))
            prologue_ptrs = dict(GY=dt, Cin=dt, Norm="*fp32", P="*fp32", Q="*fp32", GD=dt,
                                 GNS="*fp32", PART="*fp32")
            # the config's tiles on a 64-channel 56² layer, and the spread tiles of a deep layer
            # on a small image (3×3 512→512 7², 132 SMs); NCHW also with the copy of x (the
            # prologue's tiles, then x's [BC, BPX] tiles)
            BP, BO, warps, stages = PROLOGUE_CONFIGS[layout]
            dBP, dBG, dBO, _, _, dwarps, dstages = _prologue_blocks(nchw, 32, 49, 1, 512, True,
                                                                    132)
            BC, BPX, _ = COPY_CONFIG
            copies = []
            for pre, C_, side, (tBP, tBG, tBO, twarps, tstages) in (
                    ("", 64, 56, (BP, 1, BO, warps, stages)),
                    ("7^2 O512 ", 512, 7, (dBP, dBG, dBO, dwarps, dstages))):
                lay, _ = layer(layout, C_, C_, 1, tBP, H=side, W=side)
                tile = dict(BP=tBP, BG=tBG, BO=tBO, PER_IMAGE=nchw, FAST=True, NORM_CL=False,
                            **units(scd2d_bwd_prologue_kernel, lay, itemsize))
                name = f"{pre}BP{tBP}-BG{tBG}-BO{tBO}"
                jobs.append(job(scd2d_bwd_prologue_kernel, f"{name}-w{twarps}", dtype, layout,
                                ints(scd2d_bwd_prologue_kernel, lay), tile, prologue_ptrs,
                                twarps, tstages))
                if nchw:
                    xp_tiles, xc_tiles = copy_tiles((32, C_, side, side))
                    copy_ints = dict(G_TILES=1, PROLOGUE_PROGRAMS=32 * cdiv(side * side, tBP),
                                     C=C_, XP=side * side, XP_TILES=xp_tiles, XC_TILES=xc_tiles)
                    copies.append(job(scd2d_bwd_prologue_copy_kernel,
                                      f"{name}-BC{BC}-BPX{BPX}-w{twarps}", dtype, layout,
                                      ints(scd2d_bwd_prologue_copy_kernel, lay, **copy_ints),
                                      dict(tile, BC=BC, BPX=BPX),
                                      dict(prologue_ptrs, X=dt, X_CL=dt), twarps, tstages))
            jobs += copies
            if dtype == "bf16" and not nchw:
                # 40 channels (3×3 40→40 8² b64): rows that only the vector units show aligned
                dcfg, wcfg = DGRAD_CONFIGS["small"], WGRAD_CONFIGS["small"]
                d_ints, w_ints = layer(layout, 40, 40, 1, dcfg[0], N=64, H=8, W=8)
                for fn, (BM, BN, BK, warps, stages), lay, ptrs, extra in gemm_pair(
                        dt, dcfg, wcfg, d_ints, w_ints,
                        dict(PER_IMAGE=False, PLANES=False, EVEN_O=False, EVEN_C=False),
                        dict(EVEN_O=False, EVEN_C=False, EVEN_M=True)):
                    jobs.append(job(fn, f"40-40 8^2 BM{BM}-BN{BN}-BK{BK}-w{warps}-s{stages}",
                                    dtype, layout, ints(fn, lay, K_SPLIT=832),
                                    dict(R=3, S=3, PRECISION="tf32", BM=BM, BN=BN, BK=BK, **extra,
                                         **units(fn, lay, itemsize)), ptrs, warps, stages))
                # a 1×1 stride-2 shortcut (64→128 56², resnet18): every other input row and
                # column lies in no patch, so the dgrad selects their x term (``UNREAD``)
                BM, BN, BK, warps, stages = dcfg
                lay, _ = layer(layout, 64, 128, 1, BM)
                lay.update(OH=28, OW=28, HQ=28, WQ=28, P_Q=784, M=32 * 784, TILES=cdiv(784, BM),
                           stride_h=2, stride_w=2, pad_h=0, pad_w=0, step_h=2, step_w=2)
                jobs.append(job(scd2d_dgrad_kernel,
                                f"1x1 s2 64-128 BM{BM}-BN{BN}-BK{BK}-w{warps}-s{stages}", dtype,
                                layout, ints(scd2d_dgrad_kernel, lay),
                                dict(R=1, S=1, PRECISION="tf32", BM=BM, BN=BN, BK=BK,
                                     PER_IMAGE=False, PLANES=False, EVEN_O=True, EVEN_C=True,
                                     UNREAD=True, PARTIAL=False, SPLITS=0,
                                     **units(scd2d_dgrad_kernel, lay, itemsize)),
                                dgrad_ptrs(dt), warps, stages))
                # the prologue's GPU tiles of 3×3 40→40 8² b64, and of a depthwise layer (3×3,
                # 80 channels, 16² b64), whose narrow groups share a tile and whose norms run
                # along the groups (``NORM_CL``)
                for pre, C_, G_, side, norm_cl in (("40-40 8^2", 40, 1, 8, False),
                                                    ("dw 80 16^2", 80, 80, 16, True)):
                    pBP, pBG, pBO, _, _, pwarps, pstages = _prologue_blocks(
                        False, 64, side * side, G_, C_ // G_, True, 132)
                    lay, _ = layer(layout, C_, C_, G_, pBP, N=64, H=side, W=side)
                    jobs.append(job(scd2d_bwd_prologue_kernel,
                                    f"{pre} BP{pBP}-BG{pBG}-BO{pBO}-w{pwarps}", dtype, layout,
                                    ints(scd2d_bwd_prologue_kernel, lay),
                                    dict(BP=pBP, BG=pBG, BO=pBO, PER_IMAGE=False, FAST=True,
                                         NORM_CL=norm_cl,
                                         **units(scd2d_bwd_prologue_kernel, lay, itemsize)),
                                    prologue_ptrs, pwarps, pstages))
            BM, BC, warps, stages = DGRAD_DIRECT_CONFIG
            wBP, wBO, wwarps, wstages = WGRAD_DIRECT_CONFIG
            # 128 channels, and 40 (channels_last bf16), whose rows the vector units align
            widths = [("", 128)] + ([("dw40 ", 40)] if dtype == "bf16" and not nchw else [])
            for pre, C_ in widths:
                dw, dw_cl = layer(layout, C_, C_, C_, BM)
                jobs.append(job(scd2d_dgrad_direct_kernel,
                                f"{pre}BM{BM}-BC{BC}-w{warps}-s{stages}", dtype, layout,
                                ints(scd2d_dgrad_direct_kernel, dw),
                                dict(R=3, S=3, BM=BM, BC=BC, PLANES=nchw, UNREAD=False,
                                     NORM_CL=not nchw,
                                     **units(scd2d_dgrad_direct_kernel, dw, itemsize)),
                                dgrad_ptrs(dt), warps, stages))
                jobs.append(job(scd2d_wgrad_direct_kernel,
                                f"{pre}BP{wBP}-BO{wBO}-w{wwarps}-s{wstages}", dtype, layout,
                                ints(scd2d_wgrad_direct_kernel, dw_cl, K_SPLIT=4096),
                                dict(R=3, S=3, BP=wBP, BO=wBO,
                                     **units(scd2d_wgrad_direct_kernel, dw_cl, itemsize)),
                                dict(GD=dt, X=dt, WS="*fp32"), wwarps, wstages))
            if dtype == "bf16" and not nchw:    # the direct dgrad at stride 2 (3×3, 56² → 28²)
                dw, _ = layer(layout, 128, 128, 128, BM)
                dw.update(OH=28, OW=28, stride_h=2, stride_w=2)
                jobs.append(job(scd2d_dgrad_direct_kernel, f"s2 BM{BM}-BC{BC}-w{warps}-s{stages}",
                                dtype, layout, ints(scd2d_dgrad_direct_kernel, dw),
                                dict(R=3, S=3, BM=BM, BC=BC, PLANES=False, UNREAD=False,
                                     NORM_CL=True,
                                     **units(scd2d_dgrad_direct_kernel, dw, itemsize)),
                                dgrad_ptrs(dt), warps, stages))
    return jobs
