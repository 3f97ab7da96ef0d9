"""Shared ``@triton.jit`` helpers of the SCD kernels."""
import triton
import triton.language as tl


@triton.jit
def fast_log2(x, FAST: tl.constexpr):
    """log2 of float32 ``x``: one ``lg2.approx.ftz`` on CUDA (FAST; a denormal ``x`` counts as
    0, so log2 is -inf: without ``.ftz`` its range check and rescaling were 3 more instructions
    an element), ``tl.log2`` elsewhere."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def fast_exp2(x, FAST: tl.constexpr):
    """2**x of float32 ``x``: one ``ex2.approx.ftz`` on CUDA (FAST; results below 2**-126 are
    0), ``tl.exp2`` elsewhere."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def fast_div(x, y, FAST: tl.constexpr):
    """float32 ``x / y``: ``x · rcp.approx.ftz(y)`` on CUDA (FAST; within 2 ulp for ``|y| <
    2**126``, a larger divisor gives 0: the divisors here, ``‖s‖ + q`` and ``(|c| + eps)·(‖s‖ +
    q)``, reach that only from inputs near float32 overflow), IEEE division elsewhere.
    ``div.full.f32`` took 4 more instructions an element (its range scaling)."""
    if FAST:
        return x * tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [y],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        return x / y


@triton.jit
def sharpen(acc, norm, p, q, eps, FAST: tl.constexpr = False):
    """The SCD epilogue on a [BM, BN] tile of dot products ``acc``.

    ``norm`` (the patch norm ``sqrt(Σs² + norm_eps)``), ``p`` and ``q`` are broadcastable to
    ``acc``'s shape (e.g. [BM, 1] and [1, BN]). Returns float32 ``(c, y)``:
    ``c = d / (‖s‖ + q)`` and ``y = sign(c)·(|c| + eps)^p``
    with the power as one lg2 and one ex2 (hardware approximations when ``FAST``, and the
    division too). NaN in, NaN out: a NaN ``c`` fails both ``c == 0`` and ``c < 0`` and keeps its
    NaN magnitude.
    """
    b_c = fast_div(acc, norm + q, FAST)                                  # [BM, BN]
    b_mag = fast_exp2(p * fast_log2(tl.abs(b_c) + eps, FAST), FAST)
    b_y = tl.where(b_c == 0, 0.0, with_sign_of(b_mag, b_c))
    return b_c, b_y


@triton.jit
def in_units(n, UNIT: tl.constexpr):
    """``n``, a multiple of ``UNIT`` (``launch.vector_unit``), as the compiler can see it is one:
    Triton specialises an int argument only on divisibility by 16, so a 40-channel row's offsets
    look unaligned and their loads and stores go 2 bytes at a time. ``UNIT = 1``: ``n``."""
    return n // UNIT * UNIT


