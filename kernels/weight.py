"""Kernel normalisation ``ŵ = w · scale`` and its Jacobian, one small launch each.

The forward writes ŵ straight into the layout the GEMM kernels read (any strides per group,
channel-in-group, input channel and tap), so normalising and re-laying out the weight costs one
launch per call instead of a chain of small torch ops. Per output channel ``o``:

    n = sqrt(Σ w_o² + eps);  scale = 1 / (n + q_o) (MODE 2, "norm_q"), 1 / n (MODE 1, "norm"),
    1 (MODE 0, "none");  a zero denominator gives scale 0 (an all-zero kernel matches nothing),
    an infinite one scale NaN (MODE 0: an Inf tap, found as Σ w·0 = NaN, gives scale NaN)
    grad_w = (grad_ŵ − w · k / n) · scale,  grad_q = − k · scale,  k = Σ grad_ŵ · ŵ
    (MODE 0: grad_w = grad_ŵ; in this form no intermediate overflows for a tiny kernel, where
    scale² would)

A split-K workspace of grad_ŵ is first summed by ``sum_splits_kernel``, spread over the whole
tensor: the Jacobian kernel has one program per few channels, too few to stream a workspace.

NaN in a kernel stays NaN (the zero test is ``== 0``, false for NaN); an infinite norm (an Inf
in the kernel) gives scale NaN, so the whole kernel is NaN, not only its Inf tap.
"""
import functools

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_power_of_2

MODES = {"none": 0, "norm": 1, "norm_q": 2}
TAP_MAJOR_PROGRAMS = 264  # the forward's B matrix: programs enough for two waves on 132 SMs


@triton.jit
def _scale(sumsq, q, eps, MODE: tl.constexpr):
    """(scale, n) per channel from Σw² (MODE 0: from Σ w·0; see the module docstring)."""
    n = tl.sqrt(sumsq + eps)
    if MODE == 2:
        denom = n + q
    else:
        denom = n
    zero = denom == 0
    scale = tl.where(zero, 0.0, 1.0 / tl.where(zero, 1.0, denom))
    scale = tl.where(denom == float("inf"), float("nan"), scale)   # an Inf in the kernel
    if MODE == 0:
        scale = 1.0 + sumsq
    return scale, n


@triton.jit
def _weight_offsets(o_kk, TAPS: tl.constexpr, S: tl.constexpr, Cg, sw_c, sw_r, sw_s,
                    ORDER: tl.constexpr):
    """Offsets in w of the flat indices ``o_kk`` of a kernel row, and their channels and taps.
    ``ORDER`` (``w_order``) 1: w is a contiguous [O, C/G, R, S], ``o_kk`` runs (channel, tap)
    with ``TAPS = R·S``; 2: a dense channels_last w ([O, R, S, C/G] in memory), ``o_kk`` runs
    (tap, channel) with C/G channels a tap. Then the offset is the index itself (vector loads
    and stores). 0: any strides, (channel, tap) with ``TAPS`` tap slots a channel."""
    if ORDER == 2:
        o_t = o_kk // Cg
        o_c = o_kk - o_t * Cg
        o_w = o_kk
    else:
        o_c = o_kk // TAPS
        o_t = o_kk - o_c * TAPS
        if ORDER == 1:
            o_w = o_kk
        else:
            o_r = o_t // S
            o_w = o_c * sw_c + o_r * sw_r + (o_t - o_r * S) * sw_s
    return o_w, o_c, o_t


@triton.jit
def _workspace_offsets(o_kk, o_c, o_t, Cg, RS: tl.constexpr, TAP_MAJOR: tl.constexpr,
                       ORDER: tl.constexpr):
    """Offsets in a kernel row of grad_ŵ ([C/G, R, S]; ``TAP_MAJOR``: [R, S, C/G]) of the
    flat indices ``o_kk`` of ``_weight_offsets`` and their channels and taps: the index itself
    where the two orders agree."""
    if TAP_MAJOR == (ORDER == 2):
        o_g = o_kk
    elif TAP_MAJOR:
        o_g = o_t * Cg + o_c
    else:
        o_g = o_c * RS + o_t
    return o_g


