"""The reference backend (the CPU path) against the independent float64 unfold oracle."""
import subprocess
import sys

import pytest
import torch

import oracle
import scd_triton
from cases import CASES_2D, Case, params, run_against_oracle
from helpers import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", params(CASES_2D))
def test_scd2d_matches_oracle(case, dtype):
    run_against_oracle(scd_triton.scd2d, case, dtype, "reference")


@pytest.mark.parametrize("case", params(CASES_2D[:3]))
def test_scd2d_normalized_matches_oracle(case):
    run_against_oracle(scd_triton.scd2d_normalized, case, torch.float32, "reference", normalized=True)


@pytest.mark.parametrize("case", params([CASES_2D[0], CASES_2D[4], CASES_2D[7]]))
def test_channels_last_matches_oracle(case):
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "reference", channels_last=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("side", [8, 24], ids=["pow", "exp-ln"])
def test_both_forms_of_the_power_match_oracle(side, dtype):
    """The forward takes (|c|+eps)^p as one pow up to ``POW_MAX_ELEMENTS`` outputs (host time)
    and as exp(p·ln(|c|+eps)) beyond (time per element): both match the oracle."""
    from scd_triton.reference import POW_MAX_ELEMENTS
    case = Case(2, 4, side, side, 4, (3, 3), padding=1)
    assert (2 * 4 * side * side <= POW_MAX_ELEMENTS) == (side == 8)
    run_against_oracle(scd_triton.scd2d, case, dtype, "reference")


# (case, limit on pooled elements, forward pooled, backward pooled): a box sum over one plane a
# sample (more than 3 channels a group, summed first) at dilation 1 with padding within half
# the kernel is a pooling, the forward's up to POOL_MAX_ELEMENTS elements, the backward's at
# stride 1 where k − 1 − p is within half the kernel too; the others convolutions
BOX_SUM_CASES = [
    (Case(2, 5, 9, 8, 4, (3, 3), padding=1), None, True, True),
    (Case(2, 5, 9, 8, 4, (3, 3), stride=2, padding=1), None, True, False),
    (Case(2, 5, 9, 8, 4, (3, 3)), None, True, False),                  # k − 1 − p = 2
    (Case(2, 5, 9, 8, 4, (2, 2), padding="same"), None, True, True),   # (0, 1) padded first
    (Case(2, 5, 9, 8, 4, (1, 3), padding=(0, 1)), None, True, True),
    (Case(2, 5, 9, 8, 4, (3, 3), padding=2, dilation=2), None, False, False),
    (Case(2, 8, 9, 8, 4, (3, 3), padding=1, groups=2), None, False, False),
    (Case(2, 5, 9, 8, 4, (3, 3), padding=1), 2 * 9 * 8 - 1, False, True),
]


@pytest.mark.parametrize("case, limit, forward_pooled, backward_pooled",
                         [pytest.param(*c, id=f"{c[0].id}-limit{c[1]}") for c in BOX_SUM_CASES])
def test_pooled_and_convolved_box_sums_match_oracle(case, limit, forward_pooled, backward_pooled,
                                                    monkeypatch):
    """The patch norms' box sum and its adjoint run as ``avg_pool2d`` (divisor 1) where it
    applies and pays on CPU, else as convolutions: each way, output and gradients match the
    oracle, and the pooling runs where it should."""
    from scd_triton import reference
    if limit is not None:
        monkeypatch.setattr(reference, "POOL_MAX_ELEMENTS", limit)
    pool, pooled = torch.nn.functional.avg_pool2d, []
    monkeypatch.setattr(torch.nn.functional, "avg_pool2d",
                        lambda *args, **kwargs: pooled.append(1) or pool(*args, **kwargs))
    forward = []
    monkeypatch.setattr(reference, "scd2d_bwd", lambda *args, bwd=reference.scd2d_bwd, **kwargs:
                        forward.append(len(pooled)) or bwd(*args, **kwargs))
    run_against_oracle(scd_triton.scd2d, case, torch.float64, "reference")
    assert forward, "the backward did not run"
    assert (forward[0], len(pooled) - forward[0]) == (int(forward_pooled), int(backward_pooled))


def test_the_forward_takes_int_stride_and_dilation():
    """The reference forward takes conv2d's int-or-pair stride and dilation (its box sums'
    pooling checks read them as pairs)."""
    from scd_triton import reference
    x, w = torch.randn(2, 5, 8, 8), torch.randn(4, 5, 3, 3)
    p, q = torch.full((4,), 2.0), torch.full((4,), 0.1)
    outs = [reference.scd2d_fwd(x, w, p, q, s, (1, 1, 1, 1), s, 1, 1e-12, 1e-12, "norm_q", 1e-12)
            for s in (1, (1, 1))]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_strided_one_by_one_channels_last_backward_does_not_corrupt_memory():
    """torch 2.13's oneDNN weight gradient of a strided 1×1 convolution of a channels-last
    input with 7–15 channels corrupts the heap (F.conv2d's backward crashes alike); the
    reference backward gives it x's NCHW copy. A child process runs the loop that crashed."""
    code = ("import torch, scd_triton\n"
            "for _ in range(3000):\n"
            "    x = torch.randn(3, 7, 9, 14).contiguous(memory_format=torch.channels_last)\n"
            "    w = torch.randn(3, 7, 1, 1, requires_grad=True)\n"
            "    x.requires_grad_()\n"
            "    scd_triton.scd2d(x, w, 2.0, 0.1, stride=(3, 1), backend='reference')"
            ".sum().backward()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    case = Case(3, 7, 9, 14, 3, (1, 1), stride=(3, 1))
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "reference", channels_last=True)


