"""The fused Triton forward against the float64 oracle (gradients: tests/test_kernels_bwd.py).

On CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest / ``make test``);
on a CUDA machine the same tests run the compiled kernels.
"""
import pytest
import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

import oracle
import scd_triton
from cases import CASES_2D, Case, params, run_against_oracle
from helpers import DEVICE, assert_close, gpu, unsplit
from scd_triton.kernels import fwd, scd2d_fwd, uses_direct_kernel
from scd_triton.kernels.fwd import gemm_config
from scd_triton.kernels.launch import channel_unit


KERNEL_CASES = CASES_2D + [
    Case(1, 70, 3, 4, 80, (1, 1), per_channel=False),      # several channel blocks and N tiles
    Case(1, 3, 12, 11, 17, (5, 5), padding=2),             # first-layer shape: C=3 padded to 16
    Case(2, 32, 5, 5, 64, (3, 3), padding=1, groups=2),    # grouped GEMM (16 per group)
]
# The configs the heuristic picks for other layer kinds; odd sizes, several images per tile.
NEW_PATH_CASES = [
    Case(3, 16, 13, 11, 24, (3, 3), stride=2, padding=1),  # stride 2, tiles cross images
    Case(2, 3, 9, 10, 8, (3, 3), padding=1),               # stem C=3 (flat K), narrow O=8
    Case(2, 20, 6, 7, 24, (3, 3), padding=1),              # narrow: BN 32, BK 16, C not /16
    Case(2, 6, 7, 5, 12, (3, 3), padding=1, groups=3),     # direct: 2 in, 4 out per group
    Case(2, 4, 9, 8, 8, (3, 3), stride=2, padding=1, groups=4),  # direct, stride 2: transposed x
    Case(1, 16, 6, 6, 32, (3, 3), padding=1, groups=2),    # grouped, 8 per group: flat-K GEMM
    Case(3, 24, 5, 7, 20, (1, 1)),                         # 1×1 NCHW: x read in place
]


