"""Shared ``@triton.jit`` helpers of the SCD kernels."""
import triton
import triton.language as tl


@triton.jit
def sharpen(acc, norm, p, q, eps):
    """The SCD epilogue on a [BM, BN] tile of dot products ``acc``.

    ``norm`` is the patch norm ``sqrt(Σs² + norm_eps)`` broadcastable to [BM, BN]; ``p``, ``q``
    are [BN]. Returns float32 ``(c, y)``: ``c = d / (‖s‖ + q)`` and ``y = sign(c)·(|c| + eps)^p``
    with the power as one lg2 and one ex2.
    """
    b_c = acc / (norm + q[None, :])                                      # [BM, BN]
    b_mag = tl.exp2(p[None, :] * tl.log2(tl.abs(b_c) + eps))
    b_y = tl.where(b_c > 0, b_mag, tl.where(b_c < 0, -b_mag, 0.0))
    return b_c, b_y


@triton.jit
def output_positions(i_m, M, OH, OW, BM: tl.constexpr):
    """Indices (n, oh, ow) of the BM output positions of tile ``i_m``, and their mask.

    int32 (the launcher checks ``M < 2**31``); offsets that can pass 2**31 (``n · stride_n``)
    are formed in int64 by the caller.
    """
    o_m = i_m * BM + tl.arange(0, BM)
    o_ow = o_m % OW
    o_t = o_m // OW
    return o_t // OH, o_t % OH, o_ow, o_m < M


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