@triton.jit
def normalize_weight_kernel(
    W, Q, W_HAT, Og, Cg, CP, ROWS, sq, sw_o, sw_c, sw_r, sw_s, s_g, s_j, s_c, s_t, eps,
    RS: tl.constexpr, S: tl.constexpr, TP: tl.constexpr, W_ORDER: tl.constexpr,
    TAP_MAJOR: tl.constexpr, MODE: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr,
    BCP: tl.constexpr,
):
    """ŵ[o, c, tap] = w[o, c, tap] · scale[o], written at ``g·s_g + j·s_j + c·s_c + tap·s_t``
    (``o = g·Og + j``); W [O, C/G, R, S] has strides ``sw_*`` (channels_last too, no copy), Q
    stride ``sq`` (0 when shared). The destination has ``CP ≥ C/G`` channel slots for each of
    ``TP ≥ R·S`` tap slots; slots outside w with row ``tap·CP + c < ROWS`` get 0 (a GEMM's
    padded K rows, which its unmasked loads multiply by zeros of x). ``TAP_MAJOR`` (``s_c = 1``,
    the forward GEMM's B matrix, K-major): written tap by tap in runs of BCP channel slots,
    contiguous there; otherwise in [BO, BK] tiles in the weight's memory order (``W_ORDER``,
    ``_slot_order``; (channel, tap) for strided weights), stored along channels when
    ``s_j = 1`` (the dgrad's)."""
    normalize_rows(W, Q, W_HAT, tl.program_id(0), Og, Cg, CP, ROWS, sq, sw_o, sw_c, sw_r, sw_s,
                   s_g, s_j, s_c, s_t, eps, RS, S, TP, W_ORDER, TAP_MAJOR, MODE, BO, BK, BCP)


@triton.jit
def _channel_block(i_b, Og, BO: tl.constexpr):
    """(group, channels in group [BO], their mask) of block ``i_b``: BO consecutive output
    channels of one group, so that stores along them (a GEMM's B matrix, channels
    contiguous) are coalesced. A layout whose groups follow each other is passed as one group."""
    n_ob = tl.cdiv(Og, BO)
    i_g = i_b // n_ob
    o_j = (i_b - i_g * n_ob) * BO + tl.arange(0, BO)
    return i_g, o_j, o_j < Og


