"""The kernel-normalisation kernels (kernels/weight.py) against float64 autograd of the formula."""
import pytest
import torch

from helpers import DEVICE, assert_close
from scd_triton.kernels.weight import TILE, normalize_weight, normalize_weight_backward



def _formula(w, q, mode, eps):
    """ŵ from its definition, in float64 (zero denominators as documented: ŵ = 0)."""
    w = w.double()
    n = (w.flatten(1).square().sum(1) + eps).sqrt()
    denom = n + q.double() if mode == "norm_q" else n
    scale = torch.where(denom == 0, torch.zeros_like(denom), 1 / denom)
    return w * scale.view(-1, 1, 1, 1) if mode != "none" else w


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode, eps", [("norm_q", 1e-12), ("norm", 0.0), ("norm", 1e-6), ("none", 0.0)])
def test_normalize_weight_and_its_jacobian(mode, eps, dtype, layout):
    """Any weight layout is read in place; grad_w comes in the weight's layout."""
    O, Cg, R, S = 6, 5, 3, 2
    w = torch.randn(O, Cg, R, S, dtype=torch.float64)
    q = torch.rand(O, dtype=torch.float64) * 0.3 if mode != "norm" else torch.rand(()).expand(O)
    w_dev = w.to(DEVICE, dtype).contiguous(memory_format=layout)
    w_hat = normalize_weight(w_dev, q.float().to(DEVICE), mode, eps)
    w_ref, q_ref = w.to(dtype).double().requires_grad_(), q.clone().requires_grad_()
    ref = _formula(w_ref, q_ref, mode, eps)
    assert w_hat.dtype == dtype and w_hat.is_contiguous()   # mode "none" too: a copy
    assert_close("w_hat", w_hat.cpu(), ref.detach(), dtype, reduce_dim=Cg * R * S)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    grad_w, grad_p, grad_q = normalize_weight_backward(grad.to(DEVICE, dtype).repeat(2, 1, 1, 1),
                                                       w_dev, q.float().to(DEVICE), mode, eps,
                                                       splits=2)
    assert grad_p is None
    assert grad_w.stride() == w_dev.stride()
    assert_close("grad_w", grad_w.cpu(), 2 * w_ref.grad, dtype, grad=True, reduce_dim=Cg * R * S)
    if mode == "norm_q":
        assert_close("grad_q", grad_q.cpu(), 2 * q_ref.grad, dtype, grad=True,
                     reduce_dim=Cg * R * S)
    else:
        assert grad_q is None
    # the prologue's per-block partial sums of grad_p and grad_q [rows, 2, O], summed in
    rows = TILE // 8 + 100    # more than one load of the kernel's [8, TILE / 8] tiles
    partials = torch.randn(rows, 2, O, device=DEVICE)
    _, grad_p, grad_q = normalize_weight_backward(grad.to(DEVICE, dtype), w_dev,
                                                  q.float().to(DEVICE), mode, eps,
                                                  partials=partials)
    sums = partials.double().sum(0).cpu()
    torch.testing.assert_close(grad_p.cpu().double(), sums[0], rtol=1e-5, atol=1e-5)
    expected_q = sums[1] + (q_ref.grad if mode == "norm_q" else 0)
    assert_close("grad_q with partials", grad_q.cpu(), expected_q, dtype, grad=True,
                 reduce_dim=Cg * R * S)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["norm_q", "none"])
@pytest.mark.parametrize("writer", ["normalize_weight", "normalize_weight_backward"])
def test_writes_into_any_layout(writer, mode, layout):
    """ŵ lands at the strides the GEMM asks for: here [G, R·S, C/G, O/G] for 2 groups, from the
    forward's kernel or as the Jacobian kernel's side output (for the dgrad), from a weight of
    either layout."""
    G, Og, Cg, R, S = 2, 3, 4, 3, 3
    w = torch.randn(G * Og, Cg, R, S, device=DEVICE).contiguous(memory_format=layout)
    q = torch.full((G * Og,), 0.1, device=DEVICE)
    out = torch.full((G, R * S, Cg, Og), float("nan"), device=DEVICE)
    strides = (R * S * Cg * Og, 1, Og, Cg * Og)
    if writer == "normalize_weight":
        normalize_weight(w, q, mode, 1e-12, out=out, out_strides=strides, groups=G)
    else:
        normalize_weight_backward(torch.ones_like(w), w, q, mode, 1e-12, w_hat=out,
                                  w_hat_strides=strides, groups=G)
    ref = _formula(w.cpu(), q.cpu(), mode, 1e-12).float()
    expected = ref.reshape(G, Og, Cg, R * S).permute(0, 3, 2, 1)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-6, atol=1e-6)


