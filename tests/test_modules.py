"""Layers: the published parameterizations, state_dicts, Keras converters and MaxAbsPool."""
import warnings

import numpy as np
import pytest
import torch

import oracle
import scd_triton
from helpers import DEVICE, assert_close


def _rohrer_state(n_kernels, cpk, k, w_scale=1.5):
    """A state_dict as the published SharpCosSim2d saves it (some values outside its clamps)."""
    return {"weight": torch.empty(n_kernels, cpk, k, k).uniform_(-w_scale, w_scale),
            "p": torch.empty(1, n_kernels, 1, 1).uniform_(0.0, 3.0),
            "log_q": torch.full((1, 1, 1, 1), -2.0)}


def test_rohrer_loads_published_state_dict_and_matches_formula():
    layer = scd_triton.SCD2d(3, 5, 3, padding=1)
    state = _rohrer_state(5, 3, 3)
    layer.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    y = layer(x)
    clamped_w = state["weight"].clamp(-1, 1)
    clamped_p = state["p"].clamp(min=0.1)
    ref = oracle.rohrer_sharp_cos_sim2d(x, clamped_w, clamped_p, state["log_q"], padding=1)
    assert_close("y", y, ref, torch.float32, reduce_dim=27)
    # the published layer clamps its stored parameters in place
    assert layer.weight.abs().max() <= 1 and layer.p.min() >= 0.1
    assert set(layer.state_dict()) == {"weight", "p", "log_q"}


def test_rohrer_shared_weights_depthwise():
    layer = scd_triton.SCD2d(4, 8, 3, padding=1, groups=4, shared_weights=True)
    assert layer.weight.shape == (2, 1, 3, 3) and layer.p.shape == (1, 2, 1, 1)
    x = torch.randn(1, 4, 6, 6)
    y = layer(x)
    tiled_w = layer.weight.detach().repeat(4, 1, 1, 1)
    tiled_p = layer.p.detach().repeat(1, 4, 1, 1)
    ref = oracle.rohrer_sharp_cos_sim2d(x, tiled_w, tiled_p, layer.log_q.detach(), padding=1,
                                        groups=4)
    assert_close("y", y, ref, torch.float32, reduce_dim=9)
    y.sum().backward()
    assert layer.weight.grad.shape == (2, 1, 3, 3) and layer.log_q.grad is not None


def test_rohrer_init_ranges():
    layer = scd_triton.SCD2d(8, 16, 3, w_max=0.5, q_init=1e-2)
    assert layer.weight.abs().max() <= 0.5
    assert 1 <= layer.p.min() and layer.p.max() <= 3
    assert torch.allclose(layer.log_q.exp(), torch.tensor(1e-2))


