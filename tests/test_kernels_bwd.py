"""The fused Triton backward (``kernels.scd2d_bwd``) against float64 autograd of the oracle.

On CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest); on a CUDA
machine the same tests run the compiled kernels.
"""
import math
import os
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import oracle
import scd_triton
from cases import Case, params, run_against_oracle
from helpers import DEVICE, assert_close, gpu, unsplit
from scd_triton.kernels.shapes import every_input_read, output_hw
from test_kernels import KERNEL_CASES, NEW_PATH_CASES, _square_layer


@pytest.fixture(autouse=True)
def _ieee_float32(no_tf32):
    """float32 kernels compared with float64 use IEEE dots (TF32 is a GPU-only rounding)."""


def _leaves(*shapes, dtype=torch.float32):
    return [torch.randn(s, dtype=dtype, device=DEVICE).requires_grad_() for s in shapes]


def _grads(fn, x, w, p, q, grad_y, **conv):
    """Gradients of ``fn`` w.r.t. (x, w, p, q) for the output gradient ``grad_y``."""
    y = fn(x, w, p, q, **conv)
    return torch.autograd.grad(y, (x, w, p, q), grad_y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", params(KERNEL_CASES + NEW_PATH_CASES))
def test_gradients_match_oracle(case, dtype):
    run_against_oracle(scd_triton.scd2d, case, dtype, "triton", device=DEVICE)


# strided and dilated taps: the GEMM dgrad's loop carries (tap row, tap column, channel block),
# several taps per stride phase spaced lcm(stride, dilation) apart, each in two channel blocks
# (O/G = 80: 64 + a masked 16); the direct dgrad divides each tap's offset, not its positions
STRIDED_DILATED_CASES = [
    Case(1, 16, 11, 10, 80, (3, 3), stride=2, padding=1, dilation=(4, 3)),
    Case(1, 16, 10, 11, 80, (3, 2), stride=(3, 2), padding=(2, 1), dilation=(2, 2)),
    Case(1, 8, 11, 10, 8, (3, 3), stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=8),
]


@pytest.mark.parametrize("case", params(STRIDED_DILATED_CASES))
def test_strided_dilated_gradients(case):
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE)


def test_the_dgrad_splits_k_where_its_tiles_fill_under_half_the_gpu_and_memory_allows(
        monkeypatch):
    """The dgrad GEMM splits K by the forward's rule (``fwd.split_k``) on 132 SMs, as far as its
    float32 workspace fits in the room of the weight gradient's workspace beside grad_x: 3×3
    512→512 7² b32 (100 tiles of 72 K steps; 128 per-image tiles with NCHW; float32 104 of
    144), whose weight-gradient workspace takes 9.4 MB, splits in two, and not with frozen
    weights; 3×3 40→40 8² b64 (32 tiles of 18) not (its weight-gradient workspace lies in
    grad_x), though its tiles alone would; layers that fill the GPU not."""
    from scd_triton.kernels import bwd
    monkeypatch.setattr(bwd, "sm_count", lambda device_index: 132)

    def splits(N, C, O, side, stride=1, nchw=False, dtype=torch.bfloat16, params=True,
               any_room=False):
        x_strides = (C * side * side, side * side, side, 1) if nchw else \
            (C * side * side, 1, side * C, C)
        out = (side - 1) // stride + 1
        with pytest.MonkeyPatch.context() as patch:
            if any_room:     # the tiles' rule alone
                patch.setattr(bwd, "_dgrad_splits", lambda *a: bwd.split_k(*a[:4]))
            plan = bwd._plan.__wrapped__((N, C, side, side), x_strides, nchw, (O, C, 3, 3),
                                         (out, out), nchw, dtype, True, 0, (stride, stride),
                                         (1, 1, 1, 1), (1, 1), 1, 1e-12, "norm_q", "tf32", True,
                                         params, True)
        summing = plan.dgrad.constexprs
        if plan.dgrad_partial is None:
            assert not summing["PARTIAL"] and summing["SPLITS"] == 0
            return 1
        assert plan.dgrad_partial.constexprs["PARTIAL"] and not summing["PARTIAL"]
        assert plan.dgrad_partial.grid == (*plan.dgrad.grid[:2],
                                           plan.dgrad.grid[2] * summing["SPLITS"])
        return summing["SPLITS"]

    for nchw in (False, True):
        assert splits(32, 512, 512, 7, nchw=nchw) == 2
        assert splits(32, 512, 512, 7, nchw=nchw, params=False) == 1
        assert splits(64, 40, 40, 8, nchw=nchw) == 1
        assert splits(64, 40, 40, 8, nchw=nchw, any_room=True) == 2
        assert splits(32, 256, 256, 14, nchw=nchw, any_room=True) == 1     # 196 (NCHW 256) tiles
        assert splits(32, 128, 128, 28, nchw=nchw, any_room=True) == 1
        assert splits(32, 64, 128, 56, stride=2, nchw=nchw, any_room=True) == 1
    assert splits(32, 512, 512, 7, dtype=torch.float32) == 2