@triton.jit
def with_sign_of(mag, x):
    """``mag ≥ 0`` (float32) with the sign bit of ``x``: one bitwise op an element where
    ``where(x < 0, -mag, mag)`` takes a compare and a select (a NaN ``mag`` stays NaN)."""
    bits = mag.to(tl.uint32, bitcast=True) | (x.to(tl.uint32, bitcast=True) & 0x80000000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dgrad_phase_taps(phase, pad, stride, dil, step, R: tl.constexpr):
    """Kernel rows that reach input rows ``ih ≡ phase (mod stride)`` in a strided conv: the
    first such row ``r0`` (``(phase + pad − r0·dil)`` divisible by ``stride``) and how many of
    ``r0, r0 + step, …`` lie below ``R`` (0 when none), ``step = stride / gcd(stride, dil)``.
    """
    r0 = phase * 0 + step + R                                            # "none yet"
    for i in range(step):
        ok = (phase + pad - i * dil + stride * dil) % stride == 0        # kept non-negative
        r0 = tl.where(ok, tl.minimum(r0, i), r0)
    return r0, tl.maximum(R - r0 + step - 1, 0) // step


@triton.jit
def norm_offsets(o_n, o_p, o_g, G, P, GROUPS_INNER: tl.constexpr):
    """Offsets [len(o_p), len(o_g)] in the norms (or grad_‖s‖/‖s‖) [N, G, P], P = OH·OW, of
    samples ``o_n`` at in-image positions ``o_p`` and groups ``o_g``: [N, P, G] in memory with
    ``GROUPS_INNER`` (``shapes.saved_norm_format``'s channels_last), else [N, G, P]."""
    if GROUPS_INNER:
        o_norm = ((o_n * P + o_p) * G)[:, None] + o_g[None, :]
    else:
        o_norm = (o_n * G * P + o_p)[:, None] + (o_g * P)[None, :]
    return o_norm


@triton.jit
def tile_positions(i_m, M, P, TILES, BM: tl.constexpr, PER_IMAGE: tl.constexpr):
    """Image ``n`` and in-image positions ``o_p`` [BM] of output tile ``i_m``, and their mask.

    ``P = OH·OW``. ``PER_IMAGE`` tiles each image separately (``TILES = cdiv(P, BM)`` tiles per
    image), so ``o_p`` is a contiguous run the compiler can see: NCHW outputs store along it in
    wide coalesced stores. Otherwise tiles run over the flat ``N·P`` positions (no padding tail
    per image; channels_last outputs store along channels) and ``n`` is per row.
    """
    if PER_IMAGE:
        o_n = i_m // TILES
        o_p = (i_m - o_n * TILES) * BM + tl.arange(0, BM)
        return o_n, o_p, o_p < P
    else:
        o_m = i_m * BM + tl.arange(0, BM)
        o_n = o_m // P
        return o_n, o_m - o_n * P, o_m < M


@triton.jit
def fast_divmod(n, d, mul, shift):
    """``(n // d, n % d)`` for ``0 ≤ n < 2**31`` as a 32-bit high multiply, an add and a shift,
    with ``(mul, shift) = launch.divisor_magic(d)``: a division by a runtime int is ~20
    instructions per element, which the wgrad GEMMs would pay per K step for each position
    they decode (a 64-bit product of the sign-extended n took ~7)."""
    n_u = n.to(tl.uint32)
    # tl.cast, not .to: an int argument equal to 1 (shift for d = 2) arrives as a constexpr
    hi = tl.umulhi(n_u, tl.cast(mul, tl.uint32))
    q = ((n_u + hi) >> tl.cast(shift, tl.uint32)).to(tl.int32)
    return q, n - q * d


@triton.jit
def tap_offsets(o_k, OH, OW, oh_mul, oh_shift, ow_mul, ow_shift, H, Wd, dh, dw, stride_h,
                stride_w, sxn, sxh, sxw):
    """The input offsets (int64) that one tap, shifted by (dh, dw), reads for the flat output
    positions ``o_k`` (below 2**31), and their mask: inside the input, not padding. (The direct
    wgrad decodes every step: a ``position_cursor`` there, carried in registers, took its
    sm_90 build from 126 to 255 registers.)"""
    o_t, o_ow = fast_divmod(o_k, OW, ow_mul, ow_shift)
    o_n, o_oh = fast_divmod(o_t, OH, oh_mul, oh_shift)
    o_ih = o_oh * stride_h + dh
    o_iw = o_ow * stride_w + dw
    m_x = (o_ih >= 0) & (o_ih < H) & (o_iw >= 0) & (o_iw < Wd)
    return o_n.to(tl.int64) * sxn + o_ih * sxh + o_iw * sxw, m_x


@triton.jit
def position_cursor(o_k, OH, OW, dh, dw, stride_h, stride_w, sxn, sxh, sxw, sxg,
                    WIDE: tl.constexpr):
    """``(x offsets / sxg, ih, iw)`` that the flat output positions ``o_k`` (below 2**31) read
    through a tap shifted by ``(dh, dw)`` from an input of strides ``sxn, sxh, sxw``, all
    multiples of ``sxg``: int64 if ``WIDE``, else int32 (offsets below 2**31). The
    wgrads decode their first K step's positions once, then move them on with
    ``advance_cursor`` (decoding every step took two divisions and a 64-bit offset a row, ~25
    SASS instructions of each row's ~37) and multiply by ``sxg`` as they load: the compiler
    knows the offsets' divisibility from the stride's, not from a loop-carried value, and
    keeps the 16-byte loads."""
    o_t = o_k // OW
    o_n = o_t // OH
    o_ih = (o_t - o_n * OH) * stride_h + dh
    o_iw = (o_k - o_t * OW) * stride_w + dw
    un, uh, uw = _cursor_units(sxn, sxh, sxw, sxg, WIDE)
    if WIDE:
        o_n = o_n.to(tl.int64)
    return o_n * un + o_ih * uh + o_iw * uw, o_ih, o_iw


@triton.jit
def _cursor_units(sxn, sxh, sxw, sxg, WIDE: tl.constexpr):
    """x's position strides in units of ``sxg``, the cursor's offset unit; int64 if ``WIDE``,
    so that every product with them is (a stride alone may pass 2**31 / OH)."""
    un, uh, uw = sxn // sxg, sxh // sxg, sxw // sxg
    if WIDE:
        un, uh, uw = tl.cast(un, tl.int64), tl.cast(uh, tl.int64), tl.cast(uw, tl.int64)
    return un, uh, uw


@triton.jit
def cursor_step(STEP: tl.constexpr, OH, OW, stride_h, stride_w, sxn, sxh, sxw, sxg,
                WIDE: tl.constexpr):
    """The scalars of a ``STEP``-position move for ``advance_cursor``: ``STEP = images·OH·OW +
    rows·OW + columns`` with ``rows < OH`` and ``columns < OW``, so that a column and a row each
    carry at most once. Once per program."""
    d_n = STEP // (OH * OW)
    d_h = (STEP - d_n * OH * OW) // OW
    d_w = STEP - d_n * OH * OW - d_h * OW
    un, uh, uw = _cursor_units(sxn, sxh, sxw, sxg, WIDE)
    if WIDE:
        d_n = tl.cast(d_n, tl.int64)
    step = d_n * un + (d_h * stride_h) * uh + (d_w * stride_w) * uw     # no carry
    carry_w = stride_h * uh - (OW * stride_w) * uw                      # a column carry
    carry_h = un - (OH * stride_h) * uh                                 # a row carry
    return d_h * stride_h, d_w * stride_w, step, carry_w, carry_h


@triton.jit
def advance_cursor(o_u, o_ih, o_iw, d_ih, d_iw, step, carry_w, carry_h, OH, OW, dh, dw,
                   stride_h, stride_w):
    """A ``position_cursor`` moved on by the ``cursor_step`` whose scalars are ``d_ih, d_iw,
    step, carry_w, carry_h``: compares and selects in place of divisions."""
    o_iw = o_iw + d_iw
    c_w = o_iw >= OW * stride_w + dw
    o_iw = tl.where(c_w, o_iw - OW * stride_w, o_iw)
    o_ih = o_ih + tl.where(c_w, d_ih + stride_h, d_ih)
    c_h = o_ih >= OH * stride_h + dh
    o_ih = tl.where(c_h, o_ih - OH * stride_h, o_ih)
    o_u = o_u + (tl.where(c_w, carry_w, 0) + tl.where(c_h, carry_h, 0) + step)
    return o_u, o_ih, o_iw


@triton.jit
def cursor_mask(o_ih, o_iw, H, Wd):
    """Where a ``position_cursor`` is inside the input (not padding): one unsigned compare per
    axis."""
    return ((o_ih.to(tl.uint32, bitcast=True) < tl.cast(H, tl.uint32))
            & (o_iw.to(tl.uint32, bitcast=True) < tl.cast(Wd, tl.uint32)))


@triton.jit
def input_offsets(o_n, o_p, o_ih, o_iw, sn, sh, sw, PLANES: tl.constexpr):
    """Offsets of input positions (n, ih, iw) in a tensor of sample / row / column strides
    ``sn, sh, sw`` (x or grad_x in the dgrad epilogues). ``PLANES`` (NCHW-contiguous, ``o_p =
    ih·W + iw``): ``n·sn + o_p``, a run the compiler sees as contiguous (wide accesses)."""
    if PLANES:
        return o_n * sn + o_p
    else:
        return o_n * sn + o_ih * sh + o_iw * sw