def test_pisoni_matches_keras_formula_via_converter():
    C, O = 3, 4
    kernel = np.random.uniform(-0.5, 0.5, size=(1, 9 * C, O)).astype(np.float32)
    p_raw = np.random.randn(O).astype(np.float32)
    q_raw = np.array([0.7], dtype=np.float32)
    layer = scd_triton.compat.from_pisoni_keras(kernel, p_raw, q_raw)
    x_nhwc = np.random.randn(2, 6, 7, C).astype(np.float32)
    y = layer(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    ref = oracle.pisoni_keras_nhwc(x_nhwc, kernel, p_raw, q_raw)
    assert_close("y", y.permute(0, 2, 3, 1), torch.from_numpy(ref), torch.float32, reduce_dim=27)
    back = scd_triton.compat.to_pisoni_keras(layer)
    for got, want in zip(back, (kernel, p_raw, q_raw)):
        np.testing.assert_array_equal(got, want)
        got += 1.0         # copies: editing the arrays leaves the layer alone
    for got, want in zip(scd_triton.compat.to_pisoni_keras(layer), (kernel, p_raw, q_raw)):
        np.testing.assert_array_equal(got, want)


def test_pisoni_init_is_keras_glorot_and_zeros():
    layer = scd_triton.SCD2d(16, 32, 3, padding="same", parameterization="pisoni")
    limit = (6 / (16 * 9 + 32)) ** 0.5
    assert layer.weight.abs().max() <= limit and layer.weight.abs().max() > 0.9 * limit
    assert (layer.p_raw == 0).all() and (layer.q_raw == 0).all()


def test_compat_rejects_bad_layouts():
    with pytest.raises(ValueError, match="kernel must have shape"):
        scd_triton.compat.from_pisoni_keras(np.zeros((1, 10, 4)), np.zeros(4), np.zeros(1))
    with pytest.raises(TypeError, match="pisoni"):
        scd_triton.compat.to_pisoni_keras(scd_triton.SCD2d(3, 4, 3))


def test_state_dict_round_trip():
    for parameterization in ("rohrer", "pisoni"):
        a = scd_triton.SCD2d(3, 6, (3, 5), padding="same", parameterization=parameterization)
        b = scd_triton.SCD2d(3, 6, (3, 5), padding="same", parameterization=parameterization)
        b.load_state_dict(a.state_dict())
        x = torch.randn(1, 3, 7, 7)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_scd1d_layer_matches_oracle():
    layer = scd_triton.SCD1d(4, 6, 5, stride=2, padding=2, parameterization="pisoni")
    x = torch.randn(2, 4, 17)
    y = layer(x)
    p = torch.softmax(layer.p_raw.detach(), 0)
    q = layer.q_raw.detach().square()[0] / 10
    ref = oracle.scd2d(x.unsqueeze(2), layer.weight.detach().unsqueeze(2), p, q,
                       stride=(1, 2), padding=(0, 0, 2, 2))
    assert_close("y", y, ref.squeeze(2), torch.float32, reduce_dim=20)


def test_layer_options_and_repr():
    layer = scd_triton.SCD2d(4, 8, 3, stride=2, padding=1, groups=2)
    assert repr(layer) == ("SCD2d(4, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
                           "groups=2, parameterization='rohrer')")
    with pytest.raises(ValueError, match="parameterization must be"):
        scd_triton.SCD2d(4, 8, 3, parameterization="keras")
    with pytest.raises(TypeError, match="unknown options"):
        scd_triton.SCD2d(4, 8, 3, parameterization="pisoni", w_max=1.0)
    with pytest.raises(ValueError, match="divisible by groups"):
        scd_triton.SCD2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        scd_triton.SCD2d(4, 8, 0)
    layer = scd_triton.SCD2d(2, 3, 3, dtype=torch.float64)
    assert layer(torch.randn(1, 2, 5, 5, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        scd_triton.SCD2d(2, 3, 3, dtype=torch.complex64)
    # options away from their defaults show in the repr
    layer = scd_triton.SCD2d(4, 8, 3, groups=2, shared_weights=True, q_init=0.01)
    assert repr(layer).endswith("parameterization='rohrer', shared_weights=True, q_init=0.01)")


def test_maxabspool2d_keeps_signed_largest_magnitude():
    x = torch.tensor([[[[1.0, -3.0, 0.5, 2.0],
                        [2.0, 0.0, -0.1, -4.0],
                        [-5.0, 4.0, 1.0, 1.0],
                        [0.0, 1.0, 1.0, -1.5]]]], requires_grad=True)
    y = scd_triton.MaxAbsPool2d(2)(x)
    torch.testing.assert_close(y, torch.tensor([[[[-3.0, -4.0], [-5.0, -1.5]]]]))
    y.sum().backward()
    expected = torch.zeros(4, 4)
    expected[0, 1] = expected[1, 3] = expected[2, 0] = expected[3, 3] = 1
    torch.testing.assert_close(x.grad[0, 0], expected)


def test_maxabspool_matches_brute_force():
    x = torch.randn(2, 3, 9, 7)
    y = scd_triton.MaxAbsPool2d(3, stride=2, padding=1)(x)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
    windows = xp.unfold(2, 3, 2).unfold(3, 3, 2).flatten(-2)
    ref = windows.gather(-1, windows.abs().argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(y, ref)
    x1 = torch.randn(2, 3, 10)
    y1 = scd_triton.MaxAbsPool1d(4)(x1)
    w1 = x1.unfold(2, 4, 4)
    torch.testing.assert_close(y1, w1.gather(-1, w1.abs().argmax(-1, keepdim=True)).squeeze(-1))
    torch.testing.assert_close(scd_triton.MaxAbsPool2d(2)(x1), scd_triton.MaxAbsPool2d(2)(x1[None])[0])
    with pytest.raises(ValueError, match="x must be 4-D"):
        scd_triton.MaxAbsPool2d(2)(x1[0])


def _rohrer_layer_and_oracle_leaves(channels=3):
    """A rohrer layer loaded with out-of-clamp values, and float64 leaves of its clamped values."""
    layer = scd_triton.SCD2d(channels, channels, 3, padding=1)
    state = _rohrer_state(channels, channels, 3)
    state["p"][0, 0] = 0.02   # below p_min: clamped to 0.1
    layer.load_state_dict(state)
    leaves = (state["weight"].clamp(-1, 1).double().requires_grad_(),
              state["p"].clamp(min=0.1).double().requires_grad_(),
              state["log_q"].double().requires_grad_())
    return layer, leaves


def _assert_rohrer_grads(layer, leaves, reduce_dim):
    for name, got, ref in zip(("weight", "p", "log_q"), (layer.weight, layer.p, layer.log_q),
                              leaves):
        assert_close(f"grad_{name}", got.grad, ref.grad, torch.float32, grad=True,
                     reduce_dim=reduce_dim)


def test_rohrer_layer_used_twice_in_one_graph_matches_oracle_gradients():
    """Weight sharing: the in-place clamp of the second call must not invalidate the first's
    saved tensors; gradients flow fully to the clamped parameters, as in the published layer."""
    layer, (w, p, log_q) = _rohrer_layer_and_oracle_leaves()
    x = torch.randn(2, 3, 6, 6)
    y = layer(layer(x))
    assert layer.weight.abs().max() <= 1 and layer.p.min() >= 0.1
    ref = oracle.rohrer_sharp_cos_sim2d(
        oracle.rohrer_sharp_cos_sim2d(x, w, p, log_q, padding=1), w, p, log_q, padding=1)
    assert_close("y", y, ref, torch.float32, reduce_dim=27)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref.backward(grad.double())
    _assert_rohrer_grads(layer, (w, p, log_q), reduce_dim=2 * 27 * 72)


def test_rohrer_eval_forward_between_forward_and_backward():
    layer, (w, p, log_q) = _rohrer_layer_and_oracle_leaves()
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 3, 5, 5))
    layer.train()
    grad = torch.randn_like(y)
    y.backward(grad)
    oracle.rohrer_sharp_cos_sim2d(x, w, p, log_q, padding=1).backward(grad.double())
    _assert_rohrer_grads(layer, (w, p, log_q), reduce_dim=72)


def test_rohrer_compiled_then_eager_call_then_backward():
    """torch.compile(fullgraph=True) traces the clamp without graph breaks, clamps the stored
    parameters too, and an eager call after it leaves the compiled graph's saved tensors valid."""
    layer, (w, p, log_q) = _rohrer_layer_and_oracle_leaves()
    x = torch.randn(2, 3, 6, 6)
    y1 = torch.compile(layer, fullgraph=True)(x)
    assert layer.weight.abs().max() <= 1 and layer.p.min() >= 0.1
    y2 = layer(x)
    ref = oracle.rohrer_sharp_cos_sim2d(x, w, p, log_q, padding=1)
    assert_close("y_compiled", y1, ref, torch.float32, reduce_dim=27)
    grad = torch.randn_like(y1)
    (y1 * grad + y2 * grad.flip(0)).sum().backward()
    (ref * grad.double() + ref * grad.double().flip(0)).sum().backward()
    _assert_rohrer_grads(layer, (w, p, log_q), reduce_dim=2 * 72)


@pytest.mark.parametrize("kwargs, match", [
    (dict(padding=-1), "padding must be >= 0"),
    (dict(padding=(1, -2)), "padding must be >= 0"),
    (dict(padding="full"), "padding must be an int, a tuple, 'same' or 'valid'"),
    (dict(padding="same", stride=2), "padding='same' needs stride 1"),
    (dict(q_init=0.0), "q_init must be a finite float > 0"),
    (dict(q_init=-1e-3), "q_init must be a finite float > 0"),
    (dict(w_max=0.0), "w_max must be a finite float > 0"),
    (dict(w_max=float("inf")), "w_max must be a finite float > 0"),
    (dict(w_max=float("nan")), "w_max must be a finite float > 0"),
    (dict(p_min=0.0), "p_min must be a finite float > 0"),
    (dict(eps=-1e-6), "eps must be a finite float >= 0"),
    (dict(eps=float("inf")), "eps must be a finite float >= 0"),
    (dict(shared_weights="yes"), "shared_weights must be a bool"),
    (dict(parameterization="pisoni", eps=-1.0), "eps must be a finite float >= 0"),
    (dict(parameterization="pisoni", eps=float("nan")), "eps must be a finite float >= 0"),
])
def test_layer_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scd_triton.SCD2d(4, 8, 3, **kwargs)


def test_layer_constructor_accepts_boundary_arguments():
    for kwargs in (dict(padding="valid"), dict(padding=0), dict(padding=(0, 2)), dict(eps=0.0),
                   dict(padding="same", dilation=2), dict(parameterization="pisoni", eps=0.0)):
        layer = scd_triton.SCD2d(2, 2, 3, **kwargs)
        assert torch.isfinite(layer(torch.randn(1, 2, 7, 7))).all(), kwargs
    with pytest.raises(ValueError, match="padding must be >= 0"):
        scd_triton.SCD1d(2, 2, 3, padding=-1)
    layer = scd_triton.SCD2d(np.int64(4), np.int32(6), 3, groups=np.int64(2))   # as nn.Conv2d
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, layer.groups))