@pytest.mark.parametrize("padding", [1, (2, 0)], ids=["padded", "padded-rows"])
def test_strided_one_by_one_channels_last_gradients_with_padding(padding):
    """The NCHW copy of the heap-corruption workaround is not a padded x: with symmetric
    padding (applied by the convolutions, not to x) grad_x was cropped as if it were, and
    autograd refused its shape (found by a helper's fuzzing)."""
    case = Case(2, 8, 6, 7, 4, (1, 1), stride=2, padding=padding)
    run_against_oracle(scd_triton.scd2d, case, torch.float32, "reference", channels_last=True)


@pytest.mark.parametrize("eps", [0.0, 1e-80], ids=["eps0", "sqrt-eps-subnormal"])
def test_zero_kernel_norm_gives_scale_zero_where_sqrt_eps_is_not_a_normal_float(eps):
    """An all-zero kernel with q = 0 and sqrt(eps) 0 or subnormal in float32 (1/denominator
    inf or overflowing): scale 0 and ŵ = 0, not NaN; an Inf tap makes its kernel's scale NaN."""
    from scd_triton.reference import normalize_weight
    w = torch.randn(3, 2, 3, 3)
    w[1] = 0
    w[2, 0, 1, 1] = float("inf")
    w_hat, scale = normalize_weight(w, torch.zeros(3), "norm", eps)
    assert scale[1] == 0 and (w_hat[1] == 0).all()
    assert scale[2].isnan() and w_hat[2].isnan().all()
    assert torch.isfinite(w_hat[0]).all() and scale[0] > 0


@pytest.mark.parametrize("mode", ["norm", "norm_q"])
def test_the_forwards_divided_kernels_equal_the_scaled_ones(mode):
    """Without ``need_scale`` (the forward) ŵ is ``weight / denominator``, one op fewer than
    ``weight · (1 / denominator)``: the same within rounding, and an Inf tap or a norm that
    overflows (finite taps of 1e30 in float32) makes the whole kernel NaN both ways."""
    from scd_triton.reference import normalize_weight
    w, q = torch.randn(4, 3, 3, 3), torch.rand(4)
    w[2, 0, 1, 1] = float("inf")
    w[3] = 1e30
    scaled, scale = normalize_weight(w, q, mode, 1e-12)
    divided, none = normalize_weight(w, q, mode, 1e-12, need_scale=False)
    assert none is None and scale is not None
    torch.testing.assert_close(divided[:2], scaled[:2], rtol=2e-7, atol=0)
    assert scaled[2:].isnan().all() and divided[2:].isnan().all()


def test_float16_matches_oracle():
    run_against_oracle(scd_triton.scd2d, CASES_2D[0], torch.float16, "reference")


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    (1, 0, 1, 1), (2, 1, 1, 1), (1, "same", 2, 2), (3, 2, 1, 4), (2, "valid", 1, 1)])
def test_scd1d_matches_oracle(stride, padding, dilation, groups):
    x = torch.randn(2, 4, 13, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, requires_grad=True)
    p, q = torch.tensor(1.7, requires_grad=True), torch.rand(8).requires_grad_()
    y = scd_triton.scd1d(x, w, p, q, stride, padding, dilation, groups, backend="reference")
    pads = (oracle.same_padding((1, 3), (1, dilation)) if padding == "same" else
            (0,) * 4 if padding == "valid" else (0, 0, padding, padding))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, p, q)]
    ref = oracle.scd2d(leaves[0].unsqueeze(2), leaves[1].unsqueeze(2), leaves[2], leaves[3],
                       stride=(1, stride), padding=pads, dilation=(1, dilation), groups=groups)
    assert_close("y", y, ref.squeeze(2), torch.float32, reduce_dim=12)
    g = torch.randn_like(ref.squeeze(2))
    y.backward(g.float())
    ref.squeeze(2).backward(g)
    for name, got, want in zip("xwpq", (x, w, p, q), leaves):
        assert_close(f"grad_{name}", got.grad, want.grad, torch.float32, grad=True, reduce_dim=96)