# the interpreter's dgrad takes K blocks of up to 64 output channels: O/G = 80 and 200 take 2
# and 4 a tap, so these take two splits (``split_k``, as on 132 SMs)
DGRAD_SPLIT_CASES = [
    Case(2, 16, 6, 7, 80, (3, 3), padding=1),                   # 18 K steps
    Case(1, 16, 9, 8, 80, (5, 5), stride=2, padding=2),         # phases of 18, 12, 12, 8 steps
    Case(1, 16, 8, 8, 200, (3, 3), stride=2),                   # 16; last row, column unread
    Case(2, 32, 5, 5, 160, (3, 3), padding=1, groups=2),        # 18 a group
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", params(DGRAD_SPLIT_CASES))
def test_a_split_dgrad_matches_the_oracle_and_the_unsplit_dgrad(case, channels_last, launched,
                                                                monkeypatch):
    """A split dgrad (partial sums of each split's K steps into a float32 workspace, then their
    sum in split order, the box sum over all the phase's taps and the epilogue): the four
    gradients against the oracle; then, from the same forward, grad_x as the unsplit dgrad
    gives it but for the order of K's sums, the other gradients bit for bit, and 0 for the
    pixels no patch reads, which hold NaN and Inf here."""
    from scd_triton.kernels import bwd, scd2d_bwd, scd2d_fwd
    dgrads = lambda: [(made.constexprs["PARTIAL"], made.constexprs["SPLITS"])
                      for made in launched if made.kernel is bwd.scd2d_dgrad_kernel]
    bwd._plan.cache_clear()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton",
                       channels_last=channels_last, device=DEVICE)
    # the interpreter's plans; a GPU's configs and weight-gradient workspace differ
    interpreted = DEVICE == "cpu"
    if interpreted:
        assert dgrads() == [(True, 0), (False, 2)]

    conv = case.oracle_kwargs()
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"], 1e-6)
    x = torch.randn(case.N, case.C, case.H, case.W, device=DEVICE)
    # pixels no patch reads: conv2d's input gradient of a ones kernel is 0 there
    probe = x.clone().requires_grad_()
    top, bottom, left, right = conv["padding"]
    torch.nn.functional.conv2d(torch.nn.functional.pad(probe, (left, right, top, bottom)),
                               torch.ones(case.O, case.C // case.groups, *case.kernel,
                                          device=DEVICE),
                               stride=conv["stride"], dilation=conv["dilation"],
                               groups=conv["groups"]).sum().backward()
    unread = probe.grad == 0
    x[unread] = torch.where(torch.rand(int(unread.sum()), device=DEVICE) < 0.5,
                            float("nan"), float("inf"))
    x = x.contiguous(memory_format=fmt)
    w = torch.randn(case.O, case.C // case.groups, *case.kernel, device=DEVICE)
    p, q = torch.rand(case.O, device=DEVICE) + 1, torch.rand(case.O, device=DEVICE) * 0.2
    y, c, norm = scd2d_fwd(x, w, p, q, *args, 1e-12, "norm_q", 1e-12)
    grad_y = torch.randn_like(y)
    backward = lambda: scd2d_bwd(grad_y, x, w, p, q, c, norm, *args, "norm_q", 1e-12)
    split, single = backward(), unsplit(monkeypatch, bwd, backward)
    if interpreted:
        assert dgrads()[-3:] == [(True, 0), (False, 2), (False, 0)]
    assert (split[0][unread] == 0).all() and torch.isfinite(split[0]).all()
    torch.testing.assert_close(split[0], single[0], rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("w", "p", "q"), split[1:], single[1:]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", params([KERNEL_CASES[2], KERNEL_CASES[7]]))
def test_channels_last_gradients(case):
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", channels_last=True,
                       device=DEVICE)
    x = torch.randn(case.N, case.C, case.H, case.W, device=DEVICE)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(case.O, case.C // case.groups, *case.kernel, device=DEVICE)
    y = scd_triton.scd2d(x, w, 2.0, 0.1, backend="triton", **case.conv_kwargs())
    (grad_x,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert grad_x.is_contiguous(memory_format=torch.channels_last), "grad_x lost channels_last"


# NCHW inputs (the default layout): per-image tiles in the prologue and the dgrad GEMM (NCHW
# planes at stride 1, channels-contiguous x at stride 2), the wgrad on a channels_last copy of x.
# The interpreter tiles 64 (dgrad) and 32 (prologue) positions: images of 90 and 143 positions
# take several tiles, the last one partial.
NCHW_CASES = [
    Case(2, 16, 9, 10, 24, (3, 3), padding=1),                       # stride 1: NCHW planes
    Case(2, 17, 11, 13, 20, (3, 3), stride=2, padding=1),            # stride 2, odd sizes
    Case(3, 32, 7, 9, 32, (3, 3), padding=1, groups=2),              # grouped GEMM
    Case(1, 16, 13, 11, 16, (3, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    Case(2, 8, 9, 7, 8, (3, 3), padding=1, groups=8),                # depthwise (direct)
    Case(2, 16, 8, 8, 16, (3, 3), padding=1),                        # whole wgrad K steps
]


def test_nchw_cases_run_masked_and_unmasked_channel_tiles():
    """The GEMMs drop their loop's channel masks where the tiles divide the channels
    (``EVEN_O`` / ``EVEN_C``), the wgrad its position masks where its K steps divide N·OH·OW
    (``EVEN_M``): the cases above run both variants of each."""
    from scd_triton.kernels import bwd
    seen = set()
    for case in NCHW_CASES:
        if case.C // case.groups <= 4:      # the direct kernels
            continue
        conv = case.oracle_kwargs()
        stride, padding, dilation = conv["stride"], conv["padding"], conv["dilation"]
        out_hw = output_hw((case.H, case.W), case.kernel, stride, padding, dilation)
        C, H, W = case.C, case.H, case.W
        plan = bwd._plan((case.N, C, H, W), (C * H * W, H * W, W, 1), True,
                         (case.O, case.C // case.groups, *case.kernel), out_hw, True,
                         torch.float32, False, 0, stride, padding, dilation, case.groups, 1e-6,
                         "none", "ieee", True, True, False)
        for name, launch in (("dgrad", plan.dgrad), ("wgrad", plan.wgrad)):
            seen |= {(name, flag, launch.constexprs[flag]) for flag in ("EVEN_O", "EVEN_C")}
        seen.add(("wgrad", "EVEN_M", plan.wgrad.constexprs["EVEN_M"]))
    assert seen == {(n, f, v) for n in ("dgrad", "wgrad") for f in ("EVEN_O", "EVEN_C")
                    for v in (True, False)} | {("wgrad", "EVEN_M", v) for v in (True, False)}


# The GPU's tile configs, which the interpreter's plan never picks: 128→128 takes the "large"
# dgrad (64×128×64) and wgrad (128×64×64) with every channel and (64 positions) position mask
# dropped, 96→80 the same tiles with all masks kept (BK 64 does not divide 80, BN 128 not 96,
# nor 64 the 9 positions); the prologue's tiles of 16 or 32 channels, several groups of 4
# channels per tile in the last (depthwise-like) case
CUDA_TILE_CASES = [Case(1, 128, 8, 8, 128, (3, 3), padding=1),
                   Case(1, 96, 5, 6, 80, (3, 3), stride=2, padding=1),
                   Case(2, 24, 5, 6, 24, (3, 3), padding=1, groups=6)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", params(CUDA_TILE_CASES))
def test_gpu_tile_configs_match_oracle(case, dtype, channels_last, monkeypatch):
    """The CUDA configs' tiles (and so EVEN_O / EVEN_C both ways) run in whatever backend the
    tests have, here possibly the interpreter, against the float64 oracle."""
    from scd_triton.kernels import bwd
    dgrad, wgrad, prologue = bwd._dgrad_config, bwd._wgrad_config, bwd._prologue_config
    monkeypatch.setattr(bwd, "_dgrad_config",
                        lambda dtype, Cg, Og, cuda: dgrad(dtype, Cg, Og, True))
    monkeypatch.setattr(bwd, "_wgrad_config", lambda *a, **k: wgrad(*a[:3], True, *a[4:], **k))
    monkeypatch.setattr(bwd, "_prologue_config", lambda *a: prologue(*a[:2], True))
    bwd._plan.cache_clear()
    try:
        run_against_oracle(scd_triton.scd2d, case, dtype, "triton", device=DEVICE,
                           channels_last=channels_last)
    finally:
        bwd._plan.cache_clear()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", params(CUDA_TILE_CASES))
def test_spread_prologue_tiles_match_oracle(case, channels_last, monkeypatch):
    """Where the CUDA prologue tiles would make few programs (deep layers on small images) they
    shrink to 32 positions with more channels each: forced here (as for a GPU with very many
    SMs), against the float64 oracle; narrow groups keep their tiles."""
    from scd_triton.kernels import bwd
    blocks, used = bwd._prologue_blocks, []

    def spread(per_image, N, positions, G, Og, cuda, sms):
        used.append(blocks(per_image, N, positions, G, Og, True, 10**6))
        return used[-1]

    monkeypatch.setattr(bwd, "_prologue_blocks", spread)
    bwd._plan.cache_clear()
    try:
        run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE,
                           channels_last=channels_last)
    finally:
        bwd._plan.cache_clear()
    wide = case.O // case.groups > 16        # several channel blocks a group: spread
    assert used and all((b[0] == 32) == wide for b in used), used
    # 3×3 512→512 7² b32 on 132 SMs, channels_last and NCHW: 49 and 64 programs of 4 blocks
    assert blocks(False, 32, 49, 1, 512, True, 132)[:5] == (32, 1, 128, 2, 49)
    assert blocks(True, 32, 49, 1, 512, True, 132)[:5] == (32, 1, 128, 2, 64)
    # narrow groups keep their tiles (NCHW depthwise 512 at 7²: 32 groups a tile, 512 programs)
    assert blocks(True, 32, 49, 512, 1, True, 132)[:5] == (64, 32, 1, 1, 32)
    assert blocks(False, 32, 49, 1, 512, False, 0)[:3] == (32, 1, 64)           # the interpreter's


# the wgrad GEMM over 2 splits of 2 K steps (the interpreter's 64 positions a step): its
# position cursor moves on in the kernel, over rows, images and (strided) columns
CURSOR_CASES = [Case(2, 16, 10, 10, 32, (3, 3), padding=1),
                Case(3, 16, 12, 11, 32, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
                Case(11, 16, 4, 3, 16, (1, 1))]


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("case", params(CURSOR_CASES))
def test_wgrad_cursor_over_several_steps_matches_oracle(case, wide, monkeypatch):
    """The wgrad GEMM's position cursor, moved on over several K steps, in int32 and in the
    int64 form (``WIDE``) that inputs whose offsets reach 2**31 take, forced here, against the
    float64 oracle."""
    from scd_triton.kernels import bwd
    plan, used = bwd._plan, []

    def plan_with(*args):
        found = plan(*args)
        used.append((found.wgrad.constexprs["WIDE"], found.wgrad.head[-1]))   # (WIDE, K_SPLIT)
        return found._replace(wgrad=found.wgrad._replace(
            constexprs=dict(found.wgrad.constexprs, WIDE=wide)))

    monkeypatch.setattr(bwd, "_plan", plan_with)
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE)
    # the shipped plan: int32 at this size; 2 K steps a split in the interpreter
    assert used and all(w is False and (DEVICE == "cuda" or k == 128) for w, k in used), used


def test_wgrad_cursor_goes_int64_by_the_strides_of_x():
    """``WIDE`` follows x's offsets, not its size: a channels-last batch of 2**30 elements is
    int32, every second sample of a batch twice as large (the same shape, twice the sample
    stride) is int64, as are 2**31 elements; masked rows up to a K step past the end count."""
    from scd_triton.kernels.bwd import _wide_cursor
    N, C, H, W = 64, 256, 256, 256                 # 2**30 elements
    dense = (C * H * W, 1, W * C, C)
    every_second = (2 * C * H * W, 1, W * C, C)
    assert not _wide_cursor(N, H * W, H, W, dense)
    assert _wide_cursor(N, H * W, H, W, every_second)
    assert _wide_cursor(2 * N, H * W, H, W, dense)
    # 2**31 − 1 positions' worth of offsets with one pixel an image: the K step past the end
    assert _wide_cursor(2**31 // 256 - 1, 1, 1, 1, (256, 1, 256, 256))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_half_gradients_on_a_wide_layer(dtype, channels_last):
    """The 16-bit "large" dgrad and wgrad (BK 64, 3 stages) on a ResNet-sized layer, against
    the float64 oracle (the forward's BK 64 was wrong on an H200 while its loop squared the
    dot's x tile, docs/GPU_NOTES.md section 10)."""
    case = Case(4, 128, 28, 28, 128, (3, 3), padding=1)
    run_against_oracle(scd_triton.scd2d, case, dtype, "triton", device=DEVICE,
                       channels_last=channels_last)


@pytest.mark.parametrize("case", params(NCHW_CASES))
def test_nchw_gradients_match_oracle_and_channels_last(case):
    """NCHW gradients against the oracle, and against the channels_last path's gradients."""
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE)
    x, w, p, q = _leaves((case.N, case.C, case.H, case.W),
                         (case.O, case.C // case.groups, *case.kernel), (case.O,), (case.O,))
    with torch.no_grad():
        p.uniform_(0.7, 3.0), q.uniform_(0.0, 0.3)
    fn = lambda *a, **k: scd_triton.scd2d(*a, backend="triton", **k)
    y = fn(x, w, p, q, **case.conv_kwargs())
    grad_y = torch.randn_like(y)
    nchw = torch.autograd.grad(y, (x, w, p, q), grad_y)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y_cl = fn(x_cl, w, p, q, **case.conv_kwargs())
    cl = torch.autograd.grad(y_cl, (x_cl, w, p, q), grad_y.to(memory_format=torch.channels_last))
    assert nchw[0].is_contiguous() and cl[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip("xwpq", nchw, cl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"grad_{name}: NCHW != CL")


@pytest.mark.parametrize("frozen", [None, "params"])
@pytest.mark.parametrize("stride", [1, 2])
def test_nchw_backward_copies_x_in_the_prologue_launch(stride, frozen, monkeypatch):
    """NCHW x is copied channels-contiguous by the prologue's launch, not a launch of its own,
    whenever a GEMM reads the copy (the wgrad; the dgrad at stride 2); a frozen layer at
    stride 1 reads x in place and copies nothing."""
    from scd_triton.kernels import launch, layout
    launched = []
    real_launch = launch.launch
    record = lambda kernel, *a: launched.append(kernel.__name__) or real_launch(kernel, *a)
    monkeypatch.setattr(launch, "launch", record)
    monkeypatch.setattr(layout, "launch", record)
    x, w, p, q = _leaves((2, 8, 7, 9), (16, 8, 3, 3), (16,), (16,))
    for t in (w, p, q):
        t.requires_grad_(frozen is None)
    y = scd_triton.scd2d(x, w, p.detach().abs() + 1, q, stride=stride, padding=1,
                         backend="triton")
    launched.clear()
    y.backward(torch.randn_like(y))
    copies = frozen is None or stride == 2
    prologue = "scd2d_bwd_prologue_copy_kernel" if copies else "scd2d_bwd_prologue_kernel"
    assert launched[0] == prologue and "nchw_to_channels_last_kernel" not in launched, launched


@pytest.mark.parametrize("layout", ["transposed", "broadcast"])
def test_gradients_for_strided_grad_y(layout):
    """grad_y whose (OH, OW) do not flatten (copied to NCHW) or that is a broadcast scalar."""
    x, w, p, q = _leaves((2, 16, 6, 7), (16, 16, 3, 3), (16,), (16,))
    with torch.no_grad():
        p.uniform_(0.7, 3.0), q.uniform_(0.0, 0.3)
    if layout == "transposed":
        grad_y = torch.randn(2, 16, 7, 6, device=DEVICE).transpose(2, 3)
    else:
        grad_y = torch.full((), 0.5, device=DEVICE).expand(2, 16, 6, 7)
    got = _grads(lambda *a, **k: scd_triton.scd2d(*a, backend="triton", **k), x, w, p, q, grad_y,
                 padding=1)
    ref = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    want = torch.autograd.grad(oracle.scd2d(*ref, padding=(1, 1, 1, 1)), ref,
                               grad_y.cpu().double())
    for name, g, r in zip("xwpq", got, want):
        assert_close(f"grad_{name}", g.cpu(), r, torch.float32, grad=True, reduce_dim=16 * 9 * 16)


def test_scd1d_gradients_match_oracle():
    x, w, p, q = _leaves((2, 8, 33), (16, 4, 5), (16,), (16,))
    with torch.no_grad():
        p.uniform_(0.7, 3.0), q.uniform_(0.0, 0.3)
    conv = dict(stride=2, padding=3, groups=2)
    grad_y = torch.randn(2, 16, 18, device=DEVICE)
    got = _grads(lambda *a, **k: scd_triton.scd1d(*a, backend="triton", **k), x, w, p, q, grad_y,
                 **conv)
    ref = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    y = oracle.scd2d(ref[0].unsqueeze(2), ref[1].unsqueeze(2), ref[2], ref[3], stride=(1, 2),
                     padding=(0, 0, 3, 3), groups=2)
    want = torch.autograd.grad(y.squeeze(2), ref, grad_y.cpu().double())
    for name, g, r in zip("xwpq", got, want):
        assert_close(f"grad_{name}", g.cpu(), r, torch.float32, grad=True, reduce_dim=4 * 5 * 16)


@pytest.mark.parametrize("shared", [False, True], ids=["per_channel", "shared"])
def test_p_q_gradients_per_channel_and_shared(shared):
    case = Case(1, 32, 4, 4, 32, (3, 3), padding=1, groups=2, per_channel=not shared)
    run_against_oracle(scd_triton.scd2d_normalized, case, torch.float32, "triton", normalized=True,
                       device=DEVICE)


def test_all_zero_patches_give_finite_gradients():
    x = torch.randn(2, 16, 9, 9)
    x[:, :, :, :5] = 0                           # patches (and dot products) of zeros
    x[0] = 0                                     # a whole sample of zeros
    case = Case(2, 16, 9, 9, 16, (3, 3), padding=1)
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE, x=x)


def test_a_denormal_c_with_eps_zero_gives_finite_gradients():
    """With eps = 0 a saved c may be a nonzero denormal: on CUDA the prologue's fast lg2 makes
    its log -inf and |y| 0, and |y|·log(|c|) was NaN in grad_p; such a c counts as c = 0."""
    from scd_triton.kernels import bwd, fwd
    x, w = torch.randn(2, 16, 6, 6, device=DEVICE), torch.randn(16, 16, 3, 3, device=DEVICE)
    p, q = torch.full((16,), 2.0, device=DEVICE), torch.full((16,), 0.1, device=DEVICE)
    conv = ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    _, c, norm = fwd.scd2d_fwd(x, w, p, q, *conv, 0.0, 1e-12, "norm_q", 1e-12)
    c[0, 3, 2, 2] = 1e-40                                  # denormal in float32
    grads = bwd.scd2d_bwd(torch.randn_like(c), x, w, p, q, c, norm, *conv, 0.0, "norm_q", 1e-12)
    for name, g in zip("xwpq", grads):
        assert torch.isfinite(g).all(), f"grad_{name} is not finite"


def test_every_input_read_agrees_with_conv2d_patch_counts():
    """The plan's ``UNREAD`` switch: whether some pixel lies in no patch, against the count of
    patches holding each pixel (conv2d's input gradient of a ones kernel), over strides,
    dilations, kernel sizes and (asymmetric) paddings of one dimension."""
    seen = set()
    for size in range(1, 10):
        for k in range(1, 4):
            for stride in range(1, 4):
                for dil in range(1, 5):
                    for top, bottom in ((0, 0), (1, 0), (0, 2), (2, 1)):
                        out = output_hw((size, 1), (k, 1), (stride, 1), (top, bottom, 0, 0),
                                        (dil, 1))
                        if out[0] < 1:
                            continue
                        x = torch.zeros(1, 1, size + top + bottom, 1, requires_grad=True)
                        torch.nn.functional.conv2d(x, torch.ones(1, 1, k, 1), stride=(stride, 1),
                                                   dilation=(dil, 1)).sum().backward()
                        counts = x.grad[0, 0, top:top + size, 0]
                        got = every_input_read((size, 1), out, (k, 1), (stride, 1),
                                               (top, bottom, 0, 0), (dil, 1))
                        assert got == bool((counts > 0).all()), (size, k, stride, dil, top, bottom)
                        seen.add(got)
    assert seen == {True, False}


@pytest.mark.parametrize("groups", [1, 16], ids=["gemm", "direct"])
def test_nan_in_x_gives_nan_gradients(groups):
    """NaN in, NaN out (docs/DESIGN.md section 1): the NaN pattern of the reference backward."""
    x, w = _leaves((1, 16, 7, 7), (16, 16 // groups, 3, 3))
    with torch.no_grad():
        x[0, 3, 2, 2] = float("nan")
    p, q = torch.full((16,), 2.0, device=DEVICE), torch.full((16,), 0.1, device=DEVICE)
    p.requires_grad_(), q.requires_grad_()
    grad_y = torch.randn(1, 16, 7, 7, device=DEVICE)
    got = _grads(lambda *a, **k: scd_triton.scd2d(*a, backend="triton", **k), x, w, p, q, grad_y,
                 padding=1, groups=groups)
    ref = _grads(lambda *a, **k: scd_triton.scd2d(*a, backend="reference", **k), x, w, p, q,
                 grad_y, padding=1, groups=groups)
    assert got[0][0, 3, 2, 2].isnan() and got[1].isnan().any() and got[3].isnan().any()
    assert not got[0][0, 3, 6, 6].isnan()        # far from the NaN: finite
    for name, g, r in zip("xwpq", got, ref):
        assert torch.equal(g.isnan(), r.isnan()), f"grad_{name}: NaN pattern differs"


def test_gradients_are_deterministic():
    case = KERNEL_CASES[-1]
    x, w, p, q = _leaves((2, 32, 7, 7), (64, 16, 3, 3), (64,), (64,))
    with torch.no_grad():
        p.uniform_(0.7, 3.0), q.uniform_(0.0, 0.3)
    grad_y = torch.randn(2, 64, 4, 4, device=DEVICE)
    fn = lambda *a, **k: scd_triton.scd2d(*a, backend="triton", **k)
    first = _grads(fn, x, w, p, q, grad_y, stride=2, padding=1, groups=case.groups)
    second = _grads(fn, x, w, p, q, grad_y, stride=2, padding=1, groups=case.groups)
    for name, a, b in zip("xwpq", first, second):
        assert torch.equal(a, b), f"grad_{name} differs between two identical backward passes"


# Ops that allocate or re-view memory without computing on it.
_VIEW_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
             "reshape", "_reshape_alias", "as_strided", "permute", "expand", "unsqueeze",
             "squeeze", "detach", "alias", "transpose", "t", "select", "slice", "unbind",
             "contiguous", "to", "lift_fresh", "_unsafe_view", "resolve_conj", "resolve_neg",
             "set_"}
_GEMM_OPS = re.compile(r"conv|mm$|matmul|addmm|bmm|baddbmm|linear|unfold|im2col|col2im")


def _is_interpreter_copy(event):
    """Triton's interpreter copies the storages of kernel arguments back as byte tensors."""
    dtypes = getattr(event, "input_dtypes", None) or []
    return os.environ.get("TRITON_INTERPRET") == "1" and "unsigned char" in dtypes


@pytest.mark.parametrize("groups", [1, 8], ids=["gemm", "direct"])
def test_forward_backward_runs_no_conv_and_no_output_sized_torch_op(groups):
    N, C, H, W, O = 2, 8, 10, 10, 16
    x, w, p, q = _leaves((N, C, H, W), (O, C // groups, 3, 3), (O,), (O,))
    with torch.no_grad():
        p.uniform_(0.7, 3.0), q.uniform_(0.0, 0.3)
    grad_y = torch.randn(N, O, H, W, device=DEVICE)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = scd_triton.scd2d(x, w, p, q, padding=1, groups=groups, backend="triton")
        y.backward(grad_y)
    out_numel = y.numel()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    assert any(e.name == "aten::empty" for e in ops), "the profiler recorded no torch ops"
    for e in ops:
        op = e.name[len("aten::"):]
        assert not _GEMM_OPS.search(op), f"{e.name} ran: the kernels must do every GEMM"
        if op in _VIEW_OPS or _is_interpreter_copy(e):
            continue
        numels = [torch.Size(s).numel() for s in e.input_shapes if isinstance(s, list) and s]
        assert max(numels, default=0) < out_numel, (
            f"{e.name} on inputs {e.input_shapes}: a torch op on an output-sized tensor")


def test_training_steps_match_reference_backend(monkeypatch):
    """Three SGD steps of a small SCD network give the same parameters on both backends."""
    def train(backend):
        monkeypatch.setenv("SCD_BACKEND", backend)
        torch.manual_seed(1)
        net = torch.nn.Sequential(
            scd_triton.SCD2d(3, 16, 3, padding=1), scd_triton.MaxAbsPool2d(2),
            scd_triton.SCD2d(16, 16, 3, padding=1, groups=16), scd_triton.MaxAbsPool2d(2),
        ).to(DEVICE)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, target = torch.randn(2, 3, 8, 8, device=DEVICE), torch.randn(2, 16, 2, 2, device=DEVICE)
        for _ in range(3):
            opt.zero_grad()
            (net(x) - target).square().mean().backward()
            opt.step()
        return [t.detach().cpu() for t in net.parameters()]

    for got, want in zip(train("triton"), train("reference")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", params([KERNEL_CASES[0], NEW_PATH_CASES[0], NEW_PATH_CASES[3]]))
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("frozen", ["x", "params"])
def test_what_needs_no_grad_skips_its_gemm(case, backend, frozen, monkeypatch):
    """A first layer's input, or a frozen layer's weight, p and q, need no gradient: their GEMM
    (dgrad, or wgrad and the Jacobian) does not run, as conv2d skips it, and the remaining
    gradients are the same as when everything needs one: the same bits in the interpreter; on a
    GPU grad_x within float32 rounding, as its ŵ then comes from the weight normalisation
    instead of the Jacobian kernel, whose norm sums in another order."""
    from scd_triton.kernels import launch
    launched = []
    real_launch = launch.launch
    monkeypatch.setattr(launch, "launch", lambda kernel, *a: launched.append(kernel.__name__)
                        or real_launch(kernel, *a))
    leaves = _leaves((case.N, case.C, case.H, case.W),
                     (case.O, case.C // case.groups, *case.kernel), (case.O,), (case.O,))
    grad_y = None
    grads = {}
    for all_grads in (True, False):
        for i, t in enumerate(leaves):
            t.requires_grad_(all_grads or (i == 0) != (frozen == "x"))
        launched.clear()
        x, w, p, q = leaves
        y = scd_triton.scd2d(x, w, p.abs() + 1, q.abs(), backend=backend, **case.conv_kwargs())
        grad_y = torch.randn_like(y) if grad_y is None else grad_y
        y.backward(grad_y)
        grads[all_grads] = [None if t.grad is None else t.grad.clone() for t in leaves]
        kinds = {"dgrad": "x", "wgrad": "params"}     # the GEMMs (kernels/launch.py launches)
        skipped = {kind for name, kind in kinds.items() if not any(name in k for k in launched)}
        if backend == "triton":
            assert skipped == (set() if all_grads else {frozen}), launched
        for t in leaves:
            t.grad = None
    for i, (got, want) in enumerate(zip(grads[False], grads[True])):
        if (i == 0) == (frozen == "x"):
            assert got is None
        elif DEVICE == "cpu":
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_uses_c_memory_only_when_the_graph_is_freed(backend, layout):
    """The backward may overwrite the saved ``c`` (the triton backend writes grad_d there)
    only in the backward that frees the graph: one with ``retain_graph=True`` leaves ``c``
    intact, and the final one gives the same gradients bit for bit."""
    case = Case(2, 8, 7, 9, 16, (3, 3), padding=1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, w, p, q = _leaves((case.N, case.C, case.H, case.W), (case.O, case.C, 3, 3), (case.O,),
                         (case.O,))
    y = scd_triton.scd2d(x.detach().contiguous(memory_format=fmt).requires_grad_(), w,
                         p.detach().abs() + 1, q, padding=1, backend=backend)
    c = y.grad_fn.saved_tensors[4]     # held here only to watch it
    c_saved = c.clone()
    grad_y = torch.randn_like(y)
    kept = torch.autograd.grad(y, (w, q), grad_y, retain_graph=True)
    assert torch.equal(c, c_saved), "a retained graph's c was overwritten"
    freed = torch.autograd.grad(y, (w, q), grad_y)
    assert not torch.equal(c, c_saved), "the final backward did not reuse c"
    for got, want in zip(freed, kept):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 16], ids=["gemm", "depthwise"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_freed_graph_saves_c_and_the_norms_at_the_peak(layout, groups):
    """The training step's peak memory: with the graph freed by the backward, grad_d lives in
    c's memory and grad_‖s‖/‖s‖ in the saved norms', so the step holds exactly one
    output-sized tensor and one float32 [N, G, OH, OW] less than one that keeps the graph
    (torch allocations: the CUDA allocator, or the profiler's events on CPU). Depthwise, the
    norms are output-sized too."""
    from bench.run import peak_bytes
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, w, p, q = _leaves((2, 16, 16, 16), (16, 16 // groups, 3, 3), (16,), (16,))
    x = x.detach().contiguous(memory_format=fmt).requires_grad_()
    grad_y = torch.randn(2, 16, 16, 16, device=DEVICE).contiguous(memory_format=fmt)

    def step(retain_graph):
        y = scd_triton.scd2d(x, w, p.detach().abs() + 1, q, padding=1, groups=groups,
                             backend="triton")
        torch.autograd.grad(y, (x, w, q), grad_y, retain_graph=retain_graph)

    step(False)
    kept, freed = (peak_bytes(lambda: step(r), torch.device(DEVICE)) for r in (True, False))
    if kept is None:
        pytest.skip("this torch's profiler reports no allocation events")
    # CUDA: up to one 512-byte allocator block more (NCHW once measured 33280 = 32768 + 512 on
    # an H200, exactly 32768 in the run before, with the same backward; not reproduced)
    block = 512 if DEVICE == "cuda" else 0
    saved = grad_y.numel() * grad_y.element_size() + 2 * groups * 16 * 16 * 4
    assert saved <= kept - freed <= saved + block, (kept, freed)


def test_the_dgrad_goes_first_when_the_workspace_is_beside_grad_x(monkeypatch):
    """A deep layer on a small image (the split-K workspace does not fit in grad_x, ŵ is larger
    than the output and 1 MiB or more): the dgrad runs first and nothing holds its ŵ once the workspace is
    allocated, so a training step's peak holds one of the two, not both (garbage collected
    first: the interpreter keeps its arguments in reference cycles); the gradients are those
    of the dgrad last (the same bits in the interpreter)."""
    import gc
    import weakref
    from scd_triton.kernels import bwd
    x, w, p, q = _leaves((1, 192, 3, 3), (192, 192, 3, 3), (192,), (192,))
    grad_y = torch.randn(1, 192, 3, 3, device=DEVICE)

    def step():
        y = scd_triton.scd2d(x, w, p.detach().abs() + 1, q, padding=1, backend="triton")
        return torch.autograd.grad(y, (x, w, q), grad_y)

    order, w_hat, held = [], [], []
    launch, empty = bwd.Launch.__call__, torch.empty

    def recorded(self, tensors, strides):
        order.append(self.kernel)
        if self.kernel is bwd.scd2d_dgrad_kernel:
            w_hat.append(weakref.ref(tensors[1]))
        return launch(self, tensors, strides)

    def allocated(*args, **kwargs):
        t = empty(*args, **kwargs)
        if w_hat and t.dim() == 5:      # the workspace [splits, O, C/G, R, S]
            gc.collect()
            held.append(w_hat[-1]() is not None)
        return t

    monkeypatch.setattr(bwd.Launch, "__call__", recorded)
    monkeypatch.setattr(torch, "empty", allocated)
    bwd._plan.cache_clear()
    grads = step()
    assert order.index(bwd.scd2d_dgrad_kernel) < order.index(bwd.scd2d_wgrad_kernel)
    assert held == [False], "ŵ is still referenced when the workspace is allocated"
    workspace = bwd._workspace
    monkeypatch.setattr(bwd, "_workspace", lambda *a: (*workspace(*a)[:3], False))
    bwd._plan.cache_clear()
    order.clear()
    # the same bits in the interpreter; on a GPU the dgrad-first ŵ comes from the normalisation
    # kernel (4 warps), the other from the Jacobian's (8 warps), whose Σw² trees differ: an H200
    # gave grad_x 6.7e-5 (relative) apart
    tol = dict(rtol=2e-4, atol=1e-8) if DEVICE == "cuda" else dict(rtol=0, atol=0)
    for got, want in zip(grads, step()):
        torch.testing.assert_close(got, want, **tol)
    assert order.index(bwd.scd2d_dgrad_kernel) > order.index(bwd.scd2d_wgrad_kernel)
    bwd._plan.cache_clear()


@pytest.mark.parametrize("dgrad_first", [True, False], ids=["dgrad_first", "dgrad_last"])
def test_a_split_dgrads_workspace_never_lives_beside_the_weight_gradients(dgrad_first,
                                                                          monkeypatch):
    """A deep layer on a small image splits the dgrad's K (3 splits) in the room of the weight
    gradient's workspace (``bwd._dgrad_splits``): in either order of the two GEMMs, one
    workspace is freed before the other is allocated (garbage collected first: the
    interpreter keeps its arguments in reference cycles), so the peak holds the larger one."""
    import gc
    import weakref
    from scd_triton.kernels import bwd
    x, w, p, q = _leaves((1, 192, 3, 3), (192, 192, 3, 3), (192,), (192,))
    grad_y = torch.randn(1, 192, 3, 3, device=DEVICE)
    if not dgrad_first:      # ŵ small enough to go last (``bwd._workspace``)
        workspace = bwd._workspace
        monkeypatch.setattr(bwd, "_workspace", lambda *a: (*workspace(*a)[:3], False))
    workspaces, overlaps, launch = {}, [], bwd.Launch.__call__

    def recorded(self, tensors, strides):
        name = {bwd.scd2d_wgrad_kernel: "wgrad", bwd.scd2d_dgrad_kernel: "dgrad"}.get(self.kernel)
        if name == "wgrad" or name == "dgrad" and self.constexprs["PARTIAL"]:
            gc.collect()
            other = workspaces.get("dgrad" if name == "wgrad" else "wgrad")
            overlaps.append((name, other is not None and other() is not None))
            workspaces[name] = weakref.ref(tensors[-1])
        return launch(self, tensors, strides)

    monkeypatch.setattr(bwd.Launch, "__call__", recorded)
    bwd._plan.cache_clear()
    y = scd_triton.scd2d(x, w, p.detach().abs() + 1, q, padding=1, backend="triton")
    torch.autograd.grad(y, (x, w, q), grad_y)
    bwd._plan.cache_clear()
    order = ["dgrad", "wgrad"] if dgrad_first else ["wgrad", "dgrad"]
    assert overlaps == [(name, False) for name in order]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_split_dgrad_is_deterministic_on_a_deep_layer(dtype, launched, monkeypatch):
    """3×3 512→512 7² b32 splits the dgrad's K on an H100/H200 (100 tiles of 72 K steps; 104
    of 144 in float32): four identical backward passes give the same grad_x bits (the parts
    are summed in split order, no atomics), close to the unsplit dgrad's and, on two samples,
    to the float64 oracle's."""
    from scd_triton.kernels import bwd
    x, w, p, q = _square_layer(32, 512, 7, dtype)
    x, w = x.requires_grad_(), w.requires_grad_()
    grad_y = torch.randn(32, 512, 7, 7, device=DEVICE, dtype=dtype)
    def grad_x():
        y = scd_triton.scd2d(x, w, p, q, padding=1)
        return torch.autograd.grad(y, (x, w), grad_y)[0]

    got = [grad_x() for _ in range(4)]
    # the dgrad's launches (the forward splits K too): the parts, then their sum
    splits = [made.constexprs["SPLITS"] for made in launched
              if made.kernel is bwd.scd2d_dgrad_kernel]
    assert splits[:2] == [0, 2], "no split on this GPU"
    single = unsplit(monkeypatch, bwd, grad_x)
    assert all(torch.equal(g, got[0]) for g in got[1:])
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert rel(got[0], single) < 1e-2
    leaves = [t.detach()[:2].double().cpu().requires_grad_() if t is x else
              t.detach().double().cpu() for t in (x, w, p, q)]
    oracle.scd2d(*leaves, padding=(1, 1, 1, 1)).backward(grad_y[:2].double().cpu())
    assert rel(got[0][:2].cpu(), leaves[0].grad) < (3e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("need_grad_x", [True, False])
@pytest.mark.parametrize("layer", [(32, 128, 28, 128, 1), (32, 64, 56, 128, 2), (64, 3, 32, 80, 1),
                                   (128, 128, 16, 256, 1)],
                         ids=["3x3_128_28", "3x3s2_64-128_56", "stem_5x5", "3x3_128-256_16"])
def test_wgrad_workspace_costs_at_most_one_output_beyond_grad_x(layer, need_grad_x, monkeypatch):
    """The memory policy of the GPU plan (132 SMs): the split-K workspace is either inside
    grad_x's memory or at most one output-sized tensor, grad_x's room buys more splits, and
    the workspace leaves grad_x only when the splits that fit there would not fill the SMs
    once (3×3 128→256 16²: 7 splits in grad_x rather than 11 beside it)."""
    from scd_triton.kernels import bwd
    monkeypatch.setattr(bwd, "sm_count", lambda device_index: 132)
    N, C, H, O, s = layer
    k = 5 if C == 3 else 3
    OH = H // s
    x_strides = (C * H * H, H * H, H, 1)
    plan = bwd._plan.__wrapped__((N, C, H, H), x_strides, True, (O, C, k, k), (OH, OH), False,
                                 torch.bfloat16, True, 0, (s, s), (k // 2,) * 4, (1, 1), 1,
                                 1e-12, "norm", "tf32", need_grad_x, True, True)
    ws_bytes = math.prod(plan.ws_shape) * plan.ws_dtype.itemsize
    x_bytes, out_bytes = N * C * H * H * 2, N * O * OH * OH * 2
    if plan.ws_in_grad_x:
        assert need_grad_x and ws_bytes <= x_bytes
    else:
        assert ws_bytes <= out_bytes
        if need_grad_x:
            tiles, taps, _ = plan.wgrad.grid     # programs of one split: tiles × taps
            assert x_bytes // (ws_bytes // plan.ws_shape[0]) * tiles * taps < 132, plan.ws_shape
    if need_grad_x and x_bytes > out_bytes and plan.ws_shape[0] > 1:
        fewer = bwd._plan.__wrapped__((N, C, H, H), x_strides, True, (O, C, k, k), (OH, OH),
                                      False,
                                      torch.bfloat16, True, 0, (s, s), (k // 2,) * 4, (1, 1), 1,
                                      1e-12, "norm", "tf32", False, True, True)
        assert plan.ws_in_grad_x and plan.ws_shape[0] > fewer.ws_shape[0]


# (case, whether the split-K workspace fits in grad_x's memory and lives there)
FRESH_BUFFER_CASES = [
    (Case(2, 8, 12, 12, 8, (3, 3), padding=1), True),
    (NEW_PATH_CASES[0], False),      # stride 2: strided dgrad
    (NEW_PATH_CASES[1], True),       # stem: flat K, padded ŵ rows and columns
    (NEW_PATH_CASES[2], False),      # C/G = 20 with BK 16: padded ŵ rows
    (NEW_PATH_CASES[3], False),      # direct kernels
    (Case(1, 4, 12, 12, 4, (3, 3), padding=1, groups=4), True),
]


@pytest.mark.parametrize("case, ws_in_grad_x", [pytest.param(c, f, id=c.id)
                                                for c, f in FRESH_BUFFER_CASES])
def test_fresh_buffers_are_written_before_read(case, ws_in_grad_x, monkeypatch):
    """Every buffer the launchers allocate is written before a kernel reads it (padded GEMM
    rows, the split-K workspace in grad_x's memory): with ``torch.empty`` filling NaN, the
    forward and the gradients still match the oracle."""
    from scd_triton.kernels import bwd
    empty, empty_like = torch.empty, torch.empty_like
    nan = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    fits = []
    workspace = bwd._workspace
    monkeypatch.setattr(bwd, "_workspace", lambda *a: fits.append(workspace(*a)[2]) or
                        workspace(*a))
    bwd._plan.cache_clear()
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE)
    bwd._plan.cache_clear()
    if DEVICE == "cpu":      # the interpreter's plans; a GPU's split-K count follows its SMs
        assert fits == [ws_in_grad_x]
    else:
        assert len(fits) == 1


@gpu
@pytest.mark.parametrize("case", params([KERNEL_CASES[0], KERNEL_CASES[2], KERNEL_CASES[7],
                                         KERNEL_CASES[-1]]))
def test_bfloat16_gradients_match_oracle(case):
    run_against_oracle(scd_triton.scd2d, case, torch.bfloat16, "triton", device=DEVICE)


@gpu
def test_backward_int64_offsets_past_2_pow_31():
    x = torch.randn(33, 64, 1024, 1024, device=DEVICE, dtype=torch.bfloat16)  # 2.2e9 elements
    w = torch.randn(16, 64, 1, 1, device=DEVICE, dtype=torch.bfloat16)
    grad_y = torch.randn(33, 16, 1024, 1024, device=DEVICE, dtype=torch.bfloat16)
    fn = lambda x, w, backend: scd_triton.scd2d(x, w, 1.5, 0.1, backend=backend)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(fn(x, w, "triton"), x, grad_y)
    tail = x[-1:].detach().requires_grad_()
    (want,) = torch.autograd.grad(fn(tail, w, "reference"), tail, grad_y[-1:])
    torch.testing.assert_close(grad_x[-1:], want, rtol=2e-2, atol=2e-2)


def test_positions_within_a_block_of_int32_are_refused():
    """The wgrads' K loops index a block past the last position in int32: N·OH·OW must leave
    that room (2**31 − 100 positions would wrap)."""
    from scd_triton.kernels import bwd
    P = 2**31 - 100                                 # one 1-channel image of P positions
    args = ((1, 1, 1, P), (P, P, P, 1), True, (1, 1, 1, 1), (1, P), False, torch.float32, True, 0, (1, 1),
            (0, 0, 0, 0), (1, 1), 1, 1e-12, "none", "tf32", True, True, True)
    with pytest.raises(ValueError, match="N·OH·OW = 2147483548 below 2\\*\\*31 - 128"):
        bwd._plan.__wrapped__(*args)


@pytest.mark.parametrize("grad_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("channels, C, unit", [(40, 40, 8), (44, 40, 4), (42, 40, 2)])
def test_gradients_of_channel_rows_in_vector_units(channels, C, unit, grad_format, monkeypatch):
    """The backward's kernels are told the vector units of O/G (grad_d, c, ŵ: ``OV``), of x as
    they read it (``XV``) and of grad_x (``DV``) where those are not multiples of 16; x here is
    a channel slice of a wider channels-last tensor, read in place, whose strides share a
    smaller unit than its 40 channels (see test_kernels.py); its grad_x is NCHW unless x is
    channels-last contiguous (DV 1: channels not contiguous). grad_y comes NCHW (its unit
    lowered to 1 at the call) or channels-last (``GV``). All four gradients against the
    float64 oracle (a unit that did not divide a stride would move every access)."""
    from scd_triton.kernels import bwd
    plan, units = bwd._plan, []

    def plan_with(*args):
        found = plan(*args)
        units.append({k: found.dgrad.constexprs[k] for k in ("OV", "XV", "DV")}
                     | {"wgrad " + k: found.wgrad.constexprs[k] for k in ("OV", "XV")}
                     | {"prologue " + k: found.prologue.constexprs[k] for k in ("OV", "CV", "GV")})
        return found

    monkeypatch.setattr(bwd, "_plan", plan_with)
    big = torch.randn(2, channels, 5, 6, dtype=torch.float16, device=DEVICE)
    x = big.contiguous(memory_format=torch.channels_last)[:, :C].detach().requires_grad_()
    w = torch.randn(C, C, 3, 3, dtype=torch.float16, device=DEVICE, requires_grad=True)
    p = (torch.rand(C) + 1.0).to(DEVICE).requires_grad_()
    q = (torch.rand(C) * 0.3).to(DEVICE).requires_grad_()
    y = scd_triton.scd2d(x, w, p, q, padding=1, backend="triton")
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_y.to(DEVICE, torch.float16).contiguous(memory_format=grad_format))
    assert units == [dict(OV=8, XV=unit, DV=8 if channels == C else 1, **{
        "wgrad OV": 8, "wgrad XV": unit, "prologue OV": 8, "prologue CV": 8,
        "prologue GV": 8 if channels == C else 1})]
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    want = oracle.scd2d(*leaves, padding=(1, 1, 1, 1))
    want.backward(grad_y)
    for name, got, ref in zip("xwpq", (x, w, p, q), leaves):
        assert_close(f"grad_{name}", got.grad.cpu(), ref.grad, torch.float16, grad=True,
                     reduce_dim=C * 9 * C)


@pytest.mark.parametrize("O, groups", [(40, 1), (24, 1), (40, 40)])
def test_a_saved_tensor_hook_that_changes_c_layout(O, groups):
    """A saved-tensor hook may give the forward's tensors back in other strides (``save_on_cpu``
    returns them NCHW): the prologue then reads ``c`` without the vector unit it takes for the
    channels-last ``c`` the forward makes (with it, every position read position 0's c: grad_x
    was 0.36 off), and a depthwise layer's norms, saved groups-innermost, positions-innermost.
    All four gradients against the float64 oracle; found by a second reading."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 5, 6, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(O, 40 // groups, 3, 3, dtype=torch.float16)
    p, q = torch.rand(O) + 1.0, torch.rand(O) * 0.3
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, p, q)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
        y = scd_triton.scd2d(*leaves, padding=1, groups=groups, backend="triton")
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_y.to(DEVICE, torch.float16))
    ref = [t.detach().double().requires_grad_() for t in (x, w, p, q)]
    oracle.scd2d(*ref, padding=(1, 1, 1, 1), groups=groups).backward(grad_y)
    for name, got, want in zip("xwpq", leaves, ref):
        assert_close(f"grad_{name}", got.grad.cpu(), want.grad, torch.float16, grad=True,
                     reduce_dim=40 // groups * 9 * O)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_y_of_one_column_with_an_odd_column_stride(channels_last):
    """An output one column wide (OW = 1) whose grad_y has an arbitrary stride in that size-1
    dimension (here from ``y.transpose(2, 3)``; torch calls it contiguous anyway): the
    positions are its rows. The prologue read them at multiples of the column stride (grad_x
    1e24 off in float32; found by a second reading). All four gradients against the oracle."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, p, q = torch.randn(8, 4, 1, 1), torch.rand(8) + 1.0, torch.rand(8) * 0.3
    z = torch.randn(2, 8, 1, 6, dtype=torch.float64)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, p, q)]
    y = scd_triton.scd2d(*leaves, backend="triton")
    (y.transpose(2, 3) * z.to(DEVICE, torch.float32)).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, w, p, q)]
    (oracle.scd2d(*ref).transpose(2, 3) * z).sum().backward()
    for name, got, want in zip("xwpq", leaves, ref):
        assert_close(f"grad_{name}", got.grad.cpu(), want.grad, torch.float32, grad=True,
                     reduce_dim=4 * 8)


@pytest.mark.parametrize("channels, C, unit", [(40, 40, 8), (44, 40, 4)])
def test_depthwise_rows_in_vector_units(channels, C, unit, monkeypatch):
    """Depthwise layers (one channel a group in and out) run the direct kernels, which read and
    write rows of C channels: told their vector unit (``XV`` / ``OV`` / ``DV``), 40 channels no
    longer spill (the 3×3 forward spilled 248 bytes, the dgrad 440, the wgrad 168 on sm_90).
    A channel slice of a wider channels-last x keeps the unit its strides share; output and
    all four gradients against the float64 oracle."""
    from scd_triton.kernels import bwd, fwd
    plans = {"fwd": fwd._plan, "bwd": bwd._plan}
    units = []

    def spy(name):
        def plan_with(*args):
            found = plans[name](*args)
            launches = [found.main] if name == "fwd" else [found.dgrad, found.wgrad]
            units.extend((lp.kernel.__name__, lp.constexprs["XV"]) for lp in launches)
            return found
        return plan_with

    monkeypatch.setattr(fwd, "_plan", spy("fwd"))
    monkeypatch.setattr(bwd, "_plan", spy("bwd"))
    big = torch.randn(2, channels, 5, 6, dtype=torch.float16, device=DEVICE)
    x = big.contiguous(memory_format=torch.channels_last)[:, :C].detach().requires_grad_()
    w = torch.randn(C, 1, 3, 3, dtype=torch.float16, device=DEVICE, requires_grad=True)
    p = (torch.rand(C) + 1.0).to(DEVICE).requires_grad_()
    q = (torch.rand(C) * 0.3).to(DEVICE).requires_grad_()
    y = scd_triton.scd2d(x, w, p, q, padding=1, groups=C, backend="triton")
    grad_y = torch.randn(y.shape, dtype=torch.float64)
    y.backward(grad_y.to(DEVICE, torch.float16).contiguous(memory_format=torch.channels_last))
    assert units == [("scd2d_fwd_direct_kernel", unit), ("scd2d_dgrad_direct_kernel", unit),
                     ("scd2d_wgrad_direct_kernel", unit)]
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    want = oracle.scd2d(*leaves, padding=(1, 1, 1, 1), groups=C)
    assert_close("y", y.detach().cpu(), want.detach(), torch.float16, reduce_dim=9)
    want.backward(grad_y)
    for name, got, ref in zip("xwpq", (x, w, p, q), leaves):
        assert_close(f"grad_{name}", got.grad.cpu(), ref.grad, torch.float16, grad=True,
                     reduce_dim=9 * C)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last],
                         ids=["contiguous", "channels_last"])      # not in gpu-check's selection
@pytest.mark.parametrize("C, O, groups", [(16, 16, 1), (8, 8, 8)])   # GEMMs, direct kernels
def test_a_smaller_last_batch_compiles_only_the_wgrads_ragged_loop(C, O, groups, layout,
                                                                    monkeypatch):
    """A training step at batch 31 launches batch 32's kernel variants (what Triton compiles
    once: ``bench.pytest_shard._variant``): the launch ints that follow the batch size are in
    the kernels' ``do_not_specialize``. Only the GEMM wgrad differs, by ``EVEN_M`` (BK divides
    N·OH·OW: its loop drops the position masks), where a GEMM wgrad runs."""
    from bench.pytest_shard import _variant
    from scd_triton.kernels import launch, layout as layout_module, weight
    variants = []
    real_launch = launch.launch

    def record(kernel, grid, tensors, scalars, constexprs, warps, stages):
        variants.append(_variant(kernel, tensors, scalars, constexprs, warps, stages))
        return real_launch(kernel, grid, tensors, scalars, constexprs, warps, stages)

    for module in (launch, layout_module, weight):
        monkeypatch.setattr(module, "launch", record)

    def step(N):
        variants.clear()
        x, w, p, q = _leaves((N, C, 5, 6), (O, C // groups, 3, 3), (O,), (O,))
        y = scd_triton.scd2d(x.contiguous(memory_format=layout), w, p.detach().abs() + 1, q,
                             padding=1, groups=groups, backend="triton")
        y.backward(torch.randn_like(y))
        return list(variants)

    full, last = step(32), step(31)
    assert len(full) == len(last)
    differ = [(a, b) for a, b in zip(full, last) if a != b]
    assert all('"scd2d_wgrad_kernel"' in a and a.replace('["EVEN_M", "True"]',
                                                         '["EVEN_M", "False"]') == b
               for a, b in differ), differ