@pytest.mark.parametrize("parameterization", ["rohrer", "pisoni"])
def test_layer_names_channel_and_rank_mismatch(parameterization):
    layer = scd_triton.SCD2d(3, 4, 3, parameterization=parameterization)
    with pytest.raises(ValueError, match=r"x has 4 channels, this layer expects 3"):
        layer(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"x must be 4-D \[N, C, H, W\] \(or 3-D, one unbatched "
                                         r"sample\), got shape \(6, 6\)"):
        layer(torch.randn(6, 6))
    x = torch.randn(3, 6, 6)   # one unbatched sample, as nn.Conv2d takes it
    torch.testing.assert_close(layer(x), layer(x[None])[0], rtol=0, atol=0)
    layer1d = scd_triton.SCD1d(3, 4, 3, parameterization=parameterization)
    with pytest.raises(ValueError, match=r"x has 2 channels, this layer expects 3"):
        layer1d(torch.randn(1, 2, 9))
    with pytest.raises(ValueError, match=r"x must be 3-D \[N, C, L\] \(or 2-D, one unbatched "
                                         r"sample\), got shape \(1, 3, 1, 9\)"):
        layer1d(torch.randn(1, 3, 1, 9))
    x = torch.randn(3, 9)
    torch.testing.assert_close(layer1d(x), layer1d(x[None])[0], rtol=0, atol=0)


