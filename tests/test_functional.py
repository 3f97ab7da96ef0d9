"""Behaviour of the public functions that users rely on, on every backend: NaN propagation,
all-zero kernels, autocast chains, zero channels, and what nothing-requires-grad calls store."""
import pytest
import torch

import oracle
import scd_triton
from helpers import DEVICE, assert_close
from scd_triton.functional import scd_nd

BACKENDS = ["reference", "triton"]


@pytest.fixture(autouse=True)
def _ieee_float32(no_tf32):
    """float32 kernels compared with float64 use IEEE dots."""


def _leaves(*tensors):
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def _patch_mask(shape, where, kernel=3, padding=1):
    """Output positions [OH, OW] whose 3×3 padded patch contains input position ``where``."""
    marker = torch.zeros(1, 1, *shape, dtype=torch.float64)
    marker[0, 0][where] = 1
    hit = torch.nn.functional.conv2d(marker, torch.ones(1, 1, kernel, kernel, dtype=torch.float64),
                                     padding=padding)
    return hit[0, 0] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_x_reaches_exactly_the_outputs_whose_patch_has_it(backend, bad):
    x, w = torch.randn(2, 3, 6, 7), torch.randn(4, 3, 3, 3)
    x[1, 2, 3, 4] = bad
    x, w, p, q = _leaves(x, w, torch.full((4,), 1.5), torch.full((4,), 0.1))
    y = scd_triton.scd2d(x, w, p, q, padding=1, backend=backend)
    reached = _patch_mask((6, 7), (3, 4)).to(DEVICE)
    assert torch.isnan(y[1][:, reached]).all(), "NaN/Inf in a patch must give NaN"
    assert torch.isfinite(y[1][:, ~reached]).all() and torch.isfinite(y[0]).all()
    y.backward(torch.ones_like(y))
    assert torch.isnan(x.grad[1]).any() and torch.isfinite(x.grad[0]).all()
    for name, t in (("w", w), ("p", p), ("q", q)):
        assert torch.isnan(t.grad).all(), f"grad_{name} must be NaN: every kernel saw the NaN patch"


