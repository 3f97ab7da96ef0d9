"""NCHW → channels_last copy of ``x`` for the GEMM kernels, which read channels contiguous.

PyTorch's ``x.contiguous(memory_format=torch.channels_last)`` runs a generic strided copy: one
side of the permutation is read or written a channel stride apart. This kernel moves a
[BC channels, BP positions] tile per program: loaded along positions and stored along channels,
Triton's layout conversion (through shared memory) keeps both sides coalesced.
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, launch

CONFIG = (64, 64, 4)      # (BC, BP, num_warps)


@triton.jit
def nchw_to_channels_last_kernel(X, Y, C, P, P_TILES, BC: tl.constexpr, BP: tl.constexpr):
    """Program (n·P_TILES + i_p, i_c): y[n, p, c] = x[n, c, p] on a [BC, BP] tile, ``P = H·W``
    (samples on grid axis 0, which allows 2³¹ − 1 programs; axes 1 and 2 stop at 65535)."""
    i_np, i_c = tl.program_id(0), tl.program_id(1)
    transpose_tile(X, Y, C, P, i_np // P_TILES, i_np % P_TILES, i_c, BC, BP)


@triton.jit
def transpose_tile(X, Y, C, P, i_n, i_p, i_c, BC: tl.constexpr, BP: tl.constexpr):
    """The [BC channels, BP positions] tile (i_c, i_p) of sample i_n; returns it (0 outside x)
    and its positions and their mask."""
    o_c = i_c * BC + tl.arange(0, BC)
    o_p = i_p * BP + tl.arange(0, BP)
    m = (o_c < C)[:, None] & (o_p < P)[None, :]
    base = i_n.to(tl.int64) * C * P
    b_x = tl.load(X + base + o_c[:, None] * P + o_p[None, :], mask=m, other=0.0)  # [BC, BP]
    tl.store(Y + base + o_p[None, :] * C + o_c[:, None], b_x, mask=m)
    return b_x, o_p, o_p < P


def copies_by_kernel(x):
    """Whether :func:`to_channels_last` copies ``x`` with the Triton kernel: NCHW-contiguous,
    with more than one channel and position (else torch's copy, or no copy, does it)."""
    N, C, H, W = x.shape
    return x.is_contiguous() and C > 1 and H * W > 1 and x.numel() > 0


def copy_tiles(shape, BC=CONFIG[0], BP=CONFIG[1]):
    """(position tiles per sample, channel tiles) of the copy of an [N, C, H, W] tensor."""
    return cdiv(shape[2] * shape[3], BP), cdiv(shape[1], BC)


def to_channels_last(x):
    """``x.contiguous(memory_format=torch.channels_last)`` of a 4-D tensor, one launch when x
    is NCHW-contiguous (per-sample sizes below 2**31, as the SCD kernels assume)."""
    if not copies_by_kernel(x):
        return x.contiguous(memory_format=torch.channels_last)
    N, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    BC, BP, warps = CONFIG
    p_tiles, c_tiles = copy_tiles(x.shape)
    launch(nchw_to_channels_last_kernel, (N * p_tiles, c_tiles), (x, y), (C, H * W, p_tiles),
           dict(BC=BC, BP=BP), warps, 1)
    return y


def report_jobs():
    """The copy for a 128-channel 56² bf16 / fp32 tensor, for ``kernels/report.py``."""
    BC, BP, warps = CONFIG
    return [dict(kernel=nchw_to_channels_last_kernel, name=f"BC{BC}-BP{BP}-w{warps}",
                 dtype=dtype, ints=dict(C=128, P=56 * 56, P_TILES=cdiv(56 * 56, BP)),
                 constexprs=dict(BC=BC, BP=BP),
                 pointer_dtypes=dict(X=f"*{dtype}", Y=f"*{dtype}"), num_warps=warps,
                 num_stages=1)
            for dtype in ("bf16", "fp32")]