@pytest.fixture(autouse=True)
def _ieee_float32(no_tf32):
    """float32 kernels compared with float64 use IEEE dots (TF32 is a GPU-only rounding)."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", params(KERNEL_CASES))
def test_forward_matches_oracle(case, dtype):
    run_against_oracle(scd_triton.scd2d, case, dtype, "triton", device=DEVICE, grads=False)


@pytest.mark.parametrize("case", params(NEW_PATH_CASES))
def test_new_paths_match_oracle(case):
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE, grads=False)


@pytest.mark.parametrize("case", params([CASES_2D[0], CASES_2D[7], KERNEL_CASES[-1]]))
def test_normalized_matches_oracle(case):
    run_against_oracle(scd_triton.scd2d_normalized, case, torch.float32, "triton", normalized=True,
                       device=DEVICE)


@pytest.mark.parametrize("case", params([CASES_2D[0], CASES_2D[4], CASES_2D[8]]
                                         + NEW_PATH_CASES[:2] + NEW_PATH_CASES[3:5]))
def test_channels_last_equals_nchw(case):
    y_cl = run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", channels_last=True,
                              device=DEVICE, grads=False)
    torch.manual_seed(0)
    y = run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton", device=DEVICE,
                           grads=False)
    torch.testing.assert_close(y_cl, y, rtol=1e-6, atol=1e-6)


def test_zero_patches_and_zero_dots_give_zero():
    x = torch.zeros(1, 2, 6, 6, device=DEVICE)
    x[:, 1, :, :3] = torch.randn(6, 3)
    w = torch.zeros(3, 2, 3, 3, device=DEVICE)
    w[:, 0] = torch.randn(3, 3, 3)
    y = scd_triton.scd2d(x, w, 0.5, 0.0, padding=1, backend="triton")
    assert (y == 0).all()


def test_scd1d_through_2d_kernel():
    x, w = torch.randn(2, 8, 33, device=DEVICE), torch.randn(16, 4, 5, device=DEVICE)
    args = (x, w, torch.rand(16, device=DEVICE) + 1, 0.1, 2, 3, 1, 2)
    torch.testing.assert_close(scd_triton.scd1d(*args, backend="triton"),
                               scd_triton.scd1d(*args, backend="reference"), rtol=1e-4, atol=1e-5)


def test_empty_batch():
    x, w = torch.randn(0, 4, 6, 6, device=DEVICE), torch.randn(8, 4, 3, 3, device=DEVICE)
    y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend="triton")
    assert y.shape == (0, 8, 6, 6)


@pytest.mark.parametrize("C", [3, 32])     # flat-K and (tap, channel) GEMMs
def test_shared_p_q_take_one_value_and_give_the_per_channel_bits(C, launched):
    """Python-float p and q arrive as stride-0 tensors: the GEMM forward reads one value of each
    (``P_SHARED`` / ``Q_SHARED``: one reciprocal of ‖s‖ + q a row) and gives the same bits as
    the same values passed per channel, with and without the saved c."""
    x = torch.randn(2, C, 7, 6, device=DEVICE)
    w = torch.randn(16, C, 3, 3, device=DEVICE, requires_grad=True)
    full = lambda v: torch.full((16,), v, device=DEVICE)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            launched.clear()
            y = scd_triton.scd2d(x, w, 1.7, 0.2, padding=1, backend="triton")
            shared = [made.constexprs for made in launched if "Q_SHARED" in made.constexprs]
            assert [(c["P_SHARED"], c["Q_SHARED"]) for c in shared] == [(True, True)]
            launched.clear()
            want = scd_triton.scd2d(x, w, full(1.7), full(0.2), padding=1, backend="triton")
            per_channel = [made.constexprs for made in launched
                           if "Q_SHARED" in made.constexprs]
            assert [(c["P_SHARED"], c["Q_SHARED"]) for c in per_channel] == [(False, False)]
        assert torch.equal(y, want)


def test_direct_kernel_choice():
    assert uses_direct_kernel(groups=32, in_per_group=1, out_per_group=1)
    assert uses_direct_kernel(groups=32, in_per_group=1, out_per_group=2)
    assert not uses_direct_kernel(groups=1, in_per_group=3, out_per_group=80)
    assert not uses_direct_kernel(groups=2, in_per_group=16, out_per_group=32)
    assert not uses_direct_kernel(groups=4, in_per_group=8, out_per_group=64)


@pytest.mark.parametrize("groups, in_per_group, out_per_group, layout, groups_innermost", [
    (8, 1, 1, "channels_last", True),      # depthwise: the direct kernels run along groups
    (4, 2, 3, "channels_last", True),      # direct, several channels a group
    (8, 1, 1, "nchw", False),              # NCHW: the direct kernels run along positions
    (2, 16, 16, "channels_last", False),   # grouped GEMM: a [BM] column of positions a tile
])
def test_saved_norms_are_groups_innermost_where_the_kernels_run_along_groups(
        groups, in_per_group, out_per_group, layout, groups_innermost):
    """The forward's norms [N, G, OH, OW] are stored [N, OH, OW, G] for a channels_last x of a
    depthwise-like layer, so that its direct kernels and the backward prologue load and store
    them 16 bytes at a time, and positions-innermost elsewhere; the op's fake implementation
    (what torch.compile traces) promises the same strides."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    C, O = groups * in_per_group, groups * out_per_group
    x = torch.randn(2, C, 5, 6, device=DEVICE).contiguous(memory_format=fmt)
    w = torch.randn(O, in_per_group, 3, 3, device=DEVICE)
    p, q = torch.full((O,), 2.0, device=DEVICE), torch.full((O,), 0.1, device=DEVICE)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], groups, 1e-6, 1e-6, "none", 0.0, "triton", True)
    norm = torch.ops.scd_triton.scd2d_core(x, w, p, q, *args)[2]
    assert norm.shape == (2, groups, 5, 6)
    assert norm.stride() == ((30 * groups, 1, 6 * groups, groups) if groups_innermost
                             else (30 * groups, 30, 6, 1))
    with FakeTensorMode() as mode:
        fake = torch.ops.scd_triton.scd2d_core(*(mode.from_tensor(t) for t in (x, w, p, q)),
                                               *args)[2]
    assert fake.stride() == norm.stride()