def test_kernel_rows_longer_than_one_chunk():
    """A row of K = C/G·R·S > TILE / 8 runs through several [8, TILE / 8] chunks in both
    kernels (Σw², Σ grad_ŵ·w and the writes), and both give the dgrad's ŵ with the same bits."""
    O, Cg, R, S = 3, TILE // 8 // 9 + 7, 3, 3
    assert Cg * R * S > TILE // 8
    w = torch.randn(O, Cg, R, S, device=DEVICE)
    q = torch.rand(O, device=DEVICE)
    strides = (R * S * Cg * O, 1, O, Cg * O)        # [1, R·S, C, O] as the dgrad reads it
    w_hats = [torch.full((1, R * S, Cg, O), float("nan"), device=DEVICE) for _ in range(2)]
    normalize_weight(w, q, "norm_q", 1e-12, out=w_hats[0], out_strides=strides)
    grad = torch.randn(O, Cg, R, S, device=DEVICE)
    grad_w, _, grad_q = normalize_weight_backward(grad, w, q, "norm_q", 1e-12, w_hat=w_hats[1],
                                                  w_hat_strides=strides)
    w_ref, q_ref = w.cpu().double().requires_grad_(), q.cpu().double().requires_grad_()
    ref = _formula(w_ref, q_ref, "norm_q", 1e-12)
    ref.backward(grad.cpu().double())
    expected = ref.detach().reshape(1, O, Cg, R * S).permute(0, 3, 2, 1)
    assert_close("w_hat", w_hats[0].cpu(), expected, torch.float32, reduce_dim=Cg * R * S)
    assert torch.equal(w_hats[0], w_hats[1])
    assert_close("grad_w", grad_w.cpu(), w_ref.grad, torch.float32, grad=True,
                 reduce_dim=Cg * R * S)
    assert_close("grad_q", grad_q.cpu(), q_ref.grad, torch.float32, grad=True,
                 reduce_dim=Cg * R * S)


def test_zero_and_nan_kernels():
    w = torch.randn(3, 2, 3, 3, device=DEVICE)
    w[0] = 0
    w[2, 1, 1, 1] = float("nan")
    q = torch.zeros(3, device=DEVICE)
    w_hat = normalize_weight(w, q, "norm", 0.0)
    assert (w_hat[0] == 0).all()
    assert torch.isfinite(w_hat[1]).all() and torch.isnan(w_hat[2]).all()
    grad_w, _, _ = normalize_weight_backward(torch.ones_like(w), w, q, "norm", 0.0)
    assert (grad_w[0] == 0).all() and torch.isfinite(grad_w[1]).all()
    assert torch.isnan(grad_w[2]).all()