# layers with input pixels that no patch reads: (x shape, weight shape, conv arguments)
UNREAD_LAYERS = {
    "1x1-stride-2": ((2, 16, 6, 6), (16, 16, 1, 1), dict(stride=2)),
    "1x1-stride-2-depthwise": ((2, 16, 6, 6), (16, 1, 1, 1), dict(stride=2, groups=16)),
    "3x3-stride-3-last-row-and-column": ((2, 16, 7, 7), (16, 16, 3, 3), dict(stride=3)),
    "dilation-gap": ((2, 16, 7, 7), (16, 16, 2, 2), dict(dilation=4)),
    "same-padding-dilation-gap": ((2, 16, 5, 5), (16, 16, 2, 2),
                                  dict(padding="same", dilation=8)),
    "depthwise-stride-4": ((2, 16, 7, 8), (16, 1, 3, 3), dict(stride=4, padding=1, groups=16)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", UNREAD_LAYERS)
def test_a_pixel_no_patch_reads_gets_zero_gradient_also_when_it_holds_nan_or_inf(backend, layer):
    """As for conv2d, the output never sees such a pixel: its gradient is 0 whatever it holds
    (the x term of grad_x, x ⊙ Σ grad_‖s‖/‖s‖ over its patches, gave x·0 = NaN), and the other
    gradients are those of the float64 oracle at finite values."""
    x_shape, w_shape, conv = UNREAD_LAYERS[layer]
    torch.manual_seed(0)
    x, w = torch.randn(x_shape, dtype=torch.float64), torch.randn(w_shape, dtype=torch.float64)
    # how many patches hold each pixel: conv2d's input gradient of a ones kernel
    ones = torch.ones(x_shape[1], *w_shape[1:], dtype=torch.float64, requires_grad=True)
    probe = x.clone().requires_grad_()
    torch.nn.functional.conv2d(probe, ones, groups=conv.get("groups", 1),
                               **{k: v for k, v in conv.items() if k != "groups"}).sum().backward()
    unread = probe.grad == 0
    assert unread.any() and not unread.all()
    bad = x.clone()
    bad[0][unread[0]] = float("nan")
    bad[1][unread[1]] = float("inf")
    p, q = torch.full((16,), 2.0, dtype=torch.float64), torch.full((16,), 0.1, dtype=torch.float64)
    oracle_conv = _oracle_conv(conv, w_shape)
    grad_y = torch.randn(oracle.scd2d(x, w, p, q, **oracle_conv).shape, dtype=torch.float64)
    got = _leaves(bad.float(), w.float(), p.float(), q.float())
    y = scd_triton.scd2d(*got, backend=backend, **conv)
    assert torch.isfinite(y).all()
    y.backward(grad_y.float().to(DEVICE))
    ref = [t.requires_grad_() for t in (x, w, p, q)]
    oracle.scd2d(*ref, **oracle_conv).backward(grad_y)
    assert (got[0].grad.cpu()[unread] == 0).all()
    for name, g, r in zip("xwpq", got, ref):
        assert_close(f"grad_{name}", g.grad.cpu(), r.grad, torch.float32, grad=True,
                     reduce_dim=9)


def _oracle_conv(conv, w_shape):
    """The oracle's (stride, padding, dilation, groups) for scd2d's arguments ``conv``."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    dilation = pair(conv.get("dilation", 1))
    padding = conv.get("padding", 0)
    padding = (oracle.same_padding(w_shape[2:], dilation) if padding == "same"
               else (padding,) * 4)
    return dict(stride=pair(conv.get("stride", 1)), padding=padding, dilation=dilation,
                groups=conv.get("groups", 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_p_gives_nan_in_its_channel_also_where_cos_is_one(backend):
    """A NaN in a tensor p reaches every output of its channel, also where |c| + eps is
    exactly 1 (here: 1×1 kernels, eps = 0, every patch parallel to both kernels), where
    IEEE pow(1, NaN) is 1."""
    x = torch.full((1, 1, 3, 3), 2.0, device=DEVICE)
    w = torch.tensor([3.0, -3.0], device=DEVICE).view(2, 1, 1, 1)
    p = torch.tensor([float("nan"), 2.0], device=DEVICE)
    y = scd_triton.scd2d(x, w, p, 0.0, eps=0.0, norm_eps=0.0, backend=backend)
    assert torch.isnan(y[:, 0]).all()
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], -1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_kernel_gives_nan_in_its_channel(backend, bad):
    """Every output of the channel, also where the bad tap falls on padding (an infinite
    kernel norm makes the whole normalised kernel NaN, not zero)."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    w[2, 1, 0, 0] = bad
    x, w, p, q = _leaves(x, w, torch.full((4,), 2.0), torch.full((4,), 0.1))
    y = scd_triton.scd2d(x, w, p, q, padding=1, backend=backend)
    assert torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, [0, 1, 3]]).all()
    y.backward(torch.ones_like(y))
    assert torch.isnan(w.grad[2]).all() and torch.isfinite(w.grad[[0, 1, 3]]).all()
    assert torch.isnan(x.grad).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_kernel_matches_nothing_and_gets_no_gradient(backend):
    """With no eps or q on the kernel norm (the Rohrer layer), an all-zero kernel gives y = 0 and a
    zero gradient for that kernel, on every backend; the other kernels are unaffected."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    w[1] = 0
    x, w, p, q = _leaves(x, w, torch.full((4,), 2.0), torch.tensor(0.1))
    y = scd_nd(x, w, p, q, 1, 1, 1, 1, 1e-6, 1e-6, backend, 2, weight_norm="norm",
               weight_norm_eps=0.0)
    assert (y[:, 1] == 0).all()
    w_hat = w.detach().double().cpu()
    w_hat = w_hat / w_hat.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, 1, 1, 1)
    ref = oracle.scd2d_normalized(x.detach().double().cpu(), w_hat, p.detach().double().cpu(),
                                  q.detach().double().cpu(), padding=(1, 1, 1, 1), eps=1e-6,
                                  norm_eps=1e-6)
    assert_close("y", y.detach().cpu(), ref, torch.float32, reduce_dim=27)
    y.backward(torch.randn_like(y))
    assert (w.grad[1] == 0).all()
    for name, t in (("x", x), ("w", w), ("p", p), ("q", q)):
        assert torch.isfinite(t.grad).all(), f"grad_{name} not finite"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_chain_of_layers_runs_like_conv2d(dtype):
    device = DEVICE
    if device == "cpu" and dtype == torch.float16 and not torch.backends.mkldnn.is_available():
        pytest.skip("no float16 CPU autocast")
    torch.manual_seed(0)
    net = torch.nn.Sequential(scd_triton.SCD2d(3, 8, 3, padding=1), scd_triton.MaxAbsPool2d(2),
                              scd_triton.SCD2d(8, 4, 3, padding=1, parameterization="pisoni"))
    convs = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3))
    net, convs = net.to(device), convs.to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(device, dtype=dtype):
        y = net(x)
        y_conv = convs(x)
    assert y.dtype == y_conv.dtype == dtype
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in net.parameters())
    with torch.no_grad():
        full = net(x)
    err = ((y.float() - full).norm() / full.norm()).item()
    # two layers of 8-bit (bf16) or 11-bit (fp16) mantissas, sharpened by p up to 3
    assert err < 6e-2, f"autocast chain drifts from float32: {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_input_channels_give_zeros(backend):
    """Every sum is 0 (the triton backend hands such a call to the reference)."""
    x, w = _leaves(torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3))
    y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend=backend)
    assert y.shape == (2, 3, 5, 5) and (y == 0).all()
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_without_grad_stores_only_y(backend):
    """With nothing requiring grad the forward returns no c / norm (the custom op returns empty
    ones): only y is written."""
    x, w = torch.randn(2, 4, 6, 6, device=DEVICE), torch.randn(5, 4, 3, 3, device=DEVICE)
    p, q = torch.full((5,), 2.0, device=DEVICE), torch.full((5,), 0.1, device=DEVICE)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, 1e-12, 1e-12, "norm_q", 1e-12, backend)
    y, c, norm = scd_triton.ops.forward(x, w, p, q, *args, False)
    assert c is None and norm is None
    _, c, norm = torch.ops.scd_triton.scd2d_core(x, w, p, q, *args, False)
    assert c.shape == (0,) and norm.shape == (0,) and norm.dtype == torch.float32
    y_saved, c, norm = scd_triton.ops.forward(x, w, p, q, *args, True)
    assert c.shape == y.shape and norm.shape == (2, 1, 6, 6)
    torch.testing.assert_close(y, y_saved, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_with_all_zero_patches_gives_finite_p_gradient(backend):
    """eps = 0 is allowed: where c = 0 the p-gradient term y·ln|c| is 0 (as [d ≠ 0] in G), not
    0·(−inf) = NaN; both backends agree."""
    x = torch.randn(1, 2, 5, 5)
    x[:, :, :3, :3] = 0                        # all-zero patches around the corner
    x, w, p, q = _leaves(x, torch.randn(3, 2, 3, 3), torch.full((3,), 2.0), torch.full((3,), 0.1))
    y = scd_triton.scd2d(x, w, p, q, padding=1, eps=0.0, backend=backend)
    y.backward(torch.ones_like(y))
    for name, t in (("x", x), ("w", w), ("p", p), ("q", q)):
        assert torch.isfinite(t.grad).all(), f"grad_{name} not finite"
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    ref = oracle.scd2d(*leaves, padding=(1, 1, 1, 1), eps=0.0)
    assert (ref.detach()[0, :, 0, 0] == 0).all()
    ref_grad_p = (ref.detach() * torch.where(ref.detach() == 0, 0.0,
                                             (ref.detach().abs() / 1).log() / leaves[2].detach()
                                             .view(1, -1, 1, 1))).sum((0, 2, 3))
    assert_close("grad_p", p.grad.cpu(), ref_grad_p, torch.float32, grad=True, reduce_dim=25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_patches_with_norm_eps_zero_give_the_oracles_finite_gradients(backend):
    """norm_eps = 0 with q > 0: an all-zero patch has ‖s‖ = 0 and c = 0, and its gradient
    term grad_‖s‖/‖s‖ is 0, not 0/0 (which made the whole band of grad_x NaN)."""
    x = torch.randn(1, 2, 6, 6)
    x[..., 3:] = 0                             # all-zero patches in the right half
    x, w, p, q = _leaves(x, torch.randn(3, 2, 3, 3), torch.full((3,), 2.0), torch.full((3,), 0.1))
    y = scd_triton.scd2d(x, w, p, q, padding=1, norm_eps=0.0, backend=backend)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    # the oracle's sqrt needs a positive argument for a finite derivative at s = 0
    ref = oracle.scd2d(*leaves, padding=(1, 1, 1, 1), norm_eps=1e-300)
    ref.backward(grad_y.cpu().double())
    assert_close("y", y.detach().cpu(), ref.detach(), torch.float32, reduce_dim=18)
    for name, t, r in zip("xwpq", (x, w, p, q), leaves):
        assert_close(f"grad_{name}", t.grad.cpu(), r.grad, torch.float32, grad=True, reduce_dim=36)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [3, 8], ids=["direct", "gemm"])
def test_inf_in_a_given_normalised_kernel_gives_nan_in_every_output_of_its_channel(backend,
                                                                                   channels):
    """scd2d_normalized: an Inf tap makes its kernel NaN, as an infinite norm does under the
    norms (without it d and c were ±inf); the corner tap falls on padding at the border."""
    w = torch.randn(4, channels, 3, 3) * 0.2
    w[1, 0, 0, 0] = float("inf")
    x, w = _leaves(torch.randn(2, channels, 6, 6), w)
    y = scd_triton.scd2d_normalized(x, w, 2.0, 0.1, padding=1, backend=backend)
    assert torch.isnan(y[:, 1]).all(), "an Inf in a kernel must give NaN in its channel"
    assert torch.isfinite(y[:, [0, 2, 3]]).all()
    y.backward(torch.ones_like(y))
    assert torch.isnan(w.grad[1]).all() and torch.isfinite(w.grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_kernel_gets_the_oracles_finite_gradient_under_the_plain_norm(backend):
    """The Rohrer layer's norm (no eps, no q) of a kernel of ~1e-20 values: the Jacobian's
    scale² (~4e38) overflowed float32 and made grad_w inf/NaN."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3) * 1e-20
    x, w, p, q = _leaves(x, w, torch.full((4,), 2.0), torch.tensor(0.1))
    y = scd_nd(x, w, p, q, 1, 1, 1, 1, 1e-6, 1e-6, backend, 2, weight_norm="norm",
               weight_norm_eps=0.0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, p, q)]
    x64, w64, p64, q64 = leaves
    w_hat = w64 / w64.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    ref = oracle.scd2d_normalized(x64, w_hat, p64, q64, padding=(1, 1, 1, 1), eps=1e-6,
                                  norm_eps=1e-6)
    ref.backward(grad_y.cpu().double())
    for name, t, r in zip("xwpq", (x, w, p, q), leaves):
        assert_close(f"grad_{name}", t.grad.cpu(), r.grad, torch.float32, grad=True, reduce_dim=27)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_call_ignores_torchs_default_device(backend):
    """Inputs on one device, torch's default device another (here meta): the call, forward and
    backward, runs on the inputs' device and gives the same values."""
    x, w = _leaves(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3))
    expected = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend=backend)
    expected.sum().backward()
    expected_grad = w.grad.clone()
    w.grad = None
    with torch.device("meta"):
        y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend=backend)
        y.sum().backward()
    assert y.device == x.device
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_channels", [2, 3])
def test_channels_last_groups_with_python_float_p_q_equal_nchw(backend, group_channels):
    """Groups of 2–3 channels, channels-last x, a shared (expanded) q: the reference's
    ``‖s‖ + q`` followed the patch norms' channels-last layout, which a view could not flatten
    (a RuntimeError)."""
    x, w = torch.randn(2, 2 * group_channels, 5, 5), torch.randn(4, group_channels, 3, 3)
    x_cl, w = _leaves(x.to(memory_format=torch.channels_last), w)
    y_cl = scd_triton.scd2d(x_cl, w, 2.0, 0.1, padding=1, groups=2, backend=backend)
    y_cl.backward(torch.ones_like(y_cl))
    x_nchw, w_nchw = _leaves(x, w.detach())
    y = scd_triton.scd2d(x_nchw, w_nchw, 2.0, 0.1, padding=1, groups=2, backend=backend)
    y.backward(torch.ones_like(y))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_cl.grad, x_nchw.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_nchw.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_unbatched_sample_runs_as_a_batch_of_one(backend):
    """x [C, H, W] (or [C, L] for scd1d), as conv2d / conv1d take it: the batched call's
    sample, forward and backward."""
    x, w = _leaves(torch.randn(3, 6, 7), torch.randn(4, 3, 3, 3))
    y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend=backend)
    y.sum().backward()
    xb, wb = _leaves(x.detach()[None], w.detach())
    yb = scd_triton.scd2d(xb, wb, 2.0, 0.1, padding=1, backend=backend)
    yb.sum().backward()
    assert y.shape == (4, 6, 7)
    torch.testing.assert_close(y, yb[0], rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xb.grad[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, wb.grad, rtol=0, atol=0)
    x1, w1 = torch.randn(3, 9, device=DEVICE), torch.randn(2, 3, 3, device=DEVICE)
    torch.testing.assert_close(scd_triton.scd1d(x1, w1, 2.0, 0.1, backend=backend),
                               scd_triton.scd1d(x1[None], w1, 2.0, 0.1, backend=backend)[0],
                               rtol=0, atol=0)


def test_python_float_p_q_are_filled_once_and_stay_usable_for_training(monkeypatch):
    """A Python-float p or q becomes a device tensor once per pair of values (no fill per
    call); the tensor made under inference mode still serves a later call that saves it for
    backward, and a new value gets its own tensor."""
    from scd_triton import constants
    monkeypatch.setattr(constants, "_CACHE", {})
    fills = []
    full = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, **k: fills.append(a) or full(*a, **k))
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE, requires_grad=True)
    with torch.inference_mode():
        scd_triton.scd2d(x, w, 2.0, 0.1, padding=1)
    assert len(fills) == 2
    y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1)
    assert len(fills) == 2, "the second call filled p or q again"
    (grad_w,) = torch.autograd.grad(y.sum(), w)
    ref = scd_triton.scd2d(x, w, torch.full((4,), 2.0, device=DEVICE),
                           torch.full((4,), 0.1, device=DEVICE), padding=1)
    # 1 ulp apart at most: on a small layer the reference takes |c|^p as torch.pow, which
    # computes an exponent shared by every channel on its scalar-exponent path
    torch.testing.assert_close(y, ref, rtol=2e-7, atol=0)
    torch.testing.assert_close(grad_w, torch.autograd.grad(ref.sum(), w)[0], rtol=0, atol=0)
    scd_triton.scd2d(x, w, 3.0, 0.1, padding=1)
    assert len(fills) == 6     # the two reference tensors and the new pair


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_python_float_first_seen_in_cuda_graph_capture_is_not_kept():
    """A p or q value first used while a CUDA graph is captured is filled inside the graph only;
    it is not kept for later eager calls, which would read memory the fill never wrote."""
    x = torch.randn(2, 3, 6, 6, device="cuda")
    w = torch.randn(4, 3, 3, 3, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up (compiles the kernels) with other values
        scd_triton.scd2d(x, w, 2.0, 0.1, padding=1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = scd_triton.scd2d(x, w, 2.625, 0.375, padding=1)
    eager = scd_triton.scd2d(x, w, 2.625, 0.375, padding=1)
    ref = scd_triton.scd2d(x.cpu(), w.cpu(), 2.625, 0.375, padding=1)
    torch.testing.assert_close(eager.cpu(), ref, rtol=1e-3, atol=1e-3)
    graph.replay()
    torch.testing.assert_close(captured.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_float_p_q_cache_stays_out_of_tracing(monkeypatch):
    """Fake-tensor, symbolic, jit-traced and functorch calls neither read nor fill the cache of
    constant tensors (a real tensor in a fake trace fails, a symbolic or traced size cannot
    key it, a functorch wrapper has no storage for later calls), and the reference backward
    traces with fake tensors whether or not the graph is kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from scd_triton import constants
    monkeypatch.setattr(constants, "_CACHE", {})
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    call = lambda a, b: scd_triton.scd2d(a, b, 2.0, 0.1, backend="reference")
    call(x, w)
    cached = dict(constants._CACHE)
    assert len(cached) == 2    # p and q; the reference forward's constants
    with FakeTensorMode() as mode:
        y = call(mode.from_tensor(x), mode.from_tensor(w))
        assert type(y).__name__ == "FakeTensor" and y.shape == (2, 4, 6, 6)
    make_fx(call, tracing_mode="symbolic")(x, w)
    torch.jit.trace(call, (x, w), check_trace=False)   # sizes as tensors while tracing
    grad_w = torch.func.grad(lambda b: scd_triton.scd2d(x, b, 7.0, 0.25).sum())(w)
    assert grad_w.shape == w.shape and torch.isfinite(grad_w).all()
    assert constants._CACHE == cached
    for retain in (False, True):
        def step(a, b, p, q):
            y = scd_triton.scd2d(a, b, p, q, backend="reference")
            return torch.autograd.grad(y.sum(), b, retain_graph=retain)
        make_fx(step, tracing_mode="fake")(x.requires_grad_(), w.requires_grad_(),
                                           torch.full((4,), 2.0), torch.full((4,), 0.1))