def test_heuristic_configs():
    """(BM, BN, BK, FLAT_K, warps, stages) per layer kind: one config, no autotuning."""
    big = 64 * 56 * 56
    assert gemm_config(128, 128, 3, 3, 1, big, False) == (128, 128, 64, False, 8, 3)
    assert gemm_config(128, 128, 3, 3, 1, 32 * 28 * 28, False) == (64, 128, 64, False, 4, 3)
    assert gemm_config(64, 64, 3, 3, 1, big // 2, False)[:2] == (64, 64)
    assert gemm_config(64, 64, 3, 3, 1, big // 2, True)[:2] == (128, 64)
    assert gemm_config(128, 128, 3, 3, 1, big, True) == (64, 128, 32, False, 4, 3)
    assert gemm_config(32, 32, 3, 3, 1, big, False)[1:4] == (32, 32, False)
    assert gemm_config(3, 80, 5, 5, 1, 256 * 32 * 32, False)[1:4] == (128, 32, True)
    assert gemm_config(512, 512, 3, 3, 1, 8 * 7 * 7, False)[0] == 64      # < 2 waves of 128
    # MMA-bound tiles pad K by at most 1/8; issue-bound 16-bit 64×64 ones take the fewest steps
    assert gemm_config(48, 128, 3, 3, 1, big, False)[2] == 16              # 64 would pad by 1/3
    assert gemm_config(96, 128, 3, 3, 1, big, False)[2] == 32              # 64 would pad by 1/3
    assert gemm_config(48, 64, 3, 3, 1, big, False)[2] == 64               # 1 step, not 3
    assert gemm_config(40, 40, 3, 3, 1, 64 * 8 * 8, False)[:3] == (64, 64, 64)
    assert gemm_config(20, 24, 3, 3, 1, big, False)[1:3] == (32, 32)       # 1 step either way
    assert gemm_config(40, 40, 3, 3, 1, big, True)[2] == 16                # float32: by padding
    assert not isinstance(fwd.scd2d_fwd_kernel, triton.runtime.Autotuner)


def test_split_k_only_where_the_tiles_fill_under_half_the_gpu():
    """Splits of the forward's K (``fwd.split_k``) on 132 SMs, with the configs' tiles: 3×3
    512→512 7² b32 (100 tiles of 72 steps, two a SM) takes two, batch-1 inference on 3×3
    128→128 28² (13 tiles of 18 steps) two, layers that fill the GPU or have short K none."""
    def splits(N, C, O, side, R, fp32=False):
        BM, BN, BK, flat_k, warps, _ = gemm_config(C, O, R, R, 1, N * side * side, fp32)
        programs = -(-N * side * side // BM) * -(-O // BN)
        n_k = R * R * -(-C // BK)
        return fwd.split_k(programs, n_k, 132, warps)
    assert splits(32, 512, 512, 7, 3) == 2
    assert splits(1, 128, 128, 28, 3) == 2
    assert splits(32, 256, 256, 14, 3) == 1       # 196 tiles
    assert splits(64, 40, 40, 8, 3) == 1          # 9 steps
    assert splits(64, 128, 128, 56, 3) == 1
    assert fwd.split_k(1, 72, 132, 8) == 9        # at least 8 steps a split


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_a_new_batch_size_changes_only_ints_the_forward_does_not_specialise(layout):
    """The GEMM forward's launch ints that follow the batch size (M, the M tiles) are not
    specialised (``do_not_specialize``): a last, smaller batch reuses the compiled kernel."""
    def ints(N):
        x = torch.empty(N, 64, 56, 56).contiguous(memory_format=layout)
        plan = fwd._plan(x.shape, x.stride(), False, (64, 64, 3, 3), (576, 9, 3, 1), "norm_q",
                         1e-12, layout, 0, 0, False, True, 132, True, (1, 1), (1, 1, 1, 1),
                         (1, 1), 1, 1e-6, 1e-12, True, "tf32")
        assert plan.partial is None
        names = fwd.scd2d_fwd_kernel.arg_names[9:]
        return dict(zip(names, (*plan.main.head, *x.stride(), *plan.main.tail)))
    full, last = ints(32), ints(31)
    changed = {name for name in full if full[name] != last[name]}
    kernel = fwd.scd2d_fwd_kernel      # the decorator's argument (the interpreter keeps kwargs)
    unspecialised = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
    assert changed and changed <= set(unspecialised), changed


SPLIT_CASES = [   # float32 K blocks of 32 (16 for 40 channels): 18, 27 and 25 K steps
    Case(2, 64, 5, 5, 24, (3, 3), padding=1),
    Case(1, 40, 6, 5, 70, (3, 3), padding=1, stride=2),
    Case(2, 32, 4, 4, 16, (5, 5), padding=2, per_channel=False),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", params(SPLIT_CASES))
def test_a_split_k_matches_the_oracle_and_the_unsplit_kernel(case, channels_last, launched,
                                                          monkeypatch):
    """Small layers split K over two launches (partial sums into a float32 workspace, then
    their sum in split order and the epilogue): y and the four gradients against the oracle,
    and y, c and the norms as the unsplit kernel gives them but for the order of the sums."""
    x = torch.randn(case.N, case.C, case.H, case.W)
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "triton",
                       channels_last=channels_last, device=DEVICE, x=x)
    steps = [(made.constexprs["PARTIAL"], made.constexprs["SPLITS"]) for made in launched
             if made.kernel is fwd.scd2d_fwd_kernel]
    assert steps[:2] == [(True, 0), (False, 3 if case.C == 40 or case.kernel == (5, 5) else 2)]
    w = torch.randn(case.O, case.C, *case.kernel, device=DEVICE)
    p, q = torch.rand(case.O, device=DEVICE) + 1, torch.rand(case.O, device=DEVICE) * 0.2
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last if channels_last
                                else torch.contiguous_format)
    conv = case.oracle_kwargs()
    call = lambda: scd2d_fwd(x, w, p, q, conv["stride"], conv["padding"], conv["dilation"],
                             conv["groups"], 1e-6, 1e-12, "norm_q", 1e-12)
    split, single = call(), unsplit(monkeypatch, fwd, call)
    for name, a, b in zip(("y", "c", "norm"), split, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(split[2], single[2])      # the norms do not depend on K's sums


@pytest.mark.parametrize("channels, C, unit", [(40, 40, 8), (44, 40, 4), (42, 40, 2),
                                                (40, 39, 1), (48, 48, 1)])
def test_channel_rows_in_vector_units(channels, C, unit):
    """The kernels that read x are told the largest unit, up to 16 bytes, dividing C/G and x's
    strides but the channels' (``XV``), and O/G (``YV``), so that on a GPU rows of 40 channels
    load and store 16 bytes at a time (Triton itself only sees multiples of 16). A channel slice
    of a wider channels-last x keeps the unit its strides share; multiples of 16 get none (Triton
    sees them); the output is right either way (a unit that did not divide a stride would move
    every load)."""
    x = torch.randn(2, channels, 5, 6, dtype=torch.float16, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)[:, :C]
    assert channel_unit(2, C, x.stride()) == unit
    assert channel_unit(4, C, x.stride()) == min(unit, 4)
    assert channel_unit(2, C, x.contiguous().stride()) == 1       # NCHW: channels not contiguous
    w = torch.randn(C, C, 3, 3, dtype=torch.float16, device=DEVICE)
    p, q = torch.rand(C) + 1.0, torch.rand(C) * 0.3
    y = scd_triton.scd2d(x, w, p.to(DEVICE), q.to(DEVICE), padding=1, backend="triton")
    want = oracle.scd2d(x.cpu().double(), w.cpu().double(), p.double(), q.double(),
                        padding=(1, 1, 1, 1))
    assert_close("y", y.cpu(), want, torch.float16, reduce_dim=C * 9)


@pytest.mark.parametrize("side, unit", [(14, 4), (10, 4), (7, 1), (16, 1)])
def test_nchw_planes_in_vector_units(side, unit, monkeypatch):
    """With NCHW input the forward stores y along each (n, o) plane of OH·OW positions; where
    that is not a multiple of 16 but of 2–8 it is told so (``PV``: 196 = 4·49 positions make
    8-byte stores on a GPU instead of 2-byte ones), and the output matches the oracle."""
    plan, units = fwd._plan, []

    def plan_with(*args):
        found = plan(*args)
        units.append(found.main.constexprs["PV"])
        return found

    monkeypatch.setattr(fwd, "_plan", plan_with)
    x = torch.randn(2, 8, side, side, dtype=torch.float16, device=DEVICE)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float16, device=DEVICE)
    p, q = torch.rand(8) + 1.0, torch.rand(8) * 0.3
    y = scd_triton.scd2d(x, w, p.to(DEVICE), q.to(DEVICE), padding=1, backend="triton")
    assert units == [unit]
    want = oracle.scd2d(x.cpu().double(), w.cpu().double(), p.double(), q.double(),
                        padding=(1, 1, 1, 1))
    assert_close("y", y.cpu(), want, torch.float16, reduce_dim=8 * 9)


def _fwd_args(C, O, groups, H=7, W=6):
    x = torch.randn(2, C, H, W, device=DEVICE)
    w = torch.randn(O, C // groups, 3, 3, device=DEVICE)
    w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    p, q = torch.rand(O, device=DEVICE) + 0.7, torch.rand(O, device=DEVICE) * 0.3
    return x, w, p, q, (1, 1), (1, 1, 1, 1), (1, 1), groups, 1e-6, 1e-6


LAYERS = [(4, 6, 1), (32, 16, 1), (4, 8, 4)]   # flat-K GEMM, (tap, channel) GEMM, direct


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
def test_prepare_writes_each_pixels_sum_of_squares(layout, groups):
    """The prepare launch's Σ_c x² per (sample, group, pixel), the patch norms' only input, for
    x of any strides (160 or 80 channels per group: masked channel blocks), with NCHW x its
    channels-contiguous copy for the GEMM, and the same ŵ bits whether the programs are spread
    as for a GPU or not (the interpreter's): on a GPU the Σ_c x² tiles of this small image take
    fewer pixels and more channels."""
    N, C, O, H, W = 2, 160, 8, 5, 7
    x = torch.randn(N, C, H, 2 * W, device=DEVICE)
    x = x[..., ::2] if layout == "strided" else x[..., :W].contiguous()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(O, C // groups, 3, 3, device=DEVICE)
    q = torch.full((O,), 0.1, device=DEVICE)
    BN, BK, flat_k = gemm_config(C // groups, O // groups, 3, 3, groups, N * H * W, True)[1:4]
    w_layout = fwd._gemm_weight_layout(O, C // groups, 3, 3, groups, BN, BK, flat_k)
    copy = layout == "nchw"
    want = x.double().square().view(N, groups, C // groups, H, W).sum(2)
    w_hats = []
    for spread in (False, True):
        w_hat = torch.full(w_layout[0], float("nan"), device=DEVICE)
        sq = torch.full((N, groups, H, W), float("nan"), device=DEVICE)
        x_gemm = torch.empty_like(x, memory_format=torch.channels_last) if copy else x
        along_channels = layout == "channels_last"
        launch = fwd.prepare_launch(x.shape, w.shape, w.stride(), q.stride(0), "norm_q", 1e-12,
                                    groups, w_layout, copy, layout != "strided", spread,
                                    along_channels)
        launch((x, x_gemm, sq, w, q, w_hat), x.stride())
        BQ, BCQ = launch.constexprs["BQ"], launch.constexprs["BCQ"]
        if not launch.constexprs["SUM_IN_COPY"]:   # 64 pixels, or spread: down to 8 / 32
            assert BQ * BCQ == 4096 and (BQ == 64 if not spread else
                                         (16 if along_channels and groups == 1 else 32) == BQ)
        torch.testing.assert_close(sq.double(), want, rtol=1e-6, atol=0)
        if copy:
            assert x_gemm.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(x_gemm, x)
        w_hats.append(w_hat[:, :O // groups])     # the padded output channels stay unwritten
    assert torch.isfinite(w_hats[0]).all() and torch.equal(w_hats[0], w_hats[1])


@pytest.mark.parametrize("C, O, groups", LAYERS)
def test_save_for_backward_false_stores_y_only(C, O, groups):
    args = _fwd_args(C, O, groups)
    y, c, norm = scd2d_fwd(*args)
    y2, c2, norm2 = scd2d_fwd(*args, save_for_backward=False)
    assert c2 is None and norm2 is None
    assert c.shape == y.shape and norm.shape == (2, groups, 7, 6)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("C, O, groups", LAYERS)
def test_nan_or_inf_in_x_gives_nan_where_reached(C, O, groups, bad):
    x, *rest = _fwd_args(C, O, groups)
    x[1, 1, 3, 2] = bad
    y, c, _ = scd2d_fwd(x, *rest)
    hit = torch.zeros_like(x)
    hit[1, 1, 3, 2] = 1
    ones = torch.ones(O, C // groups, 3, 3, device=DEVICE)
    reached = torch.nn.functional.conv2d(hit, ones, padding=1, groups=groups) > 0
    assert reached.sum() == 9 * (O // groups)
    assert torch.equal(torch.isnan(y), reached) and torch.equal(torch.isnan(c), reached)


@pytest.mark.parametrize("C, O, groups", LAYERS)
def test_nan_in_kernel_gives_nan_channel(C, O, groups):
    x, w, *rest = _fwd_args(C, O, groups)
    w[O - 1, 0, 1, 1] = float("nan")
    y, _, _ = scd2d_fwd(x, w, *rest)
    assert torch.isnan(y[:, O - 1]).all() and torch.isfinite(y[:, :O - 1]).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any torch op creates or copies."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_forward_never_materialises_patches():
    N, C, H, W, O = 2, 16, 8, 8, 4
    x, w = torch.randn(N, C, H, W, device=DEVICE), torch.randn(O, C, 3, 3, device=DEVICE)
    p, q = torch.full((O,), 2.0, device=DEVICE), torch.zeros(O, device=DEVICE)
    with _LargestTensor() as mode:
        y, c, norm = scd2d_fwd(x, w, p, q, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1e-12, 1e-12)
    unfold_bytes = N * C * 9 * H * W * x.element_size()
    # x, y, or the B matrix (ŵ padded to 16×16 blocks: 9·16·16 floats here) at most
    assert mode.largest <= max(x.numel(), y.numel(), 9 * 16 * 16) * x.element_size()
    assert mode.largest * 8 <= unfold_bytes
    assert norm.shape == (N, 1, H, W) and norm.dtype == torch.float32


@gpu
@pytest.mark.parametrize("case", params([CASES_2D[0], CASES_2D[7], KERNEL_CASES[-1]]
                                         + NEW_PATH_CASES))
def test_bfloat16_matches_oracle(case):
    run_against_oracle(scd_triton.scd2d, case, torch.bfloat16, "triton", device=DEVICE)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 128, 28, 28, 128), (1, 256, 8, 8, 256)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_forward_on_wide_layers(shape, dtype, channels_last):
    """The 16-bit main config on realistic channel counts (the tiny cases above never reach it):
    its BK 64 / 3-stage variant computed wrong dots on an H200, caught only at this size."""
    N, C, H, W, O = shape
    x, w = torch.randn(N, C, H, W, dtype=dtype), torch.randn(O, C, 3, 3, dtype=dtype)
    p, q = torch.empty(O).uniform_(1.0, 3.0), torch.full((O,), 0.1)
    x_in = x.to(DEVICE).contiguous(memory_format=torch.channels_last if channels_last
                                   else torch.contiguous_format)
    y = scd_triton.scd2d(x_in, w.to(DEVICE), p.to(DEVICE), q.to(DEVICE), padding=1)
    ref = oracle.scd2d(x.double(), w.double(), p.double(), q.double(), padding=(1, 1, 1, 1))
    assert_close("y", y.cpu(), ref, dtype, reduce_dim=C * 9)


@gpu
@pytest.mark.parametrize("dtype, tile", [
    (torch.bfloat16, None), (torch.bfloat16, dict(BK=32, warps=4)),
    (torch.bfloat16, dict(BK=64, warps=4)), (torch.float32, None),
    (torch.float32, dict(BM=128, BN=64, warps=8))], ids=str)
def test_forward_is_deterministic_and_accurate_on_a_wide_layer(dtype, tile, monkeypatch):
    """Four identical no-grad calls on a ResNet-sized layer give the same bits, and match the
    oracle, with the shipped tiles and others. When the loop also squared the dot's x tile for
    Σs², they varied by ~1e-2 on an H200 (Triton 3.6): float32, and 16-bit with BK 64 or 4
    warps."""
    if tile:
        shipped = fwd.gemm_config
        names = ("BM", "BN", "BK", "FLAT_K", "warps", "stages")
        monkeypatch.setattr(fwd, "gemm_config", lambda *a: tuple(
            tile.get(n, v) for n, v in zip(names, shipped(*a))))
        fwd._plan.cache_clear()
    x, w, p, q = _square_layer(32, 128, 28, dtype)
    try:
        with torch.no_grad():
            ys = [scd_triton.scd2d(x, w, p, q, padding=1) for _ in range(4)]
    finally:
        fwd._plan.cache_clear()     # no plan of the patched tiles outlives the test
    assert all(torch.equal(y, ys[0]) for y in ys[1:])
    _assert_near_the_oracle(ys[0], x, w, p, q)


def _square_layer(N, C, side, dtype):
    """Seeded GPU inputs of a 3×3 C→C layer on ``side``² images: channels_last x, w, p, q."""
    torch.manual_seed(0)
    x = torch.randn(N, C, side, side, device=DEVICE, dtype=dtype)
    w = torch.randn(C, C, 3, 3, device=DEVICE, dtype=dtype)
    p = torch.empty(C, device=DEVICE).uniform_(1.0, 3.0)
    q = torch.full((C,), 0.1, device=DEVICE)
    return x.contiguous(memory_format=torch.channels_last), w, p, q


def _assert_near_the_oracle(y, x, w, p, q):
    """y of a padding-1 layer on its first two samples against the float64 oracle."""
    ref = oracle.scd2d(x[:2].double().cpu(), w.double().cpu(), p.double().cpu(),
                       q.double().cpu(), padding=(1, 1, 1, 1))
    err = ((y[:2].double().cpu() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if y.dtype == torch.bfloat16 else 2e-3), err   # TF32: ~9e-4


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_split_k_forward_is_deterministic_on_a_deep_layer(dtype, launched, monkeypatch):
    """3×3 512→512 7² b32 (100 tiles of 72 K steps) splits K on an H100/H200: four identical
    calls give the same bits (the parts are summed in split order, no atomics), close to the
    unsplit kernel and to the oracle."""
    x, w, p, q = _square_layer(32, 512, 7, dtype)
    with torch.no_grad():
        ys = [scd_triton.scd2d(x, w, p, q, padding=1) for _ in range(4)]
        assert any(made.constexprs["PARTIAL"] for made in launched
                   if made.kernel is fwd.scd2d_fwd_kernel), "no split on this GPU"
        single = unsplit(monkeypatch, fwd, lambda: scd_triton.scd2d(x, w, p, q, padding=1))
    assert all(torch.equal(y, ys[0]) for y in ys[1:])
    assert ((ys[0].double() - single.double()).norm() / single.double().norm()).item() < 1e-2
    _assert_near_the_oracle(ys[0], x, w, p, q)


@gpu
def test_tf32_follows_cudnn_flag():
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(4, 64, 16, 16, device=DEVICE)
    w = torch.randn(64, 64, 3, 3, device=DEVICE)
    tf32 = scd_triton.scd2d(x, w, 1.0, 0.0, padding=1)
    torch.backends.cudnn.allow_tf32 = False
    ieee = scd_triton.scd2d(x, w, 1.0, 0.0, padding=1)
    ref = scd_triton.scd2d(x.double(), w.double(), 1.0, 0.0, padding=1)
    err = lambda t: ((t.double() - ref).norm() / ref.norm()).item()
    assert err(ieee) < 1e-5 and 1e-5 < err(tf32) < 2e-3


@gpu
def test_int64_offsets_past_2_pow_31():
    x = torch.randn(33, 64, 1024, 1024, device=DEVICE, dtype=torch.bfloat16)  # 2.2e9 elements
    w = torch.randn(16, 64, 1, 1, device=DEVICE, dtype=torch.bfloat16)
    y = scd_triton.scd2d(x, w, 1.0, 0.0)
    tail = scd_triton.scd2d(x[-1:], w, 1.0, 0.0, backend="reference")
    torch.testing.assert_close(y[-1:], tail, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("W, kernel, padding", [(5, 3, (2, 1)), (6, 1, (1, 0))],
                         ids=["3x3-forward", "1x1-wgrad"])
def test_a_size_one_dimension_with_a_stride_past_int32(W, kernel, padding):
    """torch leaves a size-1 dimension's stride arbitrary: a channels-last x of height 1 whose
    H stride is 2**31 − 1 (an ``as_strided`` view), read through padding rows. A 3×3 kernel
    through padding 2 made the forward's int32 tap offsets wrap (the load faulted); the forward
    views it with stride 0 there. The backward reads the original x: its wgrad GEMM's cursor
    goes int64 (``WIDE``), where a 1×1 kernel through padding 1 had offsets 2**32 too large
    while only the sample term was widened. Forward and gradients against the float64
    reference."""
    base = torch.randn(30 * 16 * W, device=DEVICE)
    x = torch.as_strided(base, (30, 16, 1, W), (16 * W, 1, 2**31 - 1, 16))
    w = torch.randn(16, 16, kernel, kernel, device=DEVICE)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        y = scd_triton.scd2d(xx, ww, 2.0, 0.1, padding=padding, backend=backend)
        outs.append((y, *torch.autograd.grad(y, (xx, ww), torch.ones_like(y))))
    for name, got, want in zip(("y", "grad_x", "grad_w"), *outs):
        assert_close(name, got, want, torch.float32, grad=name != "y")


def test_strides_past_int32_within_a_sample_are_refused():
    """Strides of real dimensions that put offsets within a sample past int32 are refused with
    an error naming them (pure arithmetic: such a view needs 2**31 elements of storage);
    size-1 dimensions' strides are replaced, and ordinary strides are kept."""
    args = ((4, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    assert fwd._in_sample_strides((2, 16, 4, 4), (256, 1, 64, 16), *args) is None
    assert fwd._in_sample_strides((2, 16, 1, 4), (64, 1, 2**31 - 1, 16),
                                  (1, 4), *args[1:]) == (64, 1, 0, 16)
    with pytest.raises(ValueError, match=r"x's strides \(256, 1, 536870912, 16\)"):
        fwd._in_sample_strides((2, 16, 4, 4), (256, 1, 2**29, 16), *args)