def _maxabs_brute_force_2d(x, k, stride, padding):
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    windows = xp.unfold(2, k, stride).unfold(3, k, stride).flatten(-2)
    return windows.gather(-1, windows.abs().argmax(-1, keepdim=True)).squeeze(-1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_maxabspool2d_keeps_memory_format_values_and_gradients(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    base = torch.randn(2, 5, 9, 7, dtype=torch.float64)
    x = base.clone(memory_format=fmt).requires_grad_()
    y = scd_triton.MaxAbsPool2d(3, stride=2, padding=1)(x)
    assert y.is_contiguous(memory_format=fmt)
    assert y.is_contiguous() == (not channels_last)
    assert y.stride() == torch.nn.MaxPool2d(3, stride=2, padding=1)(x).stride()
    leaf = base.clone().requires_grad_()
    ref = _maxabs_brute_force_2d(leaf, 3, 2, 1)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, leaf.grad)   # overlapping windows: sums


def test_maxabspool1d_values_and_gradients_on_a_strided_input():
    base = torch.randn(2, 10, 3, dtype=torch.float64)
    x = base.clone().requires_grad_()
    y = scd_triton.MaxAbsPool1d(4, stride=3)(x.transpose(1, 2))   # a non-contiguous [N, C, L]
    leaf = base.transpose(1, 2).detach().clone().requires_grad_()
    w = leaf.unfold(2, 4, 3)
    ref = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    y.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad.transpose(1, 2), leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=5, padding="same"), "kernel_size=\\(3, 3\\)"),
    (dict(kernel_size=(3, 1), padding="same"), "kernel_size=\\(3, 3\\)"),
    (dict(padding="valid"), "padding 'same'"),
    (dict(padding=0), "padding 'same'"),
    (dict(padding=2), "padding 'same'"),
    (dict(padding=1, stride=2), "stride=\\(1, 1\\)"),
    (dict(padding="same", dilation=2), "dilation=\\(1, 1\\)"),
    (dict(padding="same", groups=2), "groups=1"),
])
def test_to_pisoni_keras_refuses_what_keras_cannot_express(kwargs, match):
    kwargs = {"kernel_size": 3, **kwargs}
    layer = scd_triton.SCD2d(4, 4, parameterization="pisoni", **kwargs)
    with pytest.raises(ValueError, match=match):
        scd_triton.compat.to_pisoni_keras(layer)