@pytest.mark.parametrize("case", params([
    Case(1, 2, 5, 5, 3, (3, 3), padding=1),
    Case(2, 4, 4, 5, 4, (2, 3), stride=2, padding=(1, 0), groups=2,
         per_channel=False),
    Case(1, 2, 5, 4, 2, (3, 3), padding="same", dilation=1, groups=2),
]))
def test_gradcheck_float64(case):
    x = torch.randn(case.N, case.C, case.H, case.W, dtype=torch.float64, requires_grad=True)
    w = torch.randn(case.O, case.C // case.groups, *case.kernel, dtype=torch.float64,
                    requires_grad=True)
    shape = (case.O,) if case.per_channel else ()
    p = torch.empty(shape, dtype=torch.float64).uniform_(1.2, 2.5).requires_grad_()
    q = torch.empty(shape, dtype=torch.float64).uniform_(0.05, 0.3).requires_grad_()
    fn = lambda *a: scd_triton.scd2d(*a, eps=1e-6, norm_eps=1e-6, backend="reference",
                                     **case.conv_kwargs())
    assert torch.autograd.gradcheck(fn, (x, w, p, q))


def _orthogonal_inputs():
    """x lives in channel 1, every kernel in channel 0: d = 0 exactly on non-zero patches."""
    x = torch.zeros(1, 2, 6, 6)
    x[:, 1] = torch.randn(6, 6)
    x[:, :, :, 4:] = 0                      # and a band of all-zero patches
    w = torch.zeros(3, 2, 3, 3)
    w[:, 0] = torch.randn(3, 3, 3)
    return x, w


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_zero_dot_and_zero_patches(p):
    x, w = _orthogonal_inputs()
    x.requires_grad_()
    w.requires_grad_()
    pt, qt = torch.tensor(p, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    y = scd_triton.scd2d(x, w, pt, qt, padding=1, backend="reference")
    assert (y == 0).all(), "d = 0 and all-zero patches must give exactly 0"
    y.backward(torch.randn_like(y))
    for name, t in (("x", x), ("w", w), ("p", pt), ("q", qt)):
        assert torch.isfinite(t.grad).all(), f"grad_{name} not finite"
    assert (pt.grad == 0).all() and (qt.grad == 0).all()


def test_p_near_one_matches_oracle():
    case = Case(2, 3, 6, 6, 4, (3, 3), padding=1, per_channel=False)
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    p, q = torch.tensor(1.0 + 1e-4, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    y = scd_triton.scd2d(x, w, p, q, padding=1, backend="reference")
    ref = oracle.scd2d(x.double(), w.double(), p.detach().double(), q.detach().double(),
                       **case.oracle_kwargs())
    assert_close("y", y, ref, torch.float32, reduce_dim=27)


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend="reference")
    assert y.shape == (0, 4, 8, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape and (w.grad == 0).all()


def test_saves_only_x_w_c_and_norms():
    """Saved for backward: x, ŵ, c (output-sized) and norms, not the formula's temporaries."""
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    saved = []
    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = scd_triton.scd2d_normalized(x, w, torch.tensor(2.0), torch.tensor(0.1), padding=1,
                                        backend="reference")
    big = [t for t in saved if t.numel() >= y.numel()]
    assert len(big) == 1 and big[0].shape == y.shape, [tuple(t.shape) for t in saved]


def test_autocast_runs_in_autocast_dtype():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend="reference")
        conv = torch.nn.functional.conv2d(x, w, padding=1)
    assert y.dtype == conv.dtype == torch.bfloat16
    ref = oracle.scd2d(x.bfloat16().double(), w.bfloat16().double(), torch.tensor(2.0),
                       torch.tensor(0.1), padding=(1, 1, 1, 1))
    assert_close("y", y, ref, torch.bfloat16, reduce_dim=27)


@pytest.mark.xfail(strict=True, reason="where patches align with their kernels (|c| -> 1) "
                   "grad_x's two terms cancel and amplify the 16-bit rounding of c and ŵ "
                   "(README, Not done yet; python -m bench.aligned_patches)")
def test_bfloat16_grad_x_where_patches_align_with_kernels():
    """Every pixel is one of four 64-channel 1×1 kernels, scaled, plus 1% noise (|c| ≈ 0.99, as
    matched features give), p = 3: grad_x = G/a·(ŵ − c·s/‖s‖) nearly cancels, and the
    bfloat16 reference backend's grad_x is 3.1e-2 off the float64 oracle (with noise as large
    as the kernels: 4.8e-3). Strict: a fix makes this pass and must drop the mark."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, 1, 1, generator=gen).bfloat16()
    kernel_of = torch.randint(0, 4, (4, 8, 8), generator=gen)
    x = (w.float()[kernel_of, :, 0, 0].permute(0, 3, 1, 2)
         * (torch.rand(4, 1, 8, 8, generator=gen) + 0.5)
         + 0.01 * torch.randn(4, 64, 8, 8, generator=gen)).bfloat16()
    p, q = torch.full((4,), 3.0), torch.full((4,), 0.05)
    grad_y = torch.randn(4, 4, 8, 8, generator=gen).bfloat16()
    xb = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(scd_triton.scd2d(xb, w, p, q, backend="reference"), xb, grad_y)
    xd = x.double().requires_grad_()
    (want,) = torch.autograd.grad(oracle.scd2d(xd, w.double(), p.double(), q.double()), xd,
                                  grad_y.double())
    assert_close("grad_x", got, want, torch.bfloat16, grad=True)