@triton.jit
def normalize_rows(W, Q, W_HAT, i_b, Og, Cg, CP, ROWS, sq, sw_o, sw_c, sw_r, sw_s, s_g, s_j, s_c,
                   s_t, eps, RS: tl.constexpr, S: tl.constexpr, TP: tl.constexpr,
                   W_ORDER: tl.constexpr, TAP_MAJOR: tl.constexpr, MODE: tl.constexpr,
                   BO: tl.constexpr, BK: tl.constexpr, BCP: tl.constexpr):
    """The work of ``normalize_weight_kernel``'s program ``i_b`` (``_channel_block``)."""
    i_g, o_j, m_o = _channel_block(i_b, Og, BO)                         # [BO]
    o_o = i_g * Og + o_j
    K = Cg * RS
    o_k = tl.arange(0, BK)
    p_w = W + o_o.to(tl.int64)[:, None] * sw_o                           # [BO, 1]
    sumsq = tl.zeros((BO,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_w, _, _ = _weight_offsets(k0 + o_k, RS, S, Cg, sw_c, sw_r, sw_s, W_ORDER)
        m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
        b_w = tl.load(p_w + o_w[None, :], mask=m, other=0.0).to(tl.float32)  # [BO, BK]
        if MODE == 0:   # ŵ given: only an Inf tap matters, which makes w·0 NaN
            sumsq += tl.sum(b_w * 0.0, axis=1)
        else:
            sumsq += tl.sum(b_w * b_w, axis=1)
    b_q = tl.load(Q + o_o * sq, mask=m_o, other=0.0)
    b_scale, _ = _scale(sumsq, b_q, eps, MODE)
    p_dst = W_HAT + i_g.to(tl.int64) * s_g + o_j[:, None] * s_j          # [BO, 1]
    if TAP_MAJOR:
        o_cb = tl.arange(0, BCP)
        for t in range(TP):
            t_w = (t // S) * sw_r + (t % S) * sw_s
            for c0 in range(0, CP, BCP):
                o_c = c0 + o_cb                                          # [BCP] channel slots
                m = m_o[:, None] & ((o_c < CP) & (t * CP + o_c < ROWS))[None, :]
                m_w = m & ((o_c < Cg) & (o_c * 0 + t < RS))[None, :]  # [BCP]: no scalar mask
                b_w = tl.load(p_w + (o_c * sw_c + t_w)[None, :], mask=m_w, other=0.0)
                tl.store(p_dst + (o_c * s_c + t * s_t)[None, :],
                         (b_w.to(tl.float32) * b_scale[:, None]).to(W_HAT.dtype.element_ty),
                         mask=m)
    else:
        for k0 in range(0, CP * TP, BK):
            o_kk = k0 + o_k                                              # [BK] slots
            o_w, o_c, o_t = _weight_offsets(o_kk, TP, S, Cg, sw_c, sw_r, sw_s, W_ORDER)
            if W_ORDER != 0:   # every slot's row is below ROWS; w's are the first K
                m = m_o[:, None] & (o_kk < CP * TP)[None, :]
                m_w = m_o[:, None] & (o_kk < K)[None, :]
            else:
                m = m_o[:, None] & ((o_kk < CP * TP) & (o_t * CP + o_c < ROWS))[None, :]
                m_w = m & ((o_c < Cg) & (o_t < RS))[None, :]
            b_w = tl.load(p_w + o_w[None, :], mask=m_w, other=0.0).to(tl.float32)
            tl.store(p_dst + (o_c * s_c + o_t * s_t)[None, :],
                     (b_w * b_scale[:, None]).to(W_HAT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["ROWS"])   # the prologue's partial rows follow the batch size
def normalize_weight_backward_kernel(
    GW_HAT, W, Q, GW, GQ, PART, GP, W_HAT, O, ROWS, Og, Cg, sq, sw_o, sw_c, sw_r, sw_s,
    s_g, s_j, s_c, s_t, eps, RS: tl.constexpr, S: tl.constexpr, W_ORDER: tl.constexpr,
    MODE: tl.constexpr, BO: tl.constexpr, BK: tl.constexpr, PARTIALS: tl.constexpr,
    BR: tl.constexpr, W_HAT_OUT: tl.constexpr, TAP_MAJOR: tl.constexpr,
):
    """grad_w and grad_q (MODE 2) from grad_ŵ [O, C/G, R, S] (``TAP_MAJOR``: [O, R, S, C/G], as
    the GEMM wgrad stores it); W and GW [O, C/G, R, S] share the strides ``sw_*``
    (``W_ORDER``: ``w_order``; both loops run a dense w in its memory order). ``PARTIALS``:
    PART [ROWS, 2, O] holds per-block partial sums of grad_p and grad_q (the backward
    prologue's), summed here in a fixed order into GP and into GQ (added to the normalisation's
    term). ``W_HAT_OUT``: also writes ŵ, as ``normalize_weight_kernel`` does (strides
    ``s_*``), for a GEMM that runs next. Programs as there (``_channel_block``)."""
    i_g, o_j, m_o = _channel_block(tl.program_id(0), Og, BO)
    o_o = i_g * Og + o_j
    K = Cg * RS
    o_k = tl.arange(0, BK)
    row = o_o.to(tl.int64)[:, None] * K                                  # [BO, 1] in GW_HAT
    row_w = o_o.to(tl.int64)[:, None] * sw_o                             # [BO, 1] in W, GW
    sumsq = tl.zeros((BO,), dtype=tl.float32)
    dot = tl.zeros((BO,), dtype=tl.float32)
    if MODE != 0:
        for k0 in range(0, K, BK):
            o_w, o_c, o_t = _weight_offsets(k0 + o_k, RS, S, Cg, sw_c, sw_r, sw_s, W_ORDER)
            o_g = _workspace_offsets(k0 + o_k, o_c, o_t, Cg, RS, TAP_MAJOR, W_ORDER)
            m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
            b_w = tl.load(W + row_w + o_w[None, :], mask=m, other=0.0).to(tl.float32)
            b_g = tl.load(GW_HAT + row + o_g[None, :], mask=m, other=0.0).to(tl.float32)
            sumsq += tl.sum(b_w * b_w, axis=1)
            dot += tl.sum(b_g * b_w, axis=1)
    b_q = tl.load(Q + o_o * sq, mask=m_o, other=0.0)
    b_scale, b_n = _scale(sumsq, b_q, eps, MODE)
    dot = dot * b_scale                                                  # Σ grad_ŵ · ŵ
    b_coef = tl.where(b_n == 0, 0.0, dot / tl.where(b_n == 0, 1.0, b_n))
    b_gq = tl.zeros((BO,), dtype=tl.float32)
    if PARTIALS:
        b_gp = tl.zeros((BO,), dtype=tl.float32)
        for r0 in range(0, ROWS, BR):
            o_r = r0 + tl.arange(0, BR)
            m = m_o[:, None] & (o_r < ROWS)[None, :]
            p_part = PART + o_o[:, None] + (o_r.to(tl.int64) * (2 * O))[None, :]  # [BO, BR]
            b_gp += tl.sum(tl.load(p_part, mask=m, other=0.0), axis=1)
            b_gq += tl.sum(tl.load(p_part + O, mask=m, other=0.0), axis=1)
        tl.store(GP + o_o, b_gp, mask=m_o)
    if MODE == 2:
        b_gq += -dot * b_scale
    if PARTIALS or MODE == 2:
        tl.store(GQ + o_o, b_gq, mask=m_o)
    p_dst = W_HAT + i_g.to(tl.int64) * s_g + o_j[:, None] * s_j          # [BO, 1] in ŵ
    for k0 in range(0, K, BK):
        o_w, o_c, o_t = _weight_offsets(k0 + o_k, RS, S, Cg, sw_c, sw_r, sw_s, W_ORDER)
        o_g = _workspace_offsets(k0 + o_k, o_c, o_t, Cg, RS, TAP_MAJOR, W_ORDER)
        m = m_o[:, None] & ((k0 + o_k) < K)[None, :]
        b_g = tl.load(GW_HAT + row + o_g[None, :], mask=m, other=0.0).to(tl.float32)
        if MODE != 0 or W_HAT_OUT:
            b_w = tl.load(W + row_w + o_w[None, :], mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            b_gw = b_g
        else:
            b_gw = (b_g - b_w * b_coef[:, None]) * b_scale[:, None]
        tl.store(GW + row_w + o_w[None, :], b_gw.to(GW.dtype.element_ty), mask=m)
        if W_HAT_OUT:
            tl.store(p_dst + (o_c * s_c + o_t * s_t)[None, :],
                     (b_w * b_scale[:, None]).to(W_HAT.dtype.element_ty), mask=m)


@triton.jit
def sum_splits_kernel(P, N, SPLITS, SB: tl.constexpr, BLOCK: tl.constexpr):
    """P[0, i] = Σ_s P[s, i] in place for the SPLITS partial sums P [SPLITS, N], in float32,
    SB splits per load: the split-K workspace reduced by many programs, in a fixed order."""
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s0 in range(0, SPLITS, SB):
        o_s = s0 + tl.arange(0, SB)
        m = (o_s < SPLITS)[:, None] & m_i[None, :]
        b_p = tl.load(P + o_s.to(tl.int64)[:, None] * N + o_i[None, :], mask=m, other=0.0)
        acc += tl.sum(b_p.to(tl.float32), axis=0)
    tl.store(P + o_i, acc.to(P.dtype.element_ty), mask=m_i)


SUM_SPLITS_WARPS = 4


def _sum_splits_blocks(n, splits, spread):
    """(SB, BLOCK) of ``sum_splits_kernel`` for ``splits`` partial sums of ``n`` elements: 16
    splits per load of 256 elements, and on a GPU (``spread``) programs of as few as 64
    elements until there are ``TAP_MAJOR_PROGRAMS`` of them, each loading up to 4096 / BLOCK
    splits at once. Each load is a dependent round trip: the 3-channel stem's 187 splits of
    6000 elements took 24 programs of 12 loads each, 11.9 µs on an H200 (docs/GPU_NOTES.md
    section 13); now 94 programs of 3 loads."""
    if not spread:
        return 16, 256
    _, BLOCK = _spread(1, n, 256, 64)      # n elements as one group's "channels"
    return min(next_power_of_2(splits), 4096 // BLOCK), BLOCK


TILE = 8192   # elements of a [BO, BK] (or [BO, BR]) tile of the weight kernels' loops


def _blocks(Og, K):
    """(BO, BK): up to 8 output channels per program and a kernel row in chunks of up to
    TILE / BO. A GEMM's B matrix of ŵ (channels contiguous) is then stored 8 channels (16 bytes
    in 16-bit) at a time, not one element a row apart, while a 512-channel layer still has 64
    programs. Each program streams its rows twice (Σw², then the scaled copy), one dependent
    memory round trip per chunk: with chunks of 2048 / BO, the Jacobian took 20–25 µs on an
    H200 for weights of 37 K–2.4 M elements (docs/GPU_NOTES.md section 10's profile)."""
    BO = min(8, next_power_of_2(Og))
    return BO, _chunk(BO, K)


def _chunk(BO, K):
    """BK: a kernel row of K in chunks of up to TILE / BO (at least 16)."""
    return max(16, min(TILE // BO, next_power_of_2(K)))


def _grouping(O, K, groups, out_strides):
    """(programs, channels per block group, BO, BK) of ``_channel_block`` for kernel rows of
    length K: one group per block group, or all O channels as one when the destination's groups
    follow one another (``s_g = O/G · s_j``, also when nothing is written) and blocks may
    straddle them."""
    Og = O // groups
    if out_strides is None or out_strides[0] == Og * out_strides[1]:
        Og, groups = O, 1
    BO, BK = _blocks(Og, K)
    return groups * cdiv(Og, BO), Og, BO, BK


def _spread(n_groups, Og, BO, min_BO):
    """(programs, BO): BO halved, down to ``min_BO``, until the ``n_groups`` groups of ``Og``
    channels make ``TAP_MAJOR_PROGRAMS`` programs (a GPU launch: a program per few channels
    streams its rows with one dependent memory round trip per chunk, so few programs leave
    the SMs waiting)."""
    while BO > min_BO and n_groups * cdiv(Og, BO) < TAP_MAJOR_PROGRAMS:
        BO //= 2
    return n_groups * cdiv(Og, BO), BO


def _gpu_blocks(programs, Og, BO, K, along_channels):
    """(programs, BO, BK) of a GPU launch that streams whole kernel rows (Σw², then the
    writes): down to 4 channels a program where ŵ is stored along channels (8-byte stores in
    16-bit), else 1, and rows in chunks of up to TILE / BO (K = 1152 in one chunk, not two), so
    that more programs each wait on fewer dependent round trips: with 8 channels a program, a
    128-channel layer's Jacobian made 16 programs and took 8 µs on an H200, beside a 27 µs
    dgrad (docs/GPU_NOTES.md section 13)."""
    programs, BO = _spread(programs // cdiv(Og, BO), Og, BO, 4 if along_channels else 1)
    return programs, BO, _chunk(BO, K)


def w_order(w_shape, w_strides):
    """The ``W_ORDER`` of w's strides: 1, a contiguous [O, C/G, R, S]; 2, a dense channels_last
    one (``[O, R, S, C/G]`` in memory, as ``model.to(memory_format=torch.channels_last)`` makes
    it); 0, any other. With 1 and 2 the weight kernels run a kernel row in its memory order,
    16 bytes a load and a store."""
    O, Cg, R, S = w_shape
    strides = tuple(w_strides)
    if strides == (Cg * R * S, R * S, S, 1):
        return 1
    return 2 if strides == (Cg * R * S, 1, S * Cg, Cg) else 0


def _slot_order(order, Cg, RS, CP, TP, ROWS, tap_major):
    """``normalize_rows``' W_ORDER for a destination of CP channel slots × TP tap slots: its
    Σw² loop may run w in any order, but its (channel, tap) write loop only where the slots
    are w's own (1: ``TP = R·S``, ``CP·TP ≤ ROWS``; 2: also ``CP = C/G``). The tap-major write
    loop (the forward's B matrix) indexes w by its strides."""
    if tap_major or (TP == RS and CP * TP <= ROWS and (order == 1 or CP == Cg)):
        return order
    return 0


@functools.lru_cache(maxsize=4096)
def normalize_args(w_shape, w_strides, q_stride, mode, eps, groups, out_strides, slots,
                   spread=False):
    """(grid, scalars, constexprs) of ``normalize_weight_kernel`` (and of ``normalize_rows``
    where another kernel runs it): computed once per layer. ``spread`` (a GPU launch): the
    forward's B matrix over at least ``TAP_MAJOR_PROGRAMS`` programs where it can be, the
    dgrad's ŵ in ``_gpu_blocks``."""
    O, Cg, R, S = w_shape
    CP, TP, ROWS = slots or (Cg, R * S, Cg * R * S)
    # blocks as the backward's where both group alike: the same Σw² order, the same scale bits
    # in the interpreter (on a GPU, warps differ: ~1 ulp)
    programs, Og, BO, BK = _grouping(O, Cg * R * S, groups, out_strides)
    tap_major = out_strides[2] == 1 and out_strides[1] != 1
    if tap_major and spread:
        # the forward's B matrix is stored along K (each channel's row contiguous): fewer
        # channels per program cost no coalescing, and 64 programs of 8 channels (a 512-channel
        # layer) took ~15 µs on an H200. Same BK: the same Σw² order, the same bits. Not in the
        # interpreter, which runs programs one by one (it made the test suite 1.6× as long)
        programs, BO = _spread(programs // cdiv(Og, BO), Og, BO, 1)
    elif spread and out_strides[1] == 1:     # the dgrad's ŵ, as the Jacobian writes it
        programs, BO, BK = _gpu_blocks(programs, Og, BO, Cg * R * S, True)
    return ((programs,), (Og, Cg, CP, ROWS, q_stride, *w_strides, *out_strides, eps),
            dict(RS=R * S, S=S, TP=TP,
                 W_ORDER=_slot_order(w_order(w_shape, w_strides), Cg, R * S, CP, TP, ROWS,
                                     tap_major),
                 TAP_MAJOR=tap_major, MODE=MODES[mode], BO=BO, BK=BK,
                 BCP=max(16, min(BK, next_power_of_2(CP)))))


def normalize_weight(w, q, mode, eps, out=None, out_strides=None, groups=1, slots=None,
                     spread=False):
    """ŵ written into ``out`` (default: a new tensor shaped like ``w``) at ``out_strides =
    (per group, per channel in group, per input channel, per tap)``. ``slots = (CP, TP,
    ROWS)``: ``out`` has CP channel slots per tap and TP tap slots, and its slots outside w
    with ``tap·CP + channel < ROWS`` are zeroed (a GEMM's padded K rows). Mode "none" copies
    ``w``, with an Inf tap's kernel NaN. ``spread``: see ``normalize_args``."""
    if out is None:
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        O, Cg, R, S = w.shape
        out_strides = (O // groups * Cg * R * S, Cg * R * S, R * S, 1)
    grid, scalars, constexprs = normalize_args(w.shape, w.stride(), q.stride(0), mode, eps,
                                                groups, tuple(out_strides), slots, spread)
    launch(normalize_weight_kernel, grid, (w, q, out), scalars, constexprs, 4, 1)
    return out


def normalize_weight_backward(grad_w_hat, w, q, mode, eps, splits=1, partials=None, w_hat=None,
                              w_hat_strides=None, groups=1, tap_major=False):
    """``(grad_w, grad_p, grad_q)`` of :func:`normalize_weight`; ``grad_w_hat`` may hold
    ``splits`` partial sums ([splits, *w.shape], e.g. a split-K workspace), reduced here into its
    first split (in place, by ``sum_splits_kernel``, when contiguous) before the Jacobian.
    ``partials`` [rows, 2, O] (float32): per-block partial sums of grad_p and grad_q, summed
    into grad_p and added to grad_q (without it grad_p is None, and so is grad_q unless the
    mode is "norm_q"). ``w_hat``: also write ŵ there, at ``w_hat_strides`` as
    :func:`normalize_weight` takes them (the same launch: it computes the scale anyway).
    ``tap_major``: each split of ``grad_w_hat`` is [O, R, S, C/G], not [O, C/G, R, S]."""
    O = w.shape[0]
    grad_w_hat = grad_w_hat.contiguous()
    if splits > 1:
        SB, BLOCK = _sum_splits_blocks(w.numel(), splits, w.is_cuda)
        launch(sum_splits_kernel, (cdiv(w.numel(), BLOCK),), (grad_w_hat,), (w.numel(), splits),
               dict(SB=SB, BLOCK=BLOCK), SUM_SPLITS_WARPS, 1)
    grad_w = torch.empty_like(w)        # w's layout, as autograd's gradient layout contract asks
    if grad_w.stride() != w.stride():   # w not dense (a strided view): a dense copy, same strides
        w = torch.empty_like(w).copy_(w)
    has_partials = partials is not None
    # two tensors, not views of one: a custom op's outputs must not alias each other
    grad_p = torch.empty(O, dtype=torch.float32, device=w.device) if has_partials else None
    grad_q = (torch.empty(O, dtype=torch.float32, device=w.device)
              if has_partials or mode == "norm_q" else None)
    unused = q            # float32 placeholder for the pointers this mode does not touch
    grid, scalars, constexprs = _backward_args(
        w.shape, w.stride(), q.stride(0), mode, eps, has_partials,
        partials.shape[0] if has_partials else 0, groups,
        None if w_hat is None else tuple(w_hat_strides), spread=w.is_cuda, tap_major=tap_major)
    launch(normalize_weight_backward_kernel, grid,
           (grad_w_hat, w, q, grad_w, unused if grad_q is None else grad_q,
            partials if has_partials else unused, grad_p if has_partials else unused,
            unused if w_hat is None else w_hat), scalars, constexprs, 8, 1)
    return grad_w, grad_p, grad_q


@functools.lru_cache(maxsize=4096)
def _backward_args(w_shape, w_strides, q_stride, mode, eps, has_partials, rows, groups,
                   w_hat_strides, spread=False, tap_major=False):
    """(grid, scalars, constexprs) of ``normalize_weight_backward_kernel``, once per layer;
    ``spread`` (a GPU launch): ``_gpu_blocks``. The interpreter keeps the forward's blocks
    (the same Σw² order, the same ŵ bits)."""
    O, Cg, R, S = w_shape
    K = Cg * R * S
    programs, Og, BO, BK = _grouping(O, K, groups, w_hat_strides)
    if spread:
        programs, BO, BK = _gpu_blocks(programs, Og, BO, K, w_hat_strides is not None
                                       and w_hat_strides[1] == 1)
    return ((programs,),
            (O, rows, Og, Cg, q_stride, *w_strides, *(w_hat_strides or (0, 0, 0, 0)), eps),
            dict(RS=R * S, S=S, W_ORDER=w_order(w_shape, w_strides), MODE=MODES[mode], BO=BO,
                 BK=BK, PARTIALS=has_partials, BR=TILE // BO,
                 W_HAT_OUT=w_hat_strides is not None, TAP_MAJOR=tap_major))



def report_jobs():
    """The two kernels for a 3×3 128→128 layer (mode norm_q), writing ŵ as the GEMMs read it:
    the forward's K-major B matrix (K steps of 64) and the dgrad's channels-contiguous one, for
    a contiguous ("nchw") and a channels_last weight, for ``kernels/report.py``."""
    O, Cg, R, S = 128, 128, 3, 3
    K = Cg * R * S
    jobs = []
    for layout, w_strides in (("nchw", (K, R * S, S, 1)), ("channels_last", (K, 1, S * Cg, Cg))):
        w = dict(sq=1, **dict(zip(("sw_o", "sw_c", "sw_r", "sw_s"), w_strides)))
        fwd_b = normalize_args((O, Cg, R, S), w_strides, 1, "norm_q", 1e-12, 1,
                               (O * K, K, 1, Cg), (Cg, R * S, K), True)[2]   # the forward's B
        # the Jacobian on a GPU, reading the GEMM wgrad's tap-major workspace, writing the
        # dgrad's ŵ (channels contiguous)
        bwd = _backward_args((O, Cg, R, S), w_strides, 1, "norm_q", 1e-12, True, 392, 1,
                             (O * K, 1, O, O * Cg), spread=True, tap_major=True)[2]
        for dtype in ("bf16", "fp16", "fp32"):
            dt = f"*{dtype}"
            jobs.append(dict(kernel=normalize_weight_kernel, layout=layout,
                             name=f"BO{fwd_b['BO']}-BK{fwd_b['BK']}-BCP{fwd_b['BCP']}-w4",
                             dtype=dtype, ints=dict(Og=O, Cg=Cg, CP=Cg, ROWS=K, s_g=O * K, s_j=K,
                                                    s_c=1, s_t=Cg, **w),
                             constexprs=fwd_b,
                             pointer_dtypes=dict(W=dt, Q="*fp32", W_HAT=dt),
                             num_warps=4, num_stages=1))
            jobs.append(dict(kernel=normalize_weight_backward_kernel, layout=layout,
                             name=f"BO{bwd['BO']}-BK{bwd['BK']}-w8",
                             dtype=dtype, ints=dict(O=O, ROWS=392, Og=O, Cg=Cg, s_g=O * K, s_j=1,
                                                    s_c=O, s_t=O * Cg, **w),
                             constexprs=bwd,
                             pointer_dtypes=dict(GW_HAT="*fp32", W=dt, Q="*fp32", GW=dt,
                                                 GQ="*fp32", PART="*fp32", GP="*fp32", W_HAT=dt),
                             num_warps=8, num_stages=1))
    # on a GPU: this layer's 10 splits, and the 3-channel stem's 187 (5×5 3→80)
    for n, splits in ((O * K, 10), (80 * 75, 187)):
        SB, BLOCK = _sum_splits_blocks(n, splits, True)
        jobs.append(dict(kernel=sum_splits_kernel, name=f"SB{SB}-BLOCK{BLOCK}-w{SUM_SPLITS_WARPS}",
                         dtype="fp32", ints=dict(N=n, SPLITS=splits),
                         constexprs=dict(SB=SB, BLOCK=BLOCK), pointer_dtypes=dict(P="*fp32"),
                         num_warps=SUM_SPLITS_WARPS, num_stages=1))
    return jobs