def test_to_pisoni_keras_accepts_explicit_padding_one_as_same():
    same = scd_triton.SCD2d(3, 4, 3, padding="same", parameterization="pisoni")
    one = scd_triton.SCD2d(3, 4, 3, padding=1, parameterization="pisoni")
    one.load_state_dict(same.state_dict())
    for got, want in zip(scd_triton.compat.to_pisoni_keras(one),
                         scd_triton.compat.to_pisoni_keras(same)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype, np_dtype", [(torch.bfloat16, np.float32),
                                             (torch.float16, np.float16),
                                             (torch.float64, np.float64)])
def test_to_pisoni_keras_half_and_double_layers(dtype, np_dtype):
    C, O = 2, 3
    kernel = np.random.uniform(-0.5, 0.5, size=(1, 9 * C, O)).astype(np.float32)
    p_raw = np.random.randn(O).astype(np.float32)
    q_raw = np.array([0.7], dtype=np.float32)
    layer = scd_triton.compat.from_pisoni_keras(kernel, p_raw, q_raw, dtype=dtype)
    back = scd_triton.compat.to_pisoni_keras(layer)
    for got, want in zip(back, (kernel, p_raw, q_raw)):
        assert got.dtype == np_dtype and got.shape == want.shape
        # exactly the layer's values: the float32 arrays rounded to the layer's dtype
        rounded = torch.from_numpy(want).to(dtype).to(torch.float64).numpy()
        np.testing.assert_array_equal(got.astype(np.float64), rounded)


@pytest.mark.parametrize("module", ["scd_triton.modules", "bench.run", "test_modules", "oracle"])
def test_deprecation_warning_from_project_code_fails_the_suite(module):
    """pyproject's filterwarnings turns them into errors (a third-party one stays a warning)."""
    with pytest.raises(DeprecationWarning, match="old API"):
        warnings.warn_explicit("old API", DeprecationWarning, "f.py", 1, module=module)
    with pytest.warns(DeprecationWarning, match="old API"):
        warnings.warn_explicit("old API", DeprecationWarning, "f.py", 1, module="numpy.core")


def test_rohrer_all_zero_kernel_matches_nothing():
    """The published kernel norm has no eps: an all-zero kernel is 0/0, defined as ŵ = 0 (y = 0,
    zero gradient for it) rather than NaN, on every backend (see docs/DESIGN.md)."""
    layer = scd_triton.SCD2d(3, 4, 3, padding=1)
    with torch.no_grad():
        layer.weight[2] = 0
    x = torch.randn(2, 3, 6, 6)
    y = layer(x)
    assert (y[:, 2] == 0).all() and torch.isfinite(y).all()
    y.square().sum().backward()
    assert (layer.weight.grad[2] == 0).all() and torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(layer.p.grad).all() and torch.isfinite(layer.log_q.grad).all()


@pytest.mark.parametrize("parameterization", ["rohrer", "pisoni"])
def test_meta_tensors_give_conv2d_shapes_forward_and_backward(parameterization):
    """On the meta device (deferred init, shape inference) a layer works out shapes as conv2d
    does, forward and backward; autocast, which has no meta device, is not asked about."""
    layer = scd_triton.SCD2d(3, 4, 3, stride=2, padding=1, parameterization=parameterization,
                             device="meta")
    x = torch.randn(2, 3, 9, 7, device="meta", requires_grad=True)
    y = layer(x)
    conv = torch.nn.functional.conv2d(x, torch.empty(4, 3, 3, 3, device="meta"), stride=2,
                                      padding=1)
    assert y.device.type == "meta" and y.shape == conv.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == layer.weight.shape
    y1 = scd_triton.scd1d(torch.randn(2, 3, 16, device="meta"),
                          torch.randn(4, 3, 3, device="meta"), 2.0, 0.1)
    assert y1.shape == (2, 4, 14)