@pytest.mark.parametrize("Cg, flat_k", [(5, False), (3, True), (20, False)])
def test_padded_gemm_rows_are_zeroed(Cg, flat_k):
    """The forward's B matrix, K-major [G, padded O/G, padded K]: ŵ at its (tap, channel)
    columns, 0 in the padded K (which multiplies x's zero-masked channels: garbage there could
    be NaN), padded output channels untouched."""
    from scd_triton.kernels.fwd import _gemm_weight_layout
    G, Og, R, S, BN, BK = 2, 3, 3, 3, 16, 16
    shape, out_strides, slots = _gemm_weight_layout(G * Og, Cg, R, S, G, BN, BK, flat_k)
    w = torch.randn(G * Og, Cg, R, S, device=DEVICE)
    q = torch.full((G * Og,), 0.1, device=DEVICE)
    out = torch.full(shape, float("nan"), device=DEVICE)
    normalize_weight(w, q, "norm_q", 1e-12, out=out, out_strides=out_strides, groups=G,
                     slots=slots)
    ref = _formula(w.cpu(), q.cpu(), "norm_q", 1e-12).float().reshape(G, Og, Cg, R * S)
    taps = ref.permute(0, 1, 3, 2)                                        # [G, Og, taps, Cg]
    if not flat_k:      # each tap's channels padded to a multiple of BK
        taps = torch.nn.functional.pad(taps, (0, shape[2] // (R * S) - Cg))
    expected = torch.zeros(G, Og, shape[2])
    expected[..., :taps.shape[2] * taps.shape[3]] = taps.reshape(G, Og, -1)
    got = out.cpu()
    torch.testing.assert_close(got[:, :Og], expected, rtol=1e-6, atol=1e-6)
    assert torch.isnan(got[:, Og:]).all()


def test_dense_weights_are_read_in_their_memory_order():
    """A contiguous weight is read by its flat (channel, tap) index, a channels_last one by its
    flat (tap, channel) index (vector loads both); a weight of other strides, or slots that are
    not the weight's own in the (channel, tap) write loop, through its strides."""
    from scd_triton.kernels.fwd import _gemm_weight_layout
    from scd_triton.kernels.weight import _backward_args, normalize_args, w_order
    w = torch.empty(32, 16, 3, 3)
    cl = w.contiguous(memory_format=torch.channels_last)
    strided = w[:, ::2]
    assert [w_order(t.shape, t.stride()) for t in (w, cl, strided)] == [1, 2, 0]

    def order(w, flat_k):
        shape, out_strides, slots = _gemm_weight_layout(32, w.shape[1], 3, 3, 1, 32, 16, flat_k)
        return normalize_args(w.shape, w.stride(), 1, "norm", 0.0, 1, out_strides,
                              slots)[2]["W_ORDER"]

    assert (order(w, False), order(cl, False)) == (1, 2)    # the forward's B (tap-major)
    narrow = torch.empty(32, 3, 3, 3)         # 27 (channel, tap) rows padded to 32: 11 slots
    for t, slots, want in ((cl, None, 2), (cl, (32, 9, 32 * 9), 0), (narrow, (3, 11, 32), 0)):
        Cg = t.shape[1]     # the dgrad's ŵ [R·S, C/G, O], written in (channel, tap) slots
        got = normalize_args(t.shape, t.stride(), 1, "norm", 0.0, 1, (32 * Cg * 9, 1, 32, 32 * Cg),
                             slots)[2]["W_ORDER"]
        assert got == want, (t.shape, slots)
    assert _backward_args(cl.shape, cl.stride(), 1, "norm", 0.0, False, 0, 1, None)[2][
        "W_ORDER"] == 2


@pytest.mark.parametrize("w_hat_out", [False, True])
def test_gpu_blocks_of_the_jacobian_give_the_same_gradients(monkeypatch, w_hat_out):
    """A GPU launch spreads the Jacobian over more programs (4 channels each where ŵ is stored
    along channels, else 1) and takes a row of K = 1350 in one chunk instead of two: forced here,
    it gives the interpreter's blocks' gradients and ŵ (up to the order of the sums)."""
    from scd_triton.kernels import weight
    O, Cg, R, S = 6, 150, 3, 3
    w = torch.randn(O, Cg, R, S, device=DEVICE)
    q = torch.rand(O, device=DEVICE)
    grad = torch.randn(2, O, Cg, R, S, device=DEVICE)        # two split-K partial sums
    partials = torch.randn(5, 2, O, device=DEVICE)
    strides = (R * S * Cg * O, 1, O, Cg * O)                 # the dgrad's [1, R·S, C, O]

    def run():
        w_hat = torch.full((1, R * S, Cg, O), float("nan"), device=DEVICE) if w_hat_out else None
        grads = normalize_weight_backward(grad.clone(), w, q, "norm_q", 1e-12, splits=2,
                                          partials=partials, w_hat=w_hat,
                                          w_hat_strides=strides if w_hat_out else None)
        return (*grads, w_hat)

    expected = run()
    args = weight._backward_args.__wrapped__
    blocks = args((O, Cg, R, S), w.stride(), 1, "norm_q", 1e-12, True, 5, 1,
                  strides if w_hat_out else None, True)
    assert (blocks[0], blocks[2]["BO"], blocks[2]["BK"]) == (((2,), 4, 2048) if w_hat_out else
                                                             ((6,), 1, 2048))
    monkeypatch.setattr(weight, "_backward_args",
                        lambda *a, **k: args(*a, **dict(k, spread=True)))
    for got, want in zip(run(), expected):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("splits", [3, 100])
def test_gpu_blocks_of_the_split_sum(monkeypatch, splits):
    """On a GPU the workspace's splits are summed in programs of 64 elements, up to 64 splits
    a load (100 splits: two loads): forced here, the sum is the splits' sum."""
    from scd_triton.kernels import weight
    blocks = weight._sum_splits_blocks
    assert blocks(135, 100, True) == (64, 64) and blocks(135, 100, False) == (16, 256)
    monkeypatch.setattr(weight, "_sum_splits_blocks", lambda n, s, spread: blocks(n, s, True))
    w = torch.randn(5, 3, 3, 3, device=DEVICE)
    parts = torch.randn(splits, 5, 3, 3, 3, device=DEVICE)
    grad_w, _, _ = normalize_weight_backward(parts.clone(), w, torch.zeros(5, device=DEVICE),
                                             "none", 0.0, splits=splits)
    torch.testing.assert_close(grad_w, parts.double().sum(0).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("mode", ["norm_q", "norm", "none"])
def test_a_tap_major_workspace_gives_the_same_gradients(mode, layout):
    """The GEMM wgrad stores its workspace tap-major, [splits, O, R, S, C/G] (16-byte stores
    along channels); the Jacobian reads it so and gives the bits it gives for the same values
    in [splits, O, C/G, R, S] order, split sum included, for a weight of either layout."""
    w = torch.randn(6, 5, 3, 2, device=DEVICE).contiguous(memory_format=layout)
    q = torch.rand(6, device=DEVICE) * 0.3
    parts = torch.randn(3, 6, 5, 3, 2, device=DEVICE)
    want = normalize_weight_backward(parts.clone(), w, q, mode, 1e-6, splits=3)
    got = normalize_weight_backward(parts.permute(0, 1, 3, 4, 2).contiguous(), w, q, mode, 1e-6,
                                    splits=3, tap_major=True)
    for g, h in zip(got, want):
        assert (g is None) == (h is None)
        if h is not None:
            torch.testing.assert_close(g, h, rtol=0, atol=0)