@pytest.mark.parametrize("parameterization", ["rohrer", "pisoni"])
def test_torch_export_of_a_layer_matches_eager(parameterization):
    """``torch.export`` traces a layer (the Rohrer clamps become out-of-place, since export
    cannot trace the in-place ``.data`` clamp); with parameters outside the Rohrer clamps the
    exported program's output still equals the eager layer's."""
    layer = scd_triton.SCD2d(3, 4, 3, padding=1, parameterization=parameterization)
    if parameterization == "rohrer":
        with torch.no_grad():
            layer.weight.mul_(3.0)
            layer.p.sub_(1.0)
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parameterization", ["rohrer", "pisoni"])
def test_torch_func_grad_of_a_layer_matches_backward(parameterization):
    """``torch.func.grad`` over ``functional_call`` of a layer gives ``backward()``'s parameter
    gradients and leaves the stored parameters alone. Rohrer parameters out of their clamp
    range too: under the transform the clamp acts on the values used, with the gradient
    passed straight through, as the eager layer's in-place clamp gives it."""
    layer = scd_triton.SCD2d(3, 4, 3, padding=1, parameterization=parameterization)
    if parameterization == "rohrer":
        with torch.no_grad():
            layer.weight[0, 0, 0, 0] = 3.0        # above w_max = 1
            layer.p[0, 1, 0, 0] = 0.01            # below p_min = 0.1 (p is [1, O, 1, 1])
    x = torch.randn(2, 3, 8, 8)
    params = {name: t.detach().clone() for name, t in layer.named_parameters()}
    loss = lambda ps: torch.func.functional_call(layer, ps, (x,)).square().sum()
    grads = torch.func.grad(loss)(params)
    for name, t in layer.named_parameters():
        assert torch.equal(t, params[name])
    layer(x).square().sum().backward()      # clamps the stored parameters first
    if parameterization == "rohrer":
        assert grads["weight"][0, 0, 0, 0] != 0 and grads["p"][0, 1, 0, 0] != 0
    for name, t in layer.named_parameters():
        torch.testing.assert_close(grads[name], t.grad, rtol=0, atol=0)


@pytest.mark.parametrize("parameterization", ["rohrer", "pisoni"])
def test_per_sample_gradients_of_a_layer_are_each_samples_gradients(parameterization):
    """Per-sample gradients as torch.func computes them for differentially private training:
    ``vmap`` over the batch of ``grad`` over ``functional_call`` gives, for each sample, the
    parameter gradients of that sample's own backward (float64: vmap batches the convolutions,
    which moves float32's last bits)."""
    layer = scd_triton.SCD2d(3, 4, 3, padding=1, parameterization=parameterization,
                             dtype=torch.float64)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    params = {name: t.detach().clone() for name, t in layer.named_parameters()}
    loss = lambda ps, sample: torch.func.functional_call(layer, ps, (sample[None],)).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        layer.zero_grad()
        layer(x[i:i + 1]).square().sum().backward()
        for name, t in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], t.grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "1d", "1d_transposed"])
def test_output_can_be_modified_in_place_like_conv2d(backend, layout, monkeypatch):
    """``nn.ReLU(inplace=True)`` after a layer, as after nn.Conv2d: the output is a tensor of
    its own (no view of an op-internal temporary), with the same gradients as out of place;
    a 1-D layer's output is contiguous as conv1d's, also for channels-contiguous input."""
    monkeypatch.setenv("SCD_BACKEND", backend)
    one_d = layout.startswith("1d")
    device = DEVICE if backend == "triton" else "cpu"
    layer = (scd_triton.SCD1d(4, 6, 3, padding=1) if one_d
             else scd_triton.SCD2d(4, 6, 3, padding=1)).to(device)
    if layout == "1d_transposed":      # embeddings [N, L, C] fed as [N, C, L]
        x = torch.randn(2, 9, 4, device=device).transpose(1, 2)
    else:
        x = torch.randn(2, 4, 9, device=device) if one_d else torch.randn(2, 4, 6, 6, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    grads = []
    for inplace in (False, True):
        x_leaf = x.detach().requires_grad_()
        layer.zero_grad()
        y = torch.nn.ReLU(inplace=inplace)(layer(x_leaf))
        if one_d:
            assert y.is_contiguous(), y.stride()
        y.backward(torch.ones_like(y))
        grads.append((x_leaf.grad, layer.weight.grad.clone()))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
